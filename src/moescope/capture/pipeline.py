"""The capture pipeline: stage routing records cheaply, reduce them in batches.

Every MoE layer call used to be reduced on the spot (about 150 aten ops: on a GPU, 150
kernel launches per layer call, which roughly doubles a launch-bound decode step). The
pipeline splits capture from reduction:

1. **Stage** (in the hook, every layer call): the adapter's :class:`RoutingRecord` is kept
   by reference, in the window it belongs to. No device op at all in eager mode.
2. **Flush** (when the staged bytes pass ``budget_bytes``, when the window changes, and at
   every ``snapshot()``/``reset()``/``detach()``): records sharing (window, E, K, T,
   dtypes, optional fields) are concatenated into one :class:`RoutingBatch` per group and
   handed to the window's consumers, which reduce all of them with a fixed number of
   device ops (``RoutingSums.update``: about 70 whatever the number of calls in the batch).

So a decode step of L layers costs the hooks nothing and the reduction about
70 / (calls per flush) ops per layer call (see benchmarks/RESULTS.md, aten_ops). A
staged record keeps the model's own (detached) tensors alive until the flush, bounded by
``budget_bytes``; models that modify router outputs in place after the experts consumed
them would need a copy (none of the supported families does).

torch.compile: inside a compiled region the hook calls the custom op ``moescope::stage``
instead (:mod:`moescope.capture.compiled`, which also explains attach order and CUDA
graphs).

inference_mode / no_grad / autocast: the reduction runs with inference mode and autocast
off and gradients disabled, on state tensors created outside inference mode, so forwards
in any mode count and ``snapshot()``/``reset()`` work afterwards from any mode.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, Protocol

import torch

from moescope.capture.record import RoutingBatch, RoutingRecord, check_record

__all__ = ["DEFAULT_BUDGET_BYTES", "CapturePipeline", "Consumer"]

#: Staged bytes (referenced router tensors) that trigger a flush.
DEFAULT_BUDGET_BYTES = 32 * 2**20


class Consumer(Protocol):
    """What receives routing batches (the torchmetrics shape).

    ``update(batch)`` adds device work only; ``state()`` returns the tensors to reduce
    across ranks and move to the host; ``reduce_ops()`` maps each state key to ``"sum"``
    or ``"max"``; ``reset()`` starts a new window.
    """

    def update(self, batch: RoutingBatch) -> None: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def reduce_ops(self) -> dict[str, str]: ...

    def reset(self) -> None: ...


#: Live pipelines by id: the compiled path's custom op finds its pipeline here.
PIPELINES: weakref.WeakValueDictionary[int, CapturePipeline] = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _signature(window: str, r: RoutingRecord) -> tuple[Any, ...]:
    def spec(t: torch.Tensor | None) -> tuple[Any, ...] | None:
        return None if t is None else (t.dtype, tuple(t.shape))

    return (
        window,
        r.num_experts,
        r.score_fn,
        r.topk_index.device,
        spec(r.topk_index),
        spec(r.logits),
        spec(r.topk_weight),
        spec(r.token_mask),
        spec(r.dropped),
    )


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    first = tensors[0]
    if first is None:
        return None
    if len(tensors) == 1:
        return first.unsqueeze(0)
    # One cat along the token dim plus one view: torch.stack would add one unsqueeze
    # per record (an op each).
    return torch.cat(tensors).view(len(tensors), *first.shape)  # type: ignore[arg-type]


class CapturePipeline:
    """Stages the records of the monitored layers and flushes them to consumers.

    Args:
        paths: module paths of the monitored layers; a record's ``layer`` must be one.
        consumers: ``window name -> consumers`` (a callable building them for a new
            window name).
        budget_bytes: staged bytes that trigger a flush.
        counts_only: stage only ``topk_index``, the mask and ``dropped`` (serving: counts,
            balance and unique experts per forward; no router-probability metrics).
    """

    def __init__(
        self,
        paths: Sequence[str],
        consumers: Callable[[str], list[Consumer]],
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        counts_only: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.index = {p: i for i, p in enumerate(self.paths)}
        self._make_consumers = consumers
        self.windows: dict[str, list[Consumer]] = {}
        self.budget_bytes = int(budget_bytes)
        self.counts_only = bool(counts_only)
        self.window = "default"
        self._pending: list[tuple[str, int, RoutingRecord]] = []
        self._pending_bytes = 0
        # Flushes may come from a serving thread's snapshot while forwards stage records.
        self.lock = threading.RLock()
        self._rows: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}
        self.id = next(_IDS)
        PIPELINES[self.id] = self
        with torch.inference_mode(False):
            self._ticket = torch.zeros(1)
        #: Consumers that receive every batch of every window (e.g. the token recorder).
        self.listeners: list[Consumer] = []

    # ------------------------------------------------------------------ staging

    def consumers(self, window: str) -> list[Consumer]:
        """The consumers of ``window`` (created on first use)."""
        cons = self.windows.get(window)
        if cons is None:
            cons = self.windows[window] = self._make_consumers(window)
        return cons

    def emit(self, record: RoutingRecord, window: str | None = None) -> None:
        """Stage one layer call (the adapters' ``emit``). 0-token calls are ignored."""
        if record.topk_index.shape[0] == 0:
            return
        if self.counts_only:
            record = RoutingRecord(
                layer=record.layer,
                num_experts=record.num_experts,
                topk_index=record.topk_index,
                token_mask=record.token_mask,
                dropped=record.dropped,
            )
        if torch.compiler.is_compiling():
            # why: compiled.py imports PIPELINES from this module (a cycle at top level)
            from moescope.capture.compiled import stage_op

            stage_op(
                self._ticket,
                self.id,
                self._layer_index(record.layer),
                record.num_experts,
                record.topk_index,
                record.logits,
                record.topk_weight,
                record.token_mask,
                record.dropped,
                record.score_fn,
                window or "",
            )
            return
        self.stage(record, window)

    def _layer_index(self, layer: str) -> int:
        i = self.index.get(layer)
        if i is None:
            raise KeyError(
                f"adapter emitted a record for {layer!r}, which is not one of the monitored "
                f"layers {list(self.index)}; RoutingRecord.layer must be LayerInfo.path"
            )
        return i

    def stage(self, record: RoutingRecord, window: str | None = None) -> None:
        """Keep ``record`` (by reference) for the next flush; flush when over budget."""
        i = self._layer_index(record.layer)
        check_record(record, record.num_experts, None)  # shapes only: errors name the field
        w = window or self.window
        n = (
            _nbytes(record.topk_index)
            + _nbytes(record.logits)
            + _nbytes(record.topk_weight)
            + _nbytes(record.token_mask)
            + _nbytes(record.dropped)
        )
        with self.lock:
            self._pending.append((w, i, record))
            self._pending_bytes += n
            if self._pending_bytes > self.budget_bytes:
                self.flush()

    @property
    def pending(self) -> int:
        """Layer calls staged and not yet reduced."""
        return len(self._pending)

    # ------------------------------------------------------------------ flushing

    def flush(self) -> None:
        """Reduce every staged record into its window's consumers (device ops only)."""
        with self.lock:
            pending, self._pending = self._pending, []
            self._pending_bytes = 0
            if not pending:
                return
            groups: dict[tuple[Any, ...], list[tuple[int, RoutingRecord]]] = {}
            for w, i, rec in pending:
                groups.setdefault(_signature(w, rec), []).append((i, rec))
            with ExitStack() as stack:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.no_grad())
                for dev_type in {key[3].type for key in groups}:
                    if dev_type in ("cpu", "cuda"):
                        stack.enter_context(torch.autocast(dev_type, enabled=False))
                for key, items in groups.items():
                    batch = self._batch(items)
                    for consumer in [*self.consumers(key[0]), *self.listeners]:
                        consumer.update(batch)

    def _batch(self, items: list[tuple[int, RoutingRecord]]) -> RoutingBatch:
        first = items[0][1]
        layers = tuple(i for i, _ in items)
        device = first.topk_index.device
        rows = self._rows.get((device, layers))
        if rows is None:
            if len(self._rows) > 256:
                self._rows.clear()
            rows = torch.tensor(layers, dtype=torch.long, device=device)
            self._rows[(device, layers)] = rows
        recs = [r for _, r in items]
        idx = _cat([r.topk_index for r in recs])
        assert idx is not None
        return RoutingBatch(
            rows=rows,
            layers=layers,
            num_experts=first.num_experts,
            topk_index=idx,
            logits=_cat([r.logits for r in recs]),
            score_fn=first.score_fn,
            topk_weight=_cat([r.topk_weight for r in recs]),
            token_mask=_cat([r.token_mask for r in recs]),
            dropped=_cat([r.dropped for r in recs]),
        )
