"""Routers: map token hidden states [T, H] to a RouterOutput.

Every router returns the same RouterOutput type so that layers, losses and the monitor
treat them alike.
"""

from __future__ import annotations

import torch
from torch import nn

from moescope.nn.losses import load_balancing_loss, router_z_loss
from moescope.nn.router_output import RouterOutput


class TopKRouter(nn.Module):
    """Softmax-then-top-k router (Shazeer et al. 2017 without noise; Mixtral, Qwen-MoE).

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: K experts per token.
        normalize: renormalise the K selected probabilities to sum to 1 (Mixtral,
            ``norm_topk_prob=True``); otherwise the raw softmax probabilities are the
            combine weights (Qwen1.5-MoE, OLMoE).

    Input ``x`` [T, H]; optional ``token_mask`` [T] bool excludes padding from the losses.
    Output: RouterOutput with ``losses = {"aux_loss", "z_loss"}``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        logits = nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return RouterOutput(
            logits=logits,
            probs=probs,
            topk_index=top_i,
            topk_weight=top_p.to(x.dtype),
            losses={
                "aux_loss": load_balancing_loss(probs, top_i, token_mask),
                "z_loss": router_z_loss(logits, token_mask),
            },
        )
