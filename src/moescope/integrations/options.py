"""One frozen options object shared by every training integration.

:class:`MoECallbackOptions` holds the settings the seeds' callbacks take (cadence,
destinations, heatmaps, alert thresholds, detailed logs, ...), validated once in
``__post_init__``. :class:`~moescope.integrations.core.TrainingSession`,
:class:`~moescope.integrations.transformers.MoETrainerCallback`,
:class:`~moescope.integrations.lightning.MoELightningCallback` and the two seed factories
(``create_moe_callback_for_transformers``, ``create_moe_callback_for_pytorch``) all read
it; their docstrings refer here instead of repeating the list.

::

    opts = MoECallbackOptions(log_every_n_steps=20, logger=wandb, entropy_threshold=0.2)
    cb = MoELightningCallback(opts)                  # or MoELightningCallback(log_every_n_steps=20, ...)
    quiet = opts.replace(log_to_console=False)       # frozen: derive, never mutate
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from moescope.alerts import Alert, AlertRules
from moescope.stats.snapshot import LAYER_SCALAR_METRICS

__all__ = ["DEFAULTS", "AlertCallback", "MoECallbackOptions", "factory_options", "options_from"]

AlertCallback = Callable[[Alert], None]

# MoEMonitor arguments the session sets itself (one monitor, windows split by mode).
_SESSION_OWNED_MONITOR_KWARGS = ("model", "attach", "split_by_mode")


@dataclass(frozen=True)
class MoECallbackOptions:
    """Settings of one monitored training run (shared by every training integration).

    Attributes:
        log_every_n_steps: end the train window every this many optimizer steps (an
            int >= 1). None means "follow the framework's own logging cadence", which
            only the transformers integration supports here (the Trainer's
            ``logging_steps``; the last step always ends a window). The training-engine
            front ends read their engine's cadence themselves and pass an int: Megatron's
            ``log_interval``, torchtitan's ``metrics.log_freq``, DeepSpeed's
            ``steps_per_print``.
        logger: extra destinations, anything :func:`moescope.sinks.resolve_loggers`
            accepts: the ``wandb`` module or a run, a TensorBoard ``SummaryWriter``, the
            ``mlflow`` module, an object with ``log(dict, step=...)``, a ``Sink``, or a
            list of them; None = none (the frameworks' own loggers may still get the
            metrics: see each integration). Resolved when the session is built, so a
            bad value fails there.
        log_to_console: print a per-layer table per train window and the alert lines
            in the seeds' format.
        log_heatmap_every: write the expert-usage heatmaps (one per layer, experts x
            steps, plus layers x experts for the window) every this many steps, at the
            first train window ending at or after each multiple; PNGs go to
            ``<log_dir>/heatmaps`` and the figures to the sinks (``LogEvent.figures``). None or 0
            disables. Needs matplotlib (extra ``plots``); without it heatmaps are
            skipped with one warning.
        alert_threshold_imbalance: alert when a layer's ``max_over_mean`` (busiest
            expert / mean) exceeds this; None disables.
        unused_expert_threshold: alert when this fraction of a layer's experts or more
            got no token in the window; None disables.
        entropy_threshold: alert when a layer's routing entropy (nats) falls below
            this; None disables.
        save_detailed_logs: also write every train window (full snapshot + alerts) as
            one strict-JSON line to ``<log_dir>/moe_detailed.jsonl``.
        routing_trace_tokens: record which experts (top-k ids and combine weights, every
            layer) the first N tokens of training were routed to, with their token ids,
            into ``<log_dir>/routing_trace.npz``: a training-side trace for
            ``moescope agree`` (docs/agree.md), e.g. against the serving engine's trace
            of the same rollouts. Written once N tokens are in (then recording stops)
            and at the end of training; on rank 0 with rank 0's tokens. 0: off.
        log_dir: where heatmaps and detailed logs go (created on first write). None:
            the integration's default (transformers: ``<output_dir>/moe_logs``;
            Lightning: ``<trainer.log_dir or default_root_dir>/moe_logs``; plain loops:
            ``moe_logs``).
        alert_rules: a ready :class:`~moescope.alerts.AlertRules` used instead of the
            three thresholds (its own ``on_alert``, if any, is called after the sinks
            like ``on_alert`` below).
        on_alert: called with every :class:`~moescope.alerts.Alert` of a train window,
            after the sinks got it; it may raise to stop training (the hooks are
            removed before the exception leaves).
        stop_on_alert: ask the framework to stop training when any alert fires
            (``control.should_training_stop``, ``trainer.should_stop``, or
            ``callback.should_stop`` in a plain loop).
        track_eval: keep a separate eval window (forwards in eval mode / inside the
            framework's evaluation), logged as ``<prefix>/eval/...``. False: eval
            forwards are discarded, never counted in the train window.
        per_layer: which ``<prefix>/<layer>/<metric>`` keys go to the loggers (the
            JSONL log always keeps every layer). ``"auto"`` (default): every layer's keys
            while the model has at most ``per_layer_limit`` MoE layers; above it, only the
            ``worst_layers`` layers with the highest ``max_over_mean`` in the window (a
            logger at DeepSeek-V3 scale gets ~100 keys per step instead of ~1,100). True:
            every layer's keys always. False: model-level keys only. The model-level keys
            (averages, totals, percentiles across layers) are always sent.
        per_layer_limit: the MoE-layer count up to which ``per_layer="auto"`` sends every
            layer's keys (an int >= 0).
        worst_layers: how many worst layers ``per_layer="auto"`` sends above the limit
            (an int >= 0).
        layer_metrics: which per-layer metrics (names from
            :data:`~moescope.stats.snapshot.LAYER_SCALAR_METRICS`); None = all. Stored
            as a tuple.
        prefix: first component of every key (``"moe"``).
        monitor_kwargs: extra keyword arguments for the one
            :class:`~moescope.monitor.MoEMonitor` (``adapters``, ``history``,
            ``coactivation``, ``process_group``, ``neurons``, ...); ``model``,
            ``attach`` and ``split_by_mode`` are the session's. Stored read-only.

    Raises:
        ValueError / TypeError: at construction, for a bad value (the message names the
            field and what to pass).
    """

    log_every_n_steps: int | None = 50
    logger: Any = None
    log_to_console: bool = True
    log_heatmap_every: int | None = 500
    alert_threshold_imbalance: float | None = 4.0
    unused_expert_threshold: float | None = 0.25
    entropy_threshold: float | None = 0.1
    save_detailed_logs: bool = False
    routing_trace_tokens: int = 0
    log_dir: str | Path | None = None
    alert_rules: AlertRules | None = None
    on_alert: AlertCallback | None = None
    stop_on_alert: bool = False
    track_eval: bool = True
    per_layer: bool | Literal["auto"] = "auto"
    per_layer_limit: int = 16
    worst_layers: int = 4
    layer_metrics: Sequence[str] | None = None
    prefix: str = "moe"
    monitor_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = self.log_every_n_steps
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise ValueError(
                f"log_every_n_steps must be an int >= 1 (or None to follow the Trainer's "
                f"logging_steps), got {steps!r}"
            )
        every = self.log_heatmap_every
        if every is not None and (not _is_int(every) or every < 0):
            raise ValueError(
                f"log_heatmap_every must be a positive int (or None/0 to disable), got {every!r}"
            )
        # 0 and None both mean "no heatmaps": keep one spelling.
        _set(self, "log_heatmap_every", every or None)
        for name in ("alert_threshold_imbalance", "unused_expert_threshold", "entropy_threshold"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise ValueError(f"{name} must be a finite number or None (disabled), got {v!r}")
            if v is not None:
                _set(self, name, float(v))
        if self.alert_rules is not None and not isinstance(self.alert_rules, AlertRules):
            raise TypeError(
                "alert_rules must be a moescope.alerts.AlertRules (or None to use the three "
                f"thresholds), got {type(self.alert_rules).__name__}"
            )
        if self.on_alert is not None and not callable(self.on_alert):
            raise TypeError(f"on_alert must be callable(Alert) or None, got {self.on_alert!r}")
        if self.layer_metrics is not None:
            if isinstance(self.layer_metrics, str):
                raise TypeError(
                    f"layer_metrics must be a list of metric names, got the string "
                    f"{self.layer_metrics!r}; pass [{self.layer_metrics!r}]"
                )
            names = tuple(self.layer_metrics)
            unknown = sorted(set(names) - set(LAYER_SCALAR_METRICS))
            if unknown:
                raise ValueError(
                    f"unknown layer_metrics {unknown}; choose from {list(LAYER_SCALAR_METRICS)}"
                )
            _set(self, "layer_metrics", names)
        if not isinstance(self.prefix, str):
            raise TypeError(f"prefix must be a str (e.g. 'moe' or ''), got {self.prefix!r}")
        if self.log_dir is not None and not isinstance(self.log_dir, (str, Path)):
            raise TypeError(f"log_dir must be a path (str or Path) or None, got {self.log_dir!r}")
        kw = {} if self.monitor_kwargs is None else self.monitor_kwargs
        if not isinstance(kw, Mapping):
            raise TypeError(
                f"monitor_kwargs must be a dict of MoEMonitor arguments, got {type(kw).__name__}"
            )
        owned = [k for k in _SESSION_OWNED_MONITOR_KWARGS if k in kw]
        if owned:
            raise ValueError(
                f"monitor_kwargs may not set {owned}: the training session builds the monitor "
                "on the framework's model, attaches it and splits train/eval windows itself"
            )
        # A private copy behind a read-only view: the options stay what they were built as.
        _set(self, "monitor_kwargs", MappingProxyType(dict(kw)))
        for name in ("log_to_console", "save_detailed_logs", "stop_on_alert", "track_eval"):
            _set(self, name, bool(getattr(self, name)))
        if self.per_layer != "auto":
            if not isinstance(self.per_layer, (bool, int)) or isinstance(self.per_layer, str):
                raise ValueError(f"per_layer must be 'auto', True or False, got {self.per_layer!r}")
            _set(self, "per_layer", bool(self.per_layer))
        for name in ("per_layer_limit", "worst_layers", "routing_trace_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")

    def replace(self, **changes: Any) -> MoECallbackOptions:
        """A copy with ``changes`` applied (validated again); unknown names raise
        ``TypeError`` listing the valid ones."""
        return options_from(self, changes)


def options_from(
    options: MoECallbackOptions | None, overrides: Mapping[str, Any]
) -> MoECallbackOptions:
    """``options`` (or the defaults) with ``overrides`` applied: the one place that maps
    keyword arguments onto :class:`MoECallbackOptions`.

    Raises:
        TypeError: ``options`` is not a ``MoECallbackOptions``, or an override is not one
            of its fields.
    """
    if options is not None and not isinstance(options, MoECallbackOptions):
        raise TypeError(
            "options must be a moescope.integrations.MoECallbackOptions (or None), got "
            f"{type(options).__name__}; pass settings by keyword, e.g. log_every_n_steps=50"
        )
    names = {f.name for f in dataclasses.fields(MoECallbackOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}; MoECallbackOptions fields are {sorted(names)}"
        )
    if options is None:
        return MoECallbackOptions(**overrides)
    if not overrides:
        return options
    return dataclasses.replace(options, **overrides)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _set(obj: MoECallbackOptions, name: str, value: Any) -> None:
    # Normalising a field of a frozen dataclass inside __post_init__.
    object.__setattr__(obj, name, value)


def factory_options(arguments: Mapping[str, Any]) -> MoECallbackOptions:
    """The options of a seed factory call: the one mapping from
    ``create_moe_callback_for_transformers`` / ``create_moe_callback_for_pytorch``
    arguments to :class:`MoECallbackOptions`.

    Every argument named like a field becomes that field; the others (``model``,
    ``report_to_trainer``) are the factory's own. ``tests/test_options.py`` checks that
    every factory argument is one or the other, so none is dropped silently.

    Args:
        arguments: the factory's bound arguments (its ``locals()`` taken first thing).
    """
    names = {f.name for f in dataclasses.fields(MoECallbackOptions)}
    return MoECallbackOptions(**{k: v for k, v in arguments.items() if k in names})


DEFAULTS: MoECallbackOptions = MoECallbackOptions()
"""The default options: the seed factories' signatures take their defaults from here, so
each default is written once (in the field)."""
