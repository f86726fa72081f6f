"""Graph-safe capture: counting that survives CUDA-graph replay, proven on CPU.

A CUDA-graph replay runs the kernels one recorded forward launched, on the same memory,
with no Python. ``graph_replay.GraphRecording`` emulates that with aten ops (see its
docstring): one monitored forward is recorded, then replayed N times as dataflow. The
snapshot must then hold N + 1 forwards' worth of counts and sums (the recorded run
counts too, as the run that captures a CUDA graph does execute). The staged path, whose
staging is Python, must fail the same test: that is what shows the test can fail.

References: the monitor's own eager snapshot of the same forward (which the other tests
check against transformers' router outputs and a float64 recomputation), multiplied.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from graph_replay import GraphRecording
from hf_tiny import build_tiny, padded_batch
from moescope import MoEMonitor
from moescope.integrations.vllm.capture import VllmLayer, VllmRoutingMonitor

SUMMED = ("usage_counts", "dropped_counts", "weight_sums", "coactivation")
# Scalars that are means over tokens: unchanged when the same forward repeats.
MEANS = ("routing_entropy", "top1_prob", "top1_margin", "aux_loss", "z_loss", "cv")


def _one_forward(model, ids, mask, **kw):  # type: ignore[no-untyped-def]
    mon = MoEMonitor(model, **kw)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    snap = mon.snapshot()
    mon.detach()
    return snap


def _assert_scaled(snap, ref, n: int) -> None:  # type: ignore[no-untyped-def]
    assert set(snap.layers) == set(ref.layers)
    for path, want in ref.layers.items():
        got = snap.layers[path]
        assert got.num_tokens == n * want.num_tokens, path
        assert got.num_updates == n * want.num_updates, path
        np.testing.assert_array_equal(got.usage_counts, n * want.usage_counts, err_msg=path)
        if want.coactivation is not None:
            np.testing.assert_array_equal(got.coactivation, n * want.coactivation, err_msg=path)
        np.testing.assert_allclose(got.weight_sums, n * want.weight_sums, rtol=1e-6, atol=1e-6)
        for name in MEANS:
            a, b = getattr(got, name), getattr(want, name)
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6), name
        assert got.unique_experts_per_batch == pytest.approx(want.unique_experts_per_batch)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("counts_only", [False, True], ids=["full", "counts_only"])
def test_replayed_forwards_count_like_eager_ones(family: str, counts_only: bool) -> None:
    model, _ = build_tiny(family)
    ids, mask = padded_batch(batch=2, seq=7, seed=3)
    ref = _one_forward(model, ids, mask, counts_only=counts_only)
    assert ref.total_tokens > 0

    bare = GraphRecording()
    with torch.no_grad(), bare:
        model(input_ids=ids, attention_mask=mask)
    mon = MoEMonitor(model, graph_safe=True, counts_only=counts_only)
    rec = GraphRecording()
    with torch.no_grad(), rec:
        model(input_ids=ids, attention_mask=mask)
    # The monitor adds ops but no host sync (the model's own, if any, are the same).
    assert len(rec.ops) > len(bare.ops)
    assert rec.host_syncs == bare.host_syncs
    replays = 4
    for _ in range(replays):
        rec.replay()
    _assert_scaled(mon.snapshot(), ref, replays + 1)


def test_staged_path_fails_the_replay_test() -> None:
    model, _ = build_tiny("mixtral")
    ids, mask = padded_batch(batch=2, seq=7, seed=3)
    ref = _one_forward(model, ids, mask)
    mon = MoEMonitor(model)  # staged: Python keeps records, a replay runs no Python
    rec = GraphRecording()
    with torch.no_grad(), rec:
        model(input_ids=ids, attention_mask=mask)
    for _ in range(4):
        rec.replay()
    with pytest.raises(AssertionError):
        _assert_scaled(mon.snapshot(), ref, 5)


def test_graph_safe_update_has_no_host_sync_and_new_inputs_are_counted() -> None:
    """Static input buffers refilled before each replay (what vLLM and static-cache
    generation do): every replay counts the new tokens' routing, exactly."""
    e, k, t, h = 8, 2, 6, 16
    gen = torch.Generator().manual_seed(0)
    w_router = torch.randn(h, e, generator=gen)
    x_static = torch.zeros(t, h)
    mon = VllmRoutingMonitor([VllmLayer("layer0", e, k)], graph_safe=True)
    eager = VllmRoutingMonitor([VllmLayer("layer0", e, k)])

    def route(m: VllmRoutingMonitor, x: torch.Tensor) -> None:
        logits = x @ w_router
        w, i = torch.topk(torch.softmax(logits, -1), k)
        m.capture(0, i, logits, w)

    inputs = [torch.randn(t, h, generator=gen) for _ in range(5)]
    rec = GraphRecording()
    x_static.copy_(inputs[0])
    with torch.inference_mode(), rec:
        route(mon, x_static)
    assert rec.host_syncs == []
    for x in inputs[1:]:
        x_static.copy_(x)
        rec.replay()
    for x in inputs:
        with torch.inference_mode():
            route(eager, x)
    got, want = mon.snapshot().layers["layer0"], eager.snapshot().layers["layer0"]
    np.testing.assert_array_equal(got.usage_counts, want.usage_counts)
    np.testing.assert_array_equal(got.coactivation, want.coactivation)
    assert got.num_tokens == 5 * t
    for name in MEANS:
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-6), name


def test_vllm_capture_op_replays_with_gate_and_valid_token_count() -> None:
    """The capture op (``moescope::capture``) as vLLM calls it from a compiled model:
    its aten ops replay into the persistent buffers; warm-up (gate off while the graph is
    captured) and padding rows (device valid-token count) are excluded at replay."""
    e, k, t = 8, 2, 8
    mon = VllmRoutingMonitor([VllmLayer("l0", e, k), VllmLayer("l1", e, k)], graph_safe=True)
    pipe = mon.pipeline
    ids_s = torch.zeros(t, k, dtype=torch.int32)
    logits_s = torch.zeros(t, e)
    w_s = torch.zeros(t, k)
    sums = mon.core.window("default").routing

    def fill(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        lg = torch.randn(t, e, generator=g) * 2
        w, i = torch.topk(torch.softmax(lg, -1), k)
        ids_s.copy_(i)
        logits_s.copy_(lg)
        w_s.copy_(w)
        return lg, w, i

    fill(0)
    rec = GraphRecording()
    mon.set_paused(True)  # vLLM captures its graphs inside the paused warm-up
    mon.set_valid_tokens(t)
    with torch.inference_mode(), rec:
        torch.ops.moescope.capture(
            [pipe._ticket], pipe.id, 1, e, ids_s, logits_s, w_s, None, None, "softmax", ""
        )
    mon.set_paused(False)
    assert rec.custom_ops == ["moescope.capture.default"] and rec.host_syncs == []
    assert mon.snapshot().layers["l1"].num_tokens == 0  # capture counted nothing

    eager = VllmRoutingMonitor([VllmLayer("l0", e, k), VllmLayer("l1", e, k)])
    for seed, real in ((1, 8), (2, 5), (3, 3)):
        lg, w, i = fill(seed)
        mon.set_valid_tokens(real)
        rec.replay()
        pad = torch.arange(t) >= real
        eager.record(1, i, lg, w, is_padding=pad)
    got, want = mon.snapshot().layers["l1"], eager.snapshot().layers["l1"]
    assert got.num_tokens == 16 == want.num_tokens
    np.testing.assert_array_equal(got.usage_counts, want.usage_counts)
    np.testing.assert_array_equal(got.coactivation, want.coactivation)
    for name in MEANS:
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-6), name
    assert mon.snapshot().layers["l0"].num_tokens == 0

    # reset zeroes the buffers in place: the recorded graph keeps counting into them
    before = {k: v.data_ptr() for k, v in sums.state().items()}
    mon.snapshot(reset=True)
    assert {k: v.data_ptr() for k, v in sums.state().items()} == before
    rec.replay()
    assert mon.snapshot().layers["l1"].num_tokens == 3


def test_graph_safe_counts_equal_staged_under_torch_compile() -> None:
    model, _ = build_tiny("qwen3_moe")
    ids, mask = padded_batch(batch=2, seq=7, seed=5)
    ref = _one_forward(model, ids, mask)
    mon = MoEMonitor(model, graph_safe=True)
    fast = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
        fast(input_ids=ids, attention_mask=mask)
    _assert_scaled(mon.snapshot(), ref, 2)


def test_unreadable_record_switches_off_one_layer_with_one_warning() -> None:
    mon = VllmRoutingMonitor([VllmLayer("good", 8, 2), VllmLayer("bad", 8, 2)])
    gen = torch.Generator().manual_seed(0)
    lg = torch.randn(4, 8, generator=gen)
    w, i = torch.topk(torch.softmax(lg, -1), 2)
    with pytest.warns(RuntimeWarning, match="switched off monitoring of layer bad") as caught:
        for _ in range(3):
            mon.capture(1, i, lg[:, :2], w)  # [T, K] handed over where logits belong
            mon.capture(0, i, lg, w)
    assert len([c for c in caught if "layer bad" in str(c.message)]) == 1
    snap = mon.snapshot()
    assert snap.layers["good"].num_tokens == 12 and snap.layers["bad"].num_tokens == 0


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_graph_safe_op_counts_in_every_compile_backend(backend: str) -> None:
    """aot_eager once lost graph-safe counts when the buffers were declared mutated
    arguments (functionalized copies, never written back)."""
    mon = VllmRoutingMonitor([VllmLayer("a", 8, 2)], graph_safe=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.softmax(x, -1), 2, dim=-1)
        mon.capture(0, ids, x, w)
        return w.sum(-1)

    fn = torch.compile(step, backend=backend, fullgraph=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fn(x)
        fn(x)
    want = np.bincount(torch.topk(x, 2).indices.reshape(-1).numpy(), minlength=8) * 2
    np.testing.assert_array_equal(mon.snapshot().layers["a"].usage_counts, want)
