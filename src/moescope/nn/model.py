"""TinyMoELM: a small decoder-only Mixture-of-Experts causal language model.

Architecture (Llama / Mixtral / Qwen-MoE style, pre-norm):

    x = embed_tokens(input_ids)
    for each layer:  x = x + self_attn(input_layernorm(x))        # RoPE, causal SDPA
                     x = x + mlp(post_attention_layernorm(x))      # MoELayer or dense SwiGLU
    logits = lm_head(norm(x))

Module paths mirror transformers' MoE models (``model.embed_tokens``,
``model.layers.{i}.self_attn``, ``model.layers.{i}.mlp``, ``model.norm``, ``lm_head``), so
adapters and the transformers wrapper (``moescope.nn.hf``) see the same tree and the same
state-dict keys. This module imports torch only.

References: RoPE (Su et al. 2021), RMSNorm (Zhang & Sennrich 2019), SwiGLU (Shazeer 2020),
top-k MoE (Shazeer et al. 2017; Mixtral, Jiang et al. 2024), load-balancing loss
(Fedus et al. 2021), router z-loss (Zoph et al. 2022).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.router_output import RouterOutput
from moescope.nn.routers import TopKRouter

# Router kinds constructible by name. Classes other than TopKRouter are imported lazily
# because they are optional additions to ``moescope.nn.routers``.
ROUTER_CLASSES: dict[str, str] = {
    "topk": "TopKRouter",
    "switch": "SwitchRouter",
    "expert_choice": "ExpertChoiceRouter",
    "noisy_topk": "NoisyTopKRouter",
    "group_limited": "GroupLimitedRouter",
}


@dataclass
class TinyMoEConfig:
    """Hyper-parameters of :class:`TinyMoELM`.

    Attributes:
        vocab_size: V (256 = raw bytes).
        hidden_size: H.
        num_layers: number of decoder layers L.
        num_heads: attention heads; ``hidden_size`` must be divisible by it.
        intermediate_size: I of each routed expert.
        dense_intermediate_size: I of the dense SwiGLU MLP in non-MoE layers (and of the
            shared experts); defaults to ``intermediate_size * top_k`` so a dense layer
            costs about what an MoE layer activates per token.
        num_experts: E routed experts per MoE layer.
        top_k: K experts per token.
        moe_every: MoE feed-forward in layers where ``(i + 1) % moe_every == 0`` (1 = all
            layers; 2 = layers 1, 3, ...); the others get a dense SwiGLU MLP.
        num_shared_experts: dense experts applied to every token (DeepSeek-MoE); they are
            one SwiGLU MLP of width ``num_shared_experts * intermediate_size``.
        router: router kind, one of ``ROUTER_CLASSES`` ("topk" default).
        router_kwargs: extra keyword arguments for a non-default router's constructor.
        norm_topk_prob: renormalise the K combine weights to sum to 1 (TopKRouter).
        max_seq_len: longest sequence the model is meant for (checked in forward).
        rope_theta: RoPE base.
        aux_loss_coef: weight of the load-balancing loss in ``loss``.
        z_loss_coef: weight of the router z-loss in ``loss``.
        tie_embeddings: share ``lm_head.weight`` with ``model.embed_tokens.weight``.
        rms_norm_eps: RMSNorm epsilon.
        initializer_range: std of the normal initialisation of every matrix.
    """

    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    dense_intermediate_size: int | None = None
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1
    num_shared_experts: int = 0
    router: str = "topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    norm_topk_prob: bool = True
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    tie_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError("head dimension hidden_size // num_heads must be even for RoPE")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {self.moe_every}")
        if self.router not in ROUTER_CLASSES:
            raise ValueError(
                f"unknown router {self.router!r}; choose one of {sorted(ROUTER_CLASSES)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dense_size(self) -> int:
        """I of the dense MLP in non-MoE layers."""
        if self.dense_intermediate_size is not None:
            return self.dense_intermediate_size
        return self.intermediate_size * self.top_k

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` (0-based) has an MoE feed-forward."""
        return (index + 1) % self.moe_every == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TinyMoEOutput:
    """What :meth:`TinyMoELM.forward` returns.

    - ``loss``: scalar ``lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss``, or
      None without labels.
    - ``logits`` [B, S, V].
    - ``lm_loss``: next-token cross entropy (mean over labels != -100), or None.
    - ``aux_loss``, ``z_loss``: mean over MoE layers of each layer's router loss
      (padding excluded); zero when the model has no MoE layer.
    - ``router_outputs``: one RouterOutput per MoE layer, in layer order ([B*S] tokens).
    - ``past_key_values``: the cache object passed in (updated in place), or None.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    router_outputs: tuple[RouterOutput, ...]
    past_key_values: Any = None


class KVCache(Protocol):
    """The part of transformers' ``Cache`` API the attention uses (``DynamicCache`` fits)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class TinyMoERMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, over the last dim.

    Computed in float32 and cast back, as Llama / Qwen do. Shape-preserving [..., H].
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (Su et al. 2021) in the rotate-half layout used by Llama.

    ``positions`` [B, S] int -> ``cos``, ``sin`` [B, S, D]. Computed on the fly rather than
    cached in a buffer so that the module has no non-persistent state to re-create after
    a meta-device load.
    """
    # At least float32: float16 angles at position ~1000 would be off by whole radians.
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim)
    )
    freqs = positions.to(work).unsqueeze(-1) * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, nh, S, D] by the RoPE tables ``cos``/``sin`` [B, S, D]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class TinyMoEAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, via ``F.scaled_dot_product_attention``.

    ``forward(x [B, S, H], cos, sin [B, S, D], mask [B, 1, S, S_k] bool | None,
    past_key_values=None) -> [B, S, H]``. ``mask`` None means plain causal attention
    (``is_causal=True``, no cache); otherwise it is the full boolean mask (True = attend).
    """

    def __init__(self, config: TinyMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_key_values: KVCache | None = None,
    ) -> torch.Tensor:
        b, s, h = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


class TinyMoEMLP(nn.Module):
    """Dense SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)). [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        del token_mask  # same call signature as MoELayer
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_router(config: TinyMoEConfig) -> nn.Module:
    """Construct the router named by ``config.router``.

    "topk" builds :class:`TopKRouter`; other kinds are looked up in
    ``moescope.nn.routers`` at call time and given ``hidden_size``, ``num_experts``,
    ``top_k`` (when their constructor takes it) and ``config.router_kwargs``.
    """
    if config.router == "topk":
        return TopKRouter(
            config.hidden_size,
            config.num_experts,
            config.top_k,
            normalize=config.norm_topk_prob,
            **config.router_kwargs,
        )
    class_name = ROUTER_CLASSES[config.router]
    routers = importlib.import_module("moescope.nn.routers")
    cls = getattr(routers, class_name, None)
    if cls is None:
        raise ValueError(
            f"router={config.router!r} needs moescope.nn.routers.{class_name}, which this "
            f"version of moescope does not provide; use router='topk' or one of the kinds "
            f"available in moescope.nn.routers."
        )
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"hidden_size": config.hidden_size, "num_experts": config.num_experts}
    if "top_k" in params:
        kwargs["top_k"] = config.top_k
    if "normalize" in params:
        kwargs["normalize"] = config.norm_topk_prob
    if "norm_topk_prob" in params:
        kwargs["norm_topk_prob"] = config.norm_topk_prob
    kwargs.update(config.router_kwargs)
    return cls(**kwargs)


def _last_router_output(mlp: object) -> RouterOutput:
    """The RouterOutput an MoE block (``MoELayer`` or ``ExpertParallelMoELayer``) kept
    from its last forward. ``mlp`` is typed ``object`` because torch types a submodule
    reached by attribute (``layer.mlp``) as ``Tensor | Module``."""
    ro = getattr(mlp, "router_output", None)
    assert isinstance(ro, RouterOutput), f"{type(mlp).__name__} has no router output yet"
    return ro


class TinyMoEDecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention then feed-forward (MoE or dense), both residual.

    ``forward(x [B, S, H], cos, sin, mask, token_mask [B, S] bool | None, past_key_values)``
    returns ``(x [B, S, H], aux_loss, z_loss)``; the two scalars are zero for a dense
    layer. Returning the router losses (instead of only stashing them on the module) keeps
    them connected to the graph under gradient checkpointing.
    """

    def __init__(self, config: TinyMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = TinyMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TinyMoEAttention(config, layer_idx)
        self.post_attention_layernorm = TinyMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module
        if self.is_moe:
            shared = None
            if config.num_shared_experts > 0:
                shared = TinyMoEMLP(
                    config.hidden_size, config.num_shared_experts * config.intermediate_size
                )
            self.mlp = MoELayer(
                build_router(config),
                GroupedExperts(config.num_experts, config.hidden_size, config.intermediate_size),
                shared_experts=shared,
            )
        else:
            self.mlp = TinyMoEMLP(config.hidden_size, config.dense_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values)
        x = x + self.mlp(self.post_attention_layernorm(x), token_mask)
        zero = x.new_zeros((), dtype=torch.float32)
        if not self.is_moe:
            return x, zero, zero
        ro = _last_router_output(self.mlp)
        aux = ro.losses.get("aux_loss", zero)
        z = ro.losses.get("z_loss", zero)
        return x, aux.float(), z.float()


@dataclass
class TinyMoEModelOutput:
    """Output of :class:`TinyMoEModel`: ``hidden_states`` [B, S, H] (after the final norm),
    ``aux_loss`` / ``z_loss`` (means over MoE layers) and ``router_outputs``."""

    hidden_states: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    router_outputs: tuple[RouterOutput, ...]


class TinyMoEModel(nn.Module):
    """The decoder stack without the LM head (transformers' ``XxxModel``).

    Children: ``embed_tokens``, ``layers`` (ModuleList of :class:`TinyMoEDecoderLayer`),
    ``norm``. ``gradient_checkpointing`` (bool) re-computes each layer in backward;
    transformers' ``gradient_checkpointing_enable`` sets it (and
    ``_gradient_checkpointing_func``) on this module.
    """

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.config = config
        # Typed nn.Module: transformers' set_input_embeddings may install any module.
        self.embed_tokens: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TinyMoEDecoderLayer(config, i) for i in range(config.num_layers)
        )
        self.norm = TinyMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func: Callable[..., Any] = partial(
            checkpoint, use_reentrant=False
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> TinyMoEModelOutput:
        """Run the stack.

        Args:
            input_ids: [B, S] int token ids in ``[0, vocab_size)``.
            attention_mask: [B, S_past + S] (1 = real token, 0 = padding) or None.
            position_ids: [B, S] RoPE positions; default ``S_past + arange(S)``.
            past_key_values: a transformers-style cache (``update``, ``get_seq_length``),
                updated in place, or None.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + s > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {past + s} exceeds max_seq_len={self.config.max_seq_len}; "
                "use shorter inputs or a config with a larger max_seq_len"
            )
        device = input_ids.device
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=device).unsqueeze(0).expand(b, s)
        cos, sin = rotary_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, x.dtype
        )

        token_mask: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b:
                raise ValueError(
                    "attention_mask must be [batch, past + seq] with 1 for real tokens and 0 "
                    f"for padding; got shape {tuple(attention_mask.shape)}"
                )
            token_mask = attention_mask[:, -s:].bool()
        if attention_mask is not None or past > 0:
            mask = self._attention_mask(attention_mask, b, s, past, device)

        use_ckpt = (
            self.gradient_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and past_key_values is None  # a re-run would append to the cache twice
        )
        aux_terms: list[torch.Tensor] = []
        z_terms: list[torch.Tensor] = []
        router_outputs: list[RouterOutput] = []
        for layer in self.layers:
            if use_ckpt:
                x, aux, z = self._gradient_checkpointing_func(
                    layer.__call__, x, cos, sin, mask, token_mask, None
                )
            else:
                x, aux, z = layer(x, cos, sin, mask, token_mask, past_key_values)
            if layer.is_moe:
                aux_terms.append(aux)
                z_terms.append(z)
                router_outputs.append(_last_router_output(layer.mlp))
        x = self.norm(x)
        zero = x.new_zeros((), dtype=torch.float32)
        aux_loss = torch.stack(aux_terms).mean() if aux_terms else zero
        z_loss = torch.stack(z_terms).mean() if z_terms else zero
        return TinyMoEModelOutput(x, aux_loss, z_loss, tuple(router_outputs))

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, b: int, s: int, past: int, device: torch.device
    ) -> torch.Tensor:
        """[B, 1, S, past + S] bool: causal (offset by the cache) and not padding.

        A query always sees itself, so padding rows (left padding) never become fully
        masked (SDPA would return NaN there, and NaN would reach the router).
        """
        q_pos = torch.arange(past, past + s, device=device).unsqueeze(-1)  # [S, 1]
        k_pos = torch.arange(past + s, device=device).unsqueeze(0)  # [1, S_k]
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0)  # [1, 1, S, S_k]
        if attention_mask is not None:
            if attention_mask.shape[-1] != past + s:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[-1]} columns; expected "
                    f"past + seq = {past + s}"
                )
            keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S_k]
            allowed = (allowed & keep) | (k_pos == q_pos)
        return allowed.expand(b, 1, s, past + s)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: logits[:, t] predicts labels[:, t + 1]; -100 is ignored.

    ``logits`` [B, S, V], ``labels`` [B, S]; mean over counted positions (at least float32).
    """
    v = logits.shape[-1]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    shift_logits = logits[:, :-1, :].to(dtype).reshape(-1, v)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def init_tiny_moe_weights(module: nn.Module, std: float) -> None:
    """Initialise one module (non-recursive): normal(0, std) matrices, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, TinyMoERMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, GroupedExperts):
        nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(module.down_proj, mean=0.0, std=std)
    elif isinstance(module, MoELayer):
        for p in module.router.parameters(recurse=False):
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.zeros_(p)


class TinyMoELM(nn.Module):
    """A small decoder-only MoE causal LM (plain ``nn.Module``; see ``moescope.nn.hf`` for
    the transformers ``PreTrainedModel`` with the same module tree).

    Children: ``model`` (:class:`TinyMoEModel`) and ``lm_head`` (Linear H -> V, tied to
    ``model.embed_tokens`` when ``config.tie_embeddings``).
    """

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.config = config
        self.model = TinyMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for m in self.modules():
            init_tiny_moe_weights(m, config.initializer_range)
        if config.tie_embeddings:
            emb = self.model.embed_tokens
            assert isinstance(emb, nn.Embedding)  # TinyMoEModel builds one
            self.lm_head.weight = emb.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = bool(value)

    def moe_layers(self) -> dict[str, MoELayer]:
        """{module path: MoELayer} of every MoE feed-forward, e.g. ``model.layers.1.mlp``."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoELayer)}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> TinyMoEOutput:
        """Logits and losses.

        Args:
            input_ids: [B, S] int.
            attention_mask: [B, S] (or [B, S_past + S] with a cache); 1 real, 0 padding.
                Padding is excluded from attention keys and from the router losses.
            labels: [B, S] int, shifted inside (position t predicts labels[t + 1]); -100
                is ignored. Set padding labels to -100 yourself.
            position_ids: [B, S] RoPE positions (default: consecutive).
            past_key_values: optional transformers-style KV cache, updated in place.

        Returns:
            :class:`TinyMoEOutput`; ``loss = lm_loss + aux_loss_coef * aux_loss +
            z_loss_coef * z_loss`` when labels are given.
        """
        out = self.model(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(out.hidden_states)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = (
                lm_loss
                + self.config.aux_loss_coef * out.aux_loss
                + self.config.z_loss_coef * out.z_loss
            )
        return TinyMoEOutput(
            loss=loss,
            logits=logits,
            lm_loss=lm_loss,
            aux_loss=out.aux_loss,
            z_loss=out.z_loss,
            router_outputs=out.router_outputs,
            past_key_values=past_key_values,
        )

    def num_parameters(self) -> int:
        """Total parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())


__all__ = [
    "ROUTER_CLASSES",
    "TinyMoEConfig",
    "TinyMoELM",
    "TinyMoEModel",
    "TinyMoEOutput",
    "build_router",
    "causal_lm_loss",
]
