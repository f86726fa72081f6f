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
  ``moe/eval/...`` for evaluation windows) within the key budget (:meth:`metrics_from`:
  model-level keys and percentiles across layers always; every layer's keys up to
  ``per_layer_limit`` MoE layers, the ``worst_layers`` above it), optionally restricted
  to some per-layer metrics. No metric is computed here.
- **Routing trace.** With ``routing_trace_tokens=N`` a
  :class:`~moescope.stats.trace_recorder.TraceRecorder` on the same monitor keeps the
  first N tokens' routing and writes ``<log_dir>/routing_trace.npz`` once full (and at
  :meth:`close`), for ``moescope agree``.
- **Sinks, rank 0 only.** ``resolve_loggers(logger)``, plus a ``ConsoleSink`` when
  ``log_to_console``, a ``JsonlSink`` at ``<log_dir>/moe_detailed.jsonl`` when
  ``save_detailed_logs`` (train windows: snapshot + alerts per line, bounded size) and a
  ``FigureDirSink`` writing PNGs to ``<log_dir>/heatmaps/`` when heatmaps are on. Each
  window becomes ONE :class:`~moescope.sinks.event.LogEvent` (step, snapshot, metrics,
  alerts, figures) and every sink gets ``write(event)`` then ``flush()``
  (:meth:`TrainingSession._publish`). Every ``log_heatmap_every`` steps, if some sink
  ``wants_figures``, the event carries matplotlib figures built once:
  ``moe/<layer>/usage_heatmap`` (experts x steps, the layer's usage over the run so far,
  from the monitor's bounded history) and ``moe/usage_heatmap`` (layers x experts for the
  current window); the event owns them and they are dropped with it.
- **Alerts.** :class:`~moescope.alerts.AlertRules` built from the thresholds run on every
  train window (on every rank, so an ``on_alert`` that raises stops all ranks alike); an
  :class:`~moescope.alerts.AlertTracker` groups repeats across windows (the event's
  ``alert_update``: new / still firing / resolved; the console prints a firing alert once,
  in the seeds' format, with its threshold and a remediation). The sinks get them first,
  then ``on_alert`` is called per alert (repeats included), and ``stop_on_alert`` sets
  :attr:`TrainingSession.should_stop`, which the framework adapters turn into their own
  stop signal.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from torch import nn

from moescope._optional import MissingExtraError
from moescope.alerts import Alert, AlertRules, AlertTracker, format_update
from moescope.integrations.options import MoECallbackOptions, options_from
from moescope.monitor import MoEMonitor
from moescope.plots import usage_heatmap, usage_over_time
from moescope.sinks import ConsoleSink, JsonlSink, resolve_loggers
from moescope.sinks.base import Sink
from moescope.sinks.event import LogEvent
from moescope.sinks.figures import FigureDirSink
from moescope.stats.snapshot import Snapshot

__all__ = [
    "DETAILED_LOG_NAME",
    "ExtrasOnlySink",
    "SessionFrontEnd",
    "TrainingSession",
    "is_rank_zero",
]

_log = logging.getLogger("moescope")

#: File name of the detailed JSONL log inside ``log_dir``.
DETAILED_LOG_NAME = "moe_detailed.jsonl"
#: File name of the training-side routing trace inside ``log_dir``.
ROUTING_TRACE_NAME = "routing_trace.npz"
_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(MoECallbackOptions))


def is_rank_zero() -> bool:
    """True unless ``torch.distributed`` is initialised and this is not global rank 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


class TrainingSession:
    """Monitors, cadence, sinks and alerts of one training run (framework independent).

    Args:
        options: a :class:`~moescope.integrations.options.MoECallbackOptions` (every
            setting is documented there once); None = its defaults.
        **overrides: fields of ``MoECallbackOptions`` applied on top of ``options``
            (``TrainingSession(log_every_n_steps=10)`` is
            ``TrainingSession(MoECallbackOptions(log_every_n_steps=10))``).

    Raises:
        TypeError / ValueError: a bad option (at construction), or a ``logger`` that
            :func:`moescope.sinks.resolve_loggers` does not accept.

    Attributes:
        options: the frozen options this session was built from.
        monitor: the one :class:`MoEMonitor` (None before :meth:`attach`); its window
            ``"train"`` holds the train counts, ``"eval"`` the eval counts, and its
            ``history`` the train snapshots only.
        log_dir: ``options.log_dir`` as a Path; the one setting a framework adapter may
            fill in at train start.
        alert_rules, on_alert: the rules in force and the user's callback (a ready
            ``AlertRules``' own ``on_alert`` is moved here, after the sinks).

    Every other option is read from :attr:`options` (``session.log_every_n_steps`` is
    ``session.options.log_every_n_steps``): the options are written once, in
    :class:`MoECallbackOptions`, and never copied field by field.
    """

    def __init__(self, options: MoECallbackOptions | None = None, **overrides: Any) -> None:
        opts = options_from(options, overrides)
        self.options = opts
        self.log_dir: Path | None = Path(opts.log_dir) if opts.log_dir is not None else None
        on_alert = opts.on_alert
        if opts.alert_rules is not None:
            # A copy: the session moves a ready AlertRules' own callback after the sinks,
            # and the (frozen, reusable) options must keep theirs.
            self.alert_rules = copy.copy(opts.alert_rules)
            if self.alert_rules.on_alert is not None and on_alert is None:
                on_alert, self.alert_rules.on_alert = self.alert_rules.on_alert, None
        else:
            self.alert_rules = AlertRules(
                imbalance_threshold=opts.alert_threshold_imbalance,
                unused_fraction_threshold=opts.unused_expert_threshold,
                entropy_threshold=opts.entropy_threshold,
            )
        self.on_alert = on_alert
        logger = opts.logger
        # Resolve now so a bad ``logger=`` fails at construction, not at the first log step.
        self._user_sinks = resolve_loggers(logger)
        # Sink objects the user passed in themselves: flushed at the end, never closed.
        self._user_owned = {id(x) for x in _flatten(logger)}

        self.model: nn.Module | None = None
        self.monitor: MoEMonitor | None = None
        self._forced_mode: str | None = None
        self._sinks: list[Any] | None = None
        self._extra_sinks: list[Any] = []
        self._next_heatmap: int | None = opts.log_heatmap_every
        self._plots_missing_warned = False
        self.last_train_step: int | None = None
        self.should_stop = False
        self.last_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}
        self.last_alerts: list[Alert] = []
        self.last_images: dict[str, Path] = {}
        self._trace: Any = None  # a TraceRecorder while routing_trace_tokens > 0
        self._trace_done = False

    # ------------------------------------------------------------------ attach / detach

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set on the instance: the options' fields, read-only.
        opts = self.__dict__.get("options")
        if opts is not None and name in _OPTION_FIELDS:
            return getattr(opts, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
            if self.routing_trace_tokens and not self._trace_done:
                if self._trace is None:
                    from moescope.stats.trace_recorder import TraceRecorder

                    self._trace = TraceRecorder(self.monitor, max_tokens=self.routing_trace_tokens)
                self._trace.attach()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook (idempotent); accumulated windows and history are kept."""
        if self._trace is not None:
            self._trace.detach()
        if self.monitor is not None:
            self.monitor.detach()

    @property
    def routing_trace_path(self) -> Path:
        """``<log_dir>/routing_trace.npz``."""
        return self._dir() / ROUTING_TRACE_NAME

    def _save_trace(self, final: bool) -> None:
        # Written as soon as it is full (a crash later loses nothing), else at the end.
        rec = self._trace
        if rec is None or not (final or rec.full):
            return
        self._trace, self._trace_done = None, True
        rec.detach()
        if not is_rank_zero() or rec.num_tokens == 0:
            return
        try:
            path = self.routing_trace_path
            path.parent.mkdir(parents=True, exist_ok=True)
            rec.save(path)
        except Exception as e:  # monitoring never stops the run
            _log.warning("moescope: could not write the routing trace: %s", e)

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
        """Whether the train window ends at optimizer step ``step`` (1-based count);
        always False with ``log_every_n_steps=None`` (the framework decides)."""
        every = self.log_every_n_steps
        if every is None:
            return False
        return step > 0 and step % every == 0 and step != self.last_train_step

    def has_unlogged_steps(self, step: int) -> bool:
        """Whether steps after the last train window are waiting (for a final window)."""
        last = self.last_train_step if self.last_train_step is not None else 0
        return step > last

    # ------------------------------------------------------------------ metrics

    def metrics_from(self, snap: Snapshot, prefix: str) -> dict[str, float]:
        """Flat ``{key: float}`` of ``snap`` under ``prefix`` within the key budget: the
        model-level keys always, per-layer keys as ``per_layer`` / ``per_layer_limit`` /
        ``worst_layers`` and ``layer_metrics`` say (see ``MoECallbackOptions``)."""
        opts = self.options
        if opts.per_layer == "auto" and len(snap.layers) > opts.per_layer_limit:
            layers: list[str] | None = snap.worst_layers(opts.worst_layers)
        elif opts.per_layer:
            layers = None
        else:
            layers = []
        flat = snap.to_dict(prefix=prefix, layers=layers)
        if self.layer_metrics is None:
            return flat
        keep_layer = set(self.layer_metrics)
        head = f"{prefix}/" if prefix else ""
        out: dict[str, float] = {}
        for key, value in flat.items():
            rest = key[len(head) :]
            if "/" not in rest or rest.rsplit("/", 1)[1] in keep_layer:
                out[key] = value  # a model-level key, or a chosen per-layer metric
        return out

    def end_train_window(self, step: int, rank_zero: bool | None = None) -> dict[str, float]:
        """Snapshot the train window ending at ``step`` (on every rank), log it on rank 0,
        check the alerts. Returns the flat metrics (also on other ranks)."""
        mon = self._require_monitor()
        snap = mon.snapshot(reset=True, step=step, window="train")
        if not self.track_eval and "eval" in mon.windows:
            mon.reset(window="eval")  # eval-mode forwards are not tracked: drop them
        self.last_train_step = step
        self._save_trace(final=False)
        metrics = self.metrics_from(snap, self.prefix)
        self.last_metrics = metrics
        alerts = self.alert_rules.check(snap)
        self.last_alerts = alerts
        tracker = self._tracker()
        update = tracker.update(alerts, step)
        rank_zero = is_rank_zero() if rank_zero is None else rank_zero
        if rank_zero:
            sinks = self._get_sinks()
            event = LogEvent(
                step=step,
                snapshot=snap,
                metrics=metrics,
                alerts=tuple(alerts),
                alert_update=update,
                figures=self._maybe_heatmaps(snap, step, sinks),
            )
            self._publish(sinks, event)
            self.last_images = (
                dict(self._figure_dir.last_paths)
                if (self._figure_dir is not None and event.figures)
                else {}
            )
            del event  # the figures go with it (Agg canvases, no pyplot registry)
            if not self.log_to_console:
                # Grouped like the console: new alerts in full, then "still firing".
                for line in format_update(update, tracker.hinted):
                    _log.warning(line)
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
            self._publish(
                self._get_sinks(), LogEvent(step=step, snapshot=snap, metrics=metrics, mode="eval")
            )
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

    # Per-session alert grouping and the PNG folder sink, created on first use (class
    # defaults keep them out of __init__).
    _alert_tracker: AlertTracker | None = None
    _figure_dir: FigureDirSink | None = None

    def _tracker(self) -> AlertTracker:
        if self._alert_tracker is None:
            self._alert_tracker = AlertTracker()
        return self._alert_tracker

    @staticmethod
    def _publish(sinks: Sequence[Sink], event: LogEvent) -> None:
        """The one place events reach the sinks: ``write`` then ``flush``, in order."""
        for sink in sinks:
            sink.write(event)
            sink.flush()

    def _get_sinks(self) -> list[Any]:
        # Built lazily, on rank 0 only: other ranks never open files.
        if self._sinks is None:
            sinks: list[Any] = [*self._user_sinks, *self._extra_sinks]
            if self.log_to_console:
                sinks.append(ConsoleSink())
            if self.save_detailed_logs:
                path = self._dir() / DETAILED_LOG_NAME
                path.parent.mkdir(parents=True, exist_ok=True)
                sinks.append(JsonlSink(path))
            if self.log_heatmap_every is not None:
                self._figure_dir = FigureDirSink(self._dir() / "heatmaps")
                sinks.append(self._figure_dir)
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

    def _maybe_heatmaps(self, snap: Snapshot, step: int, sinks: Sequence[Sink]) -> dict[str, Any]:
        """The event's figures when the heatmap cadence is due and a sink wants them:
        ``<prefix>/usage_heatmap`` (layers x experts of this window) and
        ``<prefix>/<layer>/usage_heatmap`` (experts x steps from the monitor's history)."""
        if self._next_heatmap is None or step < self._next_heatmap:
            return {}
        every = self.log_heatmap_every
        assert every is not None
        self._next_heatmap = (step // every + 1) * every
        if not any(getattr(s, "wants_figures", False) for s in sinks):
            return {}
        head = f"{self.prefix}/" if self.prefix else ""
        try:
            # matplotlib is required when the first figure is made, not at import.
            figures: dict[str, Any] = {f"{head}usage_heatmap": usage_heatmap(snap)}
            mon = self.monitor
            if mon is not None and mon.history is not None:
                for layer in mon.history.layers:
                    figures[f"{head}{layer}/usage_heatmap"] = usage_over_time(
                        mon.history, layer, kind="heatmap"
                    )
        except MissingExtraError as err:
            if not self._plots_missing_warned:
                _log.warning(
                    "moescope: usage heatmaps skipped (%s); install the 'plots' extra: "
                    "pip install 'moescope[plots]'",
                    err,
                )
                self._plots_missing_warned = True
            return {}
        return figures

    def close(self) -> None:
        """Detach and flush/close the sinks this session opened (idempotent)."""
        self._forced_mode = None
        self._apply_window()
        self._save_trace(final=True)
        self.detach()
        sinks, self._sinks = self._sinks, None
        self._extra_sinks = []
        for sink in sinks or []:
            sink.flush()
            # Sinks resolved from the user's objects (SummaryWriter, wandb) close only what
            # they opened themselves; a Sink the user passed in is the user's to close.
            if id(sink) not in self._user_owned:
                sink.close()


class SessionFrontEnd:
    """What a framework front end that owns a :class:`TrainingSession` (``session``)
    shows of it, written once: the one monitor, the stop flag, the last metrics, and
    ``with front_end:`` ending in :meth:`close` (the plain-loop callback's is
    ``cleanup``; the training engines' ``close``)."""

    session: TrainingSession

    @property
    def monitor(self) -> Any:
        """The session's one :class:`~moescope.monitor.MoEMonitor` (window ``"train"``
        and ``.history`` of the train windows; window ``"eval"``)."""
        return self.session.monitor

    @property
    def should_stop(self) -> bool:
        """True once an alert fired with ``stop_on_alert=True``: break out of the loop."""
        return self.session.should_stop

    @property
    def last_metrics(self) -> dict[str, float]:
        """Flat metrics of the last train window logged."""
        return self.session.last_metrics

    @property
    def last_eval_metrics(self) -> dict[str, float]:
        """Flat metrics of the last eval window logged."""
        return self.session.last_eval_metrics

    def close(self) -> None:
        """Log what is waiting, remove every hook, close the sinks (each front end's own)."""
        raise NotImplementedError(f"{type(self).__name__} must define close()")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExtrasOnlySink(Sink):
    """Forwards figures and alerts only (no metrics, no snapshot), for a destination that
    already receives the scalars another way (e.g. through transformers' ``report_to``
    callbacks)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def wants_figures(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "wants_figures", False))

    def write(self, event: LogEvent) -> None:
        self.inner.write(event.without("snapshot", "metrics"))

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
