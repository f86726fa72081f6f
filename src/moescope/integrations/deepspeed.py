"""DeepSpeed integration: :func:`attach` (one line, no change to the training loop).

::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config, ...)
    moe = moescope.integrations.deepspeed.attach(engine)   # the one added line
    for batch in loader:                                    # the user's loop, unchanged
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
    moe.close()                                             # last partial window, unhook

Hook mapping (DeepSpeed 0.19, ``DeepSpeedEngine``):

- ``attach``: builds one :class:`~moescope.integrations.core.TrainingSession` on
  ``engine.module`` (every ``deepspeed.moe.layer.MoE`` found by
  :mod:`moescope.capture.deepspeed`) and wraps ``engine.step`` on this engine instance
  only (the class is untouched; :meth:`MoEDeepSpeedCallback.close` restores it).
- after each ``engine.step()`` that took an optimizer step (``engine.global_steps``
  advanced; micro-steps inside gradient accumulation only count forwards), the train
  window ends every ``log_every_n_steps`` optimizer steps: DeepSpeed's own
  ``steps_per_print`` unless given.
- forwards in eval mode (``engine.eval()``) count in a separate window, logged as
  ``moe/eval/...`` by :meth:`MoEDeepSpeedCallback.log_eval`.

Where the metrics go: DeepSpeed's own monitor (``engine.monitor``, a ``MonitorMaster``:
TensorBoard, W&B, CSV, Comet as configured in the DeepSpeed config) gets every finite flat
metric as ``write_events([(name, value, x)])``, with ``x`` = ``engine.global_samples``
(the x axis of DeepSpeed's own ``Train/Samples/*`` events) or the optimizer step
(``step_axis="steps"``). The console, the alerts and the JSONL log work as with the
Trainer (:class:`~moescope.integrations.options.MoECallbackOptions`).

Ranks: the snapshot is taken on every rank at the same step (its all-reduce is
collective) over :func:`deepspeed_process_group` (all ranks that hold distinct tokens); only global
rank 0 writes, as DeepSpeed's ``MonitorMaster`` does.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from moescope.integrations.core import SessionFrontEnd, TrainingSession, finite_only
from moescope.integrations.options import MoECallbackOptions, options_from
from moescope.sinks.base import Sink
from moescope.sinks.event import LogEvent

__all__ = ["DeepSpeedMonitorSink", "MoEDeepSpeedCallback", "attach", "deepspeed_process_group"]

_STEP_AXES = ("samples", "steps")
_DEFAULT_STEPS_PER_PRINT = 10  # DeepSpeed's own default for steps_per_print


def deepspeed_process_group() -> Any:
    """The process group moescope's snapshot sums over in a DeepSpeed job (None = the world).

    Every rank's gate routes that rank's own tokens with global expert ids, so counts are
    summed over all ranks that hold *distinct* tokens: the data-parallel ranks, which in
    DeepSpeed's MoE include the expert-parallel ones (an expert-parallel group is a slice of
    the data-parallel world; reducing over it alone would miss the other groups' tokens) and,
    with Ulysses sequence parallelism, the sequence-parallel ranks (DeepSpeed's
    sequence-data-parallel group). Tensor-parallel ranks (a Megatron ``mpu`` passed to
    ``deepspeed.initialize``) run the gate on the same tokens and are left out, so each
    token counts once; DeepSpeed's ``MOELayer`` makes the same assumption (it drops the
    duplicate tokens of tensor-parallel ranks before its all-to-all).

    Without an ``mpu`` or device mesh that is the whole world (None). Call it on every rank
    (it may create DeepSpeed's group).
    """
    # Imported here: DeepSpeed is optional (and slow to import); typed Any, it ships no stubs.
    groups: Any = importlib.import_module("deepspeed.utils.groups")
    if getattr(groups, "mpu", None) is None and getattr(groups, "mesh_device", None) is None:
        return None
    return groups._get_sequence_data_parallel_group()


class DeepSpeedMonitorSink(Sink):
    """Writes each event's finite flat metrics into DeepSpeed's ``MonitorMaster``.

    Args:
        monitor: ``engine.monitor`` (anything with ``write_events(list[(name, value, x)])``).
        x_of: the x value of an event (``engine.global_samples`` or the event's step).
    """

    def __init__(self, monitor: Any, x_of: Any) -> None:
        self.monitor = monitor
        self.x_of = x_of

    def write(self, event: LogEvent) -> None:
        metrics = finite_only(dict(event.metrics))
        if not metrics:
            return
        x = int(self.x_of(event))
        self.monitor.write_events([(name, float(v), x) for name, v in metrics.items()])

    def __repr__(self) -> str:
        return f"DeepSpeedMonitorSink({type(self.monitor).__name__})"


class MoEDeepSpeedCallback(SessionFrontEnd):
    """MoE monitoring of one ``DeepSpeedEngine`` (built by :func:`attach`).

    Attributes:
        engine: the DeepSpeed engine.
        session: the shared :class:`~moescope.integrations.core.TrainingSession`
            (``session.monitor`` is the one :class:`~moescope.monitor.MoEMonitor`).
        log_every_n_steps: optimizer steps per train window.
    """

    def __init__(
        self,
        engine: Any,
        options: MoECallbackOptions | None = None,
        *,
        log_every_n_steps: int | None = None,
        step_axis: str = "samples",
        use_engine_monitor: bool = True,
        **overrides: Any,
    ) -> None:
        module = getattr(engine, "module", None)
        if module is None or not callable(getattr(engine, "step", None)):
            raise TypeError(
                "moescope.integrations.deepspeed.attach needs the engine returned by "
                f"deepspeed.initialize(...), got {type(engine).__name__}; for a plain model "
                "use moescope.MoEMonitor(model)"
            )
        if callable(getattr(engine, "train_batch", None)):
            raise TypeError(
                "DeepSpeed's PipelineEngine is not supported: its stages hold different MoE "
                "layers and only rank 0 writes. Monitor each stage's module with "
                "moescope.MoEMonitor(engine.module, process_group=<the stage's data-parallel "
                "group>) and log its snapshot yourself."
            )
        if step_axis not in _STEP_AXES:
            raise ValueError(f"step_axis must be one of {_STEP_AXES}, got {step_axis!r}")
        if log_every_n_steps is None:
            spp = getattr(engine, "steps_per_print", lambda: None)()
            log_every_n_steps = int(spp) if spp else _DEFAULT_STEPS_PER_PRINT
        opts = options_from(options, {**overrides, "log_every_n_steps": log_every_n_steps})
        if "process_group" not in opts.monitor_kwargs:
            opts = opts.replace(
                monitor_kwargs={**opts.monitor_kwargs, "process_group": deepspeed_process_group()}
            )
        self.engine = engine
        self.step_axis = step_axis
        self.session = TrainingSession(opts)
        self._closed = False
        ds_monitor = getattr(engine, "monitor", None)
        if use_engine_monitor and ds_monitor is not None and getattr(ds_monitor, "enabled", False):
            self.session.add_sinks([DeepSpeedMonitorSink(ds_monitor, self._x_of)])
        self.session.attach(module)
        self._had_step = "step" in vars(engine)
        self._orig_step = engine.step
        orig = self._orig_step

        def step(*args: Any, **kwargs: Any) -> Any:
            before = engine.global_steps
            out = orig(*args, **kwargs)
            if engine.global_steps != before and not self._closed:
                self.on_optimizer_step(int(engine.global_steps))
            return out

        # An instance attribute: only this engine, and close() puts the method back.
        engine.step = step

    @property
    def log_every_n_steps(self) -> int:
        every = self.session.log_every_n_steps
        assert every is not None
        return int(every)

    def _x_of(self, event: LogEvent) -> int:
        if self.step_axis == "samples":
            return int(getattr(self.engine, "global_samples", event.step))
        return event.step

    # ------------------------------------------------------------------ state

    @property
    def detailed_log_path(self) -> Path:
        """``<log_dir>/moe_detailed.jsonl`` (written with ``save_detailed_logs=True``)."""
        return self.session.detailed_log_path

    # ------------------------------------------------------------------ cadence

    def on_optimizer_step(self, step: int) -> dict[str, float] | None:
        """Called by the wrapped ``engine.step`` after an optimizer step (``step`` =
        ``engine.global_steps``); ends the train window on log steps and returns its
        metrics, else None."""
        if self.session.is_log_step(step):
            return self.session.end_train_window(step)
        return None

    def log_eval(self) -> dict[str, float]:
        """End the eval window (forwards made in eval mode since the last call) and log it
        as ``moe/eval/...``; call on every rank."""
        return self.session.end_eval_window(int(self.engine.global_steps))

    def close(self) -> None:
        """Log the last partial train window (if steps are waiting), restore
        ``engine.step``, remove every hook, close the sinks this opened. Idempotent; call
        on every rank."""
        if self._closed:
            return
        self._closed = True
        try:
            step = int(self.engine.global_steps)
            if self.session.attached and self.session.has_unlogged_steps(step):
                self.session.end_train_window(step)
        finally:
            if self._had_step:
                self.engine.step = self._orig_step
            else:
                vars(self.engine).pop("step", None)
            self.session.close()


def attach(
    engine: Any,
    options: MoECallbackOptions | None = None,
    *,
    log_every_n_steps: int | None = None,
    step_axis: str = "samples",
    use_engine_monitor: bool = True,
    **overrides: Any,
) -> MoEDeepSpeedCallback:
    """Monitor every DeepSpeed MoE layer of ``engine`` and log into DeepSpeed's monitor.

    Call on every rank, after ``deepspeed.initialize``. The training loop is unchanged.

    Args:
        engine: the ``DeepSpeedEngine`` from ``deepspeed.initialize``.
        options: shared :class:`~moescope.integrations.options.MoECallbackOptions`
            (None = defaults); keyword ``overrides`` are its fields (``logger``,
            ``save_detailed_logs``, ``log_dir``, alert thresholds, ``monitor_kwargs``, ...).
        log_every_n_steps: optimizer steps per train window; None (default) follows the
            DeepSpeed config's ``steps_per_print`` (overrides ``options``).
        step_axis: x value written to DeepSpeed's monitor: ``"samples"``
            (``engine.global_samples``, like DeepSpeed's ``Train/Samples/*``) or
            ``"steps"`` (optimizer steps).
        use_engine_monitor: write into ``engine.monitor`` when the DeepSpeed config
            enables one (TensorBoard / W&B / CSV / Comet).

    Returns:
        A :class:`MoEDeepSpeedCallback`; call ``close()`` at the end (or use it as a
        context manager).

    Raises:
        TypeError: ``engine`` is not a DeepSpeed engine, or is a ``PipelineEngine``.
        moescope.errors.UnsupportedModelError: the model has no MoE layer moescope reads.
    """
    return MoEDeepSpeedCallback(
        engine,
        options,
        log_every_n_steps=log_every_n_steps,
        step_axis=step_axis,
        use_engine_monitor=use_engine_monitor,
        **overrides,
    )
