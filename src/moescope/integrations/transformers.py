"""transformers ``Trainer`` integration: :class:`MoETrainerCallback` and the seed factory
:func:`create_moe_callback_for_transformers`. Public transformers API only.

How the metrics reach the Trainer's own logging (read off transformers 5.24's
``trainer.py`` / ``trainer_callback.py``; user guide: ``docs/transformers.md``):

- ``Trainer.log(logs)`` appends a *copy* ``{**logs, "step": global_step}`` to
  ``state.log_history``, then calls every callback's ``on_log`` in list order with the
  *same* ``logs`` dict. The list is ``DefaultFlowCallback``, the ``report_to``
  integrations (TensorBoard, W&B, MLflow, ...), the user's ``callbacks=[...]`` in their
  order, and last the console printer (``PrinterCallback`` with ``disable_tqdm=True``,
  else ``ProgressCallback``, which prints the whole ``logs`` dict).
- So keys this callback adds to ``logs`` in ``on_log`` reach the ``report_to``
  integrations only if it runs before them. :meth:`MoETrainerCallback.attach_to_trainer`
  puts it there with the Trainer's public ``pop_callback`` / ``add_callback``; without it
  (plain ``callbacks=[cb]``) the metrics still reach ``state.log_history``, the printer and
  moescope's own sinks, and a warning at train start says that the ``report_to``
  destinations will not get them.
- What goes into ``logs`` (so to ``report_to`` and the console printer): by default only
  the seeds' three headline keys (:data:`TRAINER_SUMMARY_METRICS`, e.g.
  ``moe/avg_expert_cv``; ``moe/eval/...`` for evaluations), so the printed line stays short;
  ``trainer_logs="all"`` puts every key there. ``state.log_history`` always gets the full
  set (``moe/<layer>/<metric>`` included), and so does every ``logger=`` sink.
- The train window ends in ``on_step_end`` every ``log_every_n_steps`` optimizer steps
  (``None``: at the Trainer's own logging steps), and at the last step; the callback then
  sets ``control.should_log`` so the Trainer calls ``log`` at that very step. Snapshots
  are taken on every rank at the same steps (the all-reduce is collective); sinks write on
  rank 0 only.
- Evaluation: forwards in eval mode go to a separate window. ``Trainer.evaluate`` logs its
  metrics before calling ``on_evaluate``; the ``on_log`` that carries ``<prefix>_runtime``
  and no training ``loss`` ends the eval window as ``moe/eval/...`` (``moe/<prefix>/...``
  for other metric prefixes); ``on_evaluate`` adds the full set to the dict
  ``trainer.evaluate()`` returns. ``Trainer.predict`` (no log call): its window goes to
  the sinks and the prediction metrics as ``moe/test/...``.
- Images and alerts: ``report_to`` integrations forward scalars only. When
  ``report_to`` includes ``wandb`` / ``mlflow`` and ``logger`` is None, heatmaps and alert
  tables go to the active run found through public module state (``wandb.run``,
  ``mlflow.active_run()``), never through another callback's attributes. TensorBoard has
  no such public handle: pass ``logger=SummaryWriter(...)`` for images there.
- Non-finite values (a metric with no token in the window) are left out of the Trainer's
  logs so that ``trainer_state.json`` stays strict JSON.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal

from moescope._optional import require
from moescope.integrations.core import ExtrasOnlySink, TrainingSession, finite_only
from moescope.integrations.options import (
    DEFAULTS,
    AlertCallback,
    MoECallbackOptions,
    factory_options,
)
from moescope.sinks import resolve_loggers

require("transformers", "hf")

from transformers import (  # noqa: E402
    DefaultFlowCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

__all__ = [
    "TRAINER_SUMMARY_METRICS",
    "MoETrainerCallback",
    "create_moe_callback_for_transformers",
]

_log = logging.getLogger("moescope")

#: Model-level metrics put into the Trainer's ``logs`` with ``trainer_logs="summary"``:
#: the seeds' three dashboard keys.
TRAINER_SUMMARY_METRICS: tuple[str, ...] = (
    "avg_expert_cv",
    "avg_routing_entropy",
    "total_unused_experts",
)

TrainerLogs = Literal["summary", "all"]


class MoETrainerCallback(TrainerCallback):
    """A ``TrainerCallback`` that monitors every MoE layer of the Trainer's model.

    Attaches at ``on_train_begin``, detaches at ``on_train_end``. For the ``report_to``
    integrations to receive the metrics, call :meth:`attach_to_trainer` once the Trainer
    is built (see the module docstring)::

        cb = MoETrainerCallback(MoECallbackOptions(log_every_n_steps=50))
        trainer = Trainer(model=model, args=args, train_dataset=ds)
        cb.attach_to_trainer(trainer)
        trainer.train()

    Args:
        options: the shared :class:`~moescope.integrations.options.MoECallbackOptions`
            (every setting documented there), or a ready
            :class:`~moescope.integrations.core.TrainingSession`; None = defaults.
            ``log_every_n_steps=None`` ends the train window at the Trainer's own
            logging steps; ``log_dir`` defaults to ``<output_dir>/moe_logs``.
        report_to_trainer: add the metrics to the Trainer's ``logs`` (what ``report_to``
            integrations and the console printer receive); default: True when
            ``logger`` is None (else they would reach the same destination twice).
            ``state.log_history`` gets them either way.
        trainer_logs: which keys go into ``logs``: ``"summary"`` (default,
            :data:`TRAINER_SUMMARY_METRICS`) or ``"all"``.
        **overrides: ``MoECallbackOptions`` fields applied on top of ``options``.

    Attributes:
        session: the shared :class:`~moescope.integrations.core.TrainingSession` (one
            monitor in ``session.monitor``, with windows ``"train"`` and ``"eval"``;
            usage history of the train windows in ``session.monitor.history``).
        ordered: whether :meth:`attach_to_trainer` placed it ahead of ``report_to``.
    """

    def __init__(
        self,
        options: MoECallbackOptions | TrainingSession | None = None,
        *,
        report_to_trainer: bool | None = None,
        trainer_logs: TrainerLogs = "summary",
        **overrides: Any,
    ) -> None:
        if isinstance(options, TrainingSession):
            if overrides:
                raise TypeError("pass options either as a TrainingSession or as keywords, not both")
            self.session = options
        else:
            self.session = TrainingSession(options, **overrides)
        if trainer_logs not in ("summary", "all"):
            raise ValueError(f"trainer_logs must be 'summary' or 'all', got {trainer_logs!r}")
        self.report_to_trainer = (
            self.session.logger is None if report_to_trainer is None else bool(report_to_trainer)
        )
        self.trainer_logs: TrainerLogs = trainer_logs
        self.ordered = False
        self._pending: tuple[int, dict[str, float]] | None = None
        self._last_eval: dict[str, float] = {}
        self._adopted = False

    @property
    def follow_trainer_logging(self) -> bool:
        """True when ``log_every_n_steps`` is None: windows end at the Trainer's own
        logging steps (``logging_steps`` / ``logging_strategy``)."""
        return self.session.log_every_n_steps is None

    # ------------------------------------------------------------------ ordering

    def attach_to_trainer(self, trainer: Any) -> MoETrainerCallback:
        """Place this callback right after ``DefaultFlowCallback``, ahead of the
        ``report_to`` integrations and every other callback, so that the keys its
        ``on_log`` adds reach them. Adds it if the Trainer does not have it yet.

        Uses the Trainer's public ``pop_callback`` / ``add_callback``: every callback
        after ``DefaultFlowCallback`` is popped and re-added in its original order behind
        this one. Call it after building the Trainer and before ``train()`` (again after
        adding callbacks later with ``trainer.add_callback``).

        Returns:
            ``self``, for ``trainer.train()`` chaining.
        """
        current = list(trainer.callback_handler.callbacks)
        after = [cb for cb in current if cb is not self and not isinstance(cb, DefaultFlowCallback)]
        for cb in after:
            trainer.pop_callback(cb)
        if any(cb is self for cb in current):
            trainer.pop_callback(self)
        trainer.add_callback(self)
        for cb in after:
            trainer.add_callback(cb)
        self.ordered = True
        return self

    def _adopt_report_to(self, args: TrainingArguments) -> None:
        """Images and alerts to the active W&B / MLflow run of the ``report_to``
        integrations (their scalars arrive through ``logs``), found through public
        module state. A module not imported yet has no active run: nothing to adopt."""
        self._adopted = True
        if not self.report_to_trainer:
            return
        report_to = set(args.report_to or [])
        found: list[Any] = []
        wandb = sys.modules.get("wandb") if "wandb" in report_to else None
        if wandb is not None and getattr(wandb, "run", None) is not None:
            found.append(wandb.run)
        mlflow = sys.modules.get("mlflow") if "mlflow" in report_to else None
        if mlflow is not None and mlflow.active_run() is not None:
            found.append(mlflow)
        sinks: list[Any] = []
        for obj in found:
            try:
                sinks.extend(ExtrasOnlySink(s) for s in resolve_loggers(obj))
            except (TypeError, ImportError):
                continue  # a backend moescope cannot write to: scalars only
        self.session.add_sinks(sinks)

    # ------------------------------------------------------------------ events

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise RuntimeError("the Trainer passed no model to on_train_begin; cannot attach")
        if self.report_to_trainer and not self.ordered and args.report_to:
            _log.warning(
                "moescope: the Trainer's report_to integrations (%s) run before this "
                "callback, so they will not receive the moe/* metrics; call "
                "callback.attach_to_trainer(trainer) before trainer.train(), or pass "
                "logger=... to the callback (docs/transformers.md).",
                ", ".join(args.report_to),
            )
        s = self.session
        if s.log_dir is None:
            s.log_dir = Path(args.output_dir or ".") / "moe_logs"
        s.should_stop = False
        s.attach(model)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        s = self.session
        step = state.global_step
        final = state.max_steps > 0 and step >= state.max_steps
        if self.follow_trainer_logging:
            # DefaultFlowCallback ran first and decided whether the Trainer logs now.
            due = control.should_log and step != s.last_train_step
        else:
            due = s.is_log_step(step)
        if s.attached and (due or (final and s.has_unlogged_steps(step))):
            self._end_window(args, state, control)
        if s.should_stop:
            control.should_training_stop = True
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # logging_strategy="epoch" decides to log here, not in on_step_end.
        s = self.session
        if (
            self.follow_trainer_logging
            and s.attached
            and control.should_log
            and s.has_unlogged_steps(state.global_step)
        ):
            self._end_window(args, state, control)
        if s.should_stop:
            control.should_training_stop = True
        return control

    def _end_window(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl
    ) -> None:
        if not self._adopted and state.is_world_process_zero:
            self._adopt_report_to(args)
        step = state.global_step
        metrics = self.session.end_train_window(step, rank_zero=state.is_world_process_zero)
        self._pending = (step, metrics)
        # Make the Trainer log at this step, where on_log adds the metrics.
        control.should_log = True

    def _for_logs(self, metrics: dict[str, float]) -> dict[str, float]:
        """The part of ``metrics`` that goes into the Trainer's ``logs``."""
        if self.trainer_logs == "all":
            return metrics
        # Per-layer keys end with a layer metric name, never with an aggregate's name.
        return {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] in TRAINER_SUMMARY_METRICS}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        eval_name = _eval_name(logs)
        extra: dict[str, float] = {}
        if eval_name is not None:
            if self.session.attached and self.session.track_eval:
                extra = self.session.end_eval_window(
                    state.global_step, name=eval_name, rank_zero=state.is_world_process_zero
                )
                self._last_eval = finite_only(extra)
        elif self._pending is not None and self._pending[0] == state.global_step:
            extra = self._pending[1]
            self._pending = None
        if not extra:
            return
        extra = finite_only(extra)  # keeps trainer_state.json strict JSON
        # Trainer.log appended {**logs, "step": ...} just before calling on_log: that entry
        # gets the full set.
        entry = state.log_history[-1] if state.log_history else None
        if (
            entry is not None
            and entry.get("step") == state.global_step
            and all(k in entry for k in logs)
        ):
            entry.update(extra)
        if self.report_to_trainer:
            logs.update(self._for_logs(extra))

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics is not None and self._last_eval:
            metrics.update(self._last_eval)
        self._last_eval = {}

    def on_predict(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Trainer.predict logs nothing: its window goes to the sinks and the returned
        # metrics as moe/<prefix>/... (moe/test/... by default).
        s = self.session
        if metrics is None or not s.attached or not s.track_eval:
            return
        name = _eval_name(metrics) or "test"
        extra = s.end_eval_window(
            state.global_step, name=name, rank_zero=state.is_world_process_zero
        )
        metrics.update(finite_only(extra))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        s = self.session
        if s.attached and s.has_unlogged_steps(state.global_step):
            # Stopped early (EarlyStoppingCallback, should_training_stop): the Trainer
            # logs no more, so the tail window goes to the sinks and its own history row.
            metrics = s.end_train_window(state.global_step, rank_zero=state.is_world_process_zero)
            state.log_history.append({**finite_only(metrics), "step": state.global_step})
        self.session.close()
        self._pending = None
        self._adopted = False

    def cleanup(self) -> None:
        """Detach and close the sinks (what ``on_train_end`` does); for an interrupted run."""
        self.session.close()


def _eval_name(logs: dict[str, Any]) -> str | None:
    """The metric prefix of an evaluation log (``eval``), or None for a training log.

    ``Trainer.evaluate`` always logs ``<prefix>_runtime`` (``speed_metrics``); training logs
    carry ``loss`` (per step) or ``train_runtime`` (the final summary).
    """
    if "loss" in logs:
        return None
    for key in logs:
        if key.endswith("_runtime"):
            prefix = key[: -len("_runtime")]
            if prefix and prefix != "train":
                return prefix
    return None


def create_moe_callback_for_transformers(
    log_every_n_steps: int | None = DEFAULTS.log_every_n_steps,
    logger: Any = DEFAULTS.logger,
    log_to_console: bool = DEFAULTS.log_to_console,
    log_heatmap_every: int | None = DEFAULTS.log_heatmap_every,
    alert_threshold_imbalance: float | None = DEFAULTS.alert_threshold_imbalance,
    unused_expert_threshold: float | None = DEFAULTS.unused_expert_threshold,
    entropy_threshold: float | None = DEFAULTS.entropy_threshold,
    save_detailed_logs: bool = DEFAULTS.save_detailed_logs,
    *,
    log_dir: str | Path | None = DEFAULTS.log_dir,
    on_alert: AlertCallback | None = DEFAULTS.on_alert,
    stop_on_alert: bool = DEFAULTS.stop_on_alert,
    track_eval: bool = DEFAULTS.track_eval,
    per_layer: bool | str = DEFAULTS.per_layer,
    layer_metrics: list[str] | tuple[str, ...] | None = None,
    report_to_trainer: bool | None = None,
    alert_rules: Any = DEFAULTS.alert_rules,
    monitor_kwargs: dict[str, Any] | None = None,
) -> MoETrainerCallback:
    """A transformers ``TrainerCallback`` logging MoE routing statistics (seed-001 API).

    Usage::

        cb = create_moe_callback_for_transformers(log_every_n_steps=50)
        trainer = Trainer(model=model, args=TrainingArguments(..., report_to="tensorboard"),
                          train_dataset=ds, callbacks=[cb])
        cb.attach_to_trainer(trainer)   # ahead of report_to, so it gets the moe/* keys
        trainer.train()

    Args:
        log_every_n_steps: optimizer steps per train window; None = the Trainer's
            ``logging_steps``. With gradient accumulation every micro-batch counts.
        logger: extra destinations; with None the metrics go to the Trainer's logs (and,
            after :meth:`MoETrainerCallback.attach_to_trainer`, to its ``report_to``
            destinations).
        log_dir: default ``<TrainingArguments.output_dir>/moe_logs``.
        stop_on_alert: set ``control.should_training_stop`` when an alert fires.
        report_to_trainer: see :class:`MoETrainerCallback` (default: ``logger is None``).

    Every other argument is the :class:`~moescope.integrations.options.MoECallbackOptions`
    field of the same name (documented there), with the seeds' defaults.

    Returns:
        A :class:`MoETrainerCallback` for ``Trainer(callbacks=[...])``.
    """
    options = factory_options(locals())
    return MoETrainerCallback(options, report_to_trainer=report_to_trainer)
