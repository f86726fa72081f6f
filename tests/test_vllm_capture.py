"""The torch-only half of the vLLM integration (no vLLM needed): the capture op, padding,
paused (warm-up) forwards, windows vs totals, options. The real-vLLM tests are in
tests/with_vllm/ (``make test-vllm``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moescope.integrations.vllm as mv
from moescope.integrations.vllm.capture import (
    VllmLayer,
    VllmRoutingMonitor,
    served_summary,
    set_runtime_context,
)
from moescope.stats.accumulator import merge_states, subtract_states

E, K = 8, 2


def _layers(n: int = 2) -> list[VllmLayer]:
    return [VllmLayer(f"model.layers.{i}.mlp.experts", E, K) for i in range(n)]


def _route(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, E, generator=g) * 3
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return logits, w, ids.to(torch.int32)


def _ref_counts(ids: torch.Tensor, keep: torch.Tensor | None = None) -> np.ndarray:
    x = ids.numpy().astype(np.int64)
    if keep is not None:
        x = x[keep.numpy()]
    return np.bincount(x.reshape(-1), minlength=E)


def _ref_entropy(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.double(), -1)
    return float((-(p * p.log()).sum(-1)).mean())


@pytest.fixture(autouse=True)
def _runtime_reset():
    yield
    set_runtime_context()


def test_counts_and_entropy_match_float64_reference() -> None:
    mon = VllmRoutingMonitor(_layers())
    calls = [(_route(5, s), s % 2) for s in range(6)]
    for (logits, w, ids), layer in calls:
        mon.record(layer, ids, logits, w)
    snap = mon.snapshot()
    for layer in range(2):
        mine = [c for c, li in calls if li == layer]
        ids = torch.cat([c[2] for c in mine])
        logits = torch.cat([c[0] for c in mine])
        s = snap.layers[f"model.layers.{layer}.mlp.experts"]
        np.testing.assert_array_equal(s.usage_counts, _ref_counts(ids))
        assert s.num_tokens == 15
        assert s.routing_entropy == pytest.approx(_ref_entropy(logits), rel=1e-6)
        assert s.unique_experts_per_batch == pytest.approx(
            np.mean([len(set(c[2].reshape(-1).tolist())) for c in mine])
        )


def test_padding_rows_are_not_counted_and_buffers_may_be_reused() -> None:
    mon = VllmRoutingMonitor(_layers(1))
    logits, w, ids = _route(8, 0)
    pad = torch.zeros(16, dtype=torch.bool)
    pad[6:] = True  # 6 real tokens, 2 padded rows (and a longer runner buffer)
    mon.record(0, ids, logits, w, is_padding=pad)
    expect = _ref_counts(ids, ~pad[:8])
    ids.fill_(0)  # vLLM reuses its buffers: the staged copy must not change
    pad.fill_(False)
    s = mon.snapshot().layers["model.layers.0.mlp.experts"]
    np.testing.assert_array_equal(s.usage_counts, expect)
    assert s.num_tokens == 6
    assert s.routing_entropy == pytest.approx(_ref_entropy(logits[:6]), rel=1e-6)


@pytest.mark.parametrize("graph_safe", [False, True], ids=["staged", "graph_safe"])
def test_op_under_torch_compile_counts_every_call_and_skips_paused_ones(graph_safe: bool) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    mon = VllmRoutingMonitor(_layers(1), counts_only=True, graph_safe=graph_safe)

    def step(x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.softmax(x, -1), K, dim=-1)
        mon.capture(0, ids, x, w)  # what the router wrapper calls: the moescope::capture op
        return w.sum(-1)

    fn = torch.compile(step, backend="aot_eager", fullgraph=True)
    state = {"paused": False}
    set_runtime_context(paused=lambda: state["paused"])
    xs = [torch.randn(4, E, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.inference_mode():
        fn(xs[0])
        state["paused"] = True  # e.g. vLLM's _dummy_run
        fn(xs[1])
        state["paused"] = False
        fn(xs[2])
    s = mon.snapshot().layers["model.layers.0.mlp.experts"]
    want = _ref_counts(torch.topk(xs[0], K).indices) + _ref_counts(torch.topk(xs[2], K).indices)
    np.testing.assert_array_equal(s.usage_counts, want)
    assert math.isnan(s.routing_entropy)  # counts_only stages no scores
    assert dict(counters["graph_break"]) == {}


def test_windows_add_up_to_the_total_and_reset_starts_again() -> None:
    mon = VllmRoutingMonitor(_layers(1))
    seen: list[int] = []
    mon.window_listeners.append(lambda snap, tok: seen.append(tok["scheduled_tokens"]))
    all_ids = []
    for s in range(4):
        logits, w, ids = _route(3 + s, s)
        mon.record(0, ids, logits, w)
        mon.count_tokens(3 + s, prefix_cached=s)
        all_ids.append(ids)
        if s % 2:
            mon.snapshot(reset=True)  # a window closes (exporter / JSONL)
    assert seen == [3 + 4, 5 + 6]
    total, tokens = mon.total()
    layer = total.layers["model.layers.0.mlp.experts"]
    np.testing.assert_array_equal(layer.usage_counts, _ref_counts(torch.cat(all_ids)))
    assert layer.unique_experts_max == max(len(set(i.reshape(-1).tolist())) for i in all_ids)
    assert tokens == {"scheduled_tokens": 18, "prefix_cached_tokens": 6, "forwards": 4}
    served = served_summary(total, tokens)
    assert served["served_tokens"] == 18 + 6 and served["routed_tokens"] == 18
    # A caller's reset restarts the total but leaves the open window whole (it belongs
    # to the exporter / JSONL log).
    logits, w, ids = _route(4, 9)
    mon.record(0, ids, logits, w)
    mon.count_tokens(4, prefix_cached=0)
    total, tokens = mon.total(reset=True)
    assert total.total_tokens == 22 and tokens["scheduled_tokens"] == 22
    again, tokens = mon.total()
    assert again.total_tokens == 0 and tokens["scheduled_tokens"] == 0
    logits, w, ids2 = _route(2, 10)
    mon.record(0, ids2, logits, w)
    mon.count_tokens(2, prefix_cached=1)
    window = mon.snapshot(reset=True).layers["model.layers.0.mlp.experts"]
    np.testing.assert_array_equal(window.usage_counts, _ref_counts(torch.cat([ids, ids2])))
    assert seen[-1] == 6
    after, tokens = mon.total()
    np.testing.assert_array_equal(
        after.layers["model.layers.0.mlp.experts"].usage_counts, _ref_counts(ids2)
    )
    assert tokens == {"scheduled_tokens": 2, "prefix_cached_tokens": 1, "forwards": 1}
    assert mon.lifetime_tokens["scheduled_tokens"] == 24


def test_one_merge_sums_and_takes_max_of_unique_max() -> None:
    a = {"0/counts": np.array([[1, 2]]), "0/unique_max": np.array([3])}
    b = {"0/counts": np.array([[4, 0]]), "0/unique_max": np.array([2])}
    m = merge_states(a, b)
    np.testing.assert_array_equal(m["0/counts"], [[5, 2]])
    np.testing.assert_array_equal(m["0/unique_max"], [3])
    np.testing.assert_array_equal(merge_states(None, b)["0/counts"], [[4, 0]])
    np.testing.assert_array_equal(subtract_states(m, a)["0/counts"], b["0/counts"])
    np.testing.assert_array_equal(subtract_states(m, a)["0/unique_max"], [3])
    # per-layer keys and device tensors take the same rules
    t = merge_states({"unique_max": torch.tensor(1)}, {"unique_max": torch.tensor(5)})
    assert int(t["unique_max"]) == 5


def test_options_and_errors() -> None:
    cfg = mv.options(jsonl="/tmp/x.jsonl", prometheus_port=9400)
    assert cfg["moescope"]["prometheus_port"] == 9400 and cfg["moescope"]["enabled"]
    with pytest.raises(ValueError, match="unknown moescope vLLM option 'port'"):
        mv.check_options({"port": 1})
    with pytest.raises(ValueError, match="prometheus_port must be in"):
        mv.options(prometheus_port=70000)
    with pytest.raises(ValueError, match="'counts_only' must be bool"):
        mv.check_options({"counts_only": "yes"})
    with pytest.raises(ValueError, match="at least one MoE layer"):
        VllmRoutingMonitor([])
    with pytest.raises(RuntimeError, match="monitoring is off"):
        mv.parse_rpc([{"enabled": False, "reports": True}])


def test_rpc_payload_round_trip_keeps_the_reporting_rank() -> None:
    mon = VllmRoutingMonitor(_layers(1))
    logits, w, ids = _route(5, 1)
    mon.record(0, ids, logits, w)
    snap, tokens = mon.total()
    payload = {"enabled": True, "reports": True, "snapshot": snap.to_json(), "tokens": tokens}
    replica = {**payload, "reports": False}  # a tensor-parallel replica: same tokens
    out = mv.parse_rpc([payload, replica])
    assert len(out.ranks) == 1
    np.testing.assert_array_equal(
        out.snapshot.layers["model.layers.0.mlp.experts"].usage_counts, _ref_counts(ids)
    )


def test_env_switch_is_written_into_additional_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM hashes additional_config into its compile-cache key: a graph compiled without
    the capture op must never be reused for a monitored run."""
    from moescope.integrations.vllm.worker import resolve_options

    class Cfg:
        additional_config: dict = {}  # noqa: RUF012

    monkeypatch.delenv(mv.ENV, raising=False)
    assert resolve_options(Cfg()) is None
    monkeypatch.setenv(mv.ENV, "1")
    monkeypatch.setenv(mv.ENV_PORT, "9500")
    cfg = Cfg()
    cfg.additional_config = {"other_plugin": 1}
    opts = resolve_options(cfg)
    assert opts == {"prometheus_port": 9500, "enabled": True}
    assert cfg.additional_config == {"other_plugin": 1, "moescope": opts}
    monkeypatch.setenv(mv.ENV, "0")
    off = Cfg()
    off.additional_config = {"moescope": {"enabled": False}}
    assert resolve_options(off) is None


@pytest.mark.parametrize(
    ("raw", "want"),
    [("1", True), ("TRUE", True), ("yes", True), ("On", True), ("0", False), ("off", False),
     ("No", False), ("false", False)],
)  # fmt: skip
def test_boolean_environment_values_accept_the_usual_spellings(raw: str, want: bool) -> None:
    env = {mv.ENV: "1", mv.ENV_COUNTS_ONLY: raw}
    assert mv.env_options(env) == {"counts_only": want}
    assert (mv.env_options({mv.ENV: raw}) is not None) == want


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({mv.ENV_PORT: "abc"}, r"MOESCOPE_VLLM_PROMETHEUS_PORT='abc' is not a port number"),
        ({mv.ENV_PORT: "70000"}, r"MOESCOPE_VLLM_PROMETHEUS_PORT='70000' is not a port"),
        ({mv.ENV_COUNTS_ONLY: "enabled"}, r"MOESCOPE_VLLM_COUNTS_ONLY='enabled' is not a bool"),
        ({mv.ENV_INTERVAL: "-3"}, r"MOESCOPE_VLLM_INTERVAL='-3' is not a positive number"),
        ({mv.ENV_INTERVAL: "nan"}, r"MOESCOPE_VLLM_INTERVAL='nan' is not a positive number"),
        ({mv.ENV: "maybe"}, r"MOESCOPE_VLLM='maybe' is not a boolean"),
        ({mv.ENV: "{bad"}, r"MOESCOPE_VLLM is not valid JSON"),
        ({mv.ENV: '{"port": 1}'}, r"MOESCOPE_VLLM: unknown moescope vLLM option 'port'"),
    ],
)
def test_bad_environment_values_fail_in_one_line_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(mv.VllmSettingsError, match=message) as info:
        mv.env_options({mv.ENV: "1", **env})
    assert "\n" not in str(info.value)


def test_environment_is_ignored_while_monitoring_is_off() -> None:
    assert mv.env_options({mv.ENV_PORT: "abc"}) is None
    assert mv.env_options({mv.ENV: "off", mv.ENV_PORT: "abc"}) is None


def test_preflight_names_the_setting_of_an_unwritable_log_or_a_busy_port(tmp_path) -> None:
    import socket

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(mv.VllmSettingsError, match=r"cannot write the JSONL log .* set by "
                       r"MOESCOPE_VLLM_JSONL \(File exists\); choose a writable"):  # fmt: skip
        mv.preflight({"jsonl": str(blocker / "r.jsonl")}, from_env=["jsonl"])
    with pytest.raises(mv.VllmSettingsError, match=r"additional_config\['moescope'\]\['jsonl'\]"):
        mv.preflight({"jsonl": str(tmp_path)})  # a directory
    mv.preflight({"jsonl": str(tmp_path / "sub" / "r.jsonl")}, replicas=2)
    assert (tmp_path / "sub" / "r.jsonl").exists() and (tmp_path / "sub" / "r.1.jsonl").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(mv.VllmSettingsError, match=rf"127.0.0.1:{port} set by "
                           r"MOESCOPE_VLLM_PROMETHEUS_PORT \(Address already in use\)"):  # fmt: skip
            mv.preflight({"prometheus_port": port}, from_env=["prometheus_port"])
        # replica 1 of a port below a busy one
        with pytest.raises(mv.VllmSettingsError, match=rf"127.0.0.1:{port} set by additional"):
            mv.preflight({"prometheus_port": port - 1}, replicas=2)
        # a worker checks only its own port (its neighbour may be listening already)
        mv.preflight({"prometheus_port": port - 1}, replicas=2, indices=[0])
    mv.preflight({"prometheus_port": port})  # free again


def test_data_parallel_replicas_add_up_to_one_monitor_of_all_tokens() -> None:
    """Two replicas' RPC results (each worker's totals and accumulator states) merge into
    exactly what one monitor that saw every token reports: counts, entropy, top-1, aux
    loss, co-activation, token counters; pipeline stages sit side by side."""
    import json

    from moescope.integrations.vllm import worker

    whole = VllmRoutingMonitor(_layers())
    replicas = [VllmRoutingMonitor(_layers()) for _ in range(2)]
    for s in range(8):
        logits, w, ids = _route(3 + s, s)
        for mon in (whole, replicas[s % 2]):
            mon.record(s % 2, ids, logits, w)
            mon.count_tokens(3 + s, prefix_cached=s % 3)
        if s == 4:
            replicas[0].snapshot(reset=True)  # a closed window is part of the total
    payloads = []
    try:
        for rank, mon in enumerate(replicas):
            worker.STATE["monitor"] = mon
            payload = json.loads(json.dumps(worker.rpc_snapshot()))  # what the RPC carries
            payloads.append({**payload, "dp_rank": rank})
    finally:
        worker.STATE["monitor"] = None
    got = mv.parse_rpc(payloads)
    want, tokens = whole.total()
    assert got.tokens == tokens and len(got.ranks) == 2
    for name, ref in want.layers.items():
        g = got.snapshot.layers[name]
        np.testing.assert_array_equal(g.usage_counts, ref.usage_counts)
        np.testing.assert_array_equal(g.coactivation, ref.coactivation)
        assert g.num_tokens == ref.num_tokens
        for metric in ("routing_entropy", "top1_prob", "top1_margin", "aux_loss", "z_loss",
                       "cv", "unique_experts_per_batch"):  # fmt: skip
            assert getattr(g, metric) == pytest.approx(getattr(ref, metric), rel=1e-12), metric
        assert g.unique_experts_max == ref.unique_experts_max
    # Pipeline stages: different layers, the same tokens (not added).
    stage1 = {**payloads[1], "dp_rank": 0, "pp_rank": 1}
    stage1["snapshot"] = json.dumps(
        {**json.loads(stage1["snapshot"]),
         "layers": {"model.layers.9.mlp.experts": json.loads(stage1["snapshot"])["layers"][
             "model.layers.0.mlp.experts"]}}
    )  # fmt: skip
    both = mv.parse_rpc([payloads[0], stage1])
    assert len(both.snapshot.layers) == 3 and both.tokens == payloads[0]["tokens"]
