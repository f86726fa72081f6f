"""The one error type of ``moescope analyze`` (and ``compare``) that a user can fix."""

from __future__ import annotations


class AnalyzeError(ValueError):
    """Bad input to ``moescope analyze``; the message says what is wrong and what to do."""
