"""Render a :class:`~moescope.analysis.compare.Comparison` as ``report.html`` + PNGs.

Rendering only (the numbers are computed by :mod:`moescope.analysis.compare`). Figures:
expert load of both runs side by side (one heatmap each, one colour scale), the
Jensen-Shannon divergence per layer, balance metrics per layer, and, when a side is a
training log, its metrics over steps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope import __version__
from moescope.plots import LOAD_LABEL, clip, colormap, new_figure, set_ticks, short_names
from moescope.report import html as H
from moescope.report.analysis_report import FigureSet, WriteBytes, WriteText
from moescope.report.fmt import fmt_number
from moescope.report.verdict import alerts_table, finding_html, plural, short_layer_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moescope.analysis.compare_result import Comparison, RunSide

__all__ = [
    "balance_figure",
    "divergence_bars",
    "render_comparison",
    "series_figure",
    "usage_side_by_side",
]

_COLOURS = ("#1f77b4", "#d62728")  # A, B: the same two colours in every figure


def _load_matrix(cmp: Comparison, which: str) -> np.ndarray:
    rows = [x.usage_a if which == "a" else x.usage_b for x in cmp.layers]
    e = max(r.shape[0] for r in rows)
    m = np.full((len(rows), e), np.nan)
    for i, r in enumerate(rows):
        m[i, : r.shape[0]] = r * r.shape[0]  # load: 1 = uniform
    return m


def usage_side_by_side(cmp: Comparison, dpi: int = 100) -> Figure:
    """Two heatmaps (layers x experts) of the expert load (usage fraction x E; 1 =
    uniform), A left and B right, on one colour scale."""
    ma, mb = _load_matrix(cmp, "a"), _load_matrix(cmp, "b")
    names, pattern = short_names([x.layer for x in cmp.layers])
    e = max(ma.shape[1], mb.shape[1])
    vmax = float(np.nanmax([np.nanmax(ma), np.nanmax(mb), 1.0]))
    fig = new_figure(clip(4.0 + 0.3 * e, 8.0, 16.0), clip(1.6 + 0.35 * len(names), 3.0, 12.0), dpi)
    axes = fig.subplots(1, 2, sharey=True)
    im = None
    for ax, m, side in zip(axes, (ma, mb), (cmp.a, cmp.b), strict=True):
        im = ax.imshow(
            np.ma.masked_invalid(m),
            aspect="auto",
            interpolation="nearest",
            cmap=colormap("viridis"),
            vmin=0.0,
            vmax=vmax,
        )
        ax.set_title(side.label, fontsize="medium")
        ax.set_xlabel("expert")
        set_ticks(ax, "x", m.shape[1], None, 16)
    set_ticks(axes[0], "y", len(names), names, 24)
    axes[0].set_ylabel(f"layer ({pattern})" if pattern else "layer")
    assert im is not None  # set by the loop over the two panels
    fig.colorbar(im, ax=list(axes), label=LOAD_LABEL, shrink=0.9)
    fig.suptitle("Expert load per layer")
    return fig


def divergence_bars(cmp: Comparison, dpi: int = 100) -> Figure:
    """Jensen-Shannon divergence (nats) between the two runs' usage per layer; the y axis
    is scaled to the data (the bound is ln 2 = 0.693)."""
    names, pattern = short_names([x.layer for x in cmp.layers])
    js = np.array([x.js for x in cmp.layers], dtype=np.float64)
    fig = new_figure(clip(4.0 + 0.2 * len(names), 7.0, 16.0), 3.6, dpi)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(names)), np.nan_to_num(js), color="#7570b3")
    top = float(np.nanmax(js)) if np.isfinite(js).any() else 0.0
    ax.set_ylim(0, min(math.log(2), top * 1.2) if top > 0 else 0.01)
    set_ticks(ax, "x", len(names), names, 30)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    ax.set_ylabel("JS divergence (nats, max ln 2)")
    ax.set_title(f"Routing divergence: {cmp.a.label} vs {cmp.b.label}", fontsize="medium")
    return fig


def balance_figure(cmp: Comparison, dpi: int = 100) -> Figure:
    """Per layer, A and B side by side: CV of usage, max/mean and unused experts."""
    names, pattern = short_names([x.layer for x in cmp.layers])
    x = np.arange(len(names))
    panels = (
        ("cv", "CV of usage (0 = balanced)"),
        ("max_over_mean", "max / mean load"),
        ("unused_experts", "unused experts"),
    )
    fig = new_figure(clip(5.0 + 0.25 * len(names), 7.5, 16.0), 7.0, dpi)
    axes = fig.subplots(len(panels), 1, sharex=True)
    w = 0.4
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for j, side in enumerate((cmp.a, cmp.b)):
            v = np.array([lc.metrics[metric][j] for lc in cmp.layers], dtype=np.float64)
            ax.bar(
                x + (j - 0.5) * w, np.nan_to_num(v), width=w, color=_COLOURS[j], label=side.label
            )
        ax.set_ylabel(label, fontsize="small")
        vals = [lc.metrics[metric][j] for lc in cmp.layers for j in (0, 1)]
        top = max((float(v) for v in vals if math.isfinite(float(v))), default=0.0)
        # An all-zero panel (no unused expert in either run) keeps a readable 0..1 axis.
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        if metric == "unused_experts":
            ax.yaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    set_ticks(axes[-1], "x", len(names), names, 30)
    axes[-1].set_xlabel(f"layer ({pattern})" if pattern else "layer")
    fig.suptitle("Balance per layer")
    return fig


_SERIES_LABELS = {
    "avg_expert_cv": "mean CV over layers",
    "max_max_over_mean": "max of max/mean",
    "total_unused_experts": "unused experts (all layers)",
    "avg_routing_entropy_norm": "routing entropy / log E",
    "avg_load_entropy_norm": "load entropy / log E",
    "avg_aux_loss": "aux loss (mean over layers)",
}


def series_figure(sides: list[RunSide], dpi: int = 100) -> Figure:
    """The training logs' metrics over steps, one panel per metric, one line per run."""
    metrics = [m for m in _SERIES_LABELS if any(m in s.series for s in sides)]
    cols = 2
    rows = math.ceil(len(metrics) / cols)
    fig = new_figure(11.0, 2.6 * rows + 0.6, dpi)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True)).reshape(-1)
    for ax, metric in zip(axes, metrics, strict=False):
        for side in sides:
            j = 0 if side is sides[0] else 1
            ax.plot(
                side.steps,
                side.series[metric],
                marker="." if len(side.steps) <= 60 else None,
                color=_COLOURS[j],
                label=side.label,
            )
        ax.set_title(_SERIES_LABELS[metric], fontsize="medium")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    for ax in axes[max(0, len(metrics) - cols) : len(metrics)]:
        ax.set_xlabel("step")
    axes[0].legend(frameon=False, fontsize="small")
    fig.suptitle("Routing metrics over training")
    return fig


def _side_rows(cmp: Comparison) -> list[list[str]]:
    a, b = cmp.a, cmp.b
    ga, gb = a.snapshot.aggregates(), b.snapshot.aggregates()

    def row(label: str, fa: Any, fb: Any) -> list[str]:
        return [label, fa, fb]

    rows = [
        row("kind", a.kind, b.kind),
        row("source", a.path, b.path),
        row("what", a.description, b.description),
        row("tokens", fmt_number(a.tokens), fmt_number(b.tokens)),
        row("MoE layers", str(len(a.snapshot.layers)), str(len(b.snapshot.layers))),
    ]
    for key, label in (
        ("avg_expert_cv", "mean CV"),
        ("max_max_over_mean", "max max/mean"),
        ("total_unused_experts", "unused experts"),
        ("avg_load_entropy_norm", "load entropy / log E"),
        ("avg_routing_entropy_norm", "routing entropy / log E"),
    ):
        rows.append(row(label, fmt_number(ga.get(key)), fmt_number(gb.get(key))))
    rows.append(row("alerts", fmt_number(len(a.alerts)), fmt_number(len(b.alerts))))
    return rows


def _verdict(cmp: Comparison, short: dict[str, str]) -> H.Section:
    """The opening section: which run is healthier and why, where they differ most, and
    the findings (with the fix) of each run."""
    a, b = cmp.a, cmp.b
    va, vb = cmp.verdict_a, cmp.verdict_b
    worst = (
        "critical"
        if any(v is not None and v.status == "critical" for v in (va, vb))
        else ("warning" if any(v is not None and v.findings for v in (va, vb)) else "healthy")
    )
    sec = H.Section("verdict", "Verdict", cls=f"verdict {worst}")
    if cmp.healthier is None:
        head = f"{a.label} and {b.label} are equally healthy by moescope's alert rules."
    else:
        other = b.label if cmp.healthier == a.label else a.label
        head = f"{cmp.healthier} is healthier than {other}."
    sec.add(H.paragraph(head, "headline"))
    if cmp.health_reasons:
        sec.add("<ul>" + "".join(f"<li>{H.escape(r)}</li>" for r in cmp.health_reasons) + "</ul>")
    most = cmp.differ_most(3)
    if most:
        parts = [f"{short.get(x.layer, x.layer)} (JS {fmt_number(x.js)} nats)" for x in most]
        sec.add(
            H.paragraph(
                "Where they differ most: " + ", ".join(parts) + " (Jensen-Shannon divergence "
                "of expert usage: 0 = same routing, ln 2 = 0.693 = disjoint experts)."
            )
        )
    elif cmp.layers:
        sec.add(H.paragraph("No layer has the same expert count in both runs: routing is not "
                            "compared expert by expert (see the balance metrics)."))  # fmt: skip
    for side, v in ((a, va), (b, vb)):
        if v is None:
            continue
        sec.add(f"<h3>{H.escape(side.label)}: {H.escape(v.headline)}</h3>")
        for f in v.findings:
            sec.add(finding_html(f, short))
    return sec


def render_comparison(
    cmp: Comparison,
    out_dir: str | Path,
    *,
    write_bytes: WriteBytes,
    write_text: WriteText,
) -> Path:
    """Write the figures and ``report.html`` of ``cmp`` into ``out_dir`` with the given
    writers; returns the report path."""
    out = Path(out_dir)
    figs = FigureSet(out, write_bytes)
    a, b = cmp.a, cmp.b
    sections: list[H.Section] = []
    short = short_layer_labels([x.layer for x in cmp.layers])
    lead = [_verdict(cmp, short)]

    ov = H.Section("overview", "Overview")
    if math.isfinite(cmp.mean_js):
        ov.add(
            H.paragraph(
                f"Mean Jensen-Shannon divergence of expert usage over "
                f"{plural(len(cmp.layers), 'matched layer')}: {fmt_number(cmp.mean_js)} nats "
                "(0 = the same routing, ln 2 = 0.693 = disjoint experts)."
            )
        )
    ov.add(H.table(["", a.label, b.label], _side_rows(cmp), left=3))
    if a.kind == "training" or b.kind == "training":
        ov.add(
            H.paragraph(
                "For a training log, per-layer numbers are those of its last "
                "logged window; the time series below shows every window."
            )
        )
    sections.append(ov)

    us = H.Section("usage", "Expert usage side by side")
    ea = sorted({x.usage_a.shape[0] for x in cmp.layers})
    eb = sorted({x.usage_b.shape[0] for x in cmp.layers})
    if ea != eb:
        us.add(
            H.paragraph(
                f"The runs have different expert counts ({a.label}: E = "
                f"{', '.join(map(str, ea))}; {b.label}: E = {', '.join(map(str, eb))}): each "
                "panel shows its own experts, grey cells are experts the layer does not have. "
                "Load (fraction x E) is comparable across E: 1 = uniform in both.",
                "banner note",
            )
        )
    us.add(
        figs.embed(
            "usage_side_by_side",
            lambda: usage_side_by_side(cmp),
            "expert load per layer, both runs",
            "Load = usage fraction x E (1 = uniform), same colour scale for both.",
        )
    )
    sections.append(us)

    dv = H.Section("divergence", "Divergence per layer")
    if any(math.isfinite(x.js) for x in cmp.layers):
        dv.add(
            figs.embed(
                "divergence", lambda: divergence_bars(cmp), "Jensen-Shannon divergence per layer"
            )
        )
    else:
        dv.add(
            H.paragraph(
                "No divergence to draw: no matched layer has the same number of experts in "
                "both runs (or a side has no tokens), so expert i of one run is not expert i "
                "of the other. Compare the balance metrics below, which do not depend on E "
                "(CV, max/mean, load entropy / log E).",
                "banner note",
            )
        )
    dv.add(
        H.table(
            ["layer", "JS (nats)", f"active experts {a.label}", f"active experts {b.label}"],
            [
                [
                    x.layer,
                    fmt_number(x.js),
                    f"{fmt_number(x.metrics['active_experts'][0])} / {x.usage_a.shape[0]}",
                    f"{fmt_number(x.metrics['active_experts'][1])} / {x.usage_b.shape[0]}",
                ]
                for x in cmp.layers
            ],
        )
    )
    sections.append(dv)

    ba = H.Section("balance", "Balance metrics")
    ba.add(figs.embed("balance", lambda: balance_figure(cmp), "balance metrics per layer"))
    heads = ["layer"]
    for m in ("cv", "max_over_mean", "unused_experts", "load_entropy_norm"):
        heads += [f"{m.replace('_', ' ')} {a.label}", f"{m.replace('_', ' ')} {b.label}"]
    rows = []
    for x in cmp.layers:
        r = [x.layer]
        for m in ("cv", "max_over_mean", "unused_experts", "load_entropy_norm"):
            r += [fmt_number(x.metrics[m][0]), fmt_number(x.metrics[m][1])]
        rows.append(r)
    ba.add(H.table(heads, rows))
    sections.append(ba)

    trained = [s for s in (a, b) if s.kind == "training" and s.steps]
    if trained:
        ts = H.Section("series", "Over training")
        ts.add(figs.embed("series", lambda: series_figure(trained), "routing metrics over steps"))
        sections.append(ts)

    al = H.Section("alerts", f"Alerts ({len(a.alerts):,} / {len(b.alerts):,})")
    al.add(
        H.paragraph(
            "Grouped by rule, as the console groups repeated alerts: one row per rule with "
            "the layers it fired on, how often and since which step, and its worst value. "
            "Every alert is in comparison.json."
        )
    )
    for s, v in ((a, cmp.verdict_a), (b, cmp.verdict_b)):
        al.add(f"<h3>{H.escape(s.label)}: {H.escape(plural(len(s.alerts), 'alert'))}</h3>")
        if not s.alerts or v is None:
            al.add(H.paragraph("No alert."))
            continue
        al.add(alerts_table(v, short))
    sections.append(al)

    if figs.errors:
        sections.append(
            H.Section("problems", "Problems").add(
                "<ul>" + "".join(f"<li>{H.escape(e)}</li>" for e in figs.errors) + "</ul>"
            )
        )
    preamble = [H.paragraph(n, "banner note") for n in cmp.notes]
    if cmp.only_a or cmp.only_b:
        preamble.append(
            H.paragraph(
                f"Layers in one run only: {a.label}: {', '.join(cmp.only_a) or '-'}; "
                f"{b.label}: {', '.join(cmp.only_b) or '-'}",
                "banner note",
            )
        )
    document = H.page(
        f"moescope compare: {a.label} vs {b.label}",
        sections,
        subtitle=f"{a.label}: {a.description}; {b.label}: {b.description}",
        preamble=preamble,
        lead=lead,
        footer=f"moescope {__version__}; generated {time.strftime('%Y-%m-%d %H:%M:%S')}",
    )
    return write_text(out, "report.html", document)
