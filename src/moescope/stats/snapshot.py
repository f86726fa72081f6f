"""Host-side statistics of one window: per-layer :class:`LayerStats` and a :class:`Snapshot`.

:func:`layer_stats_from_state` turns the additive sums of a
:class:`~moescope.stats.accumulator.LayerAccumulator` (already on the host as numpy) into
the metrics of DESIGN.md, reusing the pure functions of :mod:`moescope.stats.metrics`.

Conventions (decided here, relied on by sinks and alerts):

- A layer with zero valid tokens in the window has every derived metric NaN (the unused /
  active expert counts included, since "no token" is not "no expert used"); its
  ``usage_counts`` are zeros. Such layers are left out of the model-level averages and
  totals and are never alerted on (except for non-finite router scores).
- Metrics that need router logits (entropy, aux loss, top-1, z-loss) are NaN when no
  record of the window carried logits; ``z_loss`` is also NaN for ``score_fn="probs"``
  routers, ``weight_sums`` NaN when no record carried combine weights.
- Tokens whose router row was NaN/inf are excluded from every aggregate and reported in
  ``nonfinite_tokens``.
- Model-level averages are plain means over layers (each layer weighs the same) of the
  finite per-layer values; NaN when there is none.
- ``to_dict`` emits scalars only by default; per-expert vectors (``usage_fraction``)
  can be added with ``vectors=True`` (E keys per layer: fine for 8 experts, noisy for
  256, hence off by default). Every value is a Python float (NaN stays NaN).
- ``to_json`` writes strict JSON (non-finite floats as ``null``); ``from_json`` inverts it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope._json import json_safe
from moescope.stats import metrics as M

__all__ = [
    "LAYER_SCALAR_METRICS",
    "NEURON_SCALAR_METRICS",
    "LayerStats",
    "Snapshot",
    "layer_stats_from_state",
]

#: Per-layer scalar metrics written by ``Snapshot.to_dict`` as ``<prefix>/<layer>/<name>``.
LAYER_SCALAR_METRICS: tuple[str, ...] = (
    "cv",
    "max_over_mean",
    "unused_experts",
    "active_experts",
    "utilization_rate",
    "routing_entropy",
    "routing_entropy_norm",
    "load_entropy_norm",
    "aux_loss",
    "z_loss",
    "top1_prob",
    "top1_margin",
    "dropped_fraction",
    "unique_experts_per_batch",
    "unique_experts_max",
    "num_tokens",
    "nonfinite_tokens",
    "extra_slots",
)

_ARRAY_FIELDS = {
    "usage_counts": np.int64,
    "usage_fraction": np.float64,
    "weight_sums": np.float64,
    "dropped_counts": np.int64,
    "coactivation": np.int64,
    "expert_rows": np.int64,
    "expert_activated_mean": np.float64,
    "expert_activated_std": np.float64,
    "expert_sparsity": np.float64,
    "expert_dead_neurons": np.float64,
    "activated_hist": np.int64,
    "firing_counts": np.int64,
    "hot_neurons": np.int64,
}

#: Per-layer neuron scalars written by ``Snapshot.to_dict`` (only for layers with neuron
#: statistics, i.e. ``MoEMonitor(neurons=True)``).
NEURON_SCALAR_METRICS: tuple[str, ...] = (
    "neuron_sparsity",
    "activated_neurons_mean",
    "activated_neurons_std",
    "dead_neurons",
)

_INT_FIELDS = (
    "num_experts", "top_k", "num_tokens", "nonfinite_tokens", "extra_slots", "num_slots",
    "num_updates", "intermediate_size", "neuron_rows",
)  # fmt: skip


@dataclass
class LayerStats:
    """Routing metrics of one MoE layer over a window (definitions: DESIGN.md).

    Shapes: E = ``num_experts``. Vectors are numpy arrays: ``usage_counts`` [E] int64,
    ``usage_fraction`` [E] float64, ``weight_sums`` [E] float64, ``dropped_counts`` [E]
    int64, ``coactivation`` [E, E] int64 or None (diagonal = usage_counts).
    Scalars are floats (NaN when undefined, see the module docstring) except the
    integer bookkeeping fields.

    Neuron fields (None unless the monitor ran with ``neurons=True``; definitions in
    :mod:`moescope.stats.neurons`, I = ``intermediate_size``): ``neuron_rows`` (valid
    (token, slot) rows seen; ``expert_rows`` [E] per expert),
    ``activated_neurons_mean`` / ``activated_neurons_std`` (activated neurons per row), ``neuron_sparsity`` (1 - mean / I),
    ``expert_activated_mean`` / ``expert_activated_std`` / ``expert_sparsity`` [E]
    (NaN for experts without rows), ``activated_hist`` [B] (rows per activated-count bin,
    bin b = counts c with floor(c B / (I + 1)) = b), ``firing_counts`` [E, I] (rows in
    which each neuron fired; None with ``per_neuron=False``), ``expert_dead_neurons`` [E]
    (neurons never activated; NaN for experts without rows), ``dead_neurons`` (their sum),
    ``hot_neurons`` [E, k] (most frequently firing neuron ids, -1 where fewer than k
    fired), ``neuron_threshold`` (the rule used, e.g. ``"magnitude(alpha=0.1)"``).
    """

    num_experts: int
    top_k: int
    num_tokens: int
    nonfinite_tokens: int
    usage_counts: np.ndarray
    usage_fraction: np.ndarray
    cv: float
    max_over_mean: float
    unused_experts: float
    active_experts: float
    utilization_rate: float
    routing_entropy: float
    routing_entropy_norm: float
    load_entropy_norm: float
    aux_loss: float
    z_loss: float
    top1_prob: float
    top1_margin: float
    weight_sums: np.ndarray
    dropped_fraction: float
    unique_experts_per_batch: float
    unique_experts_max: float
    coactivation: np.ndarray | None = None
    dropped_counts: np.ndarray | None = None
    extra_slots: int = 0
    num_slots: int = 0
    num_updates: int = 0
    intermediate_size: int | None = None
    neuron_rows: int | None = None
    activated_neurons_mean: float | None = None
    activated_neurons_std: float | None = None
    neuron_sparsity: float | None = None
    dead_neurons: float | None = None
    expert_rows: np.ndarray | None = None
    expert_activated_mean: np.ndarray | None = None
    expert_activated_std: np.ndarray | None = None
    expert_sparsity: np.ndarray | None = None
    expert_dead_neurons: np.ndarray | None = None
    activated_hist: np.ndarray | None = None
    firing_counts: np.ndarray | None = None
    hot_neurons: np.ndarray | None = None
    neuron_threshold: str | None = None

    @property
    def has_neurons(self) -> bool:
        """True when the window carries neuron statistics."""
        return self.neuron_rows is not None

    @property
    def firing_frequency(self) -> np.ndarray | None:
        """[E, I] fraction of each expert's rows in which the neuron fired (NaN rows for
        experts without rows); None without per-neuron counts."""
        if self.firing_counts is None or self.expert_rows is None:
            return None
        rows = np.asarray(self.expert_rows, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            freq = np.asarray(self.firing_counts, dtype=np.float64) / rows[:, None]
        return np.where(rows[:, None] > 0, freq, np.nan)

    @property
    def dead_mask(self) -> np.ndarray | None:
        """[E, I] bool: neurons that never fired in the window (experts without rows:
        all False); None without per-neuron counts."""
        if self.firing_counts is None or self.expert_dead_neurons is None:
            return None
        seen = ~np.isnan(np.asarray(self.expert_dead_neurons))
        return (np.asarray(self.firing_counts) == 0) & seen[:, None]

    def to_json_dict(self, firing: bool = False) -> dict[str, Any]:
        """JSON-able dict: arrays as (nested) lists, non-finite floats as None.

        ``firing_counts`` ([E, I], large) is written only with ``firing=True``.
        """
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k == "firing_counts" and not firing:
                continue
            out[k] = json_safe(v)
        return out

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> LayerStats:
        """Inverse of :meth:`to_json_dict`."""
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in _ARRAY_FIELDS:
                if v is None:
                    kw[k] = None
                else:
                    dt = _ARRAY_FIELDS[k]
                    arr = np.array(_none_to_nan(v), dtype=np.float64)
                    kw[k] = arr.astype(dt) if dt is np.int64 else arr
            elif k in _INT_FIELDS:
                kw[k] = None if v is None else int(v)
            elif k == "neuron_threshold":
                kw[k] = v
            elif v is None and k in _OPTIONAL_SCALARS:
                kw[k] = None
            else:
                kw[k] = math.nan if v is None else float(v)
        if kw.get("neuron_rows") is not None:
            for k in _OPTIONAL_SCALARS:
                if kw.get(k) is None:
                    kw[k] = math.nan
        return cls(**kw)


# Optional scalars (None = neurons off) that a JSON null must not turn into NaN: an
# absent value is told apart by ``neuron_rows`` being None.
_OPTIONAL_SCALARS = frozenset(
    {"activated_neurons_mean", "activated_neurons_std", "neuron_sparsity", "dead_neurons"}
)


def _none_to_nan(v: Any) -> Any:
    if v is None:
        return math.nan
    if isinstance(v, list):
        return [_none_to_nan(x) for x in v]
    return v


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def layer_stats_from_state(
    state: Mapping[str, np.ndarray], num_experts: int, top_k: int
) -> LayerStats:
    """Metrics of one layer from its accumulator state (host, pure).

    Args:
        state: ``LayerAccumulator.state()`` as numpy (see ``states_to_numpy``), possibly
            summed over ranks; ``coactivation`` may be absent.
        num_experts: E.
        top_k: K.

    Returns:
        The layer's :class:`LayerStats`.
    """
    e = int(num_experts)
    counts = np.asarray(state["counts"], dtype=np.int64).reshape(e).copy()
    n_tok = int(state["n_tokens"])
    n_logit = int(state["n_logit_tokens"])
    n_z = int(state["n_z_tokens"])
    n_slots = int(state["n_slots"])
    n_upd = int(state["n_updates"])
    have_tokens = n_tok > 0

    def scalar(x: Any) -> float:
        return float(x) if have_tokens else math.nan

    unused = scalar(M.unused_experts(counts))
    entropy = _div(float(state["entropy_sum"]), n_logit)
    aux = math.nan
    if n_logit > 0:
        aux = float(
            M.aux_loss_from_sums(
                np.asarray(state["aux_counts"]).reshape(e),
                np.asarray(state["prob_sum"], dtype=np.float64).reshape(e),
                n_logit,
                e,
            )
        )
    weight_sums = np.asarray(state["weight_sums"], dtype=np.float64).reshape(e).copy()
    if int(state["n_weight_tokens"]) == 0:
        weight_sums[:] = math.nan
    coact = state.get("coactivation")
    dropped_counts = state.get("dropped_counts")
    return LayerStats(
        num_experts=e,
        top_k=int(top_k),
        num_tokens=n_tok,
        nonfinite_tokens=int(state["nonfinite_tokens"]),
        usage_counts=counts,
        usage_fraction=(M.usage_fraction(counts) if have_tokens else np.full(e, math.nan)),
        cv=scalar(M.cv(counts)),
        max_over_mean=scalar(M.max_over_mean(counts)),
        unused_experts=unused,
        active_experts=e - unused,
        utilization_rate=(e - unused) / e,
        routing_entropy=entropy,
        routing_entropy_norm=float(M.routing_entropy_norm(entropy, e)),
        load_entropy_norm=scalar(M.load_entropy_norm(counts)),
        aux_loss=aux,
        z_loss=_div(float(state["z_sum"]), n_z),
        top1_prob=_div(float(state["top1_sum"]), n_logit),
        top1_margin=_div(float(state["margin_sum"]), n_logit),
        weight_sums=weight_sums,
        dropped_fraction=_div(float(state["n_dropped"]), n_slots),
        unique_experts_per_batch=_div(float(state["unique_sum"]), n_upd),
        unique_experts_max=float(state["unique_max"]) if n_upd else math.nan,
        coactivation=None
        if coact is None
        else np.asarray(coact, dtype=np.int64).reshape(e, e).copy(),
        dropped_counts=(
            None
            if dropped_counts is None
            else np.asarray(dropped_counts, dtype=np.int64).reshape(e).copy()
        ),
        extra_slots=int(state["extra_slots"]),
        num_slots=n_slots,
        num_updates=n_upd,
    )


def _mean_finite(values: Iterable[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass
class Snapshot:
    """All MoE layers' statistics over one window, plus model-level aggregates.

    Args:
        step: training / evaluation step the window ends at (None when unknown).
        layers: ``{module path: LayerStats}``, in model order.
        time: optional wall-clock time (seconds since the epoch) of the snapshot.
    """

    step: int | None
    layers: dict[str, LayerStats] = field(default_factory=dict)
    time: float | None = None

    # ------------------------------------------------------------ model-level aggregates

    def _active(self) -> list[LayerStats]:
        return [s for s in self.layers.values() if s.num_tokens > 0]

    def _avg(self, name: str) -> float:
        return _mean_finite(float(getattr(s, name)) for s in self._active())

    @property
    def avg_expert_cv(self) -> float:
        """Mean over layers of the usage CV (the seeds' ``moe/avg_expert_cv``)."""
        return self._avg("cv")

    @property
    def avg_routing_entropy(self) -> float:
        """Mean over layers of the routing entropy (nats)."""
        return self._avg("routing_entropy")

    @property
    def avg_routing_entropy_norm(self) -> float:
        return self._avg("routing_entropy_norm")

    @property
    def avg_load_entropy_norm(self) -> float:
        return self._avg("load_entropy_norm")

    @property
    def avg_max_over_mean(self) -> float:
        return self._avg("max_over_mean")

    @property
    def max_max_over_mean(self) -> float:
        """The worst layer's imbalance ratio."""
        vals = [s.max_over_mean for s in self._active() if math.isfinite(s.max_over_mean)]
        return max(vals) if vals else math.nan

    @property
    def avg_aux_loss(self) -> float:
        return self._avg("aux_loss")

    @property
    def avg_z_loss(self) -> float:
        return self._avg("z_loss")

    @property
    def avg_top1_prob(self) -> float:
        return self._avg("top1_prob")

    @property
    def avg_utilization_rate(self) -> float:
        return self._avg("utilization_rate")

    @property
    def avg_dropped_fraction(self) -> float:
        return self._avg("dropped_fraction")

    @property
    def avg_unique_experts_per_batch(self) -> float:
        return self._avg("unique_experts_per_batch")

    @property
    def total_unused_experts(self) -> int:
        """Unused experts summed over layers that saw tokens."""
        return int(sum(s.unused_experts for s in self._active()))

    @property
    def total_experts(self) -> int:
        return int(sum(s.num_experts for s in self.layers.values()))

    @property
    def total_tokens(self) -> int:
        """Tokens the model saw in the window: the largest per-layer valid-token count
        (each layer sees each token once; summing would count L times)."""
        return max((s.num_tokens for s in self.layers.values()), default=0)

    @property
    def total_nonfinite_tokens(self) -> int:
        return int(sum(s.nonfinite_tokens for s in self.layers.values()))

    @property
    def has_neurons(self) -> bool:
        """True when some layer carries neuron statistics."""
        return any(s.has_neurons for s in self.layers.values())

    @property
    def avg_neuron_sparsity(self) -> float:
        """Mean over layers with neuron rows of ``neuron_sparsity`` (NaN when none)."""
        return _mean_finite(
            float(s.neuron_sparsity)
            for s in self.layers.values()
            if s.neuron_sparsity is not None and s.neuron_rows
        )

    @property
    def avg_activated_neurons(self) -> float:
        """Mean over layers with neuron rows of ``activated_neurons_mean``."""
        return _mean_finite(
            float(s.activated_neurons_mean)
            for s in self.layers.values()
            if s.activated_neurons_mean is not None and s.neuron_rows
        )

    @property
    def total_dead_neurons(self) -> float:
        """Dead neurons summed over layers with neuron rows (NaN when none)."""
        vals = [
            float(s.dead_neurons)
            for s in self.layers.values()
            if s.dead_neurons is not None and s.neuron_rows and math.isfinite(s.dead_neurons)
        ]
        return float(sum(vals)) if vals else math.nan

    def aggregates(self) -> dict[str, float]:
        """Model-level aggregates by name (without prefix)."""
        names = (
            "avg_expert_cv", "avg_routing_entropy", "total_unused_experts",
            "avg_routing_entropy_norm", "avg_load_entropy_norm", "avg_max_over_mean",
            "max_max_over_mean", "avg_aux_loss", "avg_z_loss", "avg_top1_prob",
            "avg_utilization_rate", "avg_dropped_fraction", "avg_unique_experts_per_batch",
            "total_experts", "total_tokens", "total_nonfinite_tokens",
        )  # fmt: skip
        out = {n: float(getattr(self, n)) for n in names}
        if self.has_neurons:
            for n in ("avg_neuron_sparsity", "avg_activated_neurons", "total_dead_neurons"):
                out[n] = float(getattr(self, n))
        return out

    # ------------------------------------------------------------------ serialisation

    def to_dict(self, prefix: str = "moe", vectors: bool = False) -> dict[str, float]:
        """Flat ``{key: float}`` for loggers.

        Keys: ``<prefix>/<aggregate>`` (``moe/avg_expert_cv``, ``moe/avg_routing_entropy``,
        ``moe/total_unused_experts``, ...), ``<prefix>/<layer>/<metric>`` for every name in
        :data:`LAYER_SCALAR_METRICS`, and with ``vectors=True`` also
        ``<prefix>/<layer>/usage_fraction/<e>``. With neuron statistics also
        ``<prefix>/<layer>/<m>`` for :data:`NEURON_SCALAR_METRICS` and the aggregates
        ``avg_neuron_sparsity``, ``avg_activated_neurons``, ``total_dead_neurons``.
        """
        p = f"{prefix}/" if prefix else ""
        out = {f"{p}{k}": v for k, v in self.aggregates().items()}
        for name, s in self.layers.items():
            for m in LAYER_SCALAR_METRICS:
                out[f"{p}{name}/{m}"] = float(getattr(s, m))
            if s.has_neurons:
                for m in NEURON_SCALAR_METRICS:
                    v = getattr(s, m)
                    out[f"{p}{name}/{m}"] = math.nan if v is None else float(v)
            if vectors:
                for e, v in enumerate(s.usage_fraction.tolist()):
                    out[f"{p}{name}/usage_fraction/{e}"] = float(v)
        return out

    def to_json(self, firing: bool = False) -> str:
        """Strict JSON of the whole snapshot (arrays as lists, NaN as null).

        ``firing=True`` also writes the [E, I] ``firing_counts`` of every layer.
        """
        return json.dumps(
            {
                "format": "moescope.snapshot/1",
                "step": self.step,
                "time": json_safe(self.time),
                "layers": {k: v.to_json_dict(firing=firing) for k, v in self.layers.items()},
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        if not isinstance(d, dict) or "layers" not in d:
            raise ValueError(
                "not a moescope snapshot: expected a JSON object with 'step' and 'layers' "
                "as written by Snapshot.to_json()."
            )
        return cls(
            step=d.get("step"),
            layers={k: LayerStats.from_json_dict(v) for k, v in d["layers"].items()},
            time=d.get("time"),
        )
