"""Token routing traces: the one format every routing source writes (issue 21).

A :class:`RoutingTrace` holds, for N token sequences, which experts each token was sent
to at every MoE layer (and, where the source knows them, the combine weights). Every
source produces one: a model replayed through :class:`~moescope.monitor.MoEMonitor`
(``moescope.analysis.trace_sources``), moescope's token recorder (``analyze``), a
training-side recorder attached to any integration's monitor, vLLM's returned routed
experts (``moescope.integrations.vllm``). ``moescope agree A B`` compares two of them.

Fields (L MoE layers, E experts, K slots, sequence n has S_n tokens):

- ``layers``: the MoE layers' names in model order. Two traces are aligned by MoE-layer
  *ordinal* 0..L-1 (HF ``model.layers.3.mlp`` and vLLM ``model.layers.3.mlp.experts`` are
  both ordinal i when they are the i-th MoE layer); names are kept for display.
- ``num_experts`` (E), ``top_k`` (K: the widest layer's K; narrower layers pad with -1).
- ``seq_ids``: N unique strings (a request id, or "0", "1", ...).
- ``token_ids[n]``: int64 [S_n], prompt + generated tokens in order.
- ``topk_ids[n]``: int32 [L, S_n, K], expert ids in the model's order of selection
  (sources that know the combine weights write slot 0 = the largest weight); -1 = slot
  absent (the layer did not route that token, or a narrower K). Ids >= E are
  identity/zero experts (kept, never indexed).
- ``topk_weights[n]``: float32 [L, S_n, K] or None when the source has no weights (vLLM's
  returned routed experts are ids only).
- ``source``: free metadata (``engine``: "transformers" / "moescope-nn" / "vllm" /
  "sglang"; ``model``, ``dtype``, ``version``, ...).

Files (:meth:`RoutingTrace.save` / :meth:`RoutingTrace.load`, chosen by suffix):

- ``.jsonl``: a header line ``{"format": "moescope-trace", "version": 1, "layers",
  "num_experts", "top_k", "source"}``, then one line per sequence ``{"seq_id",
  "token_ids": [S], "topk_ids": [L][S][K], "topk_weights": [L][S][K]}`` (weights left out
  when None). Lines with a ``"kind"`` other than ``"sequence"`` are other records of the
  same stream (e.g. the vLLM plugin's per-request summaries) and are skipped by
  :meth:`RoutingTrace.load`; a torn last line (a writer killed mid-line) is skipped with
  a warning. This is what :class:`TraceWriter` appends to.
- ``.npz``: one compressed file: ``header`` (the same JSON plus ``seq_ids``),
  ``token_ids`` [sum S], ``offsets`` [N + 1], ``topk_ids`` [L, sum S, K] int32,
  ``topk_weights`` [L, sum S, K] float32 (NaN for sequences without weights) and
  ``has_weights`` [N] bool. Read with ``allow_pickle=False``.

A file of a newer ``version`` is refused with one line saying to upgrade moescope.
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope._json import json_safe

__all__ = [
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "RoutingTrace",
    "TraceFormatError",
    "TraceSequence",
    "TraceWriter",
]

#: ``format`` field of every trace file's header.
TRACE_FORMAT = "moescope-trace"
#: Version of the layout this module writes (and the newest it reads).
TRACE_VERSION = 1

_SUFFIXES = (".jsonl", ".npz")


class TraceFormatError(ValueError):
    """A file or array that is not a valid moescope routing trace (the message says why
    and what to do)."""


@dataclass(frozen=True)
class TraceSequence:
    """One sequence of a :class:`RoutingTrace` (views of its arrays, not copies)."""

    seq_id: str
    token_ids: np.ndarray  # int64 [S]
    topk_ids: np.ndarray  # int32 [L, S, K]
    topk_weights: np.ndarray | None  # float32 [L, S, K]


@dataclass(eq=False)  # arrays have no truth value: compare traces field by field
class RoutingTrace:
    """Per-token top-k routing of N sequences through L MoE layers (module doc).

    Build one empty and :meth:`append` sequences, or :meth:`load` a file.
    """

    layers: list[str]
    num_experts: int
    top_k: int
    source: dict[str, Any] = field(default_factory=dict)
    seq_ids: list[str] = field(default_factory=list)
    token_ids: list[np.ndarray] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_weights: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = [str(x) for x in self.layers]
        if not self.layers:
            raise TraceFormatError("a routing trace needs at least one MoE layer name")
        if int(self.num_experts) < 1 or int(self.top_k) < 1:
            raise TraceFormatError(
                f"num_experts and top_k must be >= 1, got {self.num_experts} and {self.top_k}"
            )
        self.num_experts = int(self.num_experts)
        self.top_k = int(self.top_k)
        self.source = dict(self.source)
        n = len(self.seq_ids)
        if not (len(self.token_ids) == len(self.topk_ids) == len(self.topk_weights) == n):
            raise TraceFormatError(
                "seq_ids, token_ids, topk_ids and topk_weights must have one entry per "
                f"sequence; got {n}, {len(self.token_ids)}, {len(self.topk_ids)}, "
                f"{len(self.topk_weights)}"
            )
        seqs = list(
            zip(self.seq_ids, self.token_ids, self.topk_ids, self.topk_weights, strict=True)
        )
        self.seq_ids, self.token_ids, self.topk_ids, self.topk_weights = [], [], [], []
        self._index: dict[str, int] = {}
        for s, t, i, w in seqs:
            self.append(s, t, i, w)

    # ------------------------------------------------------------------ building

    @property
    def num_layers(self) -> int:
        """L."""
        return len(self.layers)

    def append(
        self,
        seq_id: str | int,
        token_ids: Sequence[int] | np.ndarray,
        topk_ids: Any,
        topk_weights: Any = None,
    ) -> None:
        """Add one sequence.

        Args:
            seq_id: unique id of the sequence (stored as ``str``).
            token_ids: [S] integer token ids.
            topk_ids: [L, S, K'] expert ids, K' <= K (padded with -1 to K); -1 = absent.
            topk_weights: [L, S, K'] combine weights, or None.

        Raises:
            TraceFormatError: a duplicate ``seq_id``, or a shape / dtype that does not fit.
        """
        sid = str(seq_id)
        if sid in self._index:
            raise TraceFormatError(f"seq_id {sid!r} is already in the trace; seq_ids are unique")
        tok = np.asarray(token_ids)
        if tok.ndim != 1 or not (tok.size == 0 or np.issubdtype(tok.dtype, np.integer)):
            raise TraceFormatError(
                f"sequence {sid!r}: token_ids must be a 1-D integer array, got shape "
                f"{tok.shape} dtype {tok.dtype}"
            )
        s = tok.shape[0]
        ids = np.asarray(topk_ids)
        shape_ok = ids.ndim == 3 and ids.shape[:2] == (self.num_layers, s)
        if not shape_ok or ids.shape[2] > self.top_k or ids.shape[2] < 1:
            raise TraceFormatError(
                f"sequence {sid!r}: topk_ids must be [layers={self.num_layers}, "
                f"tokens={s}, k<={self.top_k}], got {ids.shape}"
            )
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TraceFormatError(f"sequence {sid!r}: topk_ids must be integers, got {ids.dtype}")
        if ids.size and int(ids.min()) < -1:
            raise TraceFormatError(
                f"sequence {sid!r}: topk_ids has id {int(ids.min())}; ids are >= 0 (-1 = absent)"
            )
        k_in = ids.shape[2]
        ids32 = np.full((self.num_layers, s, self.top_k), -1, dtype=np.int32)
        ids32[:, :, :k_in] = ids
        w32: np.ndarray | None = None
        if topk_weights is not None:
            w = np.asarray(topk_weights, dtype=np.float32)
            if w.shape != ids.shape:
                raise TraceFormatError(
                    f"sequence {sid!r}: topk_weights must have the shape of topk_ids "
                    f"{ids.shape}, got {w.shape}"
                )
            w32 = np.zeros((self.num_layers, s, self.top_k), dtype=np.float32)
            w32[:, :, :k_in] = w
        self._index[sid] = len(self.seq_ids)
        self.seq_ids.append(sid)
        self.token_ids.append(tok.astype(np.int64, copy=False))
        self.topk_ids.append(ids32)
        self.topk_weights.append(w32)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.seq_ids)

    def __iter__(self) -> Iterator[TraceSequence]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, key: int | str) -> TraceSequence:
        """The sequence at position ``key`` (int) or with seq_id ``key`` (str)."""
        i = self.index(key) if isinstance(key, str) else int(key)
        return TraceSequence(
            self.seq_ids[i], self.token_ids[i], self.topk_ids[i], self.topk_weights[i]
        )

    def __contains__(self, seq_id: object) -> bool:
        return str(seq_id) in self._index

    def index(self, seq_id: str) -> int:
        """Position of ``seq_id``; KeyError naming a few known ids when absent."""
        try:
            return self._index[str(seq_id)]
        except KeyError:
            raise KeyError(
                f"seq_id {seq_id!r} is not in the trace (first ids: {self.seq_ids[:5]})"
            ) from None

    @property
    def num_tokens(self) -> int:
        """Tokens over all sequences (sum S_n)."""
        return int(sum(t.shape[0] for t in self.token_ids))

    @property
    def has_weights(self) -> bool:
        """True when every sequence carries weights (and there is at least one)."""
        return bool(self.topk_weights) and all(w is not None for w in self.topk_weights)

    def subset(self, seq_ids: Sequence[str | int]) -> RoutingTrace:
        """A trace of the given sequences, in that order (arrays shared, not copied)."""
        out = RoutingTrace(self.layers, self.num_experts, self.top_k, dict(self.source))
        for s in seq_ids:
            seq = self[str(s)]
            out.append(seq.seq_id, seq.token_ids, seq.topk_ids, seq.topk_weights)
        return out

    def renamed(self, seq_ids: Sequence[str | int] | Mapping[str, str | int]) -> RoutingTrace:
        """The same trace with other sequence ids: a list (one per sequence, in order) or
        a mapping ``{old: new}`` (ids not in it are kept), e.g. to give a training-side
        trace the request ids of the rollouts it trained on. Arrays are shared."""
        if isinstance(seq_ids, Mapping):
            new = [str(seq_ids.get(s, s)) for s in self.seq_ids]
        else:
            new = [str(s) for s in seq_ids]
            if len(new) != len(self):
                raise TraceFormatError(
                    f"renamed needs one id per sequence: {len(self)} sequences, {len(new)} ids"
                )
        out = RoutingTrace(self.layers, self.num_experts, self.top_k, dict(self.source))
        for sid, seq in zip(new, self, strict=True):
            out.append(sid, seq.token_ids, seq.topk_ids, seq.topk_weights)
        return out

    def header(self) -> dict[str, Any]:
        """The JSON header every file starts with (see the module doc)."""
        return {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "source": json_safe(self.source),
        }

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(sequences={len(self)}, tokens={self.num_tokens}, "
            f"layers={self.num_layers}, E={self.num_experts}, K={self.top_k}, "
            f"weights={self.has_weights}, source={self.source})"
        )

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path``: ``.jsonl`` or ``.npz`` by its suffix (module doc)."""
        p = Path(path)
        data = self.to_bytes(_suffix(p))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def to_bytes(self, suffix: str = ".npz") -> bytes:
        """The content of a ``.jsonl`` or ``.npz`` file (``suffix``) of this trace."""
        if suffix not in _SUFFIXES:
            raise TraceFormatError(f"a routing trace is .jsonl or .npz, not {suffix!r}")
        if suffix == ".jsonl":
            lines = [json.dumps(self.header(), allow_nan=False)]
            lines += [_sequence_line(seq) for seq in self]
            return ("\n".join(lines) + "\n").encode("utf-8")
        n = len(self)
        lengths = np.array([t.shape[0] for t in self.token_ids], dtype=np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        shape0 = (self.num_layers, 0, self.top_k)
        ids = np.concatenate(self.topk_ids, axis=1) if n else np.zeros(shape0, dtype=np.int32)
        weights = np.full(ids.shape, np.nan, dtype=np.float32)
        for i, w in enumerate(self.topk_weights):
            if w is not None:
                weights[:, offsets[i] : offsets[i + 1]] = w
        head = self.header()
        head["seq_ids"] = list(self.seq_ids)
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            allow_pickle=False,
            header=np.array(json.dumps(head, allow_nan=False)),
            token_ids=(np.concatenate(self.token_ids) if n else np.zeros(0, dtype=np.int64)),
            offsets=offsets,
            topk_ids=ids,
            topk_weights=weights,
            has_weights=np.array([w is not None for w in self.topk_weights], dtype=bool),
        )
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingTrace:
        """Read a ``.jsonl`` or ``.npz`` trace.

        Raises:
            FileNotFoundError: no such file.
            TraceFormatError: the file is not a moescope routing trace, or is of a newer
                version (one line saying what to do).
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no trace file at {p}")
        suffix = _suffix(p)
        if suffix == ".npz":
            return _load_npz(p)
        return _load_jsonl(p)


def _suffix(p: Path) -> str:
    s = p.suffix.lower()
    if s not in _SUFFIXES:
        raise TraceFormatError(
            f"{p}: a routing trace file ends in .jsonl or .npz, got {p.suffix or 'no suffix'!r}"
        )
    return s


def _sequence_line(seq: TraceSequence) -> str:
    line: dict[str, Any] = {
        "seq_id": seq.seq_id,
        "token_ids": seq.token_ids.tolist(),
        "topk_ids": seq.topk_ids.tolist(),
    }
    if seq.topk_weights is not None:
        # float32 -> Python float is exact; json's shortest repr reads back to it.
        line["topk_weights"] = json_safe(seq.topk_weights.tolist())
    return json.dumps(line, allow_nan=False)


def _check_header(head: Any, where: str) -> RoutingTrace:
    if not isinstance(head, Mapping) or head.get("format") != TRACE_FORMAT:
        raise TraceFormatError(
            f"{where} is not a moescope routing trace (no {TRACE_FORMAT!r} header); write "
            "one with RoutingTrace.save or TraceWriter"
        )
    version = head.get("version")
    if not isinstance(version, int) or version < 1:
        raise TraceFormatError(f"{where}: trace header has no valid version ({version!r})")
    if version > TRACE_VERSION:
        raise TraceFormatError(
            f"{where}: trace version {version} is newer than this moescope reads "
            f"({TRACE_VERSION}); upgrade moescope"
        )
    try:
        return RoutingTrace(
            layers=list(head["layers"]),
            num_experts=int(head["num_experts"]),
            top_k=int(head["top_k"]),
            source=dict(head.get("source") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TraceFormatError(f"{where}: malformed trace header ({e})") from None


def _load_jsonl(p: Path) -> RoutingTrace:
    with p.open("r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise TraceFormatError(f"{p} is empty, not a moescope routing trace")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        raise TraceFormatError(
            f"{p} is not a moescope routing trace (its first line is not JSON)"
        ) from None
    trace = _check_header(head, str(p))
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            if n == len(lines):  # a writer killed mid-line: every earlier line is whole
                warnings.warn(f"moescope trace: {p}: torn last line {n} skipped", stacklevel=3)
                break
            raise TraceFormatError(f"{p}:{n}: not a JSON line") from None
        if not isinstance(rec, dict) or rec.get("kind", "sequence") != "sequence":
            continue
        try:
            w = rec.get("topk_weights")
            trace.append(
                rec["seq_id"],
                np.asarray(rec["token_ids"], dtype=np.int64),
                np.asarray(rec["topk_ids"], dtype=np.int64).reshape(
                    trace.num_layers, len(rec["token_ids"]), -1
                ),
                None
                if w is None
                else np.asarray(w, dtype=np.float32).reshape(
                    trace.num_layers, len(rec["token_ids"]), -1
                ),
            )
        except KeyError as e:
            raise TraceFormatError(f"{p}:{n}: sequence line without {e}") from None
        except TraceFormatError as e:
            raise TraceFormatError(f"{p}:{n}: {e}") from None
        except (TypeError, ValueError) as e:
            raise TraceFormatError(f"{p}:{n}: malformed sequence line ({e})") from None
    return trace


def _load_npz(p: Path) -> RoutingTrace:
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TraceFormatError(f"{p} is not a readable .npz file ({e})") from None
    with z:
        needed = {"header", "token_ids", "offsets", "topk_ids", "topk_weights", "has_weights"}
        if "header" not in z.files:
            raise TraceFormatError(
                f"{p} is not a moescope routing trace (no 'header' array; a TokenRouting "
                "file? convert it with moescope.analysis.trace_sources.trace_from_token_routing)"
            )
        try:
            head = json.loads(str(z["header"]))
        except json.JSONDecodeError:
            raise TraceFormatError(f"{p}: its 'header' array is not JSON") from None
        trace = _check_header(head, str(p))
        missing = needed - set(z.files)
        if missing:
            raise TraceFormatError(f"{p}: trace file lacks arrays {sorted(missing)}")
        seq_ids = list(head.get("seq_ids", []))
        offsets = z["offsets"]
        tok, ids, w, has_w = z["token_ids"], z["topk_ids"], z["topk_weights"], z["has_weights"]
        if offsets.shape != (len(seq_ids) + 1,) or has_w.shape != (len(seq_ids),):
            raise TraceFormatError(f"{p}: offsets/has_weights do not match {len(seq_ids)} seq_ids")
        for i, sid in enumerate(seq_ids):
            a, b = int(offsets[i]), int(offsets[i + 1])
            try:
                trace.append(sid, tok[a:b], ids[:, a:b], w[:, a:b] if has_w[i] else None)
            except TraceFormatError as e:
                raise TraceFormatError(f"{p}: {e}") from None
    return trace


class TraceWriter:
    """Appends sequences to a ``.jsonl`` trace stream, bounded in sequences and bytes.

    The header is written when the file is opened (``"w"``: an existing file is replaced).
    Each :meth:`write` is one line, flushed at once, so a killed process leaves a valid
    trace (at most a torn last line, which :meth:`RoutingTrace.load` skips). Once
    ``max_sequences`` sequences or ``max_bytes`` bytes are written, later writes are
    dropped with ONE warning (the job being watched never stops) and return False.
    Thread-safe (one lock around each line).

    Args:
        path: the ``.jsonl`` file.
        layers, num_experts, top_k, source: the header (as :class:`RoutingTrace`).
        max_sequences: sequences kept at most (None: no bound).
        max_bytes: file size kept at most, header included (None: no bound); a line that
            would cross it is not written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layers: Sequence[str],
        num_experts: int,
        top_k: int,
        source: Mapping[str, Any] | None = None,
        max_sequences: int | None = 10000,
        max_bytes: int | None = 1 << 30,
    ) -> None:
        p = Path(path)
        if _suffix(p) != ".jsonl":
            raise TraceFormatError(f"{p}: TraceWriter writes a .jsonl stream (save() writes .npz)")
        if max_sequences is not None and int(max_sequences) < 1:
            raise ValueError(f"max_sequences must be >= 1 or None, got {max_sequences}")
        if max_bytes is not None and int(max_bytes) < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        # An empty trace validates the header fields and checks every appended shape.
        self._shape = RoutingTrace(list(layers), num_experts, top_k, dict(source or {}))
        self.path = p
        self.max_sequences = None if max_sequences is None else int(max_sequences)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.sequences = 0
        self.bytes = 0
        self.full = False
        self._lock = threading.Lock()
        p.parent.mkdir(parents=True, exist_ok=True)
        self._f: Any = p.open("w", encoding="utf-8")
        self._line(json.dumps(self._shape.header(), allow_nan=False) + "\n", force=True)

    @classmethod
    def like(cls, trace: RoutingTrace, path: str | os.PathLike[str], **bounds: Any) -> TraceWriter:
        """A writer with ``trace``'s header (layers, E, K, source)."""
        return cls(
            path,
            layers=trace.layers,
            num_experts=trace.num_experts,
            top_k=trace.top_k,
            source=trace.source,
            **bounds,
        )

    def _line(self, text: str, force: bool = False) -> bool:
        data = text.encode("utf-8")
        if not force:
            if self._f is None or self.full:
                return False
            over_n = self.max_sequences is not None and self.sequences >= self.max_sequences
            over_b = self.max_bytes is not None and self.bytes + len(data) > self.max_bytes
            if over_n or over_b:
                self.full = True
                what = (
                    f"max_sequences={self.max_sequences}"
                    if over_n
                    else f"max_bytes={self.max_bytes}"
                )
                warnings.warn(
                    f"moescope TraceWriter: {self.path} reached {what}; later sequences are "
                    "not written",
                    stacklevel=4,
                )
                return False
        self._f.write(text)
        self._f.flush()
        self.bytes += len(data)
        return True

    def write(
        self,
        seq_id: str | int,
        token_ids: Sequence[int] | np.ndarray,
        topk_ids: Any,
        topk_weights: Any = None,
    ) -> bool:
        """Append one sequence (shapes as :meth:`RoutingTrace.append`); False when the
        bound is reached or the writer is closed (nothing written)."""
        one = RoutingTrace(self._shape.layers, self._shape.num_experts, self._shape.top_k)
        one.append(seq_id, token_ids, topk_ids, topk_weights)  # shape checks
        with self._lock:
            ok = self._line(_sequence_line(one[0]) + "\n")
            if ok:
                self.sequences += 1
            return ok

    def write_trace(self, trace: RoutingTrace) -> int:
        """Append every sequence of ``trace``; returns how many were written."""
        n = 0
        for seq in trace:
            if not self.write(seq.seq_id, seq.token_ids, seq.topk_ids, seq.topk_weights):
                break
            n += 1
        return n

    def write_record(self, record: Mapping[str, Any]) -> bool:
        """Append another kind of line (``record["kind"]`` must be set and not
        "sequence", e.g. a per-request summary); counted against ``max_bytes`` only."""
        kind = record.get("kind")
        if not isinstance(kind, str) or kind == "sequence":
            raise ValueError("write_record needs a 'kind' other than 'sequence'")
        with self._lock:
            return self._line(json.dumps(json_safe(dict(record)), allow_nan=False) + "\n")

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
