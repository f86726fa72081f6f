"""RoutingRecord: the one datatype adapters produce (see DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

RecordScoreFn = Literal["softmax", "sigmoid", "probs"]


@dataclass
class RoutingRecord:
    """One MoE layer call, as captured on the model's device.

    T = batch x sequence (flattened), E experts, K slots.

    - ``layer``: the block's module path, e.g. ``model.layers.3.mlp``.
    - ``num_experts``: E (routed experts; ids >= E in ``topk_index`` are identity or zero
      experts and are counted apart, never indexed).
    - ``logits`` [T, E] or None: router scores before selection.
    - ``score_fn``: how ``logits`` map to a distribution: ``softmax``, ``sigmoid``
      (normalised to sum 1 for entropy), or ``probs`` (already a distribution).
    - ``topk_index`` [T, K] int: the experts the model's experts actually received.
    - ``topk_weight`` [T, K] or None: combine weights actually used.
    - ``token_mask`` [T] bool or None: False for padding tokens.
    - ``dropped`` [T, K] bool or None: slot dropped by a capacity limit.

    Tensors are references to the model's own (detached) tensors; the record lives only
    until the accumulator consumed it.
    """

    layer: str
    num_experts: int
    topk_index: torch.Tensor
    logits: torch.Tensor | None = None
    score_fn: RecordScoreFn = "softmax"
    topk_weight: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    dropped: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.topk_index.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_index.shape[-1]


@dataclass
class RoutingBatch:
    """R layer calls of identical shape, stacked: what consumers receive at a flush.

    The capture pipeline stages each :class:`RoutingRecord` by reference and, at a step
    boundary, when its staging budget fills, or at snapshot, stacks the records that share
    (E, K, T, dtypes, which optional fields) into one batch, so every statistic of many
    layer calls is reduced by the same handful of device ops.

    - ``rows`` [R] int64: the monitored layer index (``MoEMonitor.layers`` order) of each
      stacked call; the same layer may appear several times (several forwards).
    - ``layers``: the same as Python ints (host copy, for consumers keyed by layer).
    - ``num_experts`` E, ``score_fn``: shared by every call of the batch.
    - ``topk_index`` [R, T, K]; ``logits`` [R, T, E'] or None; ``topk_weight`` [R, T, K]
      or None; ``token_mask`` [R, T] bool or None; ``dropped`` [R, T, K] bool or None.
    - ``gate`` [1] int64 or None: 1 counts, 0 adds nothing (graph-safe capture reads it
      when the update runs, e.g. 0 during warm-up forwards).
    """

    rows: torch.Tensor
    layers: tuple[int, ...]
    num_experts: int
    topk_index: torch.Tensor
    logits: torch.Tensor | None = None
    score_fn: RecordScoreFn = "softmax"
    topk_weight: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return self.topk_index.shape[-1]


def batch_of_one(
    record: RoutingRecord, rows: torch.Tensor, layer: int = 0, gate: torch.Tensor | None = None
) -> RoutingBatch:
    """``record`` as a :class:`RoutingBatch` with R = 1 (views only).

    ``rows`` [1] int64: the layer's row (``layer`` as a host int); ``gate`` [1] int64 or None: 0 makes the update
    add nothing (read when the update runs, so a replayed CUDA graph obeys its value then).
    """
    t = record.topk_index.shape[0]
    k = 1 if record.topk_index.dim() == 1 else record.topk_index.shape[1]
    lg = record.logits
    return RoutingBatch(
        rows=rows,
        layers=(layer,),
        num_experts=record.num_experts,
        topk_index=record.topk_index.reshape(1, t, k),
        logits=None if lg is None else lg.reshape(1, t, lg.shape[-1]),
        score_fn=record.score_fn,
        topk_weight=None if record.topk_weight is None else record.topk_weight.reshape(1, t, k),
        token_mask=None if record.token_mask is None else record.token_mask.reshape(1, t),
        dropped=None if record.dropped is None else record.dropped.reshape(1, t, k),
        gate=gate,
    )


def check_record(record: RoutingRecord, num_experts: int, top_k: int | None) -> None:
    """Raise a ValueError naming the problem when ``record`` does not fit a layer with
    ``num_experts`` experts (and ``top_k`` slots, when given). Reads shapes only."""
    if record.num_experts != num_experts:
        raise ValueError(
            f"{record.layer}: record has num_experts={record.num_experts} but the "
            f"accumulator was built for {num_experts}; build one "
            "LayerAccumulator per layer with that layer's expert count."
        )
    if record.topk_index.dim() not in (1, 2):
        raise ValueError(
            f"{record.layer}: topk_index must be [T, K] (or [T] for top-1), got shape "
            f"{tuple(record.topk_index.shape)}; flatten batch and sequence first."
        )
    k = 1 if record.topk_index.dim() == 1 else record.topk_index.shape[1]
    if top_k is not None and k != top_k:
        raise ValueError(
            f"{record.layer}: record has K={k} slots but the accumulator was built "
            f"with top_k={top_k}; pass the layer's real top_k."
        )
    t = record.topk_index.shape[0]
    lg = record.logits
    if lg is not None and (
        lg.dim() == 0 or lg.shape[-1] < num_experts or lg.numel() != t * lg.shape[-1]
    ):
        raise ValueError(
            f"{record.layer}: logits shape {tuple(lg.shape)} does not match "
            f"T={t} tokens x at least E={num_experts} experts."
        )
    for name in ("topk_weight", "dropped"):
        v = getattr(record, name)
        if v is not None and v.numel() != t * k:
            raise ValueError(
                f"{record.layer}: {name} has shape {tuple(v.shape)}, expected [T={t}, K={k}]."
            )
    if record.token_mask is not None and record.token_mask.numel() != t:
        raise ValueError(
            f"{record.layer}: token_mask has {record.token_mask.numel()} entries, "
            f"expected T={t} (one per flattened token)."
        )
