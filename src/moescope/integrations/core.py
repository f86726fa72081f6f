"""What every training integration shares: when to snapshot, what to log, where, and alerts.

The three framework adapters (:mod:`~moescope.integrations.transformers`,
:mod:`~moescope.integrations.pytorch`, :mod:`~moescope.integrations.lightning`) only map
their framework's hooks onto :class:`TrainingSession`; all decisions live here once:

- **Two windows, one monitor.** ONE :class:`~moescope.monitor.MoEMonitor` built with
  ``split_by_mode=True`` watches the model, so every MoE layer is hooked once. It counts
  each layer call in its window ``"train"`` or ``"eval"`` from the MoE block's ``training``
  flag (:meth:`TrainingSession.force_window` maps onto ``monitor.set_window`` /
  ``clear_window`` to override), so an evaluation in the middle of training never leaks
  into the training window or the other way round. Every forward counts, so with gradient
  accumulation every micro-batch counts. The monitor's history and its own alert rules
  only ever see train windows (eval snapshots are taken with ``record=False``).
- **Cadence.** The train window ends every ``log_every_n_steps`` optimizer steps
  (:meth:`TrainingSession.is_log_step`); the framework adapters also end it at the last step
  so that the tail of training is not lost. The eval window ends when the framework
  finishes an evaluation. Snapshots are taken on *every* rank at the same points: the
  monitor's snapshot all-reduces counts when ``torch.distributed`` is initialised.
- **Metrics.** ``Snapshot.to_dict()`` flat keys (``moe/avg_expert_cv``,
  ``moe/avg_routing_entropy``, ``moe/total_unused_experts``, ``moe/<layer>/<metric>``;
  ``moe/eval/...`` for evaluation windows), optionally restricted to some per-layer
  metrics. No metric is computed here.
- **Sinks, rank 0 only.** ``resolve_loggers(logger)``, plus a ``ConsoleSink`` when
  ``log_to_console`` and a ``JsonlSink`` at ``<log_dir>/moe_detailed.jsonl`` when
  ``save_detailed_logs`` (train windows: full snapshot + alerts per line). Every
  ``log_heatmap_every`` steps, PNGs go to ``<log_dir>/heatmaps/`` and to the sinks'
  ``log_images``: ``moe/<layer>/usage_heatmap`` (experts x steps, the layer's usage over
  the run so far, from the monitor's bounded history) and ``moe/usage_heatmap`` (layers x
  experts for the current window).
- **Alerts.** :class:`~moescope.alerts.AlertRules` built from the thresholds run on every
  train window (on every rank, so an ``on_alert`` that raises stops all ranks alike); the
  sinks get them first (console lines in the seeds' format), then ``on_alert`` is called
  per alert, and ``stop_on_alert`` sets :attr:`TrainingSession.should_stop`, which the
  framework adapters turn into their own stop signal.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from moescope.alerts import Alert, AlertRules, format_alert
from moescope.monitor import MoEMonitor
from moescope.sinks.base import Sink
from moescope.stats.snapshot import LAYER_SCALAR_METRICS, Snapshot

__all__ = [
    "DETAILED_LOG_NAME",
    "ExtrasOnlySink",
    "TrainingSession",
    "is_rank_zero",
]

_log = logging.getLogger("moescope")

#: File name of the detailed JSONL log inside ``log_dir``.
DETAILED_LOG_NAME = "moe_detailed.jsonl"

AlertCallback = Callable[[Alert], None]


def is_rank_zero() -> bool:
    """True unless ``torch.distributed`` is initialised and this is not global rank 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a positive int (or None/0 to disable), got {value!r}")
    return value


def _safe_file_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer) or "layer"


class TrainingSession:
    """Monitors, cadence, sinks and alerts of one training run (framework independent).

    Args:
        log_every_n_steps: end the train window every this many optimizer steps (>= 1).
        logger: anything :func:`moescope.sinks.resolve_loggers` accepts (wandb module or
            run, ``SummaryWriter``, the mlflow module, an object with
            ``log(dict, step=...)``, a ``Sink``, or a list of them), or None.
        log_to_console: print a per-layer table per train window and the alert lines.
        log_heatmap_every: write one expert-usage heatmap per layer every this many
            steps (at the first train window ending at or after each multiple); None or 0
            disables. Needs matplotlib (extra ``plots``); without it heatmaps are skipped
            with one warning.
        alert_threshold_imbalance: ``max_over_mean`` above this alerts (None disables).
        unused_expert_threshold: a fraction of unused experts at or above this alerts.
        entropy_threshold: routing entropy (nats) below this alerts.
        save_detailed_logs: also write every window as JSON lines to
            ``<log_dir>/moe_detailed.jsonl``.
        log_dir: where heatmaps and detailed logs go; the framework adapters fill a
            default (e.g. ``<output_dir>/moe_logs``) when None.
        alert_rules: a ready :class:`AlertRules` instead of the three thresholds.
        on_alert: called with every :class:`Alert` of a train window, after the sinks;
            it may raise to stop training.
        stop_on_alert: set :attr:`should_stop` when any alert fires.
        track_eval: keep a separate eval window (forwards in eval mode); else eval-mode
            forwards are not logged (they still land in the monitor's ``"eval"`` window,
            which is discarded at every train window, never in the train window).
        per_layer: include ``moe/<layer>/<metric>`` keys (else model-level keys only).
        layer_metrics: which per-layer metrics (names of ``LAYER_SCALAR_METRICS``);
            None = all.
        prefix: first key component (``"moe"``).
        monitor_kwargs: extra keyword arguments for the :class:`MoEMonitor`
            (``adapters``, ``history``, ``coactivation``, ``process_group``, ...);
            ``split_by_mode`` and ``attach`` are the session's.

    Attributes:
        monitor: the one :class:`MoEMonitor` (None before :meth:`attach`); its window
            ``"train"`` holds the train counts, ``"eval"`` the eval counts, and its
            ``history`` the train snapshots only.
        train_monitor, eval_monitor: backward-compatible names; both are :attr:`monitor`
            (``eval_monitor`` is None when ``track_eval=False``). Not two monitors.
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        logger: Any = None,
        log_to_console: bool = True,
        log_heatmap_every: int | None = 500,
        alert_threshold_imbalance: float | None = 4.0,
        unused_expert_threshold: float | None = 0.25,
        entropy_threshold: float | None = 0.1,
        save_detailed_logs: bool = False,
        log_dir: str | Path | None = None,
        alert_rules: AlertRules | None = None,
        on_alert: AlertCallback | None = None,
        stop_on_alert: bool = False,
        track_eval: bool = True,
        per_layer: bool = True,
        layer_metrics: Sequence[str] | None = None,
        prefix: str = "moe",
        monitor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or (
            log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        if layer_metrics is not None:
            unknown = sorted(set(layer_metrics) - set(LAYER_SCALAR_METRICS))
            if unknown:
                raise ValueError(
                    f"unknown layer_metrics {unknown}; choose from {list(LAYER_SCALAR_METRICS)}"
                )
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert must be callable(Alert) or None, got {on_alert!r}")
        self.log_every_n_steps = log_every_n_steps
        self.log_heatmap_every = _positive_or_none("log_heatmap_every", log_heatmap_every)
        self.logger = logger
        self.log_to_console = bool(log_to_console)
        self.save_detailed_logs = bool(save_detailed_logs)
        self.log_dir: Path | None = Path(log_dir) if log_dir is not None else None
        self.alert_rules = alert_rules if alert_rules is not None else AlertRules(
            imbalance_threshold=alert_threshold_imbalance,
            unused_fraction_threshold=unused_expert_threshold,
            entropy_threshold=entropy_threshold,
        )
        if self.alert_rules.on_alert is not None and on_alert is None:
            # A ready AlertRules carrying its own callback: call it after the sinks too.
            on_alert, self.alert_rules.on_alert = self.alert_rules.on_alert, None
        self.on_alert = on_alert
        self.stop_on_alert = bool(stop_on_alert)
        self.track_eval = bool(track_eval)
        self.per_layer = bool(per_layer)
        self.layer_metrics = None if layer_metrics is None else tuple(layer_metrics)
        self.prefix = prefix
        self.monitor_kwargs = dict(monitor_kwargs or {})
        # Resolve now so a bad ``logger=`` fails at construction, not at the first log step.
        from moescope.sinks import resolve_loggers

        self._user_sinks = resolve_loggers(logger)
        # Sink objects the user passed in themselves: flushed at the end, never closed.
        self._user_owned = {id(x) for x in _flatten(logger)}

        self.model: nn.Module | None = None
        self.monitor: MoEMonitor | None = None
        self._forced_mode: str | None = None
        self._sinks: list[Any] | None = None
        self._extra_sinks: list[Any] = []
        self._next_heatmap: int | None = self.log_heatmap_every
        self._plots_missing_warned = False
        self.last_train_step: int | None = None
        self.should_stop = False
        self.last_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}
        self.last_alerts: list[Alert] = []
        self.last_images: dict[str, Path] = {}

    # ------------------------------------------------------------------ attach / detach

    @property
    def train_monitor(self) -> MoEMonitor | None:
        """The monitor (backward-compatible name): its ``"train"`` window and history."""
        return self.monitor

    @property
    def eval_monitor(self) -> MoEMonitor | None:
        """The same monitor (its ``"eval"`` window), or None when ``track_eval=False``."""
        return self.monitor if self.track_eval else None

    @property
    def attached(self) -> bool:
        return self.monitor is not None and self.monitor.attached

    def attach(self, model: nn.Module) -> None:
        """Build the monitor on ``model`` and install its hooks (idempotent for the same
        model). The session adds no hook of its own."""
        if self.model is not None and self.model is not model:
            raise RuntimeError(
                "this MoE callback is already attached to another model; create one "
                "callback per model/training run"
            )
        if self.attached:
            return
        if self.monitor is None:
            kw = {"history": 1000, **self.monitor_kwargs}
            kw["split_by_mode"] = True  # the train/eval switch; the session needs it
            kw.pop("attach", None)
            self.monitor = MoEMonitor(model, attach=False, **kw)
        self.model = model
        self._apply_window()
        try:
            self.monitor.attach()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook (idempotent); accumulated windows and history are kept."""
        if self.monitor is not None:
            self.monitor.detach()

    def _apply_window(self) -> None:
        mon = self.monitor
        if mon is None:
            return
        mode = self._forced_mode
        # set_window / clear_window flush staged calls: skip when nothing changes (the
        # Lightning adapter forces "train" at every batch).
        if mon.forced_window == mode:
            return
        if mode is None:
            mon.clear_window()
        else:
            mon.set_window(mode)

    def force_window(self, mode: str | None) -> None:
        """Count every forward in the ``"train"`` or ``"eval"`` window whatever
        ``model.training`` says; None goes back to following each MoE block's
        ``training`` flag (``monitor.set_window`` / ``monitor.clear_window``)."""
        if mode not in (None, "train", "eval"):
            raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
        if mode == "eval" and not self.track_eval:
            raise RuntimeError("no eval window: the callback was created with track_eval=False")
        self._forced_mode = mode
        self._apply_window()

    def exclude_from_train(self) -> None:
        """Count the following forwards in the ``"eval"`` window even when
        ``track_eval=False`` (then it is never logged, only discarded): for a framework
        loop known to be evaluating while its modules may be in train mode. Undo with
        ``force_window(None)`` / ``force_window("train")``."""
        self._forced_mode = "eval"
        self._apply_window()

    # ------------------------------------------------------------------ cadence

    def is_log_step(self, step: int) -> bool:
        """Whether the train window ends at optimizer step ``step`` (1-based count)."""
        return step > 0 and step % self.log_every_n_steps == 0 and step != self.last_train_step

    def has_unlogged_steps(self, step: int) -> bool:
        """Whether steps after the last train window are waiting (for a final window)."""
        last = self.last_train_step if self.last_train_step is not None else 0
        return step > last

    # ------------------------------------------------------------------ metrics

    def metrics_from(self, snap: Snapshot, prefix: str) -> dict[str, float]:
        """Flat ``{key: float}`` of ``snap`` under ``prefix``, filtered by the options."""
        flat = snap.to_dict(prefix=prefix)
        if self.per_layer and self.layer_metrics is None:
            return flat
        keep_layer = set(self.layer_metrics) if self.layer_metrics is not None else set()
        head = f"{prefix}/" if prefix else ""
        out: dict[str, float] = {}
        for key, value in flat.items():
            rest = key[len(head):]
            if "/" not in rest:
                out[key] = value  # model-level aggregate
            elif self.per_layer and rest.rsplit("/", 1)[1] in keep_layer:
                out[key] = value
        return out

    def end_train_window(self, step: int, rank_zero: bool | None = None) -> dict[str, float]:
        """Snapshot the train window ending at ``step`` (on every rank), log it on rank 0,
        check the alerts. Returns the flat metrics (also on other ranks)."""
        mon = self._require_monitor()
        snap = mon.snapshot(reset=True, step=step, window="train")
        if not self.track_eval and "eval" in mon.windows:
            mon.reset(window="eval")  # eval-mode forwards are not tracked: drop them
        self.last_train_step = step
        metrics = self.metrics_from(snap, self.prefix)
        self.last_metrics = metrics
        alerts = self.alert_rules.check(snap)
        self.last_alerts = alerts
        rank_zero = is_rank_zero() if rank_zero is None else rank_zero
        images: dict[str, Path] = {}
        if rank_zero:
            images = self._maybe_heatmaps(snap, step)
            self.last_images = images
            for sink in self._get_sinks():
                sink.log_metrics(metrics, step)
                # Alerts before the snapshot: the JSONL sink then embeds them in its line.
                if alerts:
                    sink.log_alerts(alerts, step)
                sink.log_snapshot(snap, step)
                if images:
                    sink.log_images(images, step)
                sink.flush()
            if alerts and not self.log_to_console:
                for a in alerts:
                    _log.warning(format_alert(a))
        if alerts and self.stop_on_alert:
            self.should_stop = True
        if self.on_alert is not None:
            try:
                for a in alerts:
                    self.on_alert(a)
            except BaseException:
                # on_alert raised to stop training: the framework will not reach its
                # end-of-training hook, so leave no hook on the model.
                self.close()
                raise
        return metrics

    def end_eval_window(
        self, step: int, name: str = "eval", rank_zero: bool | None = None
    ) -> dict[str, float]:
        """Snapshot the eval window (on every rank) as ``moe/<name>/...`` keys and log the
        scalars on rank 0. Returns {} when eval tracking is off."""
        if self.monitor is None or not self.track_eval:
            return {}
        snap = self.monitor.snapshot(reset=True, step=step, window="eval", record=False)
        metrics = self.metrics_from(snap, f"{self.prefix}/{name}" if self.prefix else name)
        self.last_eval_metrics = metrics
        rank_zero = is_rank_zero() if rank_zero is None else rank_zero
        if rank_zero:
            for sink in self._get_sinks():
                sink.log_metrics(metrics, step)
                sink.flush()
        return metrics

    def discard_eval_window(self) -> None:
        """Drop what the eval window counted (e.g. a sanity-check validation)."""
        if self.monitor is not None and "eval" in self.monitor.windows:
            self.monitor.reset(window="eval")

    def _require_monitor(self) -> MoEMonitor:
        if self.monitor is None:
            raise RuntimeError(
                "the MoE callback is not attached to a model yet: call attach(model) first "
                "(the framework callbacks do it at train/fit start)"
            )
        return self.monitor

    # ------------------------------------------------------------------ sinks

    def _get_sinks(self) -> list[Any]:
        # Built lazily, on rank 0 only: other ranks never open files.
        if self._sinks is None:
            from moescope.sinks import ConsoleSink, JsonlSink

            sinks: list[Any] = [*self._user_sinks, *self._extra_sinks]
            if self.log_to_console:
                sinks.append(ConsoleSink())
            if self.save_detailed_logs:
                path = self._dir() / DETAILED_LOG_NAME
                path.parent.mkdir(parents=True, exist_ok=True)
                sinks.append(JsonlSink(path))
            self._sinks = sinks
        return self._sinks

    def add_sinks(self, sinks: Sequence[Any]) -> None:
        """More destinations found by a framework adapter (closed by :meth:`close`)."""
        self._extra_sinks.extend(sinks)
        if self._sinks is not None:
            self._sinks.extend(sinks)

    def _dir(self) -> Path:
        return self.log_dir if self.log_dir is not None else Path("moe_logs")

    @property
    def detailed_log_path(self) -> Path:
        """``<log_dir>/moe_detailed.jsonl``."""
        return self._dir() / DETAILED_LOG_NAME

    def _maybe_heatmaps(self, snap: Snapshot, step: int) -> dict[str, Path]:
        if self._next_heatmap is None or step < self._next_heatmap:
            return {}
        every = self.log_heatmap_every
        assert every is not None
        self._next_heatmap = (step // every + 1) * every
        mon = self.monitor
        try:
            from moescope.report.plots import save_png, usage_heatmap, usage_over_time
        except ImportError as err:
            if not self._plots_missing_warned:
                _log.warning(
                    "moescope: usage heatmaps skipped (%s); install the 'plots' extra: "
                    "pip install 'moescope[plots]'", err,
                )
                self._plots_missing_warned = True
            return {}
        out_dir = self._dir() / "heatmaps"
        head = f"{self.prefix}/" if self.prefix else ""
        images: dict[str, Path] = {}
        # The figures live on their own Agg canvas (no pyplot registry): dropping the
        # reference frees them.
        images[f"{head}usage_heatmap"] = save_png(
            usage_heatmap(snap), out_dir / f"all_layers_step{step}.png"
        )
        if mon is not None and mon.history is not None:
            for layer in mon.history.layers:
                fig = usage_over_time(mon.history, layer, kind="heatmap")
                path = out_dir / f"{_safe_file_name(layer)}_step{step}.png"
                images[f"{head}{layer}/usage_heatmap"] = save_png(fig, path)
        return images

    def close(self) -> None:
        """Detach and flush/close the sinks this session opened (idempotent)."""
        self._forced_mode = None
        self._apply_window()
        self.detach()
        sinks, self._sinks = self._sinks, None
        self._extra_sinks = []
        for sink in sinks or []:
            sink.flush()
            # Sinks resolved from the user's objects (SummaryWriter, wandb) close only what
            # they opened themselves; a Sink the user passed in is the user's to close.
            if id(sink) not in self._user_owned:
                sink.close()


class ExtrasOnlySink(Sink):
    """Forwards images and alerts only, for a destination that already receives the
    scalars another way (e.g. through transformers' ``report_to`` callbacks)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_snapshot(self, snapshot: Snapshot, step: int) -> None:
        pass

    def log_alerts(self, alerts: list[Alert], step: int) -> None:
        self.inner.log_alerts(alerts, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        self.inner.log_images(images, step)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"ExtrasOnlySink({self.inner!r})"


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flatten(x)]
    return [] if obj is None else [obj]


def finite_only(metrics: dict[str, float]) -> dict[str, float]:
    """The entries whose value is a finite float (for destinations that reject NaN)."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
