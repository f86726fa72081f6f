"""Strict JSON for moescope's outputs: one helper, used by every writer.

``json.dumps`` writes ``NaN`` / ``Infinity`` by default, which is not JSON (browsers,
``jq`` and most parsers reject it). moescope's metrics are NaN by design when a window saw
no token, so every file it writes goes through :func:`json_safe` first and then
``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """A strict-JSON-able copy of ``obj``.

    Non-finite floats (NaN, +-inf) become ``None``; numpy scalars become Python numbers
    and numpy arrays (any shape) nested lists; mappings become ``dict`` with ``str``
    keys; lists and tuples become lists. Anything else is returned unchanged (so a value
    ``json.dumps`` cannot encode still fails there, loudly).
    """
    if isinstance(obj, float):  # also np.float64, a float subclass
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
