"""``moescope compare A B``: two runs side by side, every number computed here.

A side is one of:

- an **analysis**: a ``moescope analyze`` output directory or its ``summary.json``
  (format ``moescope.analysis/1``): the per-layer statistics over all analysed tokens;
- a **training log**: a JSONL file written by :class:`~moescope.sinks.jsonl.JsonlSink`
  (``moe_detailed.jsonl``), or a directory holding one (directly, or in ``moe_logs/`` as
  the training callback and ``moescope.demo`` write it). Its per-layer statistics are
  those of the **last** logged window (where training ended up); the metrics of every
  window form the time series.

:func:`compare_sources` returns a :class:`Comparison`: layers matched by module path
(or by position when both runs have the same number of MoE layers under other names),
per layer the two usage distributions, their Jensen-Shannon divergence (nats, in
[0, ln 2]; :func:`moescope.stats.routing.js_divergence`), balance metrics of both, the
alerts of both and, for logs, the time series. :func:`write_comparison` writes
``comparison.json`` and the report (:mod:`moescope.report.compare_report`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moescope._cliopts import option
from moescope._rundir import SUMMARY_NAME, RunDirError, resolve_run_input
from moescope._text import plural
from moescope.analysis.compare_result import Comparison, LayerComparison, RunSide
from moescope.analysis.errors import AnalyzeError
from moescope.analysis.outdir import prepare_out_dir, write_text
from moescope.analysis.render import render_comparison
from moescope.analysis.result import SUMMARY_FORMAT
from moescope.analysis.verdict import compare_health, diagnose
from moescope.sinks.jsonl import read_jsonl
from moescope.stats.routing import js_divergence
from moescope.stats.snapshot import LayerStats, Snapshot

__all__ = [
    "BALANCE_METRICS",
    "SERIES_METRICS",
    "CompareOptions",
    "Comparison",
    "LayerComparison",
    "RunSide",
    "compare_sources",
    "load_side",
    "parse_labels",
    "run_compare",
    "write_comparison",
]

#: Per-layer metrics shown for both sides (LayerStats attribute names).
BALANCE_METRICS = (
    "cv",
    "max_over_mean",
    "unused_experts",
    "active_experts",
    "load_entropy_norm",
    "routing_entropy_norm",
    "top1_prob",
    "aux_loss",
)

#: Model-level metrics of a training log's time series (Snapshot aggregates).
SERIES_METRICS = (
    "avg_expert_cv",
    "max_max_over_mean",
    "total_unused_experts",
    "avg_routing_entropy_norm",
    "avg_load_entropy_norm",
    "avg_aux_loss",
)


# --------------------------------------------------------------------------- reading


def _default_label(path: Path, kind: str) -> str:
    if kind == "training":
        # .../<run>/moe_logs/moe_detailed.jsonl -> <run>
        parent = path.parent
        if parent.name == "moe_logs":
            parent = parent.parent
        return parent.name or path.stem
    return (path.parent.name if path.name == "summary.json" else path.name) or str(path)


def load_side(spec: str | Path, label: str | None = None) -> RunSide:
    """Read one side (an analyze output or a training JSONL log, module docstring).

    Raises:
        AnalyzeError: missing path, a directory with neither summary.json nor one JSONL
            log, a JSON file that is not an analyze summary, a log without snapshots.
    """
    p = Path(spec)
    if not p.exists():
        raise AnalyzeError(
            f"{p}: no such file or directory; pass an analyze output "
            "directory or a training JSONL log"
        )
    if p.is_dir():
        try:
            found = resolve_run_input(p)
        except RunDirError as err:
            raise AnalyzeError(str(err)) from None
        if found.name == SUMMARY_NAME:
            return _load_summary(found, label)
        return _load_log(found, label)
    if p.suffix in (".jsonl", ".ndjson"):
        return _load_log(p, label)
    return _load_summary(p, label)


def _load_summary(path: Path, label: str | None) -> RunSide:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnalyzeError(
            f"{path}: not readable JSON ({err}); pass an analyze summary.json "
            "or a training .jsonl log"
        ) from None
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        raise AnalyzeError(
            f"{path} is not a moescope analyze summary (format {SUMMARY_FORMAT!r}); pass an "
            "analyze output directory or a training .jsonl log"
        )
    layers = {name: LayerStats.from_json_dict(d) for name, d in data.get("layers", {}).items()}
    if not layers:
        raise AnalyzeError(f"{path} has no layer statistics; re-run moescope analyze")
    model = data.get("model", {})
    desc = f"{model.get('model_type', '?')} from {model.get('source', '?')}"
    if model.get("random_weights"):
        desc += " (random weights)"
    return RunSide(
        label=label or _default_label(path, "analysis"),
        path=str(path),
        kind="analysis",
        snapshot=Snapshot(step=None, layers=layers),
        alerts=list(data.get("alerts", [])),
        tokens=int(data.get("total_tokens") or 0),
        description=desc,
        partial=bool(data.get("partial", False)),
    )


def _load_log(path: Path, label: str | None) -> RunSide:
    try:
        records = read_jsonl(path)
    except (OSError, UnicodeDecodeError) as err:
        raise AnalyzeError(f"{path}: cannot read it ({err}); pass a moescope JSONL log") from None
    snaps: list[tuple[int, Any]] = []
    alerts: list[dict[str, Any]] = []
    for rec in records:
        if not isinstance(rec, dict):
            continue
        if (
            rec.get("kind") == "snapshot"
            and isinstance(rec.get("snapshot"), dict)
            and rec.get("mode", "train") == "train"
        ):
            try:
                snap = Snapshot.from_json(json.dumps(rec["snapshot"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line from another writer: skip it, keep the rest
            snaps.append((int(rec.get("step") or 0), snap))
        if rec.get("kind") in ("snapshot", "alerts"):
            alerts.extend(a for a in rec.get("alerts") or [] if isinstance(a, dict))
    if not snaps:
        raise AnalyzeError(
            f'{path} has no snapshot line (kind "snapshot"); pass a log written by '
            "moescope's JSONL sink (save_detailed_logs=True in the training callback)"
        )
    steps = [s for s, _ in snaps]
    series = {m: [float(getattr(snap, m)) for _, snap in snaps] for m in SERIES_METRICS}
    last = snaps[-1][1]
    tokens = sum(int(snap.total_tokens) for _, snap in snaps)
    return RunSide(
        label=label or _default_label(path, "training"),
        path=str(path),
        kind="training",
        snapshot=last,
        alerts=alerts,
        steps=steps,
        series=series,
        tokens=tokens,
        description=f"training log, {plural(len(snaps), 'window')} up to step {steps[-1]}",
    )


# --------------------------------------------------------------------------- comparing


def _usage(stats: Any) -> np.ndarray:
    return np.asarray(stats.usage_fraction, dtype=np.float64)


def compare_sides(a: RunSide, b: RunSide) -> Comparison:
    """Match the layers of ``a`` and ``b`` and compute every per-layer number."""
    la, lb = list(a.snapshot.layers), list(b.snapshot.layers)
    notes: list[str] = []
    common = [x for x in la if x in lb]
    if common:
        pairs = [(x, x) for x in common]
        only_a = [x for x in la if x not in lb]
        only_b = [x for x in lb if x not in la]
    elif len(la) == len(lb):
        pairs = list(zip(la, lb, strict=True))
        only_a, only_b = [], []
        notes.append(
            "the two runs name their MoE layers differently; layers are matched by position"
        )
    else:
        raise AnalyzeError(
            f"the runs share no MoE layer ({len(la)} layers in {a.label}, {len(lb)} in "
            f"{b.label}, no common name); compare runs of the same architecture"
        )
    out: list[LayerComparison] = []
    for name_a, name_b in pairs:
        sa, sb = a.snapshot.layers[name_a], b.snapshot.layers[name_b]
        ua, ub = _usage(sa), _usage(sb)
        if ua.shape != ub.shape:
            js = float("nan")
            notes.append(
                f"{name_a}: {ua.shape[0]} experts in {a.label}, {ub.shape[0]} in "
                f"{b.label}; no divergence"
            )
        else:
            js = js_divergence(ua, ub)
        metrics = {m: (float(getattr(sa, m)), float(getattr(sb, m))) for m in BALANCE_METRICS}
        out.append(LayerComparison(name_a, name_b, ua, ub, js, metrics))
    for s in (a, b):
        if s.partial:
            notes.append(f"{s.label} is a partial analysis (interrupted)")
    va, vb = (
        diagnose(s.snapshot, s.alerts, last_step=s.steps[-1] if s.steps else None) for s in (a, b)
    )
    healthier, reasons = compare_health(a.label, va, a.snapshot, b.label, vb, b.snapshot)
    return Comparison(a, b, out, only_a, only_b, notes, va, vb, healthier, reasons)


def parse_labels(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (two different non-empty names)."""
    labels = [x.strip() for x in str(text).split(",")]
    if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
        raise AnalyzeError(f"--labels needs two different names separated by a comma, got {text!r}")
    return labels


@dataclass
class CompareOptions:
    """Settings of ``moescope compare`` (every flag is one field; the CLI is derived).

    ``labels`` also accepts a list of two names.
    """

    a: str = option(
        help="a moescope analyze output folder or its summary.json, a training JSONL log, "
        "or a run folder holding one (moe_logs/ and up to three levels down)",
        metavar="A",
        positional=True,
    )
    b: str = option(help="the same for the second run", metavar="B", positional=True)
    out: str = option("moescope-compare", help="output directory", metavar="DIR")
    labels: str | None = option(
        None,
        help="names of the two runs in the report, comma-separated (default: from their paths)",
        metavar="A,B",
    )
    overwrite: bool = option(
        False, help="write into a non-empty directory that is not a moescope output"
    )

    def label_pair(self) -> list[str] | None:
        """The two labels, or None (validated)."""
        if self.labels is None:
            return None
        if isinstance(self.labels, (list, tuple)):
            return parse_labels(",".join(self.labels))
        return parse_labels(self.labels)


def run_compare(options: CompareOptions) -> Path:
    """Compare, write the report; returns the path of ``report.html``."""
    cmp = compare_sources(options.a, options.b, labels=options.label_pair())
    return write_comparison(cmp, options.out, overwrite=options.overwrite)


def compare_sources(
    a: str | Path, b: str | Path, *, labels: list[str] | tuple[str, str] | None = None
) -> Comparison:
    """Read both sides (:func:`load_side`) and compare them (:func:`compare_sides`)."""
    la, lb = (labels[0], labels[1]) if labels else (None, None)
    side_a, side_b = load_side(a, la), load_side(b, lb)
    if side_a.label == side_b.label:
        side_a.label, side_b.label = f"A: {side_a.label}", f"B: {side_b.label}"
    return compare_sides(side_a, side_b)


def write_comparison(cmp: Comparison, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``comparison.json`` (from ``cmp``) and the report into ``out``; returns the
    path of ``report.html``."""
    out_dir = prepare_out_dir(out, overwrite=overwrite)
    write_text(out_dir, "comparison.json", json.dumps(cmp.to_json(), indent=2, allow_nan=False))
    return render_comparison(cmp, out_dir)
