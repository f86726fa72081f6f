"""Expert pruning from measured routing (``moescope prune``; docs/prune.md).

- :mod:`moescope.prune.saliency`: per-expert scores and which experts to keep (pure math);
- :mod:`moescope.prune.measure`: one calibration pass (monitor + REAP capture);
- :mod:`moescope.prune.surgery`: removing experts from a model and its config;
- :mod:`moescope.prune.run`: the command's pipeline (load, stream, measure, trade-off,
  save); :mod:`moescope.prune.cli`: its flags.
"""

from moescope.prune.measure import ReapCapture, measure_saliency
from moescope.prune.run import (
    CurvePoint,
    PruneOptions,
    PruneResult,
    heldout_loss,
    keep_levels,
    prune,
    tradeoff,
)
from moescope.prune.saliency import (
    ORDERINGS,
    LayerSaliency,
    expert_scores,
    keep_count,
    keep_experts,
    reap_saliency,
)
from moescope.prune.surgery import PruneError, PruneSummary, check_prunable, prune_model

__all__ = [
    "ORDERINGS",
    "CurvePoint",
    "LayerSaliency",
    "PruneError",
    "PruneOptions",
    "PruneResult",
    "PruneSummary",
    "ReapCapture",
    "check_prunable",
    "expert_scores",
    "heldout_loss",
    "keep_count",
    "keep_experts",
    "keep_levels",
    "measure_saliency",
    "prune",
    "prune_model",
    "reap_saliency",
    "tradeoff",
]
