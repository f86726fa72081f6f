"""Token id -> display text, for tables and the coloured passage of a report.

:func:`make_decoder` wraps a transformers tokenizer; :func:`decode_bytes` serves
byte-level models (ids 0-255, moescope's demo). Showing a decoded token in a table is the
report's job (:func:`moescope.report.fmt.visible`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Decoder", "decode_bytes", "make_decoder"]

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
