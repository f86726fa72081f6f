"""Render an :class:`~moescope.analysis.agreement.AgreementResult` as ``report.html`` + PNGs.

Rendering only (every number was computed by :mod:`moescope.analysis.agreement`), in the
style of the compare report: the verdict first, then agreement per layer (figure and
table, with chance levels), agreement by position in the sequence, the experts that flip
most (a layers x experts figure and a table), and the token ids and positions that
disagree most.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moescope import __version__
from moescope.plots import clip, colormap, new_figure, set_ticks, short_names
from moescope.report import html as H
from moescope.report.analysis_report import FigureSet, WriteBytes, WriteText
from moescope.report.fmt import fmt_number
from moescope.report.verdict import short_layer_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moescope.analysis.agreement import AgreementResult

__all__ = ["agreement_bars", "expert_flips", "position_lines", "render_agreement"]

_METRICS = (
    ("exact", "exact top-k set", "#1f77b4"),
    ("jaccard", "mean Jaccard", "#2ca02c"),
    ("top1", "top-1", "#d62728"),
    ("weighted_overlap", "weighted overlap", "#9467bd"),
)


def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x:.2%}"


def agreement_bars(res: AgreementResult, dpi: int = 100) -> Figure:
    """Per layer: exact set match, mean Jaccard, top-1 and (with weights) weighted overlap;
    dotted lines at the chance levels of independent uniform routing."""
    names, pattern = short_names([x.layer_a for x in res.layers])
    metrics = [m for m in _METRICS if np.isfinite([getattr(x, m[0]) for x in res.layers]).any()]
    x = np.arange(len(names))
    w = 0.8 / max(1, len(metrics))
    fig = new_figure(clip(4.0 + 0.35 * len(names), 7.0, 16.0), 3.8, dpi)
    ax = fig.add_subplot()
    lows = []
    for j, (attr, label, colour) in enumerate(metrics):
        v = np.array([getattr(lay, attr) for lay in res.layers], dtype=np.float64)
        lows.append(np.nanmin(v) if np.isfinite(v).any() else 1.0)
        ax.bar(x + (j - (len(metrics) - 1) / 2) * w, np.nan_to_num(v), w, color=colour, label=label)
    for attr, colour in (("exact", "#1f77b4"), ("top1", "#d62728")):
        c = res.chance.get(attr, float("nan"))
        if np.isfinite(c):
            ax.axhline(c, color=colour, linestyle=":", linewidth=1)
    low = min(lows) if lows else 1.0
    # Zoom in when everything agrees closely: differences of 0.1 % must stay visible.
    ax.set_ylim(max(0.0, low - (1 - low) * 0.5 - 0.01) if low > 0.5 else 0.0, 1.0)
    set_ticks(ax, "x", len(names), names, 30)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    ax.set_ylabel("agreement")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    ax.set_title(f"Routing agreement: {res.label_a} vs {res.label_b}", fontsize="medium")
    return fig


def position_lines(res: AgreementResult, dpi: int = 100) -> Figure:
    """Exact top-k set match by position bucket (0, 1, 2-3, 4-7, ...), one line per layer."""
    labels = res.position_labels
    fig = new_figure(clip(3.0 + 0.5 * len(labels), 7.0, 14.0), 3.6, dpi)
    ax = fig.add_subplot()
    names, _ = short_names([x.layer_a for x in res.layers])
    cmap = colormap("viridis")
    for i, lay in enumerate(res.layers):
        colour = cmap(i / max(1, len(res.layers) - 1))
        ax.plot(
            np.arange(len(labels)),
            lay.position_exact,
            marker=".",
            color=colour,
            label=f"layer {names[i]}" if names[i].isdigit() else names[i],
        )
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("exact top-k set match")
    ax.grid(alpha=0.3)
    if len(res.layers) <= 12:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    ax.set_title("Agreement by position", fontsize="medium")
    return fig


def expert_flips(res: AgreementResult, dpi: int = 100) -> Figure:
    """Layers x experts: flip rate = (lost + gained) / (chosen by A + chosen by B)."""
    names, pattern = short_names([x.layer_a for x in res.layers])
    m = np.stack([lay.expert_flip_rate for lay in res.layers])
    fig = new_figure(
        clip(4.0 + 0.25 * m.shape[1], 7.0, 16.0), clip(1.6 + 0.35 * len(names), 3.0, 12.0), dpi
    )
    ax = fig.add_subplot()
    vmax = float(np.nanmax(m)) if np.isfinite(m).any() and np.nanmax(m) > 0 else 1.0
    im = ax.imshow(
        np.ma.masked_invalid(m),
        aspect="auto",
        interpolation="nearest",
        cmap=colormap("magma_r"),
        vmin=0.0,
        vmax=vmax,
    )
    set_ticks(ax, "x", m.shape[1], None, 32)
    set_ticks(ax, "y", len(names), names, 24)
    ax.set_xlabel("expert")
    ax.set_ylabel(f"layer ({pattern})" if pattern else "layer")
    fig.colorbar(im, ax=ax, label="flip rate", shrink=0.9)
    ax.set_title("Where the experts differ", fontsize="medium")
    return fig


def render_agreement(
    res: AgreementResult,
    out_dir: str | Path,
    *,
    write_bytes: WriteBytes,
    write_text: WriteText,
) -> Path:
    """Write the figures and ``report.html`` of ``res`` into ``out_dir`` with the given
    writers; returns the report path."""
    out = Path(out_dir)
    figs = FigureSet(out, write_bytes)
    short = short_layer_labels([x.layer_a for x in res.layers])
    a, b = res.label_a, res.label_b

    lead = H.Section("verdict", "Verdict", cls=f"verdict {res.status}")
    lead.add(H.paragraph(res.verdict, "headline"))
    lead.add(
        H.paragraph(
            f"Exact = the same set of {res.top_k} experts; chance for independent uniform "
            f"routing over {res.num_experts} experts: exact {_pct(res.chance['exact'])}, "
            f"top-1 {_pct(res.chance['top1'])}, Jaccard {fmt_number(res.chance['jaccard'])}."
        )
    )
    sections: list[H.Section] = []

    ov = H.Section("overview", "Overview")
    rows = [
        ["source", _src(res.source_a), _src(res.source_b)],
        ["combine weights", _yes(res.weights_kind in ("both", "a")), _yes(res.weights_kind in ("both", "b"))],
        ["sequences compared", fmt_number(res.num_sequences), fmt_number(res.num_sequences)],
        ["sequences left out (one side only)", fmt_number(res.only_a), fmt_number(res.only_b)],
    ]  # fmt: skip
    ov.add(H.table(["", a, b], rows, left=3))
    ov.add(
        H.key_values(
            [
                ("tokens", fmt_number(res.num_tokens)),
                ("MoE layers (matched by ordinal)", fmt_number(len(res.layers))),
                ("experts, top-k", f"{res.num_experts}, {res.top_k}"),
                ("exact top-k set match", _pct(res.exact)),
                ("mean Jaccard", fmt_number(res.jaccard)),
                ("top-1 agreement", _pct(res.top1)),
                ("weighted overlap", fmt_number(res.weighted_overlap)),
            ]
        )
    )
    sections.append(ov)

    ly = H.Section("layers", "Agreement per layer")
    if res.layers:
        ly.add(figs.embed("agreement", lambda: agreement_bars(res), "agreement per layer"))
    ly.add(
        H.table(
            ["layer", f"layer in {b}", "tokens", "exact", "Jaccard", "top-1", "weighted overlap"],
            [
                [
                    x.layer_a,
                    x.layer_b,
                    fmt_number(x.tokens),
                    _pct(x.exact),
                    fmt_number(x.jaccard),
                    _pct(x.top1),
                    fmt_number(x.weighted_overlap),
                ]
                for x in res.layers
            ],
            left=2,
        )
    )
    if res.weights_kind in ("a", "b"):
        side = a if res.weights_kind == "a" else b
        ly.add(
            H.paragraph(
                f"Only {side} has combine weights: the weighted overlap is the share of "
                f"{side}'s weight mass on experts the other side also chose.",
                "banner note",
            )
        )
    sections.append(ly)

    ps = H.Section("position", "Agreement by position")
    if res.layers and res.num_tokens:
        ps.add(figs.embed("position", lambda: position_lines(res), "agreement by position"))
    heads = ["layer"] + [f"pos {lab}" for lab in res.position_labels]
    ps.add(
        H.table(
            heads,
            [
                [short.get(x.layer_a, x.layer_a)] + [_pct(v) for v in x.position_exact]
                for x in res.layers
            ]
            + [["tokens"] + [fmt_number(v) for v in (res.layers[0].position_tokens if res.layers else [])]],
        )
    )  # fmt: skip
    sections.append(ps)

    ex = H.Section("experts", "Experts that disagree most")
    ex.add(
        H.paragraph(
            f"lost: {a} chose the expert and {b} did not; gained: the reverse; flip rate = "
            "(lost + gained) / (times chosen by either side)."
        )
    )
    if any(lay.worst_experts(1) for lay in res.layers):
        ex.add(figs.embed("experts", lambda: expert_flips(res), "expert flip rate per layer"))
    rows = []
    for lay in res.layers:
        for w in lay.worst_experts(5):
            rows.append(
                [
                    short.get(lay.layer_a, lay.layer_a),
                    fmt_number(w["expert"]),
                    fmt_number(w["flips"]),
                    fmt_number(w["lost"]),
                    fmt_number(w["gained"]),
                    _pct(w["flip_rate"]),
                ]
            )
    if rows:
        ex.add(H.table(["layer", "expert", "flips", "lost", "gained", "flip rate"], rows))
    else:
        ex.add(H.paragraph("No expert differs: every token went to the same experts."))
    sections.append(ex)

    tk = H.Section("tokens", "Tokens that disagree most")
    if res.worst_tokens:
        tk.add(
            H.paragraph(
                "Token ids by the share of their (occurrence, layer) pairs whose top-k sets differ."
            )
        )
        tk.add(
            H.table(
                ["token id", "occurrences", "disagreement"],
                [[fmt_number(t["token_id"]), fmt_number(t["count"]), _pct(t["disagreement"])] for t in res.worst_tokens],
            )
        )  # fmt: skip
    if res.worst_positions:
        tk.add(
            H.table(
                ["sequence", "position", "token id", "layers disagreeing", "mean Jaccard"],
                [
                    [p["seq_id"], fmt_number(p["position"]), fmt_number(p["token_id"]),
                     fmt_number(p["layers_disagreeing"]), fmt_number(p["mean_jaccard"])]
                    for p in res.worst_positions
                ],
            )
        )  # fmt: skip
    if not res.worst_tokens and not res.worst_positions:
        tk.add(H.paragraph("No token disagrees."))
    sections.append(tk)

    if figs.errors:
        sections.append(
            H.Section("problems", "Problems").add(
                "<ul>" + "".join(f"<li>{H.escape(e)}</li>" for e in figs.errors) + "</ul>"
            )
        )
    document = H.page(
        f"moescope agree: {a} vs {b}",
        sections,
        subtitle=f"{a}: {_src(res.source_a)}; {b}: {_src(res.source_b)}",
        preamble=[H.paragraph(n, "banner note") for n in res.notes],
        lead=[lead],
        footer=f"moescope {__version__}; generated {time.strftime('%Y-%m-%d %H:%M:%S')}",
    )
    return write_text(out, "report.html", document)


def _yes(x: bool) -> str:
    return "yes" if x else "no"


def _src(meta: dict[str, object]) -> str:
    keys = ("engine", "model", "dtype", "file")
    parts = [f"{k} {meta[k]}" for k in keys if meta.get(k) not in (None, "")]
    return ", ".join(parts) or "-"
