"""Alert rules: exact console lines (seed 001 format), thresholds, callback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moescope.alerts import Alert, AlertRules, format_alert, print_alert
from moescope.capture.record import RoutingRecord
from moescope.stats import LayerAccumulator, Snapshot, layer_stats_from_state, states_to_numpy


def _stats(
    counts: list[int],
    k: int = 1,
    entropy: float | None = None,
    dropped: int = 0,
    nonfinite: int = 0,
):
    """LayerStats for a window with the given usage (built through layer_stats_from_state)."""
    e = len(counts)
    n_tok = sum(counts) // k
    state = {
        "counts": np.array(counts, dtype=np.int64), "dropped_counts": np.zeros(e, np.int64),
        "aux_counts": np.zeros(e, np.int64), "prob_sum": np.zeros(e),
        "weight_sums": np.zeros(e), "n_tokens": np.array(n_tok),
        "n_slots": np.array(n_tok * k + dropped), "n_dropped": np.array(dropped),
        "extra_slots": np.array(0), "nonfinite_tokens": np.array(nonfinite),
        "n_logit_tokens": np.array(n_tok if entropy is not None else 0),
        "n_z_tokens": np.array(0), "n_weight_tokens": np.array(0),
        "entropy_sum": np.array((entropy or 0.0) * n_tok), "z_sum": np.array(0.0),
        "top1_sum": np.array(0.0), "margin_sum": np.array(0.0),
        "n_updates": np.array(1), "unique_sum": np.array(1), "unique_max": np.array(1),
    }  # fmt: skip
    return layer_stats_from_state(state, e, k)


# 25 experts, mean load 25, one expert at 113: max / mean = 4.52 exactly.
IMBALANCED = [113] + [22] * 8 + [21] * 16


def test_seed_lines_exactly() -> None:
    rules = AlertRules()
    s1 = Snapshot(step=1500, layers={"model.layers.0.mlp": _stats(IMBALANCED)})
    lines = [format_alert(a) for a in rules.check(s1)]
    assert lines == ["⚠️  MoE Alert at step 1500: model.layers.0.mlp: Severe expert imbalance (ratio: 4.52)"]

    s2 = Snapshot(step=2300, layers={"layers.4.mlp": _stats([10, 10, 10, 10, 10, 0, 0, 0])})
    lines = [format_alert(a) for a in rules.check(s2)]
    assert lines == ["⚠️  MoE Alert at step 2300: layers.4.mlp: 3/8 experts unused"]


def test_alert_fields() -> None:
    (a,) = AlertRules().check(Snapshot(step=7, layers={"l": _stats(IMBALANCED)}))
    assert a == Alert(level="warning", layer="l", rule="imbalance", value=pytest.approx(4.52),
                      step=7, message="Severe expert imbalance (ratio: 4.52)")


def test_thresholds_edges() -> None:
    rules = AlertRules()
    # max / mean exactly 4.0 is not "above 4x"; 2/8 unused is exactly 25 % and fires.
    s = Snapshot(step=1, layers={"a": _stats([8, 0, 1, 1, 1, 1, 1, 3]),  # ratio 4.0
                                 "b": _stats([3, 3, 3, 3, 3, 3, 0, 0])})  # 2/8 unused
    rules_fired = {(a.layer, a.rule) for a in rules.check(s)}
    assert ("a", "imbalance") not in rules_fired
    assert ("b", "unused_experts") in rules_fired
    assert ("a", "unused_experts") not in rules_fired  # 1/8 < 25 %
    s = Snapshot(step=1, layers={"a": _stats([9, 0, 1, 1, 1, 1, 1, 2])})  # ratio 4.5
    assert [a.rule for a in rules.check(s)] == ["imbalance"]


def test_entropy_nonfinite_dropped_rules_and_formats() -> None:
    rules = AlertRules()
    snap = Snapshot(
        step=None,
        layers={
            "low": _stats([5, 5, 5, 5], entropy=0.05),
            "ok": _stats([5, 5, 5, 5], entropy=1.2),
            "nan": _stats([5, 5, 5, 5], entropy=1.2, nonfinite=12),
            "drop": _stats([5, 5, 5, 5], k=1, dropped=5),  # 5 / 25 = 20 % dropped
        },
    )
    lines = [format_alert(a) for a in rules.check(snap)]
    assert lines == [
        "⚠️  MoE Alert: low: Routing entropy collapse (entropy: 0.0500)",
        "⚠️  MoE Alert: nan: 12 tokens with non-finite router scores (excluded from metrics)",
        "⚠️  MoE Alert: drop: High dropped-slot fraction (dropped: 20.0%)",
    ]
    levels = {a.rule: a.level for a in rules.check(snap)}
    assert levels["nonfinite_scores"] == "critical"
    assert levels["entropy_collapse"] == "warning"


def test_disabled_rules_min_tokens_and_empty_layers() -> None:
    snap = Snapshot(step=3, layers={"l": _stats(IMBALANCED), "m": _stats([0, 0, 0, 0])})
    assert math.isnan(snap.layers["m"].unused_experts)  # no token: never "4/4 unused"
    assert AlertRules(imbalance_threshold=None).check(snap) == []
    assert AlertRules(min_tokens=10_000).check(snap) == []
    assert [a.layer for a in AlertRules().check(snap)] == ["l"]


def test_callback_receives_alerts_and_can_stop_training() -> None:
    seen: list[Alert] = []
    snap = Snapshot(step=9, layers={"l": _stats(IMBALANCED)})
    AlertRules(on_alert=seen.append).check(snap)
    assert [a.rule for a in seen] == ["imbalance"]

    class StopTraining(RuntimeError):
        pass

    def stop(alert: Alert) -> None:
        raise StopTraining(format_alert(alert))

    with pytest.raises(StopTraining, match=r"ratio: 4\.52"):
        AlertRules(on_alert=stop).check(snap)


def test_print_alert(capsys: pytest.CaptureFixture[str]) -> None:
    AlertRules(on_alert=print_alert).check(Snapshot(step=2300, layers={
        "layers.4.mlp": _stats([10, 10, 10, 10, 10, 0, 0, 0])}))
    assert capsys.readouterr().out == "⚠️  MoE Alert at step 2300: layers.4.mlp: 3/8 experts unused\n"


def test_collapsed_router_end_to_end() -> None:
    # A router that sends every token to expert 0 with near-certainty: imbalance,
    # unused experts and entropy collapse all fire from real records.
    t, e = 256, 8
    logits = torch.full((t, e), -20.0)
    logits[:, 0] = 20.0
    logits[5] = float("nan")
    idx = torch.zeros(t, 1, dtype=torch.long)
    acc = LayerAccumulator(e, 1)
    acc.update(RoutingRecord(layer="model.layers.3.mlp", num_experts=e, topk_index=idx,
                             logits=logits))
    stats = layer_stats_from_state(states_to_numpy({"x": acc.state()})["x"], e, 1)
    lines = [format_alert(a) for a in AlertRules().check(Snapshot(step=100, layers={
        "model.layers.3.mlp": stats}))]
    assert lines == [
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: 1 tokens with non-finite router scores (excluded from metrics)",
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: Severe expert imbalance (ratio: 8.00)",
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: 7/8 experts unused",
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: Routing entropy collapse (entropy: 0.0000)",
    ]
