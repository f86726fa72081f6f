"""Capture adapters for the capacity-limited encoder-decoder MoEs of transformers 5.x.

Two families do not follow the common ``(logits, weights, index)`` router pattern:

- ``switch_transformers`` (Fedus et al. 2021, "Switch Transformers", arXiv:2101.03961):
  ``SwitchTransformersSparseMLP`` at ``encoder.block.N.layer.1.mlp`` and
  ``decoder.block.N.layer.2.mlp``; a top-1 router whose forward returns
  ``(expert_mask[B,S,E] one-hot with over-capacity tokens zeroed, max_prob[B,S,1],
  logits[B,S,E])``; the capacity is counted per sequence.
- ``nllb_moe`` (NLLB Team 2022, "No Language Left Behind", arXiv:2207.04672; GShard top-2
  gating, Lepikhin et al. 2020, arXiv:2006.16668): ``NllbMoeSparseMLP`` at
  ``model.encoder.layers.N.ffn`` and ``model.decoder.layers.N.ffn``; a top-2 router whose
  forward returns ``(top1_mask[T,E], combine_weights[T,E], logits[T,E])``.

Both hook only the router's forward output (no patching), so the model computes exactly
what it computes without the monitor.

Encoder-decoder padding: the encoder's token mask is ``ctx.attention_mask`` (the top-level
``attention_mask``); decoder blocks use ``ctx.decoder_attention_mask`` when the monitor set
one (the top-level ``decoder_attention_mask``), else every decoder token counts. The encoder
mask is never applied to decoder tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo
from moescope.capture.hf_structure import block_token_mask
from moescope.capture.record import RoutingRecord

__all__ = ["ADAPTERS", "NllbMoeAdapter", "SwitchTransformersAdapter", "stack_token_mask"]


def _has_class(module: object, class_name: str) -> bool:
    """True when ``class_name`` is in the MRO of ``module``'s type (subclasses match too).

    Matching by name keeps ``import moescope`` free of transformers.
    """
    return any(c.__name__ == class_name for c in type(module).__mro__)


# The rule lives in hf_structure (one for every adapter); kept here under its old name.
stack_token_mask = block_token_mask


def _match_block(
    adapter: str, path: str, module: nn.Module, router_class: str, top_k: int
) -> LayerInfo | None:
    """LayerInfo for a block whose ``router`` is a ``router_class`` and whose ``experts``
    is a ModuleDict (switch_transformers, nllb_moe), else None."""
    router = getattr(module, "router", None)
    experts = getattr(module, "experts", None)
    if router is None or not _has_class(router, router_class):
        return None
    if not isinstance(experts, nn.ModuleDict):
        return None
    return LayerInfo(
        path=path,
        adapter=adapter,
        num_experts=int(router.num_experts),
        top_k=top_k,
        module=module,
        expert_modules=(experts,),
        router=router,
        experts=experts,
    )


class SwitchTransformersAdapter:
    """Adapter for ``SwitchTransformersSparseMLP`` blocks (top-1, capacity-limited).

    Records per block call (T = batch x sequence, E experts, K = 1):

    - ``topk_index`` [T, 1]: the router's argmax expert. For kept tokens it is read off the
      model's dispatch mask; for tokens over capacity (mask row all zero) it is the argmax
      of ``softmax(logits)`` computed with the router's own dtype and cast, i.e. the expert
      the model chose and then dropped.
    - ``dropped`` [T, 1]: True where the expert was over capacity (the token skips the MoE
      and keeps only its residual).
    - ``topk_weight`` [T, 1]: the probability multiplying the expert output; 0 for dropped
      tokens, whose weight is never used.
    - ``logits`` [T, E]: the router's logits as the model computed them (float32 by
      default, after jitter noise in training mode), ``score_fn="softmax"``.

    Padding tokens are routed by the model (and use capacity) but carry
    ``token_mask=False``.
    """

    name = "hf_switch_transformers"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        """LayerInfo for a block with a ``SwitchTransformersTop1Router`` router, else None."""
        return _match_block(self.name, path, module, "SwitchTransformersTop1Router", top_k=1)

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        """Hook the router's forward output; returns a function removing the hook."""
        router = info.router
        assert router is not None  # every match() of this adapter names it
        path = info.path
        num_experts = info.num_experts
        router_dtype: torch.dtype = getattr(router, "dtype", torch.float32)

        def hook(
            _mod: nn.Module,
            _args: tuple[object, ...],
            out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ) -> None:
            if not ctx.counting:
                return
            expert_mask, max_prob, logits = out  # [B,S,E] int, [B,S,1], [B,S,E]
            with torch.no_grad():
                mask = expert_mask.detach().reshape(-1, num_experts)
                lg = logits.detach().reshape(-1, num_experts)
                kept = mask.bool().any(dim=-1)  # [T]
                # Same ops as the router (softmax in its dtype, cast back, argmax) so the
                # expert of a dropped token is the one the model picked, ties included.
                probs = torch.softmax(lg, dim=-1, dtype=router_dtype).to(max_prob.dtype)
                chosen = torch.where(kept, mask.argmax(dim=-1), probs.argmax(dim=-1))
                weight = max_prob.detach().reshape(-1, 1) * kept.unsqueeze(-1)
            record = RoutingRecord(
                layer=path,
                num_experts=num_experts,
                topk_index=chosen.unsqueeze(-1),
                logits=lg,
                score_fn="softmax",
                topk_weight=weight,
                token_mask=stack_token_mask(ctx, path, lg.shape[0]),
                dropped=(~kept).unsqueeze(-1),
            )
            emit(record)

        handle = router.register_forward_hook(hook)
        return handle.remove


class NllbMoeAdapter:
    """Adapter for ``NllbMoeSparseMLP`` blocks (GShard-style top-2, capacity-limited).

    Records per block call (T tokens, E experts, K = 2):

    - ``topk_index`` [T, 2]: slot 0 the top-1 expert (argmax of the softmax), slot 1 the
      second expert (argmax of the logits with the first masked), as the router chose
      them. Kept slots are read off the model's outputs (``top1_mask`` and the non-zero
      combine weights); dropped slots fall back to the router's own argmax ops on the
      returned logits (with ``second_expert_policy="sampling"`` the returned logits carry
      the Gumbel noise, so a dropped top-1 slot may then name the noisy argmax).
    - ``dropped`` [T, 2]: slot not dispatched: over capacity, not sampled
      (``second_expert_policy="random"``), a padding token (the router zeroes those), or a
      combine weight that underflowed to exactly 0.
    - ``topk_weight`` [T, 2]: the combine weights the model uses (0 when dropped).
    - ``logits`` [T, E], ``score_fn="softmax"``.

    Caveat (transformers 5.23): ``NllbMoeExperts.forward`` one-hot encodes the already
    one-hot ``top1_mask``, so it dispatches rows by mask *value* (rows go to ``expert_0``
    and ``expert_1`` only), not by expert id. This adapter records the router's routing
    decision, which is what the NLLB-MoE paper's model computes; per-expert row counts of
    that transformers version do not match it.
    """

    name = "hf_nllb_moe"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        """LayerInfo for a block with an ``NllbMoeTop2Router`` router, else None."""
        return _match_block(self.name, path, module, "NllbMoeTop2Router", top_k=2)

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        """Hook the router's forward output; returns a function removing the hook."""
        router = info.router
        assert router is not None  # every match() of this adapter names it
        path = info.path
        num_experts = info.num_experts
        router_dtype: torch.dtype = getattr(router, "dtype", torch.float32)

        def hook(
            _mod: nn.Module,
            _args: tuple[object, ...],
            out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ) -> None:
            if not ctx.counting:
                return
            top1_mask, combine, logits = out  # [T,E] int, [T,E], [T,E]
            with torch.no_grad():
                m1_int = top1_mask.detach().reshape(-1, num_experts)
                m1 = m1_int.bool()
                gates = combine.detach().reshape(-1, num_experts)
                lg = logits.detach().reshape(-1, num_experts)
                kept1 = m1.any(dim=-1)
                probs = torch.softmax(lg, dim=-1, dtype=router_dtype).to(gates.dtype)
                top1 = torch.where(kept1, m1_int.argmax(dim=-1), probs.argmax(dim=-1))
                is_top1 = torch.zeros_like(m1).scatter_(1, top1.unsqueeze(-1), True)
                second = (gates > 0) & ~is_top1
                kept2 = second.any(dim=-1)
                fallback2 = lg.masked_fill(is_top1, float("-inf")).argmax(dim=-1)
                top2 = torch.where(kept2, second.int().argmax(dim=-1), fallback2)
                index = torch.stack((top1, top2), dim=-1)  # [T,2]
                weight = gates.gather(1, index)
                dropped = torch.stack((~kept1, ~kept2), dim=-1)
            record = RoutingRecord(
                layer=path,
                num_experts=num_experts,
                topk_index=index,
                logits=lg,
                score_fn="softmax",
                topk_weight=weight,
                token_mask=stack_token_mask(ctx, path, lg.shape[0]),
                dropped=dropped,
            )
            emit(record)

        handle = router.register_forward_hook(hook)
        return handle.remove


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[SwitchTransformersAdapter | NllbMoeAdapter] = [
    SwitchTransformersAdapter(),
    NllbMoeAdapter(),
]
