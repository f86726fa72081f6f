"""Alert rules over a :class:`~moescope.stats.snapshot.Snapshot`.

Defaults follow the monitoring-callback guide (seed 001): an expert above 4x the mean load
(``alert_threshold_imbalance=4.0``), 25 % or more experts unused
(``unused_expert_threshold=0.25``), routing entropy below 0.1 nats
(``entropy_threshold=0.1``). Added here: non-finite router scores (any token) and a
dropped-slot fraction above 10 % (Switch Transformer's capacity factor 1.0-1.25 drops a
few percent of tokens when balanced; 10 % means capacity is badly undersized or the load
badly skewed).

Console lines keep the seed's format exactly, e.g.
``⚠️  MoE Alert at step 1500: model.layers.0.mlp: Severe expert imbalance (ratio: 4.52)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from moescope.stats.snapshot import Snapshot

__all__ = ["Alert", "AlertRules", "format_alert", "print_alert"]

ALERT_PREFIX = "⚠️  MoE Alert"


@dataclass
class Alert:
    """One rule that fired for one layer.

    ``level`` is ``"warning"`` or ``"critical"`` (non-finite router scores); ``rule`` one of
    ``imbalance``, ``unused_experts``, ``entropy_collapse``, ``nonfinite_scores``,
    ``dropped_fraction``; ``value`` the measured quantity; ``message`` the text after the
    layer name in :func:`format_alert`.
    """

    level: str
    layer: str
    rule: str
    value: float
    step: int | None
    message: str


def format_alert(alert: Alert) -> str:
    """The console line: ``⚠️  MoE Alert at step <step>: <layer>: <message>``.

    With an unknown step the ``at step`` part is left out.
    """
    where = f" at step {alert.step}" if alert.step is not None else ""
    return f"{ALERT_PREFIX}{where}: {alert.layer}: {alert.message}"


def print_alert(alert: Alert) -> None:
    """An ``on_alert`` callback that prints :func:`format_alert` to stdout."""
    print(format_alert(alert), flush=True)


AlertCallback = Callable[[Alert], None]


class AlertRules:
    """Thresholds and the rules that check a Snapshot against them.

    Args:
        imbalance_threshold: alert when a layer's ``max_over_mean`` is above it.
        unused_fraction_threshold: alert when ``unused_experts / E`` is at least this.
        entropy_threshold: alert when ``routing_entropy`` (nats) is below it.
        dropped_fraction_threshold: alert when ``dropped_fraction`` is above it.
        nonfinite: alert (critical) when any router row was NaN/inf.
        min_tokens: ignore layers that saw fewer valid tokens than this in the window
            (tiny windows give noisy ratios); layers with no token are always ignored
            except by the non-finite rule.
        on_alert: called with every Alert that fires, in order; it may raise to stop
            training (the exception propagates out of :meth:`check`).

    ``None`` for a threshold disables that rule.
    """

    def __init__(
        self,
        imbalance_threshold: float | None = 4.0,
        unused_fraction_threshold: float | None = 0.25,
        entropy_threshold: float | None = 0.1,
        dropped_fraction_threshold: float | None = 0.1,
        nonfinite: bool = True,
        min_tokens: int = 1,
        on_alert: AlertCallback | None = None,
    ) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.unused_fraction_threshold = unused_fraction_threshold
        self.entropy_threshold = entropy_threshold
        self.dropped_fraction_threshold = dropped_fraction_threshold
        self.nonfinite = nonfinite
        self.min_tokens = max(int(min_tokens), 1)
        self.on_alert = on_alert

    def check(self, snapshot: Snapshot) -> list[Alert]:
        """Every alert of ``snapshot``, layer by layer; each is passed to ``on_alert``."""
        alerts: list[Alert] = []
        step = snapshot.step

        def fire(level: str, layer: str, rule: str, value: float, message: str) -> None:
            a = Alert(level=level, layer=layer, rule=rule, value=float(value), step=step,
                      message=message)
            alerts.append(a)
            if self.on_alert is not None:
                self.on_alert(a)

        for name, s in snapshot.layers.items():
            if self.nonfinite and s.nonfinite_tokens > 0:
                fire("critical", name, "nonfinite_scores", s.nonfinite_tokens,
                     f"{s.nonfinite_tokens} tokens with non-finite router scores "
                     "(excluded from metrics)")
            if s.num_tokens < self.min_tokens:
                continue
            t = self.imbalance_threshold
            if t is not None and _finite(s.max_over_mean) and s.max_over_mean > t:
                fire("warning", name, "imbalance", s.max_over_mean,
                     f"Severe expert imbalance (ratio: {s.max_over_mean:.2f})")
            t = self.unused_fraction_threshold
            if t is not None and _finite(s.unused_experts) and s.num_experts > 0:
                frac = s.unused_experts / s.num_experts
                if frac >= t and s.unused_experts > 0:
                    fire("warning", name, "unused_experts", s.unused_experts,
                         f"{int(s.unused_experts)}/{s.num_experts} experts unused")
            t = self.entropy_threshold
            if t is not None and _finite(s.routing_entropy) and s.routing_entropy < t:
                fire("warning", name, "entropy_collapse", s.routing_entropy,
                     f"Routing entropy collapse (entropy: {s.routing_entropy:.4f})")
            t = self.dropped_fraction_threshold
            if t is not None and _finite(s.dropped_fraction) and s.dropped_fraction > t:
                fire("warning", name, "dropped_fraction", s.dropped_fraction,
                     f"High dropped-slot fraction (dropped: {s.dropped_fraction:.1%})")
        return alerts


def _finite(x: float) -> bool:
    return math.isfinite(x)
