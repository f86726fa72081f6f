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
from moescope.integrations.core import ExtrasOnlySink, TrainingSession, finite_only
from moescope.integrations.options import MoECallbackOptions
from moescope.sinks import resolve_loggers

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    pl = require("pytorch_lightning", "lightning")

__all__ = ["MoELightningCallback"]


class MoELightningCallback(pl.Callback):
    """Monitors the MoE layers of a ``LightningModule`` during ``trainer.fit``.

    ``MoELightningCallback(MoECallbackOptions(log_every_n_steps=50, ...))`` or, the same,
    ``MoELightningCallback(log_every_n_steps=50, ...)``: keyword arguments other than the
    two below are :class:`~moescope.integrations.options.MoECallbackOptions` fields
    (documented there once), applied on top of ``options``. Positional settings are not
    accepted (the first positional argument is ``options``).

    Args:
        options: the shared options (None = defaults). ``log_every_n_steps`` counts
            optimizer steps (``trainer.global_step``) and must be an int here;
            ``stop_on_alert`` sets ``trainer.should_stop``; ``log_dir`` defaults to
            ``<trainer.log_dir or default_root_dir>/moe_logs``.
        use_trainer_loggers: send the metrics to ``trainer.loggers``; default True when
            ``logger`` is None.
        module: the sub-module to monitor (an attribute path such as ``"model"`` or the
            module itself); default: the shallowest sub-module whose ``forward`` takes
            ``attention_mask``, else the whole LightningModule. Layer names in the keys
            are relative to it.
        **overrides: ``MoECallbackOptions`` fields.
    """

    def __init__(
        self,
        options: MoECallbackOptions | None = None,
        *,
        use_trainer_loggers: bool | None = None,
        module: str | nn.Module | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.module = module
        self.session = TrainingSession(options, **overrides)
        if self.session.log_every_n_steps is None:
            raise ValueError(
                "log_every_n_steps=None is not supported by the Lightning callback; pass "
                "an int >= 1 (optimizer steps per window)"
            )
        self.use_trainer_loggers = (
            self.session.logger is None
            if use_trainer_loggers is None
            else bool(use_trainer_loggers)
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
        found: list[Any] = []
        # Lightning's public logger classes; ``experiment`` is their public backend handle.
        kinds = (pl.loggers.TensorBoardLogger, pl.loggers.WandbLogger)
        for lg in trainer.loggers:
            if not isinstance(lg, kinds):
                continue
            try:
                found.extend(ExtrasOnlySink(x) for x in resolve_loggers(lg.experiment))
            except (TypeError, ImportError):
                continue  # a backend moescope cannot write to: scalars only
        self.session.add_sinks(found)

    # Which window counts follows the loop Lightning is in, not the modules' train/eval
    # flags: Lightning >= 2.2 keeps sub-modules that were in eval mode at fit start (e.g. a
    # transformers model from ``from_pretrained``) in eval mode during training.

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
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
