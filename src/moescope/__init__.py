"""moescope: see what a Mixture-of-Experts model really does.

Every public name is an attribute of this package, imported on first use, so that
``import moescope`` needs torch and numpy only and ``dir(moescope)`` (tab completion)
lists the whole API. The subpackages (``moescope.cost``, ``moescope.analysis``,
``moescope.nn``, ...) are reachable as attributes in the same way.

- Monitoring: :class:`MoEMonitor` -> :class:`Snapshot` of :class:`LayerStats` per MoE
  layer (:class:`LayerInfo` describes each layer found); :class:`AlertRules`,
  :class:`NeuronOptions` / :class:`NeuronThreshold`, :class:`RoutingRecorder`.
- Training: :class:`MoECallbackOptions`; :class:`MoETrainerCallback`,
  :class:`MoEPyTorchCallback`, :class:`MoELightningCallback`; the training engines'
  :class:`MoEMegatronCallback`, :class:`MoETorchtitanCallback`,
  :class:`MoEDeepSpeedCallback` (and the factories
  :func:`create_moe_callback_for_transformers`, :func:`create_moe_callback_for_pytorch`).
- Cost: :func:`count_parameters`, :func:`flops_per_token`, :func:`measured_cost`.
- Analysis: :func:`analyze` (:class:`AnalyzeOptions` -> :class:`AnalysisResult`),
  :func:`write_outputs`.
- Routing agreement: :func:`agree` (-> :class:`AgreementResult`) of two
  :class:`RoutingTrace` sources (files via :class:`TraceWriter`, training via
  :class:`TraceRecorder`, or models replayed on the same tokens).
- Serving and placement: :class:`PrometheusExporter`, :func:`plan_expert_placement`.
- Custom models: :func:`register_adapter`, :class:`SimpleAdapter`, :class:`RoutingRecord`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module defining it. Kept lazy: the monitor, the analysis stack and the
# integrations import much more than torch (transformers, matplotlib, ...).
_LAZY: dict[str, str] = {
    # monitoring
    "MoEMonitor": "moescope.monitor",
    "Snapshot": "moescope.stats.snapshot",
    "LayerStats": "moescope.stats.snapshot",
    "Summary": "moescope.stats.snapshot",
    "UsageHistory": "moescope.stats.history",
    "NeuronThreshold": "moescope.stats.neurons",
    "NeuronOptions": "moescope.stats.neurons",
    "Alert": "moescope.alerts",
    "AlertRules": "moescope.alerts",
    "AlertState": "moescope.alerts",
    "AlertTracker": "moescope.alerts",
    "AlertUpdate": "moescope.alerts",
    "RoutingRecorder": "moescope.stats.token_recorder",
    "TokenRouting": "moescope.stats.token_recorder",
    "UnsupportedModelError": "moescope.errors",
    "UnknownWindowError": "moescope.core",
    "MonitorCore": "moescope.core",
    "CoreLayer": "moescope.core",
    # capture: what a layer is, what a layer call gives, custom adapters
    "LayerInfo": "moescope.capture.adapter",
    "MoEAdapter": "moescope.capture.adapter",
    "CaptureContext": "moescope.capture.adapter",
    "RoutingBatch": "moescope.capture.record",
    "RoutingRecord": "moescope.capture.record",
    "SimpleAdapter": "moescope.capture.custom",
    "register_adapter": "moescope.capture.registry",
    "unregister_adapter": "moescope.capture.registry",
    # training integrations
    "MoECallbackOptions": "moescope.integrations.options",
    "TrainingSession": "moescope.integrations.core",
    "Verdict": "moescope.analysis.verdict",
    "Finding": "moescope.analysis.verdict",
    "MoETrainerCallback": "moescope.integrations.transformers",
    "MoEPyTorchCallback": "moescope.integrations.pytorch",
    "MoELightningCallback": "moescope.integrations.lightning",
    "MoEMegatronCallback": "moescope.integrations.megatron",
    "MoETorchtitanCallback": "moescope.integrations.torchtitan",
    "MoEDeepSpeedCallback": "moescope.integrations.deepspeed",
    "create_moe_callback_for_transformers": "moescope.integrations.transformers",
    "create_moe_callback_for_pytorch": "moescope.integrations.pytorch",
    # sinks
    "LogEvent": "moescope.sinks.event",
    "Sink": "moescope.sinks.base",
    "ConsoleSink": "moescope.sinks.console",
    "JsonlSink": "moescope.sinks.jsonl",
    "FigureDirSink": "moescope.sinks.figures",
    # cost
    "count_parameters": "moescope.cost.params",
    "ParamReport": "moescope.cost.params",
    "flops_per_token": "moescope.cost.flops",
    "FlopReport": "moescope.cost.flops",
    "measured_cost": "moescope.cost.measured",
    "MeasuredCost": "moescope.cost.measured",
    "MeasuredLayerCost": "moescope.cost.measured",
    "MoELayerParams": "moescope.cost.params",
    "AttentionLayerSpec": "moescope.cost.flops",
    # analysis
    "analyze": "moescope.analysis.run",
    "AnalyzeOptions": "moescope.analysis.run",
    "AnalysisResult": "moescope.analysis.result",
    "CompareOptions": "moescope.analysis.compare",
    "AnalyzeError": "moescope.analysis.errors",
    "DomainInfo": "moescope.analysis.result",
    "ModelInfo": "moescope.analysis.result",
    "RoutingAnalysis": "moescope.analysis.result",
    "Passage": "moescope.analysis.result",
    "write_outputs": "moescope.analysis.run",
    # routing traces and agreement
    "RoutingTrace": "moescope.trace",
    "TraceSequence": "moescope.trace",
    "TraceWriter": "moescope.trace",
    "TraceFormatError": "moescope.trace",
    "TraceRecorder": "moescope.stats.trace_recorder",
    "agree": "moescope.analysis.agree",
    "AgreementResult": "moescope.analysis.agreement",
    "LayerAgreement": "moescope.analysis.agreement",
    "TraceAlignmentError": "moescope.analysis.agreement",
    # serving, placement
    "PrometheusExporter": "moescope.serve",
    "plan_expert_placement": "moescope.placement",
    "Placement": "moescope.placement",
}

_SUBMODULES = (
    "alerts",
    "analysis",
    "capture",
    "cli",
    "cost",
    "data",
    "demo",
    "errors",
    "integrations",
    "monitor",
    "nn",
    "placement",
    "profiling",
    "report",
    "serve",
    "sinks",
    "stats",
    "trace",
    "watch",
)

__all__ = [
    "AgreementResult",
    "Alert",
    "AlertRules",
    "AlertState",
    "AlertTracker",
    "AlertUpdate",
    "AnalysisResult",
    "AnalyzeError",
    "AnalyzeOptions",
    "AttentionLayerSpec",
    "CaptureContext",
    "CompareOptions",
    "ConsoleSink",
    "CoreLayer",
    "DomainInfo",
    "FigureDirSink",
    "Finding",
    "FlopReport",
    "JsonlSink",
    "LayerAgreement",
    "LayerInfo",
    "LayerStats",
    "LogEvent",
    "MeasuredCost",
    "MeasuredLayerCost",
    "MoEAdapter",
    "MoECallbackOptions",
    "MoEDeepSpeedCallback",
    "MoELayerParams",
    "MoELightningCallback",
    "MoEMegatronCallback",
    "MoEMonitor",
    "MoEPyTorchCallback",
    "MoETorchtitanCallback",
    "MoETrainerCallback",
    "ModelInfo",
    "MonitorCore",
    "NeuronOptions",
    "NeuronThreshold",
    "ParamReport",
    "Passage",
    "Placement",
    "PrometheusExporter",
    "RoutingAnalysis",
    "RoutingBatch",
    "RoutingRecord",
    "RoutingRecorder",
    "RoutingTrace",
    "SimpleAdapter",
    "Sink",
    "Snapshot",
    "Summary",
    "TokenRouting",
    "TraceAlignmentError",
    "TraceFormatError",
    "TraceRecorder",
    "TraceSequence",
    "TraceWriter",
    "TrainingSession",
    "UnknownWindowError",
    "UnsupportedModelError",
    "UsageHistory",
    "Verdict",
    "__version__",
    "agree",
    "analyze",
    "count_parameters",
    "create_moe_callback_for_pytorch",
    "create_moe_callback_for_transformers",
    "flops_per_token",
    "measured_cost",
    "plan_expert_placement",
    "register_adapter",
    "unregister_adapter",
    "write_outputs",
]

if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from moescope.alerts import Alert, AlertRules, AlertState, AlertTracker, AlertUpdate
    from moescope.analysis.agree import agree
    from moescope.analysis.agreement import AgreementResult, LayerAgreement, TraceAlignmentError
    from moescope.analysis.compare import CompareOptions
    from moescope.analysis.errors import AnalyzeError
    from moescope.analysis.result import (
        AnalysisResult,
        DomainInfo,
        ModelInfo,
        Passage,
        RoutingAnalysis,
    )
    from moescope.analysis.run import AnalyzeOptions, analyze, write_outputs
    from moescope.analysis.verdict import Finding, Verdict
    from moescope.capture.adapter import CaptureContext, LayerInfo, MoEAdapter
    from moescope.capture.custom import SimpleAdapter
    from moescope.capture.record import RoutingBatch, RoutingRecord
    from moescope.capture.registry import register_adapter, unregister_adapter
    from moescope.core import CoreLayer, MonitorCore, UnknownWindowError
    from moescope.cost.flops import AttentionLayerSpec, FlopReport, flops_per_token
    from moescope.cost.measured import MeasuredCost, MeasuredLayerCost, measured_cost
    from moescope.cost.params import MoELayerParams, ParamReport, count_parameters
    from moescope.errors import UnsupportedModelError
    from moescope.integrations.core import TrainingSession
    from moescope.integrations.deepspeed import MoEDeepSpeedCallback
    from moescope.integrations.lightning import MoELightningCallback
    from moescope.integrations.megatron import MoEMegatronCallback
    from moescope.integrations.options import MoECallbackOptions
    from moescope.integrations.pytorch import MoEPyTorchCallback, create_moe_callback_for_pytorch
    from moescope.integrations.torchtitan import MoETorchtitanCallback
    from moescope.integrations.transformers import (
        MoETrainerCallback,
        create_moe_callback_for_transformers,
    )
    from moescope.monitor import MoEMonitor
    from moescope.placement import Placement, plan_expert_placement
    from moescope.serve import PrometheusExporter
    from moescope.sinks.base import Sink
    from moescope.sinks.console import ConsoleSink
    from moescope.sinks.event import LogEvent
    from moescope.sinks.figures import FigureDirSink
    from moescope.sinks.jsonl import JsonlSink
    from moescope.stats.history import UsageHistory
    from moescope.stats.neurons import NeuronOptions, NeuronThreshold
    from moescope.stats.snapshot import LayerStats, Snapshot, Summary
    from moescope.stats.token_recorder import RoutingRecorder, TokenRouting
    from moescope.stats.trace_recorder import TraceRecorder
    from moescope.trace import RoutingTrace, TraceFormatError, TraceSequence, TraceWriter


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        # `moescope.cost.measured_cost(...)` after a bare `import moescope`
        return importlib.import_module(f"moescope.{name}")
    raise AttributeError(f"module 'moescope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
