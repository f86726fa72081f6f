"""MoELayer: router + grouped experts (+ shared experts) as one feed-forward block."""

from __future__ import annotations

import torch
from torch import nn

from moescope.nn.experts import GroupedExperts
from moescope.nn.router_output import RouterOutput


class MoELayer(nn.Module):
    """A sparse feed-forward block: y = sum_k w_k * expert_{i_k}(x) (+ shared_experts(x)).

    Args:
        router: any moescope router (returns RouterOutput).
        experts: GroupedExperts (or any module with the same forward signature).
        shared_experts: optional dense module applied to every token and added
            (DeepSeek-MoE / Qwen-MoE shared experts).

    ``forward(x [..., H], token_mask [...] | None) -> [..., H]``. Dropped slots contribute
    nothing. The router's output of the last call is kept in ``self.router_output`` so a
    model can collect its loss terms (``router_output.losses``).
    """

    def __init__(
        self,
        router: nn.Module,
        experts: GroupedExperts,
        shared_experts: nn.Module | None = None,
    ):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.router_output: RouterOutput | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        mask = token_mask.reshape(-1) if token_mask is not None else None
        ro = self.router(flat, token_mask=mask)
        self.router_output = ro
        y = self.experts(flat, ro.topk_index, ro.topk_weight, ro.dropped)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.reshape(shape)
