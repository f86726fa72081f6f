"""Figures of one analysis window (a single :class:`~moescope.stats.snapshot.Snapshot`).

Used by ``moescope analyze`` (:mod:`moescope.report.analysis_report`) beside the heatmap of
:mod:`moescope.plots`: the usage distribution of every layer, entropy and CV per
layer, one layer's co-activation matrix, neuron sparsity and dead neurons, and the
parameter counts. Every function returns a ``matplotlib.figure.Figure`` drawn on the Agg
canvas (no ``pyplot``); sizes are capped so 60 layers x 256 experts stay legible. Needs
the ``plots`` extra (matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope.plots import clip, colormap, new_figure, set_ticks, short_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moescope.stats.snapshot import Snapshot

__all__ = [
    "coactivation_figure",
    "dead_neurons_figure",
    "entropy_cv_figure",
    "neuron_sparsity_figure",
    "params_figure",
    "usage_distribution_figure",
]


def _layers(snapshot: Snapshot) -> tuple[list[str], list[str], str]:
    names = list(snapshot.layers)
    if not names:
        raise ValueError("the snapshot has no layer; nothing to plot.")
    short, pattern = short_names(names)
    return names, short, pattern


def usage_distribution_figure(snapshot: Snapshot, dpi: int = 100, max_lines: int = 12) -> Figure:
    """Per layer, expert loads sorted from the busiest to the idlest (load = fraction x E;
    1 = what a uniform router gives). Up to ``max_lines`` layers as lines; more layers as
    a layers x rank heatmap (same information, no legend)."""
    names, short, pattern = _layers(snapshot)
    e_max = max(s.num_experts for s in snapshot.layers.values())
    m = np.full((len(names), e_max), np.nan)
    for i, n in enumerate(names):
        s = snapshot.layers[n]
        load = np.sort(np.asarray(s.usage_fraction, dtype=np.float64) * s.num_experts)[::-1]
        m[i, : load.shape[0]] = load
    if len(names) <= max_lines:
        fig = new_figure(clip(6.0 + 0.03 * e_max, 7.0, 14.0), 4.0, dpi)
        ax = fig.add_subplot()
        ranks = np.arange(e_max)
        for i, n in enumerate(short):
            ax.plot(ranks, m[i], marker="." if e_max <= 64 else None, label=n)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="uniform")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=min(e_max, 16), integer=True))
        ax.set_xlabel("expert rank (busiest first)")
        ax.set_ylabel("load (usage fraction x E)")
        ax.legend(
            title=pattern or None,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            frameon=False,
        )
    else:
        fig = new_figure(
            clip(6.0 + 0.05 * e_max, 7.0, 16.0), clip(2.0 + 0.15 * len(names), 3.5, 12.0), dpi
        )
        ax = fig.add_subplot()
        im = ax.imshow(
            np.ma.masked_invalid(m),
            aspect="auto",
            interpolation="nearest",
            cmap=colormap("viridis"),
            vmin=0.0,
        )
        set_ticks(ax, "y", len(names), short, 20)
        ax.set_ylabel(f"layer ({pattern})" if pattern else "layer")
        ax.set_xlabel("expert rank (busiest first)")
        fig.colorbar(im, ax=ax, label="load (1 = uniform)", shrink=0.9)
    ax.set_title("Expert load per layer, sorted")
    return fig


def _bar_panel(
    ax: Any,
    x: np.ndarray,
    values: np.ndarray,
    labels: list[str],
    ylabel: str,
    title: str,
    colour: str,
) -> None:
    ax.bar(x, np.nan_to_num(values, nan=0.0), color=colour)
    set_ticks(ax, "x", len(labels), labels, 30)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")


def entropy_cv_figure(snapshot: Snapshot, dpi: int = 100) -> Figure:
    """Two panels over layers: normalised routing and load entropy (1 = uniform), and the
    coefficient of variation of expert usage (0 = perfectly balanced)."""
    names, short, pattern = _layers(snapshot)
    x = np.arange(len(names))
    stats = [snapshot.layers[n] for n in names]
    r_ent = np.array([s.routing_entropy_norm for s in stats], dtype=np.float64)
    l_ent = np.array([s.load_entropy_norm for s in stats], dtype=np.float64)
    cv = np.array([s.cv for s in stats], dtype=np.float64)
    fig = new_figure(clip(5.0 + 0.15 * len(names), 7.0, 16.0), 6.0, dpi)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    w = 0.4
    ax1.bar(x - w / 2, np.nan_to_num(r_ent), width=w, label="routing entropy / log E")
    ax1.bar(x + w / 2, np.nan_to_num(l_ent), width=w, label="load entropy / log E")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("normalised entropy")
    # Outside the axes: inside, the legend covered the bars of balanced layers (~1).
    ax1.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax1.set_title(
        "Routing entropy (per token) and load entropy (over the window)", fontsize="medium"
    )
    _bar_panel(ax2, x, cv, short, "CV of usage counts", "Usage imbalance (std / mean)", "#d95f02")
    ax2.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    return fig


def coactivation_figure(snapshot: Snapshot, layer: str, dpi: int = 100) -> Figure:
    """[E, E] heatmap of one layer's co-activation: cell (e, f) = tokens that chose both
    e and f, divided by the tokens of the window (diagonal: tokens that chose e)."""
    s = snapshot.layers[layer]
    if s.coactivation is None:
        raise ValueError(
            f"layer {layer!r} has no co-activation matrix (monitor coactivation=False)"
        )
    e = s.num_experts
    m = np.asarray(s.coactivation, dtype=np.float64) / max(s.num_tokens, 1)
    side = clip(3.0 + 0.08 * e, 5.0, 12.0)
    fig = new_figure(side + 1.2, side, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(m, interpolation="nearest", cmap=colormap("magma"), vmin=0.0)
    set_ticks(ax, "x", e, None, 20)
    set_ticks(ax, "y", e, None, 20)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(f"Co-activation: {layer}", fontsize="medium")
    fig.colorbar(im, ax=ax, label="fraction of tokens choosing both", shrink=0.9)
    return fig


def _neuron_layers(snapshot: Snapshot) -> list[str]:
    return [n for n, s in snapshot.layers.items() if s.has_neurons]


def neuron_sparsity_figure(snapshot: Snapshot, dpi: int = 100) -> Figure:
    """Neuron sparsity (1 - mean activated / I) per layer (bars) and per expert (a layers
    x experts heatmap; grey = expert without tokens)."""
    names = _neuron_layers(snapshot)
    if not names:
        raise ValueError("no neuron statistics in the snapshot (run with neurons=True)")
    short, pattern = short_names(names)
    e_max = max(snapshot.layers[n].num_experts for n in names)
    per_layer = np.array([snapshot.layers[n].neuron_sparsity for n in names], dtype=np.float64)
    m = np.full((len(names), e_max), np.nan)
    for i, n in enumerate(names):
        v = snapshot.layers[n].expert_sparsity
        if v is not None:
            m[i, : len(v)] = np.asarray(v, dtype=np.float64)
    fig = new_figure(
        clip(6.0 + 0.1 * e_max, 9.0, 16.0), clip(2.5 + 0.22 * len(names), 4.0, 12.0), dpi
    )
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 2])
    ax1.barh(np.arange(len(names)), np.nan_to_num(per_layer), color="#1b9e77")
    ax1.set_ylim(len(names) - 0.5, -0.5)
    set_ticks(ax1, "y", len(names), short, 20)
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("neuron sparsity")
    ax1.set_ylabel(f"layer ({pattern})" if pattern else "layer")
    ax1.set_title("per layer", fontsize="medium")
    im = ax2.imshow(
        np.ma.masked_invalid(m),
        aspect="auto",
        interpolation="nearest",
        cmap=colormap("viridis"),
        vmin=0.0,
        vmax=1.0,
    )
    set_ticks(ax2, "x", e_max, None, 20)
    set_ticks(ax2, "y", len(names), short, 20)
    ax2.set_xlabel("expert")
    ax2.set_title("per expert", fontsize="medium")
    fig.colorbar(im, ax=ax2, label="neuron sparsity", shrink=0.9)
    fig.suptitle("Neuron sparsity (share of an expert's neurons below the threshold)")
    return fig


def dead_neurons_figure(snapshot: Snapshot, dpi: int = 100) -> Figure:
    """Share of each expert's neurons that never fired in the window (layers x experts;
    grey = expert without tokens, whose neurons cannot be judged)."""
    names = [
        n for n in _neuron_layers(snapshot) if snapshot.layers[n].expert_dead_neurons is not None
    ]
    if not names:
        raise ValueError(
            "no dead-neuron statistics in the snapshot (neurons=True, per_neuron=True)"
        )
    short, pattern = short_names(names)
    e_max = max(snapshot.layers[n].num_experts for n in names)
    m = np.full((len(names), e_max), np.nan)
    for i, n in enumerate(names):
        s = snapshot.layers[n]
        v = np.asarray(s.expert_dead_neurons, dtype=np.float64)
        m[i, : len(v)] = v / float(s.intermediate_size or 1)
    fig = new_figure(
        clip(3.5 + 0.09 * e_max, 6.0, 16.0), clip(1.8 + 0.22 * len(names), 3.0, 12.0), dpi
    )
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    vmax = max(float(finite.max()) if finite.size else 0.0, 1e-3)
    im = ax.imshow(
        np.ma.masked_invalid(m),
        aspect="auto",
        interpolation="nearest",
        cmap=colormap("Reds"),
        vmin=0.0,
        vmax=vmax,
    )
    set_ticks(ax, "x", e_max, None, 20)
    set_ticks(ax, "y", len(names), short, 20)
    ax.set_xlabel("expert")
    ax.set_ylabel(f"layer ({pattern})" if pattern else "layer")
    ax.set_title("Dead neurons (never above the threshold in the window)", fontsize="medium")
    fig.colorbar(im, ax=ax, label="fraction of the expert's neurons", shrink=0.9)
    return fig


def params_figure(values: Mapping[str, float], title: str, dpi: int = 100) -> Figure:
    """Horizontal bars of parameter counts, e.g. ``{"total": ..., "active (theoretical)":
    ..., "active (measured)": ...}``; each bar is labelled with its value."""
    labels = list(values)
    vals = np.array([float(values[k]) for k in labels], dtype=np.float64)
    fig = new_figure(8.0, clip(1.2 + 0.5 * len(labels), 2.5, 6.0), dpi)
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    ax.barh(
        y, np.nan_to_num(vals), color=["#7570b3", "#1b9e77", "#d95f02", "#e7298a"][: len(labels)]
    )
    ax.set_yticks(y, labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    top = float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0
    ax.set_xlim(0, top * 1.3 if top > 0 else 1.0)
    for yi, v in enumerate(vals):  # bar yi sits at y[yi] == yi
        if math.isfinite(v):
            ax.text(v, yi, f" {_short(v)}", va="center", fontsize="small")
    ax.set_xlabel("parameters")
    ax.set_title(title, fontsize="medium")
    return fig


def _short(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:,.0f}"
