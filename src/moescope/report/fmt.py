"""The one number format of moescope's reports.

- integers (and floats holding an integer, like a count stored as ``533632.0``): digits
  with thousands separators, ``533,632``;
- other floats: ``digits`` significant digits in positional notation, never an
  exponent: ``0.0213``, ``1.132`` and ``1,132,000`` (a float >= 10**digits is rounded to
  an integer);
- None, NaN and infinities: ``-``; booleans: ``yes`` / ``no``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["fmt_number", "fmt_percent"]


def fmt_number(x: Any, digits: int = 4) -> str:
    """Format one number for a table cell (see the module docstring)."""
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "-"
    if v.is_integer() and abs(v) < 1e18:
        return f"{int(v):,}"
    mag = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - mag)
    if decimals == 0:
        # Round to ``digits`` significant digits, then show every digit position.
        q = 10 ** (mag - digits + 1)
        return f"{round(v / q) * q:,.0f}"
    text = f"{v:,.{min(decimals, 15)}f}"
    return text


def fmt_percent(x: Any, digits: int = 1) -> str:
    """A fraction as a percentage with ``digits`` decimals (``0.1234`` -> ``12.3 %``)."""
    if x is None:
        return "-"
    v = float(x)
    if not math.isfinite(v):
        return "-"
    return f"{100 * v:.{digits}f} %"


_SHOWN = {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "\u2423"}


def visible(token: str) -> str:
    """``token`` with whitespace and control characters made visible for a table cell:
    space as ``\u2423``, newline as the two characters ``\\n``, other control characters
    as ``\\xNN``. Text that is already an escape (``decode_bytes``' ``\\xfc``) is left
    as is, so it is never escaped twice. HTML escaping is the renderer's job."""
    out = []
    for ch in token:
        if ch in _SHOWN:
            out.append(_SHOWN[ch])
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) or "\u2205"
