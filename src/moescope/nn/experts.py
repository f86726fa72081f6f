"""Grouped experts: E feed-forward networks stored as fused weight tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
}

NeuronObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called as ``observer(h [N, I], expert_ids [N], slot_ids [N])`` with the intermediate
activations of every kept (token, slot) row, rows sorted by expert; ``slot_ids`` index the
flattened [T * K] slots. Used by the monitor's neuron counting; must not modify ``h``."""


class GroupedExperts(nn.Module):
    """E experts in two fused tensors (the transformers 5.x layout).

    Gated (SwiGLU / GeGLU / ReGLU, Shazeer 2020): ``gate_up_proj`` [E, 2I, H] (gate rows
    first, then up rows) and ``down_proj`` [E, H, I]; h = act(x W_g^T) * (x W_u^T).
    Non-gated (``gated=False``): ``gate_up_proj`` [E, I, H]; h = act(x W_1^T).
    Output of expert e: h W_down[e]^T.

    ``forward(x [T, H], topk_index [T, K], topk_weight [T, K], dropped [T, K] | None)``
    returns [T, H] = sum over kept slots of weight * expert(x). Token-slots are sorted by
    expert and each expert runs one matmul over its contiguous segment.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        gated: bool = True,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.gated = gated
        self.act_fn = _ACTIVATIONS[activation]
        rows = 2 * intermediate_size if gated else intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, rows, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)
        self.neuron_observer: NeuronObserver | None = None

    def intermediate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """h from the first projection's output [N, 2I] (gated) or [N, I]."""
        if self.gated:
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(gate_up)

    def forward(
        self,
        x: torch.Tensor,
        topk_index: torch.Tensor,
        topk_weight: torch.Tensor,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n_tokens, k = topk_index.shape
        e = self.num_experts
        flat_expert = topk_index.reshape(-1)
        if dropped is not None:
            # Dropped slots go to a sentinel id E, sorted past every real expert.
            flat_expert = torch.where(dropped.reshape(-1), e, flat_expert)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=e + 1)[:e]
        n_kept = counts.sum()
        sorted_slot = order
        sorted_token = torch.div(sorted_slot, k, rounding_mode="floor")
        x_sorted = x[sorted_token]
        # One host sync per forward: segment lengths drive the per-expert matmuls.
        seg = counts.tolist()
        outs: list[torch.Tensor] = []
        hs: list[torch.Tensor] = []
        start = 0
        for ei, n in enumerate(seg):
            if n == 0:
                continue
            xs = x_sorted[start : start + n]
            h = self.intermediate(xs @ self.gate_up_proj[ei].t())
            if self.neuron_observer is not None:
                hs.append(h)
            outs.append(h @ self.down_proj[ei].t())
            start += n
        kept_total = start
        y = torch.zeros_like(x)
        if kept_total == 0:
            return y
        y_sorted = torch.cat(outs, dim=0)
        w_sorted = topk_weight.reshape(-1)[sorted_slot[:kept_total]].to(y_sorted.dtype)
        y.index_add_(0, sorted_token[:kept_total], y_sorted * w_sorted.unsqueeze(-1))
        if self.neuron_observer is not None:
            self.neuron_observer(
                torch.cat(hs, dim=0), flat_expert[sorted_slot[:kept_total]], sorted_slot[:kept_total]
            )
        del n_kept
        return y
