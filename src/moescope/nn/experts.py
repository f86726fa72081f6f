"""Grouped experts: E feed-forward networks stored as fused weight tensors.

Dispatch follows the "sort token-slots by expert, one GEMM per expert segment" scheme of
MegaBlocks (Gale et al. 2023, dropless MoE) and of transformers 5.x' ``grouped_mm`` experts
backend: every (token, slot) pair becomes one row, rows are sorted by expert id, and each
expert multiplies its contiguous segment. Two backends run that scheme:

- ``"grouped_mm"``: one ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) call
  per projection over all segments at once; segment boundaries stay on the device, so the
  forward performs no host synchronisation. Needs float32 / bfloat16 / float16 and
  16-byte-aligned row strides (H and I multiples of 4 in float32, 8 in bfloat16).
- ``"loop"``: one ``torch.mm`` per non-empty expert segment (any dtype, e.g. float64);
  it reads the segment sizes once per forward (one host sync).

``backend="auto"`` picks ``grouped_mm`` whenever the inputs allow it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
}

Backend = Literal["auto", "grouped_mm", "loop"]
_BACKENDS = ("auto", "grouped_mm", "loop")

NeuronObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Neuron-level hook of :class:`GroupedExperts`.

Called once per forward as ``observer(h [N, I], expert_ids [N], slot_ids [N])`` where

- ``h`` holds the intermediate activations act(gate) * up (gated) or act(W1 x)
  (non-gated) of every kept (token, slot) row, detached from autograd;
- rows are sorted by expert id (stable: within one expert, in slot order);
- ``slot_ids`` index the flattened [T * K] slots (token = slot // K, slot = slot % K);
- rows of dropped slots, if any, come last with expert id ``E`` (``num_experts``) and
  unspecified ``h``: consumers ignore ids >= E. Cutting them off would need the number of
  kept rows on the host, a sync per forward; ignoring them costs nothing.

Used by the monitor's neuron counting; it must not modify ``h``."""


def _grouped_mm_fn() -> Callable[..., torch.Tensor] | None:
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is None:
        fn = getattr(torch, "_grouped_mm", None)
    return fn


_GROUPED_MM = _grouped_mm_fn()


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM can run these operands (checked without a host sync).

    ``x`` [N, H] activations; ``weights`` [E, out, in] expert weights (used transposed).
    Requirements observed on torch 2.13: float32/bfloat16/float16, row strides that are
    multiples of 16 bytes and 16-byte-aligned storage; on CUDA, compute capability >= 8.0.
    """
    if _GROUPED_MM is None:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    size = x.element_size()
    for w in weights:
        if w.dtype != x.dtype or w.device != x.device:
            return False
        if (w.shape[-1] * size) % 16 or (w.shape[-2] * size) % 16 or w.data_ptr() % 16:
            return False
    return (x.shape[-1] * size) % 16 == 0


class GroupedExperts(nn.Module):
    """E experts in two fused tensors (the transformers 5.x layout).

    Gated (SwiGLU / GeGLU / ReGLU, Shazeer 2020): ``gate_up_proj`` [E, 2I, H] (gate rows
    first, then up rows) and ``down_proj`` [E, H, I]; h = act(x W_g^T) * (x W_u^T).
    Non-gated (``gated=False``, the original Transformer FFN / GShard experts):
    ``gate_up_proj`` [E, I, H]; h = act(x W_1^T). Output of expert e: h W_down[e]^T.

    ``forward(x [T, H], topk_index [T, K], topk_weight [T, K], dropped [T, K] | None)``
    returns [T, H] = sum over kept slots of weight * expert(x). Expert ids must lie in
    [0, E). Dropped slots are sorted past every expert: they take no GEMM work and add
    exactly zero (also to every gradient).

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I (per expert).
        activation: "silu", "gelu" or "relu".
        gated: GLU experts (two input projections) or a plain two-layer FFN.
        backend: "auto" (grouped_mm when supported, else loop), "grouped_mm" or "loop";
            see the module docstring. Can be changed later through ``self.backend``.

    Attributes:
        neuron_observer: optional :data:`NeuronObserver`, called with the intermediate
            activations of every kept slot (see there).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        gated: bool = True,
        backend: Backend = "auto",
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if num_experts < 1 or hidden_size < 1 or intermediate_size < 1:
            raise ValueError(
                "num_experts, hidden_size and intermediate_size must be positive, got "
                f"{num_experts}, {hidden_size}, {intermediate_size}"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.gated = gated
        self.backend = backend
        self.act_fn = _ACTIVATIONS[activation]
        rows = 2 * intermediate_size if gated else intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, rows, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)
        self.neuron_observer: NeuronObserver | None = None

    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, value: Backend) -> None:
        if value not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {value!r}")
        if value == "grouped_mm" and _GROUPED_MM is None:
            raise ValueError("this torch build has no grouped_mm; use backend='loop' or 'auto'")
        self._backend = value

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.activation!r}, "
            f"gated={self.gated}, backend={self.backend!r}"
        )

    def intermediate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """h [N, I] from the first projection's output [N, 2I] (gated) or [N, I]."""
        if self.gated:
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(gate_up)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.backend == "loop":
            return False
        ok = grouped_mm_supported(x, self.gate_up_proj, self.down_proj)
        if self.backend == "grouped_mm" and not ok:
            raise ValueError(
                "backend='grouped_mm' needs float32/bfloat16/float16 inputs matching the weights' "
                "dtype and device, and hidden/intermediate sizes whose rows are multiples of "
                f"16 bytes (got x {x.dtype}, weights {self.gate_up_proj.dtype}, "
                f"H={self.hidden_size}, I={self.intermediate_size}); use backend='auto' or 'loop'"
            )
        return ok

    def expert_rows(
        self,
        x_sorted: torch.Tensor,
        counts: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run rows already sorted by expert through their experts (no combine weights).

        Args:
            x_sorted: [N, H] rows; the first ``counts[0]`` belong to expert 0, the next
                ``counts[1]`` to expert 1, ...; rows past ``counts.sum()`` belong to no
                expert (dropped) and must be flagged in ``valid``.
            counts: [E] int rows per expert (stays on the device for grouped_mm).
            valid: [N] bool, False for the tail rows past ``counts.sum()``; None when
                every row belongs to an expert.

        Returns:
            ``(out [N, H], h [N, I])``: expert outputs (exactly zero on invalid rows, also
            in the backward pass) and the intermediate activations (undefined on invalid
            rows).
        """
        if x_sorted.dtype != self.gate_up_proj.dtype:
            x_sorted = x_sorted.to(self.gate_up_proj.dtype)
        tail = None if valid is None else ~valid.unsqueeze(-1)
        if x_sorted.shape[0] == 0:
            # Nothing to compute (e.g. an expert-parallel rank that received no rows). The
            # zero-weighted terms keep the weights and the input in the graph: the weights
            # get an exact-zero gradient rather than None (DDP expects one on every rank),
            # and the backward still reaches x_sorted, so an expert-parallel rank joins the
            # reverse all-to-all that its peers are waiting in.
            anchor = (self.gate_up_proj.sum() + self.down_proj.sum() + x_sorted.sum()) * 0.0
            out = x_sorted.new_zeros(0, self.hidden_size) + anchor
            return out, x_sorted.new_zeros(0, self.intermediate_size)
        if self._use_grouped_mm(x_sorted):
            assert _GROUPED_MM is not None
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            if tail is not None:
                # The kernel leaves rows past offs[-1] uninitialised, in the output and in
                # grad_input alike: masked_fill here zeros their input-gradient (NaN-safe,
                # unlike a multiply by zero) and the one on the output below zeros the
                # forward; the rows in between are read only by the next grouped GEMM,
                # which skips them too.
                x_sorted = x_sorted.masked_fill(tail, 0.0)
            gate_up = _GROUPED_MM(x_sorted, self.gate_up_proj.transpose(-2, -1), offs=offs)
            h = self.intermediate(gate_up)
            out = _GROUPED_MM(h, self.down_proj.transpose(-2, -1), offs=offs)
            if tail is not None:
                out = out.masked_fill(tail, 0.0)
            return out, h
        # Loop backend: one host sync for the segment sizes, one GEMM pair per non-empty
        # expert; the dropped tail is never touched.
        seg = counts.tolist()
        # unbind, not indexing: its backward stacks all expert gradients once, whereas
        # each `weight[e]` would materialise a full [E, ...] zero gradient per expert.
        gate_up_w = self.gate_up_proj.unbind(0)
        down_w = self.down_proj.unbind(0)
        outs: list[torch.Tensor] = []
        hs: list[torch.Tensor] = []
        start = 0
        for ei, n in enumerate(seg):
            if n == 0:
                continue
            xs = x_sorted[start : start + n]
            h = self.intermediate(xs @ gate_up_w[ei].t())
            hs.append(h)
            outs.append(h @ down_w[ei].t())
            start += n
        n_rows = x_sorted.shape[0]
        if start < n_rows:
            # Keeps shapes aligned with x_sorted; zeros carry no gradient back.
            outs.append(x_sorted.new_zeros(n_rows - start, self.hidden_size))
            hs.append(x_sorted.new_zeros(n_rows - start, self.intermediate_size))
        return torch.cat(outs, dim=0), torch.cat(hs, dim=0)

    def forward(
        self,
        x: torch.Tensor,
        topk_index: torch.Tensor,
        topk_weight: torch.Tensor,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted sum of the chosen experts' outputs.

        Args:
            x: [T, H] token hidden states.
            topk_index: [T, K] int expert ids in [0, E).
            topk_weight: [T, K] combine weights (cast to x's dtype).
            dropped: [T, K] bool, True for slots that must contribute nothing; or None.

        Returns:
            [T, H] in x's dtype.
        """
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [T, H={self.hidden_size}], got {tuple(x.shape)}")
        if topk_index.dim() != 2 or topk_index.shape[0] != x.shape[0]:
            raise ValueError(
                f"topk_index must be [T={x.shape[0]}, K], got {tuple(topk_index.shape)}"
            )
        if topk_weight.shape != topk_index.shape:
            raise ValueError(
                f"topk_weight {tuple(topk_weight.shape)} must match topk_index "
                f"{tuple(topk_index.shape)}"
            )
        if dropped is not None and dropped.shape != topk_index.shape:
            raise ValueError(
                f"dropped {tuple(dropped.shape)} must match topk_index {tuple(topk_index.shape)}"
            )
        k = topk_index.shape[1]
        e = self.num_experts
        flat_expert = topk_index.reshape(-1)
        if dropped is not None:
            # Dropped slots go to a sentinel id E, sorted past every real expert.
            flat_expert = torch.where(dropped.reshape(-1), e, flat_expert)
        sorted_expert, order = torch.sort(flat_expert, stable=True)
        # scatter_add_ rather than bincount: bincount syncs on CUDA to size its output.
        counts = torch.zeros(e + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        token_of_row = torch.div(order, k, rounding_mode="floor")
        x_sorted = x.index_select(0, token_of_row)
        valid = None if dropped is None else sorted_expert < e
        out, h = self.expert_rows(x_sorted, counts[:e], valid)
        w_sorted = topk_weight.reshape(-1).index_select(0, order).to(out.dtype)
        y = torch.zeros(x.shape, dtype=out.dtype, device=x.device)
        y = y.index_add(0, token_of_row, out * w_sorted.unsqueeze(-1))
        if self.neuron_observer is not None:
            self.neuron_observer(h.detach(), sorted_expert, order)
        return y.to(x.dtype)
