"""torchtitan: MoE metrics in torchtitan's own metrics logging, at its ``metrics.log_freq``.

torchtitan's ``Trainer.train_step`` calls ``trainer.metrics_processor.log(step, ...)`` on
every rank at each log step (step 1 and every ``metrics.log_freq`` steps); the processor's
logger writes TensorBoard / W&B on the metrics rank. :class:`MoETorchtitanCallback` wraps
that one bound method of the processor *instance* (no fork of the train loop, no change to
the model code): at each call it ends moescope's train window on every rank (the snapshot
is a collective) and adds the ``moe/...`` keys to the ``extra_metrics`` torchtitan logs,
so they land in the same TensorBoard run / W&B run as the loss::

    trainer = config.build()                      # torchtitan.trainer.Trainer
    cb = MoETorchtitanCallback.attach_to_trainer(trainer, save_detailed_logs=True)
    trainer.train()
    cb.close()

``metrics_processor.log_validation`` is wrapped the same way (the eval window, as
``moe/eval/...``). Alerts, the console table and the JSONL log (``<log_dir>/
moe_detailed.jsonl``, global rank 0) work as with every other integration
(:class:`~moescope.integrations.core.TrainingSession`). A hand-written loop that uses
torchtitan's parts passes them directly: ``MoETorchtitanCallback(model_parts,
metrics_processor, parallel_dims, pp_schedule=...)``. Under pipeline parallelism the
forward each stage runs once to infer shapes (at its first step) is not counted.

Ranks (:func:`moescope_process_group`): counts are summed over the ranks that see
different tokens of the same layers (torchtitan's ``loss`` mesh: data-parallel replicate,
FSDP shard and context-parallel ranks; expert-parallel ranks are among them; plus the
tensor-parallel ranks when expert parallelism shards tokens over them), exactly the ranks
torchtitan sums its own ``tokens_per_expert_E`` over for the bias update. Tensor-parallel
replicas (TP without EP) see the same tokens and are counted once. Pipeline stages hold
different layers: :func:`moescope_stage_group` is the group ``MoEMonitor(stage_group=...)``
gathers them over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moescope.integrations.core import SessionFrontEnd, TrainingSession, finite_only
from moescope.integrations.options import MoECallbackOptions

__all__ = ["MoETorchtitanCallback", "moescope_process_group", "moescope_stage_group"]


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def moescope_process_group(parallel_dims: Any) -> Any:
    """The process group moescope sums counts over in a torchtitan run, or False (no
    reduction: one process, or every other rank holds a replica of this one's tokens).

    ``parallel_dims``: torchtitan's ``ParallelDims`` (``trainer.parallel_dims``), its
    meshes built. The group is the one torchtitan's aux-loss-free bias update sums
    ``tokens_per_expert_E`` over: the ``loss`` mesh (dp_replicate x dp_shard x cp, which
    contains the expert-parallel ranks) and, when expert parallelism is on with
    tp > 1 (MoE then shards tokens over the TP axis), the TP ranks as well. Call it on
    every rank: that last group is created by flattening mesh axes (a collective).
    """
    if not _dist_ready():
        return False
    pd = parallel_dims
    if getattr(pd, "ep_enabled", False) and getattr(pd, "tp", 1) > 1:
        dims = [d for d, n in (("batch", pd.dp_replicate * pd.dp_shard), ("cp", pd.cp)) if n > 1]
        dims.append("tp")
        mesh = pd.get_mesh(dims if len(dims) > 1 else dims[0])
        if len(dims) > 1:
            # One group over several mesh axes (DeviceMesh's own flattening, as torchtitan
            # builds its ``loss`` mesh).
            mesh = mesh._flatten("moescope_tokens")
        return mesh.get_group()
    loss = pd.get_optional_mesh("loss")
    if loss is None or loss.size() <= 1:
        return False
    return loss.get_group()


def moescope_stage_group(parallel_dims: Any) -> Any:
    """The pipeline-parallel group (ranks holding different layers), or None without
    pipeline parallelism: pass it as ``MoEMonitor(stage_group=...)``."""
    if not _dist_ready() or getattr(parallel_dims, "pp", 1) <= 1:
        return None
    return parallel_dims.get_mesh("pp").get_group()


def _monitored(model_parts: Any) -> nn.Module:
    if isinstance(model_parts, nn.Module):
        return model_parts
    parts = list(model_parts)
    if not parts or not all(isinstance(p, nn.Module) for p in parts):
        raise TypeError(
            "MoETorchtitanCallback needs the model parts (trainer.model_parts: a list of "
            f"torch.nn.Module), got {model_parts!r}"
        )
    # Several pipeline stages on one rank (virtual stages): one container, paths "0.layers...".
    return parts[0] if len(parts) == 1 else nn.ModuleList(parts)


class MoETorchtitanCallback(SessionFrontEnd):
    """MoE monitoring of a torchtitan run, logged through its ``MetricsProcessor``.

    Args:
        model_parts: ``trainer.model_parts`` (a list of modules, one per local pipeline
            stage) or one module; every torchtitan ``MoE`` inside is monitored.
        metrics_processor: ``trainer.metrics_processor``; its ``log`` and
            ``log_validation`` are wrapped on this instance (undone by :meth:`close`).
            None: no wrapping, call :meth:`on_log_step` yourself.
        parallel_dims: ``trainer.parallel_dims`` (None: one process). Chooses the group
            counts are reduced over (:func:`moescope_process_group`) and, with pipeline
            parallelism, the stage group; ``monitor_kwargs`` given explicitly win.
        session: a ready :class:`~moescope.integrations.core.TrainingSession` or
            :class:`~moescope.integrations.options.MoECallbackOptions`; or the options
            as keywords (``save_detailed_logs=True``, ``log_dir=...``, thresholds, ...).
            ``log_every_n_steps`` must stay None: windows end at torchtitan's log steps
            (``metrics.log_freq``).
        pp_schedule: ``trainer.pp_schedule`` with pipeline parallelism: the forward each
            stage runs once at its first step to infer shapes is not counted.

    Build it on every rank (choosing the groups may create one, a collective), after the
    weights are initialised or loaded.

    Attributes:
        session: the shared TrainingSession (``session.monitor`` is the MoEMonitor).
        last_metrics: the ``moe/...`` keys added at the last log step.
    """

    def __init__(
        self,
        model_parts: Any,
        metrics_processor: Any | None = None,
        parallel_dims: Any | None = None,
        session: TrainingSession | MoECallbackOptions | None = None,
        pp_schedule: Any | None = None,
        **overrides: Any,
    ) -> None:
        overrides.setdefault("log_every_n_steps", None)
        if not isinstance(session, TrainingSession):
            if isinstance(session, MoECallbackOptions):
                session = session.replace(**overrides) if overrides else session
                session = TrainingSession(session)
            else:
                session = TrainingSession(session, **overrides)
        elif any(k != "log_every_n_steps" for k in overrides):
            raise TypeError("pass options either as a TrainingSession or as keywords, not both")
        if session.log_every_n_steps is not None:
            raise ValueError(
                "MoETorchtitanCallback logs at torchtitan's own log steps: leave "
                "log_every_n_steps=None and set torchtitan's metrics.log_freq instead "
                f"(got log_every_n_steps={session.log_every_n_steps})"
            )
        if parallel_dims is not None and session.monitor is None:
            kw = dict(session.options.monitor_kwargs)
            kw.setdefault("process_group", moescope_process_group(parallel_dims))
            stage = moescope_stage_group(parallel_dims)
            if stage is not None:
                kw.setdefault("stage_group", stage)
            session.options = session.options.replace(monitor_kwargs=kw)
        self.session = session
        self.model = _monitored(model_parts)
        self.metrics_processor = metrics_processor
        self._patched: dict[str, Any] = {}
        self._stages: list[Any] = []
        self._closed = False
        session.attach(self.model)
        if metrics_processor is not None:
            self._wrap(metrics_processor)
        if pp_schedule is not None:
            self._skip_shape_inference(pp_schedule)

    @classmethod
    def attach_to_trainer(
        cls,
        trainer: Any,
        session: TrainingSession | MoECallbackOptions | None = None,
        **overrides: Any,
    ) -> MoETorchtitanCallback:
        """Monitor a built ``torchtitan.trainer.Trainer`` (after ``config.build()``, before
        ``trainer.train()``): its ``model_parts``, ``metrics_processor`` and
        ``parallel_dims``. ``log_dir`` defaults to ``<trainer.config.dump_folder>/moe_logs``."""
        dump = getattr(getattr(trainer, "config", None), "dump_folder", None)
        if dump is not None and session is None:
            overrides.setdefault("log_dir", Path(dump) / "moe_logs")
        return cls(
            trainer.model_parts,
            trainer.metrics_processor,
            getattr(trainer, "parallel_dims", None),
            session,
            pp_schedule=getattr(trainer, "pp_schedule", None),
            **overrides,
        )

    # ------------------------------------------------------------------ hooks

    def _wrap(self, processor: Any) -> None:
        log = processor.log
        log_validation = getattr(processor, "log_validation", None)

        def moe_log(
            step: int,
            global_avg_loss: float,
            global_max_loss: float,
            grad_norm: float,
            extra_metrics: dict[str, Any] | None = None,
        ) -> Any:
            extra = dict(extra_metrics or {})
            extra.update(self.on_log_step(step))
            return log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

        processor.log = moe_log
        self._patched["log"] = log
        if log_validation is not None:

            def moe_log_validation(
                loss: float, step: int, extra_metrics: dict[str, Any] | None = None
            ) -> Any:
                extra = dict(extra_metrics or {})
                extra.update(self.on_validation(step))
                return log_validation(loss, step, extra_metrics=extra)

            processor.log_validation = moe_log_validation
            self._patched["log_validation"] = log_validation

    def _skip_shape_inference(self, schedule: Any) -> None:
        # torch.distributed.pipelining runs each stage's module once, at its first step, to
        # infer shapes (the first stage on the first real micro-batch, later stages on
        # uninitialised tensors of the right shape). That forward trains nothing: not counted.
        stages = getattr(schedule, "_stages", None) or [getattr(schedule, "_stage", None)]
        for stage in stages:
            infer = getattr(stage, "_forward_metadata_inference", None)
            if infer is None:
                continue

            def uncounted(*args: Any, _infer: Any = infer, **kwargs: Any) -> Any:
                mon = self.session.monitor
                if mon is None or self._closed:
                    return _infer(*args, **kwargs)
                mon.ctx.counting = False
                try:
                    return _infer(*args, **kwargs)
                finally:
                    mon.ctx.counting = True

            stage._forward_metadata_inference = uncounted
            self._stages.append(stage)

    def on_log_step(self, step: int) -> dict[str, float]:
        """End the train window at ``step`` (every rank: the snapshot reduces across
        ranks), publish it to moescope's sinks and alerts (global rank 0), and return its
        finite ``moe/...`` scalars for torchtitan's logger."""
        if self._closed:
            return {}
        metrics = self.session.end_train_window(int(step))
        return finite_only(metrics)

    def on_validation(self, step: int) -> dict[str, float]:
        """End the eval window (forwards torchtitan's validator ran in eval mode) and return
        its finite ``moe/eval/...`` scalars."""
        if self._closed:
            return {}
        metrics = self.session.end_eval_window(int(step))
        return finite_only(metrics)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Restore the processor's methods, remove every hook, close moescope's sinks
        (idempotent). Steps after the last log step are not logged: torchtitan logs
        the last step only when it is a log step, and so does this callback."""
        if self._closed:
            return
        self._closed = True
        for name in self._patched:
            # The wrappers were set on the instance: deleting them uncovers the methods.
            self.metrics_processor.__dict__.pop(name, None)
        self._patched.clear()
        for stage in self._stages:
            stage.__dict__.pop("_forward_metadata_inference", None)
        self._stages.clear()
        self.session.close()
