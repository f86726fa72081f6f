"""Adapter for moescope's own ``moescope.nn.MoELayer`` and ``ExpertParallelMoELayer`` blocks.

The router returns a ``RouterOutput``; the experts receive exactly its ``topk_index``,
``topk_weight`` and ``dropped``, so a forward hook on the router sees what the experts
will get. Padding: the top-level ``attention_mask`` (via the CaptureContext) is
preferred; otherwise the ``token_mask`` the layer itself was called with.

Expert parallelism (``moescope.nn.ExpertParallelMoELayer``): the layer has the same
replicated ``router``, ``forward(x, token_mask)`` and global ``num_experts`` as a
``MoELayer``, so it is captured the same way. Each rank records the router decisions of
its own (local) tokens, with global expert ids in [0, E); ``MoEMonitor.snapshot()``
all-reduces every sum over the process group (torch.distributed initialised with world
size > 1), so the snapshot is the global picture, identical on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo, router_bias
from moescope.capture.record import RoutingRecord
from moescope.nn.expert_parallel import ExpertParallelMoELayer
from moescope.nn.layer import MoELayer
from moescope.nn.routers import ExpertChoiceRouter


class NNAdapter:
    """Captures ``moescope.nn.MoELayer`` and ``moescope.nn.ExpertParallelMoELayer``: one
    RoutingRecord per layer call.

    Records carry ``logits`` [T, E] with the router's ``score_fn``, ``topk_index`` [T, K],
    ``topk_weight`` [T, K], ``dropped`` [T, K] (capacity / expert-choice routers) and the
    token mask [T].

    ``ExpertParallelMoELayer`` (experts sharded over the ranks of a process group) is
    reported with the GLOBAL E (``layer.num_experts``, not the rank's E_local) and the
    router's K. On each rank the records hold that rank's own tokens (T = local tokens)
    routed to global expert ids, i.e. the decisions its router made before the
    all-to-all, not the rows its local experts computed. ``MoEMonitor.snapshot()``
    all-reduces every sum over the process group, which turns them into the statistics of
    all tokens of all ranks, identical on every rank: usage, dropped and co-activation
    counts, aux loss, entropy, z-loss and top-1 probability equal those of one
    ``MoELayer`` with the same weights monitored over every rank's tokens (counts exactly,
    floats up to the order of summation); the count of expert e is the number of rows
    e's owner processed for valid tokens (each rank's own compute load, padding
    included, is ``ExpertParallelMoELayer.local_expert_load``).
    Per-update quantities count one update per rank and layer call: ``num_updates`` is
    world size x calls, ``unique_experts_per_batch`` the mean over ranks' local batches
    and ``unique_experts_max`` the maximum over them. Capacity routers (Switch, expert
    choice) apply their capacity to each rank's local tokens, so the snapshot equals
    monitoring the unsharded layer called once per rank's shard, not once on the
    concatenation. Neuron statistics (``neurons=True``) are not captured for this layer:
    its local experts see received rows with local expert ids.
    """

    name = "moescope.nn"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        if not isinstance(module, (MoELayer, ExpertParallelMoELayer)):
            return None
        # Both expose the replicated router and the GLOBAL number of experts E (for the
        # expert-parallel layer, not num_local_experts): records use global expert ids.
        router = module.router
        top_k = getattr(router, "top_k", None)
        active: int | None = None
        if not isinstance(top_k, int):
            # Expert choice uses one slot per expert (K = E); Switch is top-1.
            top_k = module.num_experts if isinstance(router, ExpertChoiceRouter) else 1
        if isinstance(router, ExpertChoiceRouter):
            # Each expert takes capacity_factor * T / E tokens: a token uses
            # capacity_factor experts on average, which is what a token costs.
            active = max(1, min(module.num_experts, round(float(router.capacity_factor))))
        experts = getattr(module, "experts", None)
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=int(module.num_experts),
            top_k=int(top_k),
            module=module,
            expert_modules=(experts,) if isinstance(experts, nn.Module) else (),
            router=router,
            active_top_k=active,
            expert_bias=router_bias(router),
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        layer = info.module
        router = info.router
        assert router is not None  # every match() of this adapter names it
        # The layer's own token_mask argument of the current call, flattened to [T].
        slot: dict[str, torch.Tensor | None] = {"mask": None}

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("token_mask", args[1] if len(args) > 1 else None)
            slot["mask"] = mask.reshape(-1) if isinstance(mask, torch.Tensor) else None

        def router_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not ctx.counting:
                return
            idx = getattr(out, "topk_index", None)
            if not isinstance(idx, torch.Tensor):
                return
            t = idx.shape[0]
            mask = ctx.token_mask(t)
            if mask is None:
                own = slot["mask"]
                mask = own.to(torch.bool) if own is not None and own.numel() == t else None
            emit(
                RoutingRecord(
                    layer=info.path,
                    num_experts=info.num_experts,
                    topk_index=idx,
                    logits=out.logits,
                    score_fn=out.score_fn,
                    topk_weight=out.topk_weight,
                    token_mask=mask,
                    dropped=out.dropped,
                )
            )

        handles = [
            layer.register_forward_pre_hook(pre_hook, with_kwargs=True),
            router.register_forward_hook(router_hook),
        ]

        def detach() -> None:
            for h in handles:
                h.remove()
            slot["mask"] = None

        return detach
