"""The one result type every moescope router returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ScoreFn = Literal["softmax", "sigmoid"]


@dataclass
class RouterOutput:
    """What a router decided for one batch of tokens.

    Shapes (T tokens, E experts, K slots per token):

    - ``logits`` [T, E]: raw router scores before selection.
    - ``probs`` [T, E]: the router distribution the scores map to (softmax, or sigmoid
      scores for DeepSeek-style routers; see ``score_fn``).
    - ``topk_index`` [T, K] int64: the expert of every (token, slot). For expert-choice
      routing K = E and slot e belongs to expert e (see ``dropped``).
    - ``topk_weight`` [T, K]: the combine weight actually applied to that slot's output
      (need not sum to 1: e.g. no renormalisation, or a routed scaling factor).
    - ``dropped`` [T, K] bool or None: True where a slot was dropped (capacity overflow,
      or an expert that did not pick the token under expert choice). A dropped slot
      contributes nothing to the layer output. None means nothing was dropped.
    - ``losses``: named scalar loss terms the router computed (e.g. ``"aux_loss"``,
      ``"z_loss"``), ready to be weighted by the caller.
    - ``score_fn``: how ``logits`` map to ``probs``.
    - ``unrouted`` [T] bool or None: valid tokens that no expert processed (expert-choice
      routing); None when the router does not report it.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    topk_index: torch.Tensor
    topk_weight: torch.Tensor
    dropped: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    score_fn: ScoreFn = "softmax"
    unrouted: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def top_k(self) -> int:
        return self.topk_index.shape[-1]

    def kept(self) -> torch.Tensor:
        """[T, K] bool: slots that were not dropped."""
        if self.dropped is None:
            return torch.ones_like(self.topk_index, dtype=torch.bool)
        return ~self.dropped
