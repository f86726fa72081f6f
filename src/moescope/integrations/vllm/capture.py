"""The vLLM side of moescope that needs torch only: the routing monitor a vLLM worker holds,
and the Dynamo-opaque op that feeds it.

A vLLM worker runs the model under ``torch.inference_mode()``, usually compiled by
``torch.compile`` with guards dropped, and batches the tokens of many requests (padded
for CUDA graphs). What this module does about it:

- :func:`capture_op` (``moescope_vllm::capture``) is a ``torch.library.custom_op``: Dynamo
  keeps it in the graph as one opaque call (no graph break, no guard), and it runs every
  time the compiled graph runs. It copies ``topk_ids`` (and, unless ``counts_only``, the
  router logits and combine weights) because vLLM reuses those buffers, and stages them in
  the monitor's :class:`~moescope.capture.pipeline.CapturePipeline`: the reduction is the
  same ``RoutingSums`` as every other moescope path (exact int64 counts).
- Padding rows and warm-up/profiling forwards are decided when the op *runs*, by two
  callables the vLLM glue installs (:func:`set_runtime_context`): the forward context's
  ``is_padding`` mask becomes the record's ``token_mask``; a paused monitor (inside vLLM's
  ``_dummy_run``) drops the call.
- :class:`VllmRoutingMonitor` holds the sums of one worker: window snapshots (for the
  Prometheus exporter and the JSONL log, which reset them) and a running total since the
  caller's last reset (what ``collective_rpc`` returns), plus the token bookkeeping
  (tokens routed vs prefix-cache hits) that only the model runner knows.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moescope.capture.pipeline import CapturePipeline
from moescope.capture.record import RoutingRecord
from moescope.stats.accumulator import RAW_REDUCE_OPS, RoutingStats, states_to_numpy
from moescope.stats.snapshot import LayerStats, Snapshot, layer_stats_from_state

__all__ = [
    "TOKEN_COUNTERS",
    "VllmLayer",
    "VllmRoutingMonitor",
    "capture_op",
    "merge_raw",
    "set_runtime_context",
    "subtract_raw",
]

#: Token bookkeeping kept beside the routing sums (per window and in the total):
#: ``scheduled_tokens`` tokens the model runner fed through the model (real rows only);
#: ``prefix_cached_tokens`` prompt tokens served from the prefix cache (never routed);
#: ``forwards`` model-runner steps that ran a forward.
TOKEN_COUNTERS: tuple[str, ...] = ("scheduled_tokens", "prefix_cached_tokens", "forwards")


@dataclass(frozen=True)
class VllmLayer:
    """One routed MoE layer of a vLLM model.

    Attributes:
        path: module path in the vLLM model (e.g. ``model.layers.3.mlp.experts``; the
            runner's ``layer_name``).
        num_experts: E, logical routed experts (redundant EPLB replicas excluded).
        top_k: K.
        score_fn: how the router logits map to a distribution (``softmax``/``sigmoid``).
        device: where the router's tensors live.
        scores: the router's scores are a softmax/sigmoid distribution moescope can read
            (entropy, top-1, aux loss); False for other scoring functions (counts only).
        module: the layer module (only for callers that want it; the exporter's
            forward lock is off for vLLM).
    """

    path: str
    num_experts: int
    top_k: int
    score_fn: str = "softmax"
    device: str = "cpu"
    scores: bool = True
    module: Any = None


# -------------------------------------------------------------------- runtime context

_MONITORS: weakref.WeakValueDictionary[int, VllmRoutingMonitor] = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


def _no_padding() -> torch.Tensor | None:
    return None


def _not_paused() -> bool:
    return False


_RUNTIME: dict[str, Callable[..., Any]] = {"padding": _no_padding, "paused": _not_paused}


def set_runtime_context(
    padding: Callable[[], torch.Tensor | None] | None = None,
    paused: Callable[[], bool] | None = None,
) -> None:
    """Install how the op reads the current forward's padding mask and whether counting
    is paused (the vLLM glue points these at ``ForwardContext.is_padding`` and at its
    ``_dummy_run`` flag). ``None`` restores the default (no padding, never paused)."""
    _RUNTIME["padding"] = padding or _no_padding
    _RUNTIME["paused"] = paused or _not_paused


@torch.library.custom_op("moescope_vllm::capture", mutates_args=("ticket",))
def capture_op(
    ticket: torch.Tensor,
    monitor: int,
    layer: int,
    topk_ids: torch.Tensor,
    router_logits: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
) -> None:
    """Stage one router call of layer ``layer`` into monitor ``monitor``.

    Args:
        ticket: the monitor's 1-element tensor; declared mutated so that compilers keep
            the call (it is never written).
        monitor: :attr:`VllmRoutingMonitor.id`.
        layer: index into the monitor's layers.
        topk_ids: [T, K] int, logical expert ids chosen per token (rows past the real
            tokens are padding).
        router_logits: [T, E'] router scores before selection, or None.
        topk_weights: [T, K] combine weights, or None.
    """
    mon = _MONITORS.get(monitor)
    if mon is None or _RUNTIME["paused"]():
        return
    mon.record(layer, topk_ids, router_logits, topk_weights, _RUNTIME["padding"]())


@capture_op.register_fake
def _capture_fake(*args: object) -> None:
    return None


# -------------------------------------------------------------------- raw state algebra


def merge_raw(
    a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Combine two host copies of :meth:`RoutingStats.state` (keys ``"<group>/<name>"``)
    with each entry's rule (sum, or max for ``unique_max``). ``a=None`` copies ``b``."""
    if a is None:
        return {k: np.array(v, copy=True) for k, v in b.items()}
    out: dict[str, np.ndarray] = {}
    for key, vb in b.items():
        op = RAW_REDUCE_OPS[key.split("/", 1)[1]]
        out[key] = np.maximum(a[key], vb) if op == "max" else a[key] + vb
    return out


def subtract_raw(
    a: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """``a`` minus an earlier reading ``base`` of the same sums (``base=None``: a copy).

    Sums subtract exactly; ``unique_max`` (a maximum) cannot be undone and keeps ``a``'s
    value, so it may include calls from before ``base``."""
    if base is None:
        return {k: np.array(v, copy=True) for k, v in a.items()}
    out: dict[str, np.ndarray] = {}
    for key, va in a.items():
        op = RAW_REDUCE_OPS[key.split("/", 1)[1]]
        out[key] = np.array(va, copy=True) if op == "max" else va - base[key]
    return out


# -------------------------------------------------------------------- the monitor


class VllmRoutingMonitor:
    """Routing statistics of one vLLM worker's MoE layers.

    Args:
        layers: the routed MoE layers, in model order.
        counts_only: stage only ``topk_ids`` (and the padding mask): counts, balance and
            unique experts per forward, no router-probability metrics (entropy, aux loss,
            top-1). Cheaper (one copy per layer call instead of three).
        coactivation: keep [E, E] co-activation counts per layer.
        budget_bytes: staged bytes that trigger a reduction (see ``CapturePipeline``).

    Thread safety: :attr:`lock` is held by the vLLM glue around every model-runner step
    and by every snapshot, so a window always holds whole forwards.
    """

    def __init__(
        self,
        layers: Sequence[VllmLayer],
        counts_only: bool = False,
        coactivation: bool = True,
        budget_bytes: int = 32 * 2**20,
    ) -> None:
        if not layers:
            raise ValueError(
                "VllmRoutingMonitor needs at least one MoE layer; the vLLM model has no "
                "FusedMoE router (is it a Mixture-of-Experts model?)"
            )
        self.layers = list(layers)
        self.counts_only = bool(counts_only)
        self.stats = RoutingStats(len(self.layers), coactivation=coactivation)
        for i, info in enumerate(self.layers):
            # Every layer gets its row now: the raw state keys never change, so host
            # copies of different windows can be added key by key.
            self.stats.ensure(i, info.num_experts, info.top_k, torch.device(info.device))
        self.pipeline = CapturePipeline(
            [info.path for info in self.layers],
            lambda _window: [self.stats],
            budget_bytes=budget_bytes,
            counts_only=self.counts_only,
        )
        self.lock = threading.RLock()
        self.model = None  # the exporter's forward lock does not apply (see class doc)
        self.id = next(_IDS)
        _MONITORS[self.id] = self
        with torch.inference_mode(False):
            self.ticket = torch.zeros(1)
        # Total since the caller's last reset = closed windows (minus what the open window
        # had when the caller reset) + the open window; windows themselves are never cut
        # short by a caller's reset (the exporter and the JSONL log own them).
        self._closed: dict[str, np.ndarray] | None = None
        self._baseline: dict[str, np.ndarray] | None = None
        self._baseline_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
        self._window_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
        self._closed_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
        self._num_windows = 0
        #: Token counters since the monitor was built (never reset: Prometheus counters).
        self.lifetime_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
        #: Called with (window snapshot, window token counters) after every window.
        self.window_listeners: list[Callable[[Snapshot, dict[str, int]], None]] = []

    # ------------------------------------------------------------------ capture

    def record(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        is_padding: torch.Tensor | None = None,
    ) -> None:
        """Stage one router call (copies; device ops only, never a host sync).

        Args:
            layer: index into :attr:`layers`.
            topk_ids: [T, K] int logical expert ids.
            router_logits: [T, E'] router scores, or None.
            topk_weights: [T, K] combine weights, or None.
            is_padding: [>= T] bool, True for padding rows (the forward context's mask);
                None when every row is a real token.
        """
        info = self.layers[layer]
        t = topk_ids.shape[0]
        if t == 0:
            return
        ids = topk_ids.reshape(t, -1)
        mask = None
        if is_padding is not None and is_padding.shape[0] >= t:
            mask = ~is_padding[:t]  # a new tensor: the runner reuses its mask buffer
        keep_scores = not self.counts_only and info.scores
        logits = router_logits if keep_scores else None
        if logits is not None and (logits.dim() != 2 or logits.shape[0] != t):
            logits = None  # e.g. a router that scores a different row layout
        weights = None if self.counts_only else topk_weights
        rec = RoutingRecord(
            layer=info.path,
            num_experts=info.num_experts,
            topk_index=ids.clone(),
            logits=None if logits is None else logits.detach().clone(),
            score_fn=info.score_fn,  # type: ignore[arg-type]
            topk_weight=None if weights is None else weights.reshape(t, -1).detach().clone(),
            token_mask=mask,
        )
        with self.lock:
            self.pipeline.stage(rec)

    def count_tokens(self, scheduled: int, prefix_cached: int) -> None:
        """Add one model-runner step's token bookkeeping (host ints from the scheduler)."""
        step = {
            "scheduled_tokens": int(scheduled),
            "prefix_cached_tokens": int(prefix_cached),
            "forwards": 1 if scheduled > 0 else 0,
        }
        with self.lock:
            for k, v in step.items():
                self._window_tokens[k] += v
                self.lifetime_tokens[k] += v

    # ------------------------------------------------------------------ reading

    def _read(self, reset: bool) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        with self.lock, torch.inference_mode(False), torch.no_grad():
            self.pipeline.flush()
            raw = states_to_numpy({"r": self.stats.state()})["r"]
            tokens = dict(self._window_tokens)
            if reset:
                self.stats.reset()
                self._window_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
        return raw, tokens

    def _snapshot(self, raw: Mapping[str, np.ndarray], step: int | None) -> Snapshot:
        per_layer = self.stats.layer_states(raw)
        layers: dict[str, LayerStats] = {}
        for i, info in enumerate(self.layers):
            layers[info.path] = layer_stats_from_state(per_layer[i], info.num_experts, info.top_k)
        return Snapshot(step=step, layers=layers, time=time.time())

    def snapshot(self, reset: bool = True, step: int | None = None) -> Snapshot:
        """Statistics of the current window (what the Prometheus exporter and the JSONL
        log read). ``reset=True`` closes the window: its sums move into the running
        total and every :attr:`window_listeners` callback receives it."""
        raw, tokens = self._read(reset)
        snap = self._snapshot(raw, self._num_windows if step is None else step)
        if reset:
            with self.lock:
                self._closed = merge_raw(self._closed, subtract_raw(raw, self._baseline))
                for k in TOKEN_COUNTERS:
                    self._closed_tokens[k] += tokens[k] - self._baseline_tokens[k]
                self._baseline = None
                self._baseline_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
                self._num_windows += 1
            for fn in list(self.window_listeners):
                fn(snap, tokens)
        return snap

    @property
    def last_tokens(self) -> dict[str, int]:
        """Token counters of the current (open) window."""
        with self.lock:
            return dict(self._window_tokens)

    def total(self, reset: bool = False) -> tuple[Snapshot, dict[str, int]]:
        """Statistics since the start (or the last ``total(reset=True)``): every closed
        window plus the open one, and the token counters over the same span.
        ``reset=True`` starts the total again; the open window (the exporter's, the JSONL
        log's) is left whole. ``unique_experts_max`` of a total read after a reset may
        include calls of the window that was open at the reset."""
        with self.lock:
            raw, tokens = self._read(reset=False)
            merged = merge_raw(self._closed, subtract_raw(raw, self._baseline))
            counters = {
                k: self._closed_tokens[k] + tokens[k] - self._baseline_tokens[k]
                for k in TOKEN_COUNTERS
            }
            if reset:
                self._closed = None
                self._closed_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
                self._baseline = raw
                self._baseline_tokens = tokens
        return self._snapshot(merged, None), counters


def served_summary(snap: Snapshot, tokens: Mapping[str, int]) -> dict[str, float]:
    """Tokens routed vs served, from a snapshot and its token counters.

    ``routed_tokens``: tokens the MoE layers saw (the largest per-layer valid-token
    count); ``served_tokens``: routed + prefix-cache hits (prompt tokens answered from
    cached KV without a forward); ``prefix_cached_fraction``: hits / served.
    """
    routed = int(snap.total_tokens)
    cached = int(tokens.get("prefix_cached_tokens", 0))
    served = routed + cached
    return {
        "routed_tokens": float(routed),
        "scheduled_tokens": float(tokens.get("scheduled_tokens", 0)),
        "prefix_cached_tokens": float(cached),
        "served_tokens": float(served),
        "prefix_cached_fraction": cached / served if served else math.nan,
        "forwards": float(tokens.get("forwards", 0)),
    }
