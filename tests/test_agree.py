"""moescope agree: routing agreement between two traces of the same tokens (issue 21).

References are independent of moescope's capture and metric code: per-token top-k sets
recomputed from transformers' own ``router_logits`` (``output_router_logits=True``) and
agreement counted with Python sets in float64; the set metrics on random selections are
checked against a per-token loop.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope.analysis.agree import agree, load_trace, replay, write_agreement
from moescope.analysis.agreement import (
    TraceAlignmentError,
    align_traces,
    chance_levels,
    measure_agreement,
    position_buckets,
    set_agreement,
)
from moescope.analysis.errors import AnalyzeError
from moescope.stats.token_recorder import record_routing
from moescope.stats.trace_recorder import TraceRecorder, trace_from_token_routing
from moescope.trace import RoutingTrace

pytest.importorskip("transformers")

# At module top: inside a test, `conftest` can name another folder's conftest module.
from conftest import save_tiny_checkpoint
from hf_tiny import build_tiny

LENGTHS = (16, 16, 16, 24)


def _tokens(seed: int = 1, lengths: tuple[int, ...] = LENGTHS) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.randint(3, 128, (n,), generator=gen) for i, n in enumerate(lengths)}


def _tiny(family: str) -> torch.nn.Module:
    model = build_tiny(family)[0]
    # The eager experts loop is several times faster than grouped_mm on CPU at this size.
    model.set_experts_implementation("eager")
    return model


@pytest.fixture(scope="module")
def mixtral() -> torch.nn.Module:
    return _tiny("mixtral")


# --------------------------------------------------------------------------- pure metrics


def test_set_metrics_match_a_per_token_reference() -> None:
    rng = np.random.default_rng(0)
    e, k, t = 6, 3, 400
    ia = np.stack([rng.permutation(e)[:k] for _ in range(t)])[None]
    ib = np.stack([rng.permutation(e)[:k] for _ in range(t)])[None]
    ib[0, :50] = ia[0, :50][:, ::-1]  # same sets, other order
    ia[0, 7, 2] = -1  # an absent slot
    wa = rng.random((1, t, k)).astype(np.float32)
    wb = rng.random((1, t, k)).astype(np.float32)
    m = set_agreement(ia, ib, wa, wb)
    for i in range(t):
        sa = {int(x) for x in ia[0, i] if x >= 0}
        sb = {int(x) for x in ib[0, i] if x >= 0}
        assert m["exact"][0, i] == (sa == sb)
        assert m["jaccard"][0, i] == pytest.approx(len(sa & sb) / len(sa | sb), abs=1e-15)
        pa = {int(x): float(w) for x, w in zip(ia[0, i], wa[0, i], strict=True) if x >= 0}
        pb = {int(x): float(w) for x, w in zip(ib[0, i], wb[0, i], strict=True) if x >= 0}
        za, zb = sum(pa.values()), sum(pb.values())
        ref = sum(min(pa[x] / za, pb.get(x, 0.0) / zb) for x in pa)
        assert m["weighted"][0, i] == pytest.approx(ref, abs=1e-12)
        top_a = max(pa, key=lambda x: pa[x])
        top_b = max(pb, key=lambda x: pb[x])
        assert m["top1"][0, i] == (top_a == top_b)
    assert m["exact"][0, :50].sum() >= 49  # reordered slots are the same set


def test_chance_levels_by_simulation() -> None:
    rng = np.random.default_rng(1)
    e, k, t = 8, 2, 40000
    ia = np.argsort(rng.random((t, e)), axis=1)[:, :k][None]
    ib = np.argsort(rng.random((t, e)), axis=1)[:, :k][None]
    m = set_agreement(ia, ib)
    ch = chance_levels(e, k)
    assert ch["exact"] == pytest.approx(1 / 28)
    assert m["exact"].mean() == pytest.approx(ch["exact"], abs=0.005)
    assert m["jaccard"].mean() == pytest.approx(ch["jaccard"], abs=0.005)
    assert m["top1"].mean() == pytest.approx(ch["top1"], abs=0.01)


def _random_trace(seed: int, same_as: RoutingTrace | None = None) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    tr = RoutingTrace(["l0", "l1", "l2"], 6, 2)
    for i, n in enumerate((5, 9, 40, 1)):
        ids = np.argsort(rng.random((3, n, 6)), axis=-1)[..., :2]
        if same_as is not None:  # half the tokens keep the other trace's routing
            keep = rng.random((3, n)) < 0.5
            ids = np.where(keep[..., None], same_as[i].topk_ids, ids)
        tok = same_as[i].token_ids if same_as is not None else rng.integers(0, 9, n)
        tr.append(str(i), tok, ids, rng.random((3, n, 2)))
    return tr


def test_measure_agreement_in_chunks_equals_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import moescope.analysis.agreement as A

    a = _random_trace(0)
    b = _random_trace(1, same_as=a)
    al = align_traces(a, b)
    whole = measure_agreement(al).to_json()
    monkeypatch.setattr(A, "CHUNK_TOKENS", 7)
    chunked = measure_agreement(al).to_json()
    whole.pop("created"), chunked.pop("created")

    def rounded(x: object) -> object:  # sums in another order differ in the last bits
        if isinstance(x, float):
            return round(x, 12)
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x

    assert rounded(whole) == rounded(chunked)
    m = set_agreement(al.ids_a, al.ids_b, al.w_a, al.w_b)
    for i, x in enumerate(whole["layers"]):
        assert x["exact"] == pytest.approx(m["exact"][i].mean(), abs=1e-12)
        assert x["jaccard"] == pytest.approx(m["jaccard"][i].mean(), abs=1e-12)
        assert x["weighted_overlap"] == pytest.approx(m["weighted"][i].mean(), abs=1e-12)
        assert sum(x["expert_lost"]) == int((~m["hit_a"][i]).sum())
    assert 0.3 < whole["exact"] < 0.8 and whole["tokens"] == 55


def test_position_buckets() -> None:
    idx, labels = position_buckets(np.array([0, 1, 2, 3, 4, 7, 8, 40]))
    assert idx.tolist() == [0, 1, 2, 2, 3, 3, 4, 6]
    assert labels == ["0", "1", "2-3", "4-7", "8-15", "16-31", "32-63"]


# --------------------------------------------------------------------------- replay


def _router_sets(model: torch.nn.Module, toks: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """{seq_id: [L, S, K]} top-k from transformers' own router logits, float64."""
    k = model.config.num_experts_per_tok
    ids = torch.stack(list(toks.values()))  # equal lengths: one forward, no padding
    b, s = ids.shape
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    sets = np.stack([torch.topk(x.double(), k, dim=-1).indices.numpy() for x in logits])
    sets = sets.reshape(len(logits), b, s, k)
    return {sid: sets[:, i] for i, sid in enumerate(toks)}


def _reference(sa: dict[str, np.ndarray], sb: dict[str, np.ndarray]) -> tuple[list, list]:
    """Per layer exact-match rate and mean Jaccard, Python sets, float64."""
    layers = next(iter(sa.values())).shape[0]
    exact, jac = [], []
    for i in range(layers):
        hits, js, n = 0, 0.0, 0
        for sid in sa:
            for t in range(sa[sid].shape[1]):
                x, y = set(sa[sid][i, t].tolist()), set(sb[sid][i, t].tolist())
                hits += x == y
                js += len(x & y) / len(x | y)
                n += 1
        exact.append(hits / n)
        jac.append(js / n)
    return exact, jac


def test_same_model_replayed_twice_agrees_fully(mixtral: torch.nn.Module) -> None:
    toks = _tokens()
    a = replay(mixtral, toks)
    assert a.seq_ids == list(toks) and a.has_weights and a.top_k == 2 and a.num_experts == 8
    # The replayed routing is the model's own: transformers' router logits give the sets.
    ref = {}
    for n in sorted(set(LENGTHS)):
        ref.update(_router_sets(mixtral, {k: v for k, v in toks.items() if len(v) == n}))
    for sid in toks:
        np.testing.assert_array_equal(np.sort(a[sid].topk_ids, -1), np.sort(ref[sid], -1))
    res = agree(a, mixtral)  # B replays A's tokens
    assert res.num_tokens == sum(LENGTHS) and len(res.layers) == 2
    for x in res.layers:
        assert x.exact == x.jaccard == x.top1 == 1.0
        assert x.weighted_overlap == pytest.approx(1.0, abs=1e-6)
        assert x.worst_experts() == []
    assert res.verdict.startswith("routing agrees: B picks the same top-2 experts as A for 100.0%")
    assert res.worst_tokens == [] and res.worst_positions == []


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_vs_fp32_against_router_logits(family: str) -> None:
    model = _tiny(family)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    toks = _tokens(seed=2, lengths=(64,) * 8)
    res = agree(model, bf16, tokens=toks, labels=["fp32", "bf16"])
    exact, jac = _reference(_router_sets(model, toks), _router_sets(bf16, toks))
    for x, e, j in zip(res.layers, exact, jac, strict=True):
        assert x.exact == pytest.approx(e, abs=1e-12)
        assert x.jaccard == pytest.approx(j, abs=1e-12)
    # A real mismatch: bf16 routes a few tokens differently, never most of them
    # (measured here: exact set match mixtral 99.6 %, qwen2_moe 99.4 %, 512 tokens x 2 layers).
    assert 0.9 < res.exact < 1.0, res.verdict
    assert res.weights_kind == "both" and 0.9 < res.weighted_overlap < 1.0
    assert res.worst_positions and res.worst_positions[0]["layers_disagreeing"] >= 1


def test_router_noise_lowers_agreement_monotonically(mixtral: torch.nn.Module) -> None:
    toks = _tokens(seed=3, lengths=(48,) * 4)
    base = replay(mixtral, toks)
    # Not seed 0: build_tiny drew the router weights from that stream, and noise along the
    # weights only rescales the logits (top-k unchanged).
    gen = torch.Generator().manual_seed(1234)
    noisy = copy.deepcopy(mixtral)
    gates = [m.weight for n, m in noisy.named_modules() if n.endswith("mlp.gate")]
    assert len(gates) == 2
    direction = [torch.randn(g.shape, generator=gen) * g.std() for g in gates]
    clean = [g.detach().clone() for g in gates]
    exact, jac = [], []
    for scale in (0.0, 0.05, 0.2, 0.6, 2.0):
        with torch.no_grad():
            for g, c, d in zip(gates, clean, direction, strict=True):
                g.copy_(c + scale * d)
        res = agree(base, noisy)
        exact.append(res.exact)
        jac.append(res.jaccard)
    assert exact[0] == 1.0 and jac[0] == 1.0
    assert all(x >= y for x, y in itertools.pairwise(exact)), exact
    assert all(x >= y for x, y in itertools.pairwise(jac)), jac
    assert exact[-1] < 0.6 and exact[1] > exact[-1]


# --------------------------------------------------------------------------- alignment


def test_off_by_one_token_is_refused(mixtral: torch.nn.Module) -> None:
    toks = _tokens()
    a = replay(mixtral, toks)
    shifted = {sid: t[1:] for sid, t in toks.items()}  # the same text, one token later
    b = replay(mixtral, shifted)
    with pytest.raises(TraceAlignmentError, match=r"sequence 's0': token ids differ.*shifted by 1"):
        align_traces(a, b)
    # A trace whose routing is shifted by one position (ids equal, routing misaligned)
    # must not look like agreement either.
    rolled = RoutingTrace(a.layers, a.num_experts, a.top_k)
    for s in a:
        rolled.append(s.seq_id, s.token_ids, np.roll(s.topk_ids, 1, axis=1), None)
    assert agree(a, rolled).exact < 0.6


def test_prefix_compares_the_common_prefix_only(mixtral: torch.nn.Module) -> None:
    toks = _tokens()
    a = replay(mixtral, toks)
    # An engine that never routed the last sampled token: one token fewer per sequence.
    b = replay(mixtral, {k: v[:-1] for k, v in toks.items()})
    with pytest.raises(TraceAlignmentError, match="--prefix compares a common prefix"):
        agree(a, b)
    res = agree(a, b, prefix=True)
    assert res.exact == 1.0 and res.num_tokens == sum(LENGTHS) - len(LENGTHS)
    assert any("4 tokens beyond the common prefix" in n for n in res.notes)
    shifted = replay(mixtral, {k: v[1:] for k, v in toks.items()})
    with pytest.raises(TraceAlignmentError, match="shifted by 1"):
        agree(a, shifted, prefix=True)  # a shift is never a prefix


def test_alignment_is_by_seq_id_not_order(mixtral: torch.nn.Module) -> None:
    a = replay(mixtral, _tokens())
    b = a.subset(list(reversed(a.seq_ids))[:3])
    res = agree(a, b)
    assert res.exact == 1.0 and res.num_sequences == 3 and res.only_a == 1
    assert any("left out" in n for n in res.notes)
    other = RoutingTrace(a.layers, a.num_experts, a.top_k)
    other.append("zz", [1], np.zeros((2, 1, 2), dtype=int))
    with pytest.raises(TraceAlignmentError, match="share no seq_id"):
        agree(a, other)
    wide = RoutingTrace(["x"], a.num_experts, a.top_k)
    with pytest.raises(TraceAlignmentError, match="A has 2 MoE layers, B has 1"):
        agree(a, wide)


# --------------------------------------------------------------------------- sources


def test_token_recorder_source_and_files(mixtral: torch.nn.Module, tmp_path: Path) -> None:
    toks = _tokens()
    batches = [v[None] for v in toks.values()]
    routing = record_routing(mixtral, batches, weights=True)
    assert set(routing.weights) == set(routing.layers)
    # The recorded weights are Mixtral's combine weights: softmax, top-2, renormalised
    # (float64 from transformers' router logits), slot 0 the largest.
    with torch.no_grad():
        logits = mixtral(input_ids=batches[0], output_router_logits=True).router_logits
    for layer, lg in zip(routing.layers, logits, strict=True):
        top = torch.topk(torch.softmax(lg.double(), -1), 2, dim=-1).values
        ref = (top / top.sum(-1, keepdim=True)).numpy()
        np.testing.assert_allclose(routing.weights[layer][: ref.shape[0]], ref, atol=1e-6)
    tr = trace_from_token_routing(routing)
    assert tr.seq_ids == ["0", "1", "2", "3"] and tr.has_weights
    direct = replay(mixtral, list(toks.values()))
    assert agree(tr, direct).exact == 1.0
    # TokenRouting.save files and trace files are both accepted as a side.
    p = routing.save(tmp_path / "routing.npz")
    loaded = load_trace(p)
    assert loaded.seq_ids == tr.seq_ids and loaded.has_weights
    np.testing.assert_array_equal(loaded[1].topk_weights, tr[1].topk_weights)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(AnalyzeError, match=r"not a readable \.npz"):
        load_trace(tmp_path / "bad.npz")
    res = agree(str(p), direct.save(tmp_path / "direct.jsonl"))
    assert res.exact == 1.0 and res.weighted_overlap == pytest.approx(1.0, abs=1e-6)


def test_analyze_save_trace_replays_exactly(tmp_path: Path) -> None:
    from moescope.analysis import run_analyze
    from moescope.data import stdlib_dir

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    data = stdlib_dir() / "bisect.py"
    report = run_analyze(model=str(ckpt), data=[str(data)], max_tokens=150, batch_size=2,
                         seq_len=32, save_trace=True, out=str(tmp_path / "out"), progress=False)  # fmt: skip
    trace = load_trace(report.parent / "routing_trace.npz")
    # analyze's batches: rows of 32 bytes, then the 22-byte remainder as its own row.
    assert trace.seq_ids == [f"bisect/{i}" for i in range(5)] and trace.has_weights
    got = np.concatenate([s.token_ids for s in trace])
    np.testing.assert_array_equal(got, np.frombuffer(data.read_bytes()[:150], dtype=np.uint8))
    # The same checkpoint replaying those rows routes every token the same way.
    res = agree(trace, str(ckpt))
    assert res.exact == 1.0 and res.weighted_overlap == pytest.approx(1.0, abs=1e-6)


def _train(lr: float, steps: int = 3, record: bool = True) -> RoutingTrace:
    from moescope import create_moe_callback_for_pytorch
    from moescope.nn.model import TinyMoEConfig, TinyMoELM

    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=16,
        num_experts=4,
        top_k=2,
        max_seq_len=32,
    )
    model = TinyMoELM(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(5)
    cb = create_moe_callback_for_pytorch(model, log_every_n_steps=1, logger=None)
    rec = TraceRecorder(cb.monitor, max_tokens=10_000, source={"lr": lr}).attach()
    for _ in range(steps):
        ids = torch.randint(0, 64, (3, 10), generator=gen)
        cb.on_step_begin()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        cb.on_step_end()
    rec.detach()
    cb.cleanup()
    return rec.trace()


def test_trace_recorder_never_stops_the_forward(
    mixtral: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moescope import MoEMonitor

    mon = MoEMonitor(mixtral)
    rec = TraceRecorder(mon, max_tokens=1000).attach()

    def boom() -> None:
        raise RuntimeError("host copy failed")  # any failure inside the recorder

    with torch.no_grad():
        mixtral(input_ids=torch.randint(3, 128, (2, 5)))
        monkeypatch.setattr(rec.recorder, "_flush", boom)
        with pytest.warns(UserWarning, match="recording switched off.*host copy failed"):
            mixtral(input_ids=torch.randint(3, 128, (2, 5)))
        mixtral(input_ids=torch.randint(3, 128, (2, 5)))  # runs, not recorded
    rec.detach()
    mon.detach()
    tr = rec.trace()
    assert tr.seq_ids == ["0", "1"] and tr.num_tokens == 10


def test_two_training_side_traces() -> None:
    a, b, c = _train(0.0), _train(0.0), _train(3.0)
    assert len(a) == 9 and a.has_weights and a.source["engine"] == "moescope-training"
    assert agree(a, b).exact == 1.0  # the same run twice
    res = agree(a, c)  # the same batches, weights moved by large SGD steps
    assert res.exact < 1.0
    # Step 1's batch (sequences 0-2) ran before any update: identical there.
    first = agree(a.subset(["0", "1", "2"]), c.subset(["0", "1", "2"]))
    assert first.exact == 1.0
    assert agree(a.subset(["6", "7", "8"]), c.subset(["6", "7", "8"])).exact < 1.0


# --------------------------------------------------------------------------- outputs, CLI


def test_outputs_and_cli(mixtral: torch.nn.Module, tmp_path: Path, capsys) -> None:
    from moescope.cli import main

    toks = _tokens(seed=2, lengths=(64,) * 4)
    mixtral.save_pretrained(tmp_path / "model")
    a = replay(mixtral, toks).save(tmp_path / "a.jsonl")
    rc = main(["agree", str(a), str(tmp_path / "model"), "--dtype-b", "bfloat16",
               "--out", str(tmp_path / "out"), "--labels", "fp32,bf16"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["format"] == "moescope.agree/1" and summary["verdict"] in printed
    api = agree(str(a), str(tmp_path / "model"), dtype_b="bfloat16")
    assert summary["exact"] == pytest.approx(api.exact) and summary["tokens"] == 256
    lines = [json.loads(x) for x in (tmp_path / "out" / "agreement.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["agree_layer", "agree_layer", "agree_summary"]
    assert lines[0]["exact"] == pytest.approx(summary["layers"][0]["exact"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert summary["verdict"].split(":")[0] in html and "Agreement by position" in html
    # An off-by-one trace: one error line, exit status 2.
    b = replay(mixtral, {k: v[:-1] for k, v in toks.items()}).save(tmp_path / "b.jsonl")
    assert main(["agree", str(a), str(b), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token ids differ" in err[0], err
    assert main(["agree", str(tmp_path / "model"), str(tmp_path / "model")]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_write_agreement_refuses_foreign_dir(mixtral: torch.nn.Module, tmp_path: Path) -> None:
    res = measure_agreement(align_traces(*(2 * [replay(mixtral, _tokens())])))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(AnalyzeError):
        write_agreement(res, tmp_path / "x")


def test_training_option_writes_the_trace_when_full(tmp_path: Path) -> None:
    """``routing_trace_tokens=N`` on any integration: the file appears as soon as N tokens
    are in (not only at the end, so a crash later loses nothing) and equals a recorder
    attached by hand to the same run."""
    from moescope import MoECallbackOptions, MoEPyTorchCallback
    from moescope.nn.model import TinyMoEConfig, TinyMoELM

    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=16, num_experts=4, top_k=2, max_seq_len=32)  # fmt: skip
    model = TinyMoELM(cfg)
    opts = MoECallbackOptions(log_every_n_steps=1, log_to_console=False, log_heatmap_every=None,
                              log_dir=str(tmp_path), routing_trace_tokens=60)  # fmt: skip
    cb = MoEPyTorchCallback(model, opts)
    by_hand = TraceRecorder(cb.monitor, max_tokens=60).attach()
    path = tmp_path / "routing_trace.npz"
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        ids = torch.randint(0, 64, (3, 10), generator=gen)
        cb.on_step_begin()
        with torch.no_grad():
            model(input_ids=ids)
        cb.on_step_end()
        assert path.exists() == (step >= 1)  # 30 tokens per step: full after the second
    cb.cleanup()
    by_hand.detach()
    written = load_trace(path)
    assert written.num_tokens == 60 and written.has_weights
    res = agree(written, by_hand.trace())
    assert res.exact == 1.0 and res.weighted_overlap == pytest.approx(1.0, abs=1e-9)
