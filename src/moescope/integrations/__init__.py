"""Training integrations: they decide *when* to snapshot and where metrics go (no metric
math). Shared logic in :mod:`~moescope.integrations.core`; one thin adapter per framework:

- :class:`MoETrainerCallback` (``transformers.Trainer``; extra ``hf``)
- :class:`MoEPyTorchCallback` (plain loops; torch only)
- :class:`MoELightningCallback` (Lightning; extra ``lightning``)
- :class:`MoEMegatronCallback` (Megatron-core; its TensorBoard/W&B writers)
- :class:`MoETorchtitanCallback` (torchtitan; logs through its ``MetricsProcessor``)
- :class:`MoEDeepSpeedCallback` (DeepSpeed; ``attach(engine)``, its monitor)

One class per framework, named ``MoE<Framework>Callback``, each taking the same frozen
:class:`MoECallbackOptions` (one docstring lists every setting) or its fields as
keywords. The seeds' factories :func:`create_moe_callback_for_transformers` and
:func:`create_moe_callback_for_pytorch` keep the seeds' signatures and build the first two;
Lightning instantiates callbacks by class, so it has none.

Framework modules are imported lazily, so importing this package needs torch only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MoECallbackOptions",
    "MoEDeepSpeedCallback",
    "MoELightningCallback",
    "MoEMegatronCallback",
    "MoEPyTorchCallback",
    "MoETorchtitanCallback",
    "MoETrainerCallback",
    "TrainingSession",
    "create_moe_callback_for_pytorch",
    "create_moe_callback_for_transformers",
]

_LAZY = {
    "MoECallbackOptions": ("moescope.integrations.options", "MoECallbackOptions"),
    "MoEMegatronCallback": ("moescope.integrations.megatron", "MoEMegatronCallback"),
    "TrainingSession": ("moescope.integrations.core", "TrainingSession"),
    "MoEPyTorchCallback": ("moescope.integrations.pytorch", "MoEPyTorchCallback"),
    "create_moe_callback_for_pytorch": (
        "moescope.integrations.pytorch",
        "create_moe_callback_for_pytorch",
    ),
    "MoETrainerCallback": ("moescope.integrations.transformers", "MoETrainerCallback"),
    "create_moe_callback_for_transformers": (
        "moescope.integrations.transformers",
        "create_moe_callback_for_transformers",
    ),
    "MoELightningCallback": ("moescope.integrations.lightning", "MoELightningCallback"),
    "MoETorchtitanCallback": ("moescope.integrations.torchtitan", "MoETorchtitanCallback"),
    "MoEDeepSpeedCallback": ("moescope.integrations.deepspeed", "MoEDeepSpeedCallback"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'moescope.integrations' has no attribute {name!r}")
