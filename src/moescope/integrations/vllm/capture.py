"""The vLLM side of moescope that needs torch only: the routing monitor a vLLM worker holds,
and the Dynamo-opaque op that feeds it.

A vLLM worker runs the model under ``torch.inference_mode()``, usually compiled by
``torch.compile`` with guards dropped, and batches the tokens of many requests (padded
for CUDA graphs). What this module does about it:

- :class:`VllmRoutingMonitor` is a front end of the one monitor core
  (:class:`moescope.core.MonitorCore`): the same pipeline, capture op
  (``moescope::capture``, opaque to Dynamo, run every time the compiled graph runs),
  reduction (``RoutingSums``, exact int64 counts) and single host copy as ``MoEMonitor``.
  :meth:`VllmRoutingMonitor.capture` is what the router wrapper calls; the staged path
  copies ``topk_ids`` (and, unless ``counts_only``, the router logits and combine weights)
  because vLLM reuses those buffers.
- Padding rows and warm-up/profiling forwards are decided when the op *runs*, by two
  callables the vLLM glue installs (:func:`set_runtime_context`): the forward context's
  ``is_padding`` mask becomes the record's ``token_mask``; a paused monitor (inside vLLM's
  ``_dummy_run``) drops the call.
- CUDA graphs (``graph_safe=True``, automatic for engines that capture graphs): every call
  is added at once into persistent buffers; warm-up is excluded by a device gate
  (:meth:`VllmRoutingMonitor.set_paused`) and padding by a device valid-token count
  (:meth:`VllmRoutingMonitor.set_valid_tokens`), both read by the kernels at replay: the
  pattern of vLLM's own EPLB load recorder.
- The monitor keeps, besides the core's window (for the Prometheus exporter and the JSONL
  log, which close it), a running total since the caller's last reset (what
  ``collective_rpc`` returns), plus the token bookkeeping (tokens routed vs prefix-cache
  hits) that only the model runner knows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moescope.core import CoreLayer, MonitorCore
from moescope.stats.accumulator import merge_states, subtract_states
from moescope.stats.snapshot import Snapshot

__all__ = [
    "TOKEN_COUNTERS",
    "VllmLayer",
    "VllmRoutingMonitor",
    "served_summary",
    "set_runtime_context",
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


# -------------------------------------------------------------------- the monitor


class VllmRoutingMonitor:
    """Routing statistics of one vLLM worker's MoE layers (a front end of the core).

    Args:
        layers: the routed MoE layers, in model order.
        counts_only: capture only ``topk_ids`` (and the padding mask): counts, balance and
            unique experts per forward, no router-probability metrics (entropy, aux loss,
            top-1). Cheaper (one copy per layer call instead of three).
        coactivation: keep [E, E] co-activation counts per layer.
        budget_bytes: staged bytes that trigger a reduction (see ``CapturePipeline``).
        graph_safe: accumulate into persistent buffers at every call (CUDA graphs).

    Thread safety: :attr:`lock` is held by the vLLM glue around every model-runner step
    and by every snapshot, so a window always holds whole forwards.
    """

    def __init__(
        self,
        layers: Sequence[VllmLayer],
        counts_only: bool = False,
        coactivation: bool = True,
        budget_bytes: int = 32 * 2**20,
        graph_safe: bool = False,
    ) -> None:
        if not layers:
            raise ValueError(
                "VllmRoutingMonitor needs at least one MoE layer; the vLLM model has no "
                "FusedMoE router (is it a Mixture-of-Experts model?)"
            )
        self.layers = list(layers)
        self.counts_only = bool(counts_only)
        self.graph_safe = bool(graph_safe)
        self.core = MonitorCore(
            [
                CoreLayer(info.path, info.num_experts, info.top_k, torch.device(info.device))
                for info in self.layers
            ],
            coactivation=coactivation,
            counts_only=counts_only,
            graph_safe=graph_safe,
            budget_bytes=budget_bytes,
            process_group=False,  # vLLM ranks report apart (see worker._output_index)
        )
        self.pipeline = self.core.pipeline
        self.pipeline.padding = lambda: _RUNTIME["padding"]()
        self.pipeline.paused = lambda: bool(_RUNTIME["paused"]())
        self.lock = self.core.lock
        self.model = None  # the exporter's forward lock does not apply (see class doc)
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

    def capture(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        router_logits: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
    ) -> None:
        """One router call of layer ``layer`` (what the router wrapper calls, traced by
        Dynamo into the capture op). Device ops only, never a host sync.

        Args:
            layer: index into :attr:`layers`.
            topk_ids: [T, K] int logical expert ids (rows past the real tokens are padding).
            router_logits: [T, E'] router scores, or None.
            topk_weights: [T, K] combine weights, or None.
        """
        self.record(layer, topk_ids, router_logits, topk_weights)

    def record(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        is_padding: torch.Tensor | None = None,
    ) -> None:
        """One router call with an explicit padding mask (eager callers and tests).

        ``is_padding``: [>= T] bool, True for padding rows; None: every row is real.
        """
        info = self.layers[layer]
        t = topk_ids.shape[0]
        mask = None
        if is_padding is not None and is_padding.shape[0] >= t:
            mask = ~is_padding[:t]
        self.pipeline.call(
            layer,
            info.num_experts,
            topk_ids,
            router_logits if info.scores else None,
            topk_weights,
            token_mask=mask,
            score_fn=info.score_fn,
            borrowed=True,
        )

    def set_paused(self, paused: bool) -> None:
        """Graph-safe: calls run but do not count while paused (vLLM's warm-up and
        CUDA-graph capture), in a device flag the replayed kernels read."""
        self.pipeline.set_enabled(not paused)

    def set_valid_tokens(self, n: int | None) -> None:
        """Graph-safe: the next forward's first ``n`` rows are real tokens (the rest is
        padding to a CUDA-graph size); a device count the replayed kernels read."""
        self.pipeline.set_valid_tokens(n)

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
        with self.lock:
            raw = self.core.read("default", reset=reset)["routing"]
            tokens = dict(self._window_tokens)
            if reset:
                self._window_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
        return raw, tokens

    def _snapshot(self, raw: Mapping[str, np.ndarray], step: int | None) -> Snapshot:
        layers = self.core.stats({"routing": raw})
        return Snapshot(step=step, layers=layers, time=time.time())

    def snapshot(self, reset: bool = False, step: int | None = None) -> Snapshot:
        """Statistics of the current window (what the Prometheus exporter and the JSONL
        log read). Reading never resets unless ``reset=True``, which closes the window:
        its sums move into the running total and every :attr:`window_listeners` callback
        receives it."""
        raw, tokens = self._read(reset)
        snap = self._snapshot(raw, self._num_windows if step is None else step)
        if reset:
            with self.lock:
                self._closed = merge_states(self._closed, subtract_states(raw, self._baseline))
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
        snap, counters, _ = self.total_states(reset)
        return snap, counters

    def total_states(
        self, reset: bool = False
    ) -> tuple[Snapshot, dict[str, int], dict[str, dict[str, np.ndarray]]]:
        """:meth:`total` plus the per-layer accumulator states it was computed from (host
        arrays keyed by layer path): what lets a caller add data-parallel replicas
        exactly (``stats.accumulator.merge_states``)."""
        with self.lock:
            raw, tokens = self._read(reset=False)
            merged = merge_states(self._closed, subtract_states(raw, self._baseline))
            counters = {
                k: self._closed_tokens[k] + tokens[k] - self._baseline_tokens[k]
                for k in TOKEN_COUNTERS
            }
            if reset:
                self._closed = None
                self._closed_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
                self._baseline = raw
                self._baseline_tokens = tokens
        per_layer = self.core.window("default").routing.layer_states(merged)
        states = {info.path: per_layer[i] for i, info in enumerate(self.layers)}
        return self._snapshot(merged, None), counters, states


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
