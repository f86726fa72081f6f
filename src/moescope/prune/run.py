"""The ``moescope prune`` pipeline: options in, pruned checkpoint + :class:`PruneResult` out.

:func:`prune` does, in order:

1. **Load** the model with :func:`moescope.analysis.loading.load_model` (the loader of
   ``moescope analyze``: local directory, hub id in the cache, dtype, device) and refuse
   early, before any data is read, what cannot be pruned
   (:func:`~moescope.prune.surgery.check_prunable`).
2. **Stream** the ``--data`` inputs with analyze's readers
   (:func:`~moescope.analysis.sources.open_data`, :func:`~moescope.analysis.run.iter_batches`,
   memory-bounded rows per forward). Without ``--eval-data`` every ``holdout``-th batch
   is held out for evaluation (up to ``eval_tokens`` tokens) and the others calibrate.
3. **Measure** frequency, router-weight mass and REAP saliency per expert and layer in
   one pass (:func:`~moescope.prune.measure.measure_saliency`).
4. **Trade-off**: the held-out loss (nats per token, and perplexity) of the unpruned model
   and of the model pruned to each keep level by each ordering (REAP saliency, frequency
   and, as the control, the reverse of saliency).
5. **Prune** to ``keep`` experts per layer by ``by``
   (:func:`~moescope.prune.surgery.prune_model`) and ``save_pretrained`` the checkpoint
   (safetensors, the model's own format; the tokenizer is copied) into ``out``; the
   report, ``summary.json`` and the curve go to ``out/moescope-prune/``.

Errors a user can fix raise :class:`~moescope.analysis.errors.AnalyzeError` (one line).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from moescope.analysis.errors import AnalyzeError
from moescope.analysis.loading import load_model, resolve_device
from moescope.analysis.outdir import prepare_out_dir, write_bytes, write_text
from moescope.analysis.run import _model_bytes_per_token, iter_batches, rows_per_forward
from moescope.analysis.sources import open_data
from moescope.prune.measure import (
    default_forward,
    measure_saliency,
    reap_supported,
    router_groups,
)
from moescope.prune.saliency import ORDERINGS, LayerSaliency, keep_count, keep_experts
from moescope.prune.surgery import PruneError, check_prunable, moe_layers, prune_model

__all__ = [
    "ORDERINGS",
    "REPORT_DIR",
    "CurvePoint",
    "PruneOptions",
    "PruneResult",
    "checkpoint_bytes",
    "heldout_loss",
    "keep_levels",
    "prune",
    "tradeoff",
    "unused_keep_count",
    "write_report",
]

_READ_CHUNK = 1 << 20
_MEMORY_BUDGET = 2 << 30
REPORT_DIR = "moescope-prune"


@dataclass
class PruneOptions:
    """Settings of ``moescope prune`` (what its flags set).

    ``keep`` (experts per layer), ``keep_fraction`` (of E) or ``drop_unused`` (remove the
    experts no calibration token was routed to: N = E minus the fewest unused in any
    layer, rounded up to the router's groups; ordered by frequency); ``by``: ``saliency``
    (REAP), ``frequency`` or ``weight`` (router-weight mass). ``data``: calibration inputs;
    ``eval_data``: held-out inputs (default: every ``holdout``-th batch of ``data``).
    ``levels``: keep fractions of the trade-off curve (empty: no curve).
    """

    model: str
    data: list[str]
    out: str
    keep: int | None = None
    keep_fraction: float | None = None
    drop_unused: bool = False
    by: str = "saliency"
    eval_data: list[str] = field(default_factory=list)
    levels: list[float] = field(default_factory=lambda: [0.875, 0.75, 0.625, 0.5, 0.375, 0.25])
    max_tokens: int | None = None
    eval_tokens: int = 16384
    holdout: int = 5
    batch_size: int = 8
    seq_len: int = 256
    neurons: bool = False
    device: str = "auto"
    dtype: str | None = None
    text_field: str | None = None
    trust_remote_code: bool = False
    allow_download: bool = False
    force: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.data = [str(d) for d in ([self.data] if isinstance(self.data, str) else self.data)]
        self.eval_data = [str(d) for d in self.eval_data or []]
        self.model, self.out = str(self.model), str(self.out)
        if (self.keep is not None) + (self.keep_fraction is not None) + self.drop_unused != 1:
            raise AnalyzeError("pass one of --keep N, --keep-fraction F or --drop-unused")
        if self.drop_unused:
            self.by = "frequency"
        if self.by not in ("saliency", "frequency", "weight"):
            raise AnalyzeError(f"--by must be saliency, frequency or weight, got {self.by!r}")
        if not self.data:
            raise AnalyzeError("no data given; pass --data FILE (the tokens that calibrate)")
        for name in ("batch_size", "seq_len", "eval_tokens"):
            if int(getattr(self, name)) < 1:
                raise AnalyzeError(f"--{name.replace('_', '-')} must be >= 1")
        if self.holdout < 2:
            raise AnalyzeError(f"--holdout must be >= 2 (one batch in N), got {self.holdout}")
        if any(not 0.0 < f <= 1.0 for f in self.levels):
            raise AnalyzeError(f"--levels must be fractions in (0, 1], got {self.levels}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise AnalyzeError(f"--out {out} exists and is not a directory; pass a directory")
        if not self.overwrite and out.is_dir() and any(out.iterdir()):
            raise AnalyzeError(
                f"--out {out} is not empty; choose a new or empty directory, or pass --overwrite"
            )

    def settings(self) -> dict[str, Any]:
        """The options as recorded in ``summary.json``."""
        return asdict(self)


@dataclass
class CurvePoint:
    """Held-out loss of the model pruned to ``kept`` experts per layer by ``ordering``
    (``"none"``: the unpruned model). ``loss`` in nats per token; ``perplexity`` =
    exp(loss); ``delta`` = loss - the unpruned loss; ``params`` of the pruned model."""

    ordering: str
    kept: int
    loss: float
    perplexity: float
    delta: float
    params: int


@dataclass
class PruneResult:
    """Every number of one ``moescope prune`` run (``summary.json`` holds it).

    ``eval_source`` says where the trade-off's tokens came from (held out of ``--data``,
    or ``--eval-data``, which may be the calibration data itself, as in the demo)."""

    settings: dict[str, Any]
    source: str
    model_type: str
    num_experts: int
    top_k: int
    num_groups: int
    kept: int
    by: str
    calibration_tokens: int
    eval_tokens: int
    saliency: list[LayerSaliency]
    keep: dict[str, list[int]]
    curve: list[CurvePoint] = field(default_factory=list)
    eval_source: str = ""
    params_before: int = 0
    params_after: int = 0
    removed_bytes: int = 0
    checkpoint_bytes_before: int | None = None
    checkpoint_bytes_after: int | None = None
    config_fields: list[str] = field(default_factory=list)
    out: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["saliency"] = [s.to_dict() for s in self.saliency]
        return d


# --------------------------------------------------------------------------- evaluation


def heldout_loss(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> tuple[float, int]:
    """``(mean next-token cross entropy in nats, predicted tokens)`` of ``model`` over
    ``batches`` ([B, S] ids each; position t predicts t + 1 within a row), summed in
    float64."""
    fwd = forward or default_forward
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for ids in batches:
            if ids.shape[1] < 2:
                continue
            ids = ids.to(device)
            logits = fwd(model, ids).logits
            v = logits.shape[-1]
            ce = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += ce.double().cpu()
            count += ids.shape[0] * (ids.shape[1] - 1)
    return (float(total) / count if count else math.nan), count


def keep_levels(
    num_experts: int, top_k: int, fractions: Sequence[float], num_groups: int = 1
) -> list[int]:
    """Distinct keep counts (descending) for ``fractions`` of E, each valid for the router
    (>= top-k, a multiple of the groups); fractions that round to an invalid count are
    left out."""
    out = set()
    for f in fractions:
        try:
            out.add(keep_count(num_experts, top_k, fraction=f, num_groups=num_groups))
        except ValueError:
            continue
    return sorted(out, reverse=True)


def tradeoff(
    model: nn.Module,
    saliency: Sequence[LayerSaliency],
    levels: Sequence[int],
    batches: Sequence[torch.Tensor],
    orderings: Sequence[str] = ("saliency", "frequency", "reverse"),
    device: torch.device | str | None = None,
) -> list[CurvePoint]:
    """Held-out loss of ``model`` unpruned and pruned to each count in ``levels`` by each
    ordering (orderings needing REAP are skipped when a layer has none). Each pruned
    model is a structural copy (only the kept expert rows are new memory), dropped after
    its evaluation."""
    base, _ = heldout_loss(model, batches, device)
    e = saliency[0].num_experts
    params = sum(p.numel() for p in model.parameters())
    points = [CurvePoint("none", e, base, math.exp(base), 0.0, params)]
    has_reap = all(s.reap is not None for s in saliency)
    for by in orderings:
        if by in ("saliency", "reverse") and not has_reap:
            continue
        for n in levels:
            if n >= e:
                continue
            keep = {s.layer: keep_experts(s, n, by).tolist() for s in saliency}
            pruned, summary = prune_model(model, keep, verify=False)
            loss, _ = heldout_loss(pruned, batches, device)
            points.append(
                CurvePoint(by, n, loss, math.exp(loss), loss - base, summary.params_after)
            )
            del pruned
    return points


def unused_keep_count(saliency: Sequence[LayerSaliency]) -> int:
    """N that removes only experts no token was routed to: E minus the fewest unused
    experts of any layer (the config holds one count), and for a group-limited router
    the most experts used in any group times the groups; at least top-k."""
    e, k = saliency[0].num_experts, saliency[0].top_k
    n = k
    for s in saliency:
        g = max(1, s.num_groups)
        used = (s.frequency > 0).reshape(g, e // g).sum(axis=1)
        n = max(n, int(used.max()) * g)
    return min(e, n)


def checkpoint_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of a checkpoint directory's weight files (``*.safetensors``, ``*.bin``);
    None when it has none."""
    p = Path(path)
    if not p.is_dir():
        return None
    files = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()]
    return sum(f.stat().st_size for f in files) if files else None


# --------------------------------------------------------------------------- pipeline


def _label(spec: str) -> str:
    return "stdin" if spec == "-" else Path(spec).stem


def _batches(
    specs: Sequence[str], loaded: Any, opts: PruneOptions, rows: int, max_tokens: int | None
) -> Iterator[torch.Tensor]:
    field_ = opts.text_field or "text"
    for spec in specs:
        src = open_data(spec, text_field=field_, tokenizer=loaded.tokenizer, label=_label(spec))
        yield from iter_batches(src.token_chunks(_READ_CHUNK), rows, opts.seq_len, max_tokens)


class _Split:
    """Calibration batches out of a stream, every ``holdout``-th one (up to
    ``eval_tokens``) kept aside for evaluation."""

    def __init__(self, stream: Iterator[torch.Tensor], holdout: int, eval_tokens: int) -> None:
        self.stream, self.holdout, self.limit = stream, holdout, eval_tokens
        self.held: list[torch.Tensor] = []
        self.held_tokens = 0
        self.calibration_tokens = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, ids in enumerate(self.stream):
            if i % self.holdout == self.holdout - 1 and self.held_tokens < self.limit:
                self.held.append(ids)
                self.held_tokens += ids.numel()
                continue
            self.calibration_tokens += ids.numel()
            yield ids


def prune(options: PruneOptions, *, should_stop: Callable[[], bool] | None = None) -> PruneResult:
    """Run the pipeline of the module docstring; writes the checkpoint and the report."""
    t0 = time.perf_counter()
    opts = options
    field_ = opts.text_field or "text"
    for d in [*opts.data, *opts.eval_data]:
        if d != "-":
            open_data(d, text_field=field_, label=_label(d))  # bad input fails before loading
    device = resolve_device(opts.device)
    loaded = load_model(
        opts.model,
        dtype=opts.dtype or "auto",
        device=device,
        allow_download=opts.allow_download,
        force=opts.force,
        trust_remote_code=opts.trust_remote_code,
    )
    if loaded.random_weights:
        raise AnalyzeError(
            f"--model {opts.model} has no weights (a config only); prune a trained checkpoint"
        )
    model = loaded.model
    infos = moe_layers(model)
    if not infos:
        raise AnalyzeError(f"{opts.model} has no MoE layer moescope recognises; nothing to prune")
    e, k, g = infos[0].num_experts, infos[0].top_k, router_groups(infos[0])
    try:
        if opts.drop_unused:
            n = e
        else:
            n = keep_count(e, k, keep=opts.keep, fraction=opts.keep_fraction, num_groups=g)
        check_prunable(model, n, infos)
    except (ValueError, PruneError) as err:
        raise AnalyzeError(str(err)) from None
    if opts.by == "saliency" and not all(reap_supported(i) for i in infos):
        raise AnalyzeError(
            "REAP saliency needs the experts' outputs, which moescope cannot capture for "
            f"{type(model).__name__} ({infos[0].adapter} layers); pass --by frequency"
        )
    per_token = _model_bytes_per_token(model, opts.seq_len, SimpleNamespace(layers=infos))
    rows = rows_per_forward(opts.batch_size, opts.seq_len, per_token, _MEMORY_BUDGET)
    dev = loaded.device
    if opts.eval_data:
        calib: Any = _batches(opts.data, loaded, opts, rows, opts.max_tokens)
        held = list(_batches(opts.eval_data, loaded, opts, rows, opts.eval_tokens))
        split = None
    else:
        split = _Split(
            _batches(opts.data, loaded, opts, rows, opts.max_tokens), opts.holdout, opts.eval_tokens
        )
        calib, held = split, split.held
    try:
        saliency = measure_saliency(
            model, calib, neurons=opts.neurons, device=dev, should_stop=should_stop
        )
    except ValueError as err:
        raise AnalyzeError(str(err)) from None
    notes: list[str] = []
    tokens = saliency[0].tokens
    if tokens == 0:
        raise AnalyzeError("--data gave no calibration token; pass more text")
    if opts.drop_unused:
        n = unused_keep_count(saliency)
        if n == e:
            notes.append("every layer used all its experts on the data: nothing was removed")
    try:
        check_prunable(model, n, infos)
    except PruneError as err:
        raise AnalyzeError(str(err)) from None
    eval_count = sum(int(b.numel()) for b in held)
    if not held:
        notes.append("no held-out tokens (the data is too short): no trade-off curve")
    keep = {s.layer: keep_experts(s, n, opts.by).tolist() for s in saliency}
    curve: list[CurvePoint] = []
    if held and opts.levels:
        levels = sorted(set(keep_levels(e, k, opts.levels, g)) | {n}, reverse=True)
        curve = tradeoff(model, saliency, levels, held, device=dev)
    pruned, summary = prune_model(model, keep)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    save = getattr(pruned, "save_pretrained", None)
    if save is None:
        raise AnalyzeError(f"{type(pruned).__name__} has no save_pretrained; cannot write it")
    save(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    unused = [int(s.unused.size) for s in saliency]
    if sum(unused):
        notes.append(
            f"{sum(unused)} of {e * len(saliency)} experts were never routed on the "
            f"calibration data (per layer: {unused})"
        )
    result = PruneResult(
        settings=opts.settings(),
        source=loaded.source,
        model_type=loaded.model_type,
        num_experts=e,
        top_k=k,
        num_groups=g,
        kept=n,
        by=opts.by,
        calibration_tokens=split.calibration_tokens if split is not None else tokens,
        eval_tokens=eval_count,
        saliency=saliency,
        eval_source=(
            "--eval-data " + ", ".join(opts.eval_data)
            if opts.eval_data
            else f"held out of --data: every {opts.holdout}th batch"
        ),
        keep=summary.keep,
        curve=curve,
        params_before=summary.params_before,
        params_after=summary.params_after,
        removed_bytes=summary.removed_bytes,
        checkpoint_bytes_before=checkpoint_bytes(loaded.path),
        checkpoint_bytes_after=checkpoint_bytes(out),
        config_fields=summary.config_fields,
        out=str(out),
        notes=notes,
    )
    result.seconds = time.perf_counter() - t0
    write_report(result)
    return result


def write_report(result: PruneResult) -> Path:
    """``summary.json``, the curve PNG and ``report.html`` into ``<out>/moescope-prune/``;
    returns the report's path."""
    import json

    from moescope._json import json_safe
    from moescope.report.prune_report import render_prune_report

    report_dir = prepare_out_dir(Path(result.out) / REPORT_DIR, overwrite=True)
    write_text(report_dir, "summary.json", json.dumps(json_safe(result.to_dict()), indent=2))
    return render_prune_report(result, report_dir, write_bytes=write_bytes, write_text=write_text)
