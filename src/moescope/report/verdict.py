"""HTML of a :class:`~moescope.analysis.verdict.Verdict`: the section that opens a report,
and the grouped alert table (one row per rule, as the console groups repeated alerts).

Rendering only: the findings, the experts at fault, the meaning and the fix were computed
by :mod:`moescope.analysis.verdict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moescope._text import plural
from moescope.plots import short_names
from moescope.report import html as H
from moescope.report.fmt import fmt_number

if TYPE_CHECKING:
    from moescope.analysis.verdict import Finding, Verdict

__all__ = ["alerts_table", "finding_html", "plural", "short_layer_labels", "verdict_section"]


def short_layer_labels(names: list[str]) -> dict[str, str]:
    """``{path: label}``: ``model.layers.3.mlp`` -> ``layer 3`` when the paths differ by one
    number; otherwise the shortest distinct form (or the path itself)."""
    short, pattern = short_names(names)
    if not pattern:
        return {n: n for n in names}
    return {n: f"layer {x}" if x.isdigit() else x for n, x in zip(names, short, strict=True)}


def _layers_text(f: Finding, short: dict[str, str]) -> str:
    parts = []
    for layer in f.layers:
        name = short.get(layer, layer)
        ids = f.experts.get(layer)
        if ids:
            shown = ", ".join(str(i) for i in ids[:8]) + (", ..." if len(ids) > 8 else "")
            parts.append(f"{name} ({'expert' if len(ids) == 1 else 'experts'} {shown})")
        else:
            parts.append(name)
    return "; ".join(parts)


def _threshold_text(f: Finding) -> str:
    if f.threshold is None:
        return f.metric
    t = fmt_number(f.threshold)
    if f.rule == "unused_experts":
        return f"{f.metric} >= {f.threshold:.0%} of a layer's experts"
    if f.rule == "dropped_fraction":
        return f"{f.metric} > {f.threshold:.0%}"
    if f.rule == "entropy_collapse":
        return f"{f.metric} < {t}"
    if f.rule == "nonfinite_scores":
        return f"{f.metric} > 0"
    if f.rule == "cold_experts":
        return f"experts below {f.threshold:g} x mean load in consecutive windows"
    if f.rule == "entropy_falling":
        return f"{f.metric} >= {f.threshold:g} over consecutive falling windows"
    return f"{f.metric} > {t}" if f.rule == "imbalance" else f"{f.metric}, threshold {t}"


def finding_html(f: Finding, short: dict[str, str] | None = None) -> str:
    """One finding: title, where (layers and experts), what it means, the fix."""
    short = short or {}
    when = ""
    if f.windows > 1:
        when = (
            f"; fired {plural(f.firings, 'time')} in {plural(f.windows, 'window')}, "
            f"steps {f.since}-{f.last}"
        )
    option = ""
    if f.option and f.threshold is not None and f.rule not in ("entropy_falling", "cold_experts"):
        option = f" (AlertRules({f.option}={f.threshold:g}))"
    rows = [
        ("where", _layers_text(f, short)),
        ("meaning", f.meaning),
        ("fix", f.fix),
        ("rule", f"{f.rule}: {_threshold_text(f)}{option}{when}"),
    ]
    items = "".join(f"<dt>{H.escape(k)}</dt><dd>{H.escape(v)}</dd>" for k, v in rows)
    title = f.title if f.active else f"{f.title} (resolved: last fired at step {f.last})"
    level = f.level if f.active else "resolved"
    return (
        f'<div class="finding"><h3 class="alert-{H.escape(level)}">{H.escape(title)}</h3>'
        f'<dl class="kv">{items}</dl></div>'
    )


def verdict_section(
    verdict: Verdict, short: dict[str, str] | None = None, title: str = "Verdict"
) -> H.Section:
    """The opening section: status, headline, one block per finding (or what was
    checked, when healthy)."""
    sec = H.Section("verdict", title, cls=f"verdict {verdict.status}")
    sec.add(H.paragraph(verdict.headline, "headline"))
    for f in verdict.findings:
        sec.add(finding_html(f, short))
    if not verdict.findings and verdict.checked:
        sec.add(H.paragraph("Checked: " + "; ".join(verdict.checked) + "."))
    return sec


def alerts_table(verdict: Verdict, short: dict[str, str] | None = None) -> str:
    """Alerts grouped by rule: layers, alerts, (over several windows: windows and steps),
    worst value and when the rule fires."""
    short = short or {}
    timed = any(f.windows > 1 for f in verdict.findings)
    rows = []
    for f in verdict.findings:
        row = [
            f'<span class="alert-{H.escape(f.level)}">{H.escape(f.rule)}</span>',
            _threshold_text(f),
            ", ".join(short.get(x, x) for x in f.layers),
            fmt_number(f.firings),
        ]
        if timed:
            row += [
                fmt_number(f.windows),
                "-" if f.since is None else f"{f.since}-{f.last}",
            ]
        row.append(f"{fmt_number(f.worst_value)} ({short.get(f.worst_layer, f.worst_layer)})")
        rows.append(row)
    heads = ["rule", "fires when", "layers", "alerts"]
    heads += ["windows", "steps"] if timed else []
    heads.append("worst (layer)")
    return H.table(heads, rows, left=3, raw_columns=[0])
