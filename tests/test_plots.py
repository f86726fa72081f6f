"""Plots: valid PNGs of bounded size, data drawn = data given, readable at 60 x 128.

Properties of the figures are asserted (image arrays, tick counts, figure sizes), not
pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import itertools

from matplotlib.collections import PolyCollection, QuadMesh
from matplotlib.image import imread

from conftest import random_layer_stats
from moescope.plots import (
    entropy_over_time,
    save_png,
    usage_heatmap,
    usage_matrix,
    usage_over_time,
)
from moescope.stats import (
    LayerStats,
    Snapshot,
    UsageHistory,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layer(
    seed: int, e: int, k: int, t: int = 64, skew: float = 0.0, empty: bool = False
) -> LayerStats:
    return random_layer_stats(seed, e, k, t, skew, mask="none" if empty else "all")


def _snapshot(step: int, n_layers: int, e: int, k: int, pool: int | None = None) -> Snapshot:
    # ``pool``: reuse a few routings across steps (cheap) while still changing per step.
    return Snapshot(
        step=step,
        layers={
            f"model.layers.{i}.mlp": _layer(
                (i * 7 + step) % pool if pool else i * 1000 + step, e, k, skew=0.05 * i
            )
            for i in range(n_layers)
        },
    )


def _visible_ticks(ax, axis: str) -> list[str]:
    ax.figure.canvas.draw()
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    return [
        t.get_text()
        for t, v in zip(labels, ax.get_xticks() if axis == "x" else ax.get_yticks(), strict=True)
        if t.get_text() and lo <= v <= hi
    ]


def _labels_do_not_overlap(ax, axis: str) -> bool:
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    boxes = [t.get_window_extent(renderer) for t in labels if t.get_text() and t.get_visible()]
    boxes = [b for b in boxes if fig.bbox.contains(b.x0, b.y0) or fig.bbox.contains(b.x1, b.y1)]
    return not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _png_shape(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w = imread(path).shape[:2]
    return h, w


def _main_ax(fig):
    return fig.axes[0]


# ------------------------------------------------------------------------- heatmap


def test_usage_heatmap_small_draws_the_fractions(tmp_path) -> None:
    snap = Snapshot(
        step=1500,
        layers={
            "model.layers.0.mlp": _layer(1, 8, 2, skew=5.0),
            "model.layers.1.mlp": _layer(2, 8, 2),
            "model.layers.2.mlp": _layer(3, 6, 2),  # fewer experts: padded
            "model.layers.3.mlp": _layer(4, 8, 2, empty=True),  # no token: grey row
        },
    )
    fig = usage_heatmap(snap)  # default: load, the unit of training and report heatmaps
    ax = _main_ax(fig)
    assert len(fig.axes) == 2  # heatmap + colour bar
    drawn = np.ma.filled(ax.images[0].get_array().astype(np.float64), np.nan)
    ref = np.full((4, 8), np.nan)
    for i, s in enumerate(snap.layers.values()):
        c = s.usage_counts.astype(np.float64)
        if c.sum() > 0:
            ref[i, : c.size] = c / c.mean()  # load = fraction x E = count / mean count
    np.testing.assert_allclose(drawn, ref, rtol=1e-12)
    assert [np.nanmean(r) for r in drawn[:3]] == pytest.approx([1.0, 1.0, 1.0])
    assert _visible_ticks(ax, "y") == ["0", "1", "2", "3"]
    assert _visible_ticks(ax, "x") == [str(i) for i in range(8)]
    assert ax.get_ylabel() == "layer (model.layers.*.mlp)"
    assert "step 1500" in ax.get_title()
    assert fig.axes[1].get_ylabel() == "load = usage fraction x E (1 = uniform)"
    frac = usage_heatmap(snap, value="fraction")
    assert frac.axes[1].get_ylabel() == "usage fraction"
    path = save_png(fig, tmp_path / "sub" / "heat.png")
    assert path.parent.name == "sub"
    w_in, h_in = fig.get_size_inches()
    assert _png_shape(path) == (round(h_in * fig.dpi), round(w_in * fig.dpi))
    assert (6.0, 3.0) <= (w_in, h_in)


def test_usage_heatmap_load_scale() -> None:
    snap = Snapshot(step=1, layers={"a.mlp": _layer(1, 16, 2, skew=4.0)})
    names, m = usage_matrix(snap, value="load")
    c = snap.layers["a.mlp"].usage_counts.astype(np.float64)
    np.testing.assert_allclose(m[0], c / c.mean())  # fraction x E = count / mean count
    assert names == ["a.mlp"]
    fig = usage_heatmap(snap, value="load")
    assert "1 = uniform" in fig.axes[1].get_ylabel()
    with pytest.raises(ValueError, match="'fraction' or 'load'"):
        usage_matrix(snap, value="counts")
    with pytest.raises(ValueError, match="no layer"):
        usage_heatmap(Snapshot(step=1))


def test_usage_heatmap_60_layers_128_experts_is_readable(tmp_path) -> None:
    snap = _snapshot(1500, 60, 128, 8, pool=9)
    fig = usage_heatmap(snap)
    ax = _main_ax(fig)
    xt, yt = _visible_ticks(ax, "x"), _visible_ticks(ax, "y")
    assert 4 <= len(xt) <= 20 and 4 <= len(yt) <= 20
    assert xt[0] == "0" and yt[0] == "0"
    stride = int(xt[1]) - int(xt[0])
    assert all(int(b) - int(a) == stride for a, b in itertools.pairwise(xt))
    w_in, h_in = fig.get_size_inches()
    assert w_in <= 16.0 and h_in <= 12.0
    h, w = _png_shape(save_png(fig, tmp_path / "big.png"))
    assert 800 <= w <= 1600 and 600 <= h <= 1200
    assert ax.images[0].get_array().shape == (60, 128)
    assert _labels_do_not_overlap(ax, "x") and _labels_do_not_overlap(ax, "y")
    # Tick label font stays legible (not shrunk to fit every label).
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 8


# -------------------------------------------------------------------- usage over time


def _history(n_steps: int, n_layers: int, e: int, k: int, pool: int | None = None) -> UsageHistory:
    hist = UsageHistory(maxlen=64)
    for s in range(n_steps):
        hist.append(_snapshot(10 * s, n_layers, e, k, pool))
    return hist


def test_usage_over_time_area_for_few_experts(tmp_path) -> None:
    hist = _history(12, 2, 8, 2)
    fig = usage_over_time(hist, "model.layers.1.mlp")
    ax = _main_ax(fig)
    polys = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(polys) == 8  # one band per expert
    assert len(ax.get_legend().get_texts()) == 8
    steps, counts = hist.as_array("model.layers.1.mlp")
    frac = counts / counts.sum(axis=1, keepdims=True)
    # The top edge of the last band is the cumulative sum: 1 at every step.
    top = polys[-1].get_paths()[0].vertices
    on_top = top[np.isclose(top[:, 1], 1.0)]
    assert set(np.round(on_top[:, 0]).astype(int)) >= set(steps.tolist())
    # The first band's upper edge is expert 0's fraction.
    v0 = polys[0].get_paths()[0].vertices
    for st, f in zip(steps, frac[:, 0], strict=True):
        assert np.any(np.isclose(v0[:, 0], st) & np.isclose(v0[:, 1], f))
    assert _png_shape(save_png(fig, tmp_path / "area.png"))[1] >= 700


def test_usage_over_time_heatmap_for_128_experts(tmp_path) -> None:
    hist = _history(40, 1, 128, 8)
    fig = usage_over_time(hist, "model.layers.0.mlp")
    ax = _main_ax(fig)
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    _steps, counts = hist.as_array("model.layers.0.mlp")
    # load = fraction x E (count / mean count), the unit of usage_heatmap too
    ref = (counts / counts.mean(axis=1, keepdims=True)).T
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(ref.shape), ref)
    assert fig.axes[1].get_ylabel() == "load = usage fraction x E (1 = uniform)"
    assert len(_visible_ticks(ax, "y")) <= 20
    assert len(_visible_ticks(ax, "x")) <= 20
    assert _labels_do_not_overlap(ax, "x") and _labels_do_not_overlap(ax, "y")
    w_in, h_in = fig.get_size_inches()
    assert w_in <= 14.0 and h_in <= 10.0
    h, w = _png_shape(save_png(fig, tmp_path / "t.png"))
    assert w <= 1400 and h <= 1000
    assert len(fig.axes) == 2  # colour bar
    with pytest.raises(ValueError, match="kind must be"):
        usage_over_time(hist, "model.layers.0.mlp", kind="bars")
    with pytest.raises(KeyError, match="no history for layer"):
        usage_over_time(hist, "model.layers.9.mlp")


# ------------------------------------------------------------------ entropy over time


def test_entropy_over_time_lines(tmp_path) -> None:
    hist = _history(10, 3, 8, 2)
    fig = entropy_over_time(hist)
    ax = _main_ax(fig)
    lines = ax.get_lines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        steps, vals = hist.series(f"model.layers.{i}.mlp", "routing_entropy")
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), vals)
        assert np.all(vals > 0) and np.all(vals <= np.log(8) + 1e-9)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    assert ax.get_legend().get_title().get_text() == "model.layers.*.mlp"
    assert "nats" in ax.get_ylabel()
    assert _png_shape(save_png(fig, tmp_path / "e.png"))[0] >= 300
    fig_cv = entropy_over_time(hist, ["model.layers.2.mlp"], metric="cv")
    np.testing.assert_allclose(
        _main_ax(fig_cv).get_lines()[0].get_ydata(), hist.series("model.layers.2.mlp", "cv")[1]
    )
    with pytest.raises(KeyError, match="not recorded"):
        entropy_over_time(hist, metric="aux_loss")


def test_entropy_over_time_heatmap_for_60_layers(tmp_path) -> None:
    hist = UsageHistory(maxlen=64)
    for s in range(15):  # large step numbers: wide x labels
        hist.append(_snapshot(104_000 + 8_000 * s, 60, 16, 2, pool=11))
    fig = entropy_over_time(hist)
    ax = _main_ax(fig)
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    ref = np.stack([hist.series(f"model.layers.{i}.mlp", "routing_entropy")[1] for i in range(60)])
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(ref.shape), ref)
    yt = _visible_ticks(ax, "y")
    assert 4 <= len(yt) <= 20 and yt[0] == "0"
    assert len(_visible_ticks(ax, "x")) <= 20
    assert _labels_do_not_overlap(ax, "x") and _labels_do_not_overlap(ax, "y")
    w_in, h_in = fig.get_size_inches()
    assert w_in <= 14.0 and h_in <= 10.0
    h, w = _png_shape(save_png(fig, tmp_path / "eh.png"))
    assert w <= 1400 and h <= 1000
    assert ax.get_legend() is None


# ------------------------------------------------------------------------- report polish


def test_fmt_number_one_format_without_exponents() -> None:
    from moescope.report.fmt import fmt_number

    cases = [
        (533632.0, "533,632"),
        (533632, "533,632"),
        (np.int64(7), "7"),
        (1.132e6 + 0.5, "1,132,000"),
        (352000.0, "352,000"),
        (0.021346, "0.02135"),
        (1.5, "1.500"),
        (-2.71828, "-2.718"),
        (1.2345e-7, "0.0000001235"),
        (0.0, "0"),
        (float("nan"), "-"),
        (None, "-"),
        (float("inf"), "-"),
        (True, "yes"),
    ]
    for value, want in cases:
        got = fmt_number(value)
        assert got == want, (value, got)
        assert "e+" not in got and "e-" not in got
        if want not in ("-", "yes"):
            # Reads back as the value to 4 significant digits.
            assert float(got.replace(",", "")) == pytest.approx(float(value), rel=5e-4)


def test_divergence_axis_is_scaled_to_the_data() -> None:
    from moescope.report.routing_analysis import divergence_figure
    from moescope.stats.routing import DomainDivergence

    layers = [f"model.layers.{i}.mlp" for i in range(4)]
    vals = {lay: 0.01 + 0.004 * i for i, lay in enumerate(layers)}
    div = DomainDivergence(["a", "b"], layers, {}, vals, vals)
    ax = divergence_figure(div).axes[0]
    lo, hi = ax.get_ylim()
    assert lo == 0 and max(vals.values()) < hi <= 1.25 * max(vals.values())


def test_entropy_legend_does_not_cover_the_bars() -> None:
    from moescope.report.analysis_plots import entropy_cv_figure

    fig = entropy_cv_figure(_snapshot(1, 6, 8, 2))
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(r)
    bars = [p.get_window_extent(r) for p in ax.patches if p.get_height() > 0]
    assert bars and not any(legend.overlaps(b) for b in bars)


def test_top_tokens_are_escaped_once() -> None:
    from moescope.report.analysis_report import _token_cell
    from moescope.stats.routing import TopToken

    cell = _token_cell(
        [TopToken("\\xfc", 3, 252, 0.5), TopToken(" <b>", 2, 9, 0.25), TopToken("\n", 1, 10, 1.0)]
    )
    assert "<code>\\xfc</code> 3 (50%)" in cell  # the 4 visible characters, one backslash
    assert "<code>\u2423&lt;b&gt;</code>" in cell  # space made visible, HTML escaped once
    assert "<code>\\n</code>" in cell
    assert "'" not in cell and "\\\\" not in cell and "&amp;" not in cell
