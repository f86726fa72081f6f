"""Bounded per-layer time series of expert usage and scalar metrics, for plots.

Each layer keeps at most ``maxlen`` rows whatever the number of snapshots: rows are kept
at a stride of ``s`` snapshots; when ``maxlen - 1`` kept rows exist, every second one is
dropped and ``s`` doubles (so the series always covers the whole run at an even spacing,
first snapshot included). The most recent snapshot is always present as a tail row,
replaced by the next one unless it falls on the stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moescope.stats.snapshot import Snapshot

__all__ = ["UsageHistory"]


@dataclass
class _Row:
    step: int
    counts: np.ndarray
    scalars: tuple[float, ...]


@dataclass
class _Series:
    stride: int = 1
    seen: int = 0
    kept: list[_Row] = field(default_factory=list)
    tail: _Row | None = None

    def rows(self) -> list[_Row]:
        return self.kept + ([self.tail] if self.tail is not None else [])


class UsageHistory:
    """Per layer, a decimated series of ``(step, usage_counts, scalar metrics)``.

    Args:
        maxlen: rows kept per layer at most (>= 2); memory is O(layers x maxlen x E).
        scalar_metrics: LayerStats fields recorded next to the counts (for time plots).
    """

    def __init__(
        self,
        maxlen: int = 1000,
        scalar_metrics: Sequence[str] = ("routing_entropy", "cv", "max_over_mean"),
    ) -> None:
        if maxlen < 2:
            raise ValueError(f"UsageHistory needs maxlen >= 2, got {maxlen}.")
        self.maxlen = int(maxlen)
        self.scalar_metrics = tuple(scalar_metrics)
        self._series: dict[str, _Series] = {}

    @property
    def layers(self) -> list[str]:
        return list(self._series)

    def __len__(self) -> int:
        return len(self._series)

    def append(self, snapshot: Snapshot) -> None:
        """Record every layer of ``snapshot`` (step None: the layer's snapshot index)."""
        for name, st in snapshot.layers.items():
            ser = self._series.setdefault(name, _Series())
            step = snapshot.step if snapshot.step is not None else ser.seen
            row = _Row(
                step=int(step),
                counts=np.asarray(st.usage_counts, dtype=np.int64).copy(),
                scalars=tuple(float(getattr(st, m)) for m in self.scalar_metrics),
            )
            self._push(ser, row)

    def _push(self, ser: _Series, row: _Row) -> None:
        if ser.seen % ser.stride == 0:
            ser.kept.append(row)
            ser.tail = None
            if len(ser.kept) >= self.maxlen:
                # Kept rows sit at multiples of the stride; keeping every second one
                # leaves multiples of twice the stride, first row included.
                ser.kept = ser.kept[::2]
                ser.stride *= 2
        else:
            ser.tail = row
        ser.seen += 1

    def as_array(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps [N] int64, counts [N, E] int64)`` of one layer, oldest first."""
        rows = self._get(layer).rows()
        steps = np.array([r.step for r in rows], dtype=np.int64)
        if not rows:
            return steps, np.zeros((0, 0), dtype=np.int64)
        return steps, np.stack([r.counts for r in rows])

    def series(self, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps [N], values [N] float64)`` of one recorded scalar metric."""
        if metric not in self.scalar_metrics:
            raise KeyError(
                f"metric {metric!r} is not recorded; build UsageHistory(scalar_metrics=...) "
                f"with it (recorded: {self.scalar_metrics})."
            )
        j = self.scalar_metrics.index(metric)
        rows = self._get(layer).rows()
        return (
            np.array([r.step for r in rows], dtype=np.int64),
            np.array([r.scalars[j] for r in rows], dtype=np.float64),
        )

    def _get(self, layer: str) -> _Series:
        try:
            return self._series[layer]
        except KeyError:
            raise KeyError(
                f"no history for layer {layer!r}; known layers: {list(self._series)}"
            ) from None
