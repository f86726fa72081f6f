"""Routing traces (:mod:`moescope.trace`) from moescope's own capture: the token
recorder's :class:`~moescope.stats.token_recorder.TokenRouting`, and a training-side
recorder usable with any integration.

- :func:`trace_from_token_routing`: a ``TokenRouting`` (``moescope analyze``'s recorder,
  :func:`~moescope.stats.token_recorder.record_routing`, or a file written by
  ``TokenRouting.save``) as a :class:`~moescope.trace.RoutingTrace`: one sequence per
  ``seq_id``, layers in model order.
- :class:`TraceRecorder`: a :class:`~moescope.stats.token_recorder.RoutingRecorder`
  (combine weights kept) on a monitor that already watches the model, e.g. a training
  integration's ``session.monitor`` (so no layer is hooked twice). Memory is bounded by
  ``max_tokens`` (the first tokens recorded; later forwards cost one dictionary lookup).
  Sequence ids are "0", "1", ... in the order the rows of the top-level forwards were
  seen, so two runs fed the same batches in the same order align.

  Usage with the PyTorch callback (the same with the Trainer or Lightning callbacks:
  anything exposing the ``MoEMonitor`` it attached)::

      cb = create_moe_callback_for_pytorch(model, ...)
      cb.on_train_begin()
      rec = TraceRecorder(cb.session.monitor, max_tokens=4096).attach()
      ... train ...
      rec.save("train_routing.jsonl")   # moescope agree train_routing.jsonl serve.jsonl
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope.stats.token_recorder import RoutingRecorder, TokenRouting
from moescope.trace import RoutingTrace

if TYPE_CHECKING:
    from moescope.monitor import MoEMonitor

__all__ = ["TraceRecorder", "trace_from_recordings", "trace_from_token_routing"]


def trace_from_token_routing(
    routing: TokenRouting, *, source: Mapping[str, Any] | None = None
) -> RoutingTrace:
    """The :class:`~moescope.trace.RoutingTrace` of a ``TokenRouting``.

    One sequence per distinct ``seq_id`` (in order of first appearance; seq_id ``n`` is
    named ``"n"``), its tokens in recorded order (padding was never recorded). K is the
    widest layer's (narrower layers pad with -1), E the largest ``num_experts``. Weights
    are kept when every layer has them (``RoutingRecorder(weights=True)``), else None.
    """
    layers = list(routing.layers)
    if not layers:
        raise ValueError("the TokenRouting has no layer; record a model with MoE layers")
    k = max(routing.topk[x].shape[1] for x in layers)
    e = max(int(routing.num_experts[x]) for x in layers)
    n = routing.num_tokens
    ids = np.full((len(layers), n, k), -1, dtype=np.int32)
    with_w = all(x in routing.weights for x in layers)
    w = np.zeros((len(layers), n, k), dtype=np.float32) if with_w else None
    for i, x in enumerate(layers):
        kx = routing.topk[x].shape[1]
        ids[i, :, :kx] = routing.topk[x]
        if w is not None:
            w[i, :, :kx] = np.nan_to_num(routing.weights[x], nan=0.0)
    meta = {"engine": "moescope", "recorder": "RoutingRecorder", **dict(source or {})}
    trace = RoutingTrace(layers, e, k, meta)
    if n == 0:
        return trace
    # Stable grouping by seq_id, in order of first appearance, token order kept.
    uniq, first, inverse = np.unique(routing.seq_id, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    seq_rank = rank[inverse]
    order = np.argsort(seq_rank, kind="stable")
    bounds = np.searchsorted(seq_rank[order], np.arange(len(uniq) + 1))
    by_rank = uniq[np.argsort(rank)]
    for j in range(len(uniq)):
        sel = order[bounds[j] : bounds[j + 1]]
        trace.append(
            str(int(by_rank[j])),
            routing.token_ids[sel],
            ids[:, sel],
            None if w is None else w[:, sel],
        )
    return trace


def trace_from_recordings(
    recordings: Mapping[str, TokenRouting], *, source: Mapping[str, Any] | None = None
) -> RoutingTrace:
    """One trace of several sources' ``TokenRouting`` (``moescope analyze``'s inputs):
    sequence ``n`` of source ``label`` is ``"label/n"``. The sources must have the same
    layers (one model recorded them)."""
    parts = [
        (label, trace_from_token_routing(tr, source=source))
        for label, tr in recordings.items()
        if tr.num_tokens
    ]
    if not parts:
        raise ValueError("no source recorded a token")
    first = parts[0][1]
    out = RoutingTrace(
        first.layers,
        max(t.num_experts for _, t in parts),
        max(t.top_k for _, t in parts),
        first.source,
    )
    for label, t in parts:
        if t.layers != first.layers:
            raise ValueError(f"source {label!r} recorded other layers than {parts[0][0]!r}")
        for seq in t:
            out.append(f"{label}/{seq.seq_id}", seq.token_ids, seq.topk_ids, seq.topk_weights)
    return out


class _GuardedRecorder(RoutingRecorder):
    """A RoutingRecorder that never raises into the forward it watches: the first error
    switches it off with one warning (what was recorded before is kept)."""

    broken: str | None = None

    def forward_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.broken is None:
            self._guard(super().forward_start, args, kwargs)

    def forward_end(self, output: Any) -> None:
        if self.broken is None:
            self._guard(super().forward_end, output)
        else:
            self._active = False

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:  # monitoring never stops the job it watches
            self.broken = f"{type(err).__name__}: {err}"
            self._active = False
            self._calls = {}
            warnings.warn(
                f"moescope TraceRecorder: recording switched off ({self.broken}); the "
                "sequences recorded before are kept",
                stacklevel=2,
            )


class TraceRecorder:
    """Records a bounded :class:`~moescope.trace.RoutingTrace` through ``monitor``'s hooks.

    Args:
        monitor: an attached (or later attached) ``MoEMonitor`` of the model, e.g. a
            training integration's ``session.monitor``; its top-level forward's
            ``input_ids`` are the token ids.
        max_tokens: tokens kept at most (the first ones; later forwards are skipped).
            An error while recording (e.g. input ids that do not match the routed
            tokens) switches recording off with one warning; training goes on.
        layers: MoE layer paths to record (default: all).
        source: metadata for the trace (``engine``, ``model``, ``dtype``, ``step`` ...).
    """

    def __init__(
        self,
        monitor: MoEMonitor,
        *,
        max_tokens: int = 20000,
        layers: Sequence[str] | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        self.recorder = _GuardedRecorder(
            monitor.model, max_tokens=max_tokens, layers=layers, monitor=monitor, weights=True
        )
        self.source: dict[str, Any] = {"engine": "moescope-training", **dict(source or {})}

    @property
    def full(self) -> bool:
        """True once ``max_tokens`` tokens are recorded."""
        return self.recorder.full

    @property
    def num_tokens(self) -> int:
        """Tokens recorded so far."""
        return self.recorder.num_recorded()

    def attach(self) -> TraceRecorder:
        """Start recording (idempotent); returns self."""
        self.recorder.attach()
        return self

    def detach(self) -> None:
        """Stop recording (what was recorded is kept)."""
        self.recorder.detach()

    def __enter__(self) -> TraceRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def trace(self) -> RoutingTrace:
        """The trace recorded so far (ValueError when nothing was recorded)."""
        return trace_from_token_routing(self.recorder.result(), source=self.source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace (``.jsonl`` or ``.npz``); returns the path."""
        return self.trace().save(path)
