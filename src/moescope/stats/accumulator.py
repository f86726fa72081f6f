"""On-device, additive routing sums of many MoE layers, updated in batches.

:class:`RoutingSums` holds the window sums of up to L layers that share E experts and K
slots (one row per layer) and consumes :class:`~moescope.capture.record.RoutingBatch`es:
R layer calls stacked by the capture pipeline, reduced together by a fixed number of
device ops (about 70, whatever R, T, E or the number of layers), which is how the monitor
stays within its budget of aten ops per MoE layer call. :class:`LayerAccumulator` is the
same sums for one layer fed record by record (R = 1), kept for direct use and tests.

No update ever synchronises with the host: no ``.item()``/``.cpu()``/``.tolist()``, no
Python loop over tokens or experts, no boolean-mask indexing (its output shape depends on
the data), no ``bincount`` (it reads the maximum on the host on CUDA). Every scatter goes
into fixed-size buffers, so shapes are static.

Every entry of :meth:`LayerAccumulator.state` is a sum (all-reduce with SUM across
data-parallel ranks, or add two windows with :func:`merge_states`) except ``unique_max``
(reduce with MAX); :data:`REDUCE_OPS` says which.

Precision: counts are int64 (exact whatever the window length); real-valued sums
(probabilities, entropies, z-values, combine weights) are float64 so that a window of
millions of tokens does not lose the low bits of each float32 per-token value (float64 is
unsupported on MPS, where float32 is used). Per-token quantities are computed in float32
(or the input's precision when wider), reduced over the T tokens of one call in that
precision (pairwise summation: relative error ~1e-7), and added to the float64 window sums.

Validity: a token counts when its ``token_mask`` is True and its router row (``logits``
and ``topk_weight``, when present) is finite. Tokens with a NaN/inf router row are
excluded from *every* aggregate (usage included) and counted in ``nonfinite_tokens`` so
that an alert can report them; NaNs never reach the sums because masked values are
selected away with ``torch.where`` or scattered into a discarded bin.

Bins: a slot's expert id maps to bin ``id`` for ids in [0, E), bin E for identity/zero
experts (ids >= E, or negative), bin E + 1 for slots that do not count (padding,
non-finite rows, dropped). Co-activation pairs are scattered into an (E+2) x (E+2) matrix
per layer whose routed block is symmetrised, with the diagonal set to the usage counts,
when the state is read, so the update needs no masking for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from moescope.capture.record import RoutingBatch, RoutingRecord, batch_of_one, check_record
from moescope.stats.metrics import router_probs, token_entropy, top1_and_margin, z_values

__all__ = [
    "REDUCE_OPS",
    "LayerAccumulator",
    "RoutingStats",
    "RoutingSums",
    "host_copy",
    "layer_state",
    "merge_states",
    "states_to_numpy",
    "subtract_states",
]

#: How each per-layer state entry combines across ranks or windows.
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

# Columns of the packed per-layer scalar sums.
_INT_COLS = (
    "nonfinite_tokens",
    "n_tokens",
    "n_dropped",
    "extra_slots",
    "unique_sum",
    "n_updates",
    "n_logit_tokens",
    "n_z_tokens",
    "n_weight_tokens",
)
_FLOAT_COLS = ("entropy_sum", "top1_sum", "margin_sum", "z_sum")

#: How each raw (stacked, [L, ...]) tensor of :class:`RoutingSums` combines across ranks:
#: the per-layer rule of the same key; the packed scalar columns are all sums.
RAW_REDUCE_OPS: dict[str, str] = {
    **{k: REDUCE_OPS[k] for k in ("counts", "dropped_counts", "aux_counts", "prob_sum")},
    **{k: REDUCE_OPS[k] for k in ("weight_sums", "coactivation", "unique_max")},
    "ints": "sum",
    "floats": "sum",
}


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class RoutingSums:
    """Window sums of ``num_layers`` MoE layers sharing E experts and K slots, on ``device``.

    Raw state (L rows; int64 unless noted, float64 sums on every device but MPS):

    - ``counts`` [L, E]: kept assignments (valid token, slot not dropped) per expert.
    - ``dropped_counts`` [L, E]: dropped slots per expert.
    - ``aux_counts`` [L, E]: all top-k slots (dropped included, as the router chose them)
      of valid tokens that had router logits; the ``f`` of the aux loss.
    - ``prob_sum`` [L, E] float: summed router probability per expert (the ``P`` of the
      aux loss; only the first E columns when the router also scores extra experts).
    - ``weight_sums`` [L, E + 2] float: summed combine weights per bin (see the module
      docstring; columns E and E + 1 are discarded).
    - ``coactivation`` [L, E + 2, E + 2] (when enabled): slot pairs i < j per bin pair.
    - ``ints`` [L, 9]: ``nonfinite_tokens, n_tokens, n_dropped, extra_slots, unique_sum,
      n_updates, n_logit_tokens, n_z_tokens, n_weight_tokens``.
    - ``floats`` [L, 4] float: ``entropy_sum, top1_sum, margin_sum, z_sum``.
    - ``unique_max`` [L]: most distinct experts one update touched.

    :func:`layer_state` turns row ``l`` of it (device tensors or host arrays) into the
    per-layer dict of :data:`REDUCE_OPS` that ``layer_stats_from_state`` reads.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        device: torch.device | str = "cpu",
        coactivation: bool = True,
    ) -> None:
        if num_experts < 1 or top_k < 1 or num_layers < 1:
            raise ValueError(
                f"RoutingSums needs num_layers, num_experts and top_k >= 1, got "
                f"num_layers={num_layers}, num_experts={num_experts}, top_k={top_k}."
            )
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.device = torch.device(device)
        self.coactivation = bool(coactivation)
        self.float_dtype = _float_dtype(self.device)
        e, n, dev, fd = self.num_experts, self.num_layers, self.device, self.float_dtype
        # Created outside inference mode even when the first record arrives inside it:
        # inference tensors could not be updated or reset afterwards.
        with torch.inference_mode(False):
            raw: dict[str, torch.Tensor] = {
                "counts": torch.zeros(n, e, dtype=torch.long, device=dev),
                "dropped_counts": torch.zeros(n, e, dtype=torch.long, device=dev),
                "aux_counts": torch.zeros(n, e, dtype=torch.long, device=dev),
                "prob_sum": torch.zeros(n, e, dtype=fd, device=dev),
                "weight_sums": torch.zeros(n, e + 2, dtype=fd, device=dev),
                "ints": torch.zeros(n, len(_INT_COLS), dtype=torch.long, device=dev),
                "floats": torch.zeros(n, len(_FLOAT_COLS), dtype=fd, device=dev),
                "unique_max": torch.zeros(n, dtype=torch.long, device=dev),
            }
            if self.coactivation:
                raw["coactivation"] = torch.zeros(n, e + 2, e + 2, dtype=torch.long, device=dev)
            # Slot pairs i < j for co-activation (static for a given K).
            self._pairs = torch.triu_indices(self.top_k, self.top_k, 1, device=dev)
        self.raw = raw

    def reset(self) -> None:
        """Zero every sum (start a new window); the tensors are reused."""
        with torch.inference_mode(False):
            for v in self.raw.values():
                v.zero_()

    def nbytes(self) -> int:
        """Bytes held by the sums (constant: independent of the number of updates)."""
        return sum(v.numel() * v.element_size() for v in self.raw.values())

    @torch.no_grad()
    def update(self, batch: RoutingBatch, rows: torch.Tensor | None = None) -> None:
        """Add R stacked layer calls. Device work only: never syncs with the host.

        Args:
            batch: ``topk_index`` [R, T, K] with optional ``logits`` [R, T, E'],
                ``topk_weight`` [R, T, K], ``token_mask`` [R, T], ``dropped`` [R, T, K]
                and ``gate`` [1] (0: add nothing).
            rows: [R] int64 row of each call in this object's state (default
                ``batch.rows``).
        """
        with torch.inference_mode(False):
            self._update(batch, batch.rows if rows is None else rows)

    def _update(self, b: RoutingBatch, rows: torch.Tensor) -> None:
        s, e, k, dev, fd = self.raw, self.num_experts, self.top_k, self.device, self.float_dtype
        r, t = b.topk_index.shape[0], b.topk_index.shape[1]
        rows = rows.to(dev)
        idx = b.topk_index.to(dev).long()
        long_kw: dict[str, Any] = {"dtype": torch.long, "device": dev}

        # Valid tokens [R, T]: the mask (and the gate), and finite router rows (row sums:
        # one pass each).
        valid = None if b.token_mask is None else b.token_mask.to(dev).bool()
        if b.gate is not None:
            on = b.gate.to(dev).bool()
            valid = on.expand(r, t) if valid is None else valid & on
        logits = None if b.logits is None else b.logits.to(dev)
        weight = None if b.topk_weight is None else b.topk_weight.to(dev)
        # One finiteness test over both rows: NaN or inf in either makes the sum
        # non-finite (half precision is summed in float32 so large logits do not overflow).
        row_sum = None
        for x in (logits, weight):
            if x is not None:
                acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
                part = x.sum(dim=-1, dtype=acc)
                row_sum = part if row_sum is None else row_sum + part
        finite = None if row_sum is None else torch.isfinite(row_sum)
        zeros_r = torch.zeros(r, **long_kw)
        nonfinite = zeros_r
        if finite is not None:
            nonfinite = (~finite if valid is None else valid & ~finite).sum(-1)
            valid = finite if valid is None else valid & finite
        n_valid = valid.sum(-1) if valid is not None else torch.full((r,), t, **long_kw)

        # Bins [R, T, K]: routed ids stay, others -> E, slots that do not count -> E + 1.
        bins = idx.clamp(-1, e).remainder(e + 1)
        keep = None if valid is None else valid[:, :, None]
        if b.dropped is not None:
            dropped = b.dropped.to(dev).bool()
            if keep is not None:
                dropped = dropped & keep
            keep = ~dropped if keep is None else keep & ~dropped
        kept_bins = bins if keep is None else torch.where(keep, bins, e + 1)

        # Per-call histograms [R, E + 2] (one scatter), then per-layer sums.
        one = torch.ones((), **long_kw)
        per_call = self._histogram(kept_bins, r, e + 2, one)
        routed = per_call[:, :e]
        s["counts"].index_add_(0, rows, routed)
        touched = (routed > 0).sum(-1)
        s["unique_max"].scatter_reduce_(0, rows, touched, "amax")
        n_dropped = zeros_r
        aux = routed
        if b.dropped is not None:
            dropped_bins = torch.where(dropped, bins, e + 1)
            per_drop = self._histogram(dropped_bins, r, e + 2, one)
            s["dropped_counts"].index_add_(0, rows, per_drop[:, :e])
            n_dropped = per_drop[:, : e + 1].sum(-1)
            aux = routed + per_drop[:, :e]
        has_logits = logits is not None
        if has_logits:
            s["aux_counts"].index_add_(0, rows, aux)

        if self.coactivation and k >= 2:
            p0, p1 = self._pairs
            pair_bins = kept_bins.index_select(2, p0) * (e + 2) + kept_bins.index_select(2, p1)
            off = (rows * (e + 2) ** 2)[:, None, None]
            s["coactivation"].view(-1).index_add_(
                0, (pair_bins + off).reshape(-1), one.expand(pair_bins.numel())
            )

        if weight is not None:
            flat = kept_bins + (rows * (e + 2))[:, None, None]
            s["weight_sums"].view(-1).index_add_(0, flat.reshape(-1), weight.reshape(-1).to(fd))

        if has_logits:
            assert logits is not None
            x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
            probs = router_probs(x, b.score_fn)
            if valid is not None:
                probs = torch.where(valid[:, :, None], probs, 0.0)
            s["prob_sum"].index_add_(0, rows, probs[:, :, :e].sum(1).to(fd))
            top1, margin = top1_and_margin(probs)
            cols = [token_entropy(probs), top1, margin]
            with_z = b.score_fn != "probs"
            if with_z:
                z = z_values(x)
                cols.append(z if valid is None else torch.where(valid, z, 0.0))
            else:
                cols.append(torch.zeros_like(top1))
            s["floats"].index_add_(0, rows, torch.stack(cols, -1).sum(1).to(fd))

        calls = torch.ones_like(n_valid) if b.gate is None else b.gate.to(dev).expand(r)
        ints = [nonfinite, n_valid, n_dropped, per_call[:, e], touched, calls]
        ints.append(n_valid if has_logits else zeros_r)
        ints.append(n_valid if has_logits and b.score_fn != "probs" else zeros_r)
        ints.append(n_valid if weight is not None else zeros_r)
        s["ints"].index_add_(0, rows, torch.stack(ints, -1))

    @staticmethod
    def _histogram(bins: torch.Tensor, r: int, width: int, one: torch.Tensor) -> torch.Tensor:
        # [R, T, K] bins in [0, width) -> [R, width] counts with one scatter.
        off = torch.arange(0, r * width, width, device=bins.device)[:, None, None]
        out = torch.zeros(r * width, dtype=torch.long, device=bins.device)
        flat = (bins + off).reshape(-1)
        return out.index_add_(0, flat, one.expand(flat.numel())).view(r, width)

    def layer_state(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row`` as the per-layer state dict (device tensors, copies)."""
        return layer_state(self.raw, row, self.num_experts, self.top_k)


def layer_state(raw: Mapping[str, Any], row: int, num_experts: int, top_k: int) -> dict[str, Any]:
    """Per-layer state (keys of :data:`REDUCE_OPS`) from row ``row`` of a
    :class:`RoutingSums` raw state, given as device tensors or as host numpy arrays.

    Returns copies (tensors stay on their device; arrays stay numpy).
    """
    e = int(num_experts)
    ints, floats = raw["ints"][row], raw["floats"][row]

    def copy(x: Any) -> Any:
        return x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)

    out: dict[str, Any] = {
        "counts": copy(raw["counts"][row]),
        "dropped_counts": copy(raw["dropped_counts"][row]),
        "aux_counts": copy(raw["aux_counts"][row]),
        "prob_sum": copy(raw["prob_sum"][row]),
        "weight_sums": copy(raw["weight_sums"][row][:e]),
        "unique_max": copy(raw["unique_max"][row]),
    }
    for i, name in enumerate(_INT_COLS):
        out[name] = copy(ints[i])
    for i, name in enumerate(_FLOAT_COLS):
        out[name] = copy(floats[i])
    out["n_slots"] = out["n_tokens"] * int(top_k)
    if "coactivation" in raw:
        pairs = raw["coactivation"][row][:e, :e]
        coact = pairs + pairs.T
        diag = list(range(e))
        coact[diag, diag] = out["counts"]
        out["coactivation"] = coact
    return out


class LayerAccumulator:
    """Additive routing sums of ONE MoE layer over a window, fed record by record.

    The same sums and math as :class:`RoutingSums` (L = 1, R = 1 per update); the
    monitor itself batches many layer calls per update instead.

    State keys (:meth:`state`): :data:`REDUCE_OPS` (``coactivation`` only when enabled):
    ``counts``, ``dropped_counts``, ``aux_counts`` [E] int64; ``prob_sum``,
    ``weight_sums`` [E] float; ``coactivation`` [E, E] (diagonal = ``counts``); scalars
    ``n_tokens``, ``n_slots`` (= n_tokens x K), ``n_dropped``, ``extra_slots`` (kept slots
    on ids outside [0, E): identity/zero experts), ``nonfinite_tokens``,
    ``n_logit_tokens`` / ``n_z_tokens`` / ``n_weight_tokens``, ``entropy_sum``, ``z_sum``,
    ``top1_sum``, ``margin_sum`` (float), ``n_updates``, ``unique_sum``, ``unique_max``.

    Args:
        num_experts: E routed experts.
        top_k: K slots per token (records with another K are refused).
        device: where the sums live (the router's device).
        coactivation: keep the [E, E] co-activation matrix (O(E^2) memory).
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
        self.sums = RoutingSums(1, num_experts, top_k, device, coactivation)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.device = self.sums.device
        self.coactivation = bool(coactivation)
        self.float_dtype = self.sums.float_dtype
        self._row = torch.zeros(1, dtype=torch.long, device=self.device)

    def reset(self) -> None:
        """Zero every sum (start a new window). Reuses the tensors: no reallocation."""
        self.sums.reset()

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of the sums, on the device (safe to all-reduce in place)."""
        return self.sums.layer_state(0)

    @staticmethod
    def reduce_ops() -> dict[str, str]:
        """``{key: "sum" | "max"}``: how each state entry combines across ranks."""
        return dict(REDUCE_OPS)

    def state_nbytes(self) -> int:
        """Bytes held by the sums (constant: independent of the number of updates)."""
        return self.sums.nbytes()

    def update(self, record: RoutingRecord) -> None:
        """Add one layer call to the sums. Device work only: never syncs with the host.

        Args:
            record: the layer call; ``topk_index`` [T, K], optional ``logits`` [T, E'],
                ``topk_weight`` [T, K], ``token_mask`` [T], ``dropped`` [T, K].
        """
        check_record(record, self.num_experts, self.top_k)
        self.sums.update(batch_of_one(record, self._row), self._row)


class RoutingStats:
    """The routing consumer of one monitor window: :class:`RoutingSums` per (E, K, device).

    Layer i of the monitor is row i of the sums of the (E, K, device) its records have
    (almost always a single group for the whole model).

    Args:
        num_layers: monitored layers (rows of every group's sums).
        coactivation: keep co-activation matrices.
    """

    def __init__(self, num_layers: int, coactivation: bool = True) -> None:
        self.num_layers = int(num_layers)
        self.coactivation = bool(coactivation)
        self.groups: dict[tuple[int, int, torch.device], RoutingSums] = {}
        self.group_of: dict[int, tuple[int, int, torch.device]] = {}
        self._provisional: set[int] = set()

    def _group(self, key: tuple[int, int, torch.device]) -> RoutingSums:
        sums = self.groups.get(key)
        if sums is None:
            sums = RoutingSums(self.num_layers, key[0], key[1], key[2], self.coactivation)
            self.groups[key] = sums
        return sums

    def update(self, batch: RoutingBatch) -> None:
        """Add a batch (all rows share E, K and the device). Device ops only."""
        key = (batch.num_experts, batch.top_k, batch.topk_index.device)
        for layer in set(batch.layers):
            known = self.group_of.get(layer)
            if known is None or (known != key and layer in self._provisional):
                # A row given before any record (ensure) follows the first real record.
                self.group_of[layer] = known = key
            self._provisional.discard(layer)
            if known != key:
                raise ValueError(
                    f"layer #{layer} emitted a record with E={key[0]}, K={key[1]} on "
                    f"{key[2]} after records with E={known[0]}, K={known[1]} on {known[2]}; "
                    "an adapter must report one expert count and top_k per layer"
                )
        self._group(key).update(batch)

    def ensure(self, layer: int, num_experts: int, top_k: int, device: torch.device) -> None:
        """Give a layer that saw no record yet a row (zeros), so that every rank
        reduces the same tensors."""
        if layer not in self.group_of:
            key = (int(num_experts), int(top_k), torch.device(device))
            self.group_of[layer] = key
            self._provisional.add(layer)
            self._group(key)

    def state(self) -> dict[str, torch.Tensor]:
        """Raw sums of every group, keyed ``"<group #>/<key>"`` (device tensors)."""
        return {
            f"{g}/{name}": v
            for g, sums in enumerate(self.groups.values())
            for name, v in sums.raw.items()
        }

    def reduce_ops(self) -> dict[str, str]:
        return {
            f"{g}/{name}": RAW_REDUCE_OPS[name]
            for g, sums in enumerate(self.groups.values())
            for name in sums.raw
        }

    def layer_states(self, raw: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
        """Per-layer state dicts from a (reduced, possibly host) :meth:`state` result."""
        names = {key: g for g, key in enumerate(self.groups)}
        out: dict[int, dict[str, Any]] = {}
        for layer, key in self.group_of.items():
            g = names[key]
            group = {n.split("/", 1)[1]: v for n, v in raw.items() if n.startswith(f"{g}/")}
            out[layer] = layer_state(group, layer, key[0], key[1])
        return out

    def top_k(self, layer: int) -> int | None:
        key = self.group_of.get(layer)
        return None if key is None else key[1]

    def reset(self) -> None:
        for sums in self.groups.values():
            sums.reset()


def _op(key: str) -> str:
    # Per-layer keys ("counts") and raw keys ("<group>/counts") share their last name.
    name = key.rsplit("/", 1)[-1]
    return REDUCE_OPS.get(name) or RAW_REDUCE_OPS.get(name, "sum")


def merge_states(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> dict[str, Any]:
    """Combine two states (two windows or two ranks) key by key: sums add, ``unique_max``
    takes the maximum. Works on per-layer states (:data:`REDUCE_OPS` keys) and on raw
    :class:`RoutingStats` states (``"<group>/<name>"``), as device tensors or host
    arrays. ``a=None`` copies ``b``."""
    if a is None:
        return {k: _copy(v) for k, v in b.items()}
    out: dict[str, Any] = {}
    for key, vb in b.items():
        va = a[key]
        if _op(key) == "max":
            out[key] = torch.maximum(va, vb) if isinstance(va, torch.Tensor) else np.maximum(va, vb)
        else:
            out[key] = va + vb
    return out


def subtract_states(a: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """``a`` minus an earlier reading ``base`` of the same sums (``base=None``: a copy).

    Sums subtract exactly; a maximum (``unique_max``) cannot be undone and keeps ``a``'s
    value, so it may include calls from before ``base``."""
    if base is None:
        return {k: _copy(v) for k, v in a.items()}
    return {k: _copy(v) if _op(k) == "max" else v - base[k] for k, v in a.items()}


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)


def host_copy(states: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every tensor of ``states`` on the host with ONE device-to-host copy (all become
    bytes of one device buffer), whatever the number of layers, keys and dtypes.
    bfloat16 / float16 come back as float32 (numpy has no bfloat16)."""
    out: dict[str, np.ndarray] = {}
    if not states:
        return out
    device = next(iter(states.values())).device
    chunks: list[torch.Tensor] = []
    layout: list[tuple[str, np.dtype, tuple[int, ...], int, int]] = []
    pos = 0
    for key, v in states.items():
        if v.dtype in (torch.bfloat16, torch.float16):
            v = v.float()
        b = v.detach().to(device).reshape(-1).view(torch.uint8)
        chunks.append(b)
        layout.append((key, _numpy_dtype(v.dtype), tuple(v.shape), pos, b.numel()))
        pos += b.numel()
    host = torch.cat(chunks).cpu().numpy()
    for key, dt, shape, start, n in layout:
        out[key] = np.frombuffer(host[start : start + n].tobytes(), dtype=dt).reshape(shape)
    return out


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def states_to_numpy(
    states: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, dict[str, np.ndarray]]:
    """Many layers' states on the host with one transfer (:func:`host_copy`).

    Args:
        states: ``{layer: LayerAccumulator.state()}``.

    Returns:
        ``{layer: {key: np.ndarray}}`` with the original shapes and dtypes (scalars are
        0-d arrays).
    """
    keys = [(layer, key) for layer, st in states.items() for key in st]
    host = host_copy({f"{i}": states[layer][key] for i, (layer, key) in enumerate(keys)})
    out: dict[str, dict[str, np.ndarray]] = {layer: {} for layer in states}
    for i, (layer, key) in enumerate(keys):
        out[layer][key] = host[f"{i}"]
    return out
