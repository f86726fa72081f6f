"""On-device, additive per-layer accumulator of routing statistics.

One :class:`LayerAccumulator` per MoE layer consumes every :class:`RoutingRecord` of the
window on the model's device and keeps only fixed-size sums (O(E^2) with co-activation,
O(E) without), whatever the number of steps. ``update()`` never synchronises with the
host: no ``.item()``/``.cpu()``/``.tolist()``, no Python loop over tokens or experts, no
boolean-mask indexing (its output shape depends on the data), no ``bincount``. Masks are
applied with ``torch.where`` / multiplication instead, which keeps shapes static (and so
is CUDA-graph friendly).

Every entry of :meth:`LayerAccumulator.state` is a sum (all-reduce with SUM across
data-parallel ranks, or add two windows with :func:`merge_states`) except
``unique_max`` (reduce with MAX); :data:`REDUCE_OPS` says which.

Precision: counts are int64 (exact whatever the window length); real-valued sums
(probabilities, entropies, z-values, combine weights) are float64 so that a window of
millions of tokens does not lose the low bits of each float32 per-token value (float64 is
unsupported on MPS, where float32 is used). Per-token quantities are computed in float32
(or the input's precision when wider), reduced over the T tokens of one call in that
precision (pairwise summation: relative error ~1e-7, and casting [T, E] to float64 first
would cost more than the rest of the update), and added to the float64 window sums.

Validity: a token counts when its ``token_mask`` is True and its router row (``logits``
and ``topk_weight``, when present) is finite. Tokens with a NaN/inf router row are
excluded from *every* aggregate (usage included) and counted in ``nonfinite_tokens`` so
that an alert can report them; NaNs never reach the sums because masked values are
selected away with ``torch.where`` (``NaN * 0`` would still be NaN).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from moescope.capture.record import RoutingRecord
from moescope.stats import metrics as M

__all__ = ["REDUCE_OPS", "LayerAccumulator", "merge_states", "states_to_numpy"]

#: How each state entry combines across ranks or windows.
REDUCE_OPS: dict[str, str] = {
    "counts": "sum",
    "dropped_counts": "sum",
    "aux_counts": "sum",
    "prob_sum": "sum",
    "weight_sums": "sum",
    "coactivation": "sum",
    "n_tokens": "sum",
    "n_slots": "sum",
    "n_dropped": "sum",
    "extra_slots": "sum",
    "nonfinite_tokens": "sum",
    "n_logit_tokens": "sum",
    "n_z_tokens": "sum",
    "n_weight_tokens": "sum",
    "entropy_sum": "sum",
    "z_sum": "sum",
    "top1_sum": "sum",
    "margin_sum": "sum",
    "n_updates": "sum",
    "unique_sum": "sum",
    "unique_max": "max",
}

_VECTOR_KEYS = ("counts", "dropped_counts", "aux_counts")
_FLOAT_VECTOR_KEYS = ("prob_sum", "weight_sums")
_INT_SCALAR_KEYS = (
    "n_tokens",
    "n_slots",
    "n_dropped",
    "extra_slots",
    "nonfinite_tokens",
    "n_logit_tokens",
    "n_z_tokens",
    "n_weight_tokens",
    "n_updates",
    "unique_sum",
    "unique_max",
)
_FLOAT_SCALAR_KEYS = ("entropy_sum", "z_sum", "top1_sum", "margin_sum")


class LayerAccumulator:
    """Additive routing sums of one MoE layer over a window, kept on ``device``.

    State (E experts; all int64 unless noted, float64 sums on every device but MPS):

    - ``counts`` [E]: kept assignments (valid token, slot not dropped) per expert.
    - ``dropped_counts`` [E]: dropped slots per expert.
    - ``aux_counts`` [E]: all top-k slots (dropped included, as the router chose them)
      of tokens that had router logits; the ``f`` of the aux loss.
    - ``prob_sum`` [E] float: summed router probability per expert (the ``P`` of the aux
      loss; only the first E columns when the router also scores extra experts).
    - ``weight_sums`` [E] float: summed combine weights of kept slots.
    - ``coactivation`` [E, E] (when enabled): tokens that chose both e and f; diagonal =
      ``counts``.
    - scalars: ``n_tokens`` (valid tokens), ``n_slots`` (= n_tokens x K), ``n_dropped``,
      ``extra_slots`` (kept slots on ids outside [0, E): identity/zero experts),
      ``nonfinite_tokens``, ``n_logit_tokens`` / ``n_z_tokens`` / ``n_weight_tokens``
      (valid tokens whose record carried logits / z-loss-able logits / weights),
      ``entropy_sum``, ``z_sum``, ``top1_sum``, ``margin_sum`` (float), ``n_updates``,
      ``unique_sum`` and ``unique_max`` (distinct experts touched per update).

    Args:
        num_experts: E routed experts.
        top_k: K slots per token (records with another K are refused).
        device: where the sums live (the router's device).
        coactivation: keep the [E, E] co-activation matrix (O(E^2) memory, O(T K^2 + E^2)
            work per update); disable for very large E if not needed.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        device: torch.device | str = "cpu",
        coactivation: bool = True,
    ) -> None:
        if num_experts < 1 or top_k < 1:
            raise ValueError(
                f"LayerAccumulator needs num_experts >= 1 and top_k >= 1, got "
                f"num_experts={num_experts}, top_k={top_k}."
            )
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.device = torch.device(device)
        self.coactivation = bool(coactivation)
        self.float_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        # Slot pairs i < j for co-activation, built once (static for a given K).
        self._pairs = torch.triu_indices(self.top_k, self.top_k, 1, device=self.device)
        self._state: dict[str, torch.Tensor] = {}
        self.reset()

    # ----------------------------------------------------------------- state handling

    def reset(self) -> None:
        """Zero every sum (start a new window). Reuses the tensors: no reallocation."""
        if self._state:
            for v in self._state.values():
                v.zero_()
            return
        e, dev, fd = self.num_experts, self.device, self.float_dtype
        s: dict[str, torch.Tensor] = {}
        for k in _VECTOR_KEYS:
            s[k] = torch.zeros(e, dtype=torch.long, device=dev)
        for k in _FLOAT_VECTOR_KEYS:
            s[k] = torch.zeros(e, dtype=fd, device=dev)
        if self.coactivation:
            s["coactivation"] = torch.zeros(e, e, dtype=torch.long, device=dev)
        for k in _INT_SCALAR_KEYS:
            s[k] = torch.zeros((), dtype=torch.long, device=dev)
        for k in _FLOAT_SCALAR_KEYS:
            s[k] = torch.zeros((), dtype=fd, device=dev)
        self._state = s

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of the sums, on the device (safe to all-reduce in place).

        Keys and reductions: :data:`REDUCE_OPS` (``coactivation`` only when enabled).
        """
        return {k: v.clone() for k, v in self._state.items()}

    @staticmethod
    def reduce_ops() -> dict[str, str]:
        """``{key: "sum" | "max"}``: how each state entry combines across ranks."""
        return dict(REDUCE_OPS)

    def state_nbytes(self) -> int:
        """Bytes held by the sums (constant: independent of the number of updates)."""
        return sum(v.numel() * v.element_size() for v in self._state.values())

    # ----------------------------------------------------------------------- update

    def _check(self, record: RoutingRecord) -> None:
        # Shape checks read Python ints only: no device sync.
        if record.num_experts != self.num_experts:
            raise ValueError(
                f"{record.layer}: record has num_experts={record.num_experts} but the "
                f"accumulator was built for {self.num_experts}; build one "
                "LayerAccumulator per layer with that layer's expert count."
            )
        if record.topk_index.dim() not in (1, 2):
            raise ValueError(
                f"{record.layer}: topk_index must be [T, K] (or [T] for top-1), got shape "
                f"{tuple(record.topk_index.shape)}; flatten batch and sequence first."
            )
        k = 1 if record.topk_index.dim() == 1 else record.topk_index.shape[1]
        if k != self.top_k:
            raise ValueError(
                f"{record.layer}: record has K={k} slots but the accumulator was built "
                f"with top_k={self.top_k}; pass the layer's real top_k."
            )
        t = record.topk_index.shape[0]
        lg = record.logits
        if lg is not None and (
            lg.dim() == 0 or lg.shape[-1] < self.num_experts or lg.numel() != t * lg.shape[-1]
        ):
            raise ValueError(
                f"{record.layer}: logits shape {tuple(record.logits.shape)} does not match "
                f"T={t} tokens x at least E={self.num_experts} experts."
            )
        for name in ("topk_weight", "dropped"):
            v = getattr(record, name)
            if v is not None and v.numel() != t * k:
                raise ValueError(
                    f"{record.layer}: {name} has shape {tuple(v.shape)}, expected [T={t}, K={k}]."
                )
        if record.token_mask is not None and record.token_mask.numel() != t:
            raise ValueError(
                f"{record.layer}: token_mask has {record.token_mask.numel()} entries, "
                f"expected T={t} (one per flattened token)."
            )

    @torch.no_grad()
    def update(self, record: RoutingRecord) -> None:
        """Add one layer call to the sums. Device work only: never syncs with the host.

        Args:
            record: the layer call; ``topk_index`` [T, K], optional ``logits`` [T, E'],
                ``topk_weight`` [T, K], ``token_mask`` [T], ``dropped`` [T, K].
        """
        self._check(record)
        s, e, dev, fd = self._state, self.num_experts, self.device, self.float_dtype
        t, k = record.topk_index.shape[0], self.top_k
        idx = record.topk_index.to(dev).reshape(t, k).long()

        valid = torch.ones(t, dtype=torch.bool, device=dev)
        if record.token_mask is not None:
            valid = valid & record.token_mask.to(dev).reshape(t).bool()
        finite = torch.ones(t, dtype=torch.bool, device=dev)
        logits = None
        if record.logits is not None:
            logits = record.logits.to(dev).reshape(t, record.logits.shape[-1])
            finite = finite & M.finite_rows(logits)
        weight = None
        if record.topk_weight is not None:
            weight = record.topk_weight.to(dev).reshape(t, k)
            finite = finite & M.finite_rows(weight)
        s["nonfinite_tokens"].add_((valid & ~finite).sum())
        valid = valid & finite
        n_valid = valid.sum()

        bins = M.expert_bins(idx, e)
        slot_valid = valid[:, None].expand(t, k)
        if record.dropped is not None:
            dropped = record.dropped.to(dev).reshape(t, k).bool() & slot_valid
            keep = slot_valid & ~dropped
            s["n_dropped"].add_(dropped.sum())
            s["dropped_counts"].add_(M.slot_counts(bins, dropped, e)[:e])
        else:
            keep = slot_valid
        kept = M.slot_counts(bins, keep, e)
        counts = kept[:e]
        s["counts"].add_(counts)
        s["extra_slots"].add_(kept[e])
        s["n_tokens"].add_(n_valid)
        s["n_slots"].add_(n_valid * k)

        touched = M.unique_experts(counts)
        s["unique_sum"].add_(touched)
        torch.maximum(s["unique_max"], touched, out=s["unique_max"])
        s["n_updates"].add_(1)

        if self.coactivation:
            s["coactivation"].add_(M.coactivation_counts(bins, keep, e, self._pairs))

        if weight is not None:
            w = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=dev))
            s["weight_sums"].add_(M.slot_counts(bins, w.to(fd), e)[:e])
            s["n_weight_tokens"].add_(n_valid)

        if logits is not None:
            probs = M.router_probs(logits, record.score_fn)
            probs = torch.where(valid[:, None], probs, torch.zeros((), dtype=probs.dtype, device=dev))
            s["prob_sum"].add_(probs[:, :e].sum(dim=0).to(fd))
            s["entropy_sum"].add_(M.token_entropy(probs).sum().to(fd))
            top1, margin = M.top1_and_margin(probs)
            s["top1_sum"].add_(top1.sum().to(fd))
            s["margin_sum"].add_(margin.sum().to(fd))
            s["aux_counts"].add_(M.slot_counts(bins, slot_valid, e)[:e])
            s["n_logit_tokens"].add_(n_valid)
            if record.score_fn != "probs":
                z = torch.where(valid, M.z_values(logits), torch.zeros((), device=dev))
                s["z_sum"].add_(z.sum().to(fd))
                s["n_z_tokens"].add_(n_valid)


def merge_states(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Combine two states (two windows or two ranks) with :data:`REDUCE_OPS`."""
    out: dict[str, torch.Tensor] = {}
    for key, va in a.items():
        op = REDUCE_OPS.get(key, "sum")
        out[key] = torch.maximum(va, b[key]) if op == "max" else va + b[key]
    return out


def states_to_numpy(
    states: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, dict[str, np.ndarray]]:
    """Move many layers' states to host numpy with one transfer per (device, dtype).

    All tensors of one dtype and device are flattened and concatenated on the device,
    copied once, and split again on the host, so a snapshot of L layers costs a couple
    of device-to-host copies instead of ~20 L.

    Args:
        states: ``{layer: LayerAccumulator.state()}``.

    Returns:
        ``{layer: {key: np.ndarray}}`` with the original shapes and dtypes (scalars are
        0-d arrays).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, str, torch.Tensor]]] = {}
    for layer, st in states.items():
        for key, v in st.items():
            groups.setdefault((v.device, v.dtype), []).append((layer, key, v))
    out: dict[str, dict[str, np.ndarray]] = {layer: {} for layer in states}
    for items in groups.values():
        flat = torch.cat([v.detach().reshape(-1) for _, _, v in items]).cpu().numpy()
        pos = 0
        for layer, key, v in items:
            n = v.numel()
            out[layer][key] = flat[pos : pos + n].reshape(tuple(v.shape)).copy()
            pos += n
    return out
