"""``moescope watch RUN_DIR``: a live terminal view of a running training job.

Tails the detailed JSONL log that :class:`~moescope.sinks.jsonl.JsonlSink` writes
(``save_detailed_logs=True``: ``<log_dir>/moe_detailed.jsonl``) and redraws, with
``rich``, one table of the latest train window (per layer: tokens, max/mean, CV, routing
entropy, unused experts, a usage bar with one cell per expert, a max/mean sparkline of
the last windows) and the alerts firing now (grouped like the console: since which
step, the metric against its threshold).

It only reads the file, so it works from another shell or over ssh while the job runs:
the file may not exist yet (it waits, saying so), grow (new lines are read as they
arrive; a half-written last line waits for its newline), or be truncated or replaced
(a new run: the view starts over). ``--once`` prints one frame and exits (no terminal
needed); without a terminal and without ``--once`` a frame is printed per new window.
Ctrl-C exits with status 0.

Start-up reads only the last ``--history`` lines (default 200), so a long log opens at
once; "since step" of an alert is then at most that far back.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from moescope._cliopts import option
from moescope._optional import require
from moescope._rundir import LOG_NAME
from moescope._rundir import find_log as _find_run_log
from moescope.alerts import Alert, AlertTracker
from moescope.sinks.console import _table_parts, format_model_line
from moescope.stats.snapshot import Snapshot

__all__ = [
    "JsonlTail",
    "WatchOptions",
    "WatchState",
    "find_log",
    "render_frame",
    "run_watch",
    "usage_bar",
]

_BLOCKS = "▁▂▃▄▅▆▇█"
_UNUSED = "·"
_ALERT_FIELDS = tuple(f.name for f in fields(Alert))


def find_log(path: str | os.PathLike[str]) -> Path | None:
    """The JSONL file to watch for ``path`` (a file, or a run folder), or None yet.

    A folder is searched as :func:`moescope._rundir.find_log` does (``moe_detailed.jsonl``,
    ``moe_logs/moe_detailed.jsonl``, the newest one up to three levels down). A path
    ending in ``.jsonl`` is the file itself, whether or not it exists yet.
    """
    p = Path(path)
    if p.suffix == ".jsonl" or p.is_file():
        return p
    if not p.is_dir():
        return None
    return _find_run_log(p)


def _start_of_last_lines(f: Any, n: int, size: int) -> int:
    """Byte offset where the last ``n`` complete lines of ``f`` (size ``size``) start."""
    if n <= 0 or size == 0:
        return size
    f.seek(size - 1)
    # The newline ending the last complete line starts no line to count: without a final
    # newline (a line being written) that is the first newline found from the end.
    seen = 0 if f.read(1) == b"\n" else -1
    pos, block = size, 1 << 16
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        # The final newline ends the last line; count the ones before it.
        end = len(chunk) - 1 if pos == size and chunk.endswith(b"\n") else len(chunk)
        idx = end
        while True:
            idx = chunk.rfind(b"\n", 0, idx)
            if idx < 0:
                break
            seen += 1
            if seen >= n:
                return start + idx + 1
        pos = start
    return 0


class JsonlTail:
    """Reads the complete JSON lines appended to a file since the last :meth:`poll`.

    Args:
        locate: the file, or a callable giving it (None while it does not exist).
        history: on (re)opening, start this many complete lines before the end (None:
            from the start).

    Attributes:
        path: the file being read (None before it exists).
        restarts: times the file was truncated or replaced (a new run).
        bad_lines: lines that were not JSON objects (skipped).
    """

    def __init__(
        self, locate: Path | Callable[[], Path | None], history: int | None = None
    ) -> None:
        self._locate = locate if callable(locate) else (lambda: locate)
        self.history = history
        self.path: Path | None = None
        self._f: Any = None
        self._ino: tuple[int, int] | None = None
        self._pos = 0
        self._buf = b""
        self.restarts = 0
        self.bad_lines = 0
        self.reset_pending = False  # set when the file restarted; the reader clears it

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = None

    def _open(self, path: Path, size: int, ident: tuple[int, int]) -> None:
        if self._f is not None:
            self.restarts += 1
            self.reset_pending = True
            self.close()
        self._f = open(path, "rb")
        self.path, self._ino, self._buf = path, ident, b""
        self._pos = 0 if self.history is None else _start_of_last_lines(self._f, self.history, size)

    def poll(self) -> list[dict[str, Any]]:
        """New complete lines parsed as JSON objects ([] while the file is missing)."""
        path = self._locate()
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        if path is None or st is None:
            return []
        ident = (st.st_dev, st.st_ino)
        if self._f is None or ident != self._ino or path != self.path:
            self._open(path, st.st_size, ident)
        elif st.st_size < self._pos:  # truncated in place: a new run writes from 0
            self.restarts += 1
            self.reset_pending = True
            self._pos, self._buf = 0, b""
        self._f.seek(self._pos)
        chunk = self._f.read(max(0, st.st_size - self._pos))
        self._pos += len(chunk)
        data = self._buf + chunk
        *complete, self._buf = data.split(b"\n")
        out = []
        for raw in complete:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.bad_lines += 1  # a torn line left by a crash
                continue
            if isinstance(obj, dict):
                out.append(obj)
            else:
                self.bad_lines += 1
        return out


def _alert(d: dict[str, Any]) -> Alert:
    kw: dict[str, Any] = {k: d.get(k) for k in _ALERT_FIELDS}  # JSON values
    kw["value"] = math.nan if kw["value"] is None else float(kw["value"])
    kw["detail"] = kw["detail"] or ""
    return Alert(**kw)


@dataclass
class WatchState:
    """What the view shows, fed one JSONL record at a time.

    Attributes:
        last: the latest train ``"snapshot"`` record.
        windows: snapshot lines seen since the (re)start.
        tracker: alert grouping over the lines (new / still firing / resolved).
        trend: per layer, max/mean of the last ``trend_len`` windows.
    """

    trend_len: int = 24
    last: dict[str, Any] | None = None
    windows: int = 0
    tracker: AlertTracker = field(default_factory=lambda: AlertTracker(remind_every=None))
    trend: dict[str, deque[float]] = field(default_factory=dict)
    _snap_cache: tuple[int, Snapshot] | None = None

    def reset(self) -> None:
        """Forget everything (the log was truncated or replaced)."""
        self.last, self.windows, self._snap_cache = None, 0, None
        self.tracker = AlertTracker(remind_every=None)
        self.trend = {}

    def feed(self, rec: dict[str, Any]) -> None:
        kind = rec.get("kind")
        if kind == "snapshot" and isinstance(rec.get("snapshot"), dict):
            self.last = rec
            self.windows += 1
            for name, st in rec["snapshot"].get("layers", {}).items():
                v = st.get("max_over_mean")
                self.trend.setdefault(name, deque(maxlen=self.trend_len)).append(
                    math.nan if v is None else float(v)
                )
            # Every train window has a line (with its alerts, possibly none): the same
            # grouping as the console's.
            self.tracker.update([_alert(a) for a in rec.get("alerts", [])], rec.get("step"))

    def snapshot(self) -> Snapshot | None:
        """The latest window as a :class:`Snapshot` (parsed once per line)."""
        if self.last is None:
            return None
        key = id(self.last)
        if self._snap_cache is None or self._snap_cache[0] != key:
            snap = Snapshot.from_json(json.dumps(self.last["snapshot"]))
            self._snap_cache = (key, snap)
        return self._snap_cache[1]


def usage_bar(counts: Iterable[float], width: int = 48) -> str:
    """One cell per expert: block height = its load relative to the busiest expert,
    ``·`` = no token. More than ``width`` experts are pooled (max per group; ``·`` only
    when the whole group is unused).

    Args:
        counts: [E] usage counts.
        width: cells at most.
    """
    c = [float(x) for x in counts]
    if not c:
        return ""
    g = max(1, math.ceil(len(c) / max(1, width)))
    groups = [c[i : i + g] for i in range(0, len(c), g)]
    top = max(c)
    out = []
    for grp in groups:
        m = max(grp)
        if m <= 0:
            out.append(_UNUSED)
        else:
            out.append(_BLOCKS[min(7, int(m / top * 7.999))])
    return "".join(out)


def sparkline(values: Sequence[float]) -> str:
    """A block sparkline of ``values`` between their min and max (NaN: a space)."""
    fin = [v for v in values if math.isfinite(v)]
    if not fin:
        return ""
    lo, hi = min(fin), max(fin)
    span = hi - lo
    return "".join(
        " "
        if not math.isfinite(v)
        else _BLOCKS[0 if span <= 0 else min(7, int((v - lo) / span * 7.999))]
        for v in values
    )


def _f(x: float | None, digits: int) -> str:
    return f"{x:.{digits}f}" if x is not None and math.isfinite(x) else "-"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "?"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


_MIN_BAR = 8  # usage cells below which the trend column is dropped instead


def _layout(
    cells: Sequence[Sequence[str]], width: int, e_max: int, windows: int = 24
) -> tuple[int, int, int]:
    """(usage column width, usage bar cells, trend cells) so that a row of ``cells`` (the
    text columns) plus both fits ``width`` columns without rich shrinking (and cutting) a
    number; trend 0 = no trend column. Columns are separated by 2 spaces (padding 1 each
    side, no edge)."""
    fixed = sum(max(len(c) for c in col) for col in cells) + 2 * len(cells)
    room = width - fixed
    bar = max(_MIN_BAR, min(48, e_max or 48, room - 8))
    trend = min(24, max(windows, len("trend")), room - bar - 2)
    if trend < 5:  # too short to show a direction: keep the room for usage
        trend = 0
    usage_room = max(bar, room - (trend + 2 if trend else 0))
    return usage_room, min(bar, usage_room), trend


def render_frame(
    state: WatchState,
    source: str,
    max_layers: int = 32,
    now: float | None = None,
    waiting: bool = False,
    width: int | None = None,
) -> Any:
    """The rich renderable of one frame (a ``Group`` of header, table, alerts).

    ``width``: the columns it is drawn in (None: 120). The numbers are never cut: the
    usage bar pools experts into fewer cells, and below about 90 columns the max/mean
    trend column is shortened, then dropped."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    snap = state.snapshot()
    if snap is None:
        msg = (
            f"waiting for {source} ..."
            if waiting
            else f"{source}: no snapshot line yet (train windows appear every log step)"
        )
        return Text(msg)
    rec = state.last or {}
    head = Text(
        f"moescope watch {source}\nstep {rec.get('step')} | {state.windows} windows "
        f"| last line written {_ago(rec.get('time'), now)}",
        style="bold",
    )
    header, rows, shown, footer = _table_parts(snap, max_layers)
    short = {n: r[0] for n, r in zip(shown, rows, strict=True)}
    e_max = max((s.num_experts for s in snap.layers.values()), default=0)
    text_rows = [_row_text(snap.layers[n], short[n]) for n in shown]
    names = ("layer", "tokens", "max/mean", "cv", "entropy", "unused")
    pattern = header.removeprefix("layer").strip(" ()")
    cols = [[h, *(r[i] for r in text_rows)] for i, h in enumerate(names)]
    windows = max((len(v) for v in state.trend.values()), default=0)
    usage_room, bar_w, trend_w = _layout(cols, width or 120, e_max, windows)
    usage_head = f"usage per expert (E={e_max})"
    if len(usage_head) > usage_room:
        usage_head = f"usage E={e_max}" if usage_room >= len(f"usage E={e_max}") else f"E={e_max}"
    table = Table(
        box=None,
        pad_edge=False,
        show_edge=False,
        header_style="bold",
        caption=escape(footer) if footer else None,
        caption_justify="left",
    )
    table.add_column("layer", no_wrap=True)
    for c in names[1:]:
        table.add_column(c, justify="right", no_wrap=True)
    table.add_column(usage_head, no_wrap=True, min_width=bar_w)
    if trend_w:
        table.add_column("trend"[:trend_w], no_wrap=True)
    for name, cells in zip(shown, text_rows, strict=True):
        s = snap.layers[name]
        bad = math.isfinite(s.max_over_mean) and any(
            a.layer == name and a.rule == "imbalance"
            for a in (x.last for x in state.tracker.active)
        )
        row = [escape(c) for c in cells]
        if bad:
            row[2] = f"[bold red]{row[2]}[/]"
        row.append(usage_bar(s.usage_counts, width=bar_w))
        if trend_w:
            row.append(sparkline(list(state.trend.get(name, ()))[-trend_w:]))
        table.add_row(*row)
    active = state.tracker.active
    alerts = Table(box=None, pad_edge=False, show_edge=False, show_header=False)
    for col in ("rule", "layer", "since", "detail"):
        alerts.add_column(col, no_wrap=col != "detail")
    for st in active:
        since = f"since step {st.since}" if st.since is not None else ""
        alerts.add_row(
            f"[yellow]{escape(st.rule)}[/]",
            escape(st.layer),
            since,
            escape(st.last.detail or st.last.message),
        )
    title = Text(
        f"alerts firing: {len(active)}" if active else "alerts firing: none",
        style="bold yellow" if active else "green",
    )
    model_line = format_model_line(snap, rec.get("step")).split(" | ")
    legend = [f"layer = {pattern}"] if pattern else []
    if trend_w:
        legend.append("trend = max/mean over the last windows")
    return Group(
        head,
        Text(" | ".join(model_line[1:])),
        *([Text(" | ".join(legend))] if legend else []),
        table,
        title,
        *([alerts] if active else []),
    )


def _row_text(s: Any, short: str) -> list[str]:
    """The text cells of one layer: name, tokens, max/mean, cv, entropy, unused."""
    unused = (
        f"{int(s.unused_experts)}/{s.num_experts}"
        if math.isfinite(s.unused_experts)
        else f"-/{s.num_experts}"
    )
    return [
        short,
        f"{s.num_tokens:,}",
        _f(s.max_over_mean, 2),
        _f(s.cv, 3),
        _f(s.routing_entropy, 3),
        unused,
    ]


def frame_text(
    state: WatchState,
    source: str,
    width: int = 120,
    max_layers: int = 32,
    now: float | None = None,
    waiting: bool = False,
) -> str:
    """One frame as plain text (no colour codes)."""
    from rich.console import Console

    buf = io.StringIO()
    Console(
        file=buf,
        width=width,
        color_system=None,
        force_terminal=False,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    ).print(render_frame(state, source, max_layers, now=now, waiting=waiting, width=width))
    return buf.getvalue()


@dataclass
class WatchOptions:
    """Settings of ``moescope watch`` (every flag is one field; the CLI is derived)."""

    path: Path = option(
        help="the run folder (searched for moe_detailed.jsonl: moe_logs/ and up to three "
        "levels down), or the .jsonl file itself",
        type=Path,
        positional=True,
    )
    once: bool = option(False, help="print one frame and exit (no terminal needed)")
    interval: float = option(1.0, help="seconds between two reads of the file", metavar="SECONDS")
    history: int = option(200, help="lines read back from the end at start (0 = all)", metavar="N")
    max_layers: int = option(
        32, help="table rows at most; the most imbalanced layers are kept", metavar="N"
    )
    width: int | None = option(
        None,
        help="columns (default: the terminal's, 120 without one)",
        metavar="COLUMNS",
    )


def _usage_error(msg: str) -> int:
    print(f"moescope watch: error: {msg}", file=sys.stderr)
    return 2


def run_watch(args: WatchOptions | argparse.Namespace, stream: TextIO | None = None) -> int:
    """Run ``moescope watch``; returns the exit status (Ctrl-C: 0)."""
    require("rich", "console")
    if args.interval <= 0:
        return _usage_error(f"--interval must be > 0 seconds, got {args.interval}.")
    if args.history < 0 or args.max_layers < 1:
        return _usage_error("--history must be >= 0 and --max-layers >= 1.")
    out = stream if stream is not None else sys.stdout
    target: Path = args.path
    tail = JsonlTail(lambda: find_log(target), history=args.history or None)
    state = WatchState()

    def pull() -> bool:
        recs = tail.poll()
        if tail.reset_pending:
            tail.reset_pending = False
            state.reset()
        for r in recs:
            state.feed(r)
        return bool(recs)

    def source() -> str:
        return str(tail.path if tail.path is not None else target)

    try:
        pull()
        if args.once:
            if tail.path is None or not tail.path.exists():
                return _usage_error(
                    f"no JSONL log at {target} yet; the training run writes "
                    f"<log_dir>/{LOG_NAME} with save_detailed_logs=True."
                )
            out.write(
                frame_text(state, source(), width=args.width or 120, max_layers=args.max_layers)
            )
            return 0
        if not (hasattr(out, "isatty") and out.isatty()):
            return _follow_plain(args, out, tail, state, pull, source)
        return _follow_live(args, out, tail, state, pull, source)
    except KeyboardInterrupt:
        return 0
    finally:
        tail.close()


def _follow_plain(
    args: WatchOptions | argparse.Namespace,
    out: TextIO,
    tail: JsonlTail,
    state: WatchState,
    pull: Callable[[], bool],
    source: Callable[[], str],
) -> int:
    """No terminal: one frame per new window, appended (pipes, ``ssh host cmd``)."""
    width = args.width or 120
    out.write(frame_text(state, source(), width, args.max_layers, waiting=tail.path is None) + "\n")
    out.flush()
    while True:
        time.sleep(args.interval)
        if pull():
            out.write(frame_text(state, source(), width, args.max_layers) + "\n")
            out.flush()


def _follow_live(
    args: WatchOptions | argparse.Namespace,
    out: TextIO,
    tail: JsonlTail,
    state: WatchState,
    pull: Callable[[], bool],
    source: Callable[[], str],
) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out, width=args.width, highlight=False)

    def frame() -> Any:
        return render_frame(
            state,
            source(),
            args.max_layers,
            waiting=tail.path is None or not tail.path.exists(),
            width=console.size.width,
        )

    with Live(
        frame(), console=console, refresh_per_second=4, screen=False, auto_refresh=False
    ) as live:
        while True:
            time.sleep(args.interval)
            pull()
            live.update(frame(), refresh=True)
