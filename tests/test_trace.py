"""moescope.trace: the routing trace format (issue 21) round-trips and refuses bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from moescope.trace import (
    TRACE_VERSION,
    RoutingTrace,
    TraceFormatError,
    TraceWriter,
)

L, E, K = 3, 8, 2


def _trace(n: int = 4, weights: bool = True, seed: int = 0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    tr = RoutingTrace([f"model.layers.{i}.mlp" for i in range(L)], E, K, {"engine": "test"})
    for i in range(n):
        s = int(rng.integers(1, 9))
        ids = np.stack([rng.permutation(E)[:K] for _ in range(L * s)]).reshape(L, s, K)
        w = rng.random((L, s, K)).astype(np.float32) if (weights and i % 2 == 0) else None
        tr.append(f"req-{i}", rng.integers(0, 1000, s), ids, w)
    return tr


def _same(a: RoutingTrace, b: RoutingTrace) -> None:
    assert a.layers == b.layers and a.num_experts == b.num_experts and a.top_k == b.top_k
    assert a.source == b.source and a.seq_ids == b.seq_ids
    for x, y in zip(a, b, strict=True):
        assert x.token_ids.dtype == y.token_ids.dtype == np.int64
        assert x.topk_ids.dtype == y.topk_ids.dtype == np.int32
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        if x.topk_weights is None:
            assert y.topk_weights is None
        else:
            assert y.topk_weights is not None and y.topk_weights.dtype == np.float32
            np.testing.assert_array_equal(x.topk_weights, y.topk_weights)  # bit-exact


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    tr = _trace()
    p = tr.save(tmp_path / f"t{suffix}")
    back = RoutingTrace.load(p)
    _same(tr, back)
    assert len(back) == 4 and back.num_tokens == tr.num_tokens
    assert not back.has_weights  # sequences 1 and 3 have none
    assert back["req-2"].topk_weights is not None


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
def test_empty_trace_round_trips(tmp_path: Path, suffix: str) -> None:
    tr = RoutingTrace(["a"], 4, 1)
    back = RoutingTrace.load(tr.save(tmp_path / f"e{suffix}"))
    assert len(back) == 0 and back.layers == ["a"]


def test_jsonl_header_is_versioned(tmp_path: Path) -> None:
    p = _trace().save(tmp_path / "t.jsonl")
    head = json.loads(p.read_text().split("\n")[0])
    assert head == {
        "format": "moescope-trace",
        "version": TRACE_VERSION,
        "layers": [f"model.layers.{i}.mlp" for i in range(L)],
        "num_experts": E,
        "top_k": K,
        "source": {"engine": "test"},
    }


def test_narrower_k_is_padded_and_subset_keeps_order() -> None:
    tr = RoutingTrace(["a", "b"], 4, 2)
    tr.append(0, [5, 6, 7], np.zeros((2, 3, 1), dtype=np.int64))
    tr.append(1, [1], np.ones((2, 1, 2), dtype=np.int64))
    assert tr[0].topk_ids[..., 1].tolist() == [[-1, -1, -1]] * 2
    sub = tr.subset(["1", "0"])
    assert sub.seq_ids == ["1", "0"] and "0" in sub and sub.index("0") == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("x", [1, 2], np.zeros((L, 2, K))), "integers"),
        (("x", [1, 2], np.zeros((L, 3, K), dtype=int)), r"topk_ids must be \[layers=3"),
        (("x", [1, 2], np.zeros((L, 2, K + 1), dtype=int)), "k<=2"),
        (("x", [[1, 2]], np.zeros((L, 2, K), dtype=int)), "1-D integer"),
        (("x", [1, 2], np.full((L, 2, K), -2)), "-1 = absent"),
        (("x", [1, 2], np.zeros((L, 2, K), dtype=int), np.zeros((L, 2, 1))), "shape of topk_ids"),
        (("req-0", [1], np.zeros((L, 1, K), dtype=int)), "already in the trace"),
    ],
)
def test_append_checks(args: tuple, match: str) -> None:
    tr = _trace(1)
    with pytest.raises(TraceFormatError, match=match):
        tr.append(*args)


def test_not_a_trace_errors(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"kind": "snapshot"}\n')
    with pytest.raises(TraceFormatError, match="not a moescope routing trace"):
        RoutingTrace.load(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text("hello\n")
    with pytest.raises(TraceFormatError, match="first line is not JSON"):
        RoutingTrace.load(tmp_path / "b.jsonl")
    np.savez(tmp_path / "c.npz", x=np.zeros(3))
    with pytest.raises(TraceFormatError, match="no 'header' array"):
        RoutingTrace.load(tmp_path / "c.npz")
    (tmp_path / "d.npz").write_text("garbage")
    with pytest.raises(TraceFormatError, match=r"not a readable \.npz"):
        RoutingTrace.load(tmp_path / "d.npz")
    with pytest.raises(TraceFormatError, match=r"ends in \.jsonl or \.npz"):
        _trace(1).save(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        RoutingTrace.load(tmp_path / "missing.jsonl")


def test_newer_version_is_refused(tmp_path: Path) -> None:
    p = _trace(1).save(tmp_path / "t.jsonl")
    lines = p.read_text().split("\n")
    head = json.loads(lines[0])
    head["version"] = TRACE_VERSION + 1
    p.write_text("\n".join([json.dumps(head), *lines[1:]]))
    with pytest.raises(TraceFormatError, match="upgrade moescope"):
        RoutingTrace.load(p)


def test_bad_sequence_line_names_the_line(tmp_path: Path) -> None:
    p = _trace(2).save(tmp_path / "t.jsonl")
    lines = p.read_text().split("\n")
    bad = json.loads(lines[1])
    bad["token_ids"] = bad["token_ids"] + [1]  # one token more than topk_ids has
    p.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]))
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:2:"):
        RoutingTrace.load(p)


def test_writer_bounds_and_torn_line(tmp_path: Path) -> None:
    tr = _trace(6)
    p = tmp_path / "s.jsonl"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with TraceWriter.like(tr, p, max_sequences=3) as wr:
            assert wr.write_record({"kind": "request_summary", "seq_id": "req-0", "n": 1})
            assert wr.write_trace(tr) == 3
            assert not wr.write("late", [1], np.zeros((L, 1, K), dtype=int))
    assert sum("max_sequences=3" in str(x.message) for x in w) == 1
    back = RoutingTrace.load(p)
    _same(tr.subset(["req-0", "req-1", "req-2"]), back)  # the summary line is skipped
    # A writer killed mid-line: the torn last line is skipped with a warning.
    with p.open("a") as f:
        f.write('{"seq_id": "torn", "token_ids": [1, 2')
    with pytest.warns(UserWarning, match="torn last line"):
        assert RoutingTrace.load(p).seq_ids == ["req-0", "req-1", "req-2"]


def test_writer_byte_bound(tmp_path: Path) -> None:
    tr = _trace(6, weights=False)
    p = tmp_path / "s.jsonl"
    head_len = len(json.dumps(tr.header())) + 1
    with pytest.warns(UserWarning, match="max_bytes"):
        with TraceWriter.like(tr, p, max_bytes=head_len + 400) as wr:
            n = wr.write_trace(tr)
    assert p.stat().st_size <= head_len + 400 and wr.bytes == p.stat().st_size
    assert len(RoutingTrace.load(p)) == n < 6
    with pytest.raises(TraceFormatError, match=r"writes a \.jsonl"):
        TraceWriter.like(tr, tmp_path / "s.npz")


def test_renamed() -> None:
    tr = _trace(3)
    by_list = tr.renamed(["a", "b", "c"])
    assert by_list.seq_ids == ["a", "b", "c"] and by_list["b"].token_ids is tr[1].token_ids
    assert tr.renamed({"req-1": "x"}).seq_ids == ["req-0", "x", "req-2"]
    with pytest.raises(TraceFormatError, match="one id per sequence"):
        tr.renamed(["a"])
    with pytest.raises(TraceFormatError, match="already in the trace"):
        tr.renamed(["a", "a", "b"])
