"""Alert rules: exact console lines (seed 001 format), thresholds, remediation, trend rules,
grouping across windows, callback."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from moescope.alerts import (
    RULES,
    Alert,
    AlertRules,
    AlertTracker,
    format_alert,
    format_update,
    print_alert,
)
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
    assert lines == [
        "⚠️  MoE Alert at step 1500: model.layers.0.mlp: Severe expert imbalance (ratio: 4.52)"
    ]

    s2 = Snapshot(step=2300, layers={"layers.4.mlp": _stats([10, 10, 10, 10, 10, 0, 0, 0])})
    lines = [format_alert(a) for a in rules.check(s2)]
    assert lines == ["⚠️  MoE Alert at step 2300: layers.4.mlp: 3/8 experts unused"]


def test_alert_fields() -> None:
    (a,) = AlertRules().check(Snapshot(step=7, layers={"l": _stats(IMBALANCED)}))
    assert a == Alert(
        level="warning",
        layer="l",
        rule="imbalance",
        value=pytest.approx(4.52),
        step=7,
        message="Severe expert imbalance (ratio: 4.52)",
        threshold=4.0,
        detail="max/mean load 4.52 > 4.0 threshold",
    )
    assert a.remediation == RULES["imbalance"].remediation
    assert "aux" in a.remediation and "router learning rate" in a.remediation


def test_every_rule_states_metric_threshold_and_remediation() -> None:
    snap = Snapshot(
        step=5,
        layers={
            "imb": _stats(IMBALANCED),
            "unused": _stats([10, 10, 10, 10, 10, 0, 0, 0]),
            "low": _stats([5, 5, 5, 5], entropy=0.05),
            "nan": _stats([5, 5, 5, 5], entropy=1.2, nonfinite=12),
            "drop": _stats([5, 5, 5, 5], k=1, dropped=5),
        },
    )
    got = {a.rule: a for a in AlertRules().check(snap)}
    assert {r: a.detail for r, a in got.items()} == {
        "imbalance": "max/mean load 4.52 > 4.0 threshold",
        "unused_experts": "unused experts 3/8 = 38% >= 25% threshold",
        "entropy_collapse": "routing entropy 0.0500 nats < 0.1 threshold",
        "nonfinite_scores": "12 router rows with NaN/inf scores > 0 allowed",
        "dropped_fraction": "dropped slots 20.0% > 10.0% threshold",
    }
    assert {r: a.threshold for r, a in got.items()} == {
        "imbalance": 4.0,
        "unused_experts": 0.25,
        "entropy_collapse": 0.1,
        "nonfinite_scores": 0.0,
        "dropped_fraction": 0.1,
    }
    for spec in RULES.values():
        assert spec.remediation and spec.metric
        assert hasattr(AlertRules(), spec.option)  # the threshold is configurable there


def test_thresholds_edges() -> None:
    rules = AlertRules()
    # max / mean exactly 4.0 is not "above 4x"; 2/8 unused is exactly 25 % and fires.
    s = Snapshot(
        step=1,
        layers={
            "a": _stats([8, 0, 1, 1, 1, 1, 1, 3]),  # ratio 4.0
            "b": _stats([3, 3, 3, 3, 3, 3, 0, 0]),
        },
    )  # 2/8 unused
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
    AlertRules(on_alert=print_alert).check(
        Snapshot(step=2300, layers={"layers.4.mlp": _stats([10, 10, 10, 10, 10, 0, 0, 0])})
    )
    assert (
        capsys.readouterr().out == "⚠️  MoE Alert at step 2300: layers.4.mlp: 3/8 experts unused\n"
    )


def test_collapsed_router_end_to_end() -> None:
    # A router that sends every token to expert 0 with near-certainty: imbalance,
    # unused experts and entropy collapse all fire from real records.
    t, e = 256, 8
    logits = torch.full((t, e), -20.0)
    logits[:, 0] = 20.0
    logits[5] = float("nan")
    idx = torch.zeros(t, 1, dtype=torch.long)
    acc = LayerAccumulator(e, 1)
    acc.update(
        RoutingRecord(layer="model.layers.3.mlp", num_experts=e, topk_index=idx, logits=logits)
    )
    stats = layer_stats_from_state(states_to_numpy({"x": acc.state()})["x"], e, 1)
    lines = [
        format_alert(a)
        for a in AlertRules().check(Snapshot(step=100, layers={"model.layers.3.mlp": stats}))
    ]
    assert lines == [
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: 1 tokens with non-finite router scores (excluded from metrics)",
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: Severe expert imbalance (ratio: 8.00)",
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: 7/8 experts unused",
        "⚠️  MoE Alert at step 100: model.layers.3.mlp: Routing entropy collapse (entropy: 0.0000)",
    ]


# ------------------------------------------------------------------ trend rules


def _entropy_window(h_norm: float, e: int = 8) -> Snapshot:
    """One layer whose routing entropy is ``h_norm`` x log E (balanced usage)."""
    return Snapshot(step=None, layers={"l": _stats([10] * e, entropy=h_norm * math.log(e))})


def test_entropy_falling_for_n_windows() -> None:
    rules = AlertRules(entropy_falling_windows=3, entropy_falling_min_drop=0.05)
    # 0.90 -> 0.88 -> 0.86 -> 0.84: falling 3 windows in a row by 0.06 in total.
    fired = [
        [a for a in rules.check(_entropy_window(h)) if a.rule == "entropy_falling"]
        for h in (0.90, 0.88, 0.86, 0.84)
    ]
    assert [len(f) for f in fired] == [0, 0, 0, 1]
    (a,) = fired[3]
    assert a.value == pytest.approx(0.06) and a.threshold == 0.05
    assert a.message == "Routing entropy falling for 3 windows (normalised: 0.900 -> 0.840)"
    assert a.detail == "normalised routing entropy fell 0.060 over 3 windows >= 0.05 threshold"
    # One window going up breaks the run; a small total drop does not fire either.
    assert not [a for a in rules.check(_entropy_window(0.85)) if a.rule == "entropy_falling"]
    slow = AlertRules(entropy_falling_windows=3, entropy_falling_min_drop=0.05)
    for h in (0.90, 0.89, 0.88, 0.87):
        assert not [a for a in slow.check(_entropy_window(h)) if a.rule == "entropy_falling"]
    assert AlertRules(entropy_falling_windows=None).entropy_falling_windows is None


def test_cold_experts_for_n_windows() -> None:
    rules = AlertRules(cold_expert_load=0.1, cold_expert_windows=3, unused_fraction_threshold=None)
    # Expert 7 below 0.1 x mean in every window, expert 6 from window 2 on; expert 5 at
    # 2 in windows 2-3 stays above 0.1 x mean (12.9 -> 1.29).
    windows = [
        [20, 20, 20, 20, 20, 20, 20, 1],
        [20, 20, 20, 20, 20, 2, 0, 1],
        [20, 20, 20, 20, 20, 2, 0, 1],
        [20, 20, 20, 20, 20, 20, 0, 1],
    ]
    # Reference streaks, plain Python.
    streak = [0] * 8
    ref = []
    for counts in windows:
        mean = sum(counts) / 8
        streak = [s + 1 if c < 0.1 * mean else 0 for s, c in zip(streak, counts, strict=True)]
        ref.append([e for e in range(8) if streak[e] >= 3])
    assert ref == [[], [], [7], [6, 7]]
    fired = []
    for counts in windows:
        fired.append(
            [
                a
                for a in rules.check(Snapshot(step=None, layers={"l": _stats(counts)}))
                if a.rule == "cold_experts"
            ]
        )
    assert [len(f) for f in fired] == [0, 0, 1, 1]
    assert fired[2][0].message == "1/8 experts cold for 3 windows"
    assert fired[2][0].detail == "experts 7 below 0.1 x mean load in each of the last 3 windows"
    assert fired[3][0].detail.startswith("experts 6, 7 below")
    rules.reset_trends()
    assert not [
        a
        for a in rules.check(Snapshot(step=None, layers={"l": _stats(windows[3])}))
        if a.rule == "cold_experts"
    ]


def test_trend_settings_are_validated_and_copies_start_fresh() -> None:
    with pytest.raises(ValueError, match="cold_expert_windows must be an int >= 1"):
        AlertRules(cold_expert_windows=0)
    with pytest.raises(ValueError, match=r"cold_expert_load must be in \(0, 1\)"):
        AlertRules(cold_expert_load=2.0)
    rules = AlertRules(entropy_falling_windows=1, entropy_falling_min_drop=0.0)
    rules.check(_entropy_window(0.9))
    twin = copy.copy(rules)
    assert twin.entropy_falling_windows == 1
    # The original has one window of history, the copy none.
    assert [a.rule for a in rules.check(_entropy_window(0.8))] == ["entropy_falling"]
    assert twin.check(_entropy_window(0.8)) == []


# ------------------------------------------------------------------ grouping


def _imb(step: int, layer: str = "l") -> Alert:
    return Alert(
        "warning",
        layer,
        "imbalance",
        4.5,
        step,
        "Severe expert imbalance (ratio: 4.50)",
        4.0,
        "max/mean load 4.50 > 4.0 threshold",
    )


def test_tracker_groups_repeats_resolves_and_reminds() -> None:
    tr = AlertTracker(resolve_after=1, remind_every=2)
    u = tr.update([_imb(150), _imb(150, "m")], 150)
    assert [a.layer for a in u.new] == ["l", "m"] and not u.ongoing and not u.remind
    u = tr.update([_imb(175)], 175)  # l still firing, m quiet once -> resolved
    assert not u.new and [s.layer for s in u.ongoing] == ["l"]
    assert [(s.layer, s.since) for s in u.resolved] == [("m", 150)]
    assert u.remind is False
    u = tr.update([_imb(200)], 200)  # the second window in which l kept firing: reminder
    assert u.remind and u.ongoing[0].since == 150 and u.ongoing[0].windows == 3
    lines = format_update(u, set())
    assert lines == ["    MoE alerts still firing at step 200: imbalance on l since step 150"]
    assert tr.update([_imb(225)], 225).remind is False  # counted again from there
    assert [s.layer for s in tr.active] == ["l"]


def test_format_update_shows_fix_once_per_rule() -> None:
    hinted: set[str] = set()
    tr = AlertTracker()
    first = format_update(tr.update([_imb(10)], 10), hinted)
    assert first == [
        "⚠️  MoE Alert at step 10: l: Severe expert imbalance (ratio: 4.50)",
        "    max/mean load 4.50 > 4.0 threshold",
        f"    fix: {RULES['imbalance'].remediation}",
    ]
    again = format_update(tr.update([_imb(20), _imb(20, "m")], 20), hinted)
    assert again == [
        "⚠️  MoE Alert at step 20: m: Severe expert imbalance (ratio: 4.50)",
        "    max/mean load 4.50 > 4.0 threshold",
    ]


def test_seed_lines_survive_grouping() -> None:
    """The two seed lines are printed byte-exact by the grouped console path."""
    rules = AlertRules()
    tr = AlertTracker()
    s1 = Snapshot(step=1500, layers={"model.layers.0.mlp": _stats(IMBALANCED)})
    s2 = Snapshot(step=2300, layers={"layers.4.mlp": _stats([10, 10, 10, 10, 10, 0, 0, 0])})
    out = format_update(tr.update(rules.check(s1), 1500), set())
    out += format_update(tr.update(rules.check(s2), 2300), set())
    assert [ln for ln in out if not ln.startswith(" ")] == [
        "⚠️  MoE Alert at step 1500: model.layers.0.mlp: Severe expert imbalance (ratio: 4.52)",
        "⚠️  MoE Alert at step 2300: layers.4.mlp: 3/8 experts unused",
    ]


def test_many_layers_of_one_rule_print_the_worst_then_one_line() -> None:
    """At scale (61 layers) a collapsing model prints the 3 worst layers per rule in
    full, then one line; the entropy rule's worst is its LOWEST value."""
    imb = [
        Alert("warning", f"layers.{i}.mlp", "imbalance", 4.0 + i, 5, f"ratio {4.0 + i}", 4.0)
        for i in range(10)
    ]
    ent = [
        Alert("warning", f"layers.{i}.mlp", "entropy_collapse", 0.05 - i / 100, 5, "low", 0.1)
        for i in range(5)
    ]
    lines = format_update(AlertTracker().update(imb + ent, 5), None)
    heads = [ln for ln in lines if not ln.startswith(" ")]
    assert [h.split(": ")[1] for h in heads] == [
        "layers.9.mlp", "layers.8.mlp", "layers.7.mlp",  # highest max/mean first
        "layers.4.mlp", "layers.3.mlp", "layers.2.mlp",  # lowest entropy first
    ]  # fmt: skip
    more = [ln for ln in lines if "more layers" in ln]
    assert more == [
        "    ... and 7 more layers: imbalance (mildest 4.00: layers.0.mlp)",
        "    ... and 2 more layers: entropy_collapse (mildest 0.05: layers.0.mlp)",
    ]
    # At most max_per_rule per rule: nothing is grouped.
    few = format_update(AlertTracker().update(imb[:3], 5), None)
    assert not any("more layers" in ln for ln in few)
