"""Matplotlib figures of expert routing: usage heatmaps, time series, and the figure
helpers the sinks (``FigureDirSink``, TensorBoard, W&B, MLflow) and the HTML reports share.

All functions build a ``matplotlib.figure.Figure`` directly on the Agg canvas (no
``pyplot``, so no global figure registry to leak and no display needed) and return it;
:func:`save_png` writes one to a PNG file. Needs the ``plots`` extra (matplotlib).

Readability at scale: tick labels are thinned to at most ``max_ticks`` per axis and figure
sizes are capped (``max_size`` inches), so a 60-layer x 128-expert model gives a legible
figure of bounded pixel size; colour maps replace per-expert legends beyond a few experts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope._optional import require
from moescope.layer_names import shorten_layer_names

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from moescope.stats.history import UsageHistory
    from moescope.stats.snapshot import Snapshot

__all__ = [
    "LOAD_LABEL",
    "clip",
    "colormap",
    "entropy_over_time",
    "new_figure",
    "save_png",
    "set_ticks",
    "short_names",
    "tick_positions",
    "usage_heatmap",
    "usage_matrix",
    "usage_over_time",
]

_BAD_COLOUR = "#d9d9d9"  # layers / windows without tokens (NaN)
#: The unit every expert-load heatmap uses (training heatmaps and HTML reports alike).
LOAD_LABEL = "load = usage fraction x E (1 = uniform)"


def new_figure(width: float, height: float, dpi: int) -> Figure:
    """A matplotlib Figure (constrained layout) on the Agg canvas; needs the ``plots`` extra."""
    require("matplotlib", "plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str) -> Any:
    """The matplotlib colour map ``name`` with NaN drawn in light grey."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=_BAD_COLOUR)


def clip(x: float, lo: float, hi: float) -> float:
    """``x`` limited to ``[lo, hi]`` (figure sizes)."""
    return float(min(max(x, lo), hi))


def tick_positions(n: int, max_ticks: int) -> np.ndarray:
    """Indices 0, s, 2s, ... with a stride s from 1, 2, 5 x 10^k giving <= max_ticks."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    target = max(1, math.ceil(n / max(1, max_ticks)))
    stride = target
    for mag in (1, 10, 100, 1000, 10000):
        for base in (1, 2, 4, 5, 8):
            if base * mag >= target:
                stride = base * mag
                break
        else:
            continue
        break
    return np.arange(0, n, stride, dtype=np.int64)


def short_names(names: Sequence[str]) -> tuple[list[str], str]:
    """``(short names, pattern)`` of layer paths (see :func:`moescope.layer_names.shorten_layer_names`)."""
    return shorten_layer_names(list(names))


def usage_matrix(snapshot: Snapshot, value: str = "fraction") -> tuple[list[str], np.ndarray]:
    """``(layer names, M [L, E_max] float64)`` of a snapshot.

    ``value="fraction"``: ``usage_fraction`` (rows sum to 1); ``"load"``: fraction x E,
    the load relative to a uniform router (1.0 = balanced, the seeds' max/mean scale).
    Layers with fewer experts than ``E_max`` and layers without tokens are NaN-padded.
    """
    if value not in ("fraction", "load"):
        raise ValueError(f"value must be 'fraction' or 'load', got {value!r}.")
    names = list(snapshot.layers)
    if not names:
        raise ValueError("the snapshot has no layer; nothing to plot.")
    e_max = max(s.num_experts for s in snapshot.layers.values())
    m = np.full((len(names), e_max), np.nan)
    for i, n in enumerate(names):
        s = snapshot.layers[n]
        fr = np.asarray(s.usage_fraction, dtype=np.float64)
        m[i, : fr.shape[0]] = fr * s.num_experts if value == "load" else fr
    return names, m


def set_ticks(
    ax: Axes, axis: str, n: int, labels: Sequence[str] | None, max_ticks: int, offset: float = 0.0
) -> None:
    """Ticks and labels of ``axis`` ("x" or "y"): at most ``max_ticks`` of ``n`` positions."""
    idx = tick_positions(n, max_ticks)
    lab = [str(i) for i in idx] if labels is None else [labels[i] for i in idx]
    if axis == "x":
        ax.set_xticks(idx + offset, lab)
    else:
        ax.set_yticks(idx + offset, lab)


def usage_heatmap(
    snapshot: Snapshot,
    *,
    value: str = "load",
    title: str | None = None,
    max_ticks: int = 20,
    max_size: tuple[float, float] = (16.0, 12.0),
    dpi: int = 100,
    cmap: str = "viridis",
) -> Figure:
    """Layer x expert heatmap of one snapshot's expert usage, with a colour bar.

    Rows are layers in model order (shared name prefix/suffix stripped, shown in the
    axis label), columns expert ids; grey cells are padding or layers without tokens.
    The figure grows with L and E up to ``max_size`` inches and at most ``max_ticks``
    tick labels per axis are drawn (60 x 128 stays readable).

    Args:
        snapshot: the window to draw.
        value: ``"load"`` (usage fraction x E, 1 = uniform: the unit of every heatmap
            moescope draws, training and reports) or ``"fraction"`` (usage fraction).
        title: default ``"Expert load, step <step>"`` (``"Expert usage, ..."`` for fractions).
        max_ticks: tick labels per axis at most.
        max_size: (width, height) cap in inches.
        dpi: dots per inch (pixel size = inches x dpi).
        cmap: matplotlib colour map name.
    """
    names, m = usage_matrix(snapshot, value)
    n_layers, n_exp = m.shape
    w = clip(3.0 + 0.09 * n_exp, 6.0, max_size[0])
    h = clip(1.8 + 0.22 * n_layers, 3.0, max_size[1])
    fig = new_figure(w, h, dpi)
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    vmax = float(finite.max()) if finite.size else 1.0
    im = ax.imshow(
        np.ma.masked_invalid(m),
        aspect="auto",
        interpolation="nearest",
        cmap=colormap(cmap),
        vmin=0.0,
        vmax=max(vmax, 1e-12),
    )
    short, pattern = short_names(names)
    set_ticks(ax, "x", n_exp, None, max_ticks)
    set_ticks(ax, "y", n_layers, short, max_ticks)
    ax.set_xlabel("expert")
    ax.set_ylabel(f"layer ({pattern})" if pattern else "layer")
    step = "?" if snapshot.step is None else snapshot.step
    what = "usage" if value == "fraction" else "load"
    ax.set_title(title if title is not None else f"Expert {what}, step {step}")
    label = "usage fraction" if value == "fraction" else LOAD_LABEL
    fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    # why: constrained layout moves a tick label by a pixel between the first and second
    # draw; settling it here makes every save of the figure (a sink's, save_png) identical.
    fig.draw_without_rendering()
    return fig


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around (possibly uneven) sorted centres, for pcolormesh."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def usage_over_time(
    history: UsageHistory,
    layer: str,
    *,
    kind: str = "auto",
    max_area_experts: int = 16,
    max_ticks: int = 20,
    max_size: tuple[float, float] = (14.0, 10.0),
    dpi: int = 100,
    cmap: str = "viridis",
    title: str | None = None,
) -> Figure:
    """Expert usage fraction of one layer over the recorded steps.

    ``kind="area"``: stacked areas of the usage fraction (each band one expert, bands sum
    to 1), legible for a few experts; ``"heatmap"``: experts x steps, colour = load (usage
    fraction x E, 1 = uniform, as in :func:`usage_heatmap`), legible for 128;
    ``"auto"``: area up to ``max_area_experts`` experts, heatmap beyond. Windows without
    tokens are gaps (grey in the heatmap).

    Args:
        history: the monitor's :class:`~moescope.stats.history.UsageHistory`.
        layer: module path of the layer.
    """
    steps, counts = history.as_array(layer)
    if steps.size == 0:
        raise ValueError(f"no recorded snapshot for layer {layer!r}; nothing to plot.")
    if kind not in ("auto", "area", "heatmap"):
        raise ValueError(f"kind must be 'auto', 'area' or 'heatmap', got {kind!r}.")
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), np.nan)
    n_steps, n_exp = frac.shape
    if kind == "auto":
        kind = "area" if n_exp <= max_area_experts else "heatmap"
    w = clip(7.0 + 0.02 * n_steps, 8.0, max_size[0])
    h = (
        clip(2.0 + 0.06 * n_exp, 3.5, max_size[1])
        if kind == "heatmap"
        else clip(4.0, 3.0, max_size[1])
    )
    fig = new_figure(w, h, dpi)
    ax = fig.add_subplot()
    if kind == "area":
        colours = colormap("tab20" if n_exp <= 20 else cmap)(
            np.linspace(0, 1, max(n_exp, 2))[:n_exp]
        )
        ax.stackplot(
            steps, np.nan_to_num(frac.T), colors=colours, labels=[f"e{e}" for e in range(n_exp)]
        )
        ax.set_ylim(0, 1)
        ax.set_ylabel("usage fraction")
        if n_exp <= max_area_experts:
            ax.legend(
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                fontsize="small",
                ncol=1 if n_exp <= 12 else 2,
                frameon=False,
            )
    else:
        mesh = ax.pcolormesh(
            _edges(steps),
            np.arange(n_exp + 1) - 0.5,
            np.ma.masked_invalid(frac.T * n_exp),
            cmap=colormap(cmap),
            vmin=0.0,
            shading="flat",
        )
        ax.set_ylim(n_exp - 0.5, -0.5)  # expert 0 on top, like the layer heatmap
        set_ticks(ax, "y", n_exp, None, max_ticks)
        ax.set_ylabel("expert")
        fig.colorbar(mesh, ax=ax, label=LOAD_LABEL, shrink=0.9)
    ax.xaxis.set_major_locator(_max_n_locator(max_ticks, w))
    ax.set_xlabel("step")
    ax.set_title(title if title is not None else f"Expert usage over time: {layer}")
    return fig


def _max_n_locator(max_ticks: int, width_in: float) -> Any:
    """Integer step ticks: at most ``max_ticks`` and about one per inch of width, so
    labels such as ``104000`` never run into each other."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=max(2, min(max_ticks - 1, int(width_in))), integer=True)


def entropy_over_time(
    history: UsageHistory,
    layers: Sequence[str] | None = None,
    *,
    metric: str = "routing_entropy",
    kind: str = "auto",
    max_lines: int = 10,
    max_ticks: int = 20,
    max_size: tuple[float, float] = (14.0, 10.0),
    dpi: int = 100,
    cmap: str = "magma",
    title: str | None = None,
) -> Figure:
    """Routing entropy (or another recorded scalar) per layer over the recorded steps.

    ``kind="lines"``: one line per layer with a legend; ``"heatmap"``: layers x steps;
    ``"auto"``: lines up to ``max_lines`` layers, heatmap beyond (60 layers stay
    readable). Steps missing for a layer are NaN (gaps / grey).

    Args:
        history: the monitor's :class:`~moescope.stats.history.UsageHistory`.
        layers: which layers (default: all recorded, in order).
        metric: a scalar the history records (``history.scalar_metrics``).
    """
    names = list(history.layers if layers is None else layers)
    if not names:
        raise ValueError("the history has no layer; nothing to plot.")
    if kind not in ("auto", "lines", "heatmap"):
        raise ValueError(f"kind must be 'auto', 'lines' or 'heatmap', got {kind!r}.")
    series = [history.series(n, metric) for n in names]
    all_steps = np.unique(np.concatenate([s for s, _ in series]))
    if all_steps.size == 0:
        raise ValueError("the history holds no snapshot yet; nothing to plot.")
    m = np.full((len(names), all_steps.size), np.nan)
    for i, (s, v) in enumerate(series):
        m[i, np.searchsorted(all_steps, s)] = v
    if kind == "auto":
        kind = "lines" if len(names) <= max_lines else "heatmap"
    short, pattern = short_names(names)
    unit = " (nats)" if metric == "routing_entropy" else ""
    w = clip(7.0 + 0.02 * all_steps.size, 8.0, max_size[0])
    if kind == "lines":
        fig = new_figure(w, clip(4.0, 3.0, max_size[1]), dpi)
        ax = fig.add_subplot()
        for i, n in enumerate(short):
            ax.plot(all_steps, m[i], marker="." if all_steps.size < 50 else None, label=n)
        ax.set_ylabel(f"{metric}{unit}")
        if len(names) > 1 or pattern:
            ax.legend(
                title=pattern or None,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                fontsize="small",
                frameon=False,
            )
    else:
        fig = new_figure(w, clip(2.0 + 0.12 * len(names), 3.5, max_size[1]), dpi)
        ax = fig.add_subplot()
        mesh = ax.pcolormesh(
            _edges(all_steps),
            np.arange(len(names) + 1) - 0.5,
            np.ma.masked_invalid(m),
            cmap=colormap(cmap),
            shading="flat",
        )
        ax.set_ylim(len(names) - 0.5, -0.5)
        set_ticks(ax, "y", len(names), short, max_ticks)
        ax.set_ylabel(f"layer ({pattern})" if pattern else "layer")
        fig.colorbar(mesh, ax=ax, label=f"{metric}{unit}", shrink=0.9)
    ax.xaxis.set_major_locator(_max_n_locator(max_ticks, w))
    ax.set_xlabel("step")
    ax.set_title(title if title is not None else f"{metric.replace('_', ' ')} per layer")
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int | None = None) -> Path:
    """Write ``fig`` as a PNG (parent folders created); returns the path.

    The pixel size is the figure size in inches x ``dpi`` (default: the figure's own),
    no tight cropping, so sizes are predictable.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", dpi=dpi if dpi is not None else fig.dpi)
    return p
