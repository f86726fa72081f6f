"""Per-request routing inside a vLLM worker: the top-k expert ids of every token of every
request, for the token trace stream and the per-request routing summaries.

vLLM batches the tokens of many requests into one forward: row r of a router call
belongs to the request the model runner laid there. Model Runner V1 (``GPUModelRunner``,
which the CPU runner inherits) lays the scheduled tokens of ``input_batch.req_ids`` one
request after the other, ``scheduler_output.num_scheduled_tokens[req_id]`` rows each,
starting at the request's ``num_computed_tokens``; rows past the scheduled tokens are
padding. So a step's routing is split per request with host ints the scheduler already
has.

What runs per layer call (:func:`stash`): one in-place copy of the router's ``topk_ids``
into a persistent [rows, L, K] device buffer, through the Dynamo-opaque op
``moescope::stash_routing`` (the buffer is written as a side effect, never a functionalized
copy, so it also holds under CUDA graphs: the replayed copy writes the same buffer). What
runs per step when the recorder is on: one host copy of the step's [T, L, K] ids. What
runs per finished request: the sequence is assembled on the host. The recorder is off
unless the trace stream or the per-request summaries are asked for.

vLLM's own ``enable_return_routed_experts`` (``CompletionOutput.routed_experts``) needs
Model Runner V2; this recorder is what gives the same data on V1.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "RECORDERS",
    "FinishedRequest",
    "RequestRecorder",
    "RequestStreams",
    "external_id",
    "request_summary",
    "stash_op",
]

_log = logging.getLogger("moescope.vllm")

#: Live recorders by id: the op finds its recorder here (an int crosses the op boundary).
RECORDERS: weakref.WeakValueDictionary[int, RequestRecorder] = weakref.WeakValueDictionary()


@torch.library.custom_op("moescope::stash_routing", mutates_args=("state",))
def stash_op(state: list[torch.Tensor], recorder: int, layer: int, topk_ids: torch.Tensor) -> None:
    """Copy one router call's ``topk_ids`` [T, K] into the recorder's buffer (layer
    ``layer``); ``state`` is the recorder's ticket, declared mutated so compilers keep
    the call (never written)."""
    rec = RECORDERS.get(recorder)
    if rec is not None:
        rec._copy(layer, topk_ids)


@stash_op.register_fake
def _stash_fake(*args: object) -> None:
    return None


@dataclass
class FinishedRequest:
    """One request's routing, assembled when it finished (or at a flush).

    Attributes:
        req_id: vLLM's internal request id (the API's id plus a ``-xxxxxxxx`` suffix).
        token_ids: [S] int64, prompt then generated tokens.
        topk_ids: [L, S, K] int32 expert ids per MoE layer (model order); -1 where the
            token was not routed: prompt tokens served from the prefix cache and the last
            generated token (sampled, never fed back).
    """

    req_id: str
    token_ids: np.ndarray
    topk_ids: np.ndarray


@dataclass
class _Pending:
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (start, [n, L, K])
    routed: int = 0


class RequestRecorder:
    """Routing of every request of one vLLM worker, split out of its batched forwards.

    Args:
        num_layers: L, MoE layers in model order (the monitor's layer indices).
        top_k: K (the widest of the layers; narrower layers leave -1 in the extra slots).
        max_rows: rows of one forward at most (``max_num_batched_tokens``; rows past it
            are not recorded and the request is marked incomplete with one warning).
        device: where the routers' ids live.
        max_pending: requests held at once (the rest are not recorded, counted in
            :attr:`skipped`); bounds host memory to ``max_pending`` requests' tokens.
    """

    def __init__(
        self,
        num_layers: int,
        top_k: int,
        max_rows: int,
        device: torch.device | str = "cpu",
        max_pending: int = 4096,
    ) -> None:
        self.num_layers = int(num_layers)
        self.top_k = int(top_k)
        self.max_rows = int(max_rows)
        self.max_pending = int(max_pending)
        self.buffer = torch.full(
            (self.max_rows, self.num_layers, self.top_k), -1, dtype=torch.int32, device=device
        )
        self._ticket = torch.zeros(1, device=device)
        self.id = id(self)
        RECORDERS[self.id] = self
        self._pending: dict[str, _Pending] = {}
        self.skipped = 0
        self.overflowed = 0

    # ------------------------------------------------------------------ per layer call

    def stash(self, layer: int, topk_ids: torch.Tensor) -> None:
        """One router call of layer ``layer`` (index into the monitor's layers)."""
        if torch.compiler.is_compiling():
            stash_op([self._ticket], self.id, layer, topk_ids)
        else:
            self._copy(layer, topk_ids)

    def _copy(self, layer: int, topk_ids: torch.Tensor) -> None:
        n = min(int(topk_ids.shape[0]), self.max_rows)
        k = min(int(topk_ids.shape[-1]), self.top_k)
        self.buffer[:n, layer, :k].copy_(topk_ids[:n, :k])

    # ------------------------------------------------------------------ per step

    def end_step(
        self,
        req_ids: Sequence[str],
        num_scheduled: Mapping[str, int],
        starts: Mapping[str, int],
    ) -> None:
        """Split the step's rows per request (after the forward ran).

        Args:
            req_ids: the model runner's batch order (``input_batch.req_ids``).
            num_scheduled: rows per request this step.
            starts: each request's position of its first row (tokens computed before
                the step, prefix-cache hits included).
        """
        counts = [int(num_scheduled.get(r, 0)) for r in req_ids]
        total = sum(counts)
        if total == 0:
            return
        if total > self.max_rows:
            self.overflowed += 1
        rows = self.buffer[: min(total, self.max_rows)].cpu().numpy()  # one host copy per step
        offset = 0
        for rid, n in zip(req_ids, counts, strict=True):
            if n <= 0:
                continue
            chunk = rows[offset : offset + n]
            offset += n
            pend = self._pending.get(rid)
            if pend is None:
                if len(self._pending) >= self.max_pending:
                    self.skipped += 1
                    continue
                pend = self._pending[rid] = _Pending()
            pend.chunks.append((int(starts.get(rid, 0)), chunk.copy()))
            pend.routed += len(chunk)
        # Rows never written by a layer this step must not leak into the next one.
        self.buffer[: min(total, self.max_rows)].fill_(-1)

    # ------------------------------------------------------------------ per request

    def pending(self) -> list[str]:
        """Requests with recorded rows not yet finished."""
        return list(self._pending)

    def finish(
        self, req_id: str, prompt_ids: Iterable[int], output_ids: Iterable[int]
    ) -> FinishedRequest | None:
        """Assemble request ``req_id`` (None when nothing of it was recorded).

        Rows are placed by position, so a request preempted and recomputed keeps its last
        routing of each position."""
        pend = self._pending.pop(req_id, None)
        if pend is None:
            return None
        tokens = np.asarray([*prompt_ids, *output_ids], dtype=np.int64)
        s = len(tokens)
        topk = np.full((self.num_layers, s, self.top_k), -1, dtype=np.int32)
        for start, chunk in pend.chunks:
            end = min(start + len(chunk), s)
            if end > start:
                topk[:, start:end] = chunk[: end - start].transpose(1, 0, 2)
        return FinishedRequest(req_id=req_id, token_ids=tokens, topk_ids=topk)

    def drop(self, req_id: str) -> None:
        """Forget a request (aborted before it finished)."""
        self._pending.pop(req_id, None)


def request_summary(
    topk_ids: np.ndarray, num_experts: Sequence[int], layers: Sequence[str], top: int = 4
) -> dict[str, Any]:
    """Routing of one request, per MoE layer: the experts its tokens used and how evenly.

    Args:
        topk_ids: [L, S, K] expert ids, -1 = not routed (see :class:`FinishedRequest`).
        num_experts: E of each layer.
        layers: the layers' names (keys of the result).
        top: most-used experts listed per layer.

    Returns:
        ``{"tokens": routed tokens, "layers": {name: {"unique_experts", "max_over_mean",
        "top_experts": [[expert, assignments], ...]}}}``: ``unique_experts`` = distinct
        experts the request's routed tokens chose; ``max_over_mean`` = max / mean of its
        assignments over the E experts (1 = even over all E); ``top_experts``
        the ``top`` experts with most assignments (ties by lower id). O(L x top) numbers,
        whatever E.
    """
    out: dict[str, Any] = {}
    routed = 0
    for i, name in enumerate(layers):
        ids = topk_ids[i]
        rows = (ids >= 0).any(-1)
        routed = max(routed, int(rows.sum()))
        e = int(num_experts[i])
        valid = ids[(ids >= 0) & (ids < e)]
        counts = np.bincount(valid.reshape(-1), minlength=e)
        total = int(counts.sum())
        order = np.lexsort((np.arange(e), -counts))[: max(0, top)]
        out[name] = {
            "unique_experts": int((counts > 0).sum()),
            "max_over_mean": float(counts.max() / (total / e)) if total else None,
            "top_experts": [[int(x), int(counts[x])] for x in order if counts[x] > 0],
        }
    return {"tokens": routed, "layers": out}


_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_id(req_id: str) -> str:
    """The API's request id of a vLLM internal id (vLLM 0.32 appends ``-`` and 8 hex
    digits to every request id it is given; ``RequestOutput.request_id`` is the API's)."""
    return _SUFFIX.sub("", str(req_id))


#: ``lookup(req_id)`` -> ``(prompt_token_ids, output_token_ids)`` or None (the model
#: runner's request state; vLLM's worker keeps both lists for every live request).
Lookup = Callable[[str], "tuple[Sequence[int], Sequence[int]] | None"]


class RequestStreams:
    """Where finished requests go: the token trace stream and the per-request summaries.

    Args:
        recorder: the worker's :class:`RequestRecorder`.
        layers: MoE layer names (model order), ``num_experts``: E per layer.
        trace: a :class:`moescope.trace.TraceWriter` (bounded ``.jsonl`` stream), or None.
        summaries: ``write(obj)`` of the JSONL log (one line per summary), or None.
        max_summaries: request summary lines per window at most; the requests over it are
            counted (:meth:`take_counters`), not written.
    """

    def __init__(
        self,
        recorder: RequestRecorder,
        layers: Sequence[str],
        num_experts: Sequence[int],
        trace: Any = None,
        summaries: Callable[[dict[str, Any]], None] | None = None,
        max_summaries: int = 0,
    ) -> None:
        self.recorder = recorder
        self.layers = list(layers)
        self.num_experts = [int(e) for e in num_experts]
        self.trace = trace
        self.summaries = summaries
        self.max_summaries = int(max_summaries)
        self._window = {
            "requests_finished": 0,
            "request_summaries": 0,
            "request_summaries_dropped": 0,
        }
        # The window timer takes the counters while a model-runner step adds to them.
        self._counters_lock = threading.Lock()
        # Requests written by a flush while still running: later rows of theirs are
        # ignored so that a trace never holds one id twice.
        self._flushed: set[str] = set()

    def end_step(
        self, req_ids: Sequence[str], num_scheduled: Mapping[str, int], starts: Mapping[str, int]
    ) -> None:
        """After a forward (see :meth:`RequestRecorder.end_step`)."""
        if self._flushed:
            num_scheduled = {r: n for r, n in num_scheduled.items() if r not in self._flushed}
        self.recorder.end_step(req_ids, num_scheduled, starts)

    def finished(self, req_ids: Iterable[str], lookup: Lookup) -> int:
        """Write the requests vLLM reports finished (``scheduler_output.finished_req_ids``,
        read before the runner drops their state); returns how many were written."""
        n = 0
        for rid in req_ids:
            if rid in self._flushed:
                self._flushed.discard(rid)
                self.recorder.drop(rid)
                continue
            n += self._emit(rid, lookup)
        return n

    def flush(self, lookup: Lookup) -> int:
        """Write every request the recorder holds, finished or not (a flush at shutdown,
        or after an offline ``generate`` whose requests the worker has not yet been told
        are finished)."""
        n = 0
        for rid in self.recorder.pending():
            if self._emit(rid, lookup):
                self._flushed.add(rid)
                n += 1
        return n

    def _emit(self, rid: str, lookup: Lookup) -> int:
        state = lookup(rid)
        if state is None:
            self.recorder.drop(rid)
            return 0
        prompt, output = state
        fin = self.recorder.finish(rid, prompt, output)
        if fin is None:
            return 0
        seq_id = external_id(rid)
        with self._counters_lock:
            self._window["requests_finished"] += 1
            summarise = self.summaries is not None
            if summarise and self._window["request_summaries"] < self.max_summaries:
                self._window["request_summaries"] += 1
            elif summarise:
                self._window["request_summaries_dropped"] += 1
                summarise = False
        if self.trace is not None:
            try:
                self.trace.write(seq_id, fin.token_ids, fin.topk_ids)
            except Exception as err:  # monitoring never stops the server
                _log.warning("moescope: trace stream: request %s not written (%s)", seq_id, err)
        if summarise and self.summaries is not None:
            line = {
                "kind": "request",
                "mode": "serve",
                "time": time.time(),
                "request_id": seq_id,
                "prompt_tokens": len(prompt),
                "output_tokens": len(output),
                **request_summary(fin.topk_ids, self.num_experts, self.layers),
            }
            self.summaries(line)
        return 1

    def take_counters(self) -> dict[str, int]:
        """This window's request counters (then zeroed): requests finished, summaries
        written, summaries left out by the per-window bound."""
        with self._counters_lock:
            out = dict(self._window)
            self._window = dict.fromkeys(out, 0)
        return out
