"""moescope: see what a Mixture-of-Experts model really does."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "MoECallbackOptions",
    "MoELightningCallback",
    "MoEMonitor",
    "NeuronOptions",
    "NeuronThreshold",
    "UnsupportedModelError",
    "__version__",
    "count_parameters",
    "create_moe_callback_for_pytorch",
    "create_moe_callback_for_transformers",
    "flops_per_token",
    "measured_cost",
    "register_adapter",
]

_LAZY = {
    "MoEMonitor": ("moescope.monitor", "MoEMonitor"),
    "UnsupportedModelError": ("moescope.errors", "UnsupportedModelError"),
    "register_adapter": ("moescope.capture.registry", "register_adapter"),
    "count_parameters": ("moescope.cost.params", "count_parameters"),
    "flops_per_token": ("moescope.cost.flops", "flops_per_token"),
    "measured_cost": ("moescope.cost.measured", "measured_cost"),
    "NeuronThreshold": ("moescope.stats.neurons", "NeuronThreshold"),
    "NeuronOptions": ("moescope.stats.neurons", "NeuronOptions"),
    "MoECallbackOptions": ("moescope.integrations.options", "MoECallbackOptions"),
    "create_moe_callback_for_transformers": (
        "moescope.integrations.transformers",
        "create_moe_callback_for_transformers",
    ),
    "create_moe_callback_for_pytorch": (
        "moescope.integrations.pytorch",
        "create_moe_callback_for_pytorch",
    ),
    "MoELightningCallback": ("moescope.integrations.lightning", "MoELightningCallback"),
}


def __getattr__(name: str) -> Any:
    # Lazy: `import moescope` stays cheap; the monitor imports the stats stack on use.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'moescope' has no attribute {name!r}")
