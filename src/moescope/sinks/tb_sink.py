"""TensorBoard sink: scalars, per-layer usage histograms, heatmap figures, alert text.

Written with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` extra)
when given a log dir, or with the user's own writer (torch's or tensorboardX's), which is
then flushed but never closed.

Tags per event (``<layer>`` = module path):

- every key of ``event.metrics`` as a scalar (``moe/avg_expert_cv``, ``moe/<layer>/cv``,
  ``moe/eval/...`` for eval events);
- ``moe/<layer>/expert_load``: histogram of expert ids weighted by their assignments, one
  bucket per expert (the "which expert" distribution; TensorBoard's distribution view
  then shows its drift over steps);
- ``moe/<layer>/usage_fraction``: histogram of the E usage fractions (the "how uneven"
  distribution: a narrow peak at 1/E is balanced);
- every ``event.figures`` key as an image (``add_figure``: the figure is rendered on its
  Agg canvas, never closed: the event's builder owns it);
- ``moe/alerts``: the alert lines as text.

Histograms, figures and alerts come from train events only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope._optional import require
from moescope.alerts import format_alert
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.alerts import Alert
    from moescope.sinks.event import LogEvent
    from moescope.stats.snapshot import Snapshot

__all__ = ["TensorBoardSink"]


class TensorBoardSink(Sink):
    """Logs to TensorBoard event files.

    Args:
        log_dir: folder for a new ``SummaryWriter`` (owned: closed by :meth:`close`).
        writer: an existing ``SummaryWriter`` (torch or tensorboardX) to use instead;
            give exactly one of ``log_dir`` and ``writer``.
        histograms: write the per-layer histograms of each train snapshot.
        max_queue, flush_secs: passed to a writer created here.

    Raises:
        MissingExtraError: the ``tensorboard`` package is missing (extra ``tensorboard``).
    """

    wants_figures = True

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any | None = None,
        histograms: bool = True,
        max_queue: int = 100,
        flush_secs: int = 30,
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError(
                "TensorBoardSink needs exactly one of log_dir= (a folder for a new "
                "SummaryWriter) or writer= (your SummaryWriter)."
            )
        if writer is None:
            assert log_dir is not None  # exactly one of the two (checked above)
            require("tensorboard", "tensorboard")
            tb = require("torch.utils.tensorboard", "tensorboard")
            writer = tb.SummaryWriter(
                log_dir=os.fspath(log_dir), max_queue=max_queue, flush_secs=flush_secs
            )
            self._owned = True
        else:
            self._owned = False
        self.writer = writer
        self.histograms = histograms

    def write(self, event: LogEvent) -> None:
        step = event.step
        for k, v in event.metrics.items():
            self.writer.add_scalar(k, float(v), global_step=step)
        if event.mode != "train":
            return
        if event.snapshot is not None and self.histograms:
            self._histograms(event.snapshot, step)
        for key, fig in event.figures.items():
            self.writer.add_figure(key, fig, global_step=step, close=False)
        self._alerts(list(event.alerts), step)

    def _histograms(self, snapshot: Snapshot, step: int) -> None:
        for name, s in snapshot.layers.items():
            counts = np.asarray(s.usage_counts, dtype=np.float64)
            total = float(counts.sum())
            if total <= 0:
                continue  # no token in the window: an empty histogram is an error in TB
            ids = np.arange(counts.shape[0], dtype=np.float64)
            nz = np.nonzero(counts)[0]
            self.writer.add_histogram_raw(
                f"moe/{name}/expert_load",
                min=float(nz.min()),
                max=float(nz.max()),
                num=total,
                sum=float((ids * counts).sum()),
                sum_squares=float((ids * ids * counts).sum()),
                bucket_limits=(ids + 0.5).tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )
            self.writer.add_histogram(
                f"moe/{name}/usage_fraction",
                np.asarray(s.usage_fraction, dtype=np.float64),
                global_step=step,
            )

    def _alerts(self, alerts: list[Alert], step: int) -> None:
        if alerts:
            # Two trailing spaces: a Markdown line break in TensorBoard's text view.
            text = "  \n".join(format_alert(a) for a in alerts)
            self.writer.add_text("moe/alerts", text, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()

    def __repr__(self) -> str:
        return f"TensorBoardSink(writer={type(self.writer).__name__}, owned={self._owned})"
