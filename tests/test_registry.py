"""The metric registry (moescope.stats.registry) and the REPL face of Snapshot.

Aggregates are recomputed here with numpy from the per-layer values; the flat keys are
checked against the keys loggers, the Prometheus exporter and compare already read (the
literal lists below are the published contract, not a copy of the registry).
"""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import random_layer_stats
from moescope.alerts import LAYER_RULES, RULES, AlertRules
from moescope.stats import registry as R
from moescope.stats.snapshot import LAYER_SCALAR_METRICS, NEURON_SCALAR_METRICS, Snapshot

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

# Keys published before the registry existed (sinks, serve.py, JSONL readers use them).
PUBLISHED_LAYER_KEYS = (
    "cv", "max_over_mean", "unused_experts", "active_experts", "utilization_rate",
    "routing_entropy", "routing_entropy_norm", "load_entropy_norm", "aux_loss", "z_loss",
    "top1_prob", "top1_margin", "dropped_fraction", "unique_experts_per_batch",
    "unique_experts_max", "num_tokens", "nonfinite_tokens", "extra_slots",
)  # fmt: skip
PUBLISHED_AGGREGATES = (
    "avg_expert_cv", "avg_routing_entropy", "total_unused_experts",
    "avg_routing_entropy_norm", "avg_load_entropy_norm", "avg_max_over_mean",
    "max_max_over_mean", "avg_aux_loss", "avg_z_loss", "avg_top1_prob",
    "avg_utilization_rate", "avg_dropped_fraction", "avg_unique_experts_per_batch",
    "total_experts", "total_tokens", "total_nonfinite_tokens",
)  # fmt: skip


def _snap(coactivation: bool = False) -> Snapshot:
    layers = {
        f"model.layers.{i}.mlp": random_layer_stats(
            i, 8, 2, t=96, skew=3.0 * i, coactivation=coactivation
        )
        for i in range(3)
    }
    layers["model.layers.3.mlp"] = random_layer_stats(9, 8, 2, mask="none")  # no token
    return Snapshot(step=7, layers=layers)


def test_docs_tables_match_the_registry() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert R.replace_tables(text) == text, (
        "docs/metrics.md is out of date: regenerate with moescope.stats.registry.replace_tables"
    )
    for m in R.METRICS:
        assert f"| `{m.name}` |" in text
    for name in R.AGGREGATES:
        assert f"| `{name}` |" in text


# Added later (round 3: min / max / std of the load within a layer, percentiles across).
ADDED_LAYER_KEYS = ("min_over_mean",)


def test_flat_keys_and_aggregates_keep_their_published_names() -> None:
    # Published keys keep their names and order; new keys are only ever added.
    assert tuple(k for k in LAYER_SCALAR_METRICS if k not in ADDED_LAYER_KEYS) == (
        PUBLISHED_LAYER_KEYS
    )
    assert set(LAYER_SCALAR_METRICS) == set(PUBLISHED_LAYER_KEYS) | set(ADDED_LAYER_KEYS)
    assert NEURON_SCALAR_METRICS == (
        "neuron_sparsity", "activated_neurons_mean", "activated_neurons_std", "dead_neurons",
    )  # fmt: skip
    snap = _snap()
    d = snap.to_dict()
    for name in PUBLISHED_AGGREGATES:
        assert f"moe/{name}" in d
    for key in PUBLISHED_LAYER_KEYS:
        assert f"moe/model.layers.0.mlp/{key}" in d
    assert all(isinstance(v, float) for v in d.values())


def test_aggregates_against_numpy() -> None:
    snap = _snap()
    active = [s for s in snap.layers.values() if s.num_tokens > 0]
    assert len(active) == 3
    for name, (m, a) in R.AGGREGATES.items():
        if a.over == "neuron":
            continue
        pool = active if a.over == "active" else list(snap.layers.values())
        vals = np.array([float(getattr(s, m.name)) for s in pool], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        ref = {
            "mean": np.mean,
            "sum": np.sum,
            "max": np.max,
            "min": np.min,
            "p50": lambda v: np.percentile(v, 50),
            "p90": lambda v: np.percentile(v, 90),
        }[a.reduce](vals)
        got = getattr(snap, name)
        assert got == pytest.approx(float(ref), rel=1e-12), name
        assert snap.aggregates()[name] == pytest.approx(float(ref), rel=1e-12)
    assert snap.avg_expert_cv == pytest.approx(np.mean([s.cv for s in active]))
    # Within a layer: min / max / std of the per-expert load (counts / mean count).
    for s in active:
        load = s.usage_counts / s.usage_counts.mean()
        assert s.min_over_mean == pytest.approx(load.min(), rel=1e-12)
        assert s.max_over_mean == pytest.approx(load.max(), rel=1e-12)
        assert s.cv == pytest.approx(load.std(), rel=1e-12)
    assert snap.p90_max_over_mean == pytest.approx(
        np.percentile([s.max_over_mean for s in active], 90), rel=1e-12
    )
    assert snap.total_tokens == 96  # max over layers, not a sum
    assert isinstance(snap.total_unused_experts, int)
    assert isinstance(snap.total_experts, int) and snap.total_experts == 32
    assert math.isnan(Snapshot(step=0).avg_expert_cv)
    assert "avg_neuron_sparsity" not in snap.aggregates()  # no neuron statistics
    with pytest.raises(AttributeError, match="aggregates: avg_expert_cv"):
        _ = snap.avg_expert_cvv


def test_counts_are_ints_and_json_round_trips_exactly() -> None:
    snap = _snap(coactivation=True)
    s = snap.layers["model.layers.2.mlp"]
    assert type(s.unused_experts) is int and type(s.active_experts) is int
    assert type(s.unique_experts_max) is int
    assert s.usage_counts.dtype == np.int64
    assert s.unused_experts == int((s.usage_counts == 0).sum())
    empty = snap.layers["model.layers.3.mlp"]
    assert math.isnan(empty.unused_experts)  # no token: undefined, not 0
    back = Snapshot.from_json(snap.to_json())
    assert back.to_json() == snap.to_json()
    b = back.layers["model.layers.2.mlp"]
    assert type(b.unused_experts) is int and b.unused_experts == s.unused_experts
    np.testing.assert_array_equal(b.coactivation, s.coactivation)
    assert json.loads(snap.to_json())["layers"]["model.layers.3.mlp"]["unused_experts"] is None


def test_repr_is_short_and_summary_has_a_row_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _snap(coactivation=True)
    text = repr(snap)
    assert len(text) < 250, text
    assert text.startswith("Snapshot(step=7, layers=4, tokens=96")
    lay = repr(snap.layers["model.layers.0.mlp"])
    assert len(lay) < 300 and "coactivation" not in lay and lay.startswith("LayerStats(E=8")
    summ = snap.summary()
    assert [r[0] for r in summ.rows] == ["0", "1", "2", "3"]
    assert summ.header[0] == "layer" and "cv" in summ.header
    cv_col = summ.header.index("cv")
    assert float(summ.rows[1][cv_col]) == pytest.approx(snap.layers["model.layers.1.mlp"].cv, 1e-3)
    unused = summ.header.index("unused")
    assert summ.rows[2][unused] == f"{snap.layers['model.layers.2.mlp'].unused_experts}/8"
    plain = summ.plain().splitlines()
    assert len(plain) == 2 + 4  # title, header, one line per layer
    pytest.importorskip("rich")
    assert "┃" in str(summ) or "│" in str(summ)  # a rich table
    real_import = builtins.__import__

    def no_rich(name: str, *a: object, **k: object) -> object:
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    assert str(summ) == summ.plain()


def test_alert_rules_read_registry_metrics() -> None:
    names = {m.name for m in R.METRICS}
    for rule in LAYER_RULES:
        assert rule.spec.reads in names, rule.spec.name
        assert rule.spec.metric == R.metric(rule.spec.reads).text
        assert hasattr(AlertRules(), rule.spec.option)
    assert [r.spec.name for r in LAYER_RULES] == list(RULES)[: len(LAYER_RULES)]
    # A layer over the imbalance threshold fires exactly the imbalance rule's predicate.
    s = random_layer_stats(0, 8, 2, t=256, skew=40.0)
    fired = {a.rule for a in AlertRules().check(Snapshot(step=1, layers={"l": s}))}
    assert ("imbalance" in fired) == (s.max_over_mean > 4.0)
    assert ("unused_experts" in fired) == (s.unused_experts / 8 >= 0.25)


def test_metric_names_used_elsewhere_are_registered() -> None:
    from moescope.analysis.compare import BALANCE_METRICS, SERIES_METRICS

    names = {m.name for m in R.METRICS}
    assert set(BALANCE_METRICS) <= names
    assert set(SERIES_METRICS) <= set(R.AGGREGATES)
    assert {spec.reads for spec in RULES.values()} - names == {"usage_counts"}  # a vector
