"""Logging destinations ("sinks") for the per-window :class:`LogEvent`.

Every sink implements ``write(event)`` (plus ``flush``/``close``); an event carries the
step, the snapshot, the flat metrics, the alerts and the figures of one window.
``resolve_loggers(logger)`` (in :mod:`moescope.sinks.resolve`) turns a user's ``logger=``
argument (wandb, a TensorBoard ``SummaryWriter``, mlflow, any ``.log(dict, step=)``
object, a Sink, or a list) into sinks. Optional packages are imported only when their
sink is built.
"""

from __future__ import annotations

from moescope.sinks.base import Sink
from moescope.sinks.console import ConsoleSink
from moescope.sinks.event import LogEvent
from moescope.sinks.figures import FigureDirSink
from moescope.sinks.jsonl import (
    SCHEMA_VERSION,
    JsonlSink,
    coactivation_of,
    load_snapshots,
    read_jsonl,
)
from moescope.sinks.mlflow_sink import MLflowSink
from moescope.sinks.resolve import CallableLoggerSink, LogMetricsSink, resolve_loggers
from moescope.sinks.tb_sink import TensorBoardSink
from moescope.sinks.wandb_sink import WandbSink

__all__ = [
    "SCHEMA_VERSION",
    "CallableLoggerSink",
    "ConsoleSink",
    "FigureDirSink",
    "JsonlSink",
    "LogEvent",
    "LogMetricsSink",
    "MLflowSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "coactivation_of",
    "load_snapshots",
    "read_jsonl",
    "resolve_loggers",
]
