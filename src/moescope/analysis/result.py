"""What one ``moescope analyze`` run computed: :class:`AnalysisResult`.

Every number of the report is in the result before anything is rendered:
:meth:`AnalysisResult.to_summary` is the content of ``summary.json`` and
:func:`write_summary` writes it; :mod:`moescope.report.analysis_report` only draws and
lays out what is here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope._json import json_safe
from moescope.analysis import outdir
from moescope.analysis.verdict import Verdict, diagnose

__all__ = [
    "SUMMARY_FORMAT",
    "AnalysisResult",
    "DomainInfo",
    "ModelInfo",
    "Passage",
    "RoutingAnalysis",
    "write_summary",
]

#: ``format`` field of ``summary.json``; ``moescope compare`` checks it.
SUMMARY_FORMAT = "moescope.analysis/1"


@dataclass
class DomainInfo:
    """One ``--data`` source: its label, where it came from, tokens and forwards it gave."""

    label: str
    path: str
    kind: str = "text"
    tokens: int = 0
    batches: int = 0


@dataclass
class ModelInfo:
    """The analysed model, described (the module itself is not kept in the result)."""

    source: str
    model_type: str
    class_name: str
    random_weights: bool
    description: str
    tokenizer: str
    vocab_size: int | None
    device: str
    dtype: str


@dataclass
class Passage:
    """A readable stretch of one domain's text with each token's first-choice expert at
    ``layer``: ``tokens`` (decoded strings) and ``experts`` (ids, -1 where the layer did not
    route the token), both of length n."""

    domain: str
    layer: str
    num_experts: int
    tokens: list[str]
    experts: list[int]


@dataclass
class RoutingAnalysis:
    """Token-level analyses (:mod:`moescope.stats.routing`) of the recorded tokens.

    - ``recorded_tokens``: ``{domain: n}``;
    - ``distributions``: ``{domain: {layer: [E] fraction}}``;
    - ``divergence``: :class:`~moescope.stats.routing.DomainDivergence` (2+ domains);
    - ``same_expert``: ``{domain: {layer: SameExpertRate}}``;
    - ``top_tokens``: ``{domain: {expert: [TopToken]}}`` at ``token_layer``;
    - ``passage``: the coloured passage; ``agreement``: ``{layer: overlap}`` with the
      ``--compare`` checkpoint and its ``agreement_chance`` (K / E);
    - ``errors``: analyses that failed (``"what: why"``), reported, not fatal.
    """

    token_layer: str
    recorded_tokens: dict[str, int] = field(default_factory=dict)
    distributions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    divergence: Any | None = None
    same_expert: dict[str, dict[str, Any]] = field(default_factory=dict)
    top_tokens: dict[str, dict[int, list[Any]]] = field(default_factory=dict)
    passage: Passage | None = None
    agreement: dict[str, float] | None = None
    agreement_chance: float | None = None
    compare_source: str | None = None
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``routing_analysis`` object of ``summary.json``."""
        out: dict[str, Any] = {
            "token_layer": self.token_layer,
            "recorded_tokens": dict(self.recorded_tokens),
            "expert_distribution": self.distributions,
        }
        if self.divergence is not None:
            out["domain_divergence_mean"] = self.divergence.mean
            out["domain_divergence_max"] = self.divergence.max
        if self.same_expert:
            out["same_expert_rate_top1"] = {
                d: {lay: r.rate for lay, r in v.items()} for d, v in self.same_expert.items()
            }
            out["same_expert_chance_top1"] = {
                d: {lay: r.chance for lay, r in v.items()} for d, v in self.same_expert.items()
            }
        if self.top_tokens:
            out["top_tokens"] = {
                d: {str(e): [[t.token, t.count, t.share] for t in v] for e, v in tops.items()}
                for d, tops in self.top_tokens.items()
            }
        if self.agreement is not None:
            out["router_agreement"] = self.agreement
            out["router_agreement_chance"] = self.agreement_chance
            out["compare_source"] = self.compare_source
        if self.errors:
            out["errors"] = list(self.errors)
        return out


@dataclass
class AnalysisResult:
    """Rank 0's view of one analysis after the cross-rank reduction.

    ``snapshot``: the monitor's :class:`~moescope.stats.snapshot.Snapshot` over every
    processed token; ``params`` / ``flops`` / ``measured``: cost reports (None with
    ``cost_error`` when counting failed); ``routing``: token-level analyses (None when no
    token was recorded); ``recordings``: the raw ``{domain: TokenRouting}`` (not
    serialised); ``partial``: the run was interrupted and covers the first
    ``total_tokens`` tokens only; ``rows_per_forward``: rows actually sent per forward
    (``batch_size`` capped by the memory budget).
    """

    settings: dict[str, Any]
    model: ModelInfo
    snapshot: Any
    alerts: list[Any]
    domains: list[DomainInfo]
    threshold_label: str | None = None
    params: Any | None = None
    flops: Any | None = None
    measured: Any | None = None
    cost_error: str | None = None
    routing: RoutingAnalysis | None = None
    recordings: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    rank: int = 0
    coact_layer: str = ""
    token_layer: str = ""
    rows_per_forward: int = 0
    seconds: float = 0.0
    partial: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        """Tokens counted (the maximum over layers, :attr:`Snapshot.total_tokens`)."""
        return int(self.snapshot.total_tokens)

    def verdict(self) -> Verdict:
        """What is wrong and what to do (the report's first screen), from the snapshot and
        the alerts."""
        return diagnose(self.snapshot, self.alerts)

    def to_summary(self) -> dict[str, Any]:
        """The content of ``summary.json``: strict-JSON types, NaN as None."""
        snap = self.snapshot
        out: dict[str, Any] = {
            "format": SUMMARY_FORMAT,
            "partial": self.partial,
            "model": dict(self.model.__dict__),
            "settings": {
                **self.settings,
                "threshold": self.threshold_label,
                "world_size": self.world_size,
                "rows_per_forward": self.rows_per_forward,
                "coact_layer": self.coact_layer,
                "token_layer": self.token_layer,
            },
            "data": [dict(d.__dict__) for d in self.domains],
            "total_tokens": snap.total_tokens,
            "aggregates": snap.aggregates(),
            "layers": {name: s.to_json_dict() for name, s in snap.layers.items()},
            "alerts": [
                {
                    "level": a.level,
                    "layer": a.layer,
                    "rule": a.rule,
                    "value": a.value,
                    "message": a.message,
                }
                for a in self.alerts
            ],
            "seconds": self.seconds,
            "notes": list(self.notes),
            # The report's first screen, for dashboards and scripts.
            "verdict": self.verdict().to_json(),
        }
        if self.params is not None:
            out["params"] = self.params.to_dict()
        if self.flops is not None:
            out["flops"] = {
                k: v for k, v in self.flops.to_dict().items() if k != "attention_layers"
            }
        if self.measured is not None:
            out["measured"] = self.measured.to_dict()
        if self.cost_error:
            out["cost_error"] = self.cost_error
        if self.routing is not None:
            out["routing_analysis"] = self.routing.to_json()
        return json_safe(out)


def write_summary(result: AnalysisResult, out_dir: str | Path) -> Path:
    """Write ``out_dir/summary.json`` from ``result`` (strict JSON); returns its path."""
    text = json.dumps(result.to_summary(), indent=2, allow_nan=False)
    return outdir.write_text(Path(out_dir), "summary.json", text)
