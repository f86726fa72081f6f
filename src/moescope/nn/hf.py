"""TinyMoELM as a transformers model: ``TinyMoEHFConfig`` + ``TinyMoEForCausalLM``.

Importing this module registers ``model_type="moescope_tiny_moe"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (``register()`` does it again idempotently). Needs the ``hf``
extra (transformers >= 5.23).

The transformers model holds the very same module tree as :class:`~moescope.nn.model.TinyMoELM`
(``model`` = :class:`~moescope.nn.model.TinyMoEModel`, ``lm_head``), so module paths
(``model.layers.{i}.mlp``) and state-dict keys are identical between the two; weights move
with ``load_state_dict`` (see :meth:`TinyMoEForCausalLM.from_tiny` / :meth:`to_tiny`).

Generation: a KV cache is supported (transformers' ``DynamicCache``; the attention calls
``cache.update(k, v, layer_idx)``), and ``generate(use_cache=False)`` works as well.
``aux_loss`` in the output is the *mean over MoE layers* of each layer's
load-balancing loss (Switch, Fedus et al. 2021), computed over real tokens only; it is
always returned, and always added to ``loss`` (with ``z_loss``) when labels are given, so
the objective equals TinyMoELM's. ``router_logits`` (one [B*S, E] tensor per MoE layer)
are returned when ``output_router_logits=True``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from moescope._optional import require

require("transformers", "hf")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.modeling_outputs import MoeCausalLMOutputWithPast  # noqa: E402

from moescope.nn.experts import GroupedExperts  # noqa: E402
from moescope.nn.layer import MoELayer  # noqa: E402
from moescope.nn.model import (  # noqa: E402
    TinyMoEConfig,
    TinyMoELM,
    TinyMoEModel,
)

MODEL_TYPE = "moescope_tiny_moe"

_CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in fields(MoeCausalLMOutputWithPast)} else "past_key_values"
)

# TinyMoEConfig field -> TinyMoEHFConfig field where the names differ.
# ``top_k`` is renamed because transformers reads a model config's ``top_k`` as the
# sampling top-k of ``generate``.
_RENAMED = {"tie_embeddings": "tie_word_embeddings", "top_k": "num_experts_per_tok"}


class TinyMoEHFConfig(PreTrainedConfig):
    """transformers configuration of :class:`TinyMoEForCausalLM` (model_type
    ``"moescope_tiny_moe"``). Fields are those of :class:`~moescope.nn.model.TinyMoEConfig`
    (``tie_embeddings`` is spelled ``tie_word_embeddings`` and ``top_k``
    ``num_experts_per_tok``), plus ``use_cache`` and ``output_router_logits``. Standard
    aliases (``num_hidden_layers``, ``num_attention_heads``, ``num_local_experts``,
    ``max_position_embeddings``, ``router_aux_loss_coef``) map onto them.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 - transformers' convention
    attribute_map = {  # noqa: RUF012
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_local_experts": "num_experts",
        "max_position_embeddings": "max_seq_len",
        "router_aux_loss_coef": "aux_loss_coef",
    }

    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    dense_intermediate_size: int | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_every: int = 1
    num_shared_experts: int = 0
    router: str = "topk"
    router_kwargs: dict[str, Any] | None = None
    norm_topk_prob: bool = True
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    use_cache: bool = True
    output_router_logits: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.to_tiny_config()  # validate early, with TinyMoEConfig's messages

    def to_tiny_config(self) -> TinyMoEConfig:
        """The equivalent :class:`TinyMoEConfig`."""
        values: dict[str, Any] = {}
        for f in fields(TinyMoEConfig):
            values[f.name] = getattr(self, _RENAMED.get(f.name, f.name))
        values["router_kwargs"] = dict(values["router_kwargs"] or {})
        return TinyMoEConfig(**values)

    @classmethod
    def from_tiny_config(cls, config: TinyMoEConfig, **kwargs: Any) -> TinyMoEHFConfig:
        """Build from a :class:`TinyMoEConfig` (extra ``kwargs`` go to the HF config)."""
        values = {_RENAMED.get(k, k): v for k, v in config.to_dict().items()}
        values["router_kwargs"] = dict(values["router_kwargs"]) or None
        values.update(kwargs)
        return cls(**values)


class TinyMoEPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing (init, checkpointing flags) for TinyMoE models."""

    config_class = TinyMoEHFConfig
    config: TinyMoEHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TinyMoEDecoderLayer"]  # noqa: RUF012
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Linear / Embedding / *RMSNorm are covered by the base class; the fused experts and
        # the router weights are plain Parameters it does not know about.
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, GroupedExperts):
            hf_init.normal_(module.gate_up_proj, mean=0.0, std=std)
            hf_init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoELayer):
            for p in module.router.parameters(recurse=False):
                if p.dim() >= 2:
                    hf_init.normal_(p, mean=0.0, std=std)
                else:
                    hf_init.zeros_(p)


class TinyMoEForCausalLM(TinyMoEPreTrainedModel, GenerationMixin):
    """TinyMoELM as a transformers causal LM (Trainer, save/from_pretrained, generate).

    ``forward(input_ids [B, S], attention_mask [B, S_past + S] | None, position_ids,
    past_key_values | cache, labels [B, S] | None, use_cache, output_router_logits,
    logits_to_keep, num_items_in_batch, return_dict) -> MoeCausalLMOutputWithPast`` with
    ``logits`` [B, S', V]. The KV cache is accepted under both names transformers has used
    (``cache`` from 5.24, ``past_key_values`` before) and returned under the name the
    installed version declares. ``num_items_in_batch`` is the Trainer's
    gradient-accumulation normaliser. Any other keyword is a ``TypeError`` naming it.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: TinyMoEHFConfig):
        super().__init__(config)
        self.loss_type = "ForCausalLM"
        self.model = TinyMoEModel(config.to_tiny_config())
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def from_tiny(cls, lm: TinyMoELM) -> TinyMoEForCausalLM:
        """A transformers model with the weights of a plain :class:`TinyMoELM`."""
        model = cls(TinyMoEHFConfig.from_tiny_config(lm.config))
        model.load_state_dict(lm.state_dict())
        # transformers wraps PreTrainedModel.to with functools.wraps, which typeshed types
        # as an unbound function (it expects the model as its first argument).
        return model.to(next(lm.parameters()).device)  # type: ignore[arg-type]

    def to_tiny(self) -> TinyMoELM:
        """A plain :class:`TinyMoELM` with these weights."""
        lm = TinyMoELM(self.config.to_tiny_config())
        lm.load_state_dict(self.state_dict())
        return lm.to(self.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        *,
        cache: Any = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> MoeCausalLMOutputWithPast | tuple[Any, ...]:
        # Every keyword is named: transformers renamed the cache argument once
        # (``past_key_values`` -> ``cache`` in 5.24) and a ``**kwargs`` that swallowed the
        # new name silently generated from an empty cache. An unknown keyword is now a
        # TypeError that names it. ``cache_position`` (older generate loops) is derivable
        # from the cache length and ignored.
        del cache_position
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        past_key_values = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            raise ValueError(
                "TinyMoEForCausalLM takes input_ids only (byte ids); inputs_embeds is not supported"
            )
        if input_ids is None:
            raise ValueError("input_ids is required")
        if output_attentions or output_hidden_states:
            raise ValueError(
                "TinyMoEForCausalLM returns neither attentions nor hidden states; "
                "attach a forward hook to model.layers[i] to read them"
            )
        output_router_logits = (
            output_router_logits
            if output_router_logits is not None
            else self.config.output_router_logits
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.training:
            # The cache only serves generation; under checkpointing it would be filled twice.
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None

        out = self.model(input_ids, attention_mask, position_ids, past_key_values)
        hidden = out.hidden_states
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )
            loss = (
                lm_loss
                + self.config.aux_loss_coef * out.aux_loss.to(lm_loss.device)
                + self.config.z_loss_coef * out.z_loss.to(lm_loss.device)
            )
        router_logits = (
            tuple(ro.logits for ro in out.router_outputs) if output_router_logits else None
        )
        output = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=out.aux_loss, logits=logits, router_logits=router_logits
        )
        # The output field is ``cache`` from transformers 5.24 on and ``past_key_values``
        # before; generate() reads whichever its own version declares.
        if past_key_values is not None:
            output[_CACHE_FIELD] = past_key_values
        if return_dict is False:
            return output.to_tuple()
        return output


def register() -> None:
    """Register ``moescope_tiny_moe`` with AutoConfig and AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(MODEL_TYPE, TinyMoEHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyMoEHFConfig, TinyMoEForCausalLM, exist_ok=True)


register()

__all__ = [
    "MODEL_TYPE",
    "TinyMoEForCausalLM",
    "TinyMoEHFConfig",
    "TinyMoEPreTrainedModel",
    "register",
]
