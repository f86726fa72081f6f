"""Helpers shared by the test files (plain functions: ``from conftest import ...``).

pytest puts this folder on ``sys.path`` (as for ``hf_sweep`` and ``hf_tiny``), so test
modules import the helpers by name; fixtures wrap them where a test wants one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moescope.capture.record import RoutingRecord
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.stats import LayerAccumulator, LayerStats, layer_stats_from_state, states_to_numpy

REFERENCE_MODELS = Path(__file__).parent / "data" / "reference" / "models"
"""Real MoE configs with published and exact parameter counts (tests/data/reference/README.md)."""


def random_layer_stats(
    seed: int,
    e: int,
    k: int,
    t: int = 64,
    skew: float = 0.0,
    mask: str = "all",
    coactivation: bool = False,
) -> LayerStats:
    """LayerStats of one layer fed ``t`` tokens of random routing through the real
    accumulator (logits ~ N(0, 1) [t, e], the top-``k`` of each row).

    ``skew`` > 0 favours low expert ids (logit of expert i lowered by skew * i / e).
    ``mask``: ``"all"`` every token real, ``"none"`` every token padding (a window
    without tokens: NaN metrics), ``"some"`` about 80 % real (random).
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=gen) - skew * torch.arange(e) / e
    idx = torch.topk(logits, k, -1).indices
    token_mask = {
        "all": None,
        "none": torch.zeros(t, dtype=torch.bool),
        "some": torch.rand(t, generator=gen) > 0.2,
    }[mask]
    acc = LayerAccumulator(e, k, coactivation=coactivation)
    acc.update(
        RoutingRecord(
            layer="x", num_experts=e, topk_index=idx, logits=logits, token_mask=token_mask
        )
    )
    return layer_stats_from_state(states_to_numpy({"x": acc.state()})["x"], e, k)


def routed_tiny_lm(seed: int = 0, experts: int = 8, top_k: int = 2) -> TinyMoELM:
    """A 2-layer TinyMoELM (vocab 64, hidden 32) in eval mode whose router weights are
    scaled by 50, so routing is far from uniform (more informative token-level tests)."""
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        num_experts=experts,
        top_k=top_k,
    )
    torch.manual_seed(seed)
    model = TinyMoELM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(50.0)
    return model


def padded_batch(
    seed: int, lo: int = 0, hi: int = 64, b: int = 3, s: int = 12
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids and mask: row 1 right-padded by 3, row 2 left-padded by 4 (padding ids 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s - 3 :] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


#: A tiny Mixtral config.json (byte vocabulary: ids 0-255 fit), for random-weight models.
TINY_MIXTRAL: dict[str, Any] = {
    "model_type": "mixtral",
    "vocab_size": 256,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A saved TinyMoELM checkpoint (2 layers, 4 experts, top-2, byte vocabulary) at
    ``path``, as ``moescope analyze --model`` loads it; returns ``path``."""
    from moescope.nn.hf import TinyMoEForCausalLM

    torch.manual_seed(seed)
    cfg = TinyMoEConfig(
        vocab_size=256,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        num_experts=4,
        top_k=2,
        max_seq_len=128,
    )
    TinyMoEForCausalLM.from_tiny(TinyMoELM(cfg)).save_pretrained(path)
    return path
