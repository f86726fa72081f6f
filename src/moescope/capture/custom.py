"""Helpers for users with their own MoE code: an adapter in a few lines.

``SimpleAdapter`` hooks the forward output of the module it matches (or of one of its
children, ``target=``) and turns it into a RoutingRecord with a user function::

    import moescope
    from moescope.capture import SimpleAdapter

    moescope.register_adapter(SimpleAdapter(
        match=lambda path, m: isinstance(m, MyMoEBlock),
        target="router",                      # hook block.router's output
        num_experts=lambda m: m.num_experts,  # or an int
        top_k=2,
        extract=lambda module, args, out: {"topk_weight": out[0], "topk_index": out[1]},
    ))

See docs/custom_adapter.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo
from moescope.capture.record import RecordScoreFn, RoutingRecord

Extract = Callable[[nn.Module, tuple[Any, ...], Any], Mapping[str, Any]]
_FIELDS = ("topk_index", "logits", "topk_weight", "token_mask", "dropped", "score_fn")


class SimpleAdapter:
    """An adapter built from a match predicate and an output-extraction function.

    Args:
        match: ``(path, module) -> bool``: is ``module`` an MoE block.
        extract: ``(hooked_module, args, output) -> mapping`` with ``topk_index`` [..., K]
            (required) and optionally ``logits`` [..., E], ``topk_weight`` [..., K],
            ``dropped`` [..., K] bool, ``token_mask`` [...] bool, ``score_fn``. Leading
            dimensions are flattened to T. Return None (or a mapping without
            ``topk_index``) to skip a call.
        num_experts: E, or ``block -> E``.
        top_k: K, or ``block -> K``.
        score_fn: how ``logits`` map to a distribution (``softmax``, ``sigmoid``,
            ``probs``).
        target: dotted name of the child whose forward output is hooked (e.g.
            ``"router"``); None hooks the matched block itself.
        name: the adapter's name in ``LayerInfo.adapter``.

    The token mask comes from the model's top-level ``attention_mask`` (its last S
    columns under a KV cache) unless ``extract`` returns one.
    """

    def __init__(
        self,
        match: Callable[[str, nn.Module], bool],
        extract: Extract,
        num_experts: int | Callable[[nn.Module], int],
        top_k: int | Callable[[nn.Module], int],
        score_fn: RecordScoreFn = "softmax",
        target: str | None = None,
        name: str = "custom",
    ) -> None:
        if score_fn not in ("softmax", "sigmoid", "probs"):
            raise ValueError(f"score_fn must be 'softmax', 'sigmoid' or 'probs', got {score_fn!r}")
        self.name = name
        self._match = match
        self._extract = extract
        self._num_experts = num_experts
        self._top_k = top_k
        self._score_fn: RecordScoreFn = score_fn
        self._target = target

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        if not self._match(path, module):
            return None
        hooked = module.get_submodule(self._target) if self._target else module
        e = self._num_experts(module) if callable(self._num_experts) else self._num_experts
        k = self._top_k(module) if callable(self._top_k) else self._top_k
        if int(e) < 1 or not 1 <= int(k):
            raise ValueError(f"{self.name}: num_experts and top_k must be >= 1, got {e}, {k}")
        return LayerInfo(
            path=path,
            adapter=self.name,
            num_experts=int(e),
            top_k=int(k),
            module=module,
            hooked=hooked,
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        hooked = info.hooked if info.hooked is not None else info.module

        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not ctx.counting:
                return
            fields = self._extract(module, args, out)
            if not fields or fields.get("topk_index") is None:
                return
            unknown = set(fields) - set(_FIELDS)
            if unknown:
                raise KeyError(
                    f"{self.name}: extract returned unknown fields {sorted(unknown)}; "
                    f"allowed: {list(_FIELDS)}"
                )
            idx: torch.Tensor = fields["topk_index"]
            idx = idx.reshape(-1, idx.shape[-1]) if idx.dim() > 1 else idx.reshape(-1, 1)
            t, k = idx.shape

            def flat(x: torch.Tensor | None, width: int | None) -> torch.Tensor | None:
                if x is None:
                    return None
                return x.reshape(t, width) if width is not None else x.reshape(t)

            logits = fields.get("logits")
            mask = fields.get("token_mask")
            emit(
                RoutingRecord(
                    layer=info.path,
                    num_experts=info.num_experts,
                    topk_index=idx,
                    logits=flat(logits, logits.shape[-1]) if logits is not None else None,
                    score_fn=fields.get("score_fn", self._score_fn),
                    topk_weight=flat(fields.get("topk_weight"), k),
                    token_mask=mask.reshape(t).to(torch.bool)
                    if mask is not None
                    else ctx.token_mask(t),
                    dropped=flat(fields.get("dropped"), k),
                )
            )

        handle = hooked.register_forward_hook(hook)
        return handle.remove
