"""Analysis of an MoE model on data: load it, stream data through it, return every number.

- :mod:`moescope.analysis.run`: ``moescope analyze`` (:class:`AnalyzeOptions`,
  :func:`analyze` -> :class:`AnalysisResult`, :func:`write_outputs`, :func:`run_analyze`);
- :mod:`moescope.analysis.compare`: ``moescope compare`` of two analyses or two training
  logs (:func:`compare_sources` -> :class:`Comparison`);
- :mod:`moescope.analysis.result`: the result and ``summary.json``.

:mod:`moescope.report` only renders what this package computes.
"""

from moescope.analysis.compare import CompareOptions, run_compare
from moescope.analysis.errors import AnalyzeError
from moescope.analysis.result import AnalysisResult
from moescope.analysis.run import (
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
    "CompareOptions",
    "analyze",
    "iter_batches",
    "parse_threshold",
    "run_analyze",
    "run_compare",
    "write_outputs",
]
