"""Capture adapter for DBRX MoE blocks (transformers 5.x ``DbrxFFN``).

DBRX (Databricks 2024, "Introducing DBRX"; fine-grained top-4 of 16 experts) splits the
routing across modules: ``DbrxRouter.forward`` returns only ``logits[T,E]``;
``DbrxFFN.route_tokens_to_experts`` turns them into softmax top-k weights (optionally
p-norm renormalised, ``moe_normalize_expert_weights``), and the experts are called as
``experts(hidden[B,S,H], top_k_index[T,K], top_k_weights[T,K])``. Blocks live at
``transformer.blocks.N.ffn``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo
from moescope.capture.record import RoutingRecord

__all__ = ["ADAPTERS", "DbrxAdapter"]


def _has_class(module: object, class_name: str) -> bool:
    return any(c.__name__ == class_name for c in type(module).__mro__)


class DbrxAdapter:
    """Adapter for ``DbrxFFN`` blocks.

    Two hooks per block: a forward hook on the router keeps the logits of the current call,
    and a forward pre-hook on the experts reads the ``top_k_index`` [T, K] and
    ``top_k_weights`` [T, K] the model passes to them (nothing re-derived) and emits one
    record with ``logits`` [T, E], ``score_fn="softmax"``, no capacity (``dropped`` None).
    """

    name = "hf_dbrx"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        """LayerInfo for a block with a ``DbrxRouter`` and ``DbrxExperts``, else None."""
        router = getattr(module, "router", None)
        experts = getattr(module, "experts", None)
        if router is None or not _has_class(router, "DbrxRouter"):
            return None
        if experts is None or not _has_class(experts, "DbrxExperts"):
            return None
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=int(experts.num_experts),
            top_k=int(getattr(module, "top_k", 1)),
            module=module,
            expert_modules=(experts,),
            router=router,
            experts=experts,
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        """Hook router output and experts input; returns a function removing both hooks."""
        router = info.router
        assert router is not None  # every match() of this adapter names it
        experts = info.experts
        assert isinstance(router, nn.Module) and isinstance(experts, nn.Module)
        path = info.path
        num_experts = info.num_experts
        # The router's logits of the call in flight; consumed by the experts' pre-hook.
        pending: list[torch.Tensor] = []

        def router_hook(_mod: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            pending.clear()
            if ctx.counting:
                pending.append(out.detach().reshape(-1, num_experts))

        def experts_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            logits = pending.pop() if pending else None
            if not ctx.counting:
                return
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
            if len(vals) < 3:
                raise RuntimeError(
                    f"moescope {self.name}: {path}.experts was called without "
                    "(hidden_states, top_k_index, top_k_weights); this DBRX version is not "
                    "supported, register a custom adapter (see MoEAdapter)."
                )
            index = vals[1].detach()
            weight = vals[2].detach()
            if logits is not None and logits.shape[0] != index.shape[0]:
                logits = None
            emit(
                RoutingRecord(
                    layer=path,
                    num_experts=num_experts,
                    topk_index=index,
                    logits=logits,
                    score_fn="softmax",
                    topk_weight=weight,
                    token_mask=ctx.token_mask(index.shape[0]),
                )
            )

        handles = [
            router.register_forward_hook(router_hook),
            experts.register_forward_pre_hook(experts_hook, with_kwargs=True),
        ]

        def detach() -> None:
            for h in handles:
                h.remove()
            pending.clear()

        return detach


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[DbrxAdapter] = [DbrxAdapter()]
