"""Weights & Biases sink: scalars, per-layer table and histograms, images, alerts.

Accepts the ``wandb`` module (logs to ``wandb.run``, looked up at every call, so the sink
may be built before ``wandb.init``) or a ``wandb`` Run. Needs the ``wandb`` extra.

Steps: by default every call logs ``moe/step`` next to its values and
``define_metric("moe/*", step_metric="moe/step")`` makes it the x axis, *without* passing
``step=`` to ``run.log``. W&B requires ``step=`` to be monotonic across everything logged
to a run, so passing the training step would break (or be dropped) as soon as another
logger (e.g. transformers' ``WandbCallback``) logs to the same run at its own pace.
``use_wandb_step=True`` passes ``step=`` instead.

Keys per event, all in ONE ``run.log`` call: the ``event.metrics`` keys; for train events
also ``moe/layer_stats`` (a ``wandb.Table``, one row per layer); ``moe/<layer>/expert_load``
(a ``wandb.Histogram`` over expert ids, weighted by assignments; E <= 512); the
``event.figures`` keys as ``wandb.Image(figure)``; ``moe/alerts`` (a ``wandb.Table``) and
``moe/num_alerts`` when alerts fire.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope._json import json_safe
from moescope._optional import require
from moescope.alerts import format_alert
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.alerts import Alert
    from moescope.sinks.event import LogEvent
    from moescope.stats.snapshot import Snapshot

__all__ = ["LAYER_TABLE_COLUMNS", "WandbSink"]

#: Columns of the per-layer ``moe/layer_stats`` table (LayerStats field names after "layer").
LAYER_TABLE_COLUMNS: tuple[str, ...] = (
    "layer", "num_experts", "top_k", "num_tokens", "cv", "max_over_mean",
    "unused_experts", "routing_entropy", "routing_entropy_norm", "load_entropy_norm",
    "top1_prob", "top1_margin", "aux_loss", "z_loss", "dropped_fraction",
)  # fmt: skip

_MAX_HIST_BINS = 512  # wandb.Histogram's limit


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

    wants_figures = True

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

    def write(self, event: LogEvent) -> None:
        data: dict[str, Any] = {k: float(v) for k, v in event.metrics.items()}
        if event.mode == "train":
            if event.snapshot is not None:
                data.update(self._snapshot_data(event.snapshot))
            if event.figures:
                # wandb.Image(fig) compares its argument with matplotlib.pyplot, which
                # must therefore be imported (torch's add_figure imports it as well).
                import matplotlib.pyplot  # noqa: F401
            for key, fig in event.figures.items():
                data[key] = self.wandb.Image(fig)
            data.update(self._alert_data(list(event.alerts)))
        if data:
            self._log(data, event.step)

    def _snapshot_data(self, snapshot: Snapshot) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.table:
            rows = [
                [name, *(json_safe(_py(getattr(s, c))) for c in LAYER_TABLE_COLUMNS[1:])]
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
        return data

    def _alert_data(self, alerts: list[Alert]) -> dict[str, Any]:
        if not alerts:
            return {}
        rows = [
            [a.step, a.level, a.layer, a.rule, json_safe(a.value), a.message, format_alert(a)]
            for a in alerts
        ]
        table = self.wandb.Table(
            columns=["step", "level", "layer", "rule", "value", "message", "text"], data=rows
        )
        return {f"{self.prefix}/alerts": table, f"{self.prefix}/num_alerts": len(alerts)}

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
