"""Capture: adapters that turn MoE layer calls into RoutingRecords."""

from moescope.capture.adapter import CaptureContext, LayerInfo, MoEAdapter
from moescope.capture.custom import SimpleAdapter
from moescope.capture.hf_generic import GenericHFAdapter
from moescope.capture.nn_adapter import NNAdapter
from moescope.capture.record import RoutingRecord
from moescope.capture.registry import (
    PRIORITY_DEDICATED,
    PRIORITY_GENERIC,
    PRIORITY_NN,
    PRIORITY_USER,
    default_adapters,
    register_adapter,
    unregister_adapter,
)

__all__ = [
    "PRIORITY_DEDICATED",
    "PRIORITY_GENERIC",
    "PRIORITY_NN",
    "PRIORITY_USER",
    "CaptureContext",
    "GenericHFAdapter",
    "LayerInfo",
    "MoEAdapter",
    "NNAdapter",
    "RoutingRecord",
    "SimpleAdapter",
    "default_adapters",
    "register_adapter",
    "unregister_adapter",
]
