"""Console sink: one compact per-layer table per train window, and grouped alert lines.

Layout (plain text; with ``rich`` installed the same columns in a rich table)::

    MoE step 1500 | 4 layers | 4,096 tokens | avg cv 0.412 | avg entropy 1.873 | unused 3/32 | worst max/mean 4.52 (0) | avg aux 1.043
    layer (model.layers.*.mlp)  tokens    cv  max/mean  unused  entropy  top-1    aux
    0                            4,096  0.51      4.52     3/8    1.791  0.412  1.102
    ...
    ⚠️  MoE Alert at step 1500: model.layers.0.mlp: Severe expert imbalance (ratio: 4.52)
        max/mean load 4.52 > 4.0 threshold
        fix: raise the load-balancing (aux) loss coefficient ...

With many layers (60) only the ``max_layers`` most imbalanced ones are listed (in model
order) plus one summary line for the rest, so a log step never floods the terminal; with
many experts (128) nothing grows, since the table shows per-layer scalars only.

Alerts are grouped across windows (:class:`~moescope.alerts.AlertTracker`): a (layer,
rule) that starts firing gets its seed-format line, the metric against its threshold and
(once per rule) a remediation; while it keeps firing nothing is reprinted except one
``still firing since step ...`` summary every ``remind_every`` windows; a line says when
it resolves. Eval events print nothing (their scalars go to the other sinks).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from moescope.alerts import AlertTracker, AlertUpdate, format_update
from moescope.layer_names import shorten_layer_names
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.sinks.event import LogEvent
    from moescope.stats.snapshot import LayerStats, Snapshot

__all__ = ["ConsoleSink", "format_model_line", "format_table", "shorten_layer_names"]

COLUMNS: tuple[str, ...] = (
    "tokens", "cv", "max/mean", "unused", "entropy", "top-1", "aux",
)  # fmt: skip


def _f(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "-"


def _row(s: LayerStats) -> list[str]:
    unused = (
        f"{int(s.unused_experts)}/{s.num_experts}"
        if math.isfinite(s.unused_experts)
        else f"-/{s.num_experts}"
    )
    return [
        f"{s.num_tokens:,}",
        _f(s.cv, 3),
        _f(s.max_over_mean, 2),
        unused,
        _f(s.routing_entropy, 3),
        _f(s.top1_prob, 3),
        _f(s.aux_loss, 3),
    ]


def _select(snapshot: Snapshot, max_layers: int) -> tuple[list[str], list[str]]:
    """(names shown in model order, names hidden): the most imbalanced layers first."""
    names = list(snapshot.layers)
    if len(names) <= max_layers:
        return names, []

    def badness(n: str) -> float:
        v = snapshot.layers[n].max_over_mean
        return v if math.isfinite(v) else -math.inf

    keep = set(sorted(names, key=badness, reverse=True)[:max_layers])
    return [n for n in names if n in keep], [n for n in names if n not in keep]


def format_model_line(snapshot: Snapshot, step: int | None = None) -> str:
    """One line of model-level aggregates (step, layers, tokens, averages, unused)."""
    step = snapshot.step if step is None else step
    names = list(snapshot.layers)
    worst = ""
    finite = [n for n in names if math.isfinite(snapshot.layers[n].max_over_mean)]
    if finite:
        w = max(finite, key=lambda n: snapshot.layers[n].max_over_mean)
        worst = f" ({w})"
    return (
        f"MoE step {step if step is not None else '?'} | {len(names)} layers | "
        f"{snapshot.total_tokens:,} tokens | avg cv {_f(snapshot.avg_expert_cv, 3)} | "
        f"avg entropy {_f(snapshot.avg_routing_entropy, 3)} | "
        f"unused {snapshot.total_unused_experts}/{snapshot.total_experts} | "
        f"worst max/mean {_f(snapshot.max_max_over_mean, 2)}{worst} | "
        f"avg aux {_f(snapshot.avg_aux_loss, 3)}"
    )


def _table_parts(
    snapshot: Snapshot, max_layers: int
) -> tuple[str, list[list[str]], list[str], str]:
    """(layer column header, rows incl. short name, full names shown, footer or "")."""
    shown, hidden = _select(snapshot, max_layers)
    short_all, pattern = shorten_layer_names(list(snapshot.layers))
    short = dict(zip(snapshot.layers, short_all, strict=True))
    header = f"layer ({pattern})" if pattern else "layer"
    rows = [[short[n], *_row(snapshot.layers[n])] for n in shown]
    footer = ""
    if hidden:
        ratios = [snapshot.layers[n].max_over_mean for n in hidden]
        ratios = [r for r in ratios if math.isfinite(r)]
        worst = f", max/mean <= {max(ratios):.2f}" if ratios else ""
        footer = f"... {len(hidden)} more layers not shown{worst}"
    return header, rows, shown, footer


def format_table(snapshot: Snapshot, max_layers: int = 16) -> str:
    """The per-layer table as plain text (right-aligned numbers, one row per layer)."""
    header, rows, _, footer = _table_parts(snapshot, max_layers)
    head = [header, *COLUMNS]
    widths = [
        max(len(head[j]), *(len(r[j]) for r in rows)) if rows else len(head[j])
        for j in range(len(head))
    ]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [line(head), *(line(r) for r in rows)]
    if footer:
        out.append(footer)
    return "\n".join(out)


@contextlib.contextmanager
def progress_bars_cleared(out: TextIO) -> Iterator[None]:
    """Write to ``out`` without breaking a live tqdm progress bar (the Trainer's, any
    other): the bars sharing the terminal are cleared first and redrawn after, as
    ``tqdm.write`` does. Nothing is imported when tqdm is not in use."""
    tqdm_std = sys.modules.get("tqdm.std")
    bar_cls = getattr(tqdm_std, "tqdm", None)
    if bar_cls is None or not getattr(bar_cls, "_instances", None):
        yield
        return
    with bar_cls.external_write_mode(file=out):
        yield


class ConsoleSink(Sink):
    """Prints a compact per-layer table per train event and the grouped alert lines.

    Args:
        rich: use ``rich`` tables when the package is installed (extra ``console``);
            plain text otherwise or when False.
        stream: where to write; None = ``sys.stdout`` at each call (so redirection and
            pytest's capture work).
        max_layers: at most this many table rows; the most imbalanced layers are kept
            and the rest summarised in one line.
        highlight_ratio: with rich, max/mean values above it are shown in red.
        width: console width for rich (None: the terminal's, 120 when not a terminal).
        table: print the per-layer table (False: alert lines only).
        group_alerts: print a firing alert once and then only "still firing" summaries
            and "resolved" lines (False: every alert line of every window, as before).
        remind_every: with grouping and an event without ``alert_update``, windows
            between two "still firing" summaries (the session's tracker decides
            otherwise).

    Alert lines are plain text even with rich (the format is a contract, grep-able):
    exactly :func:`moescope.alerts.format_alert`, e.g.
    ``⚠️  MoE Alert at step 1500: model.layers.0.mlp: Severe expert imbalance (ratio: 4.52)``,
    followed by indented detail lines.
    """

    def __init__(
        self,
        rich: bool = True,
        stream: TextIO | None = None,
        max_layers: int = 16,
        highlight_ratio: float = 4.0,
        width: int | None = None,
        table: bool = True,
        group_alerts: bool = True,
        remind_every: int | None = 10,
    ) -> None:
        if max_layers < 1:
            raise ValueError(f"max_layers must be >= 1, got {max_layers}.")
        self.stream = stream
        self.max_layers = int(max_layers)
        self.highlight_ratio = highlight_ratio
        self.width = width
        self.table = bool(table)
        self.group_alerts = bool(group_alerts)
        # find_spec, not import: the parameter is named like the package.
        self.use_rich = bool(rich) and importlib.util.find_spec("rich") is not None
        self._tracker = AlertTracker(remind_every=remind_every)
        self._hinted: set[str] = set()  # rules whose remediation was printed

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def write(self, event: LogEvent) -> None:
        if event.mode != "train":
            return
        out = self._out()
        with progress_bars_cleared(out):
            if self.table and event.snapshot is not None:
                self.print_table(event.snapshot, event.step)
            lines = format_update(self._alert_update(event), self._hinted)
            if lines:
                out.write("\n".join(lines) + "\n")
                out.flush()

    def _alert_update(self, event: LogEvent) -> AlertUpdate:
        if not self.group_alerts:
            return AlertUpdate(event.step, new=tuple(event.alerts))
        if event.alert_update is not None:
            return event.alert_update
        return self._tracker.update(event.alerts, event.step)

    def print_table(self, snapshot: Snapshot, step: int | None = None) -> None:
        """The model line and the per-layer table of one snapshot."""
        out = self._out()
        with progress_bars_cleared(out):
            if not self.use_rich:
                out.write(format_model_line(snapshot, step) + "\n")
                out.write(format_table(snapshot, self.max_layers) + "\n")
                out.flush()
                return
            self._rich_table(snapshot, step, out)

    def _rich_table(self, snapshot: Snapshot, step: int | None, out: TextIO) -> None:
        from rich import box
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        width = self.width
        if width is None and not (hasattr(out, "isatty") and out.isatty()):
            width = 120
        console = Console(file=out, width=width, highlight=False, soft_wrap=False, emoji=False)
        header, rows, shown, footer = _table_parts(snapshot, self.max_layers)
        table = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
            caption=escape(footer) if footer else None,
            caption_justify="left",
        )
        table.add_column(escape(header), no_wrap=True)
        for c in COLUMNS:
            table.add_column(c, justify="right", no_wrap=True)
        for name, raw in zip(shown, rows, strict=True):
            cells = [escape(c) for c in raw]
            ratio = snapshot.layers[name].max_over_mean
            bad = math.isfinite(ratio) and ratio > self.highlight_ratio
            if bad:
                cells = [*cells[:3], f"[bold red]{cells[3]}[/]", *cells[4:]]
            table.add_row(*cells)
        # The model line is printed on its own (a table title would wrap at table width).
        console.print(escape(format_model_line(snapshot, step)), soft_wrap=True)
        console.print(table)
        out.flush()

    def flush(self) -> None:
        self._out().flush()

    def __repr__(self) -> str:
        return f"ConsoleSink(rich={self.use_rich}, max_layers={self.max_layers})"
