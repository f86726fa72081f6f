"""MoELayer: router + grouped experts (+ shared experts) as one feed-forward block."""

from __future__ import annotations

import torch
from torch import nn

from moescope.nn.experts import GroupedExperts
from moescope.nn.router_output import RouterOutput


class MoELayer(nn.Module):
    """A sparse feed-forward block: y = sum_k w_k * expert_{i_k}(x) (+ shared part).

    Sparsely-gated MoE (Shazeer et al. 2017) in the Mixtral / Qwen-MoE / DeepSeek-MoE
    form: a router picks K experts per token, :class:`GroupedExperts` runs them, and
    optional shared experts (DeepSeek-MoE, Dai et al. 2024; Qwen1.5/2-MoE) process every
    token. With ``shared_expert_gate=True`` the shared part is scaled per token by
    sigmoid(x w_s), w_s a ``Linear(H, 1, bias=False)`` (Qwen2-MoE's ``shared_expert_gate``).

    Args:
        router: any moescope router: ``router(x [T, H], token_mask=[T] | None)`` returns a
            :class:`RouterOutput` (top-k, Switch, expert choice with K = E and
            ``dropped`` marking unpicked slots, ...).
        experts: :class:`GroupedExperts` (or any module with the same forward signature).
        shared_experts: optional dense module [T, H] -> [T, H] applied to every token.
        shared_expert_gate: add the sigmoid gate on the shared experts' output (needs
            ``shared_experts``).

    ``forward(x [..., H], token_mask [...] | None) -> [..., H]``. ``token_mask`` (False =
    padding) goes to the router, which excludes padding from its losses (and, for
    capacity-limited routers, from the capacity); the experts still run on padding tokens
    so that outputs never depend on the mask, as in transformers. Dropped slots contribute
    nothing. The router's output of the last call is kept in ``self.router_output`` so a
    model can collect its loss terms (``router_output.losses``).
    """

    def __init__(
        self,
        router: nn.Module,
        experts: GroupedExperts,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: bool = False,
    ):
        super().__init__()
        if shared_expert_gate and shared_experts is None:
            raise ValueError("shared_expert_gate=True needs shared_experts; pass both or neither")
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.shared_expert_gate: nn.Linear | None = (
            nn.Linear(experts.hidden_size, 1, bias=False) if shared_expert_gate else None
        )
        self.router_output: RouterOutput | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def hidden_size(self) -> int:
        return self.experts.hidden_size

    def shared_output(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The (gated) shared experts' contribution [T, H] for tokens ``flat`` [T, H]."""
        if self.shared_experts is None:
            return None
        out = self.shared_experts(flat)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(flat)) * out
        return out

    def _flatten(
        self, x: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must end in hidden size {self.hidden_size}, got shape {tuple(x.shape)}"
            )
        mask = None
        if token_mask is not None:
            if token_mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"token_mask must have x's shape without the last dim {tuple(x.shape[:-1])}, "
                    f"got {tuple(token_mask.shape)}"
                )
            mask = token_mask.reshape(-1).bool()
        return x.reshape(-1, x.shape[-1]), mask

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., H], ``token_mask`` [...] bool (True = real token) -> [..., H]."""
        flat, mask = self._flatten(x, token_mask)
        ro = self.router(flat, token_mask=mask)
        self.router_output = ro
        y = self.experts(flat, ro.topk_index, ro.topk_weight, ro.dropped)
        shared = self.shared_output(flat)
        if shared is not None:
            y = y + shared
        return y.reshape(x.shape)
