"""Plots of expert routing (matplotlib, extra ``plots``); see :mod:`moescope.report.plots`."""

from __future__ import annotations

from moescope.report.plots import (
    entropy_over_time,
    save_png,
    usage_heatmap,
    usage_matrix,
    usage_over_time,
)

__all__ = ["entropy_over_time", "save_png", "usage_heatmap", "usage_matrix", "usage_over_time"]
