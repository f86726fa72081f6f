"""Figures and HTML of the token-level routing analyses (matplotlib + escaped HTML).

The math is in :mod:`moescope.stats.routing`, the
capture in :mod:`moescope.stats.token_recorder` (:class:`RoutingRecorder`,
:class:`TokenRouting`), token decoding in :mod:`moescope.analysis.decode`.

- :func:`domain_distribution_figure`: grouped bars per expert, one colour per domain, a
  dashed 1/E line (Mixtral Fig. 7);
- :func:`divergence_figure`: mean / max Jensen-Shannon divergence between domains per
  layer, y axis scaled to the data (the bound ln 2 is named in the label, not drawn);
- :func:`same_expert_figure`: consecutive-token same-expert rate against chance;
- :func:`agreement_figure`: router agreement between checkpoints against K / E;
- :func:`colored_tokens_html`: a passage as spans coloured by first-choice expert, with
  :func:`expert_palette` (up to 20 maximally distinct colours, then golden-angle hues).
"""

from __future__ import annotations

import colorsys
import html
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope.plots import clip, new_figure, set_ticks, short_names, tick_positions
from moescope.stats.routing import (
    DomainDivergence,
    SameExpertRate,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "agreement_figure",
    "colored_tokens_html",
    "divergence_figure",
    "domain_distribution_figure",
    "expert_palette",
    "same_expert_figure",
]


# ---------------------------------------------------------------------------- token view

_TAB10 = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
# 20 colours chosen to be told apart (Trubetskoy's "20 simple distinct colours"), ordered
# so that any prefix is as spread out as possible; tab20 pairs light/dark shades of one hue,
# which made experts 2k and 2k + 1 look alike.
_DISTINCT20 = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#ffe119",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#800000",
    "#469990",
    "#fabed4",
    "#000075",
    "#9a6324",
    "#dcbeff",
    "#808000",
    "#aaffc3",
    "#ffd8b1",
    "#a9a9a9",
    "#fffac8",
]
_NO_EXPERT = "#eeeeee"


def expert_palette(num_experts: int) -> list[str]:
    """E qualitative colours (hex): matplotlib's tab10 up to 10 experts, 20 mutually
    distinct colours up to 20 (no two of them shades of one hue), beyond that
    golden-angle hues over three lightness levels (neighbouring ids far apart)."""
    if num_experts <= 10:
        return _TAB10[:num_experts]
    if num_experts <= 20:
        return _DISTINCT20[:num_experts]
    out = []
    for e in range(num_experts):
        hue = (e * 0.618033988749895) % 1.0
        light = (0.45, 0.62, 0.78)[e % 3]
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.65)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def _text_colour(bg: str) -> str:
    r, g, b = (int(bg[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#ffffff"


def colored_tokens_html(
    token_strings: Sequence[str],
    expert_ids: Sequence[int],
    num_experts: int,
    *,
    title: str | None = None,
    legend: bool = True,
) -> str:
    """An HTML fragment: each token a ``<span class="moe-tok">`` whose background is its
    expert's colour (:func:`expert_palette`), as in Mixtral's Fig. 8.

    Text is HTML-escaped; spaces and newlines are preserved (``white-space: pre-wrap``,
    monospace). Each span has a ``title`` tooltip ``expert e``; ids outside [0, E) are
    grey. The legend (``class="moe-legend"``) lists the experts that occur.
    """
    if len(token_strings) != len(expert_ids):
        raise ValueError(
            f"one expert id per token needed: {len(token_strings)} tokens, "
            f"{len(expert_ids)} expert ids"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    pal = expert_palette(num_experts)
    parts: list[str] = ['<div class="moe-token-view">']
    if title:
        parts.append(f'<div class="moe-token-title"><b>{html.escape(title)}</b></div>')
    parts.append(
        '<div class="moe-tokens" style="white-space:pre-wrap;font-family:monospace;'
        'line-height:1.6;">'
    )
    for s, e in zip(token_strings, expert_ids, strict=True):
        e = int(e)
        bg = pal[e] if 0 <= e < num_experts else _NO_EXPERT
        label = f"expert {e}" if 0 <= e < num_experts else "no routed expert"
        parts.append(
            f'<span class="moe-tok" style="background:{bg};color:{_text_colour(bg)}" '
            f'title="{label}">{html.escape(str(s), quote=True)}</span>'
        )
    parts.append("</div>")
    if legend:
        used = sorted({int(e) for e in expert_ids if 0 <= int(e) < num_experts})
        items = "".join(
            f'<span class="moe-legend-item" style="background:{pal[e]};'
            f'color:{_text_colour(pal[e])};padding:0 0.4em;margin-right:0.3em">e{e}</span>'
            for e in used
        )
        parts.append(f'<div class="moe-legend" style="margin-top:0.4em">experts: {items}</div>')
    parts.append("</div>")
    return "".join(parts)


# ---------------------------------------------------------------------------- figures


def _pick_layers(layers: Sequence[str], chosen: str | Sequence[str] | None, n: int) -> list[str]:
    if isinstance(chosen, str):
        chosen = [chosen]
    if chosen is not None:
        missing = [c for c in chosen if c not in layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the data; available: {list(layers)}")
        return list(chosen)
    if len(layers) <= n:
        return list(layers)
    pick = np.unique(np.round(np.linspace(0, len(layers) - 1, n)).astype(int))
    return [layers[i] for i in pick]


def domain_distribution_figure(
    dists: Mapping[str, Mapping[str, np.ndarray]],
    layers: str | Sequence[str] | None = None,
    *,
    max_layers: int = 4,
    title: str | None = None,
    dpi: int = 100,
    max_size: tuple[float, float] = (16.0, 14.0),
) -> Figure:
    """Grouped bars: per expert, one bar per domain (one colour each), one panel per
    layer, dashed line at the uniform 1 / E (Mixtral, Jiang et al. 2024, Fig. 7).

    Args:
        dists: ``{domain: {layer: [E] fraction}}`` (:func:`expert_distribution`).
        layers: one layer or several; default up to ``max_layers`` evenly spaced layers
            (first and last included).
    """
    domains = list(dists)
    if not domains:
        raise ValueError("no domain to plot")
    common = [layer for layer in dists[domains[0]] if all(layer in dists[d] for d in domains)]
    chosen = _pick_layers(common, layers, max_layers)
    if not chosen:
        raise ValueError("the domains share no layer; nothing to plot")
    e_max = max(np.asarray(dists[d][layer]).shape[0] for d in domains for layer in chosen)
    w = clip(3.0 + 0.12 * e_max * max(1, len(domains)) / 2, 7.0, max_size[0])
    h = clip(0.8 + 2.2 * len(chosen), 3.0, max_size[1])
    fig = new_figure(w, h, dpi)
    axes = fig.subplots(len(chosen), 1, squeeze=False, sharex=True)[:, 0]
    colours = _TAB10 if len(domains) <= 10 else expert_palette(len(domains))
    short, pattern = short_names(list(common))
    names = dict(zip(common, short, strict=True))
    width = 0.8 / len(domains)
    for ax, layer in zip(axes, chosen, strict=True):
        for j, d in enumerate(domains):
            p = np.asarray(dists[d][layer], dtype=np.float64)
            x = np.arange(p.shape[0]) - 0.4 + width * (j + 0.5)
            ax.bar(x, p, width=width, color=colours[j], label=d)
        e = np.asarray(dists[domains[0]][layer]).shape[0]
        ax.axhline(1.0 / e, color="0.4", linestyle="--", linewidth=1)
        ax.set_ylabel("fraction")
        ax.set_title(
            f"layer {names[layer]}" + (f" ({pattern})" if pattern else ""), fontsize="medium"
        )
    axes[0].legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize="small",
        title="domain",
    )
    axes[-1].set_xlabel("expert")

    ticks = tick_positions(e_max, 32)
    axes[-1].set_xticks(ticks, [str(t) for t in ticks])
    fig.suptitle(title if title is not None else "Expert assignment per domain")
    return fig


def divergence_figure(div: DomainDivergence, *, title: str | None = None, dpi: int = 100) -> Figure:
    """Mean (and, with 3+ domains, max) pairwise Jensen-Shannon divergence (nats) between
    domains per layer; the y axis is scaled to the data (the bound ln 2 is in the label)."""
    short, pattern = short_names(div.layers)
    x = np.arange(len(div.layers))
    fig = new_figure(clip(4.0 + 0.15 * len(x), 7.0, 16.0), 4.0, dpi)
    ax = fig.add_subplot()
    mean = np.array([div.mean[lay] for lay in div.layers], dtype=np.float64)
    mx = np.array([div.max[lay] for lay in div.layers], dtype=np.float64)
    ax.plot(x, mean, marker="o", label="mean over pairs")
    if len(div.domains) > 2:
        ax.plot(x, mx, marker="^", label="max over pairs")
        ax.legend(frameon=False, fontsize="small")

    set_ticks(ax, "x", len(x), short, 30)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    ax.set_ylabel("Jensen-Shannon divergence (nats, max ln 2)")
    # Scaled to the data: real divergences are often ~0.01, invisible on a 0..ln 2 axis.
    top = np.nanmax(np.concatenate([mean, mx])) if np.isfinite(mx).any() else 0.0
    ax.set_ylim(0, min(math.log(2), top * 1.2) if top > 0 else 0.01)
    ax.set_title(
        title
        if title is not None
        else "Routing divergence between domains: " + ", ".join(div.domains)
    )
    return fig


def _series(data: Mapping[str, Any], leaf: type | tuple[type, ...]) -> dict[str, Mapping[str, Any]]:
    """``{label: {layer: value}}`` from either that or a single ``{layer: value}``."""
    if not data:
        raise ValueError("nothing to plot")
    first = next(iter(data.values()))
    if isinstance(first, leaf):
        return {"": data}
    return dict(data)


def agreement_figure(
    agreement: Mapping[str, float] | Mapping[str, Mapping[str, float]],
    *,
    chance: float | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Router agreement per layer: bars for one comparison ``{layer: value}``, lines for
    several ``{label: {layer: value}}`` (e.g. each checkpoint vs the final one, OLMoE
    Fig. "router saturation"). ``chance``: a dashed reference (:func:`agreement_chance`)."""
    series = _series(agreement, (float, int, np.floating))
    layers: list[str] = []
    for s in series.values():
        layers += [lay for lay in s if lay not in layers]
    short, pattern = short_names(layers)
    x = np.arange(len(layers))
    fig = new_figure(clip(4.0 + 0.15 * len(x), 7.0, 16.0), 4.0, dpi)
    ax = fig.add_subplot()
    if list(series) == [""]:
        s = series[""]
        ax.bar(x, [s.get(lay, np.nan) for lay in layers], color=_TAB10[0])
    else:
        for label, s in series.items():
            ax.plot(x, [s.get(lay, np.nan) for lay in layers], marker="o", label=label)
    if chance is not None:
        ax.axhline(chance, color="0.4", linestyle="--", linewidth=1, label="chance (K/E)")
    if chance is not None or list(series) != [""]:
        ax.legend(frameon=False, fontsize="small")
    set_ticks(ax, "x", len(x), short, 30)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    ax.set_ylabel("top-k overlap |A ∩ B| / K")
    ax.set_title(title if title is not None else "Router agreement between checkpoints")
    return fig


def same_expert_figure(
    rates: Mapping[str, SameExpertRate] | Mapping[str, Mapping[str, SameExpertRate]],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Consecutive-token same-expert rate per layer (solid) against chance (dashed, same
    colour) and the uniform router (grey dotted), for one ``{layer: SameExpertRate}`` or
    several ``{label (domain): {layer: SameExpertRate}}`` (Mixtral Table 5)."""
    series = _series(rates, SameExpertRate)
    layers: list[str] = []
    for s in series.values():
        layers += [lay for lay in s if lay not in layers]
    short, pattern = short_names(layers)
    x = np.arange(len(layers))
    fig = new_figure(clip(4.0 + 0.15 * len(x), 7.0, 16.0), 4.0, dpi)
    ax = fig.add_subplot()
    modes = set()
    for j, (label, s) in enumerate(series.items()):
        c = _TAB10[j % 10]
        name = label or "observed"
        ax.plot(
            x,
            [s[lay].rate if lay in s else np.nan for lay in layers],
            marker="o",
            color=c,
            label=name,
        )
        ax.plot(
            x,
            [s[lay].chance if lay in s else np.nan for lay in layers],
            linestyle="--",
            color=c,
            label=f"{label} chance" if label else "chance",
        )
        modes |= {r.mode for r in s.values()}
    first = next(iter(series.values()))
    ax.plot(
        x,
        [first[lay].uniform if lay in first else np.nan for lay in layers],
        linestyle=":",
        color="0.5",
        label="uniform router",
    )
    set_ticks(ax, "x", len(x), short, 30)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    what = "same first-choice expert" if modes == {"top1"} else "shared expert"
    ax.set_ylabel(f"consecutive tokens, {what}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    ax.set_title(title if title is not None else "Expert repetition between consecutive tokens")
    return fig
