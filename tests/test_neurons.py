"""Neuron statistics math (moescope.stats.neurons) against float64 / numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moescope.stats.neurons import (
    NeuronAccumulator,
    NeuronCalibrator,
    NeuronThreshold,
    activated_mask,
    neuron_stats_from_state,
    tau_for_sparsity,
)
from moescope.stats.snapshot import LayerStats, Snapshot


def _ref_mask(h: np.ndarray, mode: str, value: float) -> np.ndarray:
    """Row-by-row float64 reference of the activation rules (plain loops)."""
    a = np.abs(h.astype(np.float64))
    out = np.zeros(a.shape, dtype=bool)
    for r in range(a.shape[0]):
        row = a[r]
        if mode == "absolute":
            out[r] = row > value
        elif mode == "magnitude":
            out[r] = row > value * row.mean()
        else:  # relative: add the largest until p of the L1 mass is reached
            order = np.argsort(-row, kind="stable")
            total, acc = row.sum(), 0.0
            for i in order:
                if acc >= value * total:
                    break
                out[r, i] = True
                acc += row[i]
    return out


def _swiglu_rows(n: int, i: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(n, i, generator=g, dtype=torch.float64)
    up = torch.randn(n, i, generator=g, dtype=torch.float64)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize(
    ("mode", "value"),
    [("absolute", 1e-6), ("absolute", 0.3), ("magnitude", 0.1), ("magnitude", 0.5),
     ("relative", 0.5), ("relative", 0.9), ("relative", 1.0)],
)  # fmt: skip
def test_activated_mask_matches_reference(mode: str, value: float) -> None:
    h = _swiglu_rows(50, 37, seed=1)
    h[3] = 0.0  # an all-zero row: nothing active in any mode
    h[4, :5] = 0.0
    got = activated_mask(h, mode, value).numpy()  # type: ignore[arg-type]
    ref = _ref_mask(h.numpy(), mode, value)
    assert np.array_equal(got, ref)
    assert not got[3].any()
    # float32 input gives the same decisions away from float32 rounding of the boundary.
    got32 = activated_mask(h.float(), mode, value).numpy()  # type: ignore[arg-type]
    assert (got32 != ref).mean() < 0.01


def test_relative_is_the_smallest_set() -> None:
    h = torch.tensor([[4.0, -3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    m = activated_mask(h, "relative", 0.7)
    # Row 0: total 10, 4 + 3 = 7 reaches 7 -> two neurons; row 1: three of four.
    assert m.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_threshold_constructors_and_errors() -> None:
    assert NeuronThreshold.absolute().for_layer("x") == ("absolute", 1e-6)
    assert NeuronThreshold.magnitude().for_layer("x") == ("magnitude", 0.1)
    t = NeuronThreshold.calibrated({"a": 0.25}, 0.5)
    assert t.for_layer("a") == ("absolute", 0.25)
    with pytest.raises(KeyError, match="calibration"):
        t.for_layer("b")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NeuronThreshold.relative(1.5)
    with pytest.raises(ValueError, match="finite"):
        NeuronThreshold.absolute(float("nan"))


def _reference_sums(
    h: np.ndarray, ids: np.ndarray, valid: np.ndarray, e: int, mask: np.ndarray, bins: int
) -> dict[str, np.ndarray]:
    i = h.shape[1]
    rows = np.zeros(e, np.int64)
    s1 = np.zeros(e, np.int64)
    s2 = np.zeros(e, np.int64)
    hist = np.zeros(bins, np.int64)
    fire = np.zeros((e, i), np.int64)
    for r in range(h.shape[0]):
        if not valid[r] or not 0 <= ids[r] < e:
            continue
        c = int(mask[r].sum())
        rows[ids[r]] += 1
        s1[ids[r]] += c
        s2[ids[r]] += c * c
        hist[min(int(c * bins / (i + 1)), bins - 1)] += 1
        fire[ids[r]] += mask[r]
    return {"neuron_rows": rows, "neuron_act_sum": s1, "neuron_act_sq": s2,
            "neuron_hist": hist, "neuron_fire": fire}  # fmt: skip


@pytest.mark.parametrize("mode", ["absolute", "magnitude", "relative"])
def test_accumulator_matches_reference_and_excludes_invalid_rows(mode: str) -> None:
    e, i, n, bins = 6, 24, 200, 10
    value = {"absolute": 0.4, "magnitude": 0.5, "relative": 0.8}[mode]
    acc = NeuronAccumulator(e, i, threshold=(mode, value), hist_bins=bins)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(3)
    hs, idss, valids = [], [], []
    for call in range(3):
        h = _swiglu_rows(n, i, seed=10 + call).float()
        ids = torch.randint(0, e + 2, (n,), generator=g)  # ids >= E: identity experts
        ids[:4] = -1
        valid = torch.rand(n, generator=g) > 0.2
        acc.update(h, ids, valid)
        hs.append(h)
        idss.append(ids)
        valids.append(valid)
    h = torch.cat(hs).numpy()
    ids = torch.cat(idss).numpy()
    valid = torch.cat(valids).numpy()
    mask = _ref_mask(h, mode, value)
    ref = _reference_sums(h, ids, valid, e, mask, bins)
    st = {k: v.numpy() for k, v in acc.state().items()}
    for k, v in ref.items():
        assert np.array_equal(st[k], v), k
    assert st["neuron_fire"].dtype == np.int32
    # Derived metrics against numpy over the valid rows.
    keep = valid & (ids >= 0) & (ids < e)
    counts = mask[keep].sum(axis=1)
    out = neuron_stats_from_state(st, e, i, hot_k=3)
    assert out["neuron_rows"] == keep.sum()
    assert math.isclose(out["activated_neurons_mean"], counts.mean(), rel_tol=1e-12)
    assert math.isclose(out["activated_neurons_std"], counts.std(), rel_tol=1e-9)
    assert math.isclose(out["neuron_sparsity"], 1 - counts.mean() / i, rel_tol=1e-12)
    for x in range(e):
        cx = mask[keep & (ids == x)].sum(axis=1)
        assert math.isclose(out["expert_activated_mean"][x], cx.mean(), rel_tol=1e-12)
        assert math.isclose(out["expert_activated_std"][x], cx.std(), rel_tol=1e-9, abs_tol=1e-9)
        fired = mask[keep & (ids == x)].sum(axis=0)
        assert out["expert_dead_neurons"][x] == (fired == 0).sum()
        top = sorted(range(i), key=lambda j: (-fired[j], j))[:3]
        assert out["hot_neurons"][x].tolist() == [j if fired[j] > 0 else -1 for j in top]
    assert out["dead_neurons"] == sum((mask[keep & (ids == x)].sum(0) == 0).sum() for x in range(e))
    # A window with no row: NaN scalars, -1 hot neurons.
    acc.reset()
    empty = neuron_stats_from_state({k: v.numpy() for k, v in acc.state().items()}, e, i)
    assert math.isnan(empty["neuron_sparsity"]) and math.isnan(empty["dead_neurons"])
    assert (empty["hot_neurons"] == -1).all()


def test_states_are_additive_and_memory_is_constant() -> None:
    e, i = 4, 16
    a = NeuronAccumulator(e, i, threshold=("absolute", 0.2))
    b = NeuronAccumulator(e, i, threshold=("absolute", 0.2))
    both = NeuronAccumulator(e, i, threshold=("absolute", 0.2))
    nbytes = both.state_nbytes()
    # Three [E+1] int64 sums, a [min(32, I+1) + 1] int64 histogram, [E+1, I] int32 counts.
    assert nbytes == 8 * 3 * (e + 1) + 8 * (min(32, i + 1) + 1) + 4 * (e + 1) * i
    for s in range(4):
        h = _swiglu_rows(30, i, seed=s).float()
        ids = torch.randint(0, e, (30,), generator=torch.Generator().manual_seed(s))
        (a if s % 2 else b).update(h, ids)
        both.update(h, ids)
    assert both.state_nbytes() == nbytes
    sa, sb, sboth = a.state(), b.state(), both.state()
    for k in sboth:
        assert torch.equal(sa[k] + sb[k], sboth[k]), k


def test_per_neuron_off_keeps_only_expert_sums() -> None:
    acc = NeuronAccumulator(3, 8, per_neuron=False)
    acc.update(_swiglu_rows(5, 8, 0).float(), torch.tensor([0, 1, 2, 0, 1]))
    st = acc.state()
    assert "neuron_fire" not in st
    out = neuron_stats_from_state({k: v.numpy() for k, v in st.items()}, 3, 8)
    assert out["firing_counts"] is None and math.isnan(out["dead_neurons"])
    assert out["neuron_rows"] == 5


def test_update_rejects_wrong_shapes() -> None:
    acc = NeuronAccumulator(2, 8)
    with pytest.raises(ValueError, match="I=8"):
        acc.update(torch.zeros(3, 7), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="N=3"):
        acc.update(torch.zeros(3, 8), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("target", [0.1, 0.5, 0.9])
def test_calibrated_tau_hits_the_target_sparsity(target: float) -> None:
    h = _swiglu_rows(400, 64, seed=7).float() * 0.03
    valid = torch.ones(400, dtype=torch.bool)
    valid[:50] = False
    h[:50] = 100.0  # invalid rows must not move the quantile
    cal = NeuronCalibrator()
    cal.update(h[:200], valid[:200])
    cal.update(h[200:], valid[200:])
    assert int(cal.hist.sum()) == 350 * 64
    tau = tau_for_sparsity(cal.hist.numpy(), target, cal.log10_min, cal.log10_max)
    a = h[50:].abs().double().numpy().ravel()
    exact = np.quantile(a, target)
    # One log bin is a factor 10**0.01 (2.3 %).
    assert abs(math.log10(tau) - math.log10(exact)) <= 0.01
    assert abs((a <= tau).mean() - target) < 0.01
    assert math.isnan(tau_for_sparsity(np.zeros(10), 0.5, -8, 4))


def test_layerstats_neuron_fields_roundtrip_json_and_to_dict() -> None:
    e, i = 3, 8
    acc = NeuronAccumulator(e, i, threshold=("absolute", 0.3), hist_bins=4)
    acc.update(_swiglu_rows(20, i, 2).float(), torch.tensor([0, 1] * 10))
    fields = neuron_stats_from_state({k: v.numpy() for k, v in acc.state().items()}, e, i)
    base = LayerStats(
        num_experts=e, top_k=1, num_tokens=20, nonfinite_tokens=0,
        usage_counts=np.array([10, 10, 0]), usage_fraction=np.array([0.5, 0.5, 0.0]),
        cv=0.5, max_over_mean=1.5, unused_experts=1.0, active_experts=2.0,
        utilization_rate=2 / 3, routing_entropy=math.nan, routing_entropy_norm=math.nan,
        load_entropy_norm=0.6, aux_loss=math.nan, z_loss=math.nan, top1_prob=math.nan,
        top1_margin=math.nan, weight_sums=np.zeros(3), dropped_fraction=0.0,
        unique_experts_per_batch=2.0, unique_experts_max=2.0,
    )  # fmt: skip
    plain = Snapshot(step=0, layers={"l0": base})
    assert not any("neuron" in k for k in plain.to_dict())
    st = LayerStats(**{**base.__dict__, **fields, "neuron_threshold": "absolute(tau=0.3)"})
    snap = Snapshot(step=1, layers={"l0": st})
    d = snap.to_dict()
    assert d["moe/l0/neuron_sparsity"] == st.neuron_sparsity
    assert d["moe/l0/activated_neurons_mean"] == st.activated_neurons_mean
    assert d["moe/l0/dead_neurons"] == st.dead_neurons
    assert d["moe/avg_neuron_sparsity"] == st.neuron_sparsity
    freq = st.firing_frequency
    assert freq is not None and np.isnan(freq[2]).all()
    assert np.allclose(freq[:2], st.firing_counts[:2] / 10)
    assert st.dead_mask is not None and not st.dead_mask[2].any()
    # firing_counts only on request; everything else survives the round trip.
    back = Snapshot.from_json(snap.to_json()).layers["l0"]
    assert back.firing_counts is None
    back_f = Snapshot.from_json(snap.to_json(firing=True)).layers["l0"]
    assert np.array_equal(back_f.firing_counts, st.firing_counts)
    for k in ("expert_activated_mean", "expert_sparsity", "expert_dead_neurons"):
        assert np.array_equal(getattr(back, k), getattr(st, k), equal_nan=True), k
    for k in ("activated_hist", "hot_neurons", "expert_rows"):
        assert np.array_equal(getattr(back, k), getattr(st, k)), k
    assert back.neuron_rows == 20 and back.neuron_threshold == "absolute(tau=0.3)"
    assert back.neuron_sparsity == st.neuron_sparsity
    assert Snapshot.from_json(plain.to_json()).layers["l0"].neuron_rows is None


def test_neuron_options_defaults_normalisation_and_errors() -> None:
    from dataclasses import FrozenInstanceError

    from moescope.stats.neurons import NeuronOptions

    d = NeuronOptions()
    assert d.threshold == NeuronThreshold.magnitude(0.1)
    assert (d.hist_bins, d.per_neuron, d.hot_neurons) == (32, True, 8)
    assert NeuronOptions(threshold=1e-6).threshold == NeuronThreshold.absolute(1e-6)
    rel = NeuronThreshold.relative(0.9)
    assert NeuronOptions(threshold=rel).threshold is rel
    assert NeuronOptions(hot_neurons=0).hot_neurons == 0
    with pytest.raises(FrozenInstanceError):
        d.hist_bins = 4  # type: ignore[misc]
    for bad in ({"hist_bins": 0}, {"hist_bins": 2.5}, {"hot_neurons": -1}, {"hot_neurons": True}):
        with pytest.raises(ValueError, match=f"NeuronOptions.{next(iter(bad))}"):
            NeuronOptions(**bad)
    with pytest.raises(TypeError, match="per_neuron"):
        NeuronOptions(per_neuron="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NeuronThreshold"):
        NeuronOptions(threshold="magnitude")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        NeuronOptions(threshold=-1.0)
