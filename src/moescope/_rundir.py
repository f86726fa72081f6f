"""Where a run folder keeps what the commands read (shared by ``compare``, ``watch`` and
``plan-ep``; no torch import, so ``plan-ep`` and ``watch`` stay light).

A training run writes ``<log_dir>/moe_detailed.jsonl`` (``save_detailed_logs=True``; the
integrations default ``log_dir`` to ``<output_dir>/moe_logs``); ``moescope analyze``
writes ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_NAME = "moe_detailed.jsonl"
SUMMARY_NAME = "summary.json"


class RunDirError(ValueError):
    """A folder that holds nothing a moescope command reads (one-line message)."""


def find_log(path: str | os.PathLike[str]) -> Path | None:
    """The training JSONL log of a run folder, or None when it has none (yet).

    Searched in order: ``moe_detailed.jsonl``, ``moe_logs/moe_detailed.jsonl``, the newest
    ``moe_detailed.jsonl`` up to three levels down (e.g. ``<output_dir>/moe_logs``), then
    the folder's only ``*.jsonl`` (or ``moe_logs/*.jsonl``) file.
    """
    p = Path(path)
    for cand in (p / LOG_NAME, p / "moe_logs" / LOG_NAME):
        if cand.is_file():
            return cand
    deep = [
        q
        for pat in ("*/" + LOG_NAME, "*/*/" + LOG_NAME, "*/*/*/" + LOG_NAME)
        for q in p.glob(pat)
        if q.is_file()
    ]
    if deep:
        return max(deep, key=lambda q: q.stat().st_mtime)
    found = sorted(p.glob("*.jsonl")) or sorted(p.glob("moe_logs/*.jsonl"))
    return found[0] if len(found) == 1 else None


def resolve_run_input(path: str | os.PathLike[str]) -> Path:
    """The file to read for ``path``: a file is itself; a folder gives its ``summary.json``
    (an analyze output) or else its training log (:func:`find_log`).

    Raises:
        RunDirError: a folder with neither.
    """
    p = Path(path)
    if not p.is_dir():
        return p
    if (p / SUMMARY_NAME).is_file():
        return p / SUMMARY_NAME
    log = find_log(p)
    if log is None:
        raise RunDirError(
            f"{p} holds neither summary.json (a moescope analyze output) nor a JSONL log "
            f"({LOG_NAME}, also looked for in moe_logs/ and up to three levels down); pass "
            "one of those files or the folder holding it"
        )
    return log
