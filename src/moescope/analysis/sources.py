"""``--data`` inputs of ``moescope analyze``: text, JSONL, chat JSONL, parquet, datasets
folders and stdin, streamed as token ids with bounded memory.

:func:`open_data` checks the input up front (so a bad file fails before a model is loaded)
and returns a :class:`DataSource` whose :meth:`DataSource.token_chunks` yields 1-D int64
tensors of token ids.

Detection, in this order:

1. ``-``: standard input, read as text (kind ``"stdin"``).
2. A directory with ``state.json`` (a ``datasets`` ``save_to_disk`` folder): kind
   ``"datasets"``. A ``DatasetDict`` folder (``dataset_dict.json``) is refused with the
   list of its splits (pass one split's folder). Read with ``datasets.load_from_disk``
   when ``datasets`` is installed, else straight from its Arrow files with ``pyarrow``.
3. A file starting with the parquet magic ``PAR1`` or named ``*.parquet``: kind
   ``"parquet"``, read one record batch at a time with ``pyarrow``.
4. ``*.jsonl`` / ``*.ndjson`` (and a ``*.json`` whose first line is one JSON object): one
   JSON object per line. The text is the ``text_field`` (default ``"text"``) of each
   record; a record without it but with ``"messages"`` makes the file a chat file (kind
   ``"chat"``). Blank lines are skipped.
5. Anything else: plain text (kind ``"text"``).

Text-like inputs (text, JSONL, stdin) are sniffed: NUL bytes or invalid UTF-8 in the first
64 KiB mean a binary file, refused with one line. Later undecodable bytes are replaced
(U+FFFD) when a tokenizer reads the text; the bytes "tokenizer" sees the raw bytes.

Tokens: with ``tokenizer=None`` the ids are UTF-8 bytes (0-255; a text file's bytes
exactly). With a tokenizer, text is encoded without special tokens, ``chunk_bytes``
characters at a time cut after a newline (else a space) so that few tokens straddle a cut.
Records (JSONL, parquet, datasets) are joined with ``"\\n"``; chat records are rendered with
``tokenizer.apply_chat_template(messages, tokenize=False)`` and joined as rendered (the
template's own markers separate them), then encoded without adding special tokens (the
rendered markers are the tokenizer's special tokens and encode as such).

Memory: one read chunk plus the records of one parquet / Arrow batch, whatever the size.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from moescope.analysis.errors import AnalyzeError

__all__ = ["DATA_KINDS", "DataSource", "open_data", "sniff_binary"]

DATA_KINDS = ("text", "jsonl", "chat", "parquet", "datasets", "stdin")
SNIFF_BYTES = 64 * 1024
_ROWS_PER_BATCH = 1024
_MAX_CARRY = 16  # text held back waiting for whitespace, in read chunks
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_WHAT = "pass a text, JSONL, parquet file or a datasets folder"


class _ByteReader(Protocol):
    """What :func:`_stream_chunks` reads from: a file opened ``"rb"`` or :class:`_Prefixed`."""

    def read(self, n: int = -1, /) -> bytes: ...


# --------------------------------------------------------------------------- sniffing


def sniff_binary(head: bytes, *, at_eof: bool) -> str | None:
    """Why ``head`` (the first bytes of an input) is not UTF-8 text, or None when it is.

    ``at_eof``: ``head`` is the whole input (a multi-byte character cut at its end is then
    an error; otherwise it is the sniff window's edge and allowed).
    """
    if head.startswith(b"\x1f\x8b"):
        return "is gzip-compressed; decompress it first"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
    nul = head.find(b"\0")
    if nul >= 0:
        return f"looks binary (a NUL byte at offset {nul})"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=at_eof)
    except UnicodeDecodeError as err:
        return f"looks binary (invalid UTF-8 at byte {err.start})"
    return None


def _read_head(fh: IO[bytes], n: int = SNIFF_BYTES) -> bytes:
    """Up to ``n`` bytes (a pipe may return fewer per read)."""
    parts, got = [], 0
    while got < n:
        block = fh.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


# --------------------------------------------------------------------------- source


@dataclass
class DataSource:
    """One ``--data`` input.

    Attributes:
        label: the domain label (file stem, folder name, or ``"stdin"``).
        path: the path as given (``"-"`` for stdin).
        kind: one of :data:`DATA_KINDS`.
        text_field: the JSONL key / parquet or datasets column holding the text.
        tokenizer: a transformers tokenizer, or None for bytes.
        chat: records are chat ``messages`` rendered with the chat template (always True
            for kind ``"chat"``; also for parquet / datasets inputs with a ``messages``
            column and no ``text_field`` column).
        size_bytes: the input's size on disk (None for stdin), e.g. for a progress bar.
    """

    label: str
    path: str
    kind: str
    text_field: str = "text"
    tokenizer: Any | None = field(default=None, repr=False)
    chat: bool = False
    size_bytes: int | None = None
    _stdin_head: bytes | None = field(default=None, repr=False)
    _stdin: IO[bytes] | None = field(default=None, repr=False)
    _consumed: bool = field(default=False, repr=False)

    def token_chunks(self, chunk_bytes: int = 1 << 20) -> Iterator[torch.Tensor]:
        """Yield [n] int64 token ids of the whole input, about ``chunk_bytes`` of text at
        a time (bounded memory). Standard input can be streamed once only."""
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if self.kind == "stdin":
            if self._consumed:
                raise AnalyzeError(
                    "standard input (--data -) can be read only once; save it to a file"
                )
            self._consumed = True
            stream = _Prefixed(self._stdin_head or b"", self._stdin or sys.stdin.buffer)
            yield from _stream_chunks(stream, self.tokenizer, chunk_bytes)
            return
        if self.kind == "text":
            with open(self.path, "rb") as fh:
                yield from _stream_chunks(fh, self.tokenizer, chunk_bytes)
            return
        yield from _record_chunks(self._texts(), self.tokenizer, chunk_bytes, self.chat)

    def _texts(self) -> Iterator[Any]:
        """Each record's text (or its chat messages when ``chat``)."""
        key = "messages" if self.chat else self.text_field
        if self.kind in ("jsonl", "chat"):
            for lineno, record in _jsonl_records(Path(self.path)):
                value = record.get(key)
                if key not in record:
                    raise AnalyzeError(_missing_field(self.path, lineno, key, record, self.chat))
                yield _check_value(value, self.path, f"line {lineno}", key, self.chat)
        elif self.kind in ("parquet", "datasets"):
            batches = (_parquet_batches if self.kind == "parquet" else _dataset_batches)(
                Path(self.path), key
            )
            row = 0
            for batch in batches:
                for value in batch:
                    row += 1
                    if value is not None:  # a null cell is no text
                        yield _check_value(value, self.path, f"row {row}", key, self.chat)
        else:  # pragma: no cover - kinds are fixed by open_data
            raise AssertionError(self.kind)


class _Prefixed(io.RawIOBase):
    """A byte stream that replays the sniffed head of stdin, then the rest of it."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head.nbytes:
            take = self._head.nbytes if n < 0 else min(n, self._head.nbytes)
            out = bytes(self._head[:take])
            self._head = self._head[take:]
            return out
        return self._rest.read(n)


# --------------------------------------------------------------------------- encoding


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)


def _bytes_ids(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def _stream_chunks(
    fh: _ByteReader, tokenizer: Any | None, chunk_bytes: int
) -> Iterator[torch.Tensor]:
    """Token ids of a byte stream: raw bytes, or UTF-8 text cut after newlines / spaces."""
    if tokenizer is None:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                return
            yield _bytes_ids(block)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    while True:
        block = fh.read(chunk_bytes)
        text = carry + decoder.decode(block or b"", final=not block)
        if not block:
            if text:
                ids = _encode(tokenizer, text)
                if ids.numel():
                    yield ids
            return
        cut = text.rfind("\n")
        if cut < 0:
            cut = text.rfind(" ")
        if cut < 0:
            if len(text) < _MAX_CARRY * chunk_bytes:
                carry = text  # no place to cut yet: read on (bounded by _MAX_CARRY)
                continue
            cut = len(text) - 1  # a very long run without whitespace: cut anyway
        carry = text[cut + 1 :]
        if cut >= 0:
            ids = _encode(tokenizer, text[: cut + 1])
            if ids.numel():
                yield ids


def _render_chat(tokenizer: Any, messages: Any) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # jinja raises its own types for bad roles / structure
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AnalyzeError(
            f"the chat template could not render a record ({msg}); check its 'messages'"
        ) from None
    return str(text)


def _record_chunks(
    records: Iterable[Any], tokenizer: Any | None, chunk_bytes: int, chat: bool
) -> Iterator[torch.Tensor]:
    """Token ids of records joined with "\\n" (chat: rendered, joined as rendered), encoded
    about ``chunk_bytes`` characters at a time; records are never split."""
    parts: list[str] = []
    size = 0

    def flush() -> torch.Tensor:
        text = "".join(parts)
        parts.clear()
        if tokenizer is None:
            return _bytes_ids(text.encode("utf-8"))
        return _encode(tokenizer, text)

    for value in records:
        text = _render_chat(tokenizer, value) if chat else value + "\n"
        parts.append(text)
        size += len(text)
        if size >= chunk_bytes:
            size = 0
            ids = flush()
            if ids.numel():
                yield ids
    if parts:
        ids = flush()
        if ids.numel():
            yield ids


# --------------------------------------------------------------------------- JSONL


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                reason = err.msg if isinstance(err, json.JSONDecodeError) else "invalid UTF-8"
                raise AnalyzeError(
                    f"--data {path}: line {lineno} is not valid JSON ({reason}); a JSONL file "
                    "holds one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise AnalyzeError(
                    f"--data {path}: line {lineno} is a JSON {type(record).__name__}, not an "
                    'object; a JSONL file holds one JSON object per line, e.g. {"text": "..."}'
                )
            yield lineno, record


def _missing_field(path: str, lineno: int, key: str, record: dict[str, Any], chat: bool) -> str:
    present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    if chat:
        return (
            f"--data {path}: line {lineno} has no 'messages' (fields: {present}) although "
            "earlier lines are chat records; give every line a 'messages' list"
        )
    return (
        f"--data {path}: line {lineno} has no field {key!r} (fields: {present}); pass "
        "--text-field NAME to choose the field holding the text"
    )


def _check_value(value: Any, path: str, where: str, key: str, chat: bool) -> Any:
    if chat:
        if not isinstance(value, list):
            raise AnalyzeError(
                f"--data {path}: {where}: 'messages' is a {type(value).__name__}, not a list of "
                '{"role": ..., "content": ...} objects'
            )
        return value
    if not isinstance(value, str):
        raise AnalyzeError(
            f"--data {path}: {where}: field {key!r} is a {type(value).__name__}, not a string; "
            "pass --text-field NAME for the field holding the text"
        )
    return value


def _first_record(path: Path) -> tuple[int, dict[str, Any]] | None:
    for item in _jsonl_records(path):
        return item
    return None


# --------------------------------------------------------------------------- parquet / datasets


def _pyarrow(what: str) -> Any:
    try:
        import pyarrow
    except ImportError:
        raise AnalyzeError(
            f"reading {what} needs pyarrow, which is not installed; pip install pyarrow"
        ) from None
    return pyarrow


def _open_parquet(path: Path) -> Any:
    _pyarrow("a parquet file")
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path))
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a bad file
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AnalyzeError(
            f"--data {path} is not a readable parquet file ({msg}); {_WHAT}"
        ) from None


def _parquet_batches(path: Path, column: str) -> Iterator[list[Any]]:
    pf = _open_parquet(path)
    for batch in pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[column]):
        yield batch.column(0).to_pylist()


def _dataset_state(path: Path) -> list[Path]:
    """Arrow files of a ``save_to_disk`` folder, from its ``state.json``."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AnalyzeError(
            f"--data {path}: unreadable datasets state.json ({err}); re-save it with "
            "Dataset.save_to_disk"
        ) from None
    for f in files:
        if f.parent != path or not f.is_file():
            raise AnalyzeError(
                f"--data {path}: state.json names {f.name}, which is missing; re-save the dataset"
            )
    return files


def _datasets_lib() -> Any | None:
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _dataset_columns(path: Path) -> list[str]:
    lib = _datasets_lib()
    if lib is not None:
        return list(_load_dataset(lib, path).column_names)
    pa = _pyarrow("a datasets folder (or pip install datasets)")
    files = _dataset_state(path)
    with pa.memory_map(str(files[0]), "r") as src:
        return list(pa.ipc.open_stream(src).schema.names)


def _load_dataset(lib: Any, path: Path) -> Any:
    try:
        return lib.load_from_disk(str(path))
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AnalyzeError(
            f"--data {path}: datasets could not load the folder ({msg}); re-save it"
        ) from None


def _dataset_batches(path: Path, column: str) -> Iterator[list[Any]]:
    lib = _datasets_lib()
    if lib is not None:
        ds = _load_dataset(lib, path).select_columns([column])
        for batch in ds.iter(batch_size=_ROWS_PER_BATCH):
            yield batch[column]
        return
    # Without the datasets library: save_to_disk writes Arrow IPC streams listed in
    # state.json (indices are flattened on save), read here one record batch at a time.
    pa = _pyarrow("a datasets folder (or pip install datasets)")
    for f in _dataset_state(path):
        with pa.memory_map(str(f), "r") as src:
            reader = pa.ipc.open_stream(src)
            idx = reader.schema.get_field_index(column)
            for batch in reader:
                yield batch.column(idx).to_pylist()


def _pick_column(
    path: Path, names: list[str], text_field: str, types: dict[str, Any] | None
) -> tuple[str, bool]:
    """(column, chat) for a tabular input."""
    if text_field in names:
        col, chat = text_field, text_field == "messages"
    elif "messages" in names and text_field == "text":
        col, chat = "messages", True
    else:
        raise AnalyzeError(
            f"--data {path} has no column {text_field!r} (columns: {', '.join(names[:10])}); "
            "pass --text-field NAME to choose the column holding the text"
        )
    if types is not None and not chat:
        import pyarrow as pa

        t = types[col]
        if not (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or getattr(pa.types, "is_string_view", lambda _t: False)(t)
        ):
            raise AnalyzeError(
                f"--data {path}: column {col!r} holds {t}, not text; pass --text-field NAME "
                "for the column holding the text"
            )
    return col, chat


# --------------------------------------------------------------------------- open_data


def _need_chat_template(spec: str, tokenizer: Any | None, pending: bool = False) -> None:
    if pending:
        return
    if tokenizer is None:
        raise AnalyzeError(
            f"--data {spec} holds chat records ('messages'), which are rendered with the model "
            "tokenizer's chat template, but this model has no tokenizer (bytes are used); pass "
            "text records (--text-field) or a model directory that has a tokenizer"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise AnalyzeError(
            f"--data {spec} holds chat records ('messages') but the model's tokenizer has no "
            "chat template to render them; pass text records (--text-field) or a model whose "
            "tokenizer has a chat template"
        )


def open_data(
    spec: str | os.PathLike[str],
    *,
    text_field: str = "text",
    tokenizer: Any | None = None,
    label: str | None = None,
    stdin: IO[bytes] | None = None,
    tokenizer_pending: bool = False,
) -> DataSource:
    """Check one ``--data`` input and return its :class:`DataSource` (module docstring).

    Args:
        spec: a path, or ``"-"`` for standard input.
        text_field: JSONL key / column holding the text (``--text-field``).
        tokenizer: the model's tokenizer, or None for bytes (ids 0-255).
        label: domain label (default: file stem, folder name, or ``"stdin"``).
        stdin: the byte stream ``"-"`` reads (default ``sys.stdin.buffer``).
        tokenizer_pending: a pre-flight check before the model (and so its tokenizer) is
            loaded: skip the checks that need the tokenizer (a chat file's template) and
            open the input again with the tokenizer to stream it.

    Raises:
        AnalyzeError: missing / empty / binary input, bad JSONL, missing field or column,
            chat records without a tokenizer that has a chat template, missing pyarrow.
    """
    if not isinstance(text_field, str) or not text_field:
        raise AnalyzeError("--text-field must be a non-empty field name")
    spec_s = os.fspath(spec)
    if spec_s == "-":
        if stdin is None and sys.stdin is None:
            raise AnalyzeError(
                "--data - reads standard input, but this process has none; pass a file"
            )
        stream = stdin if stdin is not None else sys.stdin.buffer
        head = _read_head(stream)
        if not head:
            raise AnalyzeError("--data - (standard input) is empty; pipe some text into it")
        why = sniff_binary(head, at_eof=len(head) < SNIFF_BYTES)
        if why:
            raise AnalyzeError(f"--data - (standard input) {why}; pipe UTF-8 text into it")
        return DataSource(
            label=label or "stdin",
            path="-",
            kind="stdin",
            text_field=text_field,
            tokenizer=tokenizer,
            _stdin_head=head,
            _stdin=stream,
        )
    path = Path(spec_s)
    if not path.exists():
        raise AnalyzeError(f"--data {path}: no such file; {_WHAT} (or - for standard input)")
    if path.is_dir():
        return _open_dataset_dir(path, text_field, tokenizer, label, tokenizer_pending)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = _read_head(fh)
    except OSError as err:
        raise AnalyzeError(
            f"--data {path}: cannot read it ({err.strerror}); check permissions"
        ) from None
    if not head:
        raise AnalyzeError(f"--data {path} is empty; pass a file with some text")
    label = label or path.stem
    suffix = path.suffix.lower()
    if head.startswith(b"PAR1") or suffix == ".parquet":
        if not head.startswith(b"PAR1"):
            raise AnalyzeError(
                f"--data {path} is named .parquet but is not a parquet file (no PAR1 magic); {_WHAT}"
            )
        pf = _open_parquet(path)
        schema = pf.schema_arrow
        col, chat = _pick_column(
            path, list(schema.names), text_field, {n: schema.field(n).type for n in schema.names}
        )
        if chat:
            _need_chat_template(spec_s, tokenizer, tokenizer_pending)
        return DataSource(
            label=label,
            path=str(path),
            kind="parquet",
            text_field=col,
            tokenizer=tokenizer,
            chat=chat,
            size_bytes=size,
        )
    why = sniff_binary(head, at_eof=len(head) < SNIFF_BYTES)
    if why:
        raise AnalyzeError(f"--data {path} {why}; {_WHAT}")
    if suffix in _JSONL_SUFFIXES or (suffix == ".json" and _looks_jsonl(head)):
        return _open_jsonl(path, text_field, tokenizer, label, size, tokenizer_pending)
    if suffix == ".json":
        raise AnalyzeError(
            f"--data {path} is a JSON document, not JSONL; convert it to one JSON object per "
            "line (e.g. jq -c '.[]' FILE > FILE.jsonl)"
        )
    return DataSource(
        label=label,
        path=str(path),
        kind="text",
        text_field=text_field,
        tokenizer=tokenizer,
        size_bytes=size,
    )


def _looks_jsonl(head: bytes) -> bool:
    first = head.lstrip().split(b"\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _open_jsonl(
    path: Path, text_field: str, tokenizer: Any | None, label: str, size: int, pending: bool
) -> DataSource:
    first = _first_record(path)
    if first is None:
        raise AnalyzeError(
            f"--data {path} has no JSON record (only blank lines); pass a file with some text"
        )
    lineno, record = first
    chat = text_field == "messages" or (
        text_field not in record and "messages" in record and text_field == "text"
    )
    if not chat and text_field not in record:
        raise AnalyzeError(_missing_field(str(path), lineno, text_field, record, False))
    if chat:
        _check_value(record["messages"], str(path), f"line {lineno}", "messages", True)
        _need_chat_template(str(path), tokenizer, pending)
    return DataSource(
        label=label,
        path=str(path),
        kind="chat" if chat else "jsonl",
        text_field="messages" if chat else text_field,
        tokenizer=tokenizer,
        chat=chat,
        size_bytes=size,
    )


def _open_dataset_dir(
    path: Path, text_field: str, tokenizer: Any | None, label: str | None, pending: bool
) -> DataSource:
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        example = f"{path / splits[0]}" if splits else f"{path}/SPLIT"
        raise AnalyzeError(
            f"--data {path} is a DatasetDict with splits {list(splits)}; pass one split's "
            f"folder, e.g. --data {example}"
        )
    if not (path / "state.json").is_file():
        raise AnalyzeError(
            f"--data {path} is a directory but not a datasets folder (no state.json); pass a "
            "text, JSONL or parquet file, or a folder written by Dataset.save_to_disk"
        )
    names = _dataset_columns(path)
    col, chat = _pick_column(path, names, text_field, None)
    if chat:
        _need_chat_template(str(path), tokenizer, pending)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return DataSource(
        label=label or path.name,
        path=str(path),
        kind="datasets",
        text_field=col,
        tokenizer=tokenizer,
        chat=chat,
        size_bytes=size,
    )
