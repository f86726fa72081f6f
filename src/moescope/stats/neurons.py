"""Neuron-level statistics of MoE experts: activated neurons, sparsity, dead and hot neurons.

For an expert with intermediate size I, the intermediate activation of one (token, slot)
row is ``h = act(gate(x)) * up(x)`` (GLU experts, Shazeer 2020) or ``h = act(W1 x)``
(plain FFN experts). A neuron i is *activated* when ``|h_i|`` exceeds a threshold tau.
This module holds the pure math: which neurons count as activated
(:func:`activated_mask`), the on-device window sums (:class:`NeuronAccumulator`), the
|h| histogram used to calibrate tau to a target sparsity (:class:`NeuronCalibrator`,
the CATS / TEAL method: Lee et al. 2024, "CATS: Contextually-Aware Thresholding for
Sparsity in LLMs", arXiv:2404.08763; Liu et al. 2024, "Training-Free Activation Sparsity
in LLMs", arXiv:2408.14690) and the host-side derived metrics
(:func:`neuron_stats_from_state`). Capture lives in ``moescope.capture.neurons``.

Thresholds (:class:`NeuronThreshold`):

- ``absolute(tau)``: ``|h_i| > tau``. ``tau = 1e-6`` is the seeds' default; it is
  meaningful for ReLU experts (exact zeros) but counts nearly every neuron of a SwiGLU
  expert as active, since ``silu(g) * u`` is almost never exactly 0.
- ``magnitude(alpha)`` (the monitor's default, ``alpha = 0.1``): ``|h_i| > alpha *
  mean_j |h_j|``, the threshold scaled by the mean magnitude of the same (token, slot)
  row. Why: a scale-free rule gives comparable numbers across layers and models whose
  activation scales differ by orders of magnitude (norm gains, weight scales), needs no
  calibration pass and no state, and for SwiGLU it marks the near-zero mass that
  CATS/TEAL show can be skipped: with Gaussian gate/up pre-activations about 16-23 % of
  the neurons fall below 0.1 x the row mean (trained experts are more heavy-tailed, so
  higher), while 1e-6 gives ~0 %.
- ``relative(p)``: per row, the smallest set of neurons holding a fraction ``p`` of the
  row's L1 mass: the ``c`` largest ``|h_i|`` with ``c`` minimal such that their sum
  reaches ``p * sum_i |h_i|``. Vectorised with one sort per row and a cumulative sum
  (O(N I log I) per call: the most expensive mode).
- ``calibrated(taus)``: one absolute tau per layer, read off a log-spaced histogram of
  ``|h|`` over a calibration pass so that a fraction ``target_sparsity`` of the
  calibration activations lies at or below tau (``MoEMonitor.calibration()`` then
  ``MoEMonitor.set_neuron_threshold(calibrated=...)``).

Memory of one layer's window state (E experts, I neurons, B histogram bins):
O(E) int64 sums plus the per-neuron firing counts ``fire`` [E, I] int32, i.e.
``4 E I`` bytes per layer (e.g. 128 experts x 768 neurons x 48 layers = 18.9 MB;
256 x 2048 x 58 layers (DeepSeek-V3) = 122 MB, also moved to the host at each snapshot).
The firing counts give the firing frequency (count / rows of the expert) and the dead
neurons (count == 0) at once, so no separate bitset is kept; ``per_neuron=False`` drops
them (and the dead / hot neuron metrics) for O(E) memory. int32 overflows only after
2^31 rows of one expert in one window. Besides, one set of scratch buffers per device
(shared by all layers, reused across calls) holds one call's [N, I] |h| and mask
(5 bytes per element) and [E, I] float32 per-call counts.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_MAGNITUDE_ALPHA",
    "NEURON_REDUCE_OPS",
    "NeuronAccumulator",
    "NeuronCalibrator",
    "NeuronOptions",
    "NeuronStats",
    "NeuronThreshold",
    "activated_counts",
    "activated_mask",
    "as_threshold",
    "neuron_stats_from_state",
    "tau_for_sparsity",
]

ThresholdMode = Literal["absolute", "magnitude", "relative", "calibrated"]

#: Default of ``NeuronThreshold.magnitude``: neuron active above 0.1 x the row's mean |h|.
DEFAULT_MAGNITUDE_ALPHA = 0.1

#: How each neuron state entry combines across ranks or windows (all sums).
NEURON_REDUCE_OPS: dict[str, str] = {
    "neuron_rows": "sum",
    "neuron_act_sum": "sum",
    "neuron_act_sq": "sum",
    "neuron_hist": "sum",
    "neuron_fire": "sum",
}


@dataclass(frozen=True)
class NeuronThreshold:
    """Which neurons count as activated (see the module docstring for the modes).

    ``value`` is tau (absolute), alpha (magnitude), p (relative) or the target sparsity
    (calibrated); ``taus`` maps layer paths to their calibrated tau. Build one with the
    class methods.
    """

    mode: ThresholdMode
    value: float
    taus: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "magnitude", "relative", "calibrated"):
            raise ValueError(
                f"unknown threshold mode {self.mode!r}; use NeuronThreshold.absolute(), "
                ".magnitude(), .relative() or .calibrated()"
            )
        if not math.isfinite(self.value) or self.value < 0:
            raise ValueError(f"threshold value must be finite and >= 0, got {self.value}")
        if self.mode == "relative" and not 0.0 < self.value <= 1.0:
            raise ValueError(f"relative threshold p must be in (0, 1], got {self.value}")

    @classmethod
    def absolute(cls, tau: float = 1e-6) -> NeuronThreshold:
        """``|h_i| > tau`` (1e-6: the seeds' default; meaningful for ReLU experts)."""
        return cls("absolute", float(tau))

    @classmethod
    def magnitude(cls, alpha: float = DEFAULT_MAGNITUDE_ALPHA) -> NeuronThreshold:
        """``|h_i| > alpha * mean_j |h_j|`` over the same (token, slot) row."""
        return cls("magnitude", float(alpha))

    @classmethod
    def relative(cls, p: float = 0.9) -> NeuronThreshold:
        """Fewest top-|h| neurons holding a fraction ``p`` of the row's L1 mass."""
        return cls("relative", float(p))

    @classmethod
    def calibrated(cls, taus: Mapping[str, float], target_sparsity: float) -> NeuronThreshold:
        """Per-layer absolute taus (from :func:`tau_for_sparsity`) for ``target_sparsity``."""
        if not 0.0 <= target_sparsity <= 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1], got {target_sparsity}")
        return cls("calibrated", float(target_sparsity), dict(taus))

    def for_layer(self, layer: str) -> tuple[ThresholdMode, float]:
        """``(mode, value)`` applied to ``layer`` (calibrated resolves to absolute)."""
        if self.mode != "calibrated":
            return self.mode, self.value
        if layer not in self.taus:
            raise KeyError(
                f"no calibrated tau for layer {layer!r}: it saw no token during the "
                "calibration pass; run a calibration batch that reaches it"
            )
        return "absolute", float(self.taus[layer])

    def describe(self) -> str:
        names = {"absolute": "tau", "magnitude": "alpha", "relative": "p",
                 "calibrated": "target_sparsity"}  # fmt: skip
        return f"{self.mode}({names[self.mode]}={self.value:g})"


@dataclass(frozen=True)
class NeuronOptions:
    """What neuron-level monitoring counts and keeps: ``MoEMonitor(model,
    neurons=NeuronOptions(...))`` (``neurons=True`` = these defaults).

    Attributes:
        threshold: which neurons count as activated: a :class:`NeuronThreshold`, a float
            (= ``NeuronThreshold.absolute(tau)``), or None (= the default
            ``NeuronThreshold.magnitude(0.1)``: ``|h_i| > 0.1 * mean_j |h_j|`` of the row;
            why: the module docstring). Stored as a ``NeuronThreshold``.
        hist_bins: bins B of the per-layer histogram of activated counts over [0, I]
            (capped at I + 1).
        per_neuron: keep per-neuron firing counts [E, I] int32 per layer (dead and hot
            neurons, firing frequency); ``4 E I`` bytes per layer, also moved to the host
            at each snapshot. False keeps O(E) per layer.
        hot_neurons: how many most-frequently-firing neurons per expert a snapshot lists
            (``LayerStats.hot_neurons`` [E, k]); 0 lists none.

    Raises:
        TypeError / ValueError: at construction, for a bad value.
    """

    threshold: NeuronThreshold | float | None = None
    hist_bins: int = 32
    per_neuron: bool = True
    hot_neurons: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", as_threshold(self.threshold))
        for name, low in (("hist_bins", 1), ("hot_neurons", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"NeuronOptions.{name} must be an int >= {low}, got {v!r}")
        if not isinstance(self.per_neuron, bool):
            raise TypeError(
                f"NeuronOptions.per_neuron must be True or False, got {self.per_neuron!r}"
            )


def as_threshold(threshold: NeuronThreshold | float | None) -> NeuronThreshold:
    """``threshold`` as a :class:`NeuronThreshold`: None = ``magnitude(0.1)``, a float =
    ``absolute(tau)``."""
    if threshold is None:
        return NeuronThreshold.magnitude()
    if isinstance(threshold, NeuronThreshold):
        return threshold
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return NeuronThreshold.absolute(float(threshold))
    raise TypeError(
        "a neuron threshold must be a float (absolute tau), a NeuronThreshold "
        f"(NeuronThreshold.absolute/magnitude/relative/calibrated) or None, got {threshold!r}"
    )


def activated_mask(h: torch.Tensor, mode: ThresholdMode, value: float) -> torch.Tensor:
    """[N, I] bool: which neurons of each row are activated.

    Args:
        h: [N, I] intermediate activations (any float dtype; relative mode sorts in
            float32 or wider).
        mode: ``absolute`` / ``magnitude`` / ``relative`` (``calibrated`` is resolved to
            absolute by :meth:`NeuronThreshold.for_layer`).
        value: tau, alpha or p.
    """
    a = h.abs()
    if mode == "absolute" or mode == "calibrated":
        return a > value
    if mode == "magnitude":
        scale = a.mean(
            dim=-1,
            keepdim=True,
            dtype=torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else None,
        )
        return a > scale * value
    if mode == "relative":
        if a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()
        srt, idx = torch.sort(a, dim=-1, descending=True)
        csum = srt.cumsum(dim=-1)
        target = csum[:, -1:] * value
        # Neuron at rank r is needed while the mass of the neurons ranked before it is
        # still short of the target (exclusive prefix sum < p * total).
        need = (csum - srt) < target
        return torch.zeros_like(need).scatter_(1, idx, need)
    raise ValueError(f"unknown threshold mode {mode!r}")


def activated_counts(h: torch.Tensor, mode: ThresholdMode, value: float) -> torch.Tensor:
    """[N] int64 activated neurons per row (see :func:`activated_mask`)."""
    return activated_mask(h, mode, value).sum(dim=-1)


class NeuronAccumulator:
    """Additive neuron statistics of one MoE layer over a window, kept on ``device``.

    State (E experts, I neurons, B = ``hist_bins``; int64 unless noted):

    - ``neuron_rows`` [E]: valid (token, slot) rows seen per expert.
    - ``neuron_act_sum`` [E] / ``neuron_act_sq`` [E]: sum of activated-neuron counts and of
      their squares per expert (exact integers: mean and std follow without rounding).
    - ``neuron_hist`` [B]: rows per activated-count bin; bin ``b`` holds counts ``c`` with
      ``floor(c * B / (I + 1)) == b`` (equal-width bins over [0, I]).
    - ``neuron_fire`` [E, I] int32 (``per_neuron=True``): rows in which each neuron fired.

    ``update`` never synchronises with the host: invalid rows (padding, expert ids
    outside [0, E)) go to an extra dump row of every buffer instead of being filtered.

    Args:
        num_experts: E.
        intermediate_size: I.
        device: where the sums live.
        threshold: ``(mode, value)`` from :meth:`NeuronThreshold.for_layer`.
        hist_bins: B (capped at I + 1).
        per_neuron: keep ``neuron_fire`` (dead / hot neurons, firing frequency).
    """

    def __init__(
        self,
        num_experts: int,
        intermediate_size: int,
        device: torch.device | str = "cpu",
        threshold: tuple[ThresholdMode, float] = ("magnitude", DEFAULT_MAGNITUDE_ALPHA),
        hist_bins: int = 32,
        per_neuron: bool = True,
    ) -> None:
        if num_experts < 1 or intermediate_size < 1 or hist_bins < 1:
            raise ValueError(
                "NeuronAccumulator needs num_experts, intermediate_size and hist_bins >= 1, "
                f"got {num_experts}, {intermediate_size}, {hist_bins}"
            )
        self.num_experts = int(num_experts)
        self.intermediate_size = int(intermediate_size)
        self.device = torch.device(device)
        self.hist_bins = min(int(hist_bins), self.intermediate_size + 1)
        self.per_neuron = bool(per_neuron)
        self.threshold = threshold
        e, i, dev = self.num_experts, self.intermediate_size, self.device
        # One extra (dump) slot per buffer receives the invalid rows.
        self._rows = torch.zeros(e + 1, dtype=torch.long, device=dev)
        self._act_sum = torch.zeros(e + 1, dtype=torch.long, device=dev)
        self._act_sq = torch.zeros(e + 1, dtype=torch.long, device=dev)
        self._hist = torch.zeros(self.hist_bins + 1, dtype=torch.long, device=dev)
        self._fire = (
            torch.zeros(e + 1, i, dtype=torch.int32, device=dev) if self.per_neuron else None
        )

    def reset(self) -> None:
        """Zero every sum (start a new window) without reallocating."""
        for t in (self._rows, self._act_sum, self._act_sq, self._hist, self._fire):
            if t is not None:
                t.zero_()

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of the sums (keys: :data:`NEURON_REDUCE_OPS`), on the device."""
        e, b = self.num_experts, self.hist_bins
        out = {
            "neuron_rows": self._rows[:e].clone(),
            "neuron_act_sum": self._act_sum[:e].clone(),
            "neuron_act_sq": self._act_sq[:e].clone(),
            "neuron_hist": self._hist[:b].clone(),
        }
        if self._fire is not None:
            out["neuron_fire"] = self._fire[:e].clone()
        return out

    @staticmethod
    def reduce_ops() -> dict[str, str]:
        return dict(NEURON_REDUCE_OPS)

    def state_nbytes(self) -> int:
        """Bytes of the window state (constant in the number of updates)."""
        ts = (self._rows, self._act_sum, self._act_sq, self._hist, self._fire)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @torch.no_grad()
    def update(
        self,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        row_valid: torch.Tensor | None = None,
    ) -> None:
        """Add the rows of one expert call. Device work only.

        Args:
            h: [N, I] intermediate activations (detached; not modified).
            expert_ids: [N] int expert of each row (ids outside [0, E) are ignored).
            row_valid: [N] bool, False for rows of padding tokens; None = all valid.
        """
        if h.dim() != 2 or h.shape[-1] != self.intermediate_size:
            raise ValueError(
                f"h must be [N, I={self.intermediate_size}], got {tuple(h.shape)}; the "
                "layer's intermediate size changed or the capture passed the wrong tensor"
            )
        n = h.shape[0]
        if expert_ids.shape != (n,):
            raise ValueError(f"expert_ids must be [N={n}], got {tuple(expert_ids.shape)}")
        if n == 0:
            return
        e, dev, i = self.num_experts, self.device, self.intermediate_size
        h = h.detach().to(dev)
        eid = expert_ids.to(dev).long()
        ok = (eid >= 0) & (eid < e)
        if row_valid is not None:
            ok = ok & row_valid.to(dev).reshape(n).bool()
        eid = torch.where(ok, eid, e)
        mode, value = self.threshold
        # Work in reused scratch buffers: on CPU, allocating fresh [N, I] tensors every
        # call costs more than the arithmetic (page faults), ~10x the whole update.
        a, act = _scratch(dev, n, i)
        if mode == "relative" or h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            act.copy_(activated_mask(h, mode, value))
        else:
            if h.dtype == torch.float32:
                torch.abs(h, out=a)
            else:
                a.copy_(h).abs_()
            if mode == "magnitude":
                # Same ops as activated_mask: mean in float32, then scaled.
                torch.gt(a, a.mean(dim=-1, keepdim=True).mul_(value), out=act)
            else:
                torch.gt(a, value, out=act)
        # 0/1 as float32: float row sums and index_add_ are much faster than integer
        # ones on CPU and exact (counts < 2**24 per call).
        a.copy_(act)
        cnt = a.sum(dim=-1).long()
        self._rows.index_add_(0, eid, torch.ones_like(eid))
        self._act_sum.index_add_(0, eid, cnt)
        self._act_sq.index_add_(0, eid, cnt * cnt)
        b = self.hist_bins
        hbin = torch.div(cnt * b, i + 1, rounding_mode="floor")
        self._hist.index_add_(0, torch.where(ok, hbin, b), torch.ones_like(hbin))
        if self._fire is not None:
            # Per-call firing counts in float32 (exact below 2**24 rows per call) in a
            # shared scratch, added to the int32 window counts.
            tmp = _scratch_fire(dev, e + 1, i)
            tmp.zero_()
            tmp.index_add_(0, eid, a)
            self._fire.add_(tmp.to(torch.int32))


_SCRATCH: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _scratch(device: torch.device, n: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, I] float32, [n, I] bool) views of buffers reused across calls and layers.

    One pair per (device, thread), grown to the largest call seen: the memory of one
    layer's intermediate activations (5 bytes per element), however many layers.
    Layers run one after the other on a device, so sharing is safe.
    """
    key = (device, threading.get_ident())
    need = n * i
    bufs = _SCRATCH.get(key)
    if bufs is None or bufs[0].numel() < need:
        bufs = (
            torch.empty(need, dtype=torch.float32, device=device),
            torch.empty(need, dtype=torch.bool, device=device),
        )
        _SCRATCH[key] = bufs
    return bufs[0][:need].view(n, i), bufs[1][:need].view(n, i)


_SCRATCH_FIRE: dict[tuple[torch.device, int], torch.Tensor] = {}


def _scratch_fire(device: torch.device, rows: int, i: int) -> torch.Tensor:
    """[rows, I] float32 view of a per-(device, thread) buffer reused across layers."""
    key = (device, threading.get_ident())
    need = rows * i
    buf = _SCRATCH_FIRE.get(key)
    if buf is None or buf.numel() < need:
        buf = _SCRATCH_FIRE[key] = torch.empty(need, dtype=torch.float32, device=device)
    return buf[:need].view(rows, i)


class NeuronCalibrator:
    """Log-spaced histogram of ``|h|`` of one layer, on ``device`` (for calibrated tau).

    Bins: 0 holds ``|h| < 10**log10_min`` (zeros included), ``1..bins`` split
    ``[10**log10_min, 10**log10_max)`` evenly in log10, ``bins + 1`` holds the rest.
    The default 1200 bins over 12 decades resolve tau to 2.3 % (one bin = 10**0.01).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        log10_min: float = -8.0,
        log10_max: float = 4.0,
        bins: int = 1200,
    ) -> None:
        if not log10_max > log10_min or bins < 1:
            raise ValueError("NeuronCalibrator needs log10_max > log10_min and bins >= 1")
        self.device = torch.device(device)
        self.log10_min = float(log10_min)
        self.log10_max = float(log10_max)
        self.bins = int(bins)
        self.hist = torch.zeros(self.bins + 2, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, h: torch.Tensor, row_valid: torch.Tensor | None = None) -> None:
        """Add the |h| of the valid rows of ``h`` [N, I] (device only)."""
        n = h.shape[0]
        if n == 0:
            return
        a = h.detach().to(self.device).float().abs()
        width = (self.log10_max - self.log10_min) / self.bins
        pos = torch.floor((torch.log10(a) - self.log10_min) / width) + 1
        idx = pos.clamp_(0, self.bins + 1).nan_to_num_(0).long()  # log10(0) = -inf -> 0
        if row_valid is not None:
            # Invalid rows go to a bin that is dropped: one past the end.
            idx = torch.where(row_valid.to(self.device).reshape(n, 1).bool(), idx, self.bins + 2)
            buf = torch.zeros(self.bins + 3, dtype=torch.long, device=self.device)
            buf.index_add_(0, idx.reshape(-1), torch.ones_like(idx).reshape(-1))
            self.hist.add_(buf[: self.bins + 2])
        else:
            self.hist.index_add_(0, idx.reshape(-1), torch.ones_like(idx).reshape(-1))

    def edges(self) -> np.ndarray:
        """[bins + 1] log-spaced bin edges (values, not log10) of bins 1..bins."""
        return np.logspace(self.log10_min, self.log10_max, self.bins + 1)


def tau_for_sparsity(
    hist: np.ndarray, target_sparsity: float, log10_min: float, log10_max: float
) -> float:
    """tau such that a fraction ``target_sparsity`` of the histogrammed |h| is <= tau.

    ``hist`` is a :class:`NeuronCalibrator` histogram on the host ([bins + 2]). Linear
    interpolation in log10 inside the bin where the cumulative fraction crosses the
    target (exact up to the bin's resolution). NaN for an empty histogram.
    """
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        return math.nan
    bins = hist.shape[0] - 2
    width = (log10_max - log10_min) / bins
    cum = np.cumsum(hist)
    goal = target_sparsity * total
    j = int(np.searchsorted(cum, goal, side="left"))
    if j <= 0:
        return 10.0**log10_min
    if j >= bins + 1:
        return 10.0**log10_max
    before = cum[j - 1]
    frac = (goal - before) / hist[j] if hist[j] > 0 else 1.0
    return float(10.0 ** (log10_min + (j - 1 + frac) * width))


def _f(x: float) -> float:
    return float(x) if math.isfinite(x) else math.nan


def neuron_stats_from_state(
    state: Mapping[str, np.ndarray],
    num_experts: int,
    intermediate_size: int,
    hot_k: int = 8,
) -> dict[str, Any]:
    """Neuron metrics of one layer from its (host, numpy) accumulator state. Pure.

    Returns the ``LayerStats`` neuron fields: ``intermediate_size``, ``neuron_rows``,
    ``activated_neurons_mean`` / ``_std`` (over rows, population std), ``neuron_sparsity``
    (``1 - mean / I``), ``expert_activated_mean`` / ``_std`` / ``expert_sparsity`` [E]
    (NaN for experts without rows), ``activated_hist`` [B], ``firing_counts`` [E, I] or
    None, ``expert_dead_neurons`` [E] (NaN for experts without rows), ``dead_neurons``
    (sum over experts that had rows), ``hot_neurons`` [E, k] (neuron ids by decreasing
    firing count, ties by id; -1 where fewer than k neurons of the expert fired). Scalars are NaN when no row was seen.
    """
    e, i = int(num_experts), int(intermediate_size)
    rows = np.asarray(state["neuron_rows"], dtype=np.int64).reshape(e)
    s1 = np.asarray(state["neuron_act_sum"], dtype=np.int64).reshape(e).astype(np.float64)
    s2 = np.asarray(state["neuron_act_sq"], dtype=np.int64).reshape(e).astype(np.float64)
    n = int(rows.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_e = np.where(rows > 0, s1 / np.maximum(rows, 1), np.nan)
        var_e = np.where(rows > 0, s2 / np.maximum(rows, 1) - mean_e**2, np.nan)
    std_e = np.sqrt(np.maximum(var_e, 0.0), where=~np.isnan(var_e), out=np.full(e, np.nan))
    if n > 0:
        mean = s1.sum() / n
        std = math.sqrt(max(s2.sum() / n - mean * mean, 0.0))
    else:
        mean = std = math.nan
    fire = state.get("neuron_fire")
    firing = expert_dead = hot = None
    dead = math.nan
    if fire is not None:
        firing = np.asarray(fire, dtype=np.int64).reshape(e, i).copy()
        expert_dead = np.where(rows > 0, (firing == 0).sum(axis=1), np.nan).astype(np.float64)
        dead = float(np.nansum(expert_dead)) if n > 0 else math.nan
        k = min(int(hot_k), i)
        # Stable descending order: ties keep the lower neuron id first.
        order = np.argsort(-firing, axis=1, kind="stable")[:, :k]
        fired = np.take_along_axis(firing, order, axis=1) > 0
        hot = np.where(fired, order, -1).astype(np.int64)
    return {
        "intermediate_size": i,
        "neuron_rows": n,
        "expert_rows": rows.copy(),
        "activated_neurons_mean": _f(mean),
        "activated_neurons_std": _f(std),
        "neuron_sparsity": _f(1.0 - mean / i) if n > 0 else math.nan,
        "expert_activated_mean": mean_e,
        "expert_activated_std": std_e,
        "expert_sparsity": 1.0 - mean_e / i,
        "activated_hist": np.asarray(state["neuron_hist"], dtype=np.int64).copy(),
        "firing_counts": firing,
        "expert_dead_neurons": expert_dead,
        "dead_neurons": dead,
        "hot_neurons": hot,
    }


class NeuronStats:
    """The neuron consumer of one monitor window: a :class:`NeuronAccumulator` per layer.

    Fed by the neuron taps through the capture pipeline
    (``update_neurons(layer, h, expert_ids, row_valid)``); like every consumer it has
    ``state()`` / ``reduce_ops()`` / ``reset()``, so the monitor core reduces and copies it
    to the host with everything else.

    Args:
        layers: ``{layer index: (E, I, device)}`` of the layers with a neuron tap.
        options: the neuron settings.
        threshold: ``layer index -> (mode, value)``, the rule in force for that layer.
    """

    def __init__(
        self,
        layers: Mapping[int, tuple[int, int, torch.device]],
        options: NeuronOptions,
        threshold: Callable[[int], tuple[ThresholdMode, float]],
    ) -> None:
        self.layers = dict(layers)
        self.options = options
        self._threshold = threshold
        self.acc: dict[int, NeuronAccumulator] = {}

    def _get(self, layer: int, device: torch.device | None = None) -> NeuronAccumulator:
        acc = self.acc.get(layer)
        if acc is None:
            e, i, dev = self.layers[layer]
            with torch.inference_mode(False):
                acc = self.acc[layer] = NeuronAccumulator(
                    e,
                    i,
                    device=device or dev,
                    threshold=self._threshold(layer),
                    hist_bins=self.options.hist_bins,
                    per_neuron=self.options.per_neuron,
                )
        return acc

    def update(self, batch: Any) -> None:
        """Routing batches carry no activations: nothing to do."""

    def update_neurons(
        self,
        layer: int,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        row_valid: torch.Tensor | None,
    ) -> None:
        """Add one expert call's activations ``h`` [N, I] of ``layer`` (device ops)."""
        with torch.inference_mode(False):
            self._get(layer, h.device).update(h, expert_ids, row_valid)

    def set_threshold(self) -> None:
        """Re-read every layer's threshold and zero the sums (a window must not mix
        thresholds)."""
        for layer, acc in self.acc.items():
            acc.threshold = self._threshold(layer)
            acc.reset()

    def state(self) -> dict[str, torch.Tensor]:
        """``"<layer index>/<key>"`` -> device tensor, for every tapped layer."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            for key, v in self._get(layer).state().items():
                out[f"{layer}/{key}"] = v
        return out

    def reduce_ops(self) -> dict[str, str]:
        return {
            f"{layer}/{key}": NEURON_REDUCE_OPS.get(key, "sum")
            for layer in self.layers
            for key in self._get(layer).state()
        }

    def layer_fields(self, host: Mapping[str, np.ndarray], layer: int) -> dict[str, Any]:
        """The ``LayerStats`` neuron fields of ``layer`` from a host copy of
        :meth:`state`."""
        prefix = f"{layer}/"
        nstate = {k[len(prefix) :]: v for k, v in host.items() if k.startswith(prefix)}
        e, i, _ = self.layers[layer]
        return neuron_stats_from_state(nstate, e, i, hot_k=self.options.hot_neurons)

    def reset(self) -> None:
        for acc in self.acc.values():
            acc.reset()

    def nbytes(self) -> int:
        return sum(a.state_nbytes() for a in self.acc.values())
