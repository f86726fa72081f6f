"""Tiny random transformers MoE models, one per family, for tests (no weights downloaded).

``build_tiny(family)`` returns ``(model, config)``: a ``*ForCausalLM`` in eval mode with
2 decoder layers, hidden size 32, 8 routed experts, K = 2, vocab 128, every layer sparse. Shared by the capture, cost and integration
tests; ``FAMILIES`` lists the families the generic adapter must handle.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 128
HIDDEN = 32
EXPERTS = 8
TOP_K = 2
LAYERS = 2

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    num_experts_per_tok=TOP_K,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Per family: (config class name, model class name, overrides). Overrides set every size
# field small and make every layer an MoE layer (first_k_dense_replace=0, mlp_only_layers=[],
# decoder_sparse_step=1, ...).
_DEEPSEEK_MLA = dict(
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=EXPERTS)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=EXPERTS,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=EXPERTS, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            num_experts=EXPERTS,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=2,
        ),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=EXPERTS)),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            **_DEEPSEEK_MLA,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            n_group=2,
            topk_group=1,
            **_DEEPSEEK_MLA,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_local_experts=EXPERTS,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
        ),
    ),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=EXPERTS)),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            num_experts=EXPERTS,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_dt_rank=4,
        ),
    ),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=EXPERTS)),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(num_local_experts=EXPERTS, layer_types=["linear_attention", "full_attention"]),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            moe_num_experts=EXPERTS,
            moe_k=TOP_K,
            moe_intermediate_size=32,
            moe_layer_start_index=0,
            moe_layer_interval=1,
            moe_num_shared_experts=1,
        ),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(num_experts=EXPERTS, moe_topk=TOP_K, num_shared_expert=1),
    ),
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
        ),
    ),
}

FAMILIES: list[str] = list(SPECS)

#: Families whose router scores are sigmoids (DeepSeek-V3 style, with correction bias).
SIGMOID_FAMILIES: frozenset[str] = frozenset({"deepseek_v3", "glm4_moe", "dots1"})


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{block path: fused experts module}`` found independently of moescope's adapters."""
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(".experts") and isinstance(
            getattr(mod, "gate_up_proj", None), torch.Tensor
        ):
            out[name[: -len(".experts")]] = mod
    return out


def tiny_config(family: str, **overrides: Any) -> Any:
    """The tiny config of ``family`` (a transformers ``PretrainedConfig``)."""
    import transformers

    cfg_name, _, extra = SPECS[family]
    kwargs = {**_COMMON, **extra, **overrides}
    cfg = getattr(transformers, cfg_name)(**kwargs)
    return cfg


def build_tiny(family: str, seed: int = 0, **overrides: Any) -> tuple[torch.nn.Module, Any]:
    """A tiny random ``*ForCausalLM`` of ``family`` in eval mode, float32, on CPU."""
    import transformers

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, SPECS[family][1])(cfg)
    # Random routers: transformers initialises some router weights to zero (all ties);
    # give every parameter a small random value so routing is non-trivial.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            # Weights only: biases such as e_score_correction_bias keep their init.
            if name.endswith(("gate.weight", "router.weight", "gate.wg.weight")) or (
                name.endswith("weight") and p.dim() >= 2 and p.abs().sum() == 0
            ):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval(), cfg


def padded_batch(
    batch: int = 2, seq: int = 7, seed: int = 0, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], attention_mask [B, S]) with padding on every row but the first."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        pad = min(b * 2, seq - 1)
        if left:
            mask[b, :pad] = 0
        else:
            mask[b, seq - pad :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
