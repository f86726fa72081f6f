"""Small text helpers shared by console lines, alerts and reports."""

from __future__ import annotations

__all__ = ["plural"]


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 window"``, ``"3 windows"``, ``"1,200 tokens"`` (``many``: an irregular plural)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
