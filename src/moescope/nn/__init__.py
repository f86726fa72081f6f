"""moescope.nn: MoE building blocks (routers, losses, grouped experts, layers, a tiny LM).

Imports torch only; the transformers registration of TinyMoELM lives in
``moescope.nn.hf`` and is imported on demand.
"""

from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.losses import expert_counts, load_balancing_loss, router_z_loss
from moescope.nn.router_output import RouterOutput
from moescope.nn.routers import TopKRouter

__all__ = [
    "GroupedExperts",
    "MoELayer",
    "RouterOutput",
    "TopKRouter",
    "expert_counts",
    "load_balancing_loss",
    "router_z_loss",
]
