"""Lightning integration: :class:`MoELightningCallback` (``lightning.pytorch.Callback``).

Hook mapping (Lightning 2.x):

- ``on_fit_start``: attach to the MoE model inside the ``LightningModule`` (see ``module``).
- ``on_train_batch_start`` / ``on_validation_epoch_start``: select the train / eval window
  (by loop, not by the modules' ``training`` flag, which Lightning leaves alone).
- ``on_train_batch_end``: called per micro-batch; the train window ends when
  ``trainer.global_step`` (optimizer steps) reaches a multiple of ``log_every_n_steps``,
  so with ``accumulate_grad_batches`` every micro-batch counts in its step's window.
- ``on_validation_epoch_end``: ends the eval window (forwards in eval mode) as
  ``moe/eval/...``; the sanity-check validation is discarded.
- ``on_train_end``: logs the last partial train window; ``on_fit_end`` / ``on_exception``
  detach and close the sinks.

Where the metrics go: ``pl_module.log_dict(..., logger=False)`` puts them in
``trainer.callback_metrics`` (so ``EarlyStopping`` / ``ModelCheckpoint`` can monitor e.g.
``moe/avg_expert_cv``); the trainer's loggers get them directly with
``logger.log_metrics(metrics, step=global_step)`` at exactly the window's step (going
through ``self.log(logger=True)`` would tie them to the Trainer's own
``log_every_n_steps``). Snapshots happen on every rank (the all-reduce is collective);
only global rank 0 writes.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from moescope._optional import require
from moescope.integrations.core import (
    AlertCallback,
    ExtrasOnlySink,
    TrainingSession,
    finite_only,
)

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    pl = require("pytorch_lightning", "lightning")

__all__ = ["MoELightningCallback"]


class MoELightningCallback(pl.Callback):
    """Monitors the MoE layers of a ``LightningModule`` during ``trainer.fit``.

    Args:
        log_every_n_steps: optimizer steps (``trainer.global_step``) per train window.
        logger: extra destinations (wandb module/run, ``SummaryWriter``, mlflow module,
            object with ``log(dict, step=...)``, ``Sink``, or a list).
        log_to_console: per-layer table per window and the seeds' alert lines.
        log_heatmap_every: steps between usage heatmaps (PNGs in
            ``<log_dir>/heatmaps``); None/0 disables.
        alert_threshold_imbalance, unused_expert_threshold, entropy_threshold: alert
            thresholds (see :class:`~moescope.alerts.AlertRules`).
        save_detailed_logs: JSON lines in ``<log_dir>/moe_detailed.jsonl``.
        log_dir: default ``<trainer.log_dir or default_root_dir>/moe_logs``.
        on_alert: called per Alert (may raise to stop training; hooks are removed first).
        stop_on_alert: set ``trainer.should_stop`` when an alert fires.
        use_trainer_loggers: send the metrics to ``trainer.loggers``; default True when
            ``logger`` is None.
        track_eval, per_layer, layer_metrics, alert_rules, monitor_kwargs: see
            :class:`~moescope.integrations.core.TrainingSession`.
        module: the sub-module to monitor (an attribute path such as ``"model"`` or the
            module itself); default: the shallowest sub-module whose ``forward`` takes
            ``attention_mask``, else the whole LightningModule. Layer names in the keys
            are relative to it.
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
        *,
        log_dir: str | Path | None = None,
        on_alert: AlertCallback | None = None,
        stop_on_alert: bool = False,
        use_trainer_loggers: bool | None = None,
        track_eval: bool = True,
        per_layer: bool = True,
        layer_metrics: list[str] | tuple[str, ...] | None = None,
        alert_rules: Any = None,
        monitor_kwargs: dict[str, Any] | None = None,
        module: str | nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.session = TrainingSession(
            log_every_n_steps=log_every_n_steps,
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
        self.use_trainer_loggers = (
            logger is None if use_trainer_loggers is None else bool(use_trainer_loggers)
        )

    # ------------------------------------------------------------------ helpers

    def _publish(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        values = finite_only(metrics)
        if not values:
            return
        # logger=False: the loggers are written below at the exact step instead.
        pl_module.log_dict(values, logger=False, sync_dist=False)
        if self.use_trainer_loggers and trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(values, step=trainer.global_step)

    def _end_train_window(self, trainer: Any, pl_module: Any) -> None:
        metrics = self.session.end_train_window(
            trainer.global_step, rank_zero=trainer.is_global_zero
        )
        self._publish(trainer, pl_module, metrics)
        if self.session.should_stop:
            trainer.should_stop = True

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        s = self.session
        if s.log_dir is None:
            base = trainer.log_dir or trainer.default_root_dir or "."
            s.log_dir = Path(base) / "moe_logs"
        s.should_stop = False
        s.attach(self._target(pl_module))
        if self.use_trainer_loggers and trainer.is_global_zero:
            self._adopt_logger_experiments(trainer)

    def _target(self, pl_module: Any) -> nn.Module:
        """The module to monitor: ``module=`` if given, else the shallowest sub-module of
        the LightningModule whose ``forward`` takes ``attention_mask`` (the wrapped HF /
        moescope model, so padding is excluded and layer names read
        ``model.layers.0.mlp``), else the LightningModule itself."""
        if isinstance(self.module, nn.Module):
            return self.module
        if isinstance(self.module, str):
            target = pl_module.get_submodule(self.module)
            return target
        best: tuple[int, nn.Module] | None = None
        for name, mod in pl_module.named_modules():
            depth = name.count(".") + 1 if name else 0
            if best is not None and depth >= best[0]:
                continue
            try:
                params = inspect.signature(mod.forward).parameters
            except (TypeError, ValueError):
                continue
            if "attention_mask" in params:
                best = (depth, mod)
        return best[1] if best is not None else pl_module

    def _adopt_logger_experiments(self, trainer: Any) -> None:
        """Images and alerts to the trainer's loggers' own backends (a TensorBoard
        ``SummaryWriter``, a W&B run): Lightning's ``log_metrics`` carries scalars only."""
        from moescope.sinks import resolve_loggers

        found: list[Any] = []
        for lg in trainer.loggers:
            name = type(lg).__name__
            if name not in ("TensorBoardLogger", "WandbLogger"):
                continue
            try:
                found.extend(ExtrasOnlySink(x) for x in resolve_loggers(lg.experiment))
            except (TypeError, ImportError):
                continue  # a backend moescope cannot write to: scalars only
        self.session.add_sinks(found)

    # Which window counts follows the loop Lightning is in, not the modules' train/eval
    # flags: Lightning >= 2.2 keeps sub-modules that were in eval mode at fit start (e.g. a
    # transformers model from ``from_pretrained``) in eval mode during training.

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.session.attached:
            self.session.force_window("train")

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        s = self.session
        if s.attached:
            # With track_eval=False the eval window is only discarded, but validation
            # forwards must still stay out of the train window forced per batch.
            s.exclude_from_train()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.session.attached and self.session.is_log_step(trainer.global_step):
            self._end_train_window(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        s = self.session
        if not s.attached:
            return
        s.force_window(None)
        if trainer.sanity_checking or not s.track_eval:
            s.discard_eval_window()
            return
        metrics = s.end_eval_window(trainer.global_step, rank_zero=trainer.is_global_zero)
        self._publish(trainer, pl_module, metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        s = self.session
        if s.attached and s.has_unlogged_steps(trainer.global_step):
            metrics = s.end_train_window(trainer.global_step, rank_zero=trainer.is_global_zero)
            # log_dict is not allowed in on_train_end: loggers only.
            if self.use_trainer_loggers and trainer.is_global_zero:
                values = finite_only(metrics)
                for lg in trainer.loggers:
                    lg.log_metrics(values, step=trainer.global_step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.close()
