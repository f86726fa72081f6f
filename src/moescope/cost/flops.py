"""Theoretical forward FLOPs per token of an MoE model.

Two terms, reported apart (Kaplan et al. 2020, Table 1; Hoffmann et al. 2022, Appendix F):

1. **Matmul term** = 2 x (active matmul parameters). A weight matrix W [out, in] applied to
   one token costs ``out x in`` multiply-adds = ``2 x out x in`` FLOPs. Active matmul
   parameters are every matmul weight outside the routed experts (attention projections,
   router, shared experts, dense FFNs), plus K routed experts' weights per MoE layer, plus
   the output head. Excluded: the input embedding (a table lookup, no arithmetic), biases,
   norms and element-wise operations (activations, residual adds, RoPE, softmax), which are
   lower order. With ``embeddings="none"`` the head's matmul is dropped as well
   ("non-embedding" FLOPs); "both" and "head" give the same figure because the lookup is
   free either way. A tied head still costs its matmul.

2. **Attention-score term**, per layer with softmax attention::

       2 x n_heads x (d_qk + d_v) x n_keys

   from ``Q K^T`` (2 x n_heads x d_qk per key) and ``A V`` (2 x n_heads x d_v per key);
   with d_qk = d_v = head_dim this is Chinchilla's 2 x 2 x seq_len x head_dim x n_heads.
   ``n_keys`` is how many keys the token attends to:

   - ``attention="causal"`` (default): the mean over the S positions of a causal sequence
     of length S, i.e. (S + 1) / 2 for full attention and (1/S) x sum_i min(i, w) for a
     sliding window w. This is the work a causal kernel must do (prefill / training).
   - ``attention="full"``: S keys for every token (min(S, w) with a window), as Kaplan et
     al. and Chinchilla count it. It is also the cost of one decoding step at context
     length S, and what ``torch.utils.flop_counter`` reports for an un-fused attention.

   Multi-head latent attention (DeepSeek-V2/V3) uses d_qk = qk_nope_head_dim +
   qk_rope_head_dim and d_v = v_head_dim, the naive (non-absorbed) computation. Layers
   whose ``layer_types`` entry is not an attention type (linear attention, Mamba, ...) get
   no quadratic term.

Measured counterparts (from the routing a monitor recorded: dropped slots, identity
experts) are computed elsewhere from a snapshot; this module is the theoretical value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from moescope.cost.params import (
    BREAKDOWN_KEYS,
    CostConfigError,
    EmbeddingConvention,
    _Anatomy,
    _check_convention,
    _text_config,
    analyze_model,
    build_meta_model,
)

AttentionMode = Literal["causal", "full"]

_FULL_TYPES = frozenset({"full_attention", "attention", "global_attention", "full"})
_SLIDING_TYPES = frozenset({"sliding_attention", "local_attention", "sliding_window", "local"})
_CHUNKED_TYPES = frozenset({"chunked_attention"})


@dataclass(frozen=True)
class AttentionLayerSpec:
    """Shape of one softmax-attention layer for the score term.

    ``kind``: "full", "sliding" (``window`` keys ending at the query) or "chunked" (keys in
    the query's chunk of ``window`` positions).
    """

    n_heads: int
    qk_head_dim: int
    v_head_dim: int
    kind: str = "full"
    window: int | None = None


@dataclass
class FlopReport:
    """Result of :func:`flops_per_token` (forward pass, FLOPs per token).

    Attributes:
        flops_per_token: ``matmul_flops + attention_flops``.
        matmul_flops: 2 x ``active_matmul_params``.
        attention_flops: the QK^T and AV term at ``seq_len`` (float: a causal mean).
        seq_len: context length S.
        attention: "causal" (mean over positions) or "full" (S keys per token).
        embeddings: embedding convention (decides only whether the head matmul counts).
        active_matmul_params: matmul weights one token multiplies by.
        matmul_breakdown: matmul FLOPs per category (keys of ``ParamReport.breakdown``).
        num_attention_layers: layers with a quadratic attention term.
        attention_layers: per-layer shapes used for the attention term.
    """

    flops_per_token: float
    matmul_flops: int
    attention_flops: float
    seq_len: int
    attention: str
    embeddings: str
    active_matmul_params: int
    matmul_breakdown: dict[str, int]
    num_attention_layers: int
    attention_layers: list[AttentionLayerSpec]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)


def mean_attended_keys(
    seq_len: int, kind: str = "full", window: int | None = None, causal: bool = True
) -> float:
    """Mean number of keys a query attends to in a sequence of length ``seq_len``.

    Causal: position i (1-based) sees i keys (full), min(i, w) (sliding window w, the
    query included, as transformers' sliding masks), or ((i - 1) mod w) + 1 (chunks of w).
    Non-causal ("full" mode): S keys, or min(S, w) for either windowed kind.
    """
    s = int(seq_len)
    if s <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    w = window if (window and kind in ("sliding", "chunked")) else None
    if not causal:
        return float(min(s, w) if w else s)
    if w is None or w >= s:
        return (s + 1) / 2
    if kind == "sliding":
        return (w * (w + 1) / 2 + (s - w) * w) / s
    full_chunks, rest = divmod(s, w)
    return (full_chunks * w * (w + 1) / 2 + rest * (rest + 1) / 2) / s


def _get_int(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_layer_specs(config: Any) -> list[AttentionLayerSpec]:
    """Per-layer attention shapes from a transformers config or a moescope TinyMoEConfig."""
    cfg = _text_config(config)
    if cfg is None:
        raise CostConfigError(
            "the model has no config to read attention shapes from; pass a transformers "
            "config / model or a TinyMoELM"
        )
    n_layers = _get_int(cfg, "num_hidden_layers", "num_layers", "n_layer")
    n_heads = _get_int(cfg, "num_attention_heads", "num_heads", "n_head")
    hidden = _get_int(cfg, "hidden_size", "d_model", "n_embd")
    if n_layers is None or n_heads is None:
        raise CostConfigError(
            f"{type(cfg).__name__} has no num_hidden_layers / num_attention_heads; "
            f"cannot compute the attention term"
        )
    head_dim = _get_int(cfg, "head_dim")
    if head_dim is None:
        if hidden is None:
            raise CostConfigError(f"{type(cfg).__name__}: no head_dim and no hidden_size")
        head_dim = hidden // n_heads
    nope, rope = _get_int(cfg, "qk_nope_head_dim"), _get_int(cfg, "qk_rope_head_dim")
    qk_dim = (nope or 0) + (rope or 0) if (nope or rope) else head_dim
    v_dim = _get_int(cfg, "v_head_dim") or head_dim

    window = _get_int(cfg, "sliding_window")
    layer_types = getattr(cfg, "layer_types", None)
    if not layer_types:
        # Without layer_types (Mixtral), a set sliding_window applies to every layer
        # unless the config switches it off.
        use_sw = getattr(cfg, "use_sliding_window", True)
        kind = "sliding" if (window and use_sw is not False) else "full"
        layer_types = [kind] * n_layers
    chunk = _get_int(cfg, "attention_chunk_size")
    specs: list[AttentionLayerSpec] = []
    for t in layer_types:
        t = str(t)
        if t in _FULL_TYPES or t == "full":
            specs.append(AttentionLayerSpec(n_heads, qk_dim, v_dim, "full", None))
        elif t in _SLIDING_TYPES or t == "sliding":
            specs.append(AttentionLayerSpec(n_heads, qk_dim, v_dim, "sliding", window))
        elif t in _CHUNKED_TYPES:
            specs.append(AttentionLayerSpec(n_heads, qk_dim, v_dim, "chunked", chunk))
        # other layer types (linear attention, mamba, conv) have no quadratic term
    return specs


def flops_from_anatomy(
    anatomy: _Anatomy,
    seq_len: int,
    embeddings: str = "both",
    attention: str = "causal",
) -> FlopReport:
    """Build a :class:`FlopReport` from an analysed model (see :func:`flops_per_token`)."""
    _check_convention(embeddings)
    if attention not in ("causal", "full"):
        raise ValueError(f"attention must be 'causal' or 'full', got {attention!r}")
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    for info in anatomy.params:
        if not info.is_matmul or info.category == "embeddings" or info.tower != "text":
            continue
        if info.category == "head" and embeddings == "none":
            continue
        if info.category == "routed_experts" and info.per_expert:
            continue  # added per layer below: K experts, not E
        breakdown[info.category] += 2 * info.numel
    for layer in anatomy.moe_layers:
        if layer.tower != "text":
            continue
        breakdown["routed_experts"] += 2 * layer.top_k * layer.matmul_params_per_expert
    if anatomy.tied_embeddings and embeddings != "none":
        # The tied matrix is registered as the input embedding; as the head it is a matmul.
        breakdown["head"] += 2 * sum(i.numel for i in anatomy.params if i.category == "embeddings")
    matmul = sum(breakdown.values())

    specs = attention_layer_specs(anatomy.config)
    causal = attention == "causal"
    attn = 0.0
    for spec in specs:
        keys = mean_attended_keys(seq_len, spec.kind, spec.window, causal=causal)
        attn += 2 * spec.n_heads * (spec.qk_head_dim + spec.v_head_dim) * keys
    return FlopReport(
        flops_per_token=matmul + attn,
        matmul_flops=matmul,
        attention_flops=attn,
        seq_len=int(seq_len),
        attention=attention,
        embeddings=embeddings,
        active_matmul_params=matmul // 2,
        matmul_breakdown=breakdown,
        num_attention_layers=len(specs),
        attention_layers=specs,
    )


def flops_per_token(
    config_or_model: Any,
    seq_len: int = 2048,
    embeddings: EmbeddingConvention = "both",
    *,
    attention: AttentionMode = "causal",
    top_k: int | None = None,
) -> FlopReport:
    """Theoretical forward FLOPs per token (see the module docstring for the formula).

    ``flops = 2 x N_active_matmul + sum over attention layers of
    2 x n_heads x (d_qk + d_v) x n_keys(seq_len)``.

    Args:
        config_or_model: as :func:`moescope.count_parameters`.
        seq_len: context length S.
        embeddings: "both" / "head": the head matmul counts; "none": it does not. The input
            embedding never costs FLOPs (a lookup).
        attention: "causal" (mean keys over a causal sequence) or "full" (S keys per token).
        top_k: override K for every MoE block.

    Training FLOPs per token are about 3x the forward figure (Kaplan et al. 2020).
    """
    _check_convention(embeddings)
    model = build_meta_model(config_or_model)
    anatomy = analyze_model(model, top_k=top_k)
    return flops_from_anatomy(anatomy, seq_len, embeddings, attention)
