"""Plain PyTorch training loops: :func:`create_moe_callback_for_pytorch` (seed-001 API).

::

    cb = create_moe_callback_for_pytorch(model, log_every_n_steps=100, logger=wandb)
    for batch in loader:
        cb.on_step_begin()
        loss = model(**batch).loss      # any number of forwards (gradient accumulation)
        loss.backward(); opt.step(); opt.zero_grad()
        cb.on_step_end()                # ends the window every log_every_n_steps steps
    cb.cleanup()                        # logs the last partial window, removes the hooks

or ``with create_moe_callback_for_pytorch(model) as cb: ...`` (``cleanup`` on exit).
Forwards in eval mode (``model.eval()``) or inside ``with cb.evaluation(): ...`` go to a
separate window logged as ``moe/eval/...`` when the evaluation block exits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from moescope.integrations.core import SessionFrontEnd, TrainingSession
from moescope.integrations.options import (
    DEFAULTS,
    AlertCallback,
    MoECallbackOptions,
    factory_options,
)

__all__ = ["MoEPyTorchCallback", "create_moe_callback_for_pytorch"]


class MoEPyTorchCallback(SessionFrontEnd):
    """Step-driven MoE monitoring for a hand-written training loop.

    Attached to ``model`` on construction. Built by :func:`create_moe_callback_for_pytorch`
    or directly: ``MoEPyTorchCallback(model, MoECallbackOptions(...))``,
    ``MoEPyTorchCallback(model, log_every_n_steps=10)`` (keywords: the fields of
    :class:`~moescope.integrations.options.MoECallbackOptions`), or with a ready
    :class:`~moescope.integrations.core.TrainingSession`. ``on_step_end()`` counts one optimizer step
    and, every ``log_every_n_steps`` steps, snapshots the window (all forwards in train
    mode since the last one, every micro-batch included), logs it, checks the alerts.

    Attributes:
        session: the shared :class:`~moescope.integrations.core.TrainingSession`.
        step: optimizer steps counted so far (``on_step_end`` calls, or the explicit
            ``step=`` last passed).
    """

    def __init__(
        self,
        model: nn.Module,
        session: TrainingSession | MoECallbackOptions | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(session, TrainingSession):
            session = TrainingSession(session, **overrides)
        elif overrides:
            raise TypeError("pass options either as a TrainingSession or as keywords, not both")
        if session.log_every_n_steps is None:
            raise ValueError(
                "log_every_n_steps=None (follow the framework's logging) has no meaning in a "
                "plain loop; pass an int >= 1"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"create_moe_callback_for_pytorch needs the model (a torch.nn.Module), got "
                f"{type(model).__name__}"
            )
        self.model = model
        self.session = session
        self.step = 0
        self._closed = False
        session.attach(model)

    # ------------------------------------------------------------------ seed API

    def _require_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{what} after cleanup(): the MoE callback is detached; create a new one "
                "with create_moe_callback_for_pytorch(model, ...)"
            )

    def on_step_begin(self) -> None:
        """Call before the step's forward passes (seed API). Counting needs no signal,
        every forward is hooked; this only checks the callback was not cleaned up."""
        self._require_open("on_step_begin()")

    def on_step_end(self, step: int | None = None) -> dict[str, float] | None:
        """Call after the optimizer step. Returns the metrics when this step ended a
        window, else None.

        Args:
            step: the global step just finished (default: one more than the last).
        """
        self._require_open("on_step_end()")
        self.step = self.step + 1 if step is None else int(step)
        if self.session.is_log_step(self.step):
            return self.session.end_train_window(self.step)
        return None

    @contextmanager
    def evaluation(self) -> Iterator[MoEPyTorchCallback]:
        """Count every forward inside the block in the eval window (whatever
        ``model.training``), and log it as ``moe/eval/...`` at the end of the block."""
        self._require_open("evaluation()")
        self.session.force_window("eval")
        try:
            yield self
        finally:
            self.session.force_window(None)
        self.session.end_eval_window(self.step)

    def log_eval(self) -> dict[str, float]:
        """End the eval window now (forwards made in eval mode) and log it."""
        self._require_open("log_eval()")
        return self.session.end_eval_window(self.step)

    def cleanup(self) -> None:
        """Log the last partial train window (if steps are waiting), remove every hook,
        close the sinks this callback opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.session.attached and self.session.has_unlogged_steps(self.step):
                self.session.end_train_window(self.step)
        finally:
            self.session.close()

    def close(self) -> None:
        """:meth:`cleanup` (the seed API's name), under the name every front end shares."""
        self.cleanup()


def create_moe_callback_for_pytorch(
    model: nn.Module,
    log_every_n_steps: int = 100,
    logger: Any = DEFAULTS.logger,
    log_to_console: bool = DEFAULTS.log_to_console,
    log_heatmap_every: int | None = DEFAULTS.log_heatmap_every,
    alert_threshold_imbalance: float | None = DEFAULTS.alert_threshold_imbalance,
    unused_expert_threshold: float | None = DEFAULTS.unused_expert_threshold,
    entropy_threshold: float | None = DEFAULTS.entropy_threshold,
    save_detailed_logs: bool = DEFAULTS.save_detailed_logs,
    *,
    log_dir: str | Path = "moe_logs",
    on_alert: AlertCallback | None = DEFAULTS.on_alert,
    stop_on_alert: bool = DEFAULTS.stop_on_alert,
    track_eval: bool = DEFAULTS.track_eval,
    per_layer: bool | str = DEFAULTS.per_layer,
    layer_metrics: list[str] | tuple[str, ...] | None = None,
    alert_rules: Any = DEFAULTS.alert_rules,
    monitor_kwargs: dict[str, Any] | None = None,
) -> MoEPyTorchCallback:
    """MoE monitoring for a plain PyTorch loop (``on_step_begin``/``on_step_end``/``cleanup``).

    Args:
        model: the MoE model (any ``nn.Module`` a moescope adapter recognises).
        log_every_n_steps: ``on_step_end`` calls per window (an int here: a plain loop
            has no logging cadence of its own to follow).
        log_dir: folder for heatmaps and detailed logs (default ``moe_logs``).
        stop_on_alert: set :attr:`MoEPyTorchCallback.should_stop` when an alert fires.

    Every other argument is the :class:`~moescope.integrations.options.MoECallbackOptions`
    field of the same name (documented there), with the seeds' defaults.

    Returns:
        A :class:`MoEPyTorchCallback`, attached to ``model``.
    """
    options = factory_options(locals())
    return MoEPyTorchCallback(model, options)
