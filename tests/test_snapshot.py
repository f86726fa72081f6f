"""Snapshot: flat keys, model-level aggregates, JSON round trip; UsageHistory bounds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import random_layer_stats
from moescope.stats import (
    LAYER_SCALAR_METRICS,
    LayerStats,
    Snapshot,
    UsageHistory,
    layer_stats_from_state,
)


def _layer(seed: int, e: int, k: int, t: int = 64, masked_out: bool = False) -> LayerStats:
    return random_layer_stats(
        seed, e, k, t, mask="none" if masked_out else "some", coactivation=True
    )


@pytest.fixture
def snap() -> Snapshot:
    return Snapshot(
        step=1500,
        layers={
            "model.layers.0.mlp": _layer(1, 8, 2),
            "model.layers.1.mlp": _layer(2, 16, 4),
            "model.layers.2.mlp": _layer(3, 8, 2, masked_out=True),  # no valid token
        },
        time=1.7e9,
    )


def test_to_dict_keys_and_values(snap: Snapshot) -> None:
    d = snap.to_dict()
    assert all(isinstance(v, float) for v in d.values())
    for key in ("moe/avg_expert_cv", "moe/avg_routing_entropy", "moe/total_unused_experts"):
        assert key in d
    per_layer = {k for k in d if k.count("/") >= 2}
    want = {f"moe/{n}/{m}" for n in snap.layers for m in LAYER_SCALAR_METRICS}
    assert per_layer == want
    l0, l1 = snap.layers["model.layers.0.mlp"], snap.layers["model.layers.1.mlp"]
    assert d["moe/model.layers.0.mlp/cv"] == l0.cv
    assert d["moe/model.layers.1.mlp/aux_loss"] == l1.aux_loss
    # Averages are per-layer means over layers that saw tokens (layer 2 saw none).
    assert d["moe/avg_expert_cv"] == pytest.approx((l0.cv + l1.cv) / 2, rel=1e-12)
    assert d["moe/avg_routing_entropy"] == pytest.approx(
        (l0.routing_entropy + l1.routing_entropy) / 2, rel=1e-12
    )
    assert d["moe/total_unused_experts"] == l0.unused_experts + l1.unused_experts
    assert d["moe/total_tokens"] == max(l0.num_tokens, l1.num_tokens)
    assert d["moe/total_experts"] == 32
    assert math.isnan(d["moe/model.layers.2.mlp/cv"])
    assert d["moe/model.layers.2.mlp/num_tokens"] == 0.0


def test_to_dict_prefix_and_vectors(snap: Snapshot) -> None:
    d = snap.to_dict(prefix="train/moe", vectors=True)
    assert "train/moe/avg_expert_cv" in d
    fr = [d[f"train/moe/model.layers.1.mlp/usage_fraction/{e}"] for e in range(16)]
    np.testing.assert_allclose(fr, snap.layers["model.layers.1.mlp"].usage_fraction)
    assert sum(fr) == pytest.approx(1.0)
    assert "moe/model.layers.0.mlp/usage_fraction/0" not in snap.to_dict()


def test_layer_usage_counts_are_numpy(snap: Snapshot) -> None:
    c = snap.layers["model.layers.0.mlp"].usage_counts
    assert isinstance(c, np.ndarray) and c.dtype == np.int64 and c.shape == (8,)
    assert c.sum() == snap.layers["model.layers.0.mlp"].num_tokens * 2


def test_json_round_trip(snap: Snapshot) -> None:
    text = snap.to_json()
    json.loads(text)  # strict JSON: NaN written as null
    assert "NaN" not in text
    back = Snapshot.from_json(text)
    assert back.step == snap.step and back.time == snap.time
    assert list(back.layers) == list(snap.layers)
    for name, a in snap.layers.items():
        b = back.layers[name]
        for f, va in a.__dict__.items():
            vb = getattr(b, f)
            if isinstance(va, np.ndarray):
                assert vb.dtype == va.dtype and vb.shape == va.shape, f
                np.testing.assert_array_equal(vb, va, err_msg=f)
            elif isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), f
            else:
                assert vb == va and type(vb) is type(va), f
    assert back.to_dict().keys() == snap.to_dict().keys()


def test_from_json_rejects_other_documents() -> None:
    with pytest.raises(ValueError, match="snapshot"):
        Snapshot.from_json('{"hello": 1}')


def test_all_layers_empty_gives_nan_averages() -> None:
    s = Snapshot(step=None, layers={"a": _layer(5, 4, 1, masked_out=True)})
    assert math.isnan(s.avg_expert_cv) and s.total_unused_experts == 0
    assert Snapshot(step=0).to_dict()["moe/total_tokens"] == 0.0


# --------------------------------------------------------------------------- history


def _snap_at(step: int | None, counts: list[int]) -> Snapshot:
    e = len(counts)
    state = {
        "counts": np.array(counts), "dropped_counts": np.zeros(e, dtype=np.int64),
        "aux_counts": np.zeros(e, dtype=np.int64), "prob_sum": np.zeros(e),
        "weight_sums": np.zeros(e), "n_tokens": np.array(sum(counts)),
        "n_slots": np.array(sum(counts)), "n_dropped": np.array(0),
        "extra_slots": np.array(0), "nonfinite_tokens": np.array(0),
        "n_logit_tokens": np.array(0), "n_z_tokens": np.array(0),
        "n_weight_tokens": np.array(0), "entropy_sum": np.array(0.0),
        "z_sum": np.array(0.0), "top1_sum": np.array(0.0), "margin_sum": np.array(0.0),
        "n_updates": np.array(1), "unique_sum": np.array(e), "unique_max": np.array(e),
    }  # fmt: skip
    return Snapshot(step=step, layers={"l0": layer_stats_from_state(state, e, 1)})


def test_history_stays_bounded_and_keeps_first_and_last() -> None:
    h = UsageHistory(maxlen=100)
    n = 10_000
    for step in range(n):
        h.append(_snap_at(step * 10, [step + 1, 2 * step + 1, 1]))
        steps, counts = h.as_array("l0")
        assert len(steps) <= 100
    steps, counts = h.as_array("l0")
    assert counts.shape == (len(steps), 3)
    assert steps[0] == 0 and steps[-1] == (n - 1) * 10
    assert np.all(np.diff(steps) > 0)
    # Rows are the snapshots they claim to be.
    np.testing.assert_array_equal(counts[:, 0], steps // 10 + 1)
    np.testing.assert_array_equal(counts[:, 1], 2 * (steps // 10) + 1)
    # Evenly spaced except for the tail row, covering the whole run.
    gaps = np.diff(steps[:-1])
    assert len(set(gaps.tolist())) == 1
    assert len(steps) >= 50
    s_steps, cv = h.series("l0", "cv")
    np.testing.assert_array_equal(s_steps, steps)
    want = [np.std(c) / np.mean(c) for c in counts]
    np.testing.assert_allclose(cv, want, rtol=1e-12)
    _, ent = h.series("l0", "routing_entropy")
    assert np.isnan(ent).all()  # these snapshots carried no logits


def test_history_small_and_step_none() -> None:
    h = UsageHistory(maxlen=4)
    for _ in range(3):
        h.append(_snap_at(None, [1, 2]))
    steps, counts = h.as_array("l0")
    assert steps.tolist() == [0, 1, 2]
    assert counts.tolist() == [[1, 2]] * 3
    for _ in range(20):
        h.append(_snap_at(None, [1, 2]))
    steps, _ = h.as_array("l0")
    assert len(steps) <= 4 and steps[0] == 0 and steps[-1] == 22
    with pytest.raises(KeyError, match="no history"):
        h.as_array("nope")
    with pytest.raises(KeyError, match="scalar_metrics"):
        h.series("l0", "aux_loss")
    with pytest.raises(ValueError, match="maxlen"):
        UsageHistory(maxlen=1)
