"""Weights & Biases sink: scalars, per-layer table and histograms, images, alerts.

Accepts the ``wandb`` module (logs to ``wandb.run``, looked up at every call, so the sink
may be built before ``wandb.init``) or a ``wandb`` Run. Needs the ``wandb`` extra.

Steps: by default every call logs ``moe/step`` next to its values and
``define_metric("moe/*", step_metric="moe/step")`` makes it the x axis, *without* passing
``step=`` to ``run.log``. W&B requires ``step=`` to be monotonic across everything logged
to a run, so passing the training step would break (or be dropped) as soon as another
logger (e.g. transformers' ``WandbCallback``) logs to the same run at its own pace.
``use_wandb_step=True`` passes ``step=`` instead.

Keys per log step: the ``log_metrics`` keys; ``moe/layer_stats`` (a ``wandb.Table``, one
row per layer); ``moe/<layer>/expert_load`` (a ``wandb.Histogram`` over expert ids,
weighted by assignments; E <= 512); the ``log_images`` keys as ``wandb.Image``;
``moe/alerts`` (a ``wandb.Table``) and ``moe/num_alerts`` when alerts fire.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope._optional import require
from moescope.alerts import format_alert
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.alerts import Alert
    from moescope.stats.snapshot import Snapshot

__all__ = ["LAYER_TABLE_COLUMNS", "WandbSink"]

#: Columns of the per-layer ``moe/layer_stats`` table (LayerStats field names after "layer").
LAYER_TABLE_COLUMNS: tuple[str, ...] = (
    "layer", "num_experts", "top_k", "num_tokens", "cv", "max_over_mean",
    "unused_experts", "routing_entropy", "routing_entropy_norm", "load_entropy_norm",
    "top1_prob", "top1_margin", "aux_loss", "z_loss", "dropped_fraction",
)  # fmt: skip

_MAX_HIST_BINS = 512  # wandb.Histogram's limit


def _none_if_nan(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class WandbSink(Sink):
    """Logs to a W&B run.

    Args:
        run: the ``wandb`` module (uses ``wandb.run`` at each call), a ``wandb`` Run, or
            None (= the ``wandb`` module).
        prefix: key prefix for the table, histograms, alerts and the step metric.
        use_wandb_step: pass ``step=`` to ``run.log`` (see the module docstring).
        histograms: log the per-layer expert-load histograms.
        table: log the per-layer table.

    Raises:
        MissingExtraError: ``wandb`` is not installed (extra ``wandb``).
    """

    def __init__(
        self,
        run: Any | None = None,
        prefix: str = "moe",
        use_wandb_step: bool = False,
        histograms: bool = True,
        table: bool = True,
    ) -> None:
        self.wandb = require("wandb", "wandb")
        self._target = self.wandb if run is None else run
        self.prefix = prefix
        self.step_metric = f"{prefix}/step"
        self.use_wandb_step = use_wandb_step
        self.histograms = histograms
        self.table = table
        self._defined: set[int] = set()

    def _run(self) -> Any:
        if isinstance(self._target, ModuleType):
            run = getattr(self._target, "run", None)
            if run is None:
                raise RuntimeError(
                    "wandb.run is None: call wandb.init(...) before logging, or pass the "
                    "Run returned by wandb.init to the monitor (logger=run)."
                )
            return run
        return self._target

    def _log(self, data: dict[str, Any], step: int) -> None:
        run = self._run()
        if self.use_wandb_step:
            run.log(data, step=step)
            return
        if id(run) not in self._defined:
            run.define_metric(self.step_metric, hidden=True)
            run.define_metric(f"{self.prefix}/*", step_metric=self.step_metric)
            self._defined.add(id(run))
        run.log({**data, self.step_metric: step})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log({k: float(v) for k, v in metrics.items()}, step)

    def log_snapshot(self, snapshot: Snapshot, step: int) -> None:
        data: dict[str, Any] = {}
        if self.table:
            rows = [
                [name, *(_none_if_nan(_py(getattr(s, c))) for c in LAYER_TABLE_COLUMNS[1:])]
                for name, s in snapshot.layers.items()
            ]
            data[f"{self.prefix}/layer_stats"] = self.wandb.Table(
                columns=list(LAYER_TABLE_COLUMNS), data=rows
            )
        if self.histograms:
            for name, s in snapshot.layers.items():
                counts = np.asarray(s.usage_counts, dtype=np.float64)
                if counts.sum() <= 0 or counts.shape[0] > _MAX_HIST_BINS:
                    continue
                edges = np.arange(counts.shape[0] + 1, dtype=np.float64)
                data[f"{self.prefix}/{name}/expert_load"] = self.wandb.Histogram(
                    np_histogram=(counts, edges)
                )
        if data:
            self._log(data, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if images:
            self._log({k: self.wandb.Image(str(p)) for k, p in images.items()}, step)

    def log_alerts(self, alerts: list[Alert], step: int) -> None:
        if not alerts:
            return
        rows = [[a.step, a.level, a.layer, a.rule, _none_if_nan(a.value), a.message,
                 format_alert(a)] for a in alerts]
        table = self.wandb.Table(
            columns=["step", "level", "layer", "rule", "value", "message", "text"], data=rows
        )
        self._log({f"{self.prefix}/alerts": table,
                   f"{self.prefix}/num_alerts": len(alerts)}, step)

    def __repr__(self) -> str:
        target = "wandb" if isinstance(self._target, ModuleType) else type(self._target).__name__
        return f"WandbSink({target})"


def _py(v: Any) -> Any:
    """numpy scalars -> Python numbers (wandb.Table wants plain values)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float):
        return float(v)
    return v
