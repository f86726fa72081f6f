"""transformers ``Trainer`` integration: :func:`create_moe_callback_for_transformers`.

How the metrics reach the Trainer's own logging (checked against transformers 5.23's
``trainer.py`` / ``trainer_callback.py``):

- ``Trainer.log(logs)`` appends a *copy* ``{**logs, "step": global_step}`` to
  ``state.log_history`` and then calls ``on_log(logs)`` on every callback in list order:
  ``DefaultFlowCallback``, then the ``report_to`` integrations (TensorBoard, W&B, MLflow,
  ...), then the user's callbacks. A user callback that adds keys to ``logs`` in ``on_log``
  is therefore too late for the ``report_to`` destinations. So, at ``on_init_end`` /
  ``on_train_begin``, this callback moves itself right after ``DefaultFlowCallback`` in the
  Trainer's ``CallbackHandler`` (found from the call stack; callbacks are given no
  reference to the trainer). Its ``on_log`` then adds the ``moe/...`` keys to ``logs``
  before any reporting callback sees them, and to the ``state.log_history`` entry just
  written. The reporting integrations apply their own renaming (TensorBoard and W&B write
  ``train/moe/avg_expert_cv``).
- The train window ends in ``on_step_end`` every ``log_every_n_steps`` optimizer steps
  (and at the last step); the callback then sets ``control.should_log`` so the Trainer
  calls ``log`` at that very step, where the metrics are added. Snapshots are taken on
  every rank at the same steps (the all-reduce is collective); sinks write on rank 0 only.
- Evaluation: forwards in eval mode go to a separate window. ``Trainer.evaluate`` logs
  its metrics (``eval_loss``, ``eval_runtime``, ...) before calling ``on_evaluate``; the
  ``on_log`` that carries ``<prefix>_runtime`` and no training ``loss`` ends the eval window
  and adds ``moe/eval/...`` keys (``moe/<prefix>/...`` for other metric prefixes, e.g.
  ``eval_valid2`` with several eval datasets); ``on_evaluate`` adds them to the dict
  ``trainer.evaluate()`` returns as well.
- Gradient accumulation: every micro-batch's forward counts in the window.
- ``Trainer.predict`` (no log call): its window is returned in the prediction metrics as
  ``moe/test/...`` (``moe/<prefix>/...``) and sent to the sinks.
- Images and alerts: the ``report_to`` integrations only forward scalars, so at the first
  window the callback also writes heatmaps and alert text straight to their backends
  (TensorBoard's ``SummaryWriter``, the W&B run, the MLflow run) through moescope's sinks.
- Detailed logs (``save_detailed_logs=True``): ``<output_dir>/moe_logs/moe_detailed.jsonl``
  (``log_dir=`` to change the folder; heatmap PNGs go to ``<log_dir>/heatmaps``).
- Key naming in ``report_to`` destinations: transformers prefixes every non-``eval_`` key
  with ``train/``, so TensorBoard shows ``train/moe/avg_expert_cv`` and
  ``train/moe/eval/avg_expert_cv``; ``state.log_history`` and the ``logs`` dict hold the
  plain ``moe/...`` names. Non-finite values (e.g. a metric with no token in the window)
  are left out of the Trainer's logs so that ``trainer_state.json`` stays strict JSON.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from moescope._optional import require
from moescope.integrations.core import (
    AlertCallback,
    ExtrasOnlySink,
    TrainingSession,
    finite_only,
)

require("transformers", "hf")

from transformers import (  # noqa: E402
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback  # noqa: E402

__all__ = ["MoETrainerCallback", "create_moe_callback_for_transformers"]

_log = logging.getLogger("moescope")


class MoETrainerCallback(TrainerCallback):
    """A ``TrainerCallback`` that monitors every MoE layer of the Trainer's model.

    Attaches at ``on_train_begin``, detaches at ``on_train_end``. Build it with
    :func:`create_moe_callback_for_transformers`.

    Attributes:
        session: the shared :class:`~moescope.integrations.core.TrainingSession`
            (one monitor in ``session.monitor``, with windows ``"train"`` and ``"eval"``;
            usage history of the train windows in ``session.monitor.history``;
            ``session.train_monitor`` / ``session.eval_monitor`` are the same monitor).
        report_to_trainer: whether the metrics are added to the ``logs`` dict the
            ``report_to`` integrations receive (they always go to ``state.log_history``).
        follow_trainer_logging: when True the train window ends at the Trainer's own
            logging steps instead of every ``log_every_n_steps``.
    """

    def __init__(
        self,
        session: TrainingSession,
        report_to_trainer: bool = True,
        follow_trainer_logging: bool = False,
    ) -> None:
        self.session = session
        self.report_to_trainer = report_to_trainer
        self.follow_trainer_logging = follow_trainer_logging
        self._pending: tuple[int, dict[str, float]] | None = None
        self._last_eval: dict[str, float] = {}
        self._handler: CallbackHandler | None = None
        self._adopted = False
        self.reordered = False

    # ------------------------------------------------------------------ ordering

    def _move_before_reporting(self) -> None:
        """Put this callback right after DefaultFlowCallback in the running handler
        (idempotent; a callback reused by a second Trainer is moved in that one too)."""
        handler: CallbackHandler | None = None
        frame = sys._getframe(1)
        for _ in range(10):
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if isinstance(obj, CallbackHandler) and any(cb is self for cb in obj.callbacks):
                handler = obj
                break
            frame = frame.f_back
        if handler is None:
            if not self.reordered:
                _log.warning(
                    "moescope: could not find the Trainer's CallbackHandler; MoE metrics go "
                    "to state.log_history and moescope's own sinks, but the report_to "
                    "integrations may not receive them (pass logger=... instead)."
                )
            return
        self._handler = handler
        others = [cb for cb in handler.callbacks if cb is not self]
        pos = 0
        for i, cb in enumerate(others):
            if isinstance(cb, DefaultFlowCallback):
                pos = i + 1
        # A new list, not an in-place edit: call_event is iterating the old one right now.
        handler.callbacks = [*others[:pos], self, *others[pos:]]
        self.reordered = True

    def _adopt_report_to(self) -> None:
        """Images and alerts to the ``report_to`` destinations (their scalars arrive
        through ``logs``): TensorBoard's writer, the W&B run, the MLflow run."""
        self._adopted = True
        if self._handler is None or not self.report_to_trainer:
            return
        from moescope.sinks import resolve_loggers

        found: list[Any] = []
        for cb in self._handler.callbacks:
            name = type(cb).__name__
            obj: Any = None
            if name == "TensorBoardCallback":
                obj = getattr(cb, "tb_writer", None)
            elif name == "WandbCallback" and getattr(cb, "_initialized", False):
                obj = getattr(cb, "_wandb", None)
            elif name == "MLflowCallback" and getattr(cb, "_initialized", False):
                obj = getattr(cb, "_ml_flow", None)
            if obj is None:
                continue
            try:
                found.extend(ExtrasOnlySink(s) for s in resolve_loggers(obj))
            except (TypeError, ImportError):
                continue  # an integration object moescope cannot write to: scalars only
        self.session.add_sinks(found)

    # ------------------------------------------------------------------ events

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._move_before_reporting()

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        self._move_before_reporting()
        if model is None:
            raise RuntimeError("the Trainer passed no model to on_train_begin; cannot attach")
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
            self._end_window(state, control)
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
            self._end_window(state, control)
        if s.should_stop:
            control.should_training_stop = True
        return control

    def _end_window(self, state: TrainerState, control: TrainerControl) -> None:
        if not self._adopted and state.is_world_process_zero:
            self._adopt_report_to()
        step = state.global_step
        metrics = self.session.end_train_window(step, rank_zero=state.is_world_process_zero)
        self._pending = (step, metrics)
        # Make the Trainer log at this step, where on_log adds the metrics.
        control.should_log = True

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
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and all(
            k in entry for k in logs
        ):
            entry.update(extra)
        if self.report_to_trainer:
            logs.update(extra)

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
        extra = s.end_eval_window(state.global_step, name=name,
                                  rank_zero=state.is_world_process_zero)
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
    log_every_n_steps: int | None = 50,
    logger: Any = None,
    log_to_console: bool = True,
    log_heatmap_every: int | None = 500,
    alert_threshold_imbalance: float | None = 4.0,
    unused_expert_threshold: float | None = 0.25,
    entropy_threshold: float | None = 0.1,
    save_detailed_logs: bool = False,
    *,
    log_dir: str | Path | None = None,
    on_alert: AlertCallback | None = None,
    stop_on_alert: bool = False,
    track_eval: bool = True,
    per_layer: bool = True,
    layer_metrics: list[str] | tuple[str, ...] | None = None,
    report_to_trainer: bool | None = None,
    alert_rules: Any = None,
    monitor_kwargs: dict[str, Any] | None = None,
) -> MoETrainerCallback:
    """A transformers ``TrainerCallback`` logging MoE routing statistics (seed-001 API).

    Usage::

        cb = create_moe_callback_for_transformers(log_every_n_steps=50)
        Trainer(model=model, args=TrainingArguments(..., report_to="tensorboard"),
                train_dataset=ds, callbacks=[cb]).train()

    Args:
        log_every_n_steps: optimizer steps per train window; None = the Trainer's
            ``logging_steps``. With gradient accumulation every micro-batch counts.
        logger: extra destinations (wandb module/run, ``SummaryWriter``, mlflow module,
            object with ``log(dict, step=...)``, ``Sink``, or a list). With None the
            metrics go to the Trainer's logs and so to its ``report_to`` destinations.
        log_to_console: per-layer table at each window and the seeds' alert lines.
        log_heatmap_every: steps between usage heatmaps (PNG per layer in
            ``<log_dir>/heatmaps``, sent to the sinks as ``moe/<layer>/usage_heatmap``);
            None/0 disables.
        alert_threshold_imbalance: alert when an expert's load exceeds this x the mean.
        unused_expert_threshold: alert when this fraction of experts (or more) is unused.
        entropy_threshold: alert when routing entropy (nats) falls below this.
        save_detailed_logs: write each window's full snapshot as JSON lines to
            ``<log_dir>/moe_detailed.jsonl``.
        log_dir: default ``<TrainingArguments.output_dir>/moe_logs``.
        on_alert: called per Alert after logging (may raise to stop training; the hooks
            are removed first).
        stop_on_alert: set ``control.should_training_stop`` when an alert fires.
        track_eval: separate ``moe/eval/...`` window for evaluation forwards.
        per_layer / layer_metrics: which ``moe/<layer>/<metric>`` keys to log.
        report_to_trainer: add the metrics to the logs the ``report_to`` integrations
            receive; default: True when ``logger`` is None (else they would reach the
            same destination twice). ``state.log_history`` gets them either way.
        alert_rules: a ready ``AlertRules`` instead of the three thresholds.
        monitor_kwargs: passed to :class:`~moescope.monitor.MoEMonitor`.

    Returns:
        A :class:`MoETrainerCallback` for ``Trainer(callbacks=[...])``.
    """
    session = TrainingSession(
        log_every_n_steps=log_every_n_steps if log_every_n_steps is not None else 1,
        logger=logger,
        log_to_console=log_to_console,
        log_heatmap_every=log_heatmap_every,
        alert_threshold_imbalance=alert_threshold_imbalance,
        unused_expert_threshold=unused_expert_threshold,
        entropy_threshold=entropy_threshold,
        save_detailed_logs=save_detailed_logs,
        log_dir=log_dir,
        alert_rules=alert_rules,
        on_alert=on_alert,
        stop_on_alert=stop_on_alert,
        track_eval=track_eval,
        per_layer=per_layer,
        layer_metrics=layer_metrics,
        monitor_kwargs=monitor_kwargs,
    )
    return MoETrainerCallback(
        session,
        report_to_trainer=(logger is None) if report_to_trainer is None else report_to_trainer,
        follow_trainer_logging=log_every_n_steps is None,
    )
