"""Detailed logs: one JSON object per line, crash-safe, append-only, bounded in size.

Every line is a complete strict-JSON object (non-finite floats as ``null``) written with
one ``write`` and flushed at once (``fsync=True`` also forces it to the disk), so a crash
or a kill leaves every earlier line valid. The file is opened in append mode: a restarted
run adds lines after the old ones and never truncates them; if the previous run died in
the middle of a line, a newline is written first so the torn line stays the only bad one.

Schema (field ``schema``: :data:`SCHEMA_VERSION` = 2; lines without it are version 1,
which had the full co-activation matrix on every line and ``"images"`` lines). Line kinds
(field ``kind``):

- ``"snapshot"``, one per train (or serve) event: ``{"kind", "schema", "step", "time",
  "mode": "train" (or "serve"), "snapshot": <Snapshot.to_json() object: per-layer scalars and vectors>,
  "alerts": [...], "figures": [keys]}`` (``figures`` only when the event had some; the
  figures themselves go to the figure sinks, e.g. PNG files in ``<log_dir>/heatmaps``).
  Co-activation ([E, E] per layer, O(E^2): 281 KB per line at E=256 with 2 layers) is
  stored in full (``snapshot.layers.<layer>.coactivation``) only on the first line at or
  after every ``coactivation_full_every`` steps (default 1000); every other line has
  ``coactivation: null`` there and, under ``"coactivation_sparse": {layer: {"i": [...],
  "j": [...], "n": [...], "pairs": P}}``, the ``coactivation_top`` (default 128) largest
  off-diagonal pairs i < j (n = tokens that chose both; the matrix is symmetric and its
  diagonal is ``usage_counts``), ``pairs`` = how many pairs were non-zero in all. A line
  is thus O(L x (E + coactivation_top)) whatever E^2.
- ``"alerts"``: ``{"kind", "schema", "step", "time", "alerts": [...]}`` for alerts of an
  event without a snapshot.
- ``"metrics"``: ``{"kind", "schema", "step", "time", "mode", "metrics": {...}}``, only
  with ``metrics=True``, for train and eval events (the snapshot line already holds
  every train metric).
- other kinds written by :meth:`JsonlSink.write_line`, e.g. the vLLM plugin's
  ``"request"`` lines (per-request routing summaries, docs/vllm.md); readers skip kinds
  they do not know.

Each alert is ``{"level", "layer", "rule", "value", "step", "message", "threshold",
"detail", "text"}`` where ``text`` is the console line of
:func:`moescope.alerts.format_alert`. :func:`read_jsonl` reads a file back (skipping a
torn last line); :func:`load_snapshots` rebuilds the
:class:`~moescope.stats.snapshot.Snapshot` objects; :func:`coactivation_of` gives a
line's co-activation matrix, full or sparse.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope._json import json_safe
from moescope.alerts import format_alert
from moescope.sinks.base import Sink
from moescope.stats.snapshot import Snapshot

if TYPE_CHECKING:
    from moescope.alerts import Alert
    from moescope.sinks.event import LogEvent

__all__ = [
    "SCHEMA_VERSION",
    "JsonlSink",
    "coactivation_of",
    "load_snapshots",
    "read_jsonl",
    "sparse_pairs",
]

#: Version of the line layout written by :class:`JsonlSink` (field ``schema``).
SCHEMA_VERSION = 2


def _alert_dict(a: Alert) -> dict[str, Any]:
    d = json_safe(asdict(a))
    d["text"] = format_alert(a)
    return d


class JsonlSink(Sink):
    """Appends one JSON object per train event to ``path`` (see the module docstring).

    Args:
        path: the ``.jsonl`` file; parent folders are created.
        fsync: ``os.fsync`` after every line (survives power loss, costs a disk sync
            per log step); without it a line survives a process crash once written.
        metrics: also write a ``"metrics"`` line per event (train and eval).
        coactivation_top: off-diagonal co-activation pairs kept per layer on the sparse
            lines (0 keeps none).
        coactivation_full_every: write the full [E, E] matrices on the first line at or
            after every multiple of this many steps; None or 0: never.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fsync: bool = False,
        metrics: bool = False,
        coactivation_top: int = 128,
        coactivation_full_every: int | None = 1000,
    ) -> None:
        if coactivation_top < 0:
            raise ValueError(f"coactivation_top must be >= 0, got {coactivation_top}.")
        if coactivation_full_every is not None and coactivation_full_every < 0:
            raise ValueError(
                "coactivation_full_every must be a positive number of steps, or None/0 "
                f"for never, got {coactivation_full_every}."
            )
        self.path = Path(path)
        self.fsync = fsync
        self.metrics = metrics
        self.coactivation_top = int(coactivation_top)
        self.coactivation_full_every = coactivation_full_every or None
        self._next_full = self.coactivation_full_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Any = None
        # Lines may come from two threads (the vLLM plugin: window lines from its timer,
        # request lines from the model runner): each line is written whole.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickle / deepcopy of a callback holding the sink) opens its own file.
        state = dict(self.__dict__)
        state["_file"] = state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

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
        with self._lock:
            f = self._open()
            f.write(line + "\n")
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def write_line(self, obj: Mapping[str, Any]) -> None:
        """Append one line of another kind (``obj["kind"]`` set, e.g. the vLLM plugin's
        ``"request"`` summaries), written and flushed like every other line."""
        if not isinstance(obj.get("kind"), str):
            raise ValueError("write_line needs a 'kind' field")
        self._write({"schema": SCHEMA_VERSION, **json_safe(dict(obj))})

    def _full_due(self, step: int) -> bool:
        every = self._next_full
        if every is None or step < every:
            return False
        assert self.coactivation_full_every is not None
        self._next_full = (step // self.coactivation_full_every + 1) * self.coactivation_full_every
        return True

    def _snapshot_obj(self, snapshot: Snapshot, full: bool) -> tuple[dict[str, Any], Any]:
        """(the snapshot's JSON object, the sparse co-activation map or None)."""
        if full:
            return json.loads(snapshot.to_json()), None

        layers = {}
        sparse: dict[str, Any] = {}
        for name, s in snapshot.layers.items():
            if s.coactivation is not None:
                i, j, n, pairs = sparse_pairs(s.coactivation, self.coactivation_top)
                sparse[name] = {"i": i.tolist(), "j": j.tolist(), "n": n.tolist(), "pairs": pairs}
                s = replace(s, coactivation=None)  # shallow: the O(E^2) list is never built
            layers[name] = s
        light = Snapshot(step=snapshot.step, layers=layers, time=snapshot.time)
        return json.loads(light.to_json()), (sparse or None)

    def write(self, event: LogEvent) -> None:
        now = time.time()
        head = {"schema": SCHEMA_VERSION, "step": event.step}
        if self.metrics and event.metrics:
            self._write(
                {
                    "kind": "metrics",
                    **head,
                    "time": now,
                    "mode": event.mode,
                    "metrics": json_safe(dict(event.metrics)),
                }
            )
        if event.mode == "eval":
            return
        alerts = [_alert_dict(a) for a in event.alerts]
        snap = event.snapshot
        if snap is None:
            if alerts:
                self._write({"kind": "alerts", **head, "time": now, "alerts": alerts})
            return
        obj, sparse = self._snapshot_obj(snap, self._full_due(event.step))
        line: dict[str, Any] = {
            "kind": "snapshot",
            **head,
            "time": snap.time if snap.time is not None else now,
            "mode": event.mode,
            "snapshot": obj,
            "alerts": alerts,
        }
        if sparse is not None:
            line["coactivation_sparse"] = sparse
        if event.figures:
            line["figures"] = sorted(event.figures)
        self._write(line)

    def flush(self) -> None:
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


def sparse_pairs(
    coactivation: np.ndarray, top: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The ``top`` largest off-diagonal pairs of a symmetric co-activation matrix.

    Args:
        coactivation: [E, E] counts (symmetric; diagonal = usage counts, left out).
        top: pairs to keep at most.

    Returns:
        ``(i [P'], j [P'], n [P'], P)``: row < column ids and counts of the kept pairs,
        largest first (ties by (i, j)), and P, the number of non-zero pairs i < j.
    """
    c = np.asarray(coactivation, dtype=np.int64)
    iu, ju = np.triu_indices(c.shape[0], k=1)
    vals = c[iu, ju]
    nz = np.nonzero(vals)[0]
    pairs = int(nz.size)
    if top <= 0 or pairs == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, pairs
    # Stable sort on -count keeps (i, j) order among ties: the same line every run.
    order = nz[np.argsort(-vals[nz], kind="stable")[:top]]
    return iu[order], ju[order], vals[order], pairs


def coactivation_of(
    record: Mapping[str, Any], layer: str, partial: bool = False
) -> np.ndarray | None:
    """A ``"snapshot"`` line's [E, E] co-activation of ``layer`` (int64), or None.

    Full lines give the stored matrix. Sparse lines give the matrix rebuilt from the
    kept pairs (mirrored, diagonal = ``usage_counts``) when every non-zero pair was kept,
    or when ``partial=True`` (then pairs not kept read 0); else None. None also when the
    layer had no co-activation.
    """
    st = record["snapshot"]["layers"][layer]
    if st.get("coactivation") is not None:
        return np.asarray(st["coactivation"], dtype=np.int64)
    sp = (record.get("coactivation_sparse") or {}).get(layer)
    if sp is None or (len(sp["n"]) < sp["pairs"] and not partial):
        return None
    e = int(st["num_experts"])
    m = np.zeros((e, e), dtype=np.int64)
    i, j = np.asarray(sp["i"], dtype=np.int64), np.asarray(sp["j"], dtype=np.int64)
    m[i, j] = m[j, i] = np.asarray(sp["n"], dtype=np.int64)
    m[np.arange(e), np.arange(e)] = np.asarray(st["usage_counts"], dtype=np.int64)
    return m


def load_snapshots(path: str | os.PathLike[str]) -> list[Snapshot]:
    """The :class:`Snapshot` of every ``"snapshot"`` line of a JSONL file (schema 1 or 2).

    ``coactivation`` is the full matrix on full lines, the rebuilt one on sparse lines
    that kept every non-zero pair, and None on the other sparse lines.
    """
    out = []
    for rec in read_jsonl(path):
        if rec.get("kind") != "snapshot":
            continue
        snap = Snapshot.from_json(json.dumps(rec["snapshot"]))
        for name, s in snap.layers.items():
            if s.coactivation is None and "coactivation_sparse" in rec:
                s.coactivation = coactivation_of(rec, name)
        out.append(snap)
    return out
