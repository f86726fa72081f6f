"""Figures of each event saved as PNG files in one folder (``<log_dir>/heatmaps``).

File names: ``<name>_step<step>.png`` where ``<name>`` is the figure key without its
first component (``moe/``) and without a trailing ``/usage_heatmap``, made file-safe;
the all-layers heatmap ``moe/usage_heatmap`` is ``all_layers``. So
``moe/model.layers.0.mlp/usage_heatmap`` at step 500 is
``model.layers.0.mlp_step500.png`` and ``moe/usage_heatmap`` is
``all_layers_step500.png``. Needs matplotlib (extra ``plots``), like the figures.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from moescope.plots import save_png
from moescope.sinks.base import Sink

if TYPE_CHECKING:
    from moescope.sinks.event import LogEvent

__all__ = ["FigureDirSink", "figure_file_name"]

_HEATMAP = "usage_heatmap"


def figure_file_name(key: str, step: int) -> str:
    """The PNG file name of figure ``key`` at ``step`` (see the module docstring)."""
    parts = key.split("/")
    if len(parts) > 1:
        parts = parts[1:]  # the prefix ("moe")
    if len(parts) > 1 and parts[-1] == _HEATMAP:
        parts = parts[:-1]
    name = "/".join(parts)
    name = "all_layers" if name == _HEATMAP else name
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"
    return f"{safe}_step{step}.png"


class FigureDirSink(Sink):
    """Saves every figure of a train event as a PNG file in ``folder``.

    Args:
        folder: created on the first figure.
        dpi: PNG resolution (None: the figure's own; pixel size = inches x dpi).

    Attributes:
        last_paths: ``{figure key: PNG path}`` of the last event that had figures.
    """

    wants_figures = True

    def __init__(self, folder: str | os.PathLike[str], dpi: int | None = None) -> None:
        self.folder = Path(folder)
        self.dpi = dpi
        self.last_paths: dict[str, Path] = {}

    def write(self, event: LogEvent) -> None:
        if event.mode != "train" or not event.figures:
            return

        self.last_paths = {
            key: save_png(fig, self.folder / figure_file_name(key, event.step), dpi=self.dpi)
            for key, fig in event.figures.items()
        }

    def __repr__(self) -> str:
        return f"FigureDirSink({str(self.folder)!r})"
