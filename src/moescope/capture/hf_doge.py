"""Capture adapter for product-key experts held in embedding tables (doge's ``DogeCDMoE``).

Doge (SmallDoge 2025, "Cross Domain Mixture of Experts"; product-key retrieval after
Lample et al. 2019, "Large Memory Layers with Product Keys", arXiv:1907.05242) has no
``experts`` module: each of its E experts is ONE row of ``down_embed`` and of
``up_embed`` (``nn.Embedding(E, H)``), expert ``i * sqrt(E) + j`` scored by the sum of
two half-logits from ``router_gate`` (``nn.Linear(H, 2 sqrt(E))``). The block looks the
chosen experts up as ``down_embed(indices [T, K])``; this adapter reads that index (a
forward pre-hook on ``down_embed``), i.e. exactly the experts the block computes with.

What is not captured:

- ``logits``: the per-expert scores are never formed (only the 2 sqrt(E) key logits); a
  [T, E] matrix (E = 16384 in released checkpoints) would cost more than the layer, so
  ``logits`` is None and entropy, z-loss, aux loss and top-1 statistics are NaN;
- ``topk_weight``: the softmax over the K chosen scores multiplies activations inside
  the block without passing through a module; None;
- neurons: each expert is a single neuron (act(down_embed[i] . x)); moescope's neuron
  statistics (activated neurons per expert) do not apply and the layer is reported as
  unsupported with ``neurons=True``.

Matched by structure: a block with a router child (``hf_structure.ROUTER_NAMES``, here
``router_gate``) and ``down_embed`` / ``up_embed`` embeddings of equal size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo, as_rows
from moescope.capture.hf_structure import block_token_mask, find_router, find_top_k, layer_index
from moescope.capture.record import RoutingRecord

__all__ = ["ADAPTERS", "EmbeddingExpertsAdapter"]


class EmbeddingExpertsAdapter:
    """Adapter for blocks whose experts are rows of ``down_embed`` / ``up_embed``.

    Records per block call: ``topk_index`` [T, K] (the ids ``down_embed`` received),
    ``token_mask``; ``logits``, ``topk_weight`` and ``dropped`` are None.
    """

    name = "hf_embedding_experts"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        down = getattr(module, "down_embed", None)
        up = getattr(module, "up_embed", None)
        if not isinstance(down, nn.Embedding) or not isinstance(up, nn.Embedding):
            return None
        if down.num_embeddings != up.num_embeddings:
            return None
        found = find_router(module, exclude=down)
        if found is None:
            return None
        top_k = find_top_k(module, found[1], getattr(module, "config", None), layer_index(path))
        if top_k is None:
            return None
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=int(down.num_embeddings),
            top_k=top_k,
            module=module,
            expert_modules=(down, up),
            router=found[1],
            hooked=down,
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        down = info.hooked
        assert down is not None  # every match() of this adapter sets it
        path = info.path
        e = info.num_experts

        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not ctx.counting or not args or not isinstance(args[0], torch.Tensor):
                return
            idx = args[0].detach()
            idx = as_rows(idx, idx.shape[-1])
            emit(
                RoutingRecord(
                    layer=path,
                    num_experts=e,
                    topk_index=idx,
                    token_mask=block_token_mask(ctx, path, idx.shape[0]),
                )
            )

        handle = down.register_forward_pre_hook(hook)
        return handle.remove


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[EmbeddingExpertsAdapter] = [EmbeddingExpertsAdapter()]
