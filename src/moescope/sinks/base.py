"""The :class:`Sink` protocol every logging destination implements.

A sink receives one :class:`~moescope.sinks.event.LogEvent` per log step through
:meth:`Sink.write` (rank 0 only; the integrations decide when) and logs the parts its
destination can show: the flat metrics, the snapshot (per-expert vectors for histograms
and tables), the alerts, the figures. This module imports no concrete sink;
:func:`moescope.sinks.resolve.resolve_loggers` turns a user's ``logger=`` into sinks.
"""

from __future__ import annotations

from moescope.sinks.event import LogEvent

__all__ = ["Sink"]


class Sink:
    """A logging destination.

    Subclasses override :meth:`write` (the base one does nothing) and, when they buffer
    or open something, :meth:`flush` / :meth:`close`; both must tolerate repeated calls.

    Attributes:
        wants_figures: True when the sink logs ``event.figures``; the session renders
            figures only at heatmap steps and only if some sink wants them.
    """

    wants_figures: bool = False

    def write(self, event: LogEvent) -> None:
        """Log one event (train or eval window; see :class:`LogEvent` for its parts)."""

    def flush(self) -> None:
        """Push buffered data to the destination."""

    def close(self) -> None:
        """Flush and release what the sink opened itself (never the user's objects)."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
