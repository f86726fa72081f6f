"""Tiny MoE checkpoints (random weights, seeded) with a locally trained tokenizer.

Built from transformers' config classes and saved to a directory vLLM can load; nothing
is downloaded. Used by the vLLM tests and ``benchmarks/vllm_overhead.py``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

#: family -> (config class name, model class name, extra config kwargs)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "decoder_sparse_step": 1, "norm_topk_prob": True},
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {"num_experts": 8, "num_experts_per_tok": 2},
    ),
}  # fmt: skip


def corpus_text() -> str:
    """Text from Python's standard library (a fixed, always-present source)."""
    return Path(inspect.getsourcefile(json.decoder) or "").read_text()  # type: ignore[arg-type]


def train_tokenizer(out: Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE on :func:`corpus_text` and save it (transformers format)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return fast


def build_checkpoint(
    out: Path,
    family: str = "qwen3_moe",
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    **overrides: Any,
) -> Path:
    """Save a tiny random ``family`` model (float32) and a tokenizer into ``out``.

    ``overrides`` replace config fields (e.g. ``num_experts=64, num_experts_per_tok=8``).
    """
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out)
    if family not in FAMILIES:  # any other MoE model_type: a generic tiny config
        from families import tiny_config

        cfg = tiny_config(family, len(tok), tok.eos_token_id, **overrides)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32)
        _sharpen_routers(model)
        model.save_pretrained(out)
        return out
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **{**extra, **overrides},
    )
    cfg.torch_dtype = "float32"
    cfg.dtype = "float32"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(torch.float32)
    _sharpen_routers(model)
    model.save_pretrained(out)
    return out


def _sharpen_routers(model: Any) -> None:
    """Larger router weights than the default init, so routing is far from uniform and
    top-k ties (which two implementations may break differently) do not occur."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)
            if (
                len(leaf) == 3
                and leaf[1] in ("gate", "router")
                and leaf[2] == "weight"
                and "experts" not in name
            ):
                p.normal_(0.0, 0.5)


if __name__ == "__main__":
    import sys

    print(build_checkpoint(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "qwen3_moe"))
