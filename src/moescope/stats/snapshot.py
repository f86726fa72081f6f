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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope._json import json_safe
from moescope.stats import metrics as M
from moescope.stats import registry as R
from moescope.stats.registry import LAYER_SCALAR_METRICS, NEURON_SCALAR_METRICS

__all__ = [
    "LAYER_SCALAR_METRICS",
    "NEURON_SCALAR_METRICS",
    "LayerStats",
    "Snapshot",
    "layer_stats_from_state",
]

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
    "expert_bias": np.float64,
}

_INT_FIELDS = (
    "num_experts", "top_k", "num_tokens", "nonfinite_tokens", "extra_slots", "num_slots",
    "num_updates", "intermediate_size", "neuron_rows",
)  # fmt: skip


@dataclass(repr=False)
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

    ``expert_bias`` [E] float64: the router's selection bias at the end of the window
    (DeepSeek-V3-style aux-loss-free balancing: Megatron-core and torchtitan routers,
    ``moescope.nn`` bias routers), None when the router has none. It is a value at read
    time, not a sum over the window.
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
    expert_bias: np.ndarray | None = None
    # Last: snapshots written before it existed (JSONL logs) still load, as NaN.
    min_over_mean: float = math.nan

    def __post_init__(self) -> None:
        # Counts are ints (NaN only where undefined), whatever arithmetic produced them.
        for name in R.COUNT_METRICS:
            v = getattr(self, name)
            if v is not None and not isinstance(v, int):
                object.__setattr__(self, name, R.as_count(v))
        for name, dt in _ARRAY_FIELDS.items():
            v = getattr(self, name)
            if v is not None and dt is np.int64 and getattr(v, "dtype", None) != np.int64:
                object.__setattr__(self, name, np.asarray(v).astype(np.int64))

    def __repr__(self) -> str:
        """One line: E, K, tokens and the summary metrics (full data: ``to_json_dict``)."""
        parts = [f"E={self.num_experts}", f"K={self.top_k}"]
        for m in R.METRICS:
            if m.column and (not m.neuron or self.has_neurons):
                parts.append(f"{m.name}={_short(getattr(self, m.name))}")
        return f"LayerStats({', '.join(parts)})"

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
        min_over_mean=scalar(M.min_over_mean(counts)),
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


def _short_layer_names(names: list[str]) -> dict[str, str]:
    """Drop the prefix and suffix every layer path shares (``model.layers.3.mlp`` -> ``3``)."""
    if len(names) < 2:
        return {n: n for n in names}
    split = [n.split(".") for n in names]
    pre = 0
    while all(len(p) > pre + 1 for p in split) and len({p[pre] for p in split}) == 1:
        pre += 1
    suf = 0
    while all(len(p) > pre + suf + 1 for p in split) and len({p[-1 - suf] for p in split}) == 1:
        suf += 1
    out = {n: ".".join(p[pre : len(p) - suf]) or n for n, p in zip(names, split, strict=True)}
    return out if len(set(out.values())) == len(names) else {n: n for n in names}


class Summary:
    """A per-layer table of a :class:`Snapshot` (from :meth:`Snapshot.summary`).

    ``header`` [C] column names, ``rows`` [L][C] formatted cells. ``str()`` renders it
    with rich when installed, as plain text otherwise; ``plain()`` always plain;
    ``__rich__`` hands rich its Table.
    """

    def __init__(
        self, title: str, header: list[str], rows: list[list[str]], width: int | None = None
    ) -> None:
        self.title, self.header, self.rows, self.width = title, header, rows, width

    def plain(self) -> str:
        """Aligned plain-text table (first column left-aligned, numbers right-aligned)."""
        table = [self.header, *self.rows]
        w = [max(len(r[i]) for r in table) for i in range(len(self.header))]
        lines = [self.title]
        for r in table:
            cells = [r[0].ljust(w[0])] + [c.rjust(w[i]) for i, c in enumerate(r) if i > 0]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table

        t = Table(title=self.title, title_justify="left")
        for i, h in enumerate(self.header):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
        for r in self.rows:
            t.add_row(*r)
        return t

    def __str__(self) -> str:
        try:
            from rich.console import Console
        except ImportError:
            return self.plain()
        import io

        buf = io.StringIO()
        Console(file=buf, width=self.width or 120, color_system=None).print(self)
        return buf.getvalue().rstrip("\n")

    __repr__ = __str__


def _short(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    f = float(v)
    if not math.isfinite(f):
        return "nan"
    return f"{f:.4g}"


@dataclass(repr=False)
class Snapshot:
    """All MoE layers' statistics over one window, plus model-level aggregates.

    The aggregates (``snap.avg_expert_cv``, ``snap.total_unused_experts``, ...) are the
    names of :data:`moescope.stats.registry.AGGREGATES`, computed on access by
    :func:`moescope.stats.registry.aggregate` (counts as ints); ``aggregates()`` returns
    them all as floats. ``repr`` is one line; :meth:`summary` gives one row per layer.

    Args:
        step: training / evaluation step the window ends at (None when unknown).
        layers: ``{module path: LayerStats}``, in model order.
        time: optional wall-clock time (seconds since the epoch) of the snapshot.
    """

    step: int | None
    layers: dict[str, LayerStats] = field(default_factory=dict)
    time: float | None = None

    # ------------------------------------------------------------ model-level aggregates

    def __getattr__(self, name: str) -> Any:
        # Model-level aggregates (avg_expert_cv, total_unused_experts, ...) come from the
        # metric registry; only names not found the normal way reach here.
        if name in R.AGGREGATES:
            return R.aggregate(name, self.__dict__.get("layers", {}).values())
        raise AttributeError(
            f"{type(self).__name__!s} has no attribute {name!r} (aggregates: "
            f"{', '.join(R.AGGREGATES)})"
        )

    def __repr__(self) -> str:
        """One line: step, layers, tokens and the headline aggregates; ``summary()``
        gives one row per layer."""
        head = [f"step={self.step}", f"layers={len(self.layers)}"]
        if self.layers:
            head.append(f"tokens={self.total_tokens}")
            for name in ("avg_expert_cv", "max_max_over_mean", "total_unused_experts",
                         "avg_routing_entropy_norm"):  # fmt: skip
                head.append(f"{name}={_short(getattr(self, name))}")
        return f"Snapshot({', '.join(head)})"

    def summary(self, width: int | None = None) -> Summary:
        """One row per layer with the registry's summary metrics.

        Returns a :class:`Summary`: ``str()`` / ``repr()`` give a rich table (rendered
        as text) when ``rich`` is installed, a plain aligned table otherwise, so
        ``snap.summary()`` at a REPL prints the table.
        """
        cols = [m for m in R.METRICS if m.column and (not m.neuron or self.has_neurons)]
        header = ["layer"] + [m.column for m in cols]
        rows = []
        short = _short_layer_names(list(self.layers))
        for name, s in self.layers.items():
            row = [short[name]]
            for m in cols:
                v = getattr(s, m.name)
                row.append(f"{_short(v)}/{s.num_experts}" if m.name == "unused_experts" and
                           v == v else _short(v))  # fmt: skip
            rows.append(row)
        tokens = f", {self.total_tokens:,} tokens" if self.layers else ""
        title = f"Snapshot at step {self.step}: {len(self.layers)} MoE layers{tokens}"
        return Summary(title, header, rows, width)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(R.AGGREGATES))

    @property
    def has_neurons(self) -> bool:
        """True when some layer carries neuron statistics."""
        return any(s.has_neurons for s in self.layers.values())

    def aggregates(self) -> dict[str, float]:
        """Model-level aggregates by name (without prefix), as floats, in registry order
        (:data:`moescope.stats.registry.AGGREGATES`); the neuron ones only when some layer
        has neuron statistics."""
        neurons = self.has_neurons
        return {
            name: float(R.aggregate(name, self.layers.values()))
            for name, (_, a) in R.AGGREGATES.items()
            if neurons or a.over != "neuron"
        }

    # ------------------------------------------------------------------ serialisation

    def worst_layers(self, n: int, metric: str = "max_over_mean") -> list[str]:
        """The ``n`` layer paths with the highest ``metric`` (layers with tokens; ties in
        model order)."""
        scored = [
            (-float(getattr(s, metric)), i, path)
            for i, (path, s) in enumerate(self.layers.items())
            if s.num_tokens > 0 and math.isfinite(float(getattr(s, metric)))
        ]
        return [path for _, _, path in sorted(scored)[: max(int(n), 0)]]

    def to_dict(
        self,
        prefix: str = "moe",
        vectors: bool = False,
        layers: Collection[str] | None = None,
    ) -> dict[str, float]:
        """Flat ``{key: float}`` for loggers.

        Keys: ``<prefix>/<aggregate>`` (``moe/avg_expert_cv``, ``moe/avg_routing_entropy``,
        ``moe/total_unused_experts``, ...), ``<prefix>/<layer>/<metric>`` for every name in
        :data:`LAYER_SCALAR_METRICS`, and with ``vectors=True`` also
        ``<prefix>/<layer>/usage_fraction/<e>``. With neuron statistics also
        ``<prefix>/<layer>/<m>`` for :data:`NEURON_SCALAR_METRICS` and the aggregates
        ``avg_neuron_sparsity``, ``avg_activated_neurons``, ``total_dead_neurons``.
        ``layers``: write per-layer keys for these layer paths only (None: every layer;
        the aggregates always cover every layer).
        """
        p = f"{prefix}/" if prefix else ""
        out = {f"{p}{k}": v for k, v in self.aggregates().items()}
        for name, s in self.layers.items():
            if layers is not None and name not in layers:
                continue
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
