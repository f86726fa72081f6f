"""Routing statistics: pure metrics, on-device accumulators, snapshots, bounded history."""

from __future__ import annotations

from moescope.stats import metrics
from moescope.stats.accumulator import (
    REDUCE_OPS,
    LayerAccumulator,
    merge_states,
    states_to_numpy,
)
from moescope.stats.history import UsageHistory
from moescope.stats.neurons import (
    NEURON_REDUCE_OPS,
    NeuronAccumulator,
    NeuronCalibrator,
    NeuronThreshold,
    neuron_stats_from_state,
)
from moescope.stats.snapshot import (
    LAYER_SCALAR_METRICS,
    NEURON_SCALAR_METRICS,
    LayerStats,
    Snapshot,
    layer_stats_from_state,
)

__all__ = [
    "LAYER_SCALAR_METRICS",
    "NEURON_REDUCE_OPS",
    "NEURON_SCALAR_METRICS",
    "REDUCE_OPS",
    "LayerAccumulator",
    "LayerStats",
    "NeuronAccumulator",
    "NeuronCalibrator",
    "NeuronThreshold",
    "Snapshot",
    "UsageHistory",
    "layer_stats_from_state",
    "merge_states",
    "metrics",
    "neuron_stats_from_state",
    "states_to_numpy",
]
