"""Detailed logs: one JSON object per line, crash-safe and append-only.

Every line is a complete strict-JSON object (non-finite floats as ``null``) written with
one ``write`` and flushed at once (``fsync=True`` also forces it to the disk), so a crash
or a kill leaves every earlier line valid. The file is opened in append mode: a restarted
run adds lines after the old ones and never truncates them; if the previous run died in
the middle of a line, a newline is written first so the torn line stays the only bad one.

Line kinds (field ``kind``):

- ``"snapshot"``: ``{"kind", "step", "time", "snapshot": <Snapshot.to_json() object with
  per-layer usage vectors>, "alerts": [...]}``, one per ``log_snapshot`` call. Alerts
  given by ``log_alerts`` *before* the snapshot of the same step are embedded here.
- ``"alerts"``: ``{"kind", "step", "time", "alerts": [...]}`` for alerts that arrive after
  their step's snapshot line was written (or with no snapshot at all).
- ``"metrics"``: ``{"kind", "step", "time", "metrics": {...}}``, only with
  ``metrics=True`` (the snapshot line already holds every metric).
- ``"images"``: ``{"kind", "step", "time", "images": {key: absolute PNG path}}`` (the
  files themselves stay where the caller wrote them).

Each alert is ``{"level", "layer", "rule", "value", "step", "message", "text"}`` where
``text`` is the console line of :func:`moescope.alerts.format_alert`.
:func:`read_jsonl` reads a file back (skipping a torn last line); :func:`load_snapshots`
rebuilds the :class:`~moescope.stats.snapshot.Snapshot` objects.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moescope.alerts import format_alert
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.alerts import Alert
    from moescope.stats.snapshot import Snapshot

__all__ = ["JsonlSink", "load_snapshots", "read_jsonl"]


def _clean(v: Any) -> Any:
    """Strict-JSON-able copy: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return _clean(v.item())
    return v


def _alert_dict(a: Alert) -> dict[str, Any]:
    d = _clean(asdict(a))
    d["text"] = format_alert(a)
    return d


class JsonlSink(Sink):
    """Appends one JSON object per snapshot to ``path`` (see the module docstring).

    Args:
        path: the ``.jsonl`` file; parent folders are created.
        fsync: ``os.fsync`` after every line (survives power loss, costs a disk sync
            per log step); without it a line survives a process crash once written.
        metrics: also write a ``"metrics"`` line per ``log_metrics`` call.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False,
                 metrics: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.metrics = metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Any = None
        self._last_snapshot_step: int | None = None
        self._pending_alerts: tuple[int, list[Alert]] | None = None

    def _open(self) -> Any:
        if self._file is None:
            # newline="" keeps "\n" on every platform: one object per physical line.
            self._file = open(self.path, "a", encoding="utf-8", newline="")
            if self._torn_tail():
                self._file.write("\n")
                self._file.flush()
        return self._file

    def _torn_tail(self) -> bool:
        """True when the file is non-empty and does not end with a newline."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except OSError:
            return False

    def _write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        f = self._open()
        f.write(line + "\n")
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    def _write_pending_alerts(self) -> None:
        if self._pending_alerts is not None:
            step, alerts = self._pending_alerts
            self._pending_alerts = None
            self._write({"kind": "alerts", "step": step, "time": time.time(),
                         "alerts": [_alert_dict(a) for a in alerts]})

    def log_snapshot(self, snapshot: Snapshot, step: int) -> None:
        alerts: list[Alert] = []
        if self._pending_alerts is not None and self._pending_alerts[0] == step:
            alerts = self._pending_alerts[1]
            self._pending_alerts = None
        else:
            self._write_pending_alerts()
        t = snapshot.time if snapshot.time is not None else time.time()
        self._write({
            "kind": "snapshot",
            "step": step,
            "time": t,
            "snapshot": json.loads(snapshot.to_json()),
            "alerts": [_alert_dict(a) for a in alerts],
        })
        self._last_snapshot_step = step

    def log_alerts(self, alerts: list[Alert], step: int) -> None:
        if not alerts:
            return
        if self._last_snapshot_step == step:
            self._write({"kind": "alerts", "step": step, "time": time.time(),
                         "alerts": [_alert_dict(a) for a in alerts]})
            return
        # The snapshot of this step has not come yet: keep the alerts to embed them.
        self._write_pending_alerts()
        self._pending_alerts = (step, list(alerts))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics:
            self._write({"kind": "metrics", "step": step, "time": time.time(),
                         "metrics": _clean(dict(metrics))})

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if images:
            self._write({"kind": "images", "step": step, "time": time.time(),
                         "images": {k: str(Path(p).resolve()) for k, p in images.items()}})

    def flush(self) -> None:
        self._write_pending_alerts()
        if self._file is not None:
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r}, fsync={self.fsync})"


def read_jsonl(path: str | os.PathLike[str], strict: bool = False) -> list[dict[str, Any]]:
    """All objects of a moescope JSONL file, in order.

    Blank lines are skipped; an unparsable line (a torn write from a crash) is skipped
    too unless ``strict`` (then ``ValueError`` names the line number).
    """
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                if strict:
                    raise ValueError(f"{path}:{i}: not a JSON object ({err}).") from err
    return out


def load_snapshots(path: str | os.PathLike[str]) -> list[Snapshot]:
    """The :class:`Snapshot` of every ``"snapshot"`` line of a JSONL file."""
    from moescope.stats.snapshot import Snapshot

    return [
        Snapshot.from_json(json.dumps(rec["snapshot"]))
        for rec in read_jsonl(path)
        if rec.get("kind") == "snapshot"
    ]
