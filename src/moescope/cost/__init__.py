"""Parameter and FLOP accounting: total / active parameters and FLOPs per token.

Theoretical figures from the model's structure (:func:`count_parameters`,
:func:`flops_per_token`); the measured counterparts, from the routing a monitor actually
observed (dropped slots, identity experts, inactive neurons), build on the per-layer
details these reports carry (:class:`MoELayerParams`: E, K, parameters per expert).
"""

from moescope.cost.flops import (
    AttentionLayerSpec,
    FlopReport,
    attention_layer_specs,
    flops_per_token,
    mean_attended_keys,
)
from moescope.cost.measured import (
    MeasuredCost,
    MeasuredLayerCost,
    measured_cost,
    measured_cost_from_reports,
)
from moescope.cost.params import (
    BREAKDOWN_KEYS,
    EMBEDDING_CONVENTIONS,
    CostConfigError,
    MoELayerParams,
    NoMoEError,
    ParamReport,
    build_meta_model,
    count_parameters,
    load_config_source,
)

__all__ = [
    "BREAKDOWN_KEYS",
    "EMBEDDING_CONVENTIONS",
    "AttentionLayerSpec",
    "CostConfigError",
    "FlopReport",
    "MeasuredCost",
    "MeasuredLayerCost",
    "MoELayerParams",
    "NoMoEError",
    "ParamReport",
    "attention_layer_specs",
    "build_meta_model",
    "count_parameters",
    "flops_per_token",
    "load_config_source",
    "mean_attended_keys",
    "measured_cost",
    "measured_cost_from_reports",
]
