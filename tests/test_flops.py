"""FLOPs per token: the formula against torch's FlopCounterMode on real forwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moescope
from conftest import REFERENCE_MODELS
from moescope.cost import count_parameters, flops_per_token, mean_attended_keys
from moescope.nn import GroupedExperts

transformers = pytest.importorskip("transformers")
masking = pytest.importorskip("transformers.masking_utils")

MODELS_DIR = REFERENCE_MODELS

_COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=6),
    "olmoe": dict(num_experts=8),
    # shared expert with its sigmoid gate (Linear H -> 1), q/k/v biases (addmm)
    "qwen2_moe": dict(
        num_experts=8,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    # MLA (d_qk = 8 + 8 != d_v = 12), one dense layer, shared expert, group-limited top-k
    "deepseek_v3": dict(
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        num_key_value_heads=4,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
    ),
}


def _build(model_type: str, **kw: Any) -> Any:
    cfg = transformers.AutoConfig.for_model(model_type, **{**_COMMON, **FAMILIES[model_type], **kw})
    # Eager attention materialises Q K^T and A V as bmm; the eager experts backend runs
    # each expert only on the tokens routed to it, so the counter sees K experts per token.
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.set_experts_implementation("eager")
    return model


def _measure(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, dict[str, int]]:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(ids)
    return {
        mod: {str(op): int(n) for op, n in ops.items()} for mod, ops in fc.get_flop_counts().items()
    }


def _matmul(counts: dict[str, int]) -> int:
    return counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)


def _attention_bmm(flops: dict[str, dict[str, int]]) -> int:
    # Only the score/value bmm of the attention modules (RoPE tables may use matmuls too).
    return sum(ops.get("aten.bmm", 0) for mod, ops in flops.items() if mod.endswith("self_attn"))


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_matmul_and_attention_flops_match_flop_counter(model_type: str) -> None:
    model = _build(model_type)
    b, s = 2, 10
    ids = torch.randint(3, 96, (b, s), generator=torch.Generator().manual_seed(1))
    flops = _measure(model, ids)
    t = b * s
    rep = flops_per_token(model, seq_len=s, attention="full")
    assert _matmul(flops["Global"]) == t * rep.matmul_flops
    # The eager kernel computes every (query, key) pair: S keys per token.
    assert _attention_bmm(flops) == pytest.approx(t * rep.attention_flops, rel=0, abs=0)
    assert rep.flops_per_token == rep.matmul_flops + rep.attention_flops


@pytest.mark.parametrize("k", [1, 3])
def test_routed_expert_flops_scale_with_k(k: int) -> None:
    model = _build("mixtral", num_experts_per_tok=k)
    b, s = 3, 7
    ids = torch.randint(3, 96, (b, s), generator=torch.Generator().manual_seed(2))
    flops = _measure(model, ids)
    rep = flops_per_token(model, seq_len=s)
    per_expert = count_parameters(model).routed_expert_params_per_expert
    assert per_expert is not None
    for layer in range(2):
        experts = flops[f"MixtralForCausalLM.model.layers.{layer}.mlp.experts"]
        # Each token visits exactly K experts: 2 x K x (gate_up + down) per token.
        assert _matmul(experts) == b * s * k * 2 * per_expert
    assert rep.matmul_breakdown["routed_experts"] == 2 * 2 * k * per_expert


def test_tiny_moe_lm_matmul_flops() -> None:
    model_mod = pytest.importorskip("moescope.nn.model")
    cfg = model_mod.TinyMoEConfig(
        vocab_size=64,
        hidden_size=16,
        num_layers=3,
        num_heads=2,
        intermediate_size=8,
        num_experts=4,
        top_k=2,
        moe_every=2,
        num_shared_experts=1,
    )
    torch.manual_seed(0)
    model = model_mod.TinyMoELM(cfg).eval()
    for mod in model.modules():
        if isinstance(mod, GroupedExperts) and hasattr(mod, "backend"):
            # FlopCounterMode has no formula for grouped_mm; the loop runs one mm per
            # expert over its routed rows, the same arithmetic.
            mod.backend = "loop"
    b, s = 2, 9
    ids = torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(3))
    flops = _measure(model, ids)
    rep = flops_per_token(model, seq_len=s)
    assert _matmul(flops["Global"]) == b * s * rep.matmul_flops
    # causal default: (S + 1) / 2 keys per token, q and v head dims = H / heads
    assert rep.attention_flops == pytest.approx(3 * 2 * 2 * 2 * 8 * (s + 1) / 2)


@pytest.mark.parametrize("s", [1, 5, 16, 37])
@pytest.mark.parametrize("w", [1, 4, 16, 64])
def test_mean_attended_keys_matches_transformers_masks(s: int, w: int) -> None:
    def mean_keys(fn: Any) -> float:
        # transformers' mask functions broadcast over index tensors: [S, 1] x [1, S].
        q = torch.arange(s).view(s, 1)
        kv = torch.arange(s).view(1, s)
        allowed = torch.as_tensor(fn(torch.tensor(0), torch.tensor(0), q, kv))
        return float(allowed.expand(s, s).to(torch.float64).sum() / s)

    assert mean_attended_keys(s) == pytest.approx(mean_keys(masking.causal_mask_function))
    sliding = masking.sliding_window_causal_mask_function(w)
    assert mean_attended_keys(s, "sliding", w) == pytest.approx(mean_keys(sliding))
    chunked = masking.chunked_causal_mask_function(w, torch.zeros(1, dtype=torch.long))
    assert mean_attended_keys(s, "chunked", w) == pytest.approx(mean_keys(chunked))
    assert mean_attended_keys(s, causal=False) == s
    assert mean_attended_keys(s, "sliding", w, causal=False) == min(s, w)


def _ref(name: str) -> Path:
    path = MODELS_DIR / f"{name}.json"
    return path


def test_mixtral_reference_flops_formula() -> None:
    path = _ref("mixtral-8x7b-v0.1")
    c = json.loads(path.read_text())["config"]
    s = 4096
    rep = flops_per_token(path, seq_len=s, embeddings="both")
    p = count_parameters(path, "head")
    # Mixtral has no biases: every active non-norm parameter except the lookup is a matmul.
    assert rep.matmul_flops == 2 * (p.active_params - p.breakdown["norms"])
    want_attn = 2 * 2 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"]
    assert rep.attention_flops == pytest.approx(want_attn * (s + 1) / 2)
    full = flops_per_token(path, seq_len=s, attention="full")
    assert full.attention_flops == pytest.approx(want_attn * s)
    none = flops_per_token(path, seq_len=s, embeddings="none")
    assert rep.matmul_flops - none.matmul_flops == 2 * c["vocab_size"] * c["hidden_size"]
    assert flops_per_token(path, seq_len=s, embeddings="head").matmul_flops == rep.matmul_flops


def test_gpt_oss_sliding_layers() -> None:
    path = _ref("gpt-oss-20b")
    c = json.loads(path.read_text())["config"]
    s, w = 4096, c["sliding_window"]
    rep = flops_per_token(path, seq_len=s)
    per_key = 2 * c["num_attention_heads"] * 2 * c["head_dim"]
    n_full = c["layer_types"].count("full_attention")
    n_slide = c["layer_types"].count("sliding_attention")
    slide_keys = sum(min(i, w) for i in range(1, s + 1)) / s
    assert rep.attention_flops == pytest.approx(
        per_key * (n_full * (s + 1) / 2 + n_slide * slide_keys)
    )
    assert [spec.kind for spec in rep.attention_layers].count("sliding") == n_slide


def test_deepseek_mla_head_dims() -> None:
    path = _ref("deepseek-v3")
    c = json.loads(path.read_text())["config"]
    rep = flops_per_token(path, seq_len=1)
    spec = rep.attention_layers[0]
    assert spec.qk_head_dim == c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    assert spec.v_head_dim == c["v_head_dim"]
    assert rep.num_attention_layers == c["num_hidden_layers"]


def test_top_level_export_and_bad_args() -> None:
    assert moescope.flops_per_token is flops_per_token
    model = _build("mixtral")
    with pytest.raises(ValueError, match="attention must be"):
        flops_per_token(model, seq_len=8, attention="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seq_len must be positive"):
        flops_per_token(model, seq_len=0)
    d = flops_per_token(model, seq_len=8).to_dict()
    json.dumps(d)
    assert d["flops_per_token"] == d["matmul_flops"] + d["attention_flops"]
