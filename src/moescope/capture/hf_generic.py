"""The structural transformers adapter: router child + one fused ``experts`` module.

Detected by structure, not class names, so unlisted families work too (the names and
keys it reads are the single lists of :mod:`moescope.capture.hf_structure`). A block
matches when it has

- a router child (``gate``, ``router``, ... :data:`~moescope.capture.hf_structure.ROUTER_NAMES`)
  whose forward returns ``(scores [T, E'], top_k_weights [T, K], top_k_index [T, K])``, and
- an ``experts`` child that is ONE module (not a ModuleList) holding 3-D ``gate_up_proj``
  / ``down_proj`` weights with the experts as leading dimension, called as
  ``experts(hidden [T, H], top_k_index, top_k_weights)``.

The block may be a decoder layer itself (gemma4, diffusion_gemma keep ``router`` and
``experts`` next to a dense MLP).

What is captured: ``topk_index`` / ``topk_weight`` are what the experts module RECEIVED
(a forward pre-hook on ``experts``), never re-derived; ``logits`` are element 0 of the
router's output.

- ``num_experts`` E: the routed experts, the smallest leading dimension of the experts'
  weights. Zero-compute experts are not among them (longcat_flash: ``gate_up_proj`` has
  E + Z rows, ``down_proj`` E; ids E..E+Z-1 are identity experts), so their slots count
  as ``extra_slots``; the router's scores then have E + Z columns.
- ``top_k`` K: router, block or config attribute (``num_experts_per_tok``,
  ``top_k_experts``, ``moe_topk``, ... :data:`~moescope.capture.hf_structure.TOP_K_KEYS`).
- ``score_fn`` (:func:`~moescope.capture.hf_structure.router_score_fn`): ``softmax`` for
  softmax routers (mixtral, qwen*_moe, olmoe, deepseek_v2, longcat_flash...) and for
  top-k-on-logits routers (granite, gpt_oss: the logits are still the router's logits);
  ``sigmoid`` for sigmoid routers (deepseek_v3, glm4_moe, dots1, minimax_m2, afmoe,
  lfm2_moe, hy_v3, flint...); ``probs`` when element 0 is already a softmax
  distribution (gemma4, diffusion_gemma), so entropy is not taken of a softmax of
  probabilities.
- ``token_mask``: :func:`~moescope.capture.hf_structure.block_token_mask`: the top-level
  ``attention_mask``, or for blocks of a ``decoder`` stack the ``decoder_attention_mask``
  (diffusion_gemma's canvas tokens are not masked by the prompt's padding).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import (
    CaptureContext,
    Detach,
    Emit,
    LayerInfo,
    as_rows,
    router_bias,
)
from moescope.capture.hf_structure import (
    block_token_mask,
    find_router,
    find_top_k,
    layer_index,
    routed_experts,
    router_score_fn,
)
from moescope.capture.record import RoutingRecord


def _positional_names(fn: Any) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
    ]


class GenericHFAdapter:
    """Structural adapter for the common transformers MoE block.

    ``num_experts`` E: routed experts (:func:`~moescope.capture.hf_structure.routed_experts`).
    ``top_k`` K: :func:`~moescope.capture.hf_structure.find_top_k`. Each block call emits
    one RoutingRecord with ``topk_index`` [T, K] and ``topk_weight`` [T, K] as received by
    the experts and ``logits`` [T, E'] from the router.
    """

    name = "transformers.generic"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or isinstance(
            experts, (nn.ModuleList, nn.ModuleDict)
        ):
            return None
        num_experts = routed_experts(experts)
        if num_experts is None:
            return None
        found = find_router(module, exclude=experts)
        if found is None:
            return None
        _, router = found
        config = None
        for owner in (module, router, experts):
            config = getattr(owner, "config", None)
            if config is not None:
                break
        top_k = find_top_k(module, router, config, layer_index(path))
        if top_k is None:
            return None
        names = _positional_names(experts.forward)
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=num_experts,
            top_k=top_k,
            module=module,
            expert_modules=(experts,),
            router=router,
            experts=experts,
            score_fn=router_score_fn(router, config),
            expert_bias=router_bias(router, module),
            # Names of experts.forward's index / weight parameters (positions 1, 2).
            index_arg=names[1] if len(names) > 1 else "top_k_index",
            weight_arg=names[2] if len(names) > 2 else "top_k_weights",
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        router = info.router
        assert router is not None  # every match() of this adapter names it
        experts = info.experts
        assert experts is not None  # every match() of this adapter names it
        score_fn = info.score_fn
        index_arg, weight_arg = info.index_arg, info.weight_arg
        # Router logits of the current block call, consumed by the experts pre-hook.
        slot: dict[str, torch.Tensor | None] = {"logits": None}

        def router_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            logits = out[0] if isinstance(out, (tuple, list)) and out else None
            slot["logits"] = logits if isinstance(logits, torch.Tensor) else None

        def experts_pre_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> None:
            logits, slot["logits"] = slot["logits"], None
            if not ctx.counting:
                return
            idx = args[1] if len(args) > 1 else kwargs.get(index_arg)
            weight = args[2] if len(args) > 2 else kwargs.get(weight_arg)
            if not isinstance(idx, torch.Tensor):
                return
            idx = as_rows(idx, idx.shape[-1])
            t = idx.shape[0]
            if isinstance(weight, torch.Tensor):
                weight = as_rows(weight, idx.shape[1]) if weight.numel() == idx.numel() else None
            if logits is not None:
                logits = as_rows(logits, logits.shape[-1])
                if logits.shape[0] != t:
                    logits = None
            emit(
                RoutingRecord(
                    layer=info.path,
                    num_experts=info.num_experts,
                    topk_index=idx,
                    logits=logits,
                    score_fn=score_fn,
                    topk_weight=weight if isinstance(weight, torch.Tensor) else None,
                    token_mask=block_token_mask(ctx, info.path, t),
                )
            )

        handles = [
            router.register_forward_hook(router_hook),
            experts.register_forward_pre_hook(experts_pre_hook, with_kwargs=True),
        ]

        def detach() -> None:
            for h in handles:
                h.remove()
            slot["logits"] = None

        return detach
