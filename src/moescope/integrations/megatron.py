"""Megatron-core training: :class:`MoEMegatronCallback` (no fork of Megatron's loop).

::

    from moescope.integrations.megatron import MoEMegatronCallback

    moe = MoEMegatronCallback(model, log_interval=args.log_interval,
                             writer=tb_writer, wandb_writer=wandb_run)
    for iteration in range(start, train_iters):
        train_step(...)                 # Megatron's forward_backward_func + optimizer step
        moe.on_step_end(iteration + 1)  # every log_interval iterations: snapshot and log
    moe.close()

``MoEMonitor(model)`` alone also finds every ``MoELayer`` (``moescope.capture.megatron``);
this front end adds what a Megatron job needs:

- **Reduction over the right ranks** (:func:`megatron_process_group`): the ranks of one
  pipeline stage whose routers see distinct tokens are summed (data-, context- and
  expert-parallel ranks; tensor-parallel ranks too under sequence parallelism, where
  each routes its own slice of the sequence); tensor-parallel replicas without sequence
  parallelism route the same tokens and count once. Pipeline stages hold different
  layers: the monitor gathers them over the pipeline group (:func:`megatron_stage_group`,
  ``MoEMonitor(stage_group=...)``), so every rank's snapshot has every layer.
- **Megatron's writers at Megatron's interval.** The train window ends every
  ``log_interval`` iterations (Megatron logs at ``iteration % log_interval == 0``); the
  metrics go to the TensorBoard ``SummaryWriter`` and the W&B writer Megatron logs to, as
  ``add_scalar(key, value, iteration)`` / ``log({key: value}, iteration)``, like Megatron's
  own ``track_moe_metrics``. Keys are moescope's (``moe/avg_expert_cv``,
  ``moe/decoder.layers.<i>.mlp/<metric>``); ``<i>`` is the 0-based global layer index,
  the ``i`` of Megatron's ``moe/<loss>_layer_<i>``. Megatron creates its writers on the
  last rank, so that rank writes (``writer_rank``).
- Alerts, ``on_alert``, ``stop_on_alert`` and the JSONL log, as with the Trainer
  (:class:`~moescope.integrations.core.TrainingSession`).

When ``megatron.training`` is importable (a Megatron-LM checkout), its
``get_tensorboard_writer()``, ``get_wandb_writer()`` and ``get_args().log_interval`` are
the defaults; megatron-core's pip package has no training loop, so pass them there.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from moescope.integrations.core import SessionFrontEnd, TrainingSession
from moescope.integrations.options import MoECallbackOptions
from moescope.sinks import resolve_loggers

__all__ = ["MoEMegatronCallback", "megatron_process_group", "megatron_stage_group"]

_AUTO: Any = object()


def _moe_layers(model: Any) -> list[nn.Module]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [
        m
        for c in chunks
        for m in c.modules()
        if type(m).__name__ == "MoELayer" and type(m).__module__.startswith("megatron.")
    ]


def megatron_process_group(model: Any = None, sequence_parallel: bool | None = None) -> Any:
    """The process group a Megatron MoE monitor reduces over: the ranks of THIS pipeline
    stage whose routers see distinct tokens.

    Args:
        model: the Megatron model (or its list of virtual-pipeline chunks); its first
            ``MoELayer`` gives the config and the router's process groups. None: read
            ``megatron.core.parallel_state`` only.
        sequence_parallel: override the config's ``sequence_parallel``.

    Returns:
        The tensor x data x context parallel group of this stage (Megatron's
        ``tp_dp_cp``, which also holds the expert-parallel ranks) when tensor
        parallelism is 1 or sequence parallelism is on (each tensor-parallel rank routes
        its own slice of the sequence); else the data x context parallel group (the
        tensor-parallel replicas route the same tokens: counted once). A group of one
        rank reduces nothing; it is still returned, because ``process_group=None``
        means "the whole world", which would add the layers of different pipeline
        stages together.

    Raises:
        RuntimeError: megatron-core is not installed or its parallel state is not
            initialised (``parallel_state.initialize_model_parallel`` first).
    """
    try:
        ps = importlib.import_module("megatron.core.parallel_state")
    except ImportError as err:  # pragma: no cover - only without megatron-core
        raise RuntimeError(
            "megatron_process_group needs megatron-core: pip install megatron-core"
        ) from err
    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "Megatron's parallel state is not initialised: call "
            "megatron.core.parallel_state.initialize_model_parallel(...) before building "
            "the monitor"
        )
    layers = _moe_layers(model) if model is not None else []
    config = layers[0].config if layers else None
    if sequence_parallel is None:
        sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or sequence_parallel:
        router = getattr(layers[0], "router", None) if layers else None
        group = getattr(router, "tp_dp_cp_group", None)
        if group is None:
            group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    else:
        group = ps.get_data_parallel_group(with_context_parallel=True)
    return group


def megatron_stage_group() -> Any:
    """Megatron's pipeline-parallel group (one rank per stage), over which a monitor
    gathers the layers of the other stages; None without pipeline parallelism."""
    ps = importlib.import_module("megatron.core.parallel_state")
    if not ps.model_parallel_is_initialized():
        return None
    if ps.get_pipeline_model_parallel_world_size() <= 1:
        return None
    return ps.get_pipeline_model_parallel_group()


def _training_default(name: str) -> Any:
    """``megatron.training``'s writer/args getter result, or None without Megatron-LM."""
    try:
        mt = importlib.import_module("megatron.training")
    except ImportError:
        return None
    try:
        if name == "log_interval":
            return getattr(mt.get_args(), "log_interval", None)
        return getattr(mt, name)()
    except Exception:  # not initialised (no args parsed): no default
        return None


class MoEMegatronCallback(SessionFrontEnd):
    """MoE monitoring of a Megatron-core model, logged to Megatron's own writers.

    Args:
        model: the model (``GPTModel``, possibly wrapped by DDP / Float16Module) or the
            list of virtual-pipeline chunks Megatron's ``get_model`` returns.
        options: a :class:`~moescope.integrations.options.MoECallbackOptions` (alert
            thresholds, ``save_detailed_logs``, ``log_dir``, ``per_layer``, ...; default
            its defaults with ``log_to_console=False``: Megatron prints its own log);
            keywords override its fields.
        log_interval: iterations per window (Megatron's ``--log-interval``); default
            ``megatron.training.get_args().log_interval`` when importable, else the
            options' ``log_every_n_steps``.
        writer: a TensorBoard ``SummaryWriter`` (default
            ``megatron.training.get_tensorboard_writer()`` when importable); None: none.
        wandb_writer: the ``wandb`` module or a run (default ``get_wandb_writer()``).
        process_group: the group to reduce over (default :func:`megatron_process_group`).
        stage_group: the group to gather pipeline stages over (default
            :func:`megatron_stage_group`); None: each rank reports its own stage's layers.
        writer_rank: the global rank that writes (default: the last rank, where
            Megatron keeps its writers; 0 without torch.distributed).

    Every rank must call :meth:`on_step_end` at the same iterations (the snapshot is a
    collective over ``process_group`` and ``stage_group``).
    """

    def __init__(
        self,
        model: Any,
        options: MoECallbackOptions | None = None,
        *,
        log_interval: int | None = None,
        writer: Any = _AUTO,
        wandb_writer: Any = _AUTO,
        process_group: Any = _AUTO,
        stage_group: Any = _AUTO,
        writer_rank: int | None = None,
        **overrides: Any,
    ) -> None:
        root: nn.Module = nn.ModuleList(model) if isinstance(model, (list, tuple)) else model
        if not isinstance(root, nn.Module):
            raise TypeError(
                "MoEMegatronCallback needs the Megatron model (a torch.nn.Module or the list "
                f"of model chunks get_model returns), got {type(model).__name__}"
            )
        if log_interval is None:
            log_interval = _training_default("log_interval")
        if writer is _AUTO:
            writer = _training_default("get_tensorboard_writer")
        if wandb_writer is _AUTO:
            wandb_writer = _training_default("get_wandb_writer")
        if process_group is _AUTO:
            process_group = megatron_process_group(model)
        if stage_group is _AUTO:
            stage_group = megatron_stage_group()
        groups = {"process_group": process_group, "stage_group": stage_group}
        base = options if options is not None else MoECallbackOptions(log_to_console=False)
        kw = dict(overrides)
        kw["monitor_kwargs"] = {**dict(kw.get("monitor_kwargs", base.monitor_kwargs)), **groups}
        if log_interval is not None:
            kw["log_every_n_steps"] = int(log_interval)
        session = TrainingSession(base, **kw)
        if session.log_every_n_steps is None:
            raise ValueError("log_interval must be an int >= 1 (Megatron's --log-interval)")
        self.session = session
        self.model = root
        self.iteration = 0
        self._writer_rank = writer_rank
        self._closed = False
        session.add_sinks(resolve_loggers([w for w in (writer, wandb_writer) if w is not None]))
        session.attach(root)

    def _writes(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return True
        rank = self._writer_rank if self._writer_rank is not None else dist.get_world_size() - 1
        return dist.get_rank() == rank

    def on_step_end(self, iteration: int) -> dict[str, float] | None:
        """Call on every rank after each training iteration with Megatron's 1-based
        ``iteration`` count (what its ``training_log`` receives). Ends the window, logs
        and checks alerts when ``iteration % log_interval == 0``; returns the metrics
        then, else None."""
        if self._closed:
            raise RuntimeError("on_step_end() after close(): create a new MoEMegatronCallback")
        self.iteration = int(iteration)
        if self.session.is_log_step(self.iteration):
            return self.session.end_train_window(self.iteration, rank_zero=self._writes())
        return None

    def log_eval(self) -> dict[str, float]:
        """End the eval window (forwards of modules in eval mode, e.g. Megatron's
        ``evaluate``) and log it as ``moe/eval/...`` (call on every rank)."""
        return self.session.end_eval_window(self.iteration, rank_zero=self._writes())

    def close(self) -> None:
        """Log the last partial window, remove every hook, flush the writers (they stay
        open: they are Megatron's). Call on every rank. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.session.attached and self.session.has_unlogged_steps(self.iteration):
                self.session.end_train_window(self.iteration, rank_zero=self._writes())
        finally:
            self.session.close()
