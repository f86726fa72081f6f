"""Capture adapter for Megatron-core's ``MoELayer`` (``megatron.core.transformer.moe``).

A Megatron-core GPT model with MoE holds one ``MoELayer`` per MoE transformer layer
(``decoder.layers.<i>.mlp``), with a ``TopKRouter`` (``router``), a token dispatcher
(``allgather``, ``alltoall`` or ``flex``), the routed experts (``experts``: SequentialMLP,
GroupedMLP, TEGroupedMLP) and optional shared experts (``shared_experts``). Nothing of
Megatron is imported here: modules are recognised by class name, so ``import moescope``
stays free of Megatron.

What the router hands the dispatcher. ``TopKRouter.routing(logits, padding_mask)``
returns ``probs`` [T, E] (the combine weights, zero off the selection) and
``routing_map`` [T, E] bool: the (token, expert) pairs the dispatcher sends, AFTER the
capacity limit (``moe_expert_capacity_factor``) dropped slots. Every dispatcher builds its
``tokens_per_expert`` from exactly this map (``routing_map.sum(0)`` before the
all-to-all / all-gather), so counting the map's True entries is counting what the
experts received. The adapter wraps ``routing`` of each router instance (an instance
attribute that copies and pickles back to the class method,
:class:`~moescope.capture.hooks.CopySafePatch`); the model computes exactly what it
computes unmonitored. Records per layer call (T = local tokens = sequence x micro-batch
on this rank, E = ``num_moe_experts``, the GLOBAL expert count, K = ``moe_router_topk``):

- ``logits`` [T, E]: the gating logits ``routing`` received (after input jitter and
  ``moe_router_force_load_balancing``'s random logits, which is what the selection used),
  with ``score_fn`` the router's ``moe_router_score_function`` (``softmax`` or
  ``sigmoid``; sinkhorn routing: sigmoid for K = 1, else softmax, as Megatron scores it);
- ``topk_index`` [T, K]: the selected experts. Without a capacity limit the map has
  exactly K True per row and the ids are its top-K (one ``topk`` on the map's bytes).
  With a capacity limit the map lost the dropped slots, so the selection BEFORE dropping
  is taken from Megatron's own selection function (``topk_routing_with_score_function``,
  or ``sinkhorn_load_balancing``) on the same logits and expert bias, deterministic and
  stateless, so it is the selection the router made; that costs the selection's ops
  again, in the capacity case only. (With ``moe_enable_routing_replay`` the selection is
  not recomputed, since it would consume the replay: the ids then come from the
  post-drop map and a dropped slot's expert id is arbitrary; counts and dropped totals
  stay exact.)
- ``dropped`` [T, K] (capacity limit only): the selected slot is not in the final map;
  with ``moe_pad_expert_input_to_capacity`` the experts also receive zero-weight filler
  rows up to capacity, which are not assignments and are not counted;
- ``topk_weight`` [T, K]: ``probs`` at the selected experts (0 where dropped): the combine
  weights, including ``moe_router_topk_scaling_factor``;
- ``token_mask`` [T]: ``~padding_mask`` when the model was called with one
  (``GPTModel.forward(padding_mask=...)``), else None (every token counts).

Shared experts (``moe_shared_expert_intermediate_size``) run for every token and are not
routed: they are not experts of the record. The router's ``expert_bias`` (aux-loss-free
balancing, ``moe_router_enable_expert_bias``) is reported as ``LayerInfo.expert_bias``, the
live buffer the training loop updates in place.

Layer names. A pipeline stage holds only its own layers, numbered from 0 in its module
tree (``decoder.layers.0.mlp`` on every stage), so the local path is not unique across
stages. The adapter names each layer by Megatron's global 1-based
``TransformerLayer.layer_number`` L (set on the ``MoELayer`` by its transformer layer,
offsets of pipeline and virtual-pipeline stages included): ``decoder.layers.<L-1>.mlp``,
the path the layer has in the unsplit model, and the same 0-based index Megatron's own
``track_moe_metrics`` uses in ``moe/<loss>_layer_<i>``. Wrappers in front of the model
(DDP's ``module.``, Float16Module, a list of virtual-pipeline chunks) are dropped from the
name. Layers elsewhere (multi-token-prediction blocks) keep their own path.

Parallel ranks. Each rank records its own tokens' decisions with global expert ids;
which ranks hold distinct tokens (and so are summed) is the reduction group's business:
see :func:`moescope.integrations.megatron.megatron_process_group`.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo
from moescope.capture.hooks import CopySafePatch
from moescope.capture.record import RecordScoreFn, RoutingRecord

__all__ = ["ADAPTERS", "MegatronMoEAdapter", "global_layer_path"]

_LAYERS = re.compile(r"decoder\.layers\.\d+\.")


def _has_class(obj: object, name: str) -> bool:
    return any(c.__name__ == name for c in type(obj).__mro__)


def global_layer_path(path: str, layer_number: int | None) -> str:
    """The name of a Megatron MoE block at local module path ``path`` whose transformer
    layer has global 1-based ``layer_number``: ``decoder.layers.<layer_number-1>.<rest>``.

    Wrappers before ``decoder.`` are dropped; a path without ``decoder.`` or
    ``layers.<n>.`` (multi-token prediction, a bare layer) or an unknown layer number
    keeps ``path`` as it is.
    """
    i = path.find("decoder.layers.")
    if layer_number is None or i < 0 or (i > 0 and path[i - 1] != "."):
        return path
    m = _LAYERS.match(path, i)
    if m is None:
        return path
    return f"decoder.layers.{int(layer_number) - 1}.{path[m.end() :]}"


def _score_fn(router: Any, config: Any) -> RecordScoreFn:
    if getattr(router, "routing_type", None) == "sinkhorn":
        return "sigmoid" if int(router.topk) == 1 else "softmax"
    fn = getattr(config, "moe_router_score_function", "softmax")
    if fn == "sigmoid":
        return "sigmoid"
    if fn != "softmax":
        raise ValueError(
            f"Megatron router score function {fn!r} is not one moescope can read "
            "(softmax, sigmoid); monitor this model with a custom adapter"
        )
    return "softmax"


class MegatronMoEAdapter:
    """Adapter for ``megatron.core.transformer.moe.moe_layer.MoELayer`` with a
    ``TopKRouter`` (softmax/sigmoid scores, group-limited routing, expert bias, capacity
    dropping, shared experts; allgather/alltoall/flex dispatchers alike, since all read
    the router's map). See the module docstring for what each record holds."""

    name = "megatron_core"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        """LayerInfo for a Megatron ``MoELayer`` whose router is a ``TopKRouter``."""
        if not _has_class(module, "MoELayer") or not type(module).__module__.startswith(
            "megatron."
        ):
            return None
        router = getattr(module, "router", None)
        config = getattr(module, "config", None)
        if router is None or config is None or not _has_class(router, "TopKRouter"):
            return None
        experts = getattr(module, "experts", None)
        bias = getattr(router, "expert_bias", None)
        return LayerInfo(
            path=global_layer_path(path, getattr(module, "layer_number", None)),
            adapter=self.name,
            num_experts=int(config.num_moe_experts),
            top_k=int(router.topk),
            module=module,
            expert_modules=(experts,) if isinstance(experts, nn.Module) else (),
            router=router,
            expert_bias=bias if isinstance(bias, torch.Tensor) else None,
            score_fn=_score_fn(router, config),
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        """Wrap the router's ``routing`` (this instance only); returns the undo."""
        router: Any = info.router
        assert router is not None  # every match() of this adapter names it
        config: Any = info.module.config
        path, num_experts, top_k, score_fn = info.path, info.num_experts, info.top_k, info.score_fn
        capacity = getattr(config, "moe_expert_capacity_factor", None) is not None
        original = router.routing  # the bound method (or an earlier wrapper)
        warned = [False]

        def selection(logits: torch.Tensor) -> torch.Tensor | None:
            """[T, E] bool: the routing map before the capacity limit (None: unknown)."""
            if getattr(router, "router_replay", None) is not None:
                return None
            if getattr(router, "routing_type", None) == "sinkhorn":
                return router.sinkhorn_load_balancing(logits)[1]
            moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
            return moe_utils.topk_routing_with_score_function(
                logits,
                top_k,
                use_pre_softmax=config.moe_router_pre_softmax,
                num_groups=config.moe_router_num_groups,
                group_topk=config.moe_router_group_topk,
                scaling_factor=config.moe_router_topk_scaling_factor,
                score_function=router.score_function,
                expert_bias=router.expert_bias,
                fused=config.moe_router_fusion,
            )[1]

        def record(
            logits: torch.Tensor,
            padding_mask: torch.Tensor | None,
            probs: torch.Tensor,
            routing_map: torch.Tensor,
        ) -> RoutingRecord:
            with torch.no_grad():
                lg = logits.detach().view(-1, num_experts)
                final = routing_map.detach()
                chosen = selection(lg) if capacity else final
                if chosen is None:
                    chosen = final
                # bool and uint8 share one byte: a view, then one topk over the map.
                index = torch.topk(chosen.view(torch.uint8), top_k, dim=1, sorted=False).indices
                weight = probs.detach().gather(1, index)
                dropped = ~final.gather(1, index) if capacity else None
                mask = None if padding_mask is None else ~padding_mask.reshape(-1)
            return RoutingRecord(
                layer=path,
                num_experts=num_experts,
                topk_index=index,
                logits=lg,
                score_fn=score_fn,
                topk_weight=weight,
                token_mask=mask,
                dropped=dropped,
            )

        def routing(logits: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = original(logits, *args, **kwargs)
            if not ctx.counting:
                return out
            try:
                pm = kwargs.get("padding_mask", args[0] if args else None)
                rec = record(logits, pm if isinstance(pm, torch.Tensor) else None, *out)
            except Exception as err:  # monitoring never stops the job
                if not warned[0]:
                    warned[0] = True
                    warnings.warn(
                        f"moescope: cannot read the routing of {path} ({err!r}); "
                        "this layer is not counted",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return out
            emit(rec)
            return out

        return CopySafePatch(router, "routing", routing).install()


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[MegatronMoEAdapter] = [MegatronMoEAdapter()]
