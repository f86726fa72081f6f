"""The capture pipeline: every MoE layer call, from an adapter hook or the capture op, to
the consumers of the window it belongs to. Two ways to get there:

**Staged** (the default in eager code; cheapest per call on a CPU or outside CUDA graphs).
Every MoE layer call used to be reduced on the spot (about 150 aten ops: on a GPU, 150
kernel launches per layer call, which roughly doubles a launch-bound decode step). The
staged path splits capture from reduction:

1. **Stage** (in the hook, every layer call): the adapter's :class:`RoutingRecord` is kept
   by reference, in the window it belongs to. No device op at all in eager mode.
2. **Flush** (when the staged bytes pass ``budget_bytes``, when the window changes, and at
   every ``snapshot()``/``reset()``/``detach()``): records sharing (window, E, K, T,
   dtypes, optional fields) are concatenated into one :class:`RoutingBatch` per group and
   handed to the window's consumers, which reduce all of them with a fixed number of
   device ops (``RoutingSums.update``: about 70 whatever the number of calls in the batch).

A staged record keeps the model's own (detached) tensors alive until the flush, bounded
by ``budget_bytes``. A staged path counts nothing under CUDA-graph replay: staging is
Python, and a replay runs none.

**Graph-safe** (``graph_safe=True``): every layer call is added at once, with in-place
device ops, into persistent buffers preallocated for every monitored layer. Nothing on
the way needs the host: whether counting is on (:meth:`set_enabled`, e.g. off during
warm-up) and how many leading rows are real tokens (:meth:`set_valid_tokens`, the rest is
padding) are device tensors the kernels read when they run. A captured CUDA graph
therefore goes on counting at every replay, with no Python. It costs the per-call
reduction (tens of device ops per layer call; inside a CUDA graph they are not
launched one by one). Buffer addresses never change: ``reset`` zeroes in place.

torch.compile: inside a compiled region the hook calls the custom op ``moescope::capture``
instead (:mod:`moescope.capture.compiled`, which also explains attach order).

A record the pipeline cannot read (wrong shape, an expert count or top-k that changed)
switches off that layer's capture with one warning naming the layer; the model goes on.

inference_mode / no_grad / autocast: the reduction runs with inference mode and autocast
off and gradients disabled, on state tensors created outside inference mode, so forwards
in any mode count and ``snapshot()``/``reset()`` work afterwards from any mode.
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import torch

from moescope.capture.adapter import in_backward
from moescope.capture.compiled import PIPELINES, capture_op
from moescope.capture.record import RoutingBatch, RoutingRecord, batch_of_one, check_record

__all__ = ["DEFAULT_BUDGET_BYTES", "CapturePipeline", "Consumer"]

#: Staged bytes (referenced router tensors) that trigger a flush.
DEFAULT_BUDGET_BYTES = 32 * 2**20

_log = logging.getLogger("moescope")


class Consumer(Protocol):
    """What receives routing batches (the torchmetrics shape).

    ``update(batch)`` adds device work only; ``state()`` returns the tensors to reduce
    across ranks and move to the host; ``reduce_ops()`` maps each state key to ``"sum"``
    or ``"max"``; ``reset()`` starts a new window.

    A graph-safe pipeline calls ``update`` at every layer call, also while a CUDA graph
    is captured: it must then write only into tensors that outlive the graph (allocated
    when the consumer was built) with device ops, and never sync with the host.
    """

    def update(self, batch: RoutingBatch) -> None: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def reduce_ops(self) -> dict[str, str]: ...

    def reset(self) -> None: ...


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


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


class _DeviceState:
    """The device tensors a graph-safe update reads when it runs (never re-created)."""

    def __init__(self, device: torch.device) -> None:
        with torch.inference_mode(False):
            #: 1: count; 0: calls run but add nothing (warm-up, graph capture).
            self.gate = torch.ones(1, dtype=torch.long, device=device)
            #: Rows [0, limit) are real tokens, the rest padding (huge: all real).
            self.limit = torch.full((1,), 2**62, dtype=torch.long, device=device)
        self.rows: dict[int, torch.Tensor] = {}

    def row(self, layer: int) -> torch.Tensor:
        r = self.rows.get(layer)
        if r is None:
            with torch.inference_mode(False):
                r = self.rows[layer] = torch.full(
                    (1,), layer, dtype=torch.long, device=self.gate.device
                )
        return r


class CapturePipeline:
    """Receives the calls of the monitored layers and hands them to consumers.

    Args:
        paths: module paths of the monitored layers; a record's ``layer`` must be one.
        consumers: ``window name -> consumers`` (a callable building them for a new
            window name; called outside any forward for the windows known up front).
        budget_bytes: staged bytes that trigger a flush (staged path).
        counts_only: keep only ``topk_index``, the mask and ``dropped`` (serving: counts,
            balance and unique experts per forward; no router-probability metrics).
        graph_safe: add every call at once into persistent buffers (see the module
            docstring); what CUDA-graph replay needs.
        devices: the device of each layer (``paths`` order), so that graph-safe state is
            allocated before any forward; None: allocated on first use.
    """

    def __init__(
        self,
        paths: Sequence[str],
        consumers: Callable[[str], list[Consumer]],
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        counts_only: bool = False,
        graph_safe: bool = False,
        devices: Sequence[torch.device | str] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.index = {p: i for i, p in enumerate(self.paths)}
        self._make_consumers = consumers
        self.windows: dict[str, list[Consumer]] = {}
        self.budget_bytes = int(budget_bytes)
        self.counts_only = bool(counts_only)
        self.graph_safe = bool(graph_safe)
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
        #: Layers switched off after a record they could not read (index -> reason).
        self.disabled: dict[int, str] = {}
        #: Optional: returns the current forward's padding rows ([>= T] bool, True =
        #: padding) when a call comes without a token mask (vLLM's forward context).
        self.padding: Callable[[], torch.Tensor | None] | None = None
        #: Optional: True while calls must not count (vLLM's warm-up runs). A graph-safe
        #: pipeline still runs them, gated off, so that graph capture records the kernels.
        self.paused: Callable[[], bool] | None = None
        self._devices: dict[torch.device, _DeviceState] = {}
        self._limited = False
        for dev in {torch.device(d) for d in devices or ()}:
            self._device(dev)
        if self.graph_safe:
            self.consumers(self.window)

    # ------------------------------------------------------------------ windows

    def consumers(self, window: str) -> list[Consumer]:
        """The consumers of ``window`` (created on first use)."""
        cons = self.windows.get(window)
        if cons is None:
            cons = self.windows[window] = self._make_consumers(window)
        return cons

    # ------------------------------------------------------------------ device state

    def _device(self, device: torch.device) -> _DeviceState:
        st = self._devices.get(device)
        if st is None:
            st = self._devices[device] = _DeviceState(device)
            for i in range(len(self.paths)):
                st.row(i)
        return st

    def set_enabled(self, enabled: bool) -> None:
        """Count the following calls (True) or run them without counting (False), in
        device state a captured graph reads at replay. Device ops only."""
        for st in self._devices.values():
            st.gate.fill_(1 if enabled else 0)

    def set_valid_tokens(self, n: int | None) -> None:
        """The next calls' rows ``[0, n)`` are real tokens and the rest padding (None:
        every row is real). Written into device state; no host sync."""
        self._limited = n is not None
        for st in self._devices.values():
            st.limit.fill_(2**62 if n is None else int(n))

    @contextmanager
    def disabled_calls(self) -> Iterator[None]:
        """Calls inside the block are not counted (graph-safe: run, gated off)."""
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(True)

    # ------------------------------------------------------------------ receiving

    def emit(self, record: RoutingRecord, window: str | None = None) -> None:
        """One layer call from an adapter hook (eager or traced), by reference. 0-token
        calls are ignored."""
        self.call(
            self._layer_index(record.layer),
            record.num_experts,
            record.topk_index,
            record.logits,
            record.topk_weight,
            record.token_mask,
            record.dropped,
            record.score_fn,
            window,
        )

    def call(
        self,
        layer: int,
        num_experts: int,
        topk_index: torch.Tensor,
        logits: torch.Tensor | None = None,
        topk_weight: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        dropped: torch.Tensor | None = None,
        score_fn: str = "softmax",
        window: str | None = None,
        borrowed: bool = False,
    ) -> None:
        """One call of layer ``layer`` (index into ``paths``), from any front end.

        Inside a compiled region this becomes the one capture op ``moescope::capture``;
        in eager code it goes straight to the staged or graph-safe path. ``borrowed``:
        the caller reuses these tensors' memory afterwards (vLLM's runner buffers), so
        the staged path copies them. Shapes as in :class:`RoutingRecord`.
        """
        if topk_index.shape[0] == 0:
            return
        if self.counts_only:
            logits = topk_weight = None
        if torch.compiler.is_compiling():
            capture_op(
                [self._ticket],
                self.id,
                layer,
                num_experts,
                topk_index,
                logits,
                topk_weight,
                token_mask,
                dropped,
                score_fn,
                window or "",
            )
            return
        rec = RoutingRecord(
            layer=self.paths[layer],
            num_experts=num_experts,
            topk_index=topk_index,
            logits=logits,
            score_fn=score_fn,  # type: ignore[arg-type]
            topk_weight=topk_weight,
            token_mask=token_mask,
            dropped=dropped,
        )
        self._take(layer, rec, window, owned=not borrowed)

    def receive(
        self,
        layer: int,
        num_experts: int,
        topk_index: torch.Tensor,
        logits: torch.Tensor | None,
        topk_weight: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        dropped: torch.Tensor | None,
        score_fn: str,
        window: str | None,
    ) -> None:
        """One layer call from the capture op (its tensors may be reused by the caller
        afterwards: the staged path copies them)."""
        if topk_index.shape[0] == 0 or not 0 <= layer < len(self.paths):
            return
        rec = RoutingRecord(
            layer=self.paths[layer],
            num_experts=num_experts,
            topk_index=topk_index,
            logits=logits,
            score_fn=score_fn,  # type: ignore[arg-type]
            topk_weight=topk_weight,
            token_mask=token_mask,
            dropped=dropped,
        )
        self._take(layer, rec, window, owned=False)

    def _take(
        self,
        i: int,
        record: RoutingRecord,
        window: str | None,
        owned: bool,
    ) -> None:
        # owned: the tensors stay valid until the flush (the model's own outputs); else
        # the staged path copies them.
        if i in self.disabled:
            return
        if in_backward():
            return  # a checkpointed region recomputed during backward
        capturing = record.topk_index.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.paused is not None and self.paused() and not capturing:
            return
        direct = self.graph_safe or capturing
        try:
            if not owned and not direct:
                record = _owned(record)  # the caller may reuse these buffers
            record = self._complete(record, direct)
            check_record(record, record.num_experts, None)  # shapes only: errors name the field
            if direct:
                # Under CUDA-graph capture a staged record would be counted once and
                # never again: such calls always take the graph-safe path (the window's
                # buffers exist from its creation on).
                self._accumulate(i, record, window)
            else:
                self.stage(record, window, checked=True)
        except (ValueError, RuntimeError, IndexError, TypeError) as exc:
            self.disable(i, str(exc))

    def _complete(self, record: RoutingRecord, direct: bool) -> RoutingRecord:
        if self.counts_only:
            record.logits = record.topk_weight = None
        t = record.topk_index.shape[0]
        if record.topk_index.dim() > 2:
            record.topk_index = record.topk_index.reshape(t, -1)
        # Graph-safe calls take padding from the device valid-token count instead: a
        # Python-side mask would be frozen into a captured graph.
        if record.token_mask is None and self.padding is not None and not direct:
            pad = self.padding()
            if pad is not None and pad.shape[0] >= t:
                record.token_mask = ~pad[:t]  # a new tensor: the runner reuses its mask
        return record

    def disable(self, layer: int, reason: str) -> None:
        """Stop capturing ``layer`` (index), with one warning naming it."""
        if layer in self.disabled:
            return
        self.disabled[layer] = reason
        msg = (
            f"moescope: switched off monitoring of layer {self.paths[layer]} (its routing "
            f"record could not be read: {reason}); the model runs on and the other layers "
            "are still counted"
        )
        _log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _layer_index(self, layer: str) -> int:
        i = self.index.get(layer)
        if i is None:
            raise KeyError(
                f"adapter emitted a record for {layer!r}, which is not one of the monitored "
                f"layers {list(self.index)}; RoutingRecord.layer must be LayerInfo.path"
            )
        return i

    def emit_neurons(
        self,
        layer: str,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        row_valid: torch.Tensor | None,
        window: str | None = None,
    ) -> None:
        """One expert call's intermediate activations ``h`` [N, I] (a neuron tap): to the
        window's consumers that take them (``update_neurons``). Reduced at once: ``h`` is
        too large to keep by reference."""
        i = self._layer_index(layer)
        if i in self.disabled:
            return
        with self.lock, _reduction_context({h.device.type}):
            for c in self.consumers(window or self.window):
                fn = getattr(c, "update_neurons", None)
                if fn is not None:
                    fn(i, h, expert_ids, row_valid)

    # ------------------------------------------------------------------ graph-safe path

    def _accumulate(self, i: int, record: RoutingRecord, window: str | None) -> None:
        dev = record.topk_index.device
        st = self._device(dev)
        mask = record.token_mask
        if self._limited:
            t = record.topk_index.shape[0]
            real = torch.arange(t, device=dev) < st.limit
            mask = real if mask is None else mask.reshape(t).bool() & real
        record.token_mask = mask
        batch = batch_of_one(record, st.row(i), layer=i, gate=st.gate)
        with self.lock, _reduction_context({dev.type}):
            for c in [*self.consumers(window or self.window), *self.listeners]:
                c.update(batch)

    # ------------------------------------------------------------------ staged path

    def stage(
        self, record: RoutingRecord, window: str | None = None, checked: bool = False
    ) -> None:
        """Keep ``record`` (by reference) for the next flush; flush when over budget."""
        i = self._layer_index(record.layer)
        if not checked:
            check_record(record, record.num_experts, None)
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

    def flush(self) -> None:
        """Reduce every staged record into its window's consumers (device ops only)."""
        with self.lock:
            pending, self._pending = self._pending, []
            self._pending_bytes = 0
            if not pending:
                return
            groups: dict[tuple[Any, ...], list[tuple[int, RoutingRecord]]] = {}
            for w, i, rec in pending:
                if i not in self.disabled:
                    groups.setdefault(_signature(w, rec), []).append((i, rec))
            with _reduction_context({key[3].type for key in groups}):
                for key, items in groups.items():
                    batch = self._batch(items)
                    try:
                        for consumer in [*self.consumers(key[0]), *self.listeners]:
                            consumer.update(batch)
                    except (ValueError, RuntimeError, IndexError) as exc:
                        for layer in set(batch.layers):
                            self.disable(layer, str(exc))

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


def _owned(record: RoutingRecord) -> RoutingRecord:
    return RoutingRecord(
        layer=record.layer,
        num_experts=record.num_experts,
        topk_index=_own(record.topk_index),  # type: ignore[arg-type]
        logits=_own(record.logits),
        score_fn=record.score_fn,
        topk_weight=_own(record.topk_weight),
        token_mask=_own(record.token_mask),
        dropped=_own(record.dropped),
    )


@contextmanager
def _reduction_context(device_types: set[str]) -> Iterator[None]:
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        for dev_type in device_types:
            if dev_type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(dev_type, enabled=False))
        yield
