"""Serving-time monitoring: a Prometheus endpoint fed by :class:`~moescope.MoEMonitor` windows.

``PrometheusExporter(monitor, port=..., host="127.0.0.1")`` takes a snapshot of the monitor
every ``interval`` seconds on a daemon thread (``monitor.snapshot(reset=True)``: one host
transfer per refresh, never one per request), turns it into Prometheus metric families, and
serves them over HTTP while the model answers requests (``generate()`` calls, a batch
server's forwards) in other threads.

Thread safety. The forward thread stages layer calls in the monitor's pipeline (and
sometimes reduces them into the sums), while ``snapshot(reset=True)`` reduces what is
staged, copies every sum to the host and zeroes them. The monitor's own lock makes each of
these atomic, so no count is lost; but a snapshot taken in the middle of a forward would
report some of its layers and not the others. The exporter therefore brings a
forward-level lock: while started it installs a forward pre-hook / hook pair
(``always_call=True``, so an exception inside the forward still releases it) on the
monitored model and on every MoE block that holds a re-entrant lock for the whole call,
and every refresh takes ``monitor.snapshot`` under the same lock. A snapshot therefore
sees only whole forwards, and waits for at most one forward (one decoding step under
``generate()``). Adapters emit records from hooks that run inside a block's forward, so a
direct call of a sub-module (a block, or the inner ``model.model``) is covered by the
block's hooks too. ``lock_forwards=False`` turns the hooks off (then the race above is
possible: tests/test_serve_prometheus.py holds a snapshot open and shows a forward wait).

While an exporter runs it owns the monitor's windows: another ``snapshot(reset=True)``
elsewhere would steal the counts of a window from the exporter's counters. Share the
exporter's snapshots instead (``exporter.last_snapshot``, or the return value of
``exporter.refresh()``).

Single process only: under ``torch.distributed`` the monitor all-reduces at snapshot time,
and timers on different ranks cannot line those collectives up; ``start()`` refuses.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from moescope._optional import require

if TYPE_CHECKING:
    from moescope.monitor import MoEMonitor
    from moescope.stats.snapshot import LayerStats, Snapshot

__all__ = ["DEFAULT_BALANCEDNESS_BUCKETS", "DEFAULT_LOAD_QUANTILES", "PrometheusExporter"]

_log = logging.getLogger(__name__)

#: Upper bounds of the per-window balancedness histogram (balancedness lies in [1/E, 1]).
DEFAULT_BALANCEDNESS_BUCKETS: tuple[float, ...] = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0,
)  # fmt: skip

#: Quantiles of the per-expert load fractions exported per layer by default.
DEFAULT_LOAD_QUANTILES: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99, 1.0)

_P = "moescope_"


@dataclass
class _LayerSeries:
    """Everything the exporter remembers about one MoE layer (host side, O(E))."""

    num_experts: int
    # Counters: sums over every window since the exporter was built.
    expert_tokens: np.ndarray  # [E] int64
    tokens: int = 0
    calls: int = 0
    nonfinite: int = 0
    # Histogram of per-window balancedness: non-cumulative bucket counts, +Inf last.
    hist_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    hist_sum: float = 0.0
    # Gauges: values of the last window in which the layer saw a valid token.
    load_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [E] float64
    balancedness: float = math.nan
    max_over_mean: float = math.nan
    routing_entropy: float = math.nan
    unique_experts: float = math.nan
    unique_experts_max: float = math.nan
    neuron_sparsity: float | None = None
    window_tokens: int = 0
    # Bounded views of load_fraction (what is exported without per_expert).
    load_quantiles: list[float] = field(default_factory=list)
    top: list[tuple[int, float]] = field(default_factory=list)
    bottom: list[tuple[int, float]] = field(default_factory=list)


def load_views(
    fraction: np.ndarray, quantiles: Sequence[float], top: int
) -> tuple[list[float], list[tuple[int, float]], list[tuple[int, float]]]:
    """The bounded views of one layer's per-expert load that the exporter sends.

    Args:
        fraction: [E] load fraction of each expert (sums to 1).
        quantiles: which quantiles over the E experts (numpy's linear interpolation).
        top: how many most / least loaded experts.

    Returns:
        ``(quantile values, [(expert, fraction)] most loaded first, [(expert, fraction)]
        least loaded first)``; ties go to the lower expert id.
    """
    f = np.asarray(fraction, dtype=np.float64).reshape(-1)
    ids = np.arange(f.shape[0])
    qs = [float(v) for v in np.quantile(f, list(quantiles))] if len(quantiles) else []
    k = min(int(top), f.shape[0])
    hi = np.lexsort((ids, -f))[:k]
    lo = np.lexsort((ids, f))[:k]
    return qs, [(int(e), float(f[e])) for e in hi], [(int(e), float(f[e])) for e in lo]


class _ForwardLock:
    """A re-entrant lock held by the monitored model's forwards (pre-hook acquires, an
    ``always_call`` forward hook releases) and by every exporter refresh.

    A per-thread, per-module depth counter makes the release match an acquire made by
    this hook: when an earlier pre-hook raises, torch still calls ``always_call`` hooks,
    and releasing a lock this thread does not hold would raise over the real error.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._local = threading.local()
        self._handles: list[Any] = []

    def _depths(self) -> dict[int, int]:
        d = getattr(self._local, "depths", None)
        if d is None:
            d = self._local.depths = {}
        return d

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.lock.acquire()
        d = self._depths()
        d[id(module)] = d.get(id(module), 0) + 1

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        d = self._depths()
        n = d.get(id(module), 0)
        if n <= 0:
            return
        d[id(module)] = n - 1
        self.lock.release()

    def install(self, modules: Sequence[nn.Module]) -> None:
        if self._handles:
            return
        seen: set[int] = set()
        for m in modules:
            if id(m) in seen:
                continue
            seen.add(id(m))
            # The pre-hook goes first so the lock covers the monitor's own pre-hooks; the
            # post-hook is appended so it runs after hooks that emit from the output.
            self._handles.append(m.register_forward_pre_hook(self._pre, prepend=True))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    @property
    def installed(self) -> bool:
        return bool(self._handles)


class PrometheusExporter:
    """Serve per-layer MoE routing metrics to Prometheus, refreshed from monitor snapshots.

    Every ``interval`` seconds a daemon thread calls ``monitor.snapshot(reset=True)``
    (under a lock shared with the model's forwards, see the module docstring) and updates
    the metrics below; ``refresh()`` does the same on demand. A window is the time
    between two refreshes. ``start()`` binds an HTTP server on ``host:port`` that answers
    ``GET /metrics`` (any path, in fact) in the Prometheus text format; ``port=0`` picks a
    free port (read it back from ``exporter.port`` / ``exporter.url``). Metrics live in the
    exporter's own ``CollectorRegistry`` (``exporter.registry``), never the global one, so
    several exporters can coexist in a process.

    Metrics (``layer`` = the MoE block's module path, e.g. ``model.layers.3.mlp``;
    ``expert`` = the expert id 0..E-1 as a string). Counters add every window's counts
    and never go down; gauges hold the values of the last window in which the layer saw
    at least one valid token (NaN before the first one), so an idle server keeps showing
    the last routing it did (``moescope_layer_window_tokens`` tells idle windows apart).

    Bounded by default: O(L x (quantiles + 2 x top_experts)) series, whatever E. The two
    per-(layer, expert) families, E x L series (24,576 for a 256-expert, 96-layer
    model), are exported only with ``per_expert=True``:

    ========================================== ========= =============== =====================================
    name                                       type      labels          meaning
    ========================================== ========= =============== =====================================
    ``moescope_layer_expert_load_quantile``    gauge     layer, quantile quantiles over the layer's E experts
                                                                         of their load fraction in the window
                                                                         (``load_quantiles``; 0 = the least
                                                                         loaded expert, 1 = the most)
    ``moescope_layer_top_expert_load_fraction`` gauge    layer, rank,    the ``top_experts`` most loaded
                                                         expert          experts of the window (rank 1 = most;
                                                                         ties by lower id)
    ``moescope_layer_bottom_expert_load_fraction`` gauge layer, rank,    the ``top_experts`` least loaded
                                                         expert          experts (rank 1 = least; ties by
                                                                         lower id)
    ``moescope_expert_tokens_total``           counter   layer, expert   ``per_expert=True`` only: tokens
                                                                         routed to the expert (kept
                                                                         (token, slot) assignments); the sum
                                                                         over experts is K x tokens
    ``moescope_expert_load_fraction``          gauge     layer, expert   ``per_expert=True`` only: share of
                                                                         the window's assignments that went
                                                                         to the expert (sums to 1)
    ``moescope_layer_balancedness``            gauge     layer           mean / max expert load of the window:
                                                                         1 = perfectly even, 1/E = one expert
                                                                         takes everything
    ``moescope_layer_max_over_mean``           gauge     layer           max / mean expert load (1/balancedness)
    ``moescope_layer_balancedness_window``     histogram layer           distribution of the per-window
                                                                         balancedness over all windows with
                                                                         tokens (buckets: ``balancedness_buckets``)
    ``moescope_layer_routing_entropy``         gauge     layer           mean over tokens of the router
                                                                         distribution's entropy (nats); NaN when
                                                                         the router exposes no scores
    ``moescope_layer_unique_experts``          gauge     layer           distinct experts one forward of the
                                                                         layer touched, mean over the window's
                                                                         forwards (what a serving step loads)
    ``moescope_layer_unique_experts_max``      gauge     layer           the window's maximum of the same
    ``moescope_layer_neuron_sparsity``         gauge     layer           1 - mean activated neurons / I inside
                                                                         the chosen experts; only layers with
                                                                         neuron statistics
                                                                         (``MoEMonitor(neurons=True)``)
    ``moescope_layer_window_tokens``           gauge     layer           valid tokens in the last window (0 when
                                                                         the model was idle)
    ``moescope_tokens_total``                  counter   layer           valid tokens the layer routed
    ``moescope_layer_forwards_total``          counter   layer           calls of the layer (forwards)
    ``moescope_nonfinite_router_rows_total``   counter   layer           tokens whose router scores were NaN/inf
                                                                         (excluded from every other metric)
    ``moescope_snapshots_total``               counter   (none)          refreshes done
    ``moescope_refresh_errors_total``          counter   (none)          timer refreshes that raised (logged)
    ``moescope_snapshot_timestamp_seconds``    gauge     (none)          wall-clock time of the last refresh
                                                                         (seconds since the epoch; 0 before)
    ========================================== ========= =============== =====================================

    Definitions follow DESIGN.md ("Metric definitions"); balancedness is the inverse of
    the imbalance ratio max/mean of Switch Transformer style load analyses (Fedus et al.
    2021) and the neuron sparsity that of CATS / TEAL (Lee et al. 2024; Liu et al. 2024).

    Args:
        monitor: an attached ``MoEMonitor`` on the serving model.
        port: TCP port of the HTTP endpoint; 0 = any free port.
        host: address to bind. The loopback default keeps the endpoint private; pass an
            external address only on purpose.
        interval: seconds between timer refreshes; None = no timer (call ``refresh()``).
        lock_forwards: hold a lock around the model's forwards so that a snapshot never
            interleaves with a layer call (see the module docstring).
        balancedness_buckets: upper bounds of the balancedness histogram, increasing.
        per_expert: also export the two per-(layer, expert) families (E x L series).
        top_experts: most / least loaded experts exported per layer (0 = none).
        load_quantiles: quantiles of the per-expert load fractions exported per layer,
            each in [0, 1] (linear interpolation between experts, numpy's default).

    Example::

        monitor = MoEMonitor(model)
        with PrometheusExporter(monitor, port=9400, interval=15) as exp:
            serve_forever(model)          # e.g. model.generate(...) per request
        # scrape http://127.0.0.1:9400/metrics
    """

    def __init__(
        self,
        monitor: MoEMonitor,
        port: int = 9400,
        host: str = "127.0.0.1",
        interval: float | None = 15.0,
        *,
        lock_forwards: bool = True,
        balancedness_buckets: Sequence[float] = DEFAULT_BALANCEDNESS_BUCKETS,
        per_expert: bool = False,
        top_experts: int = 3,
        load_quantiles: Sequence[float] = DEFAULT_LOAD_QUANTILES,
    ) -> None:
        prom = require("prometheus_client", "prometheus")
        if not callable(getattr(monitor, "snapshot", None)) or not hasattr(monitor, "layers"):
            raise TypeError(
                "PrometheusExporter needs a moescope.MoEMonitor (an object with snapshot() and "
                f"layers), got {type(monitor).__name__}; build one with MoEMonitor(model)."
            )
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535] (0 = any free port), got {port!r}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be an address string such as '127.0.0.1', got {host!r}")
        if interval is not None and not (isinstance(interval, (int, float)) and interval > 0):
            raise ValueError(
                f"interval must be a positive number of seconds or None (no timer), got {interval!r}"
            )
        buckets = [float(b) for b in balancedness_buckets]
        if not buckets or any(b2 <= b1 for b1, b2 in itertools.pairwise(buckets)):
            raise ValueError(
                f"balancedness_buckets must be a non-empty increasing sequence, got {buckets}"
            )
        if isinstance(top_experts, bool) or not isinstance(top_experts, int) or top_experts < 0:
            raise ValueError(f"top_experts must be an int >= 0, got {top_experts!r}")
        quantiles = [float(q) for q in load_quantiles]
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"load_quantiles must lie in [0, 1], got {quantiles}")
        self.per_expert = bool(per_expert)
        self.top_experts = int(top_experts)
        self.load_quantiles = tuple(quantiles)
        self.monitor = monitor
        self.host = host
        self.interval = None if interval is None else float(interval)
        self.lock_forwards = bool(lock_forwards)
        self.buckets = tuple(buckets)
        self._requested_port = port
        self._bound_port: int | None = None
        self._forward_lock = _ForwardLock()
        self._refresh_lock = threading.Lock()
        self._stop_evt = threading.Event()
        self._timer: threading.Thread | None = None
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._series: dict[str, _LayerSeries] = {}
        for info in monitor.layers:
            e = int(info.num_experts)
            self._series[info.path] = _LayerSeries(
                num_experts=e,
                expert_tokens=np.zeros(e, dtype=np.int64),
                hist_counts=np.zeros(len(self.buckets) + 1, dtype=np.int64),
                load_fraction=np.full(e, math.nan),
                load_quantiles=[math.nan] * len(self.load_quantiles),
            )
        self._snapshots = 0
        self._errors = 0
        self._timestamp = 0.0
        self.last_snapshot: Snapshot | None = None
        self.registry = prom.CollectorRegistry(auto_describe=False)
        self._families: list[Any] = self._build_families()
        self.registry.register(_Collector(self))

    # ------------------------------------------------------------------ lifecycle

    @property
    def lock(self) -> threading.RLock:
        """The re-entrant lock a refresh holds; hold it to keep a window from closing."""
        return self._forward_lock.lock

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port once started (the real one when ``port=0``), else the requested one."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` of the endpoint."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> PrometheusExporter:
        """Install the forward lock, bind the HTTP server, start the refresh timer.

        Returns self. Raises ``RuntimeError`` when already started or under a
        multi-rank ``torch.distributed`` run, ``OSError`` when the port is taken.
        """
        if self.running:
            raise RuntimeError(f"PrometheusExporter already serving on {self.url}; stop() it first")
        self._check_single_process()
        prom = require("prometheus_client", "prometheus")
        model = getattr(self.monitor, "model", None)
        if self.lock_forwards:
            modules = [model] if isinstance(model, nn.Module) else []
            modules += [info.module for info in self.monitor.layers]
            self._forward_lock.install(modules)
        try:
            server, thread = prom.start_http_server(
                self._requested_port, addr=self.host, registry=self.registry
            )
        except BaseException:
            self._forward_lock.remove()
            raise
        self._server, self._server_thread = server, thread
        self._bound_port = int(server.server_address[1])
        self._stop_evt = threading.Event()
        if self.interval is not None:
            self._timer = threading.Thread(
                target=self._run_timer, name="moescope-prometheus-refresh", daemon=True
            )
            self._timer.start()
        return self

    def stop(self) -> None:
        """Stop the timer, close the HTTP server (its port is free on return) and remove
        the forward hooks. Idempotent; the metric values are kept (``start()`` again
        resumes them)."""
        self._stop_evt.set()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.join()
        server, thread = self._server, self._server_thread
        self._server = self._server_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()
        self._forward_lock.remove()

    def __enter__(self) -> PrometheusExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"serving {self.url}" if self.running else "stopped"
        return f"PrometheusExporter({len(self._series)} layers, interval={self.interval}, {state})"

    def _check_single_process(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "PrometheusExporter takes snapshots on a timer, which cannot line up the "
                "monitor's all-reduce across ranks; build the MoEMonitor with a single-rank "
                "process_group (e.g. torch.distributed.new_group([rank])) per serving process "
                "and export each rank separately, or export from a single-process server."
            )

    def _run_timer(self) -> None:
        assert self.interval is not None
        while not self._stop_evt.wait(self.interval):
            try:
                self.refresh()
            except Exception:
                # A scrape endpoint must outlive one bad window; the error is counted
                # in moescope_refresh_errors_total and logged with its traceback.
                with self._refresh_lock:
                    self._errors += 1
                    self._families = self._build_families()
                _log.exception("moescope: PrometheusExporter refresh failed")

    # ------------------------------------------------------------------ refresh

    def refresh(self, step: int | None = None) -> Snapshot:
        """Close the monitor's window now (``snapshot(reset=True, step=step)``) and update
        every metric from it. Returns the snapshot. Safe from any thread."""
        with self._refresh_lock:
            with self._forward_lock.lock:
                snap = self.monitor.snapshot(reset=True, step=step)
            for path, st in snap.layers.items():
                series = self._series.get(path)
                if series is None:
                    continue  # a layer the monitor did not list at construction
                self._update_layer(series, st)
            self._snapshots += 1
            self._timestamp = float(snap.time) if snap.time is not None else 0.0
            self.last_snapshot = snap
            # Swapping one reference: a concurrent scrape sees the old or the new
            # families, never half of a refresh.
            self._families = self._build_families()
        return snap

    def _update_layer(self, s: _LayerSeries, st: LayerStats) -> None:
        counts = np.asarray(st.usage_counts, dtype=np.int64).reshape(-1)
        if counts.shape[0] != s.num_experts:
            raise ValueError(
                f"snapshot layer has {counts.shape[0]} experts but the exporter was built for "
                f"{s.num_experts}; build a new PrometheusExporter for a changed model"
            )
        s.expert_tokens += counts
        n_tok = int(st.num_tokens)
        s.tokens += n_tok
        s.calls += int(getattr(st, "num_updates", 0) or 0)
        s.nonfinite += int(st.nonfinite_tokens)
        s.window_tokens = n_tok
        if n_tok <= 0:
            return  # an idle window: keep the last routing seen
        s.load_fraction = np.asarray(st.usage_fraction, dtype=np.float64).reshape(-1).copy()
        s.load_quantiles, s.top, s.bottom = load_views(
            s.load_fraction, self.load_quantiles, self.top_experts
        )
        mom = float(st.max_over_mean)
        s.max_over_mean = mom
        s.balancedness = 1.0 / mom if math.isfinite(mom) and mom > 0 else math.nan
        if math.isfinite(s.balancedness):
            s.hist_counts[int(np.searchsorted(self.buckets, s.balancedness, side="left"))] += 1
            s.hist_sum += s.balancedness
        s.routing_entropy = float(st.routing_entropy)
        s.unique_experts = float(st.unique_experts_per_batch)
        s.unique_experts_max = float(st.unique_experts_max)
        sparsity = getattr(st, "neuron_sparsity", None)
        if sparsity is not None:
            s.neuron_sparsity = float(sparsity)

    # ------------------------------------------------------------------ exposition

    def _build_families(self) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        lay, lay_exp = ["layer"], ["layer", "expert"]
        tok = CounterMetricFamily(
            _P + "expert_tokens",
            "Tokens routed to each expert ((token, slot) assignments kept); sum over experts = K x tokens.",
            labels=lay_exp,
        )
        frac = GaugeMetricFamily(
            _P + "expert_load_fraction",
            "Share of the last non-empty window's assignments that went to each expert.",
            labels=lay_exp,
        )
        bal = GaugeMetricFamily(
            _P + "layer_balancedness",
            "Mean / max expert load in the last non-empty window (1 = even, 1/E = one expert).",
            labels=lay,
        )
        mom = GaugeMetricFamily(
            _P + "layer_max_over_mean",
            "Max / mean expert load in the last non-empty window (imbalance ratio).",
            labels=lay,
        )
        hist = HistogramMetricFamily(
            _P + "layer_balancedness_window",
            "Per-window balancedness (mean / max expert load) over all windows with tokens.",
            labels=lay,
        )
        ent = GaugeMetricFamily(
            _P + "layer_routing_entropy",
            "Mean router-distribution entropy per token (nats), last non-empty window.",
            labels=lay,
        )
        uniq = GaugeMetricFamily(
            _P + "layer_unique_experts",
            "Distinct experts touched per forward of the layer, mean over the last non-empty window.",
            labels=lay,
        )
        uniq_max = GaugeMetricFamily(
            _P + "layer_unique_experts_max",
            "Most distinct experts one forward touched in the last non-empty window.",
            labels=lay,
        )
        sparsity = GaugeMetricFamily(
            _P + "layer_neuron_sparsity",
            "1 - mean activated neurons / intermediate size inside the chosen experts.",
            labels=lay,
        )
        win = GaugeMetricFamily(
            _P + "layer_window_tokens",
            "Valid tokens the layer routed in the last window.",
            labels=lay,
        )
        tokens = CounterMetricFamily(_P + "tokens", "Valid tokens the layer routed.", labels=lay)
        calls = CounterMetricFamily(
            _P + "layer_forwards", "Calls (forwards) of the MoE layer.", labels=lay
        )
        nonfinite = CounterMetricFamily(
            _P + "nonfinite_router_rows",
            "Tokens whose router scores were NaN/inf (excluded from the other metrics).",
            labels=lay,
        )
        quant = GaugeMetricFamily(
            _P + "layer_expert_load_quantile",
            "Quantiles over the layer's experts of their load fraction in the last non-empty window.",
            labels=["layer", "quantile"],
        )
        top = GaugeMetricFamily(
            _P + "layer_top_expert_load_fraction",
            "Load fraction of the most loaded experts in the last non-empty window (rank 1 = most).",
            labels=["layer", "rank", "expert"],
        )
        bottom = GaugeMetricFamily(
            _P + "layer_bottom_expert_load_fraction",
            "Load fraction of the least loaded experts in the last non-empty window (rank 1 = least).",
            labels=["layer", "rank", "expert"],
        )
        for path, s in self._series.items():
            if self.per_expert:
                for e in range(s.num_experts):
                    tok.add_metric([path, str(e)], float(s.expert_tokens[e]))
                    frac.add_metric([path, str(e)], float(s.load_fraction[e]))
            for q, v in zip(self.load_quantiles, s.load_quantiles, strict=True):
                quant.add_metric([path, repr(q)], v)
            for rank, (e, v) in enumerate(s.top, 1):
                top.add_metric([path, str(rank), str(e)], v)
            for rank, (e, v) in enumerate(s.bottom, 1):
                bottom.add_metric([path, str(rank), str(e)], v)
            bal.add_metric([path], s.balancedness)
            mom.add_metric([path], s.max_over_mean)
            cum = np.cumsum(s.hist_counts)
            bounds = [repr(b) for b in self.buckets] + ["+Inf"]
            hist.add_metric(
                [path], [(b, float(c)) for b, c in zip(bounds, cum, strict=True)], s.hist_sum
            )
            ent.add_metric([path], s.routing_entropy)
            uniq.add_metric([path], s.unique_experts)
            uniq_max.add_metric([path], s.unique_experts_max)
            if s.neuron_sparsity is not None:
                sparsity.add_metric([path], s.neuron_sparsity)
            win.add_metric([path], float(s.window_tokens))
            tokens.add_metric([path], float(s.tokens))
            calls.add_metric([path], float(s.calls))
            nonfinite.add_metric([path], float(s.nonfinite))
        snaps = CounterMetricFamily(_P + "snapshots", "Refreshes (monitor snapshots) done.")
        snaps.add_metric([], float(self._snapshots))
        errors = CounterMetricFamily(_P + "refresh_errors", "Timer refreshes that raised (logged).")
        errors.add_metric([], float(self._errors))
        ts = GaugeMetricFamily(
            _P + "snapshot_timestamp_seconds",
            "Wall-clock time of the last refresh, seconds since the epoch (0 before the first).",
        )
        ts.add_metric([], self._timestamp)
        per_expert = [tok, frac] if self.per_expert else []
        return [
            *per_expert, quant, top, bottom, bal, mom, hist, ent, uniq, uniq_max, sparsity,
            win, tokens, calls, nonfinite, snaps, errors, ts,
        ]  # fmt: skip


class _Collector:
    """Custom collector: yields the exporter's current, fully built metric families."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._exporter = exporter

    def collect(self) -> list[Any]:
        return list(self._exporter._families)

    def describe(self) -> list[Any]:
        # Names only, so the registry can refuse a colliding collector.
        return list(self._exporter._families)
