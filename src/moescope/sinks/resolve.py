"""Turn whatever the user passed as ``logger=`` into :class:`~moescope.sinks.base.Sink`
objects, and the two metrics-only adapters for generic logger objects.

Optional packages (wandb, tensorboard, mlflow) are imported only when a sink for them is
built; their objects are recognised by module name without importing them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from moescope.sinks.base import Sink
from moescope.sinks.mlflow_sink import MLflowSink
from moescope.sinks.tb_sink import TensorBoardSink
from moescope.sinks.wandb_sink import WandbSink

if TYPE_CHECKING:
    from moescope.sinks.event import LogEvent

__all__ = ["CallableLoggerSink", "LogMetricsSink", "resolve_loggers"]


class CallableLoggerSink(Sink):
    """Metrics to any object with a ``.log(dict, step=...)`` method.

    Covers custom loggers and e.g. ``accelerate``'s ``Accelerator.log(values, step=...)``.
    Only ``event.metrics`` is sent (train and eval events alike).

    Args:
        logger: the object; ``logger.log(metrics, step=step)`` is called per event.
        finite_only: drop NaN/inf values first (some loggers reject them).
    """

    def __init__(self, logger: Any, finite_only: bool = False) -> None:
        if not callable(getattr(logger, "log", None)):
            raise TypeError(f"{type(logger).__name__} has no callable .log(dict, step=...) method.")
        self.logger = logger
        self.finite_only = finite_only

    def write(self, event: LogEvent) -> None:
        m = dict(event.metrics)
        if self.finite_only:
            m = {k: v for k, v in m.items() if math.isfinite(v)}
        if m:
            self.logger.log(m, step=event.step)

    def flush(self) -> None:
        fl = getattr(self.logger, "flush", None)
        if callable(fl):
            fl()

    def __repr__(self) -> str:
        return f"CallableLoggerSink({type(self.logger).__name__})"


class LogMetricsSink(Sink):
    """Metrics to any object with ``.log_metrics(dict, step=...)``: Lightning loggers
    (``TensorBoardLogger``, ``WandbLogger``, ``CSVLogger``, ...) and look-alikes.

    Args:
        logger: the object; ``logger.log_metrics(metrics, step=step)`` per event.
    """

    def __init__(self, logger: Any) -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(
                f"{type(logger).__name__} has no callable .log_metrics(dict, step=...) method."
            )
        self.logger = logger

    def write(self, event: LogEvent) -> None:
        if event.metrics:
            self.logger.log_metrics(dict(event.metrics), step=event.step)

    def flush(self) -> None:
        save = getattr(self.logger, "save", None)  # Lightning's Logger.save() flushes
        if callable(save):
            save()

    def __repr__(self) -> str:
        return f"LogMetricsSink({type(self.logger).__name__})"


_ACCEPTED = (
    "None, a moescope Sink, the wandb module (uses wandb.run) or a wandb Run, a "
    "torch.utils.tensorboard / tensorboardX SummaryWriter, the mlflow module, any object "
    "with a .log(dict, step=...) method, any object with a .log_metrics(dict, step=...) "
    "method (Lightning loggers), or a list/tuple of these"
)


def _root_module(obj: Any) -> str:
    """Top-level package an object's class (or a module itself) comes from."""
    if isinstance(obj, ModuleType):
        name = obj.__name__
    else:
        name = type(obj).__module__ or ""
    return name.split(".", 1)[0]


def _is_summary_writer(obj: Any) -> bool:
    root = _root_module(obj)
    mod = type(obj).__module__ or ""
    if root == "tensorboardX" or mod.startswith("torch.utils.tensorboard"):
        return True
    # Duck typing for wrappers (e.g. Lightning's experiment objects) around a writer.
    return all(
        callable(getattr(obj, m, None)) for m in ("add_scalar", "add_histogram", "add_image")
    )


def resolve_loggers(logger: Any) -> list[Sink]:
    """Turn ``logger=`` arguments into a list of sinks.

    Accepted: None (no sink), a :class:`Sink` (as is), the ``wandb`` module (logs to
    ``wandb.run`` at each call) or a ``wandb`` Run, a ``torch.utils.tensorboard`` or
    ``tensorboardX`` ``SummaryWriter`` (the user's writer: flushed, never closed), the
    ``mlflow`` module (its active run), any object with ``.log(dict, step=...)``
    (metrics only), any object with ``.log_metrics(dict, step=...)`` such as a Lightning
    logger (metrics only; pass ``logger.experiment`` instead to get histograms and
    images from a TensorBoard writer or W&B run), or a list/tuple of these (nested lists
    are flattened).

    Raises:
        TypeError: for anything else, naming what is accepted.
    """
    if logger is None:
        return []
    if isinstance(logger, Sink):
        return [logger]
    if isinstance(logger, (list, tuple)):
        out: list[Sink] = []
        for item in logger:
            out.extend(resolve_loggers(item))
        return out
    root = _root_module(logger)
    if root == "wandb":
        return [WandbSink(logger)]
    if root == "mlflow" and isinstance(logger, ModuleType):
        return [MLflowSink()]
    if _is_summary_writer(logger):
        return [TensorBoardSink(writer=logger)]
    if isinstance(logger, (str, bytes, Mapping)):
        pass  # strings and dicts have no logging methods worth duck-typing
    elif callable(getattr(logger, "log", None)):
        return [CallableLoggerSink(logger)]
    elif callable(getattr(logger, "log_metrics", None)):
        return [LogMetricsSink(logger)]
    raise TypeError(
        f"Cannot log to {type(logger).__module__}.{type(logger).__qualname__} "
        f"({logger!r:.80}). logger= accepts {_ACCEPTED}. For files use "
        "moescope.sinks.JsonlSink(path) or TensorBoardSink(log_dir=...)."
    )
