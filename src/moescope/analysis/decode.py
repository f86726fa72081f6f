"""Token id -> display text, for tables and the coloured passage of a report.

:func:`make_decoder` wraps a transformers tokenizer; :func:`decode_bytes` serves
byte-level models (ids 0-255, moescope's demo). :func:`visible` makes whitespace and
control characters of a decoded token visible, once (``\\xfc`` is shown as the four
characters ``\xfc``, never escaped twice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Decoder", "decode_bytes", "make_decoder", "visible"]

Decoder = Callable[[int], str]


def make_decoder(tokenizer: Any | None) -> Decoder | None:
    """Token id -> display string through a transformers tokenizer (None -> None).

    Uses ``tokenizer.decode([id])``; SentencePiece / byte-level BPE word-start markers
    (``▁``, ``Ġ``), which ``decode`` of a lone token may strip, are turned back into a
    leading space so that a passage reads as text. Results are cached per id.
    """
    if tokenizer is None:
        return None
    cache: dict[int, str] = {}
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)

    def decode(token_id: int) -> str:
        s = cache.get(token_id)
        if s is None:
            s = tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            piece = convert(token_id) if convert is not None else None
            if isinstance(piece, str) and piece[:1] in ("▁", "Ġ") and not s.startswith(" "):
                s = " " + s
            cache[token_id] = s
        return s

    return decode


def decode_bytes(token_id: int) -> str:
    """Token id -> string for byte-level models (vocab = 256 raw bytes, moescope's demo):
    printable ASCII and whitespace as themselves, other bytes as ``\\xNN``."""
    if 0 <= token_id < 128:
        c = chr(token_id)
        if c.isprintable() or c in "\n\t ":
            return c
    return f"\\x{token_id:02x}" if 0 <= token_id < 256 else f"<{token_id}>"


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
