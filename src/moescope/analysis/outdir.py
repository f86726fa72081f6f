"""The ``--out`` directory of ``moescope analyze``: refuse to clobber, never follow symlinks.

Rules (:func:`prepare_out_dir`):

- a missing directory is created (with its parents);
- an empty directory is used as is;
- a directory holding moescope's marker file :data:`MARKER` (``.moescope-output``, JSON
  ``{"tool": "moescope", "version", "created", "files"}``) is a previous moescope output:
  it is reused, and the files that earlier run recorded in ``files`` are removed first so
  that no stale figure survives next to a new ``summary.json``;
- any other non-empty directory is refused unless ``overwrite=True`` (then nothing of it is
  deleted; files of the same name are replaced).

Writes (:func:`write_bytes`, :func:`write_text`, :func:`save_figure`) go to a temporary file
created with ``O_EXCL | O_NOFOLLOW`` next to the target and are then renamed over it with
``os.replace``. A rename replaces the directory *entry*: when the target is a symlink the
link itself is replaced and the file it pointed to is never opened, so a planted
``report.html -> ~/.bashrc`` cannot redirect the write. Readers never see a half-written
file. Names are single path components (no ``/``, no ``..``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moescope import __version__
from moescope.analysis.errors import AnalyzeError

__all__ = [
    "MARKER",
    "is_moescope_output",
    "prepare_out_dir",
    "save_figure",
    "write_bytes",
    "write_text",
]

MARKER = ".moescope-output"
"""Marker file name written into every output directory moescope prepares."""

# rename/open relative to a directory descriptor: the directory is resolved once, and a
# component swapped for a symlink between two writes cannot move where they land.
_DIR_FD = os.open in os.supports_dir_fd and os.replace in os.supports_dir_fd
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise AnalyzeError(
            f"bad output file name {name!r}; use a plain file name like 'report.html'"
        )
    if "/" in name or "\\" in name or "\0" in name or name != os.path.basename(name):
        raise AnalyzeError(
            f"bad output file name {name!r}: it must be one path component (no '/' or '..')"
        )
    return name


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The marker's JSON when ``out_dir`` holds a regular-file marker written by moescope."""
    path = out_dir / MARKER
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
        return None  # a symlink or a huge file is not ours
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "moescope":
        return None
    return data


def is_moescope_output(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding moescope's marker file (a previous output)."""
    p = Path(path)
    return p.is_dir() and _read_marker(p) is not None


def _marker_payload(files: list[str], created: str | None = None) -> bytes:
    data = {
        "tool": "moescope",
        "version": __version__,
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": sorted(set(files)),
    }
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def prepare_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Create or validate the output directory and write the marker; returns its path.

    Raises:
        AnalyzeError: ``path`` is a file; it cannot be created; it is a non-empty directory
            that is not a previous moescope output and ``overwrite`` is False.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AnalyzeError(f"--out {out} exists and is not a directory; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        entries = [e.name for e in os.scandir(out)]
    except OSError as err:
        raise AnalyzeError(
            f"cannot create or list --out {out} ({err.strerror or err}); choose a writable directory"
        ) from None
    previous = _read_marker(out) if entries else None
    if entries and previous is None and not overwrite:
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise AnalyzeError(
            f"--out {out} is not empty ({shown}) and is not a moescope output (no {MARKER} "
            "file); choose a new or empty directory, or pass --overwrite to write into it"
        )
    if previous is not None:
        _remove_recorded(out, previous.get("files"))
    _atomic_write(out, MARKER, _marker_payload([]))
    return out


def _remove_recorded(out: Path, files: Any) -> None:
    """Delete the files a previous run recorded (entries only: a symlink is unlinked, never
    followed; directories and names that are not plain components are left alone)."""
    if not isinstance(files, list):
        return
    for name in files:
        if not isinstance(name, str) or name == MARKER:
            continue
        try:
            _check_name(name)
        except AnalyzeError:
            continue
        target = out / name
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(target.lstat().st_mode):
                target.unlink()


@contextlib.contextmanager
def _dir_fd(out: Path) -> Iterator[int | None]:
    if not _DIR_FD:
        yield None
        return
    fd = os.open(out, os.O_RDONLY | _O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _atomic_write(out: Path, name: str, data: bytes) -> Path:
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | getattr(os, "O_BINARY", 0)
    with _dir_fd(out) as dfd:
        kw: dict[str, Any] = {"dir_fd": dfd} if dfd is not None else {}
        tmp_path = tmp if dfd is not None else str(out / tmp)
        dst_path = name if dfd is not None else str(out / name)
        fd = os.open(tmp_path, flags, 0o644, **kw)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            if dfd is not None:
                os.replace(tmp_path, dst_path, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                os.replace(tmp_path, dst_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path, **kw)
            raise
    return out / name


def _record(out: Path, name: str) -> None:
    marker = _read_marker(out)
    if marker is None:
        return  # not prepared by prepare_out_dir (or the marker was removed): nothing to track
    files = [f for f in marker.get("files") or [] if isinstance(f, str)]
    if name not in files:
        created = marker.get("created") if isinstance(marker.get("created"), str) else None
        _atomic_write(out, MARKER, _marker_payload([*files, name], created))


def write_bytes(out_dir: str | os.PathLike[str], name: str, data: bytes) -> Path:
    """Write ``data`` to ``out_dir/name`` atomically, replacing (never following) a symlink
    there; records the name in the marker. Returns the written path.

    Raises:
        AnalyzeError: a bad name, or the write failed (one line with the OS reason).
    """
    out = Path(out_dir)
    _check_name(name)
    if name == MARKER:
        raise AnalyzeError(f"{MARKER} is moescope's marker file; choose another name")
    try:
        path = _atomic_write(out, name, bytes(data))
        _record(out, name)
    except IsADirectoryError:
        raise AnalyzeError(
            f"cannot write {name} into --out {out}: a directory of that name is in the way; "
            "remove it or choose another --out"
        ) from None
    except OSError as err:
        raise AnalyzeError(
            f"cannot write {name} into --out {out} ({err.strerror or err}); choose a writable directory"
        ) from None
    return path


def write_text(
    out_dir: str | os.PathLike[str], name: str, text: str, *, encoding: str = "utf-8"
) -> Path:
    """:func:`write_bytes` of ``text`` encoded with ``encoding``."""
    return write_bytes(out_dir, name, text.encode(encoding))


def save_figure(
    out_dir: str | os.PathLike[str], name: str, fig: Any, **savefig_kwargs: Any
) -> Path:
    """Render a matplotlib figure to memory (format from ``name``'s suffix, default png)
    and write it with :func:`write_bytes`. ``savefig_kwargs`` go to ``fig.savefig``."""
    fmt = Path(name).suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    return write_bytes(out_dir, name, buf.getvalue())
