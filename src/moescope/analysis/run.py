"""The ``moescope analyze`` pipeline: options in, :class:`AnalysisResult` out.

:func:`analyze` does, in order:

1. **Load** the model (:mod:`moescope.analysis.loading`: a transformers directory, a saved
   TinyMoELM or a config.json with random weights; nothing is downloaded unless asked).
2. **Open the data** (:mod:`moescope.analysis.sources`): each ``data`` entry is one domain,
   read incrementally and cut into rows of ``seq_len`` consecutive tokens.
3. **Bound memory**: :func:`rows_per_forward` caps the rows of one forward so that its
   estimated activation memory (:func:`forward_bytes_per_token`) stays under
   ``memory_budget`` bytes, whatever ``batch_size`` says; a single row that does not fit
   is refused with what to do. The token recorder's memory (``record_tokens`` per input)
   is refused above 1 GiB (or the budget, if larger).
4. **Monitor**: one :class:`~moescope.monitor.MoEMonitor` (co-activation, alerts,
   neurons) with the token recorder (:class:`~moescope.stats.token_recorder.RoutingRecorder`)
   as a consumer of its pipeline. Under ``torchrun`` rank r runs forwards r, r + W, ...
   and the snapshot all-reduces the sums.
5. **Stop cleanly**: ``should_stop()`` is polled between forwards (the CLI's Ctrl-C
   handler sets it); a ``KeyboardInterrupt`` raised between forwards counts the same. The
   run then finishes with the tokens processed so far and ``result.partial = True``.
6. **Compute** every number: snapshot, alerts, parameters and FLOPs (theoretical and
   measured), token-level analyses (:mod:`moescope.stats.routing`), router agreement with
   a ``compare_model``.

:func:`write_outputs` then writes ``summary.json`` from the result and the report
(:func:`moescope.analysis.render.render_report`). Errors a user can fix raise
:class:`~moescope.analysis.errors.AnalyzeError` (one line: what is wrong, what to do).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moescope._cliopts import option, parse_size
from moescope.alerts import AlertRules
from moescope.analysis.decode import decode_bytes, make_decoder
from moescope.analysis.errors import AnalyzeError
from moescope.analysis.loading import LoadedModel, load_model, resolve_device
from moescope.analysis.outdir import is_moescope_output, prepare_out_dir, write_bytes
from moescope.analysis.render import render_report
from moescope.analysis.result import (
    AnalysisResult,
    DomainInfo,
    ModelInfo,
    Passage,
    RoutingAnalysis,
    write_summary,
)
from moescope.analysis.sources import open_data
from moescope.capture.hf_structure import int_attr
from moescope.cost.flops import flops_from_anatomy
from moescope.cost.measured import _hidden_size, measured_cost_from_reports
from moescope.cost.params import analyze_model, report_from_anatomy
from moescope.errors import UnsupportedModelError
from moescope.monitor import MoEMonitor
from moescope.stats import routing as R
from moescope.stats.neurons import NeuronOptions, NeuronThreshold
from moescope.stats.token_recorder import RoutingRecorder
from moescope.stats.trace_recorder import trace_from_recordings

__all__ = [
    "AnalyzeOptions",
    "analyze",
    "forward_bytes_per_token",
    "iter_batches",
    "parse_threshold",
    "rows_per_forward",
    "run_analyze",
    "write_outputs",
]

_READ_CHUNK = 1 << 20  # bytes per read: bounds memory whatever the input size
DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of activations per forward (2 GiB)
_RECORDER_LIMIT = 1 << 30  # bytes the token recorder may keep (or the budget, if larger)


@dataclass
class AnalyzeOptions:
    """Settings of one analysis: every ``moescope analyze`` flag is one field (the CLI is
    derived from these fields; each field's help is its documentation, shown by
    ``moescope analyze --help`` and :func:`moescope._cliopts.option_help`).

    ``model`` and ``data`` are required; ``data`` also accepts one path. ``device``:
    "auto" (CUDA when available), "cpu", "cuda", "cuda:1" ... ``memory_budget`` is in
    bytes here (the flag takes 512M, 2G ...).
    """

    model: str = option(
        help="a transformers model directory (config.json + safetensors), a saved TinyMoELM, "
        "a config.json (random weights, labelled so; a tokenizer next to it is used), or a "
        "hub id org/name[@revision] from the local Hugging Face cache (--allow-download "
        "fetches it if absent)",
        metavar="DIR_CONFIG_OR_HUB_ID",
        group="model",
    )
    data: list[str] = option(
        help="text, JSONL (a 'text' field, or chat 'messages' rendered with the tokenizer's "
        "chat template), parquet, a datasets folder, or - for stdin; repeat for several "
        "domains (label = file stem)",
        metavar="INPUT",
        group="data",
    )
    out: str = option(
        "moescope-analysis",
        help="output directory (report.html, summary.json, figures)",
        metavar="DIR",
        group="output",
    )
    neurons: bool = option(
        False, help="also count activated neurons inside the chosen experts", group="analyses"
    )
    threshold: str | None = option(
        None,
        help="neuron threshold: TAU, absolute:TAU, magnitude:ALPHA (the default, 0.1), "
        "relative:P or calibrated:SPARSITY (needs --neurons)",
        metavar="SPEC",
        group="analyses",
    )
    max_tokens: int | None = option(
        None, help="stop after N tokens of each input", metavar="N", group="data"
    )
    batch_size: int = option(
        8, help="rows per forward (capped by --memory-budget)", metavar="B", group="data"
    )
    seq_len: int = option(
        256,
        help="tokens per row (also the context of the FLOP count)",
        metavar="S",
        group="data",
    )
    embeddings: str = option(
        "both",
        help="which embedding matrices count as active parameters",
        choices=("both", "head", "none"),
        group="analyses",
    )
    coact_layer: str | None = option(
        None,
        help="layer index or path for the co-activation plot (default: the first MoE layer)",
        metavar="LAYER",
        group="analyses",
    )
    token_layer: str | None = option(
        None,
        help="layer index or path for the coloured tokens (default: the middle MoE layer)",
        metavar="LAYER",
        group="analyses",
    )
    compare: str | None = option(
        None,
        help="a second checkpoint: router agreement with --model on the first input",
        metavar="DIR",
        group="analyses",
    )
    trust_remote_code: bool = option(
        False, help="allow a checkpoint's own modelling code (review it first)", group="model"
    )
    device: str = option(
        "auto", help="auto (CUDA when available), cpu, cuda, cuda:N", group="model"
    )
    dtype: str = option(
        "auto",
        help="weights dtype: auto (the dtype the config names, else float32), float32, "
        "bfloat16, float16",
        metavar="DTYPE",
        group="model",
    )
    device_map: str | None = option(
        None,
        help="auto: spread a model too large for one device (needs accelerate)",
        metavar="MAP",
        group="model",
    )
    allow_download: bool = option(
        False,
        help="allow fetching a hub id from the Hugging Face hub (off: local files and the "
        "local cache only)",
        group="model",
    )
    force: bool = option(
        False,
        help="load even when the model looks too large for the memory available",
        group="model",
    )
    text_field: str | None = option(
        None,
        help="JSONL key / column holding the text (default: text, or messages for chat)",
        metavar="KEY",
        group="data",
    )
    overwrite: bool = option(
        False,
        help="write into a non-empty directory that is not a moescope output",
        group="output",
    )
    seed: int = option(0, help="seed of random weights built from a config", group="model")
    record_tokens: int = option(
        20000,
        help="tokens per input kept for the token-level analyses",
        metavar="N",
        group="analyses",
    )
    save_trace: bool = option(
        False,
        help="also write routing_trace.npz: the routing of the recorded tokens (the first "
        "--record-tokens of each input, combine weights included) as a routing trace for "
        "moescope agree (sequence ids INPUT/ROW)",
        group="output",
    )
    memory_budget: int | None = option(
        None,
        help="activation memory one forward may use, e.g. 512M, 4G (default 2G; on CUDA a "
        "quarter of the free memory); larger batches run in several forwards",
        type=parse_size,
        metavar="SIZE",
        group="data",
    )
    progress: bool = option(
        True,
        help="no progress bar on stderr (none is drawn when stderr is not a terminal)",
        group="output",
    )

    def __post_init__(self) -> None:
        data: Any = self.data  # one path (str / PathLike) or None are accepted too
        if isinstance(data, (str, os.PathLike)):
            data = [data]
        self.data = [str(d) for d in (data or [])]
        self.model = str(self.model) if self.model is not None else self.model
        if self.dtype is None:
            self.dtype = "auto"
        self.out = str(self.out)
        if self.compare is not None:
            self.compare = str(self.compare)
        self.validate()

    def validate(self) -> None:
        """Range checks with one-line messages (:class:`AnalyzeError`)."""
        if not self.model:
            raise AnalyzeError("no model given; pass --model DIR_OR_CONFIG")
        if not self.data:
            raise AnalyzeError("no data given; pass --data FILE (repeat for several domains)")
        for name in ("batch_size", "seq_len", "record_tokens"):
            if int(getattr(self, name)) < 1:
                flag = name.replace("_", "-")
                raise AnalyzeError(f"--{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise AnalyzeError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.memory_budget is not None and int(self.memory_budget) < 1 << 20:
            raise AnalyzeError(f"--memory-budget must be at least 1 MiB, got {self.memory_budget}")
        if self.embeddings not in ("both", "head", "none"):
            raise AnalyzeError(f"--embeddings must be both, head or none, got {self.embeddings!r}")
        if self.data.count("-") > 1:
            raise AnalyzeError("--data - (stdin) can be given once only")
        labels = [_label(d) for d in self.data]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise AnalyzeError(
                f"several --data inputs share the label {dup[0]!r} (labels are file stems); "
                "rename or copy one of them"
            )
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise AnalyzeError(f"--out {out} exists and is not a directory; pass a directory")
        if not self.overwrite and out.is_dir() and any(out.iterdir()):
            if not is_moescope_output(out):
                raise AnalyzeError(
                    f"--out {out} is not empty and is not a moescope output; choose a new or "
                    "empty directory, or pass --overwrite to write into it"
                )
        threshold, target = parse_threshold(self.threshold)
        if (threshold is not None or target is not None) and not self.neurons:
            raise AnalyzeError("--threshold applies to neuron statistics; add --neurons")

    def settings(self) -> dict[str, Any]:
        """The options as recorded in ``summary.json`` (``settings``)."""
        d = asdict(self)
        d.pop("progress", None)
        return d


def _label(spec: str) -> str:
    return "stdin" if spec == "-" else Path(spec).stem


def parse_threshold(spec: str | float | None) -> tuple[Any | None, float | None]:
    """``(NeuronThreshold | None, calibration target | None)`` from a threshold spec.

    Specs: ``None`` (the monitor's default, magnitude 0.1), a number (absolute tau),
    ``absolute:TAU``, ``magnitude:ALPHA``, ``relative:P``, ``calibrated:SPARSITY`` (tau per
    layer from the first batch so that SPARSITY of |h| lies below it; CATS / TEAL).
    """
    if spec is None or spec == "":
        return None, None
    if isinstance(spec, (int, float)):
        return NeuronThreshold.absolute(float(spec)), None
    text = str(spec).strip()
    mode, sep, value = text.partition(":")
    usage = (
        "use a number (absolute tau) or absolute:TAU, magnitude:ALPHA, relative:P, "
        "calibrated:SPARSITY, e.g. --threshold magnitude:0.1"
    )
    if not sep:
        try:
            return NeuronThreshold.absolute(float(text)), None
        except ValueError:
            if text in ("absolute", "magnitude", "relative"):
                return getattr(NeuronThreshold, text)(), None
            raise AnalyzeError(f"bad --threshold {text!r}; {usage}") from None
    try:
        v = float(value)
    except ValueError:
        raise AnalyzeError(f"bad --threshold value in {text!r}; {usage}") from None
    try:
        if mode == "calibrated":
            if not 0.0 < v < 1.0:
                raise ValueError(f"calibrated target sparsity must be in (0, 1), got {v}")
            return None, v
        if mode not in ("absolute", "magnitude", "relative"):
            raise ValueError(f"unknown threshold mode {mode!r}")
        return getattr(NeuronThreshold, mode)(v), None
    except ValueError as err:
        raise AnalyzeError(f"bad --threshold {text!r} ({err}); {usage}") from None


# --------------------------------------------------------------------------- memory


def _cfg(model: torch.nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def forward_bytes_per_token(
    *,
    hidden: int,
    intermediate: int,
    top_k: int,
    num_experts: int,
    heads: int,
    seq_len: int,
    vocab: int,
    logits: bool,
    element_bytes: int = 4,
) -> int:
    """Estimated peak activation bytes per token of one no-grad forward (upper bound).

    Terms per token, times ``element_bytes`` and a safety factor of 2 for allocator slack
    and temporaries: ~8 hidden-sized buffers (residual stream, norms, q/k/v/o), the
    attention scores and their softmax of an eager implementation (2 x heads x seq_len),
    the routed experts' gate, up and activation rows (3 x K x I) plus the gathered inputs
    (K x H), router logits and probabilities (2 x E), and the LM head's logits (vocab)
    unless the model computes only the last position's (``logits=False``). Only one layer
    is live at a time in inference, so the depth does not multiply.
    """
    per = (
        8 * hidden
        + 2 * heads * seq_len
        + 3 * top_k * intermediate
        + top_k * hidden
        + 2 * num_experts
        + (vocab if logits else 0)
    )
    return int(2 * element_bytes * per)


def rows_per_forward(batch_size: int, seq_len: int, bytes_per_token: int, budget: int) -> int:
    """Rows of ``seq_len`` tokens one forward may take: ``batch_size`` capped so that
    rows x seq_len x bytes_per_token <= budget.

    Raises:
        AnalyzeError: a single row needs more than ``budget`` (lower ``--seq-len`` or
            raise ``--memory-budget``).
    """
    row = seq_len * bytes_per_token
    if row > budget:
        raise AnalyzeError(
            f"one row of --seq-len {seq_len} needs about {_gib(row)} of activations, over the "
            f"memory budget of {_gib(budget)}; lower --seq-len or raise --memory-budget"
        )
    return max(1, min(int(batch_size), budget // row))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return max(1 << 28, free // 4)
        except RuntimeError:  # pragma: no cover - driver without the query
            return DEFAULT_MEMORY_BUDGET
    return DEFAULT_MEMORY_BUDGET


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_bytes_per_token(model: torch.nn.Module, seq_len: int, monitor: Any) -> int:
    cfg = _cfg(model)
    hidden = int_attr(cfg, ("hidden_size", "d_model", "n_embd")) or 4096
    infos = list(monitor.layers)
    e = max((int(getattr(i, "num_experts", 0) or 0) for i in infos), default=8) or 8
    k = max((int(getattr(i, "top_k", 0) or 0) for i in infos), default=2) or 2
    inter = int_attr(
        cfg,
        (
            "moe_intermediate_size",
            "expert_intermediate_size",
            "intermediate_size",
            "ffn_dim",
            "d_ff",
        ),
    ) or (4 * hidden)
    heads = int_attr(cfg, ("num_attention_heads", "n_head", "num_heads")) or 32
    vocab = int_attr(cfg, ("vocab_size",)) or 32000
    p = next(model.parameters(), None)
    elem = max(p.element_size(), 2) if p is not None and p.is_floating_point() else 4
    return forward_bytes_per_token(
        hidden=hidden,
        intermediate=inter,
        top_k=k,
        num_experts=e,
        heads=heads,
        seq_len=seq_len,
        vocab=vocab,
        logits=not _accepts_logits_to_keep(model),
        element_bytes=elem,
    )


# --------------------------------------------------------------------------- batching


def iter_batches(
    chunks: Iterator[torch.Tensor],
    batch_size: int,
    seq_len: int,
    max_tokens: int | None = None,
) -> Iterator[torch.Tensor]:
    """[b, s] int64 batches of consecutive tokens from a stream of 1-D chunks.

    Full batches are [batch_size, seq_len]; at the end of the stream the remaining full
    rows form one [n, seq_len] batch (n < batch_size) and the last partial row a [1, r]
    batch (r < seq_len). ``max_tokens`` stops after that many tokens. At most one batch
    plus one chunk is held in memory.
    """
    per_batch = batch_size * seq_len
    buf = torch.zeros(0, dtype=torch.int64)
    seen = 0
    for chunk in chunks:
        if max_tokens is not None:
            chunk = chunk[: max(0, max_tokens - seen)]
        seen += chunk.numel()
        buf = torch.cat([buf, chunk]) if buf.numel() else chunk
        while buf.numel() >= per_batch:
            yield buf[:per_batch].reshape(batch_size, seq_len)
            buf = buf[per_batch:]
        if max_tokens is not None and seen >= max_tokens:
            break
    rows = buf.numel() // seq_len
    if rows:
        yield buf[: rows * seq_len].reshape(rows, seq_len)
    rest = buf[rows * seq_len :]
    if rest.numel():
        yield rest.reshape(1, -1)


# --------------------------------------------------------------------------- pipeline


def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, whether we initialised) under torchrun; (0, 1, False) otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if world <= 1:
        return 0, 1, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def _layer_choice(spec: str | None, layers: Sequence[str], default: int, flag: str) -> str:
    if spec is None:
        return layers[default]
    s = str(spec)
    if s in layers:
        return s
    try:
        i = int(s)
    except ValueError:
        raise AnalyzeError(
            f"{flag} {s!r} is neither a layer index nor an MoE layer path; choose 0-"
            f"{len(layers) - 1} or one of {list(layers)[:4]}..."
        ) from None
    if not -len(layers) <= i < len(layers):
        raise AnalyzeError(
            f"{flag} {i} is out of range: the model has {len(layers)} MoE layers "
            f"(0-{len(layers) - 1})"
        )
    return layers[i]


def _make_monitor(loaded: LoadedModel, opts: AnalyzeOptions, threshold: Any) -> Any:
    try:
        neurons: bool | NeuronOptions = (
            NeuronOptions(threshold=threshold) if opts.neurons else False
        )
        return MoEMonitor(
            loaded.model, history=0, coactivation=True, alert_rules=AlertRules(), neurons=neurons
        )
    except UnsupportedModelError as err:
        if opts.neurons and "neurons=True" in str(err):
            raise AnalyzeError(
                f"--neurons is not supported for {type(loaded.model).__name__}: its experts "
                "expose no intermediate activations; run without --neurons"
            ) from None
        raise AnalyzeError(
            f"{loaded.source} ({loaded.model_type}, {type(loaded.model).__name__}) has no "
            "Mixture-of-Experts layer moescope recognises; analyze needs an MoE model (if it "
            "is one, register an adapter implementing moescope.capture.adapter.MoEAdapter, "
            "see docs/custom_adapter.md)"
        ) from None


def _forward(model: torch.nn.Module, ids: torch.Tensor, last_logits: bool) -> None:
    kw: dict[str, Any] = {"logits_to_keep": 1} if last_logits else {}
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _LogProgress:
    """Progress for a log file (stderr not a terminal): two lines, not one per update:
    when the first forward is done and when the run ends."""

    def __init__(self) -> None:
        self.tokens = 0
        self.t0 = time.perf_counter()

    def update(self, n: int) -> None:
        if self.tokens == 0:
            print("moescope analyze: streaming (first forward done)", file=sys.stderr, flush=True)
        self.tokens += int(n)

    def close(self) -> None:
        if self.tokens:
            dt = time.perf_counter() - self.t0
            print(
                f"moescope analyze: {self.tokens:,} tokens in {dt:.1f} s",
                file=sys.stderr,
                flush=True,
            )


def _progress(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    # A bar only on a terminal: redirected to a log file, tqdm's redraws would be one
    # line per update.
    isatty = getattr(sys.stderr, "isatty", None)
    if not (callable(isatty) and isatty()):
        return _LogProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return _NoBar()
    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        file=sys.stderr,
        desc="moescope analyze",
        dynamic_ncols=True,
        mininterval=0.5,
    )


def tokenizer_description(tokenizer: Any | None, name: str) -> str:
    """What tokenizes the text, in words: ``"bytes (ids 0-255)"`` or e.g. ``"BPE,
    32,000 ids (from Qwen3-30B-A3B)"``: the tokenizers model kind (BPE, Unigram,
    WordPiece, WordLevel) rather than a wrapper class name like ``TokenizersBackend``,
    its size, and ``name`` (the checkpoint's)."""
    if tokenizer is None:
        return "bytes (ids 0-255)"
    kind = None
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    model = getattr(backend, "model", None)
    if model is not None:
        kind = type(model).__name__  # tokenizers' BPE / Unigram / WordPiece / WordLevel
    if kind is None:
        kind = type(tokenizer).__name__.replace("TokenizerFast", "").replace("Tokenizer", "")
        kind = kind or "tokenizer"
    try:
        size = f"{len(tokenizer):,} ids"
    except TypeError:
        size = "size unknown"
    return f"{kind}, {size} (from {name})" if name else f"{kind}, {size}"


def _recorder_bytes(tokens: int, layers: int, top_k: int, domains: int) -> int:
    # Per token: its id, sequence id, position (int64 each) + per layer K int64 ids and K
    # dropped flags; twice for the arrays' growth while recording.
    return int(2 * domains * tokens * (24 + layers * top_k * 9))


def analyze(
    options: AnalyzeOptions, *, should_stop: Callable[[], bool] | None = None
) -> AnalysisResult:
    """Run the pipeline of the module docstring and return every number.

    Args:
        options: what to analyse.
        should_stop: polled between forwards; when it returns True the run stops there and
            the result covers the tokens processed so far (``partial=True``).
    """
    t0 = time.perf_counter()
    opts = options
    threshold, calib_target = parse_threshold(opts.threshold)
    device = resolve_device(opts.device)
    rank, world, owns_group = _dist_setup(device)
    finished = False
    try:
        field = opts.text_field or "text"
        for d in opts.data:  # a bad input fails before minutes of model loading
            if d != "-":
                open_data(d, text_field=field, label=_label(d), tokenizer_pending=True)
        loaded = _load(opts.model, opts, device)
        sources = [
            open_data(d, text_field=field, tokenizer=loaded.tokenizer, label=_label(d))
            for d in opts.data
        ]
        monitor = _make_monitor(loaded, opts, threshold)
        layers = [info.path for info in monitor.layers]
        coact = _layer_choice(opts.coact_layer, layers, 0, "--coact-layer")
        token_layer = _layer_choice(opts.token_layer, layers, len(layers) // 2, "--token-layer")
        budget = int(opts.memory_budget or _default_budget(device))
        per_token = _model_bytes_per_token(loaded.model, opts.seq_len, monitor)
        rows = rows_per_forward(opts.batch_size, opts.seq_len, per_token, budget)
        top_k = max((int(getattr(i, "top_k", 1) or 1) for i in monitor.layers), default=1)
        rec_bytes = _recorder_bytes(opts.record_tokens, len(layers), top_k, len(sources))
        rec_limit = max(_RECORDER_LIMIT, budget)
        if rec_bytes > rec_limit:
            raise AnalyzeError(
                f"--record-tokens {opts.record_tokens} would keep about {_gib(rec_bytes)} of "
                f"token routing, over the limit of {_gib(rec_limit)}; lower --record-tokens "
                "or raise --memory-budget"
            )
        notes: list[str] = list(getattr(loaded, "notes", []) or [])
        if rows < opts.batch_size:
            notes.append(
                f"--batch-size {opts.batch_size} would need about "
                f"{_gib(opts.batch_size * opts.seq_len * per_token)} of activations per "
                f"forward; each forward took {rows} rows instead (memory budget "
                f"{_gib(budget)}, --memory-budget to change)"
            )
        recorder = _make_recorder(loaded.model, opts.record_tokens, monitor, opts.save_trace)
        last_logits = _accepts_logits_to_keep(loaded.model)
        domains = [DomainInfo(label=s.label, path=str(s.path), kind=str(s.kind)) for s in sources]
        bar = _progress(None, opts.progress and rank == 0)
        stopped: str | None = None
        try:
            with torch.no_grad():
                stopped = _stream(
                    opts,
                    loaded,
                    monitor,
                    recorder,
                    sources,
                    domains,
                    rows,
                    device,
                    world,
                    rank,
                    calib_target,
                    bar,
                    should_stop,
                    last_logits,
                )
        finally:
            bar.close()
            if recorder is not None:
                recorder.detach()
        partial = stopped is not None
        snapshot = monitor.snapshot()
        monitor.detach()
        result = AnalysisResult(
            settings=opts.settings(),
            model=_model_info(loaded, device),
            snapshot=snapshot,
            alerts=list(monitor.last_alerts),
            domains=domains,
            threshold_label=(snapshot.layers[layers[0]].neuron_threshold if opts.neurons else None),
            world_size=world,
            rank=rank,
            coact_layer=coact,
            token_layer=token_layer,
            rows_per_forward=rows,
            partial=partial,
            notes=notes,
        )
        if partial:
            torn = (
                " (the forward running at the interrupt may be counted in its first layers only)"
                if stopped == "mid-forward"
                else ""
            )
            result.notes.insert(
                0,
                f"interrupted: this report covers the first "
                f"{snapshot.total_tokens:,} tokens only{torn}",
            )
        if recorder is not None:
            result.recordings = {
                d.label: recorder.result(d.label) for d in domains if recorder.num_recorded(d.label)
            }
        if world > 1 and result.recordings:
            result.notes.append(
                f"token-level analyses use rank 0's share of the data (every {world}th forward)"
            )
        _cost(result, loaded.model, opts)
        result.routing = routing_analysis(result.recordings, token_layer, loaded.tokenizer)
        if opts.compare and world > 1:
            result.notes.append(
                "--compare is skipped under torchrun (router agreement needs the same tokens "
                "recorded by both models); run it in a single process"
            )
        elif opts.compare and result.routing is not None and not partial:
            _compare(result, opts, sources[0], rows, device, loaded)
        result.seconds = time.perf_counter() - t0
        finished = True
        return result
    finally:
        if owns_group:
            import torch.distributed as dist

            if finished:  # a rank that failed must not wait for the others here
                dist.barrier()
            dist.destroy_process_group()


def _load(source: str, opts: AnalyzeOptions, device: torch.device) -> LoadedModel:
    return load_model(
        source,
        dtype=opts.dtype or "auto",
        device=device,
        device_map=opts.device_map,
        allow_download=opts.allow_download,
        force=opts.force,
        trust_remote_code=opts.trust_remote_code,
        seed=opts.seed,
    )


def _model_info(loaded: LoadedModel, device: torch.device) -> ModelInfo:
    p = next(loaded.model.parameters(), None)
    return ModelInfo(
        source=loaded.source,
        model_type=loaded.model_type,
        class_name=type(loaded.model).__name__,
        random_weights=loaded.random_weights,
        description=loaded.description,
        tokenizer=tokenizer_description(loaded.tokenizer, loaded.tokenizer_name),
        vocab_size=loaded.vocab_size,
        device=str(p.device if p is not None else device),
        dtype=str(p.dtype).removeprefix("torch.") if p is not None else "-",
    )


def _stream(
    opts: AnalyzeOptions,
    loaded: LoadedModel,
    monitor: Any,
    recorder: Any | None,
    sources: Sequence[Any],
    domains: Sequence[DomainInfo],
    rows: int,
    device: torch.device,
    world: int,
    rank: int,
    calib_target: float | None,
    bar: Any,
    should_stop: Callable[[], bool] | None,
    last_logits: bool,
) -> str | None:
    """Every forward of the run. Returns None when every input was read, ``"between"``
    when ``should_stop`` stopped it between two forwards, ``"mid-forward"`` when a
    KeyboardInterrupt cut a forward (its first layers may have counted it)."""
    model = loaded.model
    calibrated = calib_target is None
    index = 0
    for src, dom in zip(sources, domains, strict=True):
        batches = iter_batches(src.token_chunks(_READ_CHUNK), rows, opts.seq_len, opts.max_tokens)
        ctx = recorder.source(dom.label) if recorder is not None else contextlib.nullcontext()
        with ctx:
            for ids in batches:
                # Between forwards is the place to stop: a forward cut in the middle leaves
                # its first layers counted and the others not (see the KeyboardInterrupt
                # below, which only a caller without a stop handler sees).
                if should_stop is not None and should_stop():
                    return "between"
                try:
                    if not calibrated:
                        # Every rank calibrates on the same first batch (equal taus); the
                        # recorder must not see this extra forward.
                        if recorder is not None:
                            recorder.detach()
                        with monitor.calibration():
                            _forward(model, ids.to(device), last_logits)
                        monitor.set_neuron_threshold(calibrated=calib_target)
                        calibrated = True
                        if recorder is not None:
                            recorder.attach()
                    mine = index % world == rank
                    index += 1
                    if mine:
                        _forward(model, ids.to(device), last_logits)
                except KeyboardInterrupt:
                    if should_stop is not None:
                        raise  # a stop handler is installed: this is the "abort now" Ctrl-C
                    return "mid-forward"
                dom.tokens += ids.numel()
                dom.batches += 1
                bar.update(ids.numel())
        if not dom.tokens:
            raise AnalyzeError(
                f"--data {dom.path} gave no token (the tokenizer produced nothing); "
                "pass an input with text"
            )
    return None


def _make_recorder(
    model: torch.nn.Module, max_tokens: int, monitor: Any, weights: bool = False
) -> Any | None:
    # A consumer of the monitor's pipeline: every MoE layer is hooked once, for both.
    rec = RoutingRecorder(model, max_tokens=max_tokens, monitor=monitor, weights=weights)
    rec.attach()
    return rec


def _cost(result: AnalysisResult, model: torch.nn.Module, opts: AnalyzeOptions) -> None:
    try:
        anatomy = analyze_model(model)
        result.params = report_from_anatomy(anatomy, opts.embeddings)
        result.flops = flops_from_anatomy(anatomy, opts.seq_len, opts.embeddings, "causal")
        result.measured = measured_cost_from_reports(
            result.snapshot, result.params, result.flops, _hidden_size(model)
        )
    except Exception as err:  # cost accounting is a section of the report, not its purpose
        result.cost_error = f"{type(err).__name__}: {err}"


def routing_analysis(
    recordings: dict[str, Any], token_layer: str, tokenizer: Any | None
) -> RoutingAnalysis | None:
    """Every token-level number (:mod:`moescope.stats.routing`) of ``{domain: TokenRouting}``.

    An analysis that fails is listed in ``errors`` rather than failing the run."""
    if not recordings:
        return None
    out = RoutingAnalysis(token_layer=token_layer)
    decode = make_decoder(tokenizer) or decode_bytes
    labels = list(recordings)
    out.recorded_tokens = {d: int(tr.num_tokens) for d, tr in recordings.items()}
    steps: list[tuple[str, Callable[[], None]]] = []

    def dists() -> None:
        out.distributions = {d: R.expert_distribution(tr) for d, tr in recordings.items()}
        if len(recordings) >= 2:
            out.divergence = R.domain_divergence(out.distributions)

    def same() -> None:
        out.same_expert = {
            d: {lay: R.same_expert_rate(tr, lay) for lay in tr.layers}
            for d, tr in recordings.items()
        }

    def passage() -> None:
        tr = recordings[labels[0]]
        words, experts = R.token_passage(tr, token_layer, max_tokens=600, decode=decode)
        out.passage = Passage(
            labels[0], token_layer, int(tr.num_experts[token_layer]), words, experts
        )

    def tops() -> None:
        out.top_tokens = {
            d: R.expert_top_tokens(tr, token_layer, top_n=8, decode=decode)
            for d, tr in list(recordings.items())[:4]
        }

    steps = [
        ("per-domain routing", dists),
        ("consecutive tokens", same),
        ("token view", passage),
        ("specialisation", tops),
    ]
    for what, fn in steps:
        try:
            fn()
        except Exception as err:  # one analysis failing must not lose the others
            out.errors.append(f"{what}: {type(err).__name__}: {err}")
    return out


def _compare(
    result: AnalysisResult,
    opts: AnalyzeOptions,
    first: Any,
    rows: int,
    device: torch.device,
    loaded: LoadedModel,
) -> None:
    """Route the recorded tokens of the first domain through the ``compare`` model (same
    batches) and measure router agreement."""
    assert opts.compare is not None and result.routing is not None
    if first.path == "-":
        result.notes.append("--compare needs a data file it can read again (not stdin); skipped")
        return
    other = _load(opts.compare, opts, device)
    if (other.tokenizer is None) != (loaded.tokenizer is None):
        raise AnalyzeError(
            f"--compare {opts.compare} tokenizes differently from --model (one uses bytes, "
            "the other a tokenizer); compare checkpoints of the same model"
        )
    try:
        rec = RoutingRecorder(other.model, max_tokens=opts.record_tokens)
    except Exception as err:
        raise AnalyzeError(f"--compare {opts.compare}: {err}") from None
    last_logits = _accepts_logits_to_keep(other.model)
    src = open_data(
        first.path,
        text_field=opts.text_field or "text",
        tokenizer=other.tokenizer,
        label=first.label,
    )
    # Same batching as the main pass: routing depends on each token's context.
    with rec, torch.no_grad():
        for ids in iter_batches(src.token_chunks(_READ_CHUNK), rows, opts.seq_len, opts.max_tokens):
            if rec.full:
                break
            _forward(other.model, ids.to(device), last_logits)
    main = result.recordings[first.label]
    try:
        agree = R.router_agreement(main, rec.result())
    except ValueError as err:
        result.routing.errors.append(f"router agreement: {err}")
        return
    layer0 = main.layers[0]
    result.routing.agreement = agree
    result.routing.agreement_chance = R.agreement_chance(
        main.top_k(layer0), main.num_experts[layer0]
    )
    result.routing.compare_source = other.source
    if other.random_weights:
        result.notes.append(f"--compare {other.source} has RANDOM WEIGHTS")


# --------------------------------------------------------------------------- outputs

#: File of ``--save-trace`` in the output directory (a :mod:`moescope.trace` file).
TRACE_NAME = "routing_trace.npz"


def write_outputs(result: AnalysisResult, out: str | os.PathLike[str] | None = None) -> Path:
    """Write ``summary.json`` (from the result) and then the report into ``out`` (default:
    the ``out`` setting); returns the path of ``report.html``. Only rank 0 writes."""
    out_dir = Path(out if out is not None else result.settings["out"])
    if result.rank != 0:
        return out_dir / "report.html"
    out_dir = prepare_out_dir(out_dir, overwrite=bool(result.settings.get("overwrite")))
    write_summary(result, out_dir)
    if result.settings.get("save_trace") and result.recordings:
        trace = trace_from_recordings(
            result.recordings,
            source={"engine": "moescope-analyze", "model": result.model.source},
        )
        write_bytes(out_dir, TRACE_NAME, trace.to_bytes(".npz"))

    return render_report(result, out_dir)


def run_analyze(options: AnalyzeOptions | None = None, **kwargs: Any) -> Path:
    """Analyse and write the report; returns the path of ``report.html``.

    ``run_analyze(model="ckpt", data=["x.py"], neurons=True, out="analysis")`` or with an
    :class:`AnalyzeOptions` (keywords then override its fields).
    """
    if options is not None:
        kwargs = {**asdict(options), **kwargs}
    return write_outputs(analyze(AnalyzeOptions(**kwargs)))
