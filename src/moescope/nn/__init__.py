"""moescope.nn: MoE building blocks (routers, losses, grouped experts, layers, a tiny LM).

Imports torch only; the transformers registration of TinyMoELM lives in
``moescope.nn.hf`` and is imported on demand.
"""

from moescope.nn.expert_parallel import ExpertParallelMoELayer, all_to_all_rows
from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.losses import (
    cv_squared,
    expert_counts,
    importance_loss,
    load_balancing_loss,
    noisy_topk_load,
    router_z_loss,
    sequence_aux_loss,
)
from moescope.nn.model import TinyMoEConfig, TinyMoELM, TinyMoEOutput
from moescope.nn.router_output import RouterOutput
from moescope.nn.routers import (
    ExpertChoiceRouter,
    GroupLimitedRouter,
    NoisyTopKRouter,
    SwitchRouter,
    TopKRouter,
)

__all__ = [
    "ExpertChoiceRouter",
    "ExpertParallelMoELayer",
    "GroupLimitedRouter",
    "GroupedExperts",
    "MoELayer",
    "NoisyTopKRouter",
    "RouterOutput",
    "SwitchRouter",
    "TinyMoEConfig",
    "TinyMoELM",
    "TinyMoEOutput",
    "TopKRouter",
    "all_to_all_rows",
    "cv_squared",
    "expert_counts",
    "importance_loss",
    "load_balancing_loss",
    "noisy_topk_load",
    "router_z_loss",
    "sequence_aux_loss",
]
