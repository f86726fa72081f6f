"""The graph-safe capture path inside a real (CPU, compiled) vLLM engine: every router call
added at once into persistent buffers, warm-up gated off by the device flag, padding by
the device valid-token count. It must be exact against transformers + moescope's HF
adapter on the same tokens: counts and co-activation exactly, entropy, top-1 and the aux
loss within 1e-4 (fp32 kernels differ in the last bits).

On a GPU the same path runs inside vLLM's CUDA graphs (``make gpu-check``); a CPU engine
captures no graphs, so here it is forced with ``options(graph_safe=True)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_vllm_monitor import _prompts, fed_tokens, hf_counts, run_scenario, vllm_layers  # noqa: E402
from tiny_ckpt import build_checkpoint  # noqa: E402

from moescope.stats.snapshot import Snapshot  # noqa: E402


@pytest.mark.parametrize("counts_only", [False, True], ids=["full", "counts_only"])
def test_graph_safe_engine_is_exact_against_transformers(tmp_path: Path, counts_only: bool) -> None:
    model = build_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    res = run_scenario(
        tmp_path,
        {
            "model": str(model),
            "prompts": _prompts(),
            "max_tokens": 6,
            "eager": False,
            "options": {"graph_safe": True, "counts_only": counts_only},
        },
    )
    warm = Snapshot.from_json(res["warmup"]["snapshot"])
    assert warm.total_tokens == 0  # warm-up and compile runs are gated off
    snap = Snapshot.from_json(res["distinct"]["snapshot"])
    seqs = [fed_tokens(r) for r in res["distinct"]["requests"]]
    ref = hf_counts(model, seqs)
    ours = vllm_layers(snap)
    theirs = sorted(ref.layers.items(), key=lambda kv: int(kv[0].split(".")[2]))
    assert len(ours) == len(theirs)
    for (vpath, v), (_, h) in zip(ours, theirs, strict=True):
        assert v.num_tokens == h.num_tokens == sum(len(s) for s in seqs), vpath
        np.testing.assert_array_equal(v.usage_counts, h.usage_counts, err_msg=vpath)
        np.testing.assert_array_equal(v.coactivation, h.coactivation, err_msg=vpath)
        if counts_only:
            assert np.isnan(v.routing_entropy)
            continue
        for name in ("routing_entropy", "top1_prob", "aux_loss"):
            assert getattr(v, name) == pytest.approx(getattr(h, name), abs=1e-4), (vpath, name)
