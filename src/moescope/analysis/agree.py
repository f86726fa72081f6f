"""``moescope agree A B``: routing agreement between two sources of the same tokens.

A side is one of:

- a **trace file** (``.jsonl`` / ``.npz``, :mod:`moescope.trace`): written by
  :meth:`~moescope.trace.RoutingTrace.save`, the vLLM plugin, a training-side
  :class:`~moescope.stats.trace_recorder.TraceRecorder`;
- a **TokenRouting file** (``.npz`` written by ``TokenRouting.save``: moescope's token
  recorder, as ``analyze`` uses it), converted by
  :func:`~moescope.stats.trace_recorder.trace_from_token_routing`;
- a **model**: a directory (``save_pretrained`` output, a saved TinyMoELM), a
  ``config.json`` (random weights from ``--seed``) or a cached hub id, or in Python an
  ``nn.Module``. Its trace is made by :func:`replay`: the token ids of the other side (or
  of ``tokens=`` / ``--tokens``) are run through it, one forward per group of
  equal-length sequences (no padding), and its routing recorded through a
  :class:`~moescope.monitor.MoEMonitor` (the adapters' ``topk_index`` and combine weights,
  never re-derived).

The two traces are aligned by ``seq_id`` with equal token ids
(:func:`~moescope.analysis.agreement.align_traces`), measured by
:func:`~moescope.analysis.agreement.measure_agreement`, and :func:`write_agreement`
writes ``summary.json``, ``agreement.jsonl`` (one line per layer + a summary line, for
dashboards) and ``report.html``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moescope._cliopts import option
from moescope.analysis.agreement import (
    AgreementResult,
    TraceAlignmentError,
    align_traces,
    measure_agreement,
)
from moescope.analysis.errors import AnalyzeError
from moescope.analysis.outdir import prepare_out_dir, write_text
from moescope.stats.token_recorder import RoutingRecorder, TokenRouting
from moescope.stats.trace_recorder import trace_from_token_routing
from moescope.trace import RoutingTrace, TraceFormatError

__all__ = [
    "AgreeOptions",
    "AgreementResult",
    "TraceAlignmentError",
    "agree",
    "load_trace",
    "replay",
    "run_agree",
    "write_agreement",
]

Side = RoutingTrace | TokenRouting | nn.Module | str | os.PathLike[str]


def load_trace(path: str | os.PathLike[str]) -> RoutingTrace:
    """A trace file, or a ``TokenRouting.save`` file converted (module doc).

    Raises:
        AnalyzeError: missing file or not a trace (one line).
    """
    p = Path(path)
    if not p.is_file():
        raise AnalyzeError(f"{p}: no such trace file; pass a .jsonl/.npz routing trace or a model")
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                is_token_routing = "meta" in z.files and "header" not in z.files
        except (OSError, ValueError, zipfile.BadZipFile):
            is_token_routing = False  # RoutingTrace.load below says what is wrong
        if is_token_routing:
            return trace_from_token_routing(TokenRouting.load(p), source={"file": str(p)})
    try:
        return RoutingTrace.load(p)
    except TraceFormatError as err:
        raise AnalyzeError(str(err)) from None


def _token_sequences(
    tokens: RoutingTrace | Mapping[str, Any] | Sequence[Any],
) -> list[tuple[str, np.ndarray]]:
    if isinstance(tokens, RoutingTrace):
        return [(s.seq_id, s.token_ids) for s in tokens]
    if isinstance(tokens, Mapping):
        items: Iterable[tuple[Any, Any]] = tokens.items()
    else:
        items = ((str(i), t) for i, t in enumerate(tokens))
    out = []
    for sid, t in items:
        arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise AnalyzeError(
                f"sequence {sid!r}: token ids must be a 1-D integer sequence, got shape "
                f"{arr.shape} dtype {arr.dtype}"
            )
        out.append((str(sid), arr.astype(np.int64)))
    return out


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _engine(model: nn.Module) -> str:
    mod = type(model).__module__
    if mod.startswith("moescope.nn"):
        return "moescope-nn"
    return "transformers" if mod.startswith("transformers") else mod.split(".")[0]


def replay(
    model: nn.Module,
    tokens: RoutingTrace | Mapping[str, Any] | Sequence[Any],
    *,
    batch_size: int = 8,
    monitor: Any | None = None,
    source: Mapping[str, Any] | None = None,
) -> RoutingTrace:
    """The routing trace of ``model`` on the given token sequences.

    Args:
        model: a transformers MoE causal LM, a ``moescope.nn`` model (``TinyMoELM``), or
            anything a ``MoEMonitor`` recognises whose forward takes ``input_ids`` [B, S].
        tokens: a trace (its seq_ids and token ids are reused), ``{seq_id: ids}`` or a
            list of 1-D id sequences (seq_ids "0", "1", ...).
        batch_size: sequences of equal length per forward (no padding is ever added:
            padding could change a token's context).
        monitor: a ``MoEMonitor`` already watching ``model`` (its hooks are shared).
        source: extra metadata for the trace.

    Returns a trace with combine weights where the adapters report them.
    """
    seqs = _token_sequences(tokens)
    if not seqs:
        raise AnalyzeError("no token sequence to replay; pass a trace or token ids")
    bad = next((sid for sid, t in seqs if t.size and int(t.min()) < 0), None)
    if bad is not None:
        raise AnalyzeError(
            f"sequence {bad!r} has negative token ids (-1: the recording had no input_ids); "
            "replay needs the real token ids"
        )
    total = sum(int(t.shape[0]) for _, t in seqs)
    rec = RoutingRecorder(model, max_tokens=max(total, 1), monitor=monitor, weights=True)
    by_len: dict[int, list[int]] = {}
    for i, (_, t) in enumerate(seqs):
        by_len.setdefault(int(t.shape[0]), []).append(i)
    forward_order: list[int] = []
    dev = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with rec, torch.no_grad():
            for length, idx in by_len.items():
                if length == 0:
                    continue
                for j in range(0, len(idx), max(1, int(batch_size))):
                    chunk = idx[j : j + max(1, int(batch_size))]
                    ids = torch.as_tensor(np.stack([seqs[i][1] for i in chunk]), device=dev)
                    model(input_ids=ids)
                    forward_order.extend(chunk)
    finally:
        model.train(was_training)
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), None)
    meta = {"engine": _engine(model), "model": type(model).__name__, "dtype": dtype}
    meta.update(dict(source or {}))
    recorded = trace_from_token_routing(rec.result(), source=meta)
    out = RoutingTrace(recorded.layers, recorded.num_experts, recorded.top_k, recorded.source)
    by_seq = {forward_order[int(s)]: s for s in recorded.seq_ids}
    for i, (sid, t) in enumerate(seqs):
        if t.shape[0] == 0:
            out.append(sid, t, np.full((out.num_layers, 0, out.top_k), -1, dtype=np.int32))
            continue
        got = recorded[by_seq[i]]
        out.append(sid, got.token_ids, got.topk_ids, got.topk_weights)
    return out


def _is_trace_path(spec: str | os.PathLike[str]) -> bool:
    p = Path(spec)
    return p.suffix.lower() in (".jsonl", ".npz") and not p.is_dir()


def _load_model(spec: str | os.PathLike[str], dtype: str, device: str, seed: int) -> nn.Module:
    from moescope.analysis.loading import load_model

    return load_model(spec, dtype=dtype, device=device, seed=seed, need_text=False).model


@dataclass
class _Side:
    trace: RoutingTrace | None
    model: nn.Module | None
    label: str
    meta: dict[str, Any]


def _side(x: Side, dtype: str, device: str, seed: int, label: str | None, default: str) -> _Side:
    if isinstance(x, RoutingTrace):
        return _Side(x, None, label or default, {})
    if isinstance(x, TokenRouting):
        return _Side(trace_from_token_routing(x), None, label or default, {})
    if isinstance(x, nn.Module):
        if dtype not in ("auto", "", None):
            from moescope.analysis.loading import parse_dtype

            x = x.to(parse_dtype(dtype))
        return _Side(None, x, label or default, {})
    if isinstance(x, (str, os.PathLike)):
        name = Path(x).name or str(x)
        if _is_trace_path(x):
            return _Side(load_trace(x), None, label or name, {"file": str(x)})
        model = _load_model(x, dtype, device, seed)
        meta = {"model": str(x), "seed": seed}
        return _Side(None, model, label or f"{name} ({_dtype_of(model)})", meta)
    raise AnalyzeError(
        f"cannot compare a {type(x).__name__}; pass a RoutingTrace, a trace file, a "
        "TokenRouting, a model (nn.Module) or a model directory / config.json"
    )


def _dtype_of(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return "?" if p is None else str(p.dtype).removeprefix("torch.")


def agree(
    a: Side,
    b: Side,
    *,
    tokens: RoutingTrace | Mapping[str, Any] | Sequence[Any] | str | os.PathLike[str] | None = None,
    labels: Sequence[str] | None = None,
    dtype_a: str = "auto",
    dtype_b: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    top_n: int = 10,
    prefix: bool = False,
) -> AgreementResult:
    """Routing agreement of ``a`` and ``b`` on the same token sequences.

    Args:
        a, b: each a :class:`~moescope.trace.RoutingTrace`, a trace file, a
            ``TokenRouting`` (or its ``.npz``), an ``nn.Module`` or a model path / hub id
            (module doc). A model side is replayed on the token ids of ``tokens``, else
            of the other side's trace.
        tokens: the token sequences to replay when a side is a model: a trace (or trace
            file), ``{seq_id: ids}`` or a list of id sequences. Needed when both are
            models.
        labels: names of A and B in the report.
        dtype_a, dtype_b: dtype of a model side (``auto``, ``float32``, ``bfloat16``,
            ``float16``); an ``nn.Module`` is converted in place when not ``auto``.
        device, seed: where a loaded model runs; seed of random weights (config.json).
        batch_size: sequences per replay forward.
        top_n: worst tokens / positions kept.
        prefix: compare the common prefix of a sequence whose token ids on one side are a
            prefix of the other's (see :func:`~moescope.analysis.agreement.align_traces`).

    Returns:
        :class:`~moescope.analysis.agreement.AgreementResult` (``.verdict``, per-layer
        ``.layers``, ``.to_json()``).

    Raises:
        AnalyzeError: a side cannot be read, no token ids to replay, or the traces are not
            of the same tokens (:class:`~moescope.analysis.agreement.TraceAlignmentError`).
    """
    la, lb = (labels[0], labels[1]) if labels else (None, None)
    sa = _side(a, dtype_a, device, seed, la, "A")
    sb = _side(b, dtype_b, device, seed, lb, "B")
    if sa.label == sb.label:
        sa.label, sb.label = f"A: {sa.label}", f"B: {sb.label}"
    tok: Any = tokens
    if isinstance(tokens, (str, os.PathLike)):
        tok = load_trace(tokens)
    for s, other in ((sa, sb), (sb, sa)):
        if s.trace is not None:
            continue
        src = tok if tok is not None else other.trace
        if src is None:
            raise AnalyzeError(
                "both sides are models: pass the token ids to replay (tokens= or --tokens TRACE)"
            )
        assert s.model is not None
        s.trace = replay(s.model, src, batch_size=batch_size, source=s.meta)
    assert sa.trace is not None and sb.trace is not None
    aligned = align_traces(sa.trace, sb.trace, prefix=prefix)
    result = measure_agreement(
        aligned,
        label_a=sa.label,
        label_b=sb.label,
        source_a={**sa.trace.source, **sa.meta},
        source_b={**sb.trace.source, **sb.meta},
        top_n=top_n,
    )
    if aligned.only_a or aligned.only_b:
        result.notes.append(
            f"{aligned.only_a} sequences only in {sa.label} and {aligned.only_b} only in "
            f"{sb.label} were left out"
        )
    if aligned.trimmed:
        result.notes.append(
            f"{aligned.trimmed} tokens beyond the common prefix of their sequence were left "
            "out (--prefix)"
        )
    for s in (sa, sb):
        if s.trace is not None and s.trace.source.get("random_weights"):
            result.notes.append(f"{s.label} has random weights")
    return result


# --------------------------------------------------------------------------- CLI


@dataclass
class AgreeOptions:
    """Settings of ``moescope agree`` (every flag is one field; the CLI is derived)."""

    a: str = option(
        help="a routing trace (.jsonl/.npz: moescope.trace, vLLM plugin, training recorder, "
        "TokenRouting.save) or a model (directory, config.json, cached hub id) to replay",
        metavar="A",
        positional=True,
    )
    b: str = option(help="the same for the second side", metavar="B", positional=True)
    out: str = option("moescope-agree", help="output directory", metavar="DIR")
    tokens: str | None = option(
        None,
        help="a trace whose token ids are replayed through a model side (default: the other "
        "side's trace; needed when both are models)",
        metavar="TRACE",
    )
    labels: str | None = option(
        None, help="names of A and B in the report, comma-separated", metavar="A,B"
    )
    dtype_a: str = option(
        "auto",
        help="dtype of A when it is a model",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    dtype_b: str = option(
        "auto",
        help="dtype of B when it is a model",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = option("cpu", help="device of a model side (cpu, cuda, cuda:N, auto)")
    seed: int = option(0, help="seed of random weights when a side is a config.json")
    batch_size: int = option(8, help="sequences per replay forward")
    top_n: int = option(10, help="worst tokens and positions listed")
    prefix: bool = option(
        False,
        help="where one side's token ids are a prefix of the other's (e.g. an engine that "
        "never routed the last sampled token), compare the common prefix",
    )
    overwrite: bool = option(
        False, help="write into a non-empty directory that is not a moescope output"
    )


def run_agree(options: AgreeOptions) -> tuple[AgreementResult, Path]:
    """Measure and write; returns the result and the path of ``report.html``."""
    from moescope.analysis.compare import parse_labels

    labels = parse_labels(options.labels) if options.labels else None
    result = agree(
        options.a,
        options.b,
        tokens=options.tokens,
        labels=labels,
        dtype_a=options.dtype_a,
        dtype_b=options.dtype_b,
        device=options.device,
        seed=options.seed,
        batch_size=options.batch_size,
        top_n=options.top_n,
        prefix=options.prefix,
    )
    return result, write_agreement(result, options.out, overwrite=options.overwrite)


def write_agreement(
    result: AgreementResult, out: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``summary.json``, ``agreement.jsonl`` and ``report.html`` (figures as PNG)
    into ``out``; returns the path of ``report.html``."""
    from moescope.analysis.render import render_agreement

    out_dir = prepare_out_dir(out, overwrite=overwrite)
    write_text(out_dir, "summary.json", json.dumps(result.to_json(), indent=2, allow_nan=False))
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in result.jsonl_records())
    write_text(out_dir, "agreement.jsonl", lines)
    return render_agreement(result, out_dir)
