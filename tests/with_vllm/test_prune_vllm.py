"""A checkpoint written by ``moescope.prune`` loads and serves in vLLM (CPU build).

A tiny Qwen3-MoE (8 experts, top-2) is pruned to 4 experts per layer by REAP saliency
measured on a few prompts; vLLM loads the pruned directory (its config says 4 experts, its
tensors hold 4), generates, and moescope's vLLM plugin counts routing over exactly the 4
kept experts, equal per layer to transformers + moescope's HF adapter on the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_vllm_monitor import (
    MAX_TOKENS,
    _prompts,
    fed_tokens,
    hf_counts,
    run_scenario,
    vllm_layers,
)
from tiny_ckpt import build_checkpoint

from moescope.stats import Snapshot

pytest.importorskip("vllm")


def test_pruned_qwen3_moe_serves_in_vllm(tmp_path: Path) -> None:
    import transformers

    from moescope.prune import keep_experts, measure_saliency, prune_model

    src = build_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    calib = [torch.tensor([tok(p)["input_ids"]]) for p in _prompts()]
    sal = measure_saliency(model, calib)
    keep = {s.layer: keep_experts(s, 4, "saliency").tolist() for s in sal}
    pruned, _ = prune_model(model, keep)
    out = tmp_path / "pruned"
    pruned.save_pretrained(out)
    tok.save_pretrained(out)

    spec = {
        "model": str(out),
        "prompts": _prompts()[:2],
        "max_tokens": MAX_TOKENS,
        "eager": True,
        "options": {"counts_only": True},
    }
    res = run_scenario(tmp_path, spec)
    reqs = res["distinct"]["requests"]
    assert all(len(r["output_ids"]) > 0 for r in reqs)
    got = Snapshot.from_json(res["distinct"]["snapshot"])
    ref = hf_counts(out, [fed_tokens(r) for r in reqs])
    n_fed = sum(len(fed_tokens(r)) for r in reqs)
    for (name, g), (_, r) in zip(vllm_layers(got), ref.layers.items(), strict=True):
        assert g.num_experts == 4 and g.usage_counts.shape == (4,), name
        assert g.num_tokens == n_fed, name
        np.testing.assert_array_equal(g.usage_counts, r.usage_counts, err_msg=name)
