"""Expert parallelism: each rank holds E / world_size experts, tokens travel by all-to-all.

The GShard (Lepikhin et al. 2021) / Switch (Fedus et al. 2022) dispatch-combine scheme,
dropless as in MegaBlocks / DeepSpeed-MoE: every rank routes its own tokens with a
replicated router, sends each kept (token, slot) row to the rank owning its expert
(``all_to_all_single`` with exact split sizes, so nothing is padded or dropped for
capacity), the owners run their local :class:`GroupedExperts`, and a second all-to-all
brings the outputs home, where they are weighted and summed per token.

Works with any backend torch.distributed supports ``all_to_all_single`` on (gloo on CPU
in torch 2.13, NCCL on GPUs). Gradients flow through both exchanges (a small autograd
function whose backward is the reverse all-to-all), so the local experts' weight gradients
sum the contributions of every rank's tokens. The router and shared experts are
replicated: their gradients only cover the local tokens and must be all-reduced like any
data-parallel parameter (DDP does this).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.router_output import RouterOutput


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` over dim 0 with explicit split sizes.

    The backward of a permutation of rows across ranks is the reverse permutation: the
    same collective with input and output splits swapped.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        ctx.group = group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        grad_in = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group
        )
        return grad_in, None, None, None


def all_to_all_rows(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Autograd-aware all-to-all of rows: ``x`` [sum(input_splits), ...] is cut into
    ``input_splits[r]`` rows for rank r; returns [sum(output_splits), ...], the rows from
    rank 0 first. Gradients travel back along the reverse exchange."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class ExpertParallelMoELayer(nn.Module):
    """An :class:`MoELayer` whose experts are sharded over the ranks of a process group.

    Rank r owns global experts ``[r * E_local, (r + 1) * E_local)`` with
    E_local = E / world_size. Each rank passes its own tokens; the output for them equals
    what the unsharded MoELayer with the same weights would give.

    Args:
        router: replicated router (same weights on every rank; see the module docstring
            about its gradients).
        local_experts: GroupedExperts holding this rank's E_local experts.
        num_experts: E, the global number of experts; must be divisible by world_size.
        shared_experts: optional replicated dense module applied to every local token.
        shared_expert_gate: Qwen2-MoE sigmoid gate on the shared part (as in MoELayer).
        group: process group (default: the world group). torch.distributed must be
            initialised first.

    ``forward(x [..., H], token_mask [...] | None) -> [...,H]``; ``self.router_output`` keeps
    the router's output for the local tokens. Per forward: one all-to-all of per-expert
    row counts, one host sync to turn them into split sizes, two all-to-alls of rows
    (plus two in backward). ``local_experts.neuron_observer`` sees the rows this rank
    computed: local expert ids and row ids in the received buffer (not slot ids).
    ``self.local_expert_load`` [E_local] int64 (on the device, no host sync) keeps the
    rows each local expert processed in the last forward, from all ranks: kept slots,
    padding tokens included when the router dispatches them (``MoEMonitor`` counts only
    valid tokens, see ``moescope.capture.nn_adapter``).
    """

    def __init__(
        self,
        router: nn.Module,
        local_experts: GroupedExperts,
        num_experts: int,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: bool = False,
        group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ExpertParallelMoELayer needs torch.distributed initialised: call "
                "torch.distributed.init_process_group(...) first"
            )
        world = dist.get_world_size(group)
        if num_experts % world:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the world size {world}: "
                "choose a number of experts that is a multiple of the number of ranks"
            )
        if local_experts.num_experts != num_experts // world:
            raise ValueError(
                f"local_experts must hold num_experts / world_size = {num_experts // world} "
                f"experts, got {local_experts.num_experts}"
            )
        if shared_expert_gate and shared_experts is None:
            raise ValueError("shared_expert_gate=True needs shared_experts; pass both or neither")
        self.router = router
        self.local_experts = local_experts
        self.num_experts = num_experts
        self.shared_experts = shared_experts
        self.shared_expert_gate: nn.Linear | None = (
            nn.Linear(local_experts.hidden_size, 1, bias=False) if shared_expert_gate else None
        )
        self.group = group
        self.world_size = world
        self.rank = dist.get_rank(group)
        self.num_local_experts = num_experts // world
        self.router_output: RouterOutput | None = None
        self.local_expert_load: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.local_experts.hidden_size

    @property
    def expert_offset(self) -> int:
        """Global id of this rank's first expert."""
        return self.rank * self.num_local_experts

    @classmethod
    def from_moe_layer(
        cls, layer: MoELayer, group: dist.ProcessGroup | None = None
    ) -> ExpertParallelMoELayer:
        """Shard a full :class:`MoELayer` (identical on every rank): copy the router,
        shared experts and gate, and keep this rank's slice of the expert weights.

        The new layer owns copies of the parameters (``layer`` is left untouched), so
        gradients of shard r correspond to ``experts.gate_up_proj.grad[r*E_l:(r+1)*E_l]``
        of the full layer.
        """
        experts = layer.experts
        if not isinstance(experts, GroupedExperts):
            raise TypeError(
                f"from_moe_layer needs layer.experts to be GroupedExperts, got {type(experts).__name__}"
            )
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        e = experts.num_experts
        if e % world:
            raise ValueError(
                f"num_experts={e} is not divisible by the world size {world}: choose a number "
                "of experts that is a multiple of the number of ranks"
            )
        e_local = e // world
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        local = GroupedExperts(
            e_local,
            experts.hidden_size,
            experts.intermediate_size,
            activation=experts.activation,
            gated=experts.gated,
            backend=experts.backend,
        ).to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
        sl = slice(rank * e_local, (rank + 1) * e_local)
        with torch.no_grad():
            local.gate_up_proj.copy_(experts.gate_up_proj[sl])
            local.down_proj.copy_(experts.down_proj[sl])
        ep = cls(
            copy.deepcopy(layer.router),
            local,
            e,
            shared_experts=copy.deepcopy(layer.shared_experts),
            shared_expert_gate=layer.shared_expert_gate is not None,
            group=group,
        )
        if layer.shared_expert_gate is not None:
            assert ep.shared_expert_gate is not None
            ep.shared_expert_gate.load_state_dict(layer.shared_expert_gate.state_dict())
            ep.shared_expert_gate.to(layer.shared_expert_gate.weight.device)
        return ep

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., H] local tokens, ``token_mask`` [...] bool -> [..., H]."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must end in hidden size {self.hidden_size}, got shape {tuple(x.shape)}"
            )
        flat = x.reshape(-1, x.shape[-1])
        mask = None
        if token_mask is not None:
            if token_mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"token_mask must have x's shape without the last dim {tuple(x.shape[:-1])}, "
                    f"got {tuple(token_mask.shape)}"
                )
            mask = token_mask.reshape(-1).bool()
        ro = self.router(flat, token_mask=mask)
        self.router_output = ro
        e, w, e_local = self.num_experts, self.world_size, self.num_local_experts
        k = ro.topk_index.shape[-1]
        device = flat.device

        flat_expert = ro.topk_index.reshape(-1)
        if ro.dropped is not None:
            # Dropped slots sort past every expert and are never sent.
            flat_expert = torch.where(ro.dropped.reshape(-1), e, flat_expert)
        _, order = torch.sort(flat_expert, stable=True)
        counts = torch.zeros(e + 1, dtype=torch.int64, device=device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        send_counts = counts[:e].contiguous()  # [W * E_local]: rows for each global expert
        recv_counts = torch.empty_like(send_counts)  # [W * E_local]: from rank s, for local e
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # The one host sync: all_to_all_single takes its split sizes as Python ints.
        in_splits, out_splits = (
            torch.stack([send_counts.view(w, e_local).sum(1), recv_counts.view(w, e_local).sum(1)])
            .cpu()
            .tolist()
        )
        n_send = sum(in_splits)
        n_recv = sum(out_splits)

        sent_slots = order[:n_send]
        token_of_row = torch.div(sent_slots, k, rounding_mode="floor")
        x_send = flat.index_select(0, token_of_row)
        x_recv = all_to_all_rows(x_send, out_splits, in_splits, self.group)

        # Received rows come source-rank-major, expert-minor; regroup them by local expert.
        local_ids = torch.repeat_interleave(
            torch.arange(e_local, device=device).repeat(w), recv_counts, output_size=n_recv
        )
        perm = torch.sort(local_ids, stable=True).indices
        local_counts = recv_counts.view(w, e_local).sum(0)
        self.local_expert_load = local_counts
        out_sorted, h = self.local_experts.expert_rows(x_recv.index_select(0, perm), local_counts)
        if self.local_experts.neuron_observer is not None:
            self.local_experts.neuron_observer(h.detach(), local_ids.index_select(0, perm), perm)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(n_recv, device=device)
        out_recv = out_sorted.index_select(0, inv_perm)

        y_rows = all_to_all_rows(out_recv, in_splits, out_splits, self.group)
        weight = ro.topk_weight.reshape(-1).index_select(0, sent_slots).to(y_rows.dtype)
        y = torch.zeros(flat.shape, dtype=y_rows.dtype, device=device)
        y = y.index_add(0, token_of_row, y_rows * weight.unsqueeze(-1)).to(flat.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            y = y + shared
        return y.reshape(x.shape)
