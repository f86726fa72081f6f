"""Render a :class:`~moescope.prune.run.PruneResult` as ``report.html`` + ``tradeoff.png``.

Rendering only (every number is computed by :mod:`moescope.prune`): the overview (what
was kept, parameters and bytes removed), the keep-vs-loss curve with its table (one line
per ordering, the unpruned loss as the reference), and the saliency of every expert per
layer (frequency, router-weight mass, REAP, neuron statistics when tracked; kept experts
marked).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moescope import __version__
from moescope.plots import new_figure
from moescope.report import html as H
from moescope.report.analysis_report import FigureSet, WriteBytes, WriteText
from moescope.report.fmt import fmt_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moescope.prune.run import PruneResult

__all__ = ["render_prune_report", "tradeoff_figure"]

_STYLE = {
    "saliency": ("#1f77b4", "o", "REAP saliency"),
    "frequency": ("#2ca02c", "s", "frequency"),
    "weight": ("#9467bd", "^", "router-weight mass"),
    "reverse": ("#d62728", "v", "reverse saliency (control)"),
}


def tradeoff_figure(result: PruneResult, dpi: int = 100) -> Figure:
    """Held-out loss against experts kept per layer, one line per ordering; the
    unpruned model's loss as a dashed line."""
    fig = new_figure(7.0, 4.2, dpi)
    ax = fig.add_subplot(1, 1, 1)
    base = next((p for p in result.curve if p.ordering == "none"), None)
    for by, (colour, marker, label) in _STYLE.items():
        pts = sorted((p for p in result.curve if p.ordering == by), key=lambda p: p.kept)
        if base is not None and pts:
            pts.append(base)
        if pts:
            ax.plot(
                [p.kept for p in pts],
                [p.loss for p in pts],
                marker=marker,
                color=colour,
                label=label,
            )
    if base is not None:
        ax.axhline(base.loss, color="#5f6368", linestyle="--", linewidth=1, label="unpruned")
    ax.axvline(result.kept, color="#b06000", linestyle=":", linewidth=1, label="kept in checkpoint")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"experts kept per layer (of {result.num_experts})")
    ax.set_ylabel("evaluation loss (nats / token)")
    ax.set_title("Pruning trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n:,} B ({n / 2**20:.2f} MiB)"


def _overview(result: PruneResult) -> H.Section:
    s = H.Section("overview", "Overview")
    before, after = result.checkpoint_bytes_before, result.checkpoint_bytes_after
    saved = None if before is None or after is None else before - after
    items: list[tuple[str, object]] = [
        ("model", f"{result.source} ({result.model_type})"),
        ("experts per layer", f"{result.num_experts} -> {result.kept} (top-{result.top_k})"),
        ("ordering", result.by),
        ("router groups", result.num_groups),
        ("calibration tokens", f"{result.calibration_tokens:,}"),
        ("evaluation tokens", f"{result.eval_tokens:,} ({result.eval_source})"),
        ("parameters", f"{result.params_before:,} -> {result.params_after:,}"),
        ("removed tensors", _bytes(result.removed_bytes)),
        ("checkpoint weight files", f"{_bytes(before)} -> {_bytes(after)}"),
        ("checkpoint smaller by", _bytes(saved)),
        ("config fields set", ", ".join(result.config_fields) or "-"),
        ("pruned checkpoint", result.out),
    ]
    s.add(H.key_values(items))
    for note in result.notes:
        s.add(H.paragraph(note, "banner note"))
    return s


def _curve(result: PruneResult, figs: FigureSet) -> H.Section:
    s = H.Section("tradeoff", "Keep vs loss")
    if not result.curve:
        return s.add(H.paragraph("No trade-off was measured (no held-out tokens or levels)."))
    s.add(
        H.paragraph(
            f"Loss on the evaluation tokens ({result.eval_source}) of the model pruned to "
            "each number of experts per layer, by each ordering. The reverse ordering keeps the least salient experts: the distance "
            "between it and the saliency line is what the measurement buys."
        )
    )
    s.add(figs.embed("tradeoff", lambda: tradeoff_figure(result), "keep vs loss"))
    base = next((p for p in result.curve if p.ordering == "none"), None)
    orders = [o for o in _STYLE if any(p.ordering == o for p in result.curve)]
    levels = sorted({p.kept for p in result.curve if p.ordering != "none"}, reverse=True)
    rows: list[list[object]] = []
    if base is not None:
        first: list[object] = [f"{base.kept} (unpruned)", f"{base.params:,}"]
        rows.append(first + [f"{base.loss:.4f} (ppl {base.perplexity:.3f})" for _ in orders])
    for n in levels:
        pts = {p.ordering: p for p in result.curve if p.kept == n and p.ordering != "none"}
        params = next(iter(pts.values())).params
        cells: list[object] = [str(n), f"{params:,}"]
        for o in orders:
            p = pts.get(o)
            cells.append("-" if p is None else f"{p.loss:.4f} ({p.delta:+.4f})")
        rows.append(cells)
    headers = ["experts kept", "parameters"] + [_STYLE[o][2] for o in orders]
    s.add(H.table(headers, rows, left=1))
    return s


def _saliency(result: PruneResult) -> H.Section:
    s = H.Section("saliency", "Saliency per expert")
    s.add(
        H.paragraph(
            "frequency: slots routed to the expert; weight mass: sum of its combine weights; "
            "REAP: mean of gate weight x norm of its output over the slots routed to it."
        )
    )
    for sal in result.saliency:
        kept = set(result.keep.get(sal.layer, []))
        neurons = sal.activated_neurons is not None
        headers = ["expert", "kept", "frequency", "weight mass", "REAP"]
        if neurons:
            headers += ["activated neurons", "dead neurons"]
        rows = []
        for i in range(sal.num_experts):
            row: list[Any] = [
                str(i),
                "yes" if i in kept else "pruned",
                f"{int(sal.frequency[i]):,}",
                fmt_number(float(sal.weight_mass[i])),
                "-" if sal.reap is None else fmt_number(float(sal.reap[i])),
            ]
            if neurons:
                a = sal.activated_neurons
                dn = sal.dead_neurons
                row += [
                    "-" if a is None or math.isnan(a[i]) else f"{a[i]:.1f}",
                    "-" if dn is None or math.isnan(dn[i]) else f"{dn[i]:.0f}",
                ]
            rows.append(row)
        s.add(f"<h3>{H.escape(sal.layer)}</h3>", H.table(headers, rows, left=2))
    return s


def render_prune_report(
    result: PruneResult,
    out_dir: str | Path,
    *,
    write_bytes: WriteBytes,
    write_text: WriteText,
) -> Path:
    """Write ``tradeoff.png`` and ``report.html`` of ``result`` into ``out_dir`` with the
    given safe writers (the report layer opens no file itself); returns the report's
    path."""
    out = Path(out_dir)
    figs = FigureSet(out, write_bytes)
    sections = [_overview(result), _curve(result, figs), _saliency(result)]
    if figs.errors:
        sections[0].add(*(H.paragraph(e, "banner note") for e in figs.errors))
    doc = H.page(
        f"moescope prune: {result.source}",
        sections,
        subtitle=f"{result.num_experts} -> {result.kept} experts per layer by {result.by}",
        footer=f"moescope {__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{result.seconds:.1f} s",
    )
    return write_text(out, "report.html", doc)
