"""The verdict that opens a report: what is wrong, where, what the numbers mean, the fix.

:func:`diagnose` groups the alerts of a run (the rules and remediations of
:mod:`moescope.alerts`, with their thresholds) by rule, as the console does: one
:class:`Finding` per rule with the layers and experts at fault, the worst value, how many
times and since which step it fired, a sentence on what the numbers mean and the fix.
:func:`compare_health` says which of two runs is healthier and why. Everything here is
computed from the snapshot and the alerts; :mod:`moescope.report` only renders it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope._text import plural
from moescope.alerts import RULES, AlertRules

__all__ = ["Finding", "Verdict", "compare_health", "diagnose"]

#: A layer's expert is "hot" when its load (usage fraction x E) is at least this.
HOT_LOAD = 2.0
#: At most this many experts are named per layer.
MAX_EXPERTS = 4

_TITLES = {
    "nonfinite_scores": "Non-finite router scores",
    "imbalance": "Expert imbalance",
    "unused_experts": "Unused experts",
    "entropy_collapse": "Routing entropy collapse",
    "dropped_fraction": "Dropped slots",
    "entropy_falling": "Routing entropy falling",
    "cold_experts": "Cold experts",
}


@dataclass
class Finding:
    """One alert rule that fired, grouped over layers and windows.

    ``layers``: layers it fired on (model order); ``experts``: ``{layer: expert ids}`` at
    fault (hot, unused, cold or dropping experts; may be empty); ``worst_layer`` /
    ``worst_value``: where the measured value was worst; ``threshold`` / ``option``: the
    bound and the :class:`~moescope.alerts.AlertRules` argument holding it; ``firings``:
    alerts grouped here; ``windows``: distinct steps they fired at (0 for an analysis);
    ``since`` / ``last``: first and last step (None for an analysis); ``meaning``: what
    the numbers say; ``fix``: the rule's remediation.
    """

    rule: str
    level: str
    title: str
    metric: str
    option: str
    layers: list[str]
    experts: dict[str, list[int]]
    worst_layer: str
    worst_value: float
    threshold: float | None
    firings: int
    windows: int
    since: int | None
    last: int | None
    meaning: str
    fix: str
    #: still firing at the run's last window (always True for an analysis).
    active: bool = True

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (NaN left to the caller's ``json_safe``)."""
        return dict(self.__dict__)


@dataclass
class Verdict:
    """``status``: ``"healthy"``, ``"warning"`` or ``"critical"``; ``headline``: one
    sentence; ``findings``: most severe first; ``checked``: the rules and thresholds that
    were checked (what "healthy" means)."""

    status: str
    headline: str
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        """(layer, rule) pairs at fault, among the findings still firing at the end."""
        return sum(len(f.layers) for f in self.findings if f.active)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "status": self.status,
            "headline": self.headline,
            "findings": [f.to_json() for f in self.findings],
            "checked": list(self.checked),
        }


def _get(a: Any, key: str, default: Any = None) -> Any:
    if isinstance(a, Mapping):
        return a.get(key, default)
    return getattr(a, key, default)


def _checked(rules: AlertRules) -> list[str]:
    out = []
    for name, spec in RULES.items():
        t = getattr(rules, spec.option, None)
        if t is None or t is False:
            continue
        if name == "nonfinite_scores":
            out.append(f"{spec.metric} > 0")
        elif name == "imbalance":
            out.append(f"{spec.metric} > {t:g}")
        elif name == "unused_experts":
            out.append(f"{spec.metric} >= {t:.0%} of a layer")
        elif name == "entropy_collapse":
            out.append(f"{spec.metric} < {t:g}")
        elif name == "dropped_fraction":
            out.append(f"{spec.metric} > {t:.0%}")
        elif name == "entropy_falling":
            out.append(
                f"normalised routing entropy falling {plural(int(t), 'window')} in a row by >= "
                f"{rules.entropy_falling_min_drop:g}"
            )
        elif name == "cold_experts":
            out.append(
                f"experts below {rules.cold_expert_load:g} x mean load for {plural(int(t), 'window')}"
            )
    return out


def _load(s: Any) -> np.ndarray:
    f = np.asarray(s.usage_fraction, dtype=np.float64)
    return f * f.shape[0]


def _experts_at_fault(rule: str, s: Any, threshold: float | None) -> list[int]:
    if s is None or not s.num_tokens:
        return []
    load = _load(s)
    if rule == "imbalance":
        hot = np.nonzero(load >= HOT_LOAD)[0]
        return [int(i) for i in hot[np.argsort(-load[hot], kind="stable")][:MAX_EXPERTS]]
    if rule == "unused_experts":
        return [int(i) for i in np.nonzero(np.asarray(s.usage_counts) == 0)[0]]
    if rule == "cold_experts":
        x = threshold if threshold is not None else 0.1
        return [int(i) for i in np.nonzero(load < x)[0]]
    if rule == "entropy_collapse":
        return [int(i) for i in np.argsort(-load, kind="stable")[:2]]
    if rule == "dropped_fraction" and s.dropped_counts is not None:
        d = np.asarray(s.dropped_counts)
        top = np.argsort(-d, kind="stable")[:MAX_EXPERTS]
        return [int(i) for i in top if d[i] > 0]
    return []


def _meaning(rule: str, f: Finding, snapshot: Any) -> str:
    n_layers = len(snapshot.layers)
    where = f"{len(f.layers)} of {n_layers} MoE layers"
    v, t = f.worst_value, f.threshold
    layers = snapshot.layers
    if rule == "imbalance":
        return (
            f"On {where} the busiest expert gets more than {t:g}x the mean load (worst "
            f"{v:.2f}x on {f.worst_layer}; 1 = every expert equally busy). A few experts "
            "take most tokens: they set the step time under expert parallelism, and the "
            "others learn from too few tokens."
        )
    if rule == "unused_experts":
        total = sum(
            int(layers[x].unused_experts) for x in f.layers if x in layers and
            math.isfinite(layers[x].unused_experts)
        )  # fmt: skip
        experts = sum(layers[x].num_experts for x in f.layers if x in layers)
        share = f" ({total / experts:.0%})" if experts else ""
        return (
            f"{total} of the {experts} experts{share} in {where} received no token "
            f"(the rule fires at {t:.0%} of a layer's experts or more). Their parameters "
            "cost memory and compute nothing: the model is effectively smaller than it looks."
        )
    if rule == "entropy_collapse":
        return (
            f"Routing entropy is below {t:g} nats on {where} (worst {v:.4f}): each token "
            "goes to the same expert with near certainty, so the router no longer "
            "spreads or explores."
        )
    if rule == "dropped_fraction":
        return (
            f"{v:.1%} of the slots of {f.worst_layer} were dropped by the capacity limit "
            f"(the rule fires above {t:.0%}): those tokens skip the expert computation."
        )
    if rule == "nonfinite_scores":
        return (
            f"{int(v)} tokens had NaN/inf router scores on {where}: the router "
            "overflows; these tokens are left out of every metric."
        )
    if rule == "entropy_falling":
        return (
            f"Normalised routing entropy fell window after window on {where} (by {v:.2f} "
            f"at worst; the rule needs a drop of {t:g}): routing is collapsing gradually."
        )
    if rule == "cold_experts":
        return (
            f"On {where} some experts stayed below {t:g} x the mean load for several "
            "windows in a row: they are starving and about to go unused."
        )
    return ""


def diagnose(
    snapshot: Any,
    alerts: Iterable[Any],
    rules: AlertRules | None = None,
    last_step: int | None = None,
) -> Verdict:
    """The verdict of one run.

    Args:
        snapshot: the run's :class:`~moescope.stats.snapshot.Snapshot` (an analysis'
            totals, or a training log's last window): the experts at fault are read here.
        alerts: :class:`~moescope.alerts.Alert` objects or their dicts (``rule``,
            ``layer``, ``value``, ``level``, optionally ``step`` and ``threshold``), every
            window's of a log.
        rules: the thresholds in force (default :class:`AlertRules` defaults) for alerts
            that do not carry their threshold and for the "checked" list.
        last_step: a log's last logged step: a finding whose last alert is older is
            ``active=False`` (resolved before the end).
        last_step: a log's last logged step: a finding whose last alert is older is
            ``active=False`` (resolved before the end).

    Returns:
        A :class:`Verdict`; findings ordered critical first, then in :data:`RULES` order.
    """
    rules = rules or AlertRules()
    groups: dict[str, list[Any]] = {}
    for a in alerts:
        groups.setdefault(str(_get(a, "rule")), []).append(a)
    order = list(snapshot.layers)
    findings: list[Finding] = []
    for rule, group in groups.items():
        spec = RULES.get(rule)
        layers = sorted(
            {str(_get(a, "layer")) for a in group},
            key=lambda x: order.index(x) if x in order else len(order),
        )

        def badness(a: Any, rule: str = rule) -> float:
            v = float(_get(a, "value", math.nan))
            if not math.isfinite(v):
                return -math.inf
            return -v if rule == "entropy_collapse" else v

        worst = max(group, key=badness)
        steps = sorted({int(s) for s in (_get(a, "step") for a in group) if s is not None})
        threshold = _get(worst, "threshold")
        if threshold is None and spec is not None:
            opt = getattr(rules, spec.option, None)
            threshold = None if isinstance(opt, bool) or opt is None else float(opt)
        if rule == "cold_experts" and rules.cold_expert_load is not None:
            threshold = float(rules.cold_expert_load)
        experts = {
            x: e
            for x in layers
            if (e := _experts_at_fault(rule, snapshot.layers.get(x), threshold))
        }
        f = Finding(
            rule=rule,
            level="critical" if any(_get(a, "level") == "critical" for a in group) else "warning",
            title=_TITLES.get(rule, rule.replace("_", " ").capitalize()),
            metric=spec.metric if spec else rule,
            option=spec.option if spec else "",
            layers=layers,
            experts=experts,
            worst_layer=str(_get(worst, "layer")),
            worst_value=float(_get(worst, "value", math.nan)),
            threshold=None if threshold is None else float(threshold),
            firings=len(group),
            windows=len(steps),
            since=steps[0] if steps else None,
            last=steps[-1] if steps else None,
            meaning="",
            fix=spec.remediation if spec else "",
            active=last_step is None or not steps or steps[-1] >= last_step,
        )
        f.meaning = _meaning(rule, f, snapshot)
        findings.append(f)
    # Most severe first: critical, then the rules in RULES order (the direct measures of a
    # broken router before the trend rules that warn of one), then by layers affected.
    rank = {name: i for i, name in enumerate(RULES)}
    findings.sort(
        key=lambda f: (
            not f.active,
            f.level != "critical",
            rank.get(f.rule, len(rank)),
            -len(f.layers),
        )
    )
    n = len(snapshot.layers)
    if not findings:
        return Verdict(
            "healthy",
            f"Healthy: no alert rule fired on any of the {n} MoE layers.",
            [],
            _checked(rules),
        )
    active = [f for f in findings if f.active]
    if not active:
        last = max(f.last for f in findings if f.last is not None)
        return Verdict(
            "healthy",
            f"Healthy at the end: no alert fired after step {last} on the {n} MoE layers "
            f"({len(findings)} {_plural(len(findings), 'problem')} resolved before).",
            findings,
            _checked(rules),
        )
    status = "critical" if active[0].level == "critical" else "warning"
    bad = {x for f in active for x in f.layers}
    parts = [f"{f.title.lower()} on {len(f.layers)} {_plural(len(f.layers), 'layer')}"
             for f in active]  # fmt: skip
    resolved = len(findings) - len(active)
    if resolved:
        parts.append(f"and {resolved} resolved before the end")
    head = (
        f"{len(active)} {_plural(len(active), 'problem')} on {len(bad)} of {n} MoE "
        f"{_plural(n, 'layer')}: " + ", ".join(parts) + "."
    )
    return Verdict(status, head[0].upper() + head[1:], findings, _checked(rules))


def _plural(n: int, word: str) -> str:
    return plural(n, word).split(" ", 1)[1]


def compare_health(
    label_a: str, va: Verdict, snap_a: Any, label_b: str, vb: Verdict, snap_b: Any
) -> tuple[str | None, list[str]]:
    """Which run is healthier: ``(label or None for a tie, reasons)``.

    Ordered by: critical findings, then (layer, rule) pairs at fault in the verdicts,
    then unused experts, then the worst layer's max/mean load.
    """

    def key(v: Verdict, s: Any) -> tuple[float, ...]:
        crit = sum(1 for f in v.findings if f.level == "critical")
        mom = float(s.max_max_over_mean)
        return (crit, v.problems, float(s.total_unused_experts),
                mom if math.isfinite(mom) else math.inf)  # fmt: skip

    ka, kb = key(va, snap_a), key(vb, snap_b)
    reasons = [
        f"(layer, rule) pairs at fault: {va.problems} in {label_a}, {vb.problems} in {label_b}",
        f"unused experts: {int(snap_a.total_unused_experts)}/{int(snap_a.total_experts)} in "
        f"{label_a}, {int(snap_b.total_unused_experts)}/{int(snap_b.total_experts)} in {label_b}",
        f"worst max/mean load: {float(snap_a.max_max_over_mean):.2f} in {label_a}, "
        f"{float(snap_b.max_max_over_mean):.2f} in {label_b}",
        f"mean normalised load entropy (1 = even): {float(snap_a.avg_load_entropy_norm):.3f} "
        f"in {label_a}, {float(snap_b.avg_load_entropy_norm):.3f} in {label_b}",
    ]
    if ka == kb:
        return None, reasons
    return (label_a if ka < kb else label_b), reasons
