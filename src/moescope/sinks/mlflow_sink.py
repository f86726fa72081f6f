"""MLflow sink: metrics per step, heatmap figures and alert text as run artifacts.

Logs to the active run of the fluent API (``mlflow.start_run()``; like ``mlflow.log_metrics``
it starts one when none is active), or to an explicit ``run_id`` through an
``MlflowClient``. Needs the ``mlflow`` extra.

Metric keys: MLflow allows letters, digits, ``_ - . / :`` and spaces, so moescope's keys
(``moe/model.layers.0.mlp/cv``) pass unchanged; any other character is replaced by ``_``.
NaN values are logged as NaN (MLflow stores them).

Artifacts (train events): figure ``moe/<layer>/usage_heatmap`` at step 1500 becomes
``moe/<layer>/usage_heatmap/step_00001500.png`` (``log_figure``); alerts become
``moe/alerts/step_00001500.txt``; with ``snapshots=True`` the snapshot JSON becomes
``moe/snapshots/step_00001500.json``.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from moescope._optional import require
from moescope.alerts import format_alert
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.sinks.event import LogEvent

__all__ = ["MLflowSink", "mlflow_key"]

_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")
_BATCH = 1000  # MLflow's log_batch limit on metrics per request


def mlflow_key(key: str) -> str:
    """``key`` with characters MLflow rejects replaced by ``_``."""
    return _BAD.sub("_", key)


class MLflowSink(Sink):
    """Logs to MLflow.

    Args:
        run_id: log to this run with an ``MlflowClient`` (None: the fluent API's active
            run, started on first use if none is active).
        tracking_uri: for the client when ``run_id`` is given (None: MLflow's default).
        snapshots: also store each snapshot's JSON as an artifact.

    Raises:
        MissingExtraError: ``mlflow`` is not installed (extra ``mlflow``).
    """

    wants_figures = True

    def __init__(
        self, run_id: str | None = None, tracking_uri: str | None = None, snapshots: bool = False
    ) -> None:
        self.mlflow = require("mlflow", "mlflow")
        self.run_id = run_id
        self.snapshots = snapshots
        self._client: Any = None
        if run_id is not None:
            self._client = self.mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)

    def write(self, event: LogEvent) -> None:
        step = event.step
        if event.metrics:
            self._metrics(event.metrics, step)
        if event.mode != "train":
            return
        name = f"step_{step:08d}"
        for key, fig in event.figures.items():
            self._call("log_figure", fig, f"{mlflow_key(key)}/{name}.png")
        if event.alerts:
            text = "\n".join(format_alert(a) for a in event.alerts) + "\n"
            self._call("log_text", text, f"moe/alerts/{name}.txt")
        if self.snapshots and event.snapshot is not None:
            self._call("log_text", event.snapshot.to_json(), f"moe/snapshots/{name}.json")

    def _call(self, method: str, obj: Any, artifact_file: str) -> None:
        """``mlflow.<method>(obj, file)`` or ``client.<method>(run_id, obj, file)``."""
        if self._client is None:
            getattr(self.mlflow, method)(obj, artifact_file)
        else:
            getattr(self._client, method)(self.run_id, obj, artifact_file)

    def _metrics(self, metrics: Any, step: int) -> None:
        clean = {mlflow_key(k): float(v) for k, v in metrics.items()}
        if self._client is None:
            self.mlflow.log_metrics(clean, step=step)
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in clean.items()]
        for i in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"
