"""Logging destinations ("sinks") for snapshots, metrics, alerts and images.

``resolve_loggers(logger)`` turns a user's ``logger=`` argument (wandb, a TensorBoard
``SummaryWriter``, mlflow, any ``.log(dict, step=)`` object, a Sink, or a list) into
:class:`Sink` objects. Optional packages are imported only when their sink is built.
"""

from __future__ import annotations

from moescope.sinks.base import CallableLoggerSink, LogMetricsSink, Sink, resolve_loggers
from moescope.sinks.console import ConsoleSink
from moescope.sinks.jsonl import JsonlSink, load_snapshots, read_jsonl
from moescope.sinks.mlflow_sink import MLflowSink
from moescope.sinks.tb_sink import TensorBoardSink
from moescope.sinks.wandb_sink import WandbSink

__all__ = [
    "CallableLoggerSink",
    "ConsoleSink",
    "JsonlSink",
    "LogMetricsSink",
    "MLflowSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "load_snapshots",
    "read_jsonl",
    "resolve_loggers",
]
