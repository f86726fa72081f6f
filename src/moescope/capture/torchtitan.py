"""Capture adapter for torchtitan's MoE layers (``torchtitan.models.common.moe.MoE``).

torchtitan (0.3.x) builds every MoE model it ships (deepseek_v3, qwen3, gpt_oss, ...) from
one module, ``MoE``: a ``router`` (``TokenChoiceTopKRouter``: a ``gate`` Linear, softmax or
sigmoid scores, optional node-limited routing over expert groups, top-k with the
aux-loss-free ``expert_bias_E`` added for the choice only), ``routed_experts`` (token
dispatcher + ``GroupedExperts``; the all-to-all dispatcher under expert parallelism) and
optional ``shared_experts``. ``MoE.forward`` passes the router's ``topk_scores`` and
``topk_expert_ids`` unchanged to ``routed_experts``: token-choice routing without a capacity,
so every (token, slot) the router chose is computed by its expert (nothing is dropped).

The adapter needs no torchtitan import (it recognises the classes by their module and
name), so importing moescope never imports torchtitan.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo, as_rows
from moescope.capture.record import RoutingRecord

__all__ = ["ADAPTERS", "TorchtitanMoEAdapter", "fqn", "local_tensor"]

_log = logging.getLogger("moescope")

_MOE_CLASS = ("torchtitan.models.common.moe", "MoE")


# Wrapper children that torchtitan's FQNs leave out (activation checkpointing, compile).
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def fqn(path: str) -> str:
    """``path`` without the wrapper segments torchtitan's parameter names leave out:
    ``layers.1._checkpoint_wrapped_module.moe`` -> ``layers.1.moe``."""
    for w in _WRAPPERS:
        path = path.replace(w, "")
    return path


def _is_torchtitan_moe(module: nn.Module) -> bool:
    return any((c.__module__, c.__name__) == _MOE_CLASS for c in type(module).__mro__)


def local_tensor(x: Any) -> Any:
    """This rank's part of ``x`` when it is a DTensor (tensor parallelism wraps router
    outputs and buffers in DTensors), else ``x`` itself. ``to_local()`` shares storage, so a
    buffer read this way stays live."""
    to_local = getattr(x, "to_local", None)
    return to_local() if to_local is not None and isinstance(x, torch.Tensor) else x


class TorchtitanMoEAdapter:
    """Adapter for torchtitan's ``MoE`` (and subclasses such as ``GptOssMoE``).

    Two forward hooks per layer: one on ``router.gate`` keeps the raw gate logits of the
    call in flight; one on ``router`` reads its output ``(topk_scores [B, L, K],
    topk_expert_ids [B, L, K], scores [B, L, E])`` and emits one record:

    - ``topk_index`` [T, K]: the expert ids ``MoE.forward`` hands to its experts (after
      the expert bias and node-limited group masking chose them, or after
      ``_debug_force_load_balance`` replaced them);
    - ``topk_weight`` [T, K]: the combine weights actually used (after ``route_norm`` and
      ``route_scale``);
    - ``logits`` [T, E]: the gate's raw output, with ``score_fn`` the router's
      ``score_func`` (``softmax`` or ``sigmoid``); without a ``gate`` child, the router's
      ``scores`` with ``score_fn="probs"`` (softmax) or None (sigmoid);
    - no token mask (torchtitan packs documents, it has no padding) and no ``dropped``
      (no capacity).

    ``LayerInfo.expert_bias`` is the layer's live ``expert_bias_E`` buffer (None with
    ``load_balance_coeff=None``), which torchtitan's optimizer pre-step hook updates in
    place. ``LayerInfo.path`` is torchtitan's FQN (:func:`fqn`: ``layers.1.moe`` also
    under activation checkpointing or ``torch.compile``). Under tensor or expert parallelism the router's outputs may be DTensors: each
    rank records its own shard (``to_local()``), reduced across ranks at snapshot time
    (see ``moescope.integrations.torchtitan.moescope_process_group``).
    """

    name = "torchtitan"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        """LayerInfo for a torchtitan ``MoE`` block, else None."""
        if not _is_torchtitan_moe(module):
            return None
        router = getattr(module, "router", None)
        top_k = getattr(router, "top_k", None)
        num_experts = getattr(router, "num_experts", None)
        if not isinstance(router, nn.Module) or not isinstance(top_k, int):
            return None
        if not isinstance(num_experts, int):
            return None
        routed = getattr(module, "routed_experts", None)
        inner = getattr(routed, "inner_experts", routed)
        bias = getattr(module, "expert_bias_E", None)
        return LayerInfo(
            path=fqn(path),
            adapter=self.name,
            num_experts=num_experts,
            top_k=top_k,
            module=module,
            expert_modules=(inner,) if isinstance(inner, nn.Module) else (),
            router=router,
            expert_bias=local_tensor(bias) if isinstance(bias, torch.Tensor) else None,
            score_fn="sigmoid"
            if getattr(router, "score_func", "softmax") == "sigmoid"
            else "softmax",
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        """Hook the gate's output and the router's output; returns a function removing both."""
        router = info.router
        assert router is not None  # every match() of this adapter names it
        gate = getattr(router, "gate", None)
        path = info.path
        num_experts = info.num_experts
        top_k = info.top_k
        score_fn = info.score_fn
        # The gate logits of the router call in flight; consumed by the router's hook.
        pending: list[torch.Tensor] = []
        broken: list[bool] = []  # non-empty once the router's output could not be read

        def gate_hook(_mod: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            pending.clear()
            if ctx.counting and isinstance(out, torch.Tensor):
                pending.append(local_tensor(out).detach())

        def router_hook(_mod: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            logits = pending.pop() if pending else None
            if not ctx.counting or broken:
                return
            if not isinstance(out, tuple) or len(out) < 3:
                # Monitoring never stops the job: this layer is switched off, once, loudly.
                broken.append(True)
                msg = (
                    f"moescope {self.name}: switched off monitoring of layer {path}: its "
                    f"router returned {type(out).__name__}, not (topk_scores, "
                    "topk_expert_ids, scores); this torchtitan version is not supported, "
                    "register a custom adapter (see docs/custom_adapter.md)"
                )
                _log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                return
            weight = as_rows(local_tensor(out[0]).detach(), top_k)
            index = as_rows(local_tensor(out[1]).detach(), top_k)
            fn = score_fn
            if logits is None and score_fn == "softmax":
                logits, fn = local_tensor(out[2]).detach(), "probs"
            rows = None
            if logits is not None:
                rows = as_rows(logits, logits.shape[-1])
                if rows.shape[0] != index.shape[0] or rows.shape[1] != num_experts:
                    rows = None
            emit(
                RoutingRecord(
                    layer=path,
                    num_experts=num_experts,
                    topk_index=index,
                    logits=rows,
                    score_fn=fn,
                    topk_weight=weight,
                )
            )

        handles = [router.register_forward_hook(router_hook)]
        if isinstance(gate, nn.Module):
            handles.append(gate.register_forward_hook(gate_hook))

        def detach() -> None:
            for h in handles:
                h.remove()
            pending.clear()
            broken.clear()

        return detach


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[TorchtitanMoEAdapter] = [TorchtitanMoEAdapter()]
