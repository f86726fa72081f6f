"""The one thing every sink receives: a :class:`LogEvent` per log step.

A training integration builds one event per window (train or eval) and calls
``sink.write(event)`` on every sink, in one place; a sink logs the parts its destination
can show and ignores the rest. Nothing in an event is computed by a sink: metrics come
from :meth:`~moescope.stats.snapshot.Snapshot.to_dict`, alerts from
:class:`~moescope.alerts.AlertRules`, figures from :mod:`moescope.plots`.

Figures: built once per event by whoever builds the event (the session builds them only
at heatmap steps and only when some sink has ``wants_figures``), as
``matplotlib.figure.Figure`` objects on their own Agg canvas (no ``pyplot`` registry).
The builder owns them: sinks render or save them during ``write`` and must not keep a
reference; the builder drops the event afterwards, which frees them (nothing to close).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moescope.alerts import Alert, AlertUpdate
    from moescope.stats.snapshot import Snapshot

__all__ = ["MODES", "LogEvent"]

#: Window kinds an event can come from (``"serve"``: a serving engine's window, e.g. the
#: vLLM plugin's JSONL log; sinks write it like a train window).
MODES: tuple[str, ...] = ("train", "eval", "serve")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class LogEvent:
    """One log step for every sink.

    Attributes:
        step: the training step the window ended at.
        mode: ``"train"``, ``"eval"`` or ``"serve"``; eval events carry metrics
            (``moe/eval/...``) and their snapshot, and no alerts; serve events (windows of
            a serving engine) are written like train ones by the JSONL sink.
        snapshot: the window's :class:`~moescope.stats.snapshot.Snapshot` (per-layer
            vectors: ``usage_counts`` [E], ``coactivation`` [E, E] ...), or None for an
            event that carries only some parts (e.g. :class:`ExtrasOnlySink`'s view).
        metrics: flat ``{key: float}`` (``moe/avg_expert_cv``, ``moe/<layer>/cv``, ...).
        alerts: every alert that fired in this window (repeats included).
        alert_update: how the firing alerts changed since the last window (new, still
            firing, resolved), from :class:`~moescope.alerts.AlertTracker`; None when
            the builder does not track alerts (a console sink then tracks its own).
        figures: ``{key: matplotlib Figure}``, e.g. ``moe/usage_heatmap`` (layers x
            experts) and ``moe/<layer>/usage_heatmap`` (experts x steps); empty on most
            steps. Sinks must not keep them after ``write`` returns.
    """

    step: int
    snapshot: Snapshot | None = None
    metrics: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    alerts: tuple[Alert, ...] = ()
    alert_update: AlertUpdate | None = None
    figures: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    mode: str = "train"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LogEvent.mode must be one of {MODES}, got {self.mode!r}.")
        if isinstance(self.step, bool) or not isinstance(self.step, int):
            raise TypeError(f"LogEvent.step must be an int, got {self.step!r}.")
        # Frozen copies: a sink cannot change what the next sink sees.
        object.__setattr__(self, "alerts", tuple(self.alerts))
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "figures", MappingProxyType(dict(self.figures)))

    def without(self, *parts: str) -> LogEvent:
        """A copy with some parts emptied: ``"snapshot"``, ``"metrics"``, ``"alerts"``,
        ``"figures"`` (``"alerts"`` also drops ``alert_update``)."""
        empty: dict[str, Any] = {}
        for p in parts:
            if p == "snapshot":
                empty["snapshot"] = None
            elif p == "metrics":
                empty["metrics"] = {}
            elif p == "alerts":
                empty["alerts"] = ()
                empty["alert_update"] = None
            elif p == "figures":
                empty["figures"] = {}
            else:
                raise ValueError(
                    f"unknown event part {p!r}; use snapshot, metrics, alerts or figures."
                )
        return replace(self, **empty)
