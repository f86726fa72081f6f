"""Write the HTML reports: :mod:`moescope.report` renders, this module hands it the safe
writers of :mod:`moescope.analysis.outdir` (the report layer never opens a file itself and
imports nothing from :mod:`moescope.analysis` but result types)."""

from __future__ import annotations

from pathlib import Path

from moescope.analysis.agreement import AgreementResult
from moescope.analysis.compare_result import Comparison
from moescope.analysis.outdir import write_bytes, write_text
from moescope.analysis.result import AnalysisResult
from moescope.report.agree_report import render_agreement as _render_agreement
from moescope.report.analysis_report import render_report as _render_report
from moescope.report.compare_report import render_comparison as _render_comparison

__all__ = ["render_agreement", "render_comparison", "render_report"]


def render_report(result: AnalysisResult, out_dir: str | Path) -> Path:
    """Write the figures and ``report.html`` of an analysis into ``out_dir`` (prepared by
    :func:`~moescope.analysis.outdir.prepare_out_dir`); returns the report path."""
    return _render_report(
        result, out_dir, verdict=result.verdict(), write_bytes=write_bytes, write_text=write_text
    )


def render_comparison(cmp: Comparison, out_dir: str | Path) -> Path:
    """Write the figures and ``report.html`` of a comparison into ``out_dir``; returns the
    report path."""
    return _render_comparison(cmp, out_dir, write_bytes=write_bytes, write_text=write_text)


def render_agreement(result: AgreementResult, out_dir: str | Path) -> Path:
    """Write the figures and ``report.html`` of a routing agreement into ``out_dir``;
    returns the report path."""
    return _render_agreement(result, out_dir, write_bytes=write_bytes, write_text=write_text)
