"""Pure routing-metric functions on torch tensors (see DESIGN.md "Metric definitions").

Every function does one job and works on any device: the accumulator calls the per-token
functions on the model's device on every layer call, and the Snapshot calls the
per-window functions on host tensors once per log step. None of them synchronises with
the host (no ``.item()``, no boolean-mask indexing, no ``bincount``: its output length
depends on the data, which forces a device-to-host copy on accelerators).

Notation: T tokens (batch x sequence, flattened), K slots per token, E routed experts.
Expert ids outside ``[0, E)`` (identity / zero experts such as longcat_flash's, or a
negative id some capacity implementations use for "no expert") are mapped to one extra
bin ``E`` by :func:`expert_bins` and counted apart, never used as an index into [E].

References: Switch Transformer (Fedus et al., 2021, eq. 4-6) for the load-balancing loss;
ST-MoE (Zoph et al., 2022, eq. 5) for the router z-loss; DeepSeek-V3 (2024, eq. 17-20)
for the normalised sigmoid affinities used with sigmoid routers.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

ScoreFn = Literal["softmax", "sigmoid", "probs"]

__all__ = [
    "ScoreFn",
    "aux_loss",
    "aux_loss_from_sums",
    "cv",
    "expert_bins",
    "load_entropy_norm",
    "max_over_mean",
    "router_probs",
    "routing_entropy_norm",
    "slot_counts",
    "token_entropy",
    "top1_and_margin",
    "unique_experts",
    "unused_experts",
    "usage_counts",
    "usage_fraction",
    "z_values",
]


# --------------------------------------------------------------------------- per token


def expert_bins(topk_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Map expert ids to bins ``[0, E]``: ids in ``[0, E)`` stay, all others go to bin E.

    Args:
        topk_index: [T, K] integer expert ids chosen per token.
        num_experts: E, the number of routed experts.

    Returns:
        [T, K] int64 bins; bin ``E`` collects identity/zero experts (ids >= E) and
        negative ids, so a later ``scatter_add_`` into an [E + 1] buffer never goes out
        of range.
    """
    idx = topk_index.long()
    in_range = (idx >= 0) & (idx < num_experts)
    return torch.where(in_range, idx, torch.full_like(idx, num_experts))


def slot_counts(bins: torch.Tensor, weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sum ``weight`` per bin: a device-side, fixed-length ``bincount``.

    Args:
        bins: [T, K] int64 bins from :func:`expert_bins` (values in ``[0, E]``).
        weight: [T, K] per-slot weight (bool / int for counts, float for weight sums);
            the output has its dtype (bool is counted as int64).
        num_experts: E.

    Returns:
        [E + 1]: entries ``[:E]`` per routed expert, entry ``[E]`` the extra bin.
    """
    if weight.dtype == torch.bool:
        weight = weight.long()
    out = torch.zeros(num_experts + 1, dtype=weight.dtype, device=bins.device)
    return out.scatter_add_(0, bins.reshape(-1), weight.reshape(-1))


def usage_counts(
    topk_index: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assignments per routed expert over valid, kept slots.

    Args:
        topk_index: [T, K] expert ids.
        num_experts: E.
        token_mask: [T] bool, False for padding (None: all tokens valid).
        dropped: [T, K] bool, True for slots dropped by a capacity limit (None: none).

    Returns:
        [E] int64 counts. Slots with ids outside ``[0, E)`` are not included (see
        :func:`expert_bins`); their number is ``T_valid * K - dropped - counts.sum()``.
    """
    idx = topk_index.flatten(1) if topk_index.dim() > 1 else topk_index[:, None]
    keep = torch.ones_like(idx, dtype=torch.bool)
    if token_mask is not None:
        keep = keep & token_mask.reshape(-1, 1).bool()
    if dropped is not None:
        keep = keep & ~dropped.reshape(idx.shape).bool()
    return slot_counts(expert_bins(idx, num_experts), keep, num_experts)[:num_experts]


def router_probs(logits: torch.Tensor, score_fn: ScoreFn) -> torch.Tensor:
    """Router scores -> a distribution over experts per token.

    - ``softmax``: ``softmax(logits)`` (Switch, Mixtral, Qwen-MoE, ...).
    - ``sigmoid``: ``sigmoid(logits)`` normalised to sum 1 per token, the "normalised
      affinity" of DeepSeek-V3 eq. 20; entropy, top-1 probability and the aux loss of
      sigmoid routers use this distribution.
    - ``probs``: the input already is a distribution and is returned unchanged.

    Args:
        logits: [T, E'] router scores (E' may exceed E when the router also scores
            identity/zero experts).
        score_fn: one of ``softmax``, ``sigmoid``, ``probs``.

    Returns:
        [T, E'] probabilities in float32 or wider (low-precision inputs are upcast).
    """
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if score_fn == "softmax":
        return torch.softmax(x, dim=-1)
    if score_fn == "sigmoid":
        s = torch.sigmoid(x)
        # A row of sigmoids is never all zero for finite logits; clamp guards -inf rows.
        return s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    if score_fn == "probs":
        return x
    raise ValueError(
        f"score_fn must be 'softmax', 'sigmoid' or 'probs', got {score_fn!r}; set "
        "RoutingRecord.score_fn to how the router maps its logits to a distribution."
    )


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (natural log) of each token's router distribution.

    Args:
        probs: [T, E] rows summing to 1 (an all-zero row gives 0).

    Returns:
        [T] ``-sum_e p log p`` with ``0 log 0 = 0``.
    """
    # p * log(max(p, tiny)) is 0 at p = 0 like xlogy, and several times faster on CPU.
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * probs.clamp_min(tiny).log()).sum(dim=-1)


def top1_and_margin(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest router probability and its gap to the second highest, per token.

    Args:
        probs: [T, E] router distribution.

    Returns:
        ([T] top-1 probability, [T] top-1 minus top-2 probability); with E = 1 the
        margin equals the top-1 probability.
    """
    if probs.shape[-1] < 2:
        top1 = probs[..., 0]
        return top1, top1
    top2 = torch.topk(probs, 2, dim=-1).values
    return top2[..., 0], top2[..., 0] - top2[..., 1]


def z_values(logits: torch.Tensor) -> torch.Tensor:
    """Per-token router z-loss term ``logsumexp(logits)^2`` (ST-MoE eq. 5).

    Args:
        logits: [T, E] raw router logits.

    Returns:
        [T] float32 or wider; the z-loss is the mean over valid tokens.
    """
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.logsumexp(x, dim=-1).square()


def unique_experts(counts: torch.Tensor) -> torch.Tensor:
    """Number of distinct experts with a non-zero count. [E] -> [] int64 (on device)."""
    return (counts > 0).sum()


# --------------------------------------------------------------------------- per window


# Window-level functions run on the host, on the summed state (numpy float64), so a
# snapshot dispatches no device op beyond its one transfer; torch tensors are accepted too.


def _host(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def usage_fraction(counts: Any) -> np.ndarray:
    """``counts / counts.sum()``. [E] -> [E] float64 (NaN everywhere when the sum is 0)."""
    c = _host(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / c.sum()


def cv(counts: Any) -> np.float64:
    """Coefficient of variation of usage: population std (ddof = 0) / mean.

    [E] -> float64; 0 for perfectly even usage, NaN when all counts are 0.
    """
    c = _host(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(c.std() / c.mean())


def max_over_mean(counts: Any) -> np.float64:
    """Imbalance ratio max / mean of usage (1 = even, E = one expert takes all).

    [E] -> float64; NaN when all counts are 0.
    """
    c = _host(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(c.max() / c.mean())


def min_over_mean(counts: Any) -> np.float64:
    """Load of the least-used expert relative to the mean, min / mean of usage (1 = even,
    0 = some expert got nothing). With ``max_over_mean`` and ``cv`` (std / mean) it is the
    min / max / std of the per-expert load within a layer.

    [E] -> float64; NaN when all counts are 0.
    """
    c = _host(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(c.min() / c.mean())


def unused_experts(counts: Any) -> np.int64:
    """Experts with zero assignments. [E] -> int64."""
    return np.int64((_host(counts) == 0).sum())


def load_entropy_norm(counts: Any) -> np.float64:
    """Entropy of ``usage_fraction`` divided by ``log E`` (1 = even load, 0 = one expert).

    [E] -> float64; NaN when all counts are 0 or E = 1.
    """
    f = usage_fraction(counts)
    num_experts = f.shape[-1]
    if num_experts < 2 or not np.isfinite(f).all():
        return np.float64(math.nan)
    nz = f[f > 0]
    return np.float64(-(nz * np.log(nz)).sum() / math.log(num_experts))


def routing_entropy_norm(entropy: Any, num_experts: int) -> np.float64:
    """Routing entropy divided by its maximum ``log E``. NaN for E = 1."""
    h = float(_host(entropy))
    if num_experts < 2:
        return np.float64(math.nan)
    return np.float64(h / math.log(num_experts))


def aux_loss_from_sums(
    count_sum: Any,
    prob_sum: Any,
    n_tokens: Any,
    num_experts: int,
) -> np.float64:
    """Switch / transformers load-balancing loss from additive sums.

    ``E * sum_e f_e * P_e`` with ``f_e = count_sum[e] / n_tokens`` (all K top-k slots of
    the counted tokens, so ``sum_e f_e = K``, as transformers' ``load_balancing_loss_func``
    does) and ``P_e = prob_sum[e] / n_tokens`` (mean router probability). For one layer
    this equals ``load_balancing_loss_func((logits,), E, K, attention_mask)``.

    Args:
        count_sum: [E] top-k assignments per expert over the counted tokens.
        prob_sum: [E] summed router probabilities over the same tokens.
        n_tokens: number of counted tokens.
        num_experts: E.

    Returns:
        float64 (NaN when ``n_tokens`` is 0).
    """
    n = float(_host(n_tokens))
    with np.errstate(invalid="ignore", divide="ignore"):
        f = _host(count_sum) / n
        p = _host(prob_sum) / n
    return np.float64(num_experts * (f * p).sum())


def aux_loss(
    logits: torch.Tensor,
    topk_index: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    score_fn: ScoreFn = "softmax",
) -> np.float64:
    """Load-balancing loss of one layer call (convenience wrapper, see aux_loss_from_sums).

    Args:
        logits: [T, E'] router logits (only the first E columns enter ``P``).
        topk_index: [T, K] the experts the model chose.
        num_experts: E.
        token_mask: [T] bool, False for padding.
        score_fn: how logits map to probabilities (see :func:`router_probs`).

    Returns:
        float64 (host).
    """
    t = topk_index.shape[0]
    valid = torch.ones(t, dtype=torch.bool, device=logits.device)
    if token_mask is not None:
        valid = valid & token_mask.reshape(-1).bool()
    probs = torch.where(valid[:, None], router_probs(logits, score_fn), 0.0)
    bins = expert_bins(
        topk_index.flatten(1) if topk_index.dim() > 1 else topk_index[:, None], num_experts
    )
    keep = valid[:, None].expand_as(bins)
    counts = slot_counts(bins, keep, num_experts)[:num_experts]
    prob_sum = probs[:, :num_experts].sum(dim=0, dtype=torch.float64)
    return aux_loss_from_sums(counts, prob_sum, valid.sum(), num_experts)
