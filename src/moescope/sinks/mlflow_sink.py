"""MLflow sink: metrics per step, heatmap PNGs and alert text as run artifacts.

Logs to the active run of the fluent API (``mlflow.start_run()``; like ``mlflow.log_metrics``
it starts one when none is active), or to an explicit ``run_id`` through an
``MlflowClient``. Needs the ``mlflow`` extra.

Metric keys: MLflow allows letters, digits, ``_ - . / :`` and spaces, so moescope's keys
(``moe/model.layers.0.mlp/cv``) pass unchanged; any other character is replaced by ``_``.
NaN values are logged as NaN (MLflow stores them).

Artifacts: image ``moe/<layer>/usage_heatmap`` at step 1500 becomes
``moe/<layer>/usage_heatmap/step_00001500.png``; alerts become
``moe/alerts/step_00001500.txt``; with ``snapshots=True`` the snapshot JSON becomes
``moe/snapshots/step_00001500.json``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moescope._optional import require
from moescope.alerts import format_alert
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.alerts import Alert
    from moescope.stats.snapshot import Snapshot

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

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None,
                 snapshots: bool = False) -> None:
        self.mlflow = require("mlflow", "mlflow")
        self.run_id = run_id
        self.snapshots = snapshots
        self._client: Any = None
        if run_id is not None:
            self._client = self.mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {mlflow_key(k): float(v) for k, v in metrics.items()}
        if self._client is None:
            self.mlflow.log_metrics(clean, step=step)
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in clean.items()]
        for i in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def _artifact(self, local: Path, artifact_dir: str) -> None:
        if self._client is None:
            self.mlflow.log_artifact(os.fspath(local), artifact_path=artifact_dir)
        else:
            self._client.log_artifact(self.run_id, os.fspath(local), artifact_path=artifact_dir)

    def _text_artifact(self, text: str, artifact_dir: str, name: str) -> None:
        with tempfile.TemporaryDirectory(prefix="moescope-mlflow-") as tmp:
            p = Path(tmp) / name
            p.write_text(text, encoding="utf-8")
            self._artifact(p, artifact_dir)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if not images:
            return
        # log_artifact keeps the file name: copy under a per-step name first.
        with tempfile.TemporaryDirectory(prefix="moescope-mlflow-") as tmp:
            for key, path in images.items():
                suffix = Path(path).suffix or ".png"
                local = Path(tmp) / f"step_{step:08d}{suffix}"
                shutil.copyfile(path, local)
                self._artifact(local, mlflow_key(key))
                local.unlink()

    def log_alerts(self, alerts: list[Alert], step: int) -> None:
        if alerts:
            text = "\n".join(format_alert(a) for a in alerts) + "\n"
            self._text_artifact(text, "moe/alerts", f"step_{step:08d}.txt")

    def log_snapshot(self, snapshot: Snapshot, step: int) -> None:
        if self.snapshots:
            self._text_artifact(snapshot.to_json(), "moe/snapshots", f"step_{step:08d}.json")

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"
