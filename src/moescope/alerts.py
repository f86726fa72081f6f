"""Alert rules over a :class:`~moescope.stats.snapshot.Snapshot`, and their grouping.

Every rule names the registry metric it reads (:mod:`moescope.stats.registry`), the
threshold it compares against and a short remediation (:data:`RULES`); the per-window
threshold rules are :class:`LayerRule` objects (spec + predicate, :data:`LAYER_RULES`),
the two trend rules methods of :class:`AlertRules` that keep per-layer state. Defaults follow the monitoring-callback guide (seed 001): an
expert above 4x the mean load (``alert_threshold_imbalance=4.0``), 25 % or more experts
unused (``unused_expert_threshold=0.25``), routing entropy below 0.1 nats
(``entropy_threshold=0.1``). Added here: non-finite router scores (any token), a
dropped-slot fraction above 10 % (Switch Transformer's capacity factor 1.0-1.25 drops a
few percent of tokens when balanced; 10 % means capacity is badly undersized or the load
badly skewed), and two *trend* rules that need several windows: normalised routing
entropy falling in each of the last 5 windows by 0.15 or more in total
(``entropy_falling``; a healthy router specialising early in training fell by up to 0.09
over 5 windows in the demo's balanced run, the collapsing one by 0.53), and experts
below 0.1 x the mean load in each of the last 5 windows (``cold_experts``).

Console lines keep the seed's format exactly, e.g.
``⚠️  MoE Alert at step 1500: model.layers.0.mlp: Severe expert imbalance (ratio: 4.52)``;
the metric, the threshold and the remediation go on indented lines after it
(:func:`format_update`). :class:`AlertTracker` groups repeated firings of the same rule
on the same layer across windows: a new firing is printed in full once, later windows
only say "still firing since step 150" (every ``remind_every`` windows), and a line says
when it resolved.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from moescope._text import plural
from moescope.stats import registry as R
from moescope.stats.snapshot import LayerStats, Snapshot

__all__ = [
    "LAYER_RULES",
    "RULES",
    "Alert",
    "AlertRules",
    "AlertState",
    "AlertTracker",
    "AlertUpdate",
    "LayerRule",
    "RuleSpec",
    "format_alert",
    "format_detail",
    "format_update",
    "markdown_table",
    "print_alert",
]

ALERT_PREFIX = "⚠️  MoE Alert"
#: Indentation of the lines that follow an alert line (detail, remediation).
DETAIL_INDENT = "    "


@dataclass(frozen=True)
class RuleSpec:
    """What a rule reads and what to do when it fires.

    ``metric``: the quantity compared (as printed); ``option``: the :class:`AlertRules`
    argument holding its threshold; ``remediation``: a short first thing to try;
    ``reads``: the registry metric (:mod:`moescope.stats.registry`) the rule reads.
    """

    name: str
    metric: str
    option: str
    remediation: str
    reads: str = ""


def _spec(name: str, reads: str, option: str, remediation: str, metric: str = "") -> RuleSpec:
    return RuleSpec(name, metric or R.metric(reads).text, option, remediation, reads)


_FIX_AUX = "raise the aux-loss coefficient"

#: Every built-in rule by name (threshold rules first, then the trend rules).
RULES: dict[str, RuleSpec] = {
    r.name: r
    for r in (
        _spec(
            "nonfinite_scores", "nonfinite_tokens", "nonfinite",
            "router logits overflow: lower the learning rate or loss scale, add a "
            "router z-loss, compute the router in float32",
        ),
        _spec(
            "imbalance", "max_over_mean", "imbalance_threshold",
            "raise the load-balancing (aux) loss coefficient (e.g. "
            "router_aux_loss_coef) and check that the aux loss is added to the loss; "
            "check the router learning rate",
        ),
        _spec(
            "unused_experts", "unused_experts", "unused_fraction_threshold",
            f"experts get no token: {_FIX_AUX}, add router "
            "jitter/noise, or lower the router learning rate",
        ),
        _spec(
            "entropy_collapse", "routing_entropy", "entropy_threshold",
            "the router is near-deterministic: lower the router learning rate, add a "
            f"router z-loss, {_FIX_AUX}",
        ),
        _spec(
            "dropped_fraction", "dropped_fraction", "dropped_fraction_threshold",
            "raise the capacity factor, or improve balance with the aux-loss coefficient",
        ),
        _spec(
            "entropy_falling", "routing_entropy_norm", "entropy_falling_windows",
            "routing is collapsing gradually: check the router learning rate and that "
            "the aux loss is applied; compare with the eval window",
            metric="normalised routing entropy drop",
        ),
        _spec(
            "cold_experts", "usage_counts", "cold_expert_windows",
            f"experts are starving before they die: {_FIX_AUX} or add router noise",
            metric="experts below x mean load",
        ),
    )
}  # fmt: skip


@dataclass
class Alert:
    """One rule that fired for one layer.

    ``level`` is ``"warning"`` or ``"critical"`` (non-finite router scores); ``rule`` a
    key of :data:`RULES`; ``value`` the measured quantity; ``message`` the text after the
    layer name in :func:`format_alert`; ``threshold`` the bound it crossed; ``detail``
    the metric against the threshold, e.g. ``max/mean load 4.52 > 4.0 threshold``.
    """

    level: str
    layer: str
    rule: str
    value: float
    step: int | None
    message: str
    threshold: float | None = None
    detail: str = ""

    @property
    def remediation(self) -> str:
        """What to try first (empty for a rule not in :data:`RULES`)."""
        spec = RULES.get(self.rule)
        return spec.remediation if spec is not None else ""


def markdown_table() -> str:
    """The alert-rule table of docs/metrics.md (``<!-- registry:alerts -->``): rule, the
    registry metric it reads, the :class:`AlertRules` argument and its default, the fix."""
    defaults = AlertRules()
    rows = ["| rule | reads | `AlertRules` argument (default) | fix |", "|---|---|---|---|"]
    for name, spec in RULES.items():
        rows.append(
            f"| `{name}` | `{spec.reads}` ({spec.metric}) | `{spec.option}` "
            f"({getattr(defaults, spec.option)!r}) | {spec.remediation} |"
        )
    return "\n".join(rows)


def format_alert(alert: Alert) -> str:
    """The console line: ``⚠️  MoE Alert at step <step>: <layer>: <message>``.

    With an unknown step the ``at step`` part is left out.
    """
    where = f" at step {alert.step}" if alert.step is not None else ""
    return f"{ALERT_PREFIX}{where}: {alert.layer}: {alert.message}"


def format_detail(alert: Alert, remediation: bool = True) -> list[str]:
    """The indented lines under an alert line: the metric against its threshold, and
    (``remediation=True``) ``fix: <what to try>``."""
    out = [f"{DETAIL_INDENT}{alert.detail}"] if alert.detail else []
    if remediation and alert.remediation:
        out.append(f"{DETAIL_INDENT}fix: {alert.remediation}")
    return out


def print_alert(alert: Alert) -> None:
    """An ``on_alert`` callback that prints :func:`format_alert` to stdout."""
    print(format_alert(alert), flush=True)


AlertCallback = Callable[[Alert], None]


def _g(x: float) -> str:
    """A threshold as the user wrote it (4.0 -> "4.0", 0.25 -> "0.25")."""
    return repr(float(x))


@dataclass(frozen=True)
class LayerRule:
    """A threshold rule on one layer's :class:`LayerStats`: its spec and its predicate.

    ``predicate(stats, threshold)`` returns the measured value when the rule fires, None
    otherwise; ``describe(stats, value, threshold)`` returns (message, detail);
    ``needs_tokens``: skip layers below ``AlertRules.min_tokens``; ``threshold(option)``
    the bound reported with the alert.
    """

    spec: RuleSpec
    predicate: Callable[[LayerStats, float], float | None]
    describe: Callable[[LayerStats, float, float], tuple[str, str]]
    level: str = "warning"
    needs_tokens: bool = True
    threshold: Callable[[float], float | None] = float


def _above(name: str) -> Callable[[LayerStats, float], float | None]:
    def pred(s: LayerStats, t: float) -> float | None:
        v = float(getattr(s, name))
        return v if _finite(v) and v > t else None

    return pred


def _below(name: str) -> Callable[[LayerStats, float], float | None]:
    def pred(s: LayerStats, t: float) -> float | None:
        v = float(getattr(s, name))
        return v if _finite(v) and v < t else None

    return pred


def _unused(s: LayerStats, t: float) -> float | None:
    u = s.unused_experts
    if not _finite(u) or s.num_experts <= 0 or u <= 0:
        return None
    return float(u) if u / s.num_experts >= t else None


def _nonfinite(s: LayerStats, t: float) -> float | None:
    return float(s.nonfinite_tokens) if s.nonfinite_tokens > 0 else None


def _unused_text(s: LayerStats, v: float, t: float) -> tuple[str, str]:
    u, e = int(v), s.num_experts
    return f"{u}/{e} experts unused", f"unused experts {u}/{e} = {u / e:.0%} >= {t:.0%} threshold"


#: The per-window threshold rules, in the order they are checked on each layer.
LAYER_RULES: tuple[LayerRule, ...] = (
    LayerRule(
        RULES["nonfinite_scores"],
        _nonfinite,
        lambda s, v, t: (
            f"{int(v)} tokens with non-finite router scores (excluded from metrics)",
            f"{int(v)} router rows with NaN/inf scores > 0 allowed",
        ),
        level="critical",
        needs_tokens=False,
        threshold=lambda t: 0.0,
    ),
    LayerRule(
        RULES["imbalance"],
        _above("max_over_mean"),
        lambda s, v, t: (
            f"Severe expert imbalance (ratio: {v:.2f})",
            f"max/mean load {v:.2f} > {_g(t)} threshold",
        ),
    ),
    LayerRule(RULES["unused_experts"], _unused, _unused_text),
    LayerRule(
        RULES["entropy_collapse"],
        _below("routing_entropy"),
        lambda s, v, t: (
            f"Routing entropy collapse (entropy: {v:.4f})",
            f"routing entropy {v:.4f} nats < {_g(t)} threshold",
        ),
    ),
    LayerRule(
        RULES["dropped_fraction"],
        _above("dropped_fraction"),
        lambda s, v, t: (
            f"High dropped-slot fraction (dropped: {v:.1%})",
            f"dropped slots {v:.1%} > {t:.1%} threshold",
        ),
    ),
)


class AlertRules:
    """Thresholds and the rules that check a Snapshot against them.

    Args:
        imbalance_threshold: alert when a layer's ``max_over_mean`` is above it.
        unused_fraction_threshold: alert when ``unused_experts / E`` is at least this.
        entropy_threshold: alert when ``routing_entropy`` (nats) is below it.
        dropped_fraction_threshold: alert when ``dropped_fraction`` is above it.
        nonfinite: alert (critical) when any router row was NaN/inf.
        entropy_falling_windows: trend rule: alert when ``routing_entropy_norm`` fell in
            each of this many consecutive windows ...
        entropy_falling_min_drop: ... by at least this much in total (normalised entropy,
            0..1; a router specialising early in training falls a little, a collapse
            falls a lot).
        cold_expert_load: trend rule: an expert is cold in a window when its load is
            below this fraction of the layer's mean load (0 load included) ...
        cold_expert_windows: ... and the rule fires for experts cold in each of this
            many consecutive windows.
        min_tokens: ignore layers that saw fewer valid tokens than this in the window
            (tiny windows give noisy ratios); layers with no token are always ignored
            except by the non-finite rule.
        on_alert: called with every Alert that fires, in order; it may raise to stop
            training (the exception propagates out of :meth:`check`).

    ``None`` for a threshold (or a window count) disables that rule. The trend rules keep
    O(layers x experts) state between calls: call :meth:`check` once per window, in
    order, and :meth:`reset_trends` to forget the past windows.
    """

    def __init__(
        self,
        imbalance_threshold: float | None = 4.0,
        unused_fraction_threshold: float | None = 0.25,
        entropy_threshold: float | None = 0.1,
        dropped_fraction_threshold: float | None = 0.1,
        nonfinite: bool = True,
        entropy_falling_windows: int | None = 5,
        entropy_falling_min_drop: float = 0.15,
        cold_expert_load: float | None = 0.1,
        cold_expert_windows: int | None = 5,
        min_tokens: int = 1,
        on_alert: AlertCallback | None = None,
    ) -> None:
        for name, n in (
            ("entropy_falling_windows", entropy_falling_windows),
            ("cold_expert_windows", cold_expert_windows),
        ):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise ValueError(f"{name} must be an int >= 1 or None (off), got {n!r}.")
        if cold_expert_load is not None and not 0.0 < cold_expert_load < 1.0:
            raise ValueError(
                f"cold_expert_load must be in (0, 1) (a fraction of the mean load) or None, "
                f"got {cold_expert_load!r}."
            )
        self.imbalance_threshold = imbalance_threshold
        self.unused_fraction_threshold = unused_fraction_threshold
        self.entropy_threshold = entropy_threshold
        self.dropped_fraction_threshold = dropped_fraction_threshold
        self.nonfinite = nonfinite
        self.entropy_falling_windows = entropy_falling_windows
        self.entropy_falling_min_drop = float(entropy_falling_min_drop)
        self.cold_expert_load = cold_expert_load
        self.cold_expert_windows = cold_expert_windows
        self.min_tokens = max(int(min_tokens), 1)
        self.on_alert = on_alert
        self._entropy: dict[str, deque[float]] = {}
        self._cold: dict[str, np.ndarray] = {}

    def __copy__(self) -> AlertRules:
        """Same thresholds and callback, no trend history (a copy starts a new run)."""
        new = object.__new__(AlertRules)
        new.__dict__.update(self.__dict__)
        new._entropy, new._cold = {}, {}
        return new

    def reset_trends(self) -> None:
        """Forget the windows the trend rules have seen."""
        self._entropy.clear()
        self._cold.clear()

    def check(self, snapshot: Snapshot) -> list[Alert]:
        """Every alert of ``snapshot``, layer by layer; each is passed to ``on_alert``.

        Order per layer: non-finite, imbalance, unused, entropy, dropped, entropy
        falling, cold experts.
        """
        alerts: list[Alert] = []
        step = snapshot.step

        def fire(
            level: str,
            layer: str,
            rule: str,
            value: float,
            message: str,
            threshold: float | None,
            detail: str,
        ) -> None:
            a = Alert(
                level=level,
                layer=layer,
                rule=rule,
                value=float(value),
                step=step,
                message=message,
                threshold=threshold,
                detail=detail,
            )
            alerts.append(a)
            if self.on_alert is not None:
                self.on_alert(a)

        for name, s in snapshot.layers.items():
            for rule in LAYER_RULES:
                t = getattr(self, rule.spec.option)
                if t is None or t is False:
                    continue
                if rule.needs_tokens and s.num_tokens < self.min_tokens:
                    continue
                value = rule.predicate(s, float(t))
                if value is not None:
                    message, detail = rule.describe(s, value, float(t))
                    fire(rule.level, name, rule.spec.name, value, message, rule.threshold(t),
                         detail)  # fmt: skip
            if s.num_tokens < self.min_tokens:
                continue
            self._entropy_trend(name, s.routing_entropy_norm, fire)
            self._cold_trend(name, s.usage_counts, fire)
        return alerts

    def _entropy_trend(self, name: str, value: float, fire: Callable[..., None]) -> None:
        n = self.entropy_falling_windows
        if n is None or not _finite(value):
            return
        hist = self._entropy.setdefault(name, deque(maxlen=n + 1))
        hist.append(float(value))
        if len(hist) <= n:
            return
        vals = list(hist)
        falling = all(b < a for a, b in pairwise(vals))
        drop = vals[0] - vals[-1]
        t = self.entropy_falling_min_drop
        if falling and drop >= t:
            fire(
                "warning",
                name,
                "entropy_falling",
                drop,
                f"Routing entropy falling for {plural(n, 'window')} "
                f"(normalised: {vals[0]:.3f} -> {vals[-1]:.3f})",
                t,
                f"normalised routing entropy fell {drop:.3f} over {plural(n, 'window')} >= {_g(t)} threshold",
            )

    def _cold_trend(self, name: str, counts: np.ndarray, fire: Callable[..., None]) -> None:
        n, x = self.cold_expert_windows, self.cold_expert_load
        if n is None or x is None:
            return
        c = np.asarray(counts, dtype=np.float64)
        mean = float(c.mean()) if c.size else 0.0
        if mean <= 0:
            return
        cold = c < x * mean
        streak = self._cold.get(name)
        if streak is None or streak.shape != cold.shape:
            streak = np.zeros(cold.shape, dtype=np.int64)
        streak = np.where(cold, streak + 1, 0)
        self._cold[name] = streak
        ids = np.nonzero(streak >= n)[0]
        if ids.size == 0:
            return
        shown = ", ".join(str(int(i)) for i in ids[:8]) + (", ..." if ids.size > 8 else "")
        fire(
            "warning",
            name,
            "cold_experts",
            float(ids.size),
            f"{ids.size}/{c.size} experts cold for {plural(n, 'window')}",
            float(x),
            f"experts {shown} below {_g(x)} x mean load in each of the last {plural(n, 'window')}",
        )


def _finite(x: float) -> bool:
    return math.isfinite(x)


# ------------------------------------------------------------------------ grouping


@dataclass
class AlertState:
    """One (layer, rule) that is firing: since which step, how often, its last alert.

    ``windows``: windows it fired in; ``quiet``: consecutive windows without firing since
    the last one (it resolves at ``resolve_after``).
    """

    layer: str
    rule: str
    since: int | None
    last: Alert
    windows: int = 1
    quiet: int = 0


@dataclass(frozen=True)
class AlertUpdate:
    """What changed in one window (from :meth:`AlertTracker.update`).

    ``new``: alerts whose (layer, rule) was not firing; ``ongoing``: states that fired
    again; ``resolved``: states that stopped firing (removed from the tracker);
    ``remind``: a "still firing" summary is due (every ``remind_every`` windows in which
    some alert kept firing).
    """

    step: int | None
    new: tuple[Alert, ...] = ()
    ongoing: tuple[AlertState, ...] = ()
    resolved: tuple[AlertState, ...] = ()
    remind: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.new or self.resolved)


@dataclass
class AlertTracker:
    """Groups repeated firings of the same rule on the same layer across windows.

    Args:
        resolve_after: a firing alert resolves after this many consecutive windows
            without it (2 keeps a value hovering at the threshold from printing a
            new/resolved pair every window).
        remind_every: ask for a "still firing" summary every this many windows in which
            some alert kept firing (0 or None: never).

    Attributes:
        hinted: rules whose remediation was already shown (kept by
            :func:`format_update`, so each "fix:" line appears once per rule).
    """

    resolve_after: int = 2
    remind_every: int | None = 10
    hinted: set[str] = field(default_factory=set)
    _active: dict[tuple[str, str], AlertState] = field(default_factory=dict)
    _quiet_windows: int = 0

    def __post_init__(self) -> None:
        if self.resolve_after < 1:
            raise ValueError(f"resolve_after must be >= 1, got {self.resolve_after}.")

    @property
    def active(self) -> list[AlertState]:
        """Firing (layer, rule) states, in the order they first fired."""
        return list(self._active.values())

    def update(self, alerts: Iterable[Alert], step: int | None) -> AlertUpdate:
        """Feed the alerts of one window (all that fired, possibly none)."""
        new: list[Alert] = []
        ongoing: list[AlertState] = []
        fired: set[tuple[str, str]] = set()
        for a in alerts:
            key = (a.layer, a.rule)
            if key in fired:
                continue
            fired.add(key)
            st = self._active.get(key)
            if st is None:
                self._active[key] = AlertState(
                    a.layer, a.rule, a.step if a.step is not None else step, a
                )
                new.append(a)
            else:
                st.last, st.windows, st.quiet = a, st.windows + 1, 0
                ongoing.append(st)
        resolved: list[AlertState] = []
        for key, st in list(self._active.items()):
            if key in fired:
                continue
            st.quiet += 1
            if st.quiet >= self.resolve_after:
                resolved.append(self._active.pop(key))
        # The reminder counts windows in which something kept firing, whatever else
        # changed meanwhile (a flapping alert must not silence a persistent one).
        remind = False
        if ongoing:
            self._quiet_windows += 1
            every = self.remind_every
            if every and self._quiet_windows >= every:
                remind, self._quiet_windows = True, 0
        return AlertUpdate(step, tuple(new), tuple(ongoing), tuple(resolved), remind)


def _summary(states: Sequence[AlertState]) -> str:
    """``imbalance on 3 layers since step 150 (worst 6.10: model.layers.0.mlp), ...``"""
    by_rule: dict[str, list[AlertState]] = {}
    for st in states:
        by_rule.setdefault(st.rule, []).append(st)
    parts = []
    for rule, group in by_rule.items():
        steps = [g.since for g in group if g.since is not None]
        since = f" since step {min(steps)}" if steps else ""
        worst = max(group, key=lambda g: g.last.value if _finite(g.last.value) else -math.inf)
        where = f"{len(group)} layers" if len(group) > 1 else group[0].layer
        extra = f" (worst {worst.last.value:.2f}: {worst.layer})" if len(group) > 1 else ""
        parts.append(f"{rule} on {where}{since}{extra}")
    return ", ".join(parts)


#: New alerts of one rule printed in full per window; the rest become one line.
MAX_NEW_PER_RULE = 3


def _worst_first(group: Sequence[Alert]) -> list[Alert]:
    """``group`` (alerts of one rule) ordered from the worst value (by the direction the
    rule's registry metric calls healthier) to the mildest, model order among ties."""
    spec = RULES.get(group[0].rule)
    better = None
    if spec is not None:
        try:
            better = R.metric(spec.reads).better
        except KeyError:  # a rule on a vector (cold experts): larger value is worse
            better = None
    sign = 1.0 if better == "higher" else -1.0

    def key(ia: tuple[int, Alert]) -> tuple[float, int]:
        v = ia[1].value
        return (sign * v if _finite(v) else math.inf, ia[0])

    return [a for _, a in sorted(enumerate(group), key=key)]


def format_update(
    update: AlertUpdate, hinted: set[str] | None = None, max_per_rule: int = MAX_NEW_PER_RULE
) -> list[str]:
    """Console lines of one window's :class:`AlertUpdate`.

    - new alerts, per rule: the ``max_per_rule`` worst in full (seed-format line
      (:func:`format_alert`), the indented metric-vs-threshold line, then ``fix: ...`` the
      first time the rule appears; the rules already hinted are kept in ``hinted``,
      updated in place; None: always), then, when more layers fired it, one line
      ``... and N more layers: <rule> (mildest V: <layer>)``: at 61 layers a collapsing
      model prints a few lines per rule, not a hundred (the JSONL log and the
      report keep every alert);
    - every resolved one: ``   MoE alert resolved at step S: <layer>: <rule> (firing
      since step F)``;
    - when a reminder is due: one ``   MoE alerts still firing at step S: ...`` line
      grouping the firing (layer, rule) pairs by rule.
    """
    out: list[str] = []
    by_rule: dict[str, list[Alert]] = {}
    for a in update.new:
        by_rule.setdefault(a.rule, []).append(a)
    for rule, group in by_rule.items():
        ranked = _worst_first(group) if len(group) > max_per_rule else group
        for a in ranked[:max_per_rule]:
            out.append(format_alert(a))
            show_fix = hinted is None or a.rule not in hinted
            out.extend(format_detail(a, remediation=show_fix))
            if hinted is not None:
                hinted.add(a.rule)
        rest = ranked[max_per_rule:]
        if rest:
            mild = rest[-1]
            out.append(
                f"{DETAIL_INDENT}... and {len(rest)} more layers: {rule} "
                f"(mildest {mild.value:.2f}: {mild.layer})"
            )
    at = f" at step {update.step}" if update.step is not None else ""
    for st in update.resolved:
        since = f" (firing since step {st.since})" if st.since is not None else ""
        out.append(f"{DETAIL_INDENT}MoE alert resolved{at}: {st.layer}: {st.rule}{since}")
    if update.remind and update.ongoing:
        out.append(f"{DETAIL_INDENT}MoE alerts still firing{at}: {_summary(update.ongoing)}")
    return out
