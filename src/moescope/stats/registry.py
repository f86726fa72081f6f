"""The metric registry: every metric moescope reports, declared once.

A :class:`Metric` names a per-layer field of :class:`~moescope.stats.snapshot.LayerStats`,
its unit, whether it is a count (an int when defined), whether it goes to loggers as a
flat key ``<prefix>/<layer>/<name>``, which way is healthier, the pure function that
computes it from the usage counts (when it has one), one doc line, and its model-level
:class:`Aggregate` s (``Snapshot.avg_expert_cv`` and friends).

Everything else is derived from :data:`METRICS`:

- ``Snapshot``'s aggregate attributes and ``Snapshot.aggregates()`` (:data:`AGGREGATES`);
- the flat logger keys (:data:`LAYER_SCALAR_METRICS`, :data:`NEURON_SCALAR_METRICS`);
- the tables of docs/metrics.md (:func:`markdown_tables`; a test checks they match);
- the metrics the alert rules read (:mod:`moescope.alerts` names a registry metric per rule).

This module has no dependency beyond numpy and :mod:`moescope.stats.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from moescope.stats import metrics as M

__all__ = [
    "AGGREGATES",
    "COUNT_METRICS",
    "LAYER_SCALAR_METRICS",
    "METRICS",
    "NEURON_SCALAR_METRICS",
    "Aggregate",
    "Metric",
    "aggregate",
    "markdown_tables",
    "metric",
]

Reduce = Literal["mean", "sum", "max", "min", "p50", "p90"]
#: Which layers an aggregate reads: ``"active"`` layers that saw a valid token,
#: ``"all"`` layers, ``"neuron"`` layers with neuron rows.
Over = Literal["active", "all", "neuron"]


@dataclass(frozen=True)
class Aggregate:
    """One model-level number over the layers of a snapshot.

    ``name``: the ``Snapshot`` attribute and ``to_dict`` key (``avg_expert_cv``);
    ``reduce``: ``mean`` (of the finite values, NaN when none), ``sum`` (of the finite
    values; an int for counts; NaN when a neuron aggregate has no layer), ``max``,
    ``min``, or the percentile across layers ``p50`` / ``p90`` (linear interpolation
    between the sorted finite values, numpy's default; NaN when none);
    ``over``: which layers (see :data:`Over`); ``doc``: one line.
    """

    name: str
    reduce: Reduce
    over: Over = "active"
    doc: str = ""


@dataclass(frozen=True)
class Metric:
    """One per-layer metric (a ``LayerStats`` field).

    Args:
        name: the ``LayerStats`` attribute, also the flat-key suffix.
        unit: what a value is measured in (``"nats"``, ``"ratio"``, ``"experts"``, ...).
        doc: one line, the definition (docs/metrics.md prints it).
        count: an integer count (an ``int`` when defined, NaN for a window without
            tokens).
        flat: written by ``Snapshot.to_dict`` as ``<prefix>/<layer>/<name>``.
        neuron: a neuron metric (present only with ``neurons=True``).
        better: ``"lower"`` / ``"higher"`` when one direction is healthier (the compare
            report uses it), None when neither is.
        label: short text for alerts and reports (``"max/mean load"``); ``name`` if empty.
        function: the pure function of :mod:`moescope.stats.metrics` computing it from
            ``usage_counts`` [E] (None when it comes from other window sums).
        aggregates: its model-level aggregates.
        column: short header when ``Snapshot.summary()`` shows it (empty: not shown).
    """

    name: str
    unit: str
    doc: str
    count: bool = False
    flat: bool = True
    neuron: bool = False
    better: Literal["lower", "higher"] | None = None
    label: str = ""
    function: Callable[[Any], Any] | None = None
    aggregates: tuple[Aggregate, ...] = ()
    column: str = ""

    @property
    def text(self) -> str:
        """The label shown to people (``label`` or ``name``)."""
        return self.label or self.name


_A = Aggregate

#: Every per-layer metric, in the order of the flat logger keys.
METRICS: tuple[Metric, ...] = (
    Metric(
        "cv", "ratio",         "coefficient of variation of `usage_counts`: population std (ddof = 0) / mean; "
        "0 for perfectly even use",
        column="cv", better="lower", label="usage CV", function=M.cv,
        aggregates=(
            _A("avg_expert_cv", "mean", doc="mean of `cv` (the seeds' key)"),
            _A("p50_expert_cv", "p50", doc="median layer's `cv`"),
            _A("p90_expert_cv", "p90", doc="90th percentile of `cv` across layers"),
            _A("max_expert_cv", "max", doc="the worst layer's `cv`"),
        ),
    ),
    Metric(
        "max_over_mean", "ratio",         "max / mean of `usage_counts` (the imbalance ratio: 1 = even, E = one expert "
        "takes everything)",
        column="max/mean", better="lower", label="max/mean load", function=M.max_over_mean,
        aggregates=(
            _A("avg_max_over_mean", "mean", doc="mean of `max_over_mean`"),
            _A("p50_max_over_mean", "p50", doc="median layer's `max_over_mean`"),
            _A("p90_max_over_mean", "p90",
               doc="90th percentile of `max_over_mean` across layers"),
            _A("max_max_over_mean", "max", doc="the worst layer's `max_over_mean`"),
        ),
    ),
    Metric(
        "min_over_mean", "ratio",
        "min / mean of `usage_counts` (the least-loaded expert: 1 = even, 0 = an expert "
        "got nothing); with `max_over_mean` and `cv` (std / mean) the min / max / std of "
        "the load within the layer",
        better="higher", label="min/mean load", function=M.min_over_mean,
        aggregates=(
            _A("p50_min_over_mean", "p50", doc="median layer's `min_over_mean`"),
            _A("min_min_over_mean", "min", doc="the worst layer's `min_over_mean`"),
        ),
    ),
    Metric(
        "unused_experts", "experts",         "experts with `usage_counts[e] == 0`",
        column="unused", count=True, better="lower", label="unused experts", function=M.unused_experts,
        aggregates=(
            _A("total_unused_experts", "sum", doc="sum of `unused_experts` over layers with tokens"),
        ),
    ),
    Metric("active_experts", "experts", "E - `unused_experts`", count=True, better="higher",
           label="active experts"),
    Metric(
        "utilization_rate", "fraction", "`active_experts` / E",
        better="higher", label="expert utilisation",
        aggregates=(_A("avg_utilization_rate", "mean", doc="mean of `utilization_rate`"),),
    ),
    Metric(
        "routing_entropy", "nats",
        "mean over valid tokens of -sum_e p_e ln p_e of the token's router distribution p "
        "(all columns the router scores; 0 ln 0 = 0)",
        better="higher", label="routing entropy (nats)",
        aggregates=(_A("avg_routing_entropy", "mean", doc="mean of `routing_entropy`"),),
    ),
    Metric(
        "routing_entropy_norm", "fraction of ln E",         "`routing_entropy` / ln E (NaN when E = 1)",
        column="H_route", better="higher", label="normalised routing entropy",
        aggregates=(_A("avg_routing_entropy_norm", "mean", doc="mean of `routing_entropy_norm`"),),
    ),
    Metric(
        "load_entropy_norm", "fraction of ln E",         "entropy of `usage_fraction` / ln E: 1 = even load, 0 = one expert (NaN when E = 1)",
        column="H_load", better="higher", label="normalised load entropy", function=M.load_entropy_norm,
        aggregates=(_A("avg_load_entropy_norm", "mean", doc="mean of `load_entropy_norm`"),),
    ),
    Metric(
        "aux_loss", "loss",         "load-balancing loss of this layer alone, E x sum_e f_e x P_e with f_e = top-k slots "
        "(dropped ones included) that chose e / `num_tokens` (so sum_e f_e = K) and P_e = mean "
        "router probability of e; equals transformers' `load_balancing_loss_func` on this "
        "layer; a uniform router scores K",
        column="aux", better="lower", label="aux loss",
        aggregates=(
            _A("avg_aux_loss", "mean",
               doc="mean of `aux_loss` (not transformers' model-level `aux_loss`)"),
        ),
    ),
    Metric(
        "z_loss", "loss",
        "router z-loss: mean over valid tokens of logsumexp(logits)^2 of the raw logits "
        "(ST-MoE); NaN for `score_fn=\"probs\"`",
        better="lower", label="router z-loss",
        aggregates=(_A("avg_z_loss", "mean", doc="mean of `z_loss`"),),
    ),
    Metric(
        "top1_prob", "probability",         "mean over valid tokens of the highest router probability",
        column="top1", label="top-1 probability",
        aggregates=(_A("avg_top1_prob", "mean", doc="mean of `top1_prob`"),),
    ),
    Metric(
        "top1_margin", "probability",
        "mean over valid tokens of the highest minus the second-highest probability "
        "(equals `top1_prob` when E = 1)",
        label="top-1 margin",
    ),
    Metric(
        "dropped_fraction", "fraction",         "dropped slots of valid tokens / `num_slots`",
        column="dropped", better="lower", label="dropped-slot fraction",
        aggregates=(_A("avg_dropped_fraction", "mean", doc="mean of `dropped_fraction`"),),
    ),
    Metric(
        "unique_experts_per_batch", "experts",
        "distinct experts with a kept slot in one layer call, averaged over the window's "
        "calls (what one serving step must load)",
        label="experts per call",
        aggregates=(
            _A("avg_unique_experts_per_batch", "mean", doc="mean of `unique_experts_per_batch`"),
        ),
    ),
    Metric(
        "unique_experts_max", "experts",
        "the largest number of distinct experts of one layer call in the window",
        count=True, label="max experts per call",
    ),
    Metric(
        "num_tokens", "tokens", "valid tokens (padding and non-finite rows excluded)",
        column="tokens", count=True, label="tokens",
        aggregates=(
            _A("total_tokens", "max", "all",
               doc="the largest `num_tokens` of any layer (each layer sees each token "
               "once, so summing would count it L times)"),
        ),
    ),
    Metric(
        "nonfinite_tokens", "tokens",
        "tokens kept by the mask whose router row had a NaN/inf (excluded from everything else)",
        count=True, better="lower", label="router rows with NaN/inf scores",
        aggregates=(_A("total_nonfinite_tokens", "sum", "all", doc="sum of `nonfinite_tokens`"),),
    ),
    Metric(
        "extra_slots", "slots",
        "kept slots on ids outside [0, E) (identity/zero experts)",
        count=True, label="identity/zero-expert slots",
    ),
    Metric(
        "num_experts", "experts", "E, the routed experts of the layer",
        count=True, flat=False, label="experts",
        aggregates=(_A("total_experts", "sum", "all", doc="sum of E over all monitored layers"),),
    ),
    Metric(
        "neuron_sparsity", "fraction", "1 - `activated_neurons_mean` / I",
        column="sparsity", neuron=True, label="neuron sparsity",
        aggregates=(
            _A("avg_neuron_sparsity", "mean", "neuron", doc="mean of `neuron_sparsity`"),
        ),
    ),
    Metric(
        "activated_neurons_mean", "neurons",
        "mean over (token, slot) rows of the activated neurons of the row",
        neuron=True, label="activated neurons",
        aggregates=(
            _A("avg_activated_neurons", "mean", "neuron", doc="mean of `activated_neurons_mean`"),
        ),
    ),
    Metric(
        "activated_neurons_std", "neurons",
        "population std over rows of the activated neurons of the row",
        neuron=True, label="activated neurons std",
    ),
    Metric(
        "dead_neurons", "neurons",         "neurons never activated in the window, summed over experts with rows",
        column="dead", count=True, neuron=True, better="lower", label="dead neurons",
        aggregates=(
            _A("total_dead_neurons", "sum", "neuron", doc="sum of `dead_neurons`"),
        ),
    ),
)  # fmt: skip

_BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

#: ``{aggregate name: (metric, aggregate)}`` in the order of ``Snapshot.aggregates()``.
AGGREGATES: dict[str, tuple[Metric, Aggregate]] = {
    a.name: (m, a) for m in METRICS for a in m.aggregates
}

#: Per-layer scalars written by ``Snapshot.to_dict`` as ``<prefix>/<layer>/<name>``.
LAYER_SCALAR_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.flat and not m.neuron)
#: Per-layer neuron scalars written by ``Snapshot.to_dict`` (layers with neuron statistics).
NEURON_SCALAR_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.flat and m.neuron)
#: Metrics that are integer counts (an int when defined, NaN when undefined).
COUNT_METRICS: frozenset[str] = frozenset(m.name for m in METRICS if m.count)


def metric(name: str) -> Metric:
    """The registered metric ``name`` (raises ``KeyError`` naming the known ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; registered: {', '.join(_BY_NAME)}") from None


def as_count(v: Any) -> Any:
    """A count as an ``int`` when finite (``3.0`` -> ``3``); NaN / None stay."""
    if v is None or isinstance(v, int):
        return v
    f = float(v)
    return int(f) if math.isfinite(f) and f == int(f) else f


def aggregate(name: str, layers: Iterable[Any]) -> float | int:
    """The model-level aggregate ``name`` over ``layers`` (``LayerStats`` objects).

    Layers are filtered by the aggregate's ``over`` (``active``: ``num_tokens > 0``;
    ``neuron``: ``neuron_rows`` > 0; ``all``), then their finite values are reduced.
    Means are NaN over no value; sums of counts are ints (0 over no layer, except neuron
    aggregates, which are NaN without neuron rows); maxima over no value are NaN, except
    ``total_tokens``-style maxima over counts, which are 0.
    """
    m, a = AGGREGATES[name]
    ls = list(layers)
    if a.over == "active":
        ls = [s for s in ls if s.num_tokens > 0]
    elif a.over == "neuron":
        ls = [s for s in ls if s.neuron_rows]
    vals = [float(v) for v in (getattr(s, m.name) for s in ls) if v is not None]
    vals = [v for v in vals if math.isfinite(v)]
    if a.reduce == "mean":
        return sum(vals) / len(vals) if vals else math.nan
    if a.reduce in ("max", "min"):
        if not vals:
            return 0 if m.count else math.nan
        v = max(vals) if a.reduce == "max" else min(vals)
        return int(v) if m.count else v
    if a.reduce in ("p50", "p90"):
        if not vals:
            return math.nan
        return float(np.percentile(vals, 50.0 if a.reduce == "p50" else 90.0))
    if not vals and a.over == "neuron":
        return math.nan
    total = sum(vals)
    return int(total) if m.count else total


# --------------------------------------------------------------------------- docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_tables() -> dict[str, str]:
    """The generated tables of docs/metrics.md, by marker name.

    ``layer``: one row per per-layer metric (name, unit, flat key, definition);
    ``aggregate``: one row per model-level aggregate (name, of, reduction, definition).
    """
    rows = ["| name | unit | logged as | definition |", "|---|---|---|---|"]
    for m in METRICS:
        key = f"`moe/<layer>/{m.name}`" if m.flat else "-"
        kind = f"{m.unit} (int)" if m.count else m.unit
        extra = " (neurons only)" if m.neuron else ""
        rows.append(f"| `{m.name}` | {kind} | {key}{extra} | {_cell(m.doc)} |")
    agg = ["| name | of | over layers | definition |", "|---|---|---|---|"]
    over = {"active": "with tokens", "all": "all", "neuron": "with neuron rows"}
    for name, (m, a) in AGGREGATES.items():
        agg.append(f"| `{name}` | {a.reduce} of `{m.name}` | {over[a.over]} | {_cell(a.doc)} |")
    return {"layer": "\n".join(rows), "aggregate": "\n".join(agg)}


def replace_tables(text: str, tables: dict[str, str] | None = None) -> str:
    """``text`` with each ``<!-- registry:NAME -->`` ... ``<!-- /registry:NAME -->``
    block replaced by the generated table ``NAME`` (see :func:`markdown_tables`)."""
    tables = markdown_tables() if tables is None else tables
    for name, table in tables.items():
        start, end = f"<!-- registry:{name} -->", f"<!-- /registry:{name} -->"
        i, j = text.find(start), text.find(end)
        if i < 0 or j < i:
            raise ValueError(f"docs: markers {start} ... {end} not found")
        text = text[: i + len(start)] + "\n" + table + "\n" + text[j:]
    return text
