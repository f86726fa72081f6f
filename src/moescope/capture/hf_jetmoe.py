"""Capture adapter for ScatterMoE-style blocks: a top-k router + ``ParallelExperts``.

JetMoE (Shen et al. 2024, "JetMoE: Reaching Llama2 Performance with 0.1M Dollars",
arXiv:2404.07413) has two routed blocks per layer, neither with a fused ``experts``
child:

- ``JetMoeMoE`` (``model.layers.N.mlp``): MLP experts whose weights are two
  ``JetMoeParallelExperts`` (``input_linear`` / ``output_linear``, weight [E, out, in]);
- ``JetMoeMoA`` (``model.layers.N.self_attention.experts``): mixture-of-attention, the
  query and output projections are the experts (its ``map`` / ``reduce`` route; it has
  no ``forward``).

Both route with a ``router`` (``JetMoeTopKGating``) whose forward returns
``(index_sorted_experts [T*K], batch_index [T*K], batch_gates [T*K], expert_size [E],
logits [T, E])``: the T*K (token, slot) pairs sorted by expert, the token of each sorted
row, its gate, and how many rows each expert gets. The experts split the sorted rows by
``expert_size``; this adapter reads that very dispatch (nothing re-derived from the
logits): sorted row ``i`` goes to expert ``e`` where ``i`` falls in ``e``'s run of
``expert_size``, and ``index_sorted_experts[i]`` is the (token, slot) it came from.

Matched by structure: a block with a router child (``hf_structure.ROUTER_NAMES``) and
``input_linear`` / ``output_linear`` children holding 3-D ``weight`` [E, out, in].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo
from moescope.capture.hf_structure import block_token_mask, find_router, find_top_k, layer_index
from moescope.capture.record import RoutingRecord

__all__ = ["ADAPTERS", "ParallelExpertsAdapter"]


def _parallel_experts(module: nn.Module, name: str) -> int | None:
    """E of a ``ParallelExperts`` child (3-D ``weight`` [E, out, in]), else None."""
    child = getattr(module, name, None)
    w = getattr(child, "weight", None) if isinstance(child, nn.Module) else None
    if isinstance(w, torch.Tensor) and w.dim() == 3:
        return int(w.shape[0])
    return None


class ParallelExpertsAdapter:
    """Adapter for router + ``ParallelExperts`` blocks (jetmoe's MoE and MoA).

    Records per block call (T tokens, E experts, K slots):

    - ``topk_index`` [T, K]: the expert each (token, slot) was dispatched to, in the
      router's slot order;
    - ``topk_weight`` [T, K]: the gate that multiplies that expert's output;
    - ``logits`` [T, E], ``score_fn="softmax"`` (the router picks the top-k logits and
      softmaxes over the K chosen, as granite does); no capacity, ``dropped`` None.

    No neuron statistics: ParallelExperts expose no intermediate activations to moescope.
    """

    name = "hf_parallel_experts"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        e_in = _parallel_experts(module, "input_linear")
        e_out = _parallel_experts(module, "output_linear")
        if e_in is None or e_in != e_out:
            return None
        found = find_router(module)
        if found is None:
            return None
        _, router = found
        num = getattr(router, "num_experts", e_in)
        if num != e_in:
            return None
        top_k = find_top_k(module, router, getattr(module, "config", None), layer_index(path))
        if top_k is None:
            return None
        expert_in, expert_out = module.input_linear, module.output_linear
        # _parallel_experts found both as modules
        assert isinstance(expert_in, nn.Module) and isinstance(expert_out, nn.Module)
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=e_in,
            top_k=top_k,
            module=module,
            expert_modules=(expert_in, expert_out),
            router=router,
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        router = info.router
        assert router is not None  # every match() of this adapter names it
        path = info.path
        e = info.num_experts

        def hook(_mod: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            if not ctx.counting:
                return
            sorted_slots, _batch_index, gates, expert_size, logits = out
            with torch.no_grad():
                lg = logits.detach().reshape(-1, e)
                t = lg.shape[0]
                slots = sorted_slots.detach()
                k = slots.numel() // t if t else info.top_k
                sizes = torch.as_tensor(expert_size, device=slots.device)
                expert_of_row = torch.repeat_interleave(
                    torch.arange(e, device=slots.device), sizes, output_size=slots.numel()
                )
                index = torch.empty_like(slots).scatter_(0, slots, expert_of_row).view(t, k)
                weight = (
                    torch.empty(slots.numel(), dtype=gates.dtype, device=gates.device)
                    .scatter_(0, slots, gates.detach())
                    .view(t, k)
                )
            emit(
                RoutingRecord(
                    layer=path,
                    num_experts=e,
                    topk_index=index,
                    logits=lg,
                    score_fn="softmax",
                    topk_weight=weight,
                    token_mask=block_token_mask(ctx, path, t),
                )
            )

        handle = router.register_forward_hook(hook)
        return handle.remove


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[ParallelExpertsAdapter] = [ParallelExpertsAdapter()]
