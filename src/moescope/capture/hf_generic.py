"""The structural transformers adapter: router child + one fused ``experts`` module.

Detected by structure, not class names, so unlisted families work too. A block matches
when it has

- a router child named ``gate`` or ``router`` whose forward returns
  ``(router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])``, and
- an ``experts`` child that is ONE module (not a ModuleList) holding ``gate_up_proj`` /
  ``down_proj`` parameters with E as leading dimension, called as
  ``experts(hidden [T, H], top_k_index, top_k_weights)``.

What is captured: ``topk_index`` / ``topk_weight`` are what the experts module RECEIVED
(a forward pre-hook on ``experts``), never re-derived; ``logits`` are element 0 of the
router's output. ``score_fn`` per family (read off transformers 5.23):

- softmax over E, then top-k (renormalised or not): mixtral, qwen2_moe, qwen3_moe,
  qwen3_next, olmoe, minimax, jamba, hunyuan_v1_moe, ernie4_5_moe (its correction bias
  lives in a ``moe_statics`` child and only biases the choice), deepseek_v2, phimoe
  (sparsemixer picks on logits; the distribution is still softmax of the logits);
- top-k on the logits, softmax over the K chosen (granite, gpt_oss): the logits are still
  the router logits, reported with ``softmax``;
- sigmoid + ``e_score_correction_bias`` + group-limited top-k, weights x
  ``routed_scaling_factor`` (deepseek_v3, glm4_moe, dots1): ``sigmoid``. Detected from a
  ``scoring_func``/``score_func`` attribute of the router or config when present, else from
  an ``e_score_correction_bias`` tensor directly on the router.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo, as_rows
from moescope.capture.record import RecordScoreFn, RoutingRecord

_ROUTER_NAMES = ("gate", "router")
_TOPK_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "topk")
_CONFIG_TOPK = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k")


def _int_attr(obj: Any, names: tuple[str, ...], layer_idx: int | None = None) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, (list, tuple)) and v and layer_idx is not None and layer_idx < len(v):
            v = v[layer_idx]
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _experts_count(experts: nn.Module) -> int | None:
    for pname in ("gate_up_proj", "down_proj", "up_proj"):
        p = getattr(experts, pname, None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            return int(p.shape[0])
    return None


def _score_fn(router: nn.Module, config: Any) -> RecordScoreFn:
    for obj in (router, config):
        for attr in ("scoring_func", "score_func", "score_function"):
            v = getattr(obj, attr, None)
            if isinstance(v, str) and v.lower() in ("sigmoid", "softmax"):
                return v.lower()  # type: ignore[return-value]
    # DeepSeek-V3 style routers keep their aux-free balancing bias on the router itself.
    if isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor):
        return "sigmoid"
    return "softmax"


def _layer_idx(path: str) -> int | None:
    for part in reversed(path.split(".")):
        if part.isdigit():
            return int(part)
    return None


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
    """Structural adapter for the common transformers MoE block (64 of 73 families).

    ``num_experts`` E: leading dimension of ``experts.gate_up_proj`` (or ``down_proj``).
    ``top_k`` K: ``router.top_k`` (or the block's / the config's ``num_experts_per_tok``,
    ``moe_topk``, ``moe_k``). Each block call emits one RoutingRecord with ``topk_index``
    [T, K] and ``topk_weight`` [T, K] as received by the experts and ``logits`` [T, E] from
    the router.
    """

    name = "transformers.generic"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or isinstance(
            experts, (nn.ModuleList, nn.ModuleDict)
        ):
            return None
        num_experts = _experts_count(experts)
        if num_experts is None:
            return None
        router = None
        for rname in _ROUTER_NAMES:
            child = getattr(module, rname, None)
            if isinstance(child, nn.Module) and child is not experts:
                router = child
                router_name = rname
                break
        if router is None:
            return None
        config = None
        for owner in (module, router, experts):
            config = getattr(owner, "config", None)
            if config is not None:
                break
        lidx = _layer_idx(path)
        top_k = _int_attr(router, _TOPK_ATTRS, lidx) or _int_attr(module, _TOPK_ATTRS, lidx)
        if top_k is None and config is not None:
            top_k = _int_attr(config, _CONFIG_TOPK, lidx)
        if top_k is None:
            return None
        names = _positional_names(experts.forward)
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=num_experts,
            top_k=top_k,
            module=module,
            extra={
                "router": router,
                "router_name": router_name,
                "experts": experts,
                "score_fn": _score_fn(router, config),
                # Names of experts.forward's index / weight parameters (positions 1, 2).
                "index_arg": names[1] if len(names) > 1 else "top_k_index",
                "weight_arg": names[2] if len(names) > 2 else "top_k_weights",
            },
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        router: nn.Module = info.extra["router"]  # type: ignore[assignment]
        experts: nn.Module = info.extra["experts"]  # type: ignore[assignment]
        score_fn: RecordScoreFn = info.extra["score_fn"]  # type: ignore[assignment]
        index_arg = str(info.extra["index_arg"])
        weight_arg = str(info.extra["weight_arg"])
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
                    token_mask=ctx.token_mask(t),
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
