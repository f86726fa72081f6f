"""Capture adapter for Llama 4 MoE blocks (transformers 5.x ``Llama4TextMoe``).

Llama 4 (Meta 2025, "The Llama 4 herd"; token-choice top-k with sigmoid gates) routes
differently from the common pattern: ``Llama4Router.forward`` returns
``(scores[T,E], logits[T,E])`` where ``scores = sigmoid(topk-scattered logits)`` is 0 for
unselected experts, and ``Llama4TextExperts`` runs *every* expert densely on the input
scaled by those scores (``routed_in = x * score``), plus an always-on shared expert that is
not routed. Blocks live at ``model.layers.N.feed_forward`` (``model.language_model...`` in
the multimodal model); dense layers of interleaved models are plain MLPs and never match.
"""

from __future__ import annotations

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo
from moescope.capture.record import RoutingRecord

__all__ = ["ADAPTERS", "Llama4Adapter"]


def _has_class(module: object, class_name: str) -> bool:
    return any(c.__name__ == class_name for c in type(module).__mro__)


class Llama4Adapter:
    """Adapter for ``Llama4TextMoe`` blocks.

    Records per block call (T tokens, E routed experts, K = ``num_experts_per_tok``):

    - ``topk_index`` [T, K]: ``torch.topk(logits, K, dim=1).indices``, the very call the
      router makes on the same tensor, so the set (and its order) is the model's. The
      router does not return it, and reading "non-zero score" instead would lose a chosen
      expert whose sigmoid underflows to 0.
    - ``topk_weight`` [T, K]: the sigmoid scores of the chosen experts. Llama 4 multiplies
      the expert *input* by them (not the output), so they are gates, not a convex mix.
    - ``logits`` [T, E] with ``score_fn="sigmoid"``; no capacity, so ``dropped`` is None.

    The shared expert is not routed and produces no record.
    """

    name = "hf_llama4"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        """LayerInfo for a block whose ``router`` is a ``Llama4Router``, else None."""
        router = getattr(module, "router", None)
        experts = getattr(module, "experts", None)
        if router is None or experts is None or not _has_class(router, "Llama4Router"):
            return None
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=int(router.num_experts),
            top_k=int(router.top_k),
            module=module,
            expert_modules=(experts,),
            router=router,
            experts=experts,
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        """Hook the router's forward output; returns a function removing the hook."""
        router = info.router
        assert router is not None  # every match() of this adapter names it
        path = info.path
        num_experts = info.num_experts

        def hook(
            mod: nn.Module, _args: tuple[object, ...], out: tuple[torch.Tensor, torch.Tensor]
        ) -> None:
            if not ctx.counting:
                return
            scores, logits = out  # [T,E] each
            with torch.no_grad():
                lg = logits.detach().reshape(-1, num_experts)
                # Read top_k from the module at call time: the router uses its own attribute.
                # A plain attribute; torch types every module attribute Tensor | Module.
                top_k = mod.top_k
                assert not isinstance(top_k, nn.Module)
                index = torch.topk(lg, int(top_k), dim=1).indices
                weight = scores.detach().reshape(-1, num_experts).gather(1, index)
            emit(
                RoutingRecord(
                    layer=path,
                    num_experts=num_experts,
                    topk_index=index,
                    logits=lg,
                    score_fn="sigmoid",
                    topk_weight=weight,
                    token_mask=ctx.token_mask(lg.shape[0]),
                )
            )

        handle = router.register_forward_hook(hook)
        return handle.remove


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[Llama4Adapter] = [Llama4Adapter()]
