"""Optional dependencies: imported where used, with a message naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an error that says which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            f"{module!r} is needed for this feature but is not installed. "
            f"Install it with: pip install 'moescope[{extra}]'"
        ) from err
