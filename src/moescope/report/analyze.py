"""Compatibility alias: ``moescope analyze`` now lives in :mod:`moescope.analysis`.

:mod:`moescope.analysis.run` computes (:func:`analyze` -> :class:`AnalysisResult`),
:mod:`moescope.report.analysis_report` renders, :mod:`moescope.cli` owns the flags. New code
imports from :mod:`moescope.analysis`; this module only re-exports its names.
"""

from __future__ import annotations

from moescope.analysis import (
    AnalysisResult,
    AnalyzeError,
    AnalyzeOptions,
    analyze,
    iter_batches,
    parse_threshold,
    run_analyze,
    write_outputs,
)

__all__ = [
    "AnalysisResult",
    "AnalyzeError",
    "AnalyzeOptions",
    "analyze",
    "iter_batches",
    "parse_threshold",
    "run_analyze",
    "write_outputs",
]
