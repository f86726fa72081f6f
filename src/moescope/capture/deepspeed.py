"""Capture adapter for DeepSpeed's MoE layers (``deepspeed.moe.layer.MoE``, ``MOELayer``).

DeepSpeed (GShard-style, Lepikhin et al. 2020, arXiv:2006.16668) builds an MoE block as
``MoE`` → ``deepspeed_moe`` (``MOELayer``) → ``gate`` (``TopKGate``, a linear ``wg``
[E, H] without bias) + ``experts`` (the rank's E / ep_size local experts). The gate runs on
every rank for that rank's own tokens, with *global* expert ids, before the all-to-all
that carries tokens to the rank holding their expert.

The adapter hooks the gate's forward output only (no patch, nothing the model computes
changes). DeepSpeed 0.19's ``MOELayer`` asks the gate for sparse routes:
``(l_aux, capacity, E, indices[K, S] int32, locations[K, S], gates[K, S], exp_counts[E])``,
where an index of -1 marks a route that is not dispatched (over capacity, or a token
masked out by ``used_token``). One record per gate call (S tokens, E experts, K = ``k``):

- ``topk_index`` [S, K]: the expert each dispatched route went to, read off DeepSpeed's
  ``indices`` (what the experts really received). For a route dropped by the capacity
  limit, the expert the gate had chosen, recomputed with the gate's own ops where that is
  exact (argmax of the softmax for top-1 and the first top-2 slot, argmax of the logits
  without the first expert for the second top-2 slot when it is not sampled,
  ``topk`` of the softmax for k > 2); -1 (expert unknown: counted in ``dropped_fraction``
  but in no expert's ``dropped_counts``) where the gate's choice depended on noise the hook
  cannot see: ``noisy_gate_policy="RSample"`` (top-1) or ``"Jitter"`` in training, and
  the Gumbel-sampled second expert (``top2_2nd_expert_sampling=True``, the default).
- ``dropped`` [S, K]: the route was not dispatched (with ``drop_tokens=False`` never).
- ``topk_weight`` [S, K]: DeepSpeed's combine weights (0 for dropped routes).
- ``logits`` [S, E]: ``wg(input)`` in float32, recomputed by the hook with the gate's own
  op (one [S, H] x [H, E] matmul per call: the gate keeps its logits local). Equal to the
  gate's logits except under ``noisy_gate_policy="Jitter"`` in training, where the gate
  jitters its input and the metrics then describe the clean router.
- ``token_mask`` [S]: the top-level ``attention_mask`` when the monitored model got one,
  and, for top-1 (the only gate that reads it), ``used_token != 0``.

Counters: DeepSpeed's ``exp_counts`` counts every route the gate *chose*, before the
capacity limit (for top-1, tokens with ``used_token == 0`` excluded). With the ids above,
``usage_counts + dropped_counts == exp_counts`` summed over the window wherever no
dropped expert is unknown; ``usage_counts`` alone is what the experts received.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moescope.capture.adapter import (
    CaptureContext,
    Detach,
    Emit,
    LayerInfo,
    argument_position,
    forward_argument,
)
from moescope.capture.record import RoutingRecord

__all__ = ["ADAPTERS", "DeepSpeedMoEAdapter", "is_deepspeed_moe"]


def _is_class(module: object, class_name: str, module_name: str) -> bool:
    # By name and defining module, so that importing moescope never imports deepspeed
    # (seconds, and an optional dependency); subclasses match too.
    return any(
        c.__name__ == class_name and c.__module__ == module_name for c in type(module).__mro__
    )


def _moe_layer_of(module: nn.Module) -> nn.Module | None:
    """The ``MOELayer`` of a DeepSpeed ``MoE`` block (or ``module`` itself when it is
    one), else None."""
    if _is_class(module, "MoE", "deepspeed.moe.layer"):
        inner = getattr(module, "deepspeed_moe", None)
        return inner if isinstance(inner, nn.Module) else None
    if _is_class(module, "MOELayer", "deepspeed.moe.sharded_moe"):
        return module
    return None


def is_deepspeed_moe(module: nn.Module) -> bool:
    """True for a DeepSpeed ``MoE`` or ``MOELayer`` whose gate is a ``TopKGate``."""
    inner = _moe_layer_of(module)
    gate = getattr(inner, "gate", None)
    return gate is not None and _is_class(gate, "TopKGate", "deepspeed.moe.sharded_moe")


class DeepSpeedMoEAdapter:
    """Adapter for ``deepspeed.moe.layer.MoE`` blocks (and bare ``MOELayer``s) with a
    ``TopKGate`` (top-1, top-2, top-k; capacity and drops; ``drop_tokens``, ``use_rts``,
    noisy gate policies). See the module docstring for what each record holds."""

    name = "deepspeed_moe"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        """LayerInfo for a DeepSpeed MoE block, else None."""
        if not is_deepspeed_moe(module):
            return None
        inner: Any = _moe_layer_of(module)
        gate: Any = inner.gate
        experts = getattr(inner, "experts", None)
        local = getattr(experts, "deepspeed_experts", experts)
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=int(gate.wg.out_features),
            top_k=int(gate.k),
            module=module,
            # The rank's local experts (E / ep_size of them under expert parallelism).
            expert_modules=(local,) if isinstance(local, nn.Module) else (),
            router=gate,
            score_fn="softmax",
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        """Hook the gate's forward output; returns a function removing the hook."""
        gate = info.router
        assert gate is not None  # every match() names it
        path = info.path
        num_experts = info.num_experts
        k = info.top_k
        used_pos = argument_position(gate, "used_token")
        warned: list[bool] = []

        def give_up(reason: str) -> None:
            if not warned:
                warned.append(True)
                warnings.warn(
                    f"moescope: {path}: cannot read this DeepSpeed gate's output ({reason}); "
                    "the layer is not counted. The adapter reads DeepSpeed 0.19's sparse "
                    "routes (MOELayer calls gate(input, used_token, True, use_tutel)).",
                    RuntimeWarning,
                    stacklevel=2,
                )

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if not ctx.counting or warned:
                return
            if not (isinstance(out, tuple) and len(out) == 7):
                give_up(
                    f"expected the 7 outputs of sparse routing, got "
                    f"{len(out) if isinstance(out, tuple) else type(out).__name__}"
                )
                return
            x = args[0] if args else kwargs.get("input")
            routes, weights = out[3], out[5]  # [K, S] int32 (-1: not dispatched), [K, S]
            if not isinstance(x, torch.Tensor) or routes.dim() != 2 or routes.shape[0] != k:
                give_up(f"routes of shape {tuple(getattr(routes, 'shape', ()))}")
                return
            used = forward_argument(args, kwargs, "used_token", used_pos)
            try:
                record = _record(gate, path, num_experts, k, x, routes, weights, used, ctx)
            except Exception as err:  # monitoring never stops the job it watches
                give_up(repr(err))
                return
            emit(record)

        handle = gate.register_forward_hook(hook, with_kwargs=True)
        return handle.remove


def _fallback_ids(gate: Any, k: int, logits: torch.Tensor) -> torch.Tensor | None:
    """[S, K] expert ids the gate chose before its capacity limit, recomputed with its own
    ops; -1 where noise the hook cannot see decided; None when no slot is recoverable."""
    training = gate.training
    policy = getattr(gate, "noisy_gate_policy", None)
    if training and policy == "Jitter":
        return None  # the gate's logits came from a jittered input
    gates = F.softmax(logits, dim=1)
    if k == 1:
        if training and policy == "RSample":
            return None  # argmax of logits + Gumbel noise
        return gates.argmax(dim=1, keepdim=True)
    if k == 2:
        first = gates.argmax(dim=1)
        if getattr(gate, "top2_2nd_expert_sampling", True):
            second = torch.full_like(first, -1)  # sampled with Gumbel noise
        else:
            masked = logits.masked_fill(F.one_hot(first, logits.shape[1]).bool(), float("-inf"))
            second = masked.argmax(dim=1)
        return torch.stack((first, second), dim=1)
    return torch.topk(gates, k=k, dim=1).indices


def _record(
    gate: Any,
    path: str,
    num_experts: int,
    k: int,
    x: torch.Tensor,
    routes: torch.Tensor,
    weights: torch.Tensor,
    used: Any,
    ctx: CaptureContext,
) -> RoutingRecord:
    with torch.no_grad():
        w = gate.wg.weight
        logits = None
        # A weight that is not [E, H] here is partitioned away (ZeRO-3 releases it after the
        # gate's forward): then counts and drops only, no router probabilities.
        if w.shape == (num_experts, x.shape[-1]):
            # The gate's own op (input.float() @ wg.weight.float().T, no bias): same values.
            logits = F.linear(x.detach().float(), w.detach().float())
        sel = routes.detach().t()  # [S, K]
        dropped = sel < 0
        fallback = None if logits is None else _fallback_ids(gate, k, logits)
        index = sel if fallback is None else torch.where(dropped, fallback, sel)
        mask = ctx.token_mask(sel.shape[0])
        if k == 1 and isinstance(used, torch.Tensor):
            # Only top-1 gating reads used_token; its masked tokens are padding, not drops.
            u = used.detach().reshape(-1) != 0
            mask = u if mask is None else mask & u
    return RoutingRecord(
        layer=path,
        num_experts=num_experts,
        topk_index=index,
        logits=logits,
        score_fn="softmax",
        topk_weight=weights.detach().t(),
        token_mask=mask,
        dropped=dropped,
    )


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[DeepSpeedMoEAdapter] = [DeepSpeedMoEAdapter()]
