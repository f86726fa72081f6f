"""MoEMonitor: no effect on the model, clean detach, one host transfer, windows, errors,
and the all-reduce across ranks."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from moescope import MoEMonitor, UnsupportedModelError
from moescope.alerts import AlertRules
from moescope.nn import GroupedExperts, MoELayer, TopKRouter
from moescope.stats.snapshot import Snapshot

transformers = pytest.importorskip("transformers")

from hf_tiny import FAMILIES, build_tiny, experts_modules, padded_batch  # noqa: E402

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _hooks(model: nn.Module) -> dict[str, list[tuple[str, tuple]]]:
    return {
        name: [(d, tuple(getattr(m, d).keys())) for d in _HOOK_DICTS]
        for name, m in model.named_modules()
    }


def _train_step(family: str, monitor: bool, seed: int = 0) -> tuple:
    model, _ = build_tiny(family)
    model.train()
    ids, mask = padded_batch(batch=2, seq=6, seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    mon = MoEMonitor(model) if monitor else None
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    rng = torch.get_rng_state()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if mon is not None:
        mon.snapshot()
        mon.detach()
    return out.logits.detach(), out.loss.detach(), grads, rng


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_grads_and_rng_bit_identical(family: str) -> None:
    logits0, loss0, grads0, rng0 = _train_step(family, monitor=False)
    logits1, loss1, grads1, rng1 = _train_step(family, monitor=True)
    assert torch.equal(logits0, logits1)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    assert torch.equal(rng0, rng1)


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_leaves_no_hook_behind(family: str) -> None:
    model, _ = build_tiny(family)
    before = _hooks(model)
    mon = MoEMonitor(model)
    assert _hooks(model) != before  # hooks were really installed
    mon.detach()
    assert _hooks(model) == before
    mon.detach()  # idempotent
    with mon:
        assert mon.attached and _hooks(model) != before
    assert not mon.attached and _hooks(model) == before
    # Detached: forwards are no longer counted.
    ids, mask = padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert all(st.num_tokens == 0 for st in mon.snapshot().layers.values())


def test_unsupported_model_error() -> None:
    dense = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError) as err:
        MoEMonitor(dense)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "Sequential" in msg and "MoEAdapter" in msg and "docs/custom_adapter.md" in msg
    with pytest.raises(TypeError, match=r"nn\.Module"):
        MoEMonitor("not a model")  # type: ignore[arg-type]


@pytest.mark.parametrize("neurons", [False, True])
def test_snapshot_is_one_host_transfer(monkeypatch: pytest.MonkeyPatch, neurons: bool) -> None:
    # With neurons on, the neuron state rides in the same packed transfer.
    model, _ = build_tiny("olmoe")
    mon = MoEMonitor(model, neurons=neurons)
    ids, mask = padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        calls.append(self.shape)
        return real_cpu(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host sync"))
    snap = mon.snapshot()
    monkeypatch.undo()
    assert len(calls) == 1
    # The byte-packed transfer restores dtypes and shapes exactly.
    st = snap.layers["model.layers.0.mlp"]
    assert st.usage_counts.dtype == np.int64 and st.coactivation.shape == (8, 8)
    assert np.array_equal(np.diag(st.coactivation), st.usage_counts)
    if neurons:
        assert st.firing_counts.shape == (8, 64) and st.firing_counts.sum() > 0
        assert st.neuron_rows == st.usage_counts.sum()
    else:
        assert st.firing_counts is None


def test_windows_reset_history_and_alerts() -> None:
    model, _ = build_tiny("mixtral")
    fired = []
    mon = MoEMonitor(
        model, history=10, alert_rules=AlertRules(imbalance_threshold=1.0, on_alert=fired.append)
    )
    ids, mask = padded_batch(batch=2, seq=6, seed=7)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    two = mon.snapshot(reset=False, step=10)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    three = mon.snapshot(reset=True, step=11)
    empty = mon.snapshot(step=12)
    for path, st in two.layers.items():
        assert three.layers[path].usage_counts.tolist() == (st.usage_counts * 3 // 2).tolist()
        assert st.num_updates == 2 and three.layers[path].num_updates == 3
        assert empty.layers[path].num_tokens == 0
        assert math.isnan(empty.layers[path].routing_entropy)
    steps, _ = mon.history.as_array("model.layers.0.mlp")
    assert list(steps) == [10, 11, 12]
    assert {a.step for a in fired} == {10, 11}  # the empty window alerts on nothing
    assert any(a.rule == "imbalance" for a in fired) and mon.last_alerts == []
    assert Snapshot.from_json(three.to_json()).layers.keys() == three.layers.keys()
    mon.detach()


def test_nan_router_scores_do_not_crash() -> None:
    torch.manual_seed(0)
    layer = MoELayer(TopKRouter(8, 4, 2), GroupedExperts(4, 8, 8))
    x = torch.randn(6, 8)
    x[2] = float("nan")
    with MoEMonitor(layer, alert_rules=AlertRules()) as mon:
        layer(x)
    snap = mon.snapshot()
    st = next(iter(snap.layers.values()))
    assert st.nonfinite_tokens == 1 and st.num_tokens == 5
    assert math.isfinite(st.routing_entropy)
    assert any(a.rule == "nonfinite_scores" for a in mon.last_alerts)


def test_lazy_sums_follow_record_device() -> None:
    model, _ = build_tiny("granitemoe")
    mon = MoEMonitor(model)
    assert mon.windows == ["default"]  # allocated up front, on the layers' device
    with torch.no_grad():
        model(input_ids=padded_batch()[0])
    mon.pipeline.flush()
    routing = mon.core.window("default").routing
    assert {key[2].type for key in routing.groups} == {"cpu"}
    assert len(routing.group_of) == len(experts_modules(model))
    mon.detach()


# --------------------------------------------------------------------------- distributed


def _tiny_lm() -> nn.Module:
    from moescope.nn.model import TinyMoEConfig, TinyMoELM

    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=32,
        num_experts=8,
        top_k=2,
    )
    return TinyMoELM(cfg).eval()


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = padded_batch(batch=2 + rank, seq=6 - rank, seed=100 + rank)
    return ids % 64, mask  # each rank: a different batch, of a different shape


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _tiny_lm()
        mon = MoEMonitor(model)
        ids, mask = _rank_batch(rank)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        snap = mon.snapshot(step=1)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            f.write(snap.to_json())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_gloo_snapshot_equals_single_process() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        with open(os.path.join(tmp, "rank0.json")) as f:
            dist_snap = Snapshot.from_json(f.read())
        with open(os.path.join(tmp, "rank1.json")) as f:
            rank1 = Snapshot.from_json(f.read())
    torch.set_num_threads(1)  # as the workers, so float32 matmuls round alike
    model = _tiny_lm()
    mon = MoEMonitor(model)
    for rank in range(2):
        ids, mask = _rank_batch(rank)
        with torch.no_grad():
            model(ids, attention_mask=mask)
    ref = mon.snapshot(step=1)
    assert ref.layers.keys() == dist_snap.layers.keys()
    for path, st in ref.layers.items():
        d = dist_snap.layers[path]
        assert d.usage_counts.tolist() == st.usage_counts.tolist()
        assert np.array_equal(d.coactivation, st.coactivation)
        assert d.num_tokens == st.num_tokens and d.num_updates == st.num_updates == 2
        assert d.unique_experts_max == st.unique_experts_max
        # Per-token values are float32; sums are float64 (same order: rank0 + rank1).
        for m in ("routing_entropy", "z_loss", "aux_loss", "cv", "top1_prob"):
            assert getattr(d, m) == pytest.approx(getattr(st, m), rel=1e-6), m
        assert rank1.layers[path].usage_counts.tolist() == st.usage_counts.tolist()


def test_neuron_options_reach_the_statistics() -> None:
    """NeuronOptions' four settings change what a real snapshot holds, checked against the
    same window counted with other settings and a numpy ranking of its firing counts."""
    from moescope import NeuronOptions, NeuronThreshold

    model, _ = build_tiny("olmoe")
    ids, mask = padded_batch()
    tau = NeuronThreshold.absolute(0.05)
    full = MoEMonitor(model, neurons=NeuronOptions(threshold=tau, hist_bins=4, hot_neurons=3))
    lean = MoEMonitor(model, neurons=NeuronOptions(threshold=0.05, per_neuron=False))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    a = full.snapshot().layers["model.layers.0.mlp"]
    b = lean.snapshot().layers["model.layers.0.mlp"]
    full.detach()
    lean.detach()
    # A float threshold is absolute(tau): both monitors counted the very same neurons.
    assert a.neuron_threshold == b.neuron_threshold == "absolute(tau=0.05)"
    assert a.neuron_rows == b.neuron_rows > 0
    assert a.activated_neurons_mean == b.activated_neurons_mean
    # hist_bins=4: four bins holding every row; lean keeps the default 32 (capped at I + 1).
    assert a.activated_hist.shape == (4,) and int(a.activated_hist.sum()) == a.neuron_rows
    assert b.activated_hist.shape == (min(32, a.intermediate_size + 1),)
    # hot_neurons=3: the 3 most-firing neuron ids per expert (ties: lower id first).
    fire = np.asarray(a.firing_counts)
    ref = np.argsort(-fire, axis=1, kind="stable")[:, :3]
    ref = np.where(np.take_along_axis(fire, ref, axis=1) > 0, ref, -1)
    assert a.hot_neurons.shape == (fire.shape[0], 3)
    assert np.array_equal(a.hot_neurons, ref)
    # per_neuron=False: no [E, I] counts, so no dead / hot neurons either.
    assert b.firing_counts is None and b.hot_neurons is None


def test_unknown_arguments_name_the_closest_and_the_known_ones() -> None:
    from moescope import NeuronOptions

    model, _ = build_tiny("olmoe")
    with pytest.raises(TypeError, match=r"'nuerons' \(did you mean 'neurons'\?\)"):
        MoEMonitor(model, nuerons=True)
    with pytest.raises(TypeError, match=r"'per_neuron'.*it takes model, adapters.*graph_safe"):
        MoEMonitor(model, per_neuron=False)
    with pytest.raises(TypeError, match="NeuronOptions"):
        MoEMonitor(model, neurons="yes")  # type: ignore[arg-type]
    mon = MoEMonitor(model, neurons=True, attach=False)
    assert mon.neuron_options == NeuronOptions()
    assert MoEMonitor(model, attach=False).neuron_options is None


def test_mistyped_keyword_and_unknown_window_get_a_suggestion() -> None:
    model, _ = build_tiny("mixtral")
    with pytest.raises(TypeError, match=r"'neuron' \(did you mean 'neurons'\?\)"):
        MoEMonitor(model, neuron=True)
    mon = MoEMonitor(model, split_by_mode=True)
    ids, mask = padded_batch(batch=2, seq=6, seed=7)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(KeyError, match=r"no window 'evl'.*did you mean 'eval'\?"):
        mon.snapshot(window="evl")
    assert "evl" not in mon.windows  # the typo created nothing
    assert mon.snapshot(window="eval").total_tokens > 0  # the model is in eval mode
    plain = MoEMonitor(model)
    with pytest.raises(KeyError, match=r"split_by_mode=True"):
        plain.snapshot(window="eval")
    with plain.use_window("probe"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    assert plain.snapshot(window="probe").total_tokens > 0


def test_snapshot_reads_without_resetting_unless_asked() -> None:
    model, _ = build_tiny("mixtral")
    mon = MoEMonitor(model)
    ids, mask = padded_batch(batch=2, seq=6, seed=7)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    first = mon.snapshot()
    again = mon.snapshot(reset=True)
    after = mon.snapshot()
    for path, st in first.layers.items():
        np.testing.assert_array_equal(again.layers[path].usage_counts, st.usage_counts)
        assert st.num_tokens > 0 and after.layers[path].num_tokens == 0
