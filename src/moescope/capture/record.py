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

    @property
    def top_k(self) -> int:
        return self.topk_index.shape[-1]
