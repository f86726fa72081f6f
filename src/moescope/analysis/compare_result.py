"""Result types of ``moescope compare`` (what :mod:`moescope.report.compare_report` renders).

:mod:`moescope.analysis.compare` reads the two runs and computes every number; these
dataclasses only hold them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope._json import json_safe

__all__ = ["Comparison", "LayerComparison", "RunSide"]


@dataclass
class RunSide:
    """One of the two runs.

    ``snapshot``: per-layer statistics (an analysis' totals, or a log's last window);
    ``alerts``: dicts with ``level, layer, rule, value, message`` (and ``step`` for logs);
    ``steps`` / ``series``: for logs, the step of every window and ``{metric: [value per
    window]}`` (:data:`SERIES_METRICS`), empty for analyses.
    """

    label: str
    path: str
    kind: str  # "analysis" or "training"
    snapshot: Any
    alerts: list[dict[str, Any]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0
    description: str = ""
    partial: bool = False

    @property
    def num_windows(self) -> int:
        return len(self.steps)

    def alert_counts(self) -> dict[str, int]:
        """``{rule: number of alerts}``."""
        out: dict[str, int] = {}
        for a in self.alerts:
            out[str(a.get("rule"))] = out.get(str(a.get("rule")), 0) + 1
        return out


@dataclass
class LayerComparison:
    """One matched layer: ``usage_a`` / ``usage_b`` [E] fractions, ``js`` their
    Jensen-Shannon divergence (nats; NaN when E differs or a side has no tokens),
    ``metrics`` ``{name: (a, b)}`` for :data:`BALANCE_METRICS`."""

    layer: str
    layer_b: str
    usage_a: np.ndarray
    usage_b: np.ndarray
    js: float
    metrics: dict[str, tuple[float, float]]


@dataclass
class Comparison:
    """Everything the compare report shows (see the module docstring)."""

    a: RunSide
    b: RunSide
    layers: list[LayerComparison]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: :class:`~moescope.analysis.verdict.Verdict` of each side (None if not computed).
    verdict_a: Any = None
    verdict_b: Any = None
    #: label of the healthier run, None for a tie; ``health_reasons``: the numbers behind it.
    healthier: str | None = None
    health_reasons: list[str] = field(default_factory=list)

    def differ_most(self, n: int = 3) -> list[LayerComparison]:
        """The ``n`` matched layers with the largest finite JS divergence, largest first."""
        finite = [x for x in self.layers if math.isfinite(x.js)]
        return sorted(finite, key=lambda x: -x.js)[:n]

    @property
    def mean_js(self) -> float:
        """Mean over matched layers of the JS divergence (finite values only; NaN if none)."""
        v = [x.js for x in self.layers if math.isfinite(x.js)]
        return float(np.mean(v)) if v else float("nan")

    def to_json(self) -> dict[str, Any]:
        """The content of ``comparison.json`` (strict JSON, NaN as None)."""

        def side(s: RunSide) -> dict[str, Any]:
            return {
                "label": s.label,
                "path": s.path,
                "kind": s.kind,
                "tokens": s.tokens,
                "description": s.description,
                "partial": s.partial,
                "aggregates": s.snapshot.aggregates(),
                "alerts": s.alerts,
                "alert_counts": s.alert_counts(),
                "steps": s.steps,
                "series": s.series,
            }

        return json_safe(
            {
                "format": "moescope.compare/1",
                "a": side(self.a),
                "b": side(self.b),
                "mean_js": self.mean_js,
                "layers": [
                    {
                        "layer": x.layer,
                        "layer_b": x.layer_b,
                        "js": x.js,
                        "usage_a": x.usage_a,
                        "usage_b": x.usage_b,
                        "metrics": {k: list(v) for k, v in x.metrics.items()},
                    }
                    for x in self.layers
                ],
                "only_a": self.only_a,
                "only_b": self.only_b,
                "notes": self.notes,
                "verdict_a": None if self.verdict_a is None else self.verdict_a.to_json(),
                "verdict_b": None if self.verdict_b is None else self.verdict_b.to_json(),
                "healthier": self.healthier,
                "health_reasons": self.health_reasons,
            }
        )
