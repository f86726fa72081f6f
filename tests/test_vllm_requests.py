"""The vLLM plugin's per-request routing (no vLLM needed): batched forwards split back
into requests, the bounded trace stream and request summaries, the settings.

The batches imitate vLLM's Model Runner V1: each step lays the scheduled tokens of its
requests one after the other in the runner's batch order (which changes between steps),
pads the rows to a larger size, and starts each request at its computed-token count
(prefix-cache hits, chunked prefill, a preempted request recomputed from 0). The
routing of (request, position) is a known function, so every assembled sequence is
checked against it.
"""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moescope.integrations.vllm as mv
from moescope.integrations.vllm.requests import (
    RequestRecorder,
    RequestStreams,
    external_id,
    request_summary,
)
from moescope.integrations.vllm.settings import VllmSettingsError, preflight
from moescope.trace import RoutingTrace, TraceWriter

L, K, E = 3, 2, 8


def true_ids(req: str, pos: int) -> np.ndarray:
    """[L, K] distinct expert ids of (request, position): the routing to recover."""
    rng = np.random.default_rng(abs(hash((req, pos))) % 2**32)
    return np.stack([rng.choice(E, K, replace=False) for _ in range(L)])


def run_step(
    rec: RequestRecorder,
    batch: list[tuple[str, int, int]],
    pad: int = 3,
    compiled: Any = None,
    streams: RequestStreams | None = None,
) -> None:
    """One forward: ``batch`` = [(request, start position, tokens)] in runner order."""
    rows = [true_ids(r, p) for r, s, n in batch for p in range(s, s + n)]
    ids = np.stack(rows)  # [T, L, K]
    junk = np.full((pad, L, K), 7)  # padding rows the runner adds; never recorded
    full = torch.from_numpy(np.concatenate([ids, junk])).to(torch.int64)
    if compiled is not None:
        compiled(full)
    else:
        for layer in range(L):
            rec.stash(layer, full[:, layer])
    end = streams.end_step if streams is not None else rec.end_step
    end([r for r, _, _ in batch], {r: n for r, _, n in batch}, {r: s for r, s, _ in batch})


def expected(req: str, total: int, routed: range) -> np.ndarray:
    out = np.full((L, total, K), -1, dtype=np.int32)
    for p in routed:
        out[:, p] = true_ids(req, p)
    return out


def test_steps_are_split_back_into_requests() -> None:
    rec = RequestRecorder(num_layers=L, top_k=K, max_rows=64)
    # a: 10 prompt tokens, 4 of them prefix-cache hits; b: 12, chunked prefill 8 + 4;
    # c: 5 tokens, preempted after 2 decode steps and recomputed from position 0.
    run_step(rec, [("a-0000000a", 4, 6), ("b-0000000b", 0, 8)])
    run_step(rec, [("b-0000000b", 8, 4), ("a-0000000a", 10, 1), ("c-0000000c", 0, 5)])
    run_step(rec, [("c-0000000c", 5, 1), ("a-0000000a", 11, 1), ("b-0000000b", 12, 1)])
    run_step(rec, [("a-0000000a", 12, 1), ("c-0000000c", 0, 7)])  # c recomputed
    run_step(rec, [("c-0000000c", 7, 1)])
    a = rec.finish("a-0000000a", range(10), [50, 51, 52, 53])  # 14 tokens, 13 fed
    b = rec.finish("b-0000000b", range(12), [60, 61])  # 14 tokens, 13 fed
    c = rec.finish("c-0000000c", range(5), [70, 71, 72, 73])  # 9 tokens, 8 fed
    assert a is not None and b is not None and c is not None
    np.testing.assert_array_equal(a.token_ids, [*range(10), 50, 51, 52, 53])
    np.testing.assert_array_equal(a.topk_ids, expected("a-0000000a", 14, range(4, 13)))
    np.testing.assert_array_equal(b.topk_ids, expected("b-0000000b", 14, range(13)))
    np.testing.assert_array_equal(c.topk_ids, expected("c-0000000c", 9, range(8)))
    assert rec.pending() == [] and rec.finish("a-0000000a", [], []) is None


def test_stash_runs_inside_a_compiled_graph() -> None:
    """Under torch.compile the copy is the opaque op moescope::stash_routing: it runs at
    every call of the compiled graph (fullgraph: no graph break)."""
    rec = RequestRecorder(num_layers=L, top_k=K, max_rows=64)

    @torch.compile(fullgraph=True, backend="eager")
    def router(ids: torch.Tensor) -> torch.Tensor:
        for layer in range(L):  # one router call per layer, as in a forward
            rec.stash(layer, ids[:, layer])
        return ids + 1

    run_step(rec, [("x", 0, 5), ("y", 2, 3)], compiled=router)
    run_step(rec, [("y", 5, 1), ("x", 5, 1)], compiled=router)
    x = rec.finish("x", range(5), [1, 2])
    y = rec.finish("y", range(5), [1, 2])
    assert x is not None and y is not None
    np.testing.assert_array_equal(x.topk_ids, expected("x", 7, range(6)))
    np.testing.assert_array_equal(y.topk_ids, expected("y", 7, range(2, 6)))


def test_request_summary_against_a_direct_count() -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(2 * 20)]).reshape(2, 20, K)
    ids[:, :3] = -1  # not routed
    got = request_summary(ids, [E, E], ["l0", "l1"], top=3)
    assert got["tokens"] == 17
    for i, name in enumerate(["l0", "l1"]):
        c = collections.Counter(int(x) for x in ids[i, 3:].reshape(-1))
        top = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        assert got["layers"][name]["unique_experts"] == len(c)
        assert got["layers"][name]["top_experts"] == [list(t) for t in top]
        assert got["layers"][name]["max_over_mean"] == pytest.approx(
            max(c.values()) / (17 * K / E), rel=1e-12
        )


def make_streams(tmp: Path, max_sequences: int, max_summaries: int) -> tuple[Any, ...]:
    rec = RequestRecorder(num_layers=L, top_k=K, max_rows=64)
    writer = TraceWriter(
        tmp / "trace.jsonl", layers=["l0", "l1", "l2"], num_experts=E, top_k=K,
        source={"engine": "vllm"}, max_sequences=max_sequences,
    )  # fmt: skip
    lines: list[dict[str, Any]] = []
    streams = RequestStreams(
        rec, ["l0", "l1", "l2"], [E] * L, trace=writer, summaries=lines.append,
        max_summaries=max_summaries,
    )  # fmt: skip
    return rec, writer, lines, streams


def test_trace_stream_and_summaries_are_bounded(tmp_path: Path) -> None:
    rec, writer, lines, streams = make_streams(tmp_path, max_sequences=2, max_summaries=1)
    state = {f"r{i}-0123abcd": (list(range(4)), [9, 9]) for i in range(3)}
    for rid in state:
        run_step(rec, [(rid, 0, 5)], streams=streams)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert streams.finished(sorted(state), state.get) == 3
    assert len([w for w in caught if "max_sequences=2" in str(w.message)]) == 1
    writer.close()
    trace = RoutingTrace.load(tmp_path / "trace.jsonl")
    assert trace.seq_ids == ["r0", "r1"]  # the API's ids; the third is past the bound
    np.testing.assert_array_equal(trace[0].topk_ids, expected("r0-0123abcd", 6, range(5)))
    assert [ln["request_id"] for ln in lines] == ["r0"]
    assert lines[0]["kind"] == "request" and lines[0]["tokens"] == 5
    assert streams.take_counters() == {
        "requests_finished": 3, "request_summaries": 1, "request_summaries_dropped": 2,
    }  # fmt: skip
    assert streams.take_counters()["requests_finished"] == 0  # a new window


def test_flush_writes_running_requests_once(tmp_path: Path) -> None:
    """A flush writes what a running request has so far; its later rows and its finish
    are ignored, so the trace never holds an id twice."""
    rec, writer, _, streams = make_streams(tmp_path, max_sequences=10, max_summaries=0)
    state = {"a-00000001": (list(range(3)), [5])}
    run_step(rec, [("a-00000001", 0, 3)], streams=streams)
    assert streams.flush(state.get) == 1
    run_step(rec, [("a-00000001", 3, 1)], streams=streams)
    assert streams.finished(["a-00000001"], state.get) == 0
    assert rec.pending() == []
    writer.close()
    trace = RoutingTrace.load(tmp_path / "trace.jsonl")
    assert trace.seq_ids == ["a"]
    assert (trace[0].topk_ids[:, 3] == -1).all()


def test_external_ids() -> None:
    assert external_id("17-0a1b2c3d") == "17"
    assert external_id("cmpl-abc-0a1b2c3d") == "cmpl-abc"
    assert external_id("plain") == "plain"


def test_trace_and_summary_settings(tmp_path: Path) -> None:
    env = {
        mv.ENV: "1",
        mv.ENV_JSONL: str(tmp_path / "log.jsonl"),
        mv.ENV_TRACE: str(tmp_path / "trace.jsonl"),
        mv.ENV_REQUEST_SUMMARIES: "50",
        mv.ENV_PER_EXPERT: "yes",
    }
    opts = mv.env_options(env)
    assert opts is not None
    assert opts["trace"] == str(tmp_path / "trace.jsonl")
    assert opts["request_summaries"] == 50 and opts["prometheus_per_expert"] is True
    mv.check_options(opts)
    with pytest.raises(VllmSettingsError, match=f"^{mv.ENV_REQUEST_SUMMARIES}='many' is not"):
        mv.env_options({**env, mv.ENV_REQUEST_SUMMARIES: "many"})
    with pytest.raises(ValueError, match=r"trace must be a \.jsonl file"):
        mv.options(trace="trace.npz")
    with pytest.raises(ValueError, match="request_summaries writes to the JSONL log"):
        mv.options(request_summaries=10)
    cfg = mv.options(jsonl="x.jsonl", trace="t.jsonl", request_summaries=5)["moescope"]
    assert (cfg["trace"], cfg["request_summaries"], cfg["trace_max_sequences"]) == (
        "t.jsonl", 5, 10000,
    )  # fmt: skip
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(VllmSettingsError, match="cannot write the token trace stream .* set by "
                       f"{mv.ENV_TRACE}"):  # fmt: skip
        preflight({"trace": str(blocker / "t.jsonl")}, from_env=["trace"])
    assert json.dumps(cfg)  # JSON-able: it travels in vLLM's additional_config
