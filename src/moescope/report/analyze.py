"""``moescope analyze``: stream text through an MoE model, monitor it, write a report.

Pipeline (:func:`analyze`, then :func:`write_outputs`; :func:`run_analyze` does both):

1. **Load** (:func:`load_model`): a transformers model directory (``config.json`` +
   safetensors / ``.bin`` weights, loaded with ``local_files_only=True`` and
   ``trust_remote_code`` off unless asked), a directory or file holding only a
   ``config.json`` (random weights, labelled so everywhere), or a saved ``TinyMoELM``
   (its ``moescope_tiny_moe`` type is registered by importing :mod:`moescope.nn.hf`).
   The hub is never contacted (``HF_HUB_OFFLINE=1``). Tokenizer: the directory's own
   when it has one, else bytes (ids 0-255, as TinyMoELM; needs ``vocab_size >= 256``).
2. **Stream** (:func:`iter_token_chunks`, :func:`iter_batches`): each ``--data`` file is
   read incrementally (1 MiB at a time), cut into rows of ``seq_len`` consecutive tokens
   and batches of ``batch_size`` rows; at the end of a file the remaining full rows form
   one smaller batch and the last partial row a ``[1, r]`` batch. Memory is bounded by a
   batch plus a read chunk, however long the file. ``max_tokens`` caps each file.
3. **Monitor**: :class:`~moescope.monitor.MoEMonitor` (co-activation, alerts, neurons with
   ``neurons=True``) and, for the token-level analyses, a
   :class:`~moescope.report.routing_record.RoutingRecorder` (first ``record_tokens`` tokens
   of each file). Under ``torchrun`` rank r runs batches r, r + W, r + 2W, ... and the
   snapshot all-reduces the sums; only rank 0 writes (token-level analyses use rank 0's
   share of the data).
4. **Write** (:func:`write_outputs`): ``summary.json``, one PNG per figure and
   ``report.html`` (a single self-contained file, :mod:`moescope.report.html`).

Errors a user can fix raise :class:`AnalyzeError` with one line saying what is wrong and
what to do (the CLI prints it and exits with status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "AnalysisResult",
    "AnalyzeError",
    "AnalyzeOptions",
    "LoadedModel",
    "analyze",
    "iter_batches",
    "iter_token_chunks",
    "load_model",
    "parse_threshold",
    "run_analyze",
    "write_outputs",
]

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
    "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
)  # fmt: skip
_READ_CHUNK = 1 << 20  # bytes per read: bounds memory whatever the file size


class AnalyzeError(ValueError):
    """Bad input to ``moescope analyze``; the message says what is wrong and what to do."""


@dataclass
class AnalyzeOptions:
    """Settings of one analysis (the CLI flags of ``moescope analyze``).

    ``data``: text files (one domain each, label = file stem). ``threshold``: neuron
    threshold spec (:func:`parse_threshold`). ``coact_layer`` / ``token_layer``: layer
    index or module path (None: first / middle MoE layer). ``record_tokens``: tokens per
    file kept for the token-level analyses. ``device``: "auto" (CUDA when available),
    "cpu", "cuda", "cuda:1" ...
    """

    model: str
    data: list[str]
    out: str = "moescope-analysis"
    neurons: bool = False
    threshold: str | None = None
    max_tokens: int | None = None
    batch_size: int = 8
    seq_len: int = 256
    embeddings: str = "both"
    coact_layer: str | None = None
    token_layer: str | None = None
    compare: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"
    seed: int = 0
    record_tokens: int = 20000
    progress: bool = True

    @classmethod
    def from_any(cls, args: Any = None, **kwargs: Any) -> AnalyzeOptions:
        """Build from an ``argparse.Namespace``, a mapping, an AnalyzeOptions and/or
        keyword arguments (keywords win). Unknown names are ignored for namespaces."""
        values: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        if isinstance(args, AnalyzeOptions):
            values.update({n: getattr(args, n) for n in names})
        elif isinstance(args, Mapping):
            values.update({k: v for k, v in args.items() if k in names})
        elif args is not None:
            values.update({n: getattr(args, n) for n in names if hasattr(args, n)})
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown analyze option(s) {unknown}; known: {sorted(names)}")
        values.update(kwargs)
        if "model" not in values or values["model"] is None:
            raise AnalyzeError("no model given; pass --model DIR_OR_CONFIG")
        data = values.get("data")
        if data is None or (isinstance(data, (list, tuple)) and not data):
            raise AnalyzeError("no data given; pass --data FILE (a text file; repeat for domains)")
        if isinstance(data, (str, os.PathLike)):
            data = [data]
        values["data"] = [str(d) for d in data]
        values["model"] = str(values["model"])
        values["out"] = str(values.get("out", cls.out))
        if values.get("compare") is not None:
            values["compare"] = str(values["compare"])
        opts = cls(**values)
        opts.validate()
        return opts

    def validate(self) -> None:
        """Range checks with one-line messages."""
        for name in ("batch_size", "seq_len", "record_tokens"):
            if int(getattr(self, name)) < 1:
                raise AnalyzeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise AnalyzeError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.embeddings not in ("both", "head", "none"):
            raise AnalyzeError(f"--embeddings must be both, head or none, got {self.embeddings!r}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise AnalyzeError(f"--out {out} exists and is not a directory; pass a directory")
        labels = [Path(d).stem for d in self.data]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise AnalyzeError(
                f"several --data files share the label {dup[0]!r} (labels are file stems); "
                "rename or copy one of them"
            )
        parse_threshold(self.threshold)


def parse_threshold(spec: str | float | None) -> tuple[Any | None, float | None]:
    """``(NeuronThreshold | None, calibration target | None)`` from a threshold spec.

    Specs: ``None`` (the monitor's default, magnitude 0.1), a number (absolute tau),
    ``absolute:TAU``, ``magnitude:ALPHA``, ``relative:P``, ``calibrated:SPARSITY`` (tau per
    layer from the first batch so that SPARSITY of |h| lies below it; CATS / TEAL).
    """
    from moescope.stats.neurons import NeuronThreshold

    if spec is None or spec == "":
        return None, None
    if isinstance(spec, (int, float)):
        return NeuronThreshold.absolute(float(spec)), None
    text = str(spec).strip()
    mode, _, value = text.partition(":")
    usage = (
        "use a number (absolute tau) or absolute:TAU, magnitude:ALPHA, relative:P, "
        "calibrated:SPARSITY, e.g. --threshold magnitude:0.1"
    )
    if not _:
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


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model ready to analyse and how it was obtained.

    ``tokenizer`` is a transformers tokenizer or None (bytes); ``random_weights`` is True
    when the weights were initialised from a config rather than loaded.
    """

    model: torch.nn.Module
    tokenizer: Any | None
    source: str
    random_weights: bool
    model_type: str
    vocab_size: int | None
    description: str

    @property
    def tokenizer_name(self) -> str:
        if self.tokenizer is None:
            return "bytes (ids 0-255)"
        return type(self.tokenizer).__name__

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_token(self, token_id: int) -> str:
        """Readable text of one token id (bytes: the character, escaped when not printable)."""
        if token_id < 0:
            return "?"
        if self.tokenizer is None:
            if token_id > 255:
                return f"<{token_id}>"
            ch = chr(token_id)
            if ch.isprintable() and token_id < 128:
                return ch
            return {10: "\\n", 9: "\\t", 13: "\\r", 32: "␣"}.get(token_id, f"\\x{token_id:02x}")
        try:
            return str(self.tokenizer.decode([int(token_id)]))
        except Exception:  # a tokenizer may reject ids outside its vocabulary
            return f"<{token_id}>"


def _offline() -> None:
    # Analysis must never reach the network: local files only (also passed explicitly).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def _transformers() -> Any:
    from moescope._optional import require

    tr = require("transformers", "hf")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bar is the one progress display
    import moescope.nn.hf  # noqa: F401  registers moescope_tiny_moe with the Auto classes

    return tr


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnalyzeError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno}); pass a valid config.json"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise AnalyzeError(f"{path}: cannot read the file ({err}); check the path and permissions") from None
    if not isinstance(data, dict):
        raise AnalyzeError(f"{path}: expected a JSON object (a config.json), got {type(data).__name__}")
    return data


def _check_model_type(data: dict[str, Any], where: Path, trust_remote_code: bool) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise AnalyzeError(
            f"{where} has no 'model_type'; pass a transformers config.json (it names the "
            "architecture, e.g. \"model_type\": \"mixtral\")"
        )
    if model_type in CONFIG_MAPPING:
        return model_type
    if trust_remote_code and data.get("auto_map"):
        return model_type
    import transformers

    hint = (
        "the checkpoint ships its own modelling code: review it, then pass --trust-remote-code"
        if data.get("auto_map")
        else "check the spelling, or upgrade transformers"
    )
    raise AnalyzeError(
        f"unknown architecture: model_type {model_type!r} in {where} is not known to "
        f"transformers {transformers.__version__}; {hint}"
    )


def _has_weights(d: Path) -> bool:
    return any(any(d.glob(p)) for p in _WEIGHT_PATTERNS)


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in _TOKENIZER_FILES)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AnalyzeError(f"bad --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def load_model(
    source: str | os.PathLike[str],
    *,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load a model for analysis (see the module docstring), in eval mode on ``device``.

    Raises:
        AnalyzeError: missing path, no config.json, unknown architecture, a checkpoint
            that transformers cannot load.
    """
    _offline()
    path = Path(source)
    if not path.exists():
        raise AnalyzeError(
            f"--model {path}: no such file or directory; pass a model directory "
            "(config.json + safetensors weights) or a config.json"
        )
    tr = _transformers()
    dev = device if isinstance(device, torch.device) else _resolve_device(device)
    config_path = path / "config.json" if path.is_dir() else path
    if path.is_dir() and not config_path.is_file():
        raise AnalyzeError(
            f"--model {path} is a directory without config.json; pass a transformers model "
            "directory (save_pretrained output) or a config.json file"
        )
    data = _read_config_json(config_path)
    model_type = _check_model_type(data, config_path, trust_remote_code)
    tokenizer = None
    if path.is_dir() and _has_weights(path):
        try:
            model = tr.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code
            )
        except Exception as err:  # transformers raises many types for a bad checkpoint
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise AnalyzeError(
                f"transformers could not load the checkpoint in {path} ({type(err).__name__}: "
                f"{msg}); check that it is a complete causal-LM save_pretrained directory"
            ) from None
        random_weights = False
        description = f"weights loaded from {path}"
    else:
        config = _config_from_dict(tr, data, config_path, trust_remote_code)
        torch.manual_seed(seed)
        model = _model_from_config(tr, config, trust_remote_code)
        random_weights = True
        description = (
            f"RANDOM WEIGHTS (seed {seed}) built from {config_path}: routing statistics "
            "describe an untrained model"
        )
    if path.is_dir() and _has_tokenizer(path):
        try:
            tokenizer = tr.AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code
            )
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise AnalyzeError(
                f"cannot load the tokenizer in {path} ({msg}); fix or remove its tokenizer "
                "files (without them, bytes 0-255 are used)"
            ) from None
    config = getattr(model, "config", None)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_cfg, "vocab_size", None)
    if tokenizer is None and (vocab is None or int(vocab) < 256):
        raise AnalyzeError(
            f"{path} has no tokenizer and a vocabulary of {vocab} ids, too small for bytes "
            "(0-255); save a tokenizer next to the model (tokenizer.save_pretrained(DIR)) "
            "or use a model with vocab_size >= 256"
        )
    model.to(dev).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=str(path),
        random_weights=random_weights,
        model_type=model_type,
        vocab_size=None if vocab is None else int(vocab),
        description=description,
    )


def _config_from_dict(tr: Any, data: dict[str, Any], where: Path, trust_remote_code: bool) -> Any:
    fields_ = {k: v for k, v in data.items() if k != "model_type"}
    try:
        if trust_remote_code and data.get("auto_map"):
            return tr.AutoConfig.from_pretrained(
                str(where.parent), local_files_only=True, trust_remote_code=True
            )
        return tr.AutoConfig.for_model(data["model_type"], **fields_)
    except Exception as err:
        raise AnalyzeError(f"invalid {data['model_type']} config in {where}: {err}") from None


def _model_from_config(tr: Any, config: Any, trust_remote_code: bool) -> torch.nn.Module:
    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModel"):
        cls = getattr(tr, auto)
        try:
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError as err:  # this auto class does not map the config
            errors.append(str(err).splitlines()[0])
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else ""
            raise AnalyzeError(
                f"transformers could not build {config.model_type} from its config "
                f"({type(err).__name__}: {msg}); check the config's fields"
            ) from None
    raise AnalyzeError(
        f"transformers has no model class for model_type {config.model_type!r} "
        f"({errors[-1] if errors else ''}); pass a causal LM"
    )


# --------------------------------------------------------------------------- data


def _check_data_file(path: Path) -> None:
    if not path.exists():
        raise AnalyzeError(f"--data {path}: no such file; pass a readable text file")
    if path.is_dir():
        raise AnalyzeError(f"--data {path} is a directory; pass a text file")
    try:
        with path.open("rb") as fh:
            first = fh.read(1)
    except OSError as err:
        raise AnalyzeError(f"--data {path}: cannot read it ({err.strerror}); check permissions") from None
    if not first:
        raise AnalyzeError(f"--data {path} is empty; pass a file with some text")


def iter_token_chunks(
    path: str | os.PathLike[str], tokenizer: Any | None = None, chunk_bytes: int = _READ_CHUNK
) -> Iterator[torch.Tensor]:
    """Yield [n] int64 token ids of ``path``, read ``chunk_bytes`` at a time.

    Bytes (``tokenizer=None``): the file's bytes as ids 0-255, exactly. With a tokenizer the
    file is decoded as UTF-8 (undecodable bytes replaced) and each chunk is cut after its
    last newline (else its last space) so that few tokens straddle a cut; special tokens
    are not added.
    """
    p = Path(path)
    if tokenizer is None:
        with p.open("rb") as fh:
            while True:
                block = fh.read(chunk_bytes)
                if not block:
                    return
                yield torch.frombuffer(bytearray(block), dtype=torch.uint8).to(torch.int64)
    with p.open("r", encoding="utf-8", errors="replace", newline="") as fh:
        carry = ""
        while True:
            block = fh.read(chunk_bytes)
            text = carry + block
            if not block:
                if text:
                    yield _encode(tokenizer, text)
                return
            cut = text.rfind("\n")
            if cut < 0:
                cut = text.rfind(" ")
            if cut < 0:
                cut = len(text) - 1
            carry = text[cut + 1 :]
            if cut >= 0:
                ids = _encode(tokenizer, text[: cut + 1])
                if ids.numel():
                    yield ids


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)


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


# --------------------------------------------------------------------------- analysis


@dataclass
class DomainInfo:
    """One ``--data`` file: its label (file stem), tokens and batches it gave."""

    label: str
    path: str
    tokens: int = 0
    batches: int = 0
    bytes: int = 0


@dataclass
class AnalysisResult:
    """Everything :func:`write_outputs` needs (rank 0's view after the reduction)."""

    options: AnalyzeOptions
    loaded: LoadedModel
    snapshot: Any
    alerts: list[Any]
    domains: list[DomainInfo]
    threshold_label: str | None
    params: Any | None = None
    flops: Any | None = None
    measured: Any | None = None
    cost_error: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)
    compare_routing: Any | None = None
    compare_source: str | None = None
    world_size: int = 1
    rank: int = 0
    coact_layer: str = ""
    token_layer: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    routing_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return int(self.snapshot.total_tokens)


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
        raise AnalyzeError(f"{flag} {i} is out of range: the model has {len(layers)} MoE layers (0-{len(layers) - 1})")
    return layers[i]


def _make_monitor(loaded: LoadedModel, opts: AnalyzeOptions, threshold: Any) -> Any:
    from moescope.alerts import AlertRules
    from moescope.errors import UnsupportedModelError
    from moescope.monitor import MoEMonitor

    try:
        return MoEMonitor(
            loaded.model,
            history=0,
            coactivation=True,
            alert_rules=AlertRules(),
            neurons=opts.neurons,
            neuron_threshold=threshold,
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


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask, use_cache=False)


def _progress(total: int | None, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return _NoBar()
    return tqdm(total=total, unit="tok", unit_scale=True, file=sys.stderr, disable=not enabled,
                desc="moescope analyze", dynamic_ncols=True, mininterval=0.5)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def analyze(options: AnalyzeOptions) -> AnalysisResult:
    """Run the pipeline of the module docstring up to the reduced statistics."""
    t0 = time.perf_counter()
    opts = options
    threshold, calib_target = parse_threshold(opts.threshold)
    if (threshold is not None or calib_target is not None) and not opts.neurons:
        raise AnalyzeError("--threshold applies to neuron statistics; add --neurons")
    data_paths = [Path(d) for d in opts.data]
    for p in data_paths:
        _check_data_file(p)
    device = _resolve_device(opts.device)
    rank, world, owns_group = _dist_setup(device)
    finished = False
    try:
        loaded = load_model(opts.model, trust_remote_code=opts.trust_remote_code,
                            device=device, seed=opts.seed)
        monitor = _make_monitor(loaded, opts, threshold)
        layers = [info.path for info in monitor.layers]
        coact = _layer_choice(opts.coact_layer, layers, 0, "--coact-layer")
        token_layer = _layer_choice(opts.token_layer, layers, len(layers) // 2, "--token-layer")
        recorder = _make_recorder(loaded.model, opts.record_tokens, monitor)
        domains = [DomainInfo(label=p.stem, path=str(p), bytes=p.stat().st_size) for p in data_paths]
        total = None
        if loaded.tokenizer is None:
            sizes = [min(d.bytes, opts.max_tokens or d.bytes) for d in domains]
            total = int(sum(sizes))
        bar = _progress(total, opts.progress and rank == 0)
        batch_index = 0
        calibrated = calib_target is None
        try:
            with torch.no_grad():
                for dom in domains:
                    batches = iter_batches(
                        iter_token_chunks(dom.path, loaded.tokenizer),
                        opts.batch_size, opts.seq_len, opts.max_tokens,
                    )
                    ctx = recorder.source(dom.label) if recorder is not None else _null()
                    with ctx:
                        for ids in batches:
                            n = ids.numel()
                            dom.tokens += n
                            dom.batches += 1
                            if not calibrated:
                                # Every rank calibrates on the same first batch (equal taus);
                                # the recorder must not see this extra forward.
                                if recorder is not None:
                                    recorder.detach()
                                with monitor.calibration():
                                    _forward(loaded.model, ids.to(device))
                                monitor.set_neuron_threshold(calibrated=calib_target)
                                calibrated = True
                                if recorder is not None:
                                    recorder.attach()
                            mine = batch_index % world == rank
                            batch_index += 1
                            bar.update(n)
                            if mine:
                                _forward(loaded.model, ids.to(device))
                    if not dom.tokens:
                        raise AnalyzeError(
                            f"--data {dom.path} gave no token (the tokenizer produced nothing); "
                            "pass a file with text"
                        )
        finally:
            bar.close()
            if recorder is not None:
                recorder.detach()
        snapshot = monitor.snapshot()
        monitor.detach()
        result = AnalysisResult(
            options=opts,
            loaded=loaded,
            snapshot=snapshot,
            alerts=list(monitor.last_alerts),
            domains=domains,
            threshold_label=(snapshot.layers[layers[0]].neuron_threshold if opts.neurons else None),
            world_size=world,
            rank=rank,
            coact_layer=coact,
            token_layer=token_layer,
        )
        result.routing = _recorded(recorder, domains)
        if world > 1 and result.routing:
            result.notes.append(
                f"token-level analyses use rank 0's share of the data (every {world}th batch)"
            )
        _cost(result)
        if opts.compare and world > 1:
            result.notes.append(
                "--compare is skipped under torchrun (router agreement needs the same tokens "
                "recorded by both models); run it in a single process"
            )
        elif opts.compare:
            _compare(result, device)
        result.seconds = time.perf_counter() - t0
        finished = True
        return result
    finally:
        if owns_group:
            import torch.distributed as dist

            if finished:  # a rank that failed must not wait for the others here
                dist.barrier()
            dist.destroy_process_group()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _make_recorder(model: torch.nn.Module, max_tokens: int, monitor: Any) -> Any | None:
    try:
        from moescope.report.routing_record import RoutingRecorder
    except ImportError:  # pragma: no cover - shipped with the package
        return None
    # A consumer of the monitor's pipeline: every MoE layer is hooked once, for both.
    rec = RoutingRecorder(model, max_tokens=max_tokens, monitor=monitor)
    rec.attach()
    return rec


def _recorded(recorder: Any | None, domains: Sequence[DomainInfo]) -> dict[str, Any]:
    if recorder is None:
        return {}
    return {d.label: recorder.result(d.label) for d in domains if recorder.num_recorded(d.label)}


def _cost(result: AnalysisResult) -> None:
    from moescope.cost.flops import flops_from_anatomy
    from moescope.cost.measured import _hidden_size, measured_cost_from_reports
    from moescope.cost.params import analyze_model, report_from_anatomy

    opts = result.options
    try:
        anatomy = analyze_model(result.loaded.model)
        result.params = report_from_anatomy(anatomy, opts.embeddings)
        result.flops = flops_from_anatomy(anatomy, opts.seq_len, opts.embeddings, "causal")
        result.measured = measured_cost_from_reports(
            result.snapshot, result.params, result.flops, _hidden_size(result.loaded.model)
        )
    except Exception as err:  # cost accounting is a section of the report, not its purpose
        result.cost_error = f"{type(err).__name__}: {err}"


def _compare(result: AnalysisResult, device: torch.device) -> None:
    """Route the first ``record_tokens`` tokens of the first data file through the
    ``--compare`` model too (same batches) for the router-agreement section."""
    from moescope.report.routing_record import RoutingRecorder

    opts = result.options
    other = load_model(opts.compare or "", trust_remote_code=opts.trust_remote_code,
                       device=device, seed=opts.seed)
    if (other.tokenizer is None) != (result.loaded.tokenizer is None):
        raise AnalyzeError(
            f"--compare {opts.compare} tokenizes differently from --model (one uses bytes, "
            "the other a tokenizer); compare checkpoints of the same model"
        )
    try:
        rec = RoutingRecorder(other.model, max_tokens=opts.record_tokens)
    except Exception as err:
        raise AnalyzeError(f"--compare {opts.compare}: {err}") from None
    first = result.domains[0]
    # Same batching as the main pass: routing depends on each token's context.
    with rec, torch.no_grad():
        for ids in iter_batches(iter_token_chunks(first.path, other.tokenizer),
                                opts.batch_size, opts.seq_len, opts.max_tokens):
            if rec.full:
                break
            _forward(other.model, ids.to(device))
    result.compare_routing = rec.result()
    result.compare_source = other.source
    if other.random_weights:
        result.notes.append(f"--compare {other.source} has RANDOM WEIGHTS")


# --------------------------------------------------------------------------- outputs


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        return _clean(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def summary_dict(result: AnalysisResult, figures: Mapping[str, str]) -> dict[str, Any]:
    """The content of ``summary.json`` (strict JSON: NaN as null)."""
    opts = result.options
    snap = result.snapshot
    loaded = result.loaded
    out: dict[str, Any] = {
        "format": "moescope.analysis/1",
        "model": {
            "source": loaded.source,
            "model_type": loaded.model_type,
            "class": type(loaded.model).__name__,
            "random_weights": loaded.random_weights,
            "description": loaded.description,
            "tokenizer": loaded.tokenizer_name,
            "vocab_size": loaded.vocab_size,
        },
        "settings": {
            "batch_size": opts.batch_size,
            "seq_len": opts.seq_len,
            "max_tokens": opts.max_tokens,
            "neurons": opts.neurons,
            "threshold": result.threshold_label,
            "embeddings": opts.embeddings,
            "world_size": result.world_size,
            "device": str(_param_device(loaded.model)),
        },
        "data": [d.__dict__ for d in result.domains],
        "total_tokens": snap.total_tokens,
        "aggregates": snap.aggregates(),
        "layers": {name: s.to_json_dict() for name, s in snap.layers.items()},
        "alerts": [
            {"level": a.level, "layer": a.layer, "rule": a.rule, "value": a.value,
             "message": a.message}
            for a in result.alerts
        ],
        "figures": dict(figures),
        "seconds": result.seconds,
        "notes": list(result.notes),
    }
    if result.params is not None:
        out["params"] = result.params.to_dict()
    if result.flops is not None:
        out["flops"] = {k: v for k, v in result.flops.to_dict().items() if k != "attention_layers"}
    if result.measured is not None:
        out["measured"] = result.measured.to_dict()
    if result.cost_error:
        out["cost_error"] = result.cost_error
    if result.routing_summary:
        out["routing_analysis"] = result.routing_summary
    return _clean(out)


def _param_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def write_outputs(result: AnalysisResult, out: str | os.PathLike[str] | None = None) -> Path:
    """Write the PNGs, ``summary.json`` and ``report.html`` into ``out`` (default:
    ``options.out``); returns the path of ``report.html``. Only rank 0 writes."""
    out_dir = Path(out if out is not None else result.options.out)
    report = out_dir / "report.html"
    if result.rank != 0:
        return report
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        figures, document = build_report(result, out_dir)
        summary = summary_dict(result, {k: Path(v).name for k, v in figures.items()})
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        report.write_text(document, encoding="utf-8")
    except OSError as err:
        raise AnalyzeError(
            f"cannot write the report into --out {out_dir} ({err.strerror or err}); "
            "choose a writable directory"
        ) from None
    return report


def run_analyze(args: Any = None, **kwargs: Any) -> Path:
    """Analyse and write the report; returns the path of ``report.html``.

    ``args``: an ``argparse.Namespace`` (the CLI's), a mapping or an
    :class:`AnalyzeOptions`; keyword arguments override it, e.g.
    ``run_analyze(model="ckpt", data=["x.py"], neurons=True, out="analysis")``.
    """
    opts = AnalyzeOptions.from_any(args, **kwargs)
    return write_outputs(analyze(opts))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``moescope analyze`` flags (also usable by other front ends)."""
    p.add_argument("--model", required=True, metavar="DIR_OR_CONFIG",
                   help="transformers model directory (config.json + safetensors), a saved "
                   "TinyMoELM, or a config.json (random weights, labelled so)")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="text file to stream through the model; repeat for several domains "
                   "(label = file stem)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--neurons", action="store_true",
                   help="also count activated neurons inside the chosen experts")
    p.add_argument("--threshold", default=None, metavar="SPEC",
                   help="neuron threshold: TAU, absolute:TAU, magnitude:ALPHA (default 0.1), "
                   "relative:P or calibrated:SPARSITY (needs --neurons)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="stop after N tokens of each data file")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per forward (default 8)")
    p.add_argument("--seq-len", type=int, default=256, metavar="S",
                   help="tokens per row (default 256; also the context of the FLOP count)")
    p.add_argument("--embeddings", choices=("both", "head", "none"), default="both",
                   help="which embedding matrices count as active parameters (default both)")
    p.add_argument("--coact-layer", default=None, metavar="LAYER",
                   help="layer index or path for the co-activation plot (default: first)")
    p.add_argument("--token-layer", default=None, metavar="LAYER",
                   help="layer index or path for the coloured tokens (default: middle)")
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="a second checkpoint: router agreement with --model on the first data file")
    p.add_argument("--record-tokens", type=int, default=20000, metavar="N",
                   help="tokens per data file kept for the token-level analyses (default 20000)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own modelling code (review it first)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights from a config")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")



# --------------------------------------------------------------------------- report


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    v = float(x)
    if not math.isfinite(v):
        return "-"
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def _fig_saver(out_dir: Path, figures: dict[str, Path], errors: list[str]) -> Any:
    from moescope.report.plots import save_png

    def save(name: str, make: Any) -> Path | None:
        try:
            fig = make()
        except Exception as err:  # one failing figure must not lose the whole report
            errors.append(f"figure {name}: {type(err).__name__}: {err}")
            return None
        path = save_png(fig, out_dir / f"{name}.png")
        figures[name] = path
        return path

    return save


def build_report(result: AnalysisResult, out_dir: Path) -> tuple[dict[str, Path], str]:
    """Save every figure as ``out_dir/<name>.png`` and return ``({name: path}, html)``."""
    from moescope.report import analysis_plots as AP
    from moescope.report import html as H
    from moescope.report.plots import usage_heatmap

    snap = result.snapshot
    opts = result.options
    loaded = result.loaded
    figures: dict[str, Path] = {}
    errors: list[str] = []
    save = _fig_saver(out_dir, figures, errors)
    sections: list[H.Section] = []

    # Overview ------------------------------------------------------------------
    ov = H.Section("overview", "Overview")
    ov.add(H.key_values([
        ("model", loaded.source),
        ("architecture", f"{loaded.model_type} ({type(loaded.model).__name__})"),
        ("weights", "random weights (untrained)" if loaded.random_weights else "loaded from checkpoint"),
        ("tokenizer", loaded.tokenizer_name),
        ("MoE layers", f"{len(snap.layers)} (experts per layer: "
                       f"{sorted({s.num_experts for s in snap.layers.values()})}, top-k: "
                       f"{sorted({s.top_k for s in snap.layers.values()})})"),
        ("tokens analysed", f"{snap.total_tokens:,}"),
        ("batching", f"{opts.batch_size} rows x {opts.seq_len} tokens"
                     + (f", at most {opts.max_tokens:,} tokens per file" if opts.max_tokens else "")),
        ("processes", str(result.world_size)),
        ("neurons", result.threshold_label or "not tracked (add --neurons)"),
        ("time", f"{result.seconds:.1f} s"),
    ]))
    ov.add("<h3>Data</h3>", H.table(
        ["label", "file", "tokens", "batches"],
        [[d.label, d.path, _fmt(d.tokens), _fmt(d.batches)] for d in result.domains],
        left=2,
    ))
    agg = snap.aggregates()
    ov.add("<h3>Model-level aggregates</h3>", H.table(
        ["metric", "value"],
        [[k, _fmt(int(v) if k.startswith("total_") and float(v).is_integer() else v, 4)]
         for k, v in agg.items()]))
    sections.append(ov)

    # Alerts --------------------------------------------------------------------
    al = H.Section("alerts", f"Alerts ({len(result.alerts)})")
    if result.alerts:
        al.add(H.table(
            ["level", "layer", "rule", "value", "message"],
            [[f'<span class="alert-{H.escape(a.level)}">{H.escape(a.level)}</span>', a.layer,
              a.rule, _fmt(a.value, 4), a.message] for a in result.alerts],
            left=3, raw_columns=[0],
        ))
    else:
        al.add(H.paragraph("No alert fired (imbalance > 4x mean, >= 25 % experts unused, "
                           "routing entropy < 0.1 nats, dropped slots > 10 %, non-finite scores)."))
    sections.append(al)

    # Usage -----------------------------------------------------------------------
    us = H.Section("usage", "Expert usage")
    if save("usage_heatmap", lambda: usage_heatmap(snap, value="load",
                                                   title="Expert load per layer (1 = uniform)")):
        us.add(H.image(figures["usage_heatmap"], "layer x expert usage heatmap",
                       "Load = usage fraction x E; 1 is what a perfectly balanced router gives."))
    if save("usage_distribution", lambda: AP.usage_distribution_figure(snap)):
        us.add(H.image(figures["usage_distribution"], "usage distribution per layer",
                       "Each layer's experts sorted from the busiest to the idlest."))
    rows = []
    for name, s in snap.layers.items():
        rows.append([name, _fmt(s.num_tokens), f"{_fmt(s.active_experts, 0)}/{s.num_experts}",
                     _fmt(s.cv), _fmt(s.max_over_mean), _fmt(s.routing_entropy_norm),
                     _fmt(s.load_entropy_norm), _fmt(s.top1_prob), _fmt(s.aux_loss),
                     _fmt(s.unique_experts_per_batch, 2)])
    us.add(H.table(["layer", "tokens", "active experts", "cv", "max/mean",
                    "routing entropy (norm)", "load entropy (norm)", "top-1 prob", "aux loss",
                    "experts per batch"], rows))
    sections.append(us)

    # Entropy and balance ---------------------------------------------------------
    en = H.Section("entropy", "Routing entropy and balance")
    if save("entropy_cv", lambda: AP.entropy_cv_figure(snap)):
        en.add(H.image(figures["entropy_cv"], "routing entropy and cv per layer",
                       "Normalised entropies (1 = uniform) and the coefficient of variation "
                       "of usage counts (0 = balanced)."))
    sections.append(en)

    # Co-activation ---------------------------------------------------------------
    co = H.Section("coactivation", "Co-activation")
    if save("coactivation", lambda: AP.coactivation_figure(snap, result.coact_layer)):
        co.add(H.image(figures["coactivation"], f"co-activation of {result.coact_layer}",
                       "Fraction of tokens that chose both experts (choose the layer with "
                       "--coact-layer)."))
    sections.append(co)

    # Neurons ---------------------------------------------------------------------
    if snap.has_neurons:
        ne = H.Section("neurons", "Neurons")
        ne.add(H.paragraph(f"Threshold: {result.threshold_label}. A neuron is activated for a "
                           "(token, slot) when |act(gate(x)) * up(x)| exceeds it."))
        if save("neuron_sparsity", lambda: AP.neuron_sparsity_figure(snap)):
            ne.add(H.image(figures["neuron_sparsity"], "neuron sparsity per layer and expert"))
        if save("dead_neurons", lambda: AP.dead_neurons_figure(snap)):
            ne.add(H.image(figures["dead_neurons"], "dead neurons per layer and expert"))
        nrows = []
        for name, s in snap.layers.items():
            if s.has_neurons:
                nrows.append([name, _fmt(s.intermediate_size), _fmt(s.neuron_rows),
                              _fmt(s.activated_neurons_mean, 2), _fmt(s.activated_neurons_std, 2),
                              _fmt(s.neuron_sparsity), _fmt(s.dead_neurons, 0)])
        ne.add(H.table(["layer", "I", "rows", "activated mean", "activated std",
                        "sparsity", "dead neurons"], nrows))
        sections.append(ne)

    # Parameters ------------------------------------------------------------------
    pa = H.Section("parameters", "Parameters and FLOPs")
    if result.params is not None:
        p, f, m = result.params, result.flops, result.measured
        conv = {"both": "input embedding and output head counted",
                "head": "output head counted, input embedding not",
                "none": "neither embedding counted"}[p.embeddings]
        pa.add(H.paragraph(f"Embedding convention: {p.embeddings} ({conv}; change with "
                           "--embeddings)." + (" The head is tied to the input embedding "
                                               "(counted once)." if p.tied_embeddings else "")))
        prow = [["total parameters", _fmt(p.total_params), "-"],
                ["active parameters per token", _fmt(p.active_params),
                 _fmt(m.measured_active_params, 1) if m else "-"],
                ["activation ratio", _fmt(p.activation_ratio, 4),
                 _fmt(m.measured_activation_ratio, 4) if m else "-"]]
        if f is not None:
            prow.append([f"forward FLOPs per token (seq_len {f.seq_len})",
                         _fmt(f.flops_per_token, 4), "-"])
            prow.append(["matmul FLOPs per token", _fmt(f.matmul_flops),
                         _fmt(m.measured_matmul_flops, 1) if m and m.measured_matmul_flops is not None else "-"])
        if m is not None and m.skippable_down_flops is not None:
            prow.append(["down-projection FLOPs of inactive neurons", "-",
                         _fmt(m.skippable_down_flops, 1)])
            prow.append(["computation ratio (measured / theoretical matmul)", "-",
                         _fmt(m.computation_ratio, 4)])
        pa.add(H.table(["quantity", "theoretical", "measured (this data)"], prow))
        values = {"total": float(p.total_params), "active (theoretical)": float(p.active_params)}
        if m is not None:
            values["active (measured)"] = float(m.measured_active_params)
        if save("parameters", lambda: AP.params_figure(
                values, f"Parameters (embeddings convention: {p.embeddings})")):
            pa.add(H.image(figures["parameters"], "total and active parameters"))
        pa.add(H.table(["category", "total", "active"],
                       [[k, _fmt(v), _fmt(p.active_breakdown.get(k))] for k, v in p.breakdown.items()]))
    else:
        pa.add(H.paragraph(f"Parameter counting failed: {result.cost_error}", "banner note"))
    sections.append(pa)

    sections.extend(_routing_sections(result, save, figures, errors))

    if errors:
        sections.append(H.Section("problems", "Problems").add(
            H.paragraph("Some parts of the report could not be produced:"),
            "<ul>" + "".join(f"<li>{H.escape(e)}</li>" for e in errors) + "</ul>"))
    preamble = []
    if loaded.random_weights:
        preamble.append(H.paragraph(
            "This model has random weights (built from a config, not trained): "
            + loaded.description, "banner random"))
    for note in result.notes:
        preamble.append(H.paragraph(note, "banner note"))
    title = f"moescope analysis: {Path(loaded.source).name or loaded.source}"
    subtitle = (f"{loaded.model_type}, {snap.total_tokens:,} tokens from "
                + ", ".join(d.label for d in result.domains)
                + (" — random weights" if loaded.random_weights else ""))
    from moescope import __version__

    document = H.page(title, sections, subtitle=subtitle, preamble=preamble,
                      footer=f"moescope {__version__}; generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return figures, document


def _routing_sections(
    result: AnalysisResult, save: Any, figures: dict[str, Path], errors: list[str]
) -> list[Any]:
    """Per-domain routing, consecutive tokens, coloured passage, specialisation and
    router agreement (``routing_analysis``), from the recorded token-level routing."""
    from moescope.report import html as H
    from moescope.report import routing_analysis as RA

    trs = result.routing
    if not trs:
        return []
    sections: list[Any] = []
    summary: dict[str, Any] = {}
    decode = RA.make_decoder(result.loaded.tokenizer) or RA.decode_bytes
    layer = result.token_layer
    labels = list(trs)
    try:
        dists = {d: RA.expert_distribution(tr) for d, tr in trs.items()}
        summary["recorded_tokens"] = {d: tr.num_tokens for d, tr in trs.items()}
        summary["expert_distribution"] = dists
        if len(trs) >= 2:
            sec = H.Section("domains", "Routing per domain")
            div = RA.domain_divergence(dists)
            summary["domain_divergence_mean"] = div.mean
            summary["domain_divergence_max"] = div.max
            if save("domain_distribution", lambda: RA.domain_distribution_figure(dists)):
                sec.add(H.image(figures["domain_distribution"], "expert assignment per domain",
                                "Share of assignments per expert and domain (Mixtral, Fig. 7); "
                                "dashed: uniform 1/E."))
            if save("domain_divergence", lambda: RA.divergence_figure(div)):
                sec.add(H.image(figures["domain_divergence"], "divergence between domains"))
            sec.add(H.table(["layer", "mean JS (nats)", "max JS (nats)"],
                            [[lay, _fmt(div.mean[lay], 4), _fmt(div.max[lay], 4)]
                             for lay in div.layers]))
            sections.append(sec)
    except Exception as err:
        errors.append(f"per-domain routing: {type(err).__name__}: {err}")
    try:
        sec = H.Section("repetition", "Consecutive tokens")
        rates = {d: {lay: RA.same_expert_rate(tr, lay) for lay in tr.layers}
                 for d, tr in trs.items()}
        summary["same_expert_rate_top1"] = {d: {lay: r.rate for lay, r in v.items()}
                                            for d, v in rates.items()}
        if save("same_expert", lambda: RA.same_expert_figure(rates if len(rates) > 1
                                                             else rates[labels[0]])):
            sec.add(H.image(figures["same_expert"], "consecutive tokens sharing an expert",
                            "How often token t+1 has the same first-choice expert as token t "
                            "(Mixtral, Table 5), against chance."))
        sections.append(sec)
    except Exception as err:
        errors.append(f"consecutive tokens: {type(err).__name__}: {err}")
    try:
        sec = H.Section("tokens", f"Tokens coloured by expert ({layer})")
        tr0 = trs[labels[0]]
        words, experts = RA.token_passage(tr0, layer, max_tokens=400, decode=decode)
        sec.add(H.paragraph(f"First-choice expert of each token of the first recorded sequence "
                            f"of {labels[0]!r} at {layer} (change with --token-layer)."))
        sec.add(RA.colored_tokens_html(words, experts, tr0.num_experts[layer]))
        sections.append(sec)
    except Exception as err:
        errors.append(f"token view: {type(err).__name__}: {err}")
    try:
        sec = H.Section("specialisation", f"Expert specialisation ({layer})")
        sec.add(H.paragraph("The tokens each expert receives most often (any slot); share = "
                            "the fraction of that token's occurrences sent to the expert."))
        spec: dict[str, Any] = {}
        for d, tr in list(trs.items())[:4]:
            tops = RA.expert_top_tokens(tr, layer, top_n=8, decode=decode)
            spec[d] = {str(e): [[t.token, t.count, t.share] for t in v] for e, v in tops.items()}
            rows = [[str(e), _fmt(sum(t.count for t in v)),
                     "  ".join(f"{t.token!r} {t.count} ({t.share:.0%})" for t in v)]
                    for e, v in tops.items()]
            sec.add(f"<h3>{H.escape(d)}</h3>",
                    H.table(["expert", "count (top tokens)", "top tokens"], rows, left=3))
        summary["top_tokens"] = spec
        sections.append(sec)
    except Exception as err:
        errors.append(f"specialisation: {type(err).__name__}: {err}")
    if result.compare_routing is not None:
        try:
            sec = H.Section("agreement", "Router agreement")
            main = trs[labels[0]]
            agree = RA.router_agreement(main, result.compare_routing)
            first_layer = main.layers[0]
            chance = RA.agreement_chance(main.top_k(first_layer), main.num_experts[first_layer])
            summary["router_agreement"] = agree
            summary["router_agreement_chance"] = chance
            if save("router_agreement", lambda: RA.agreement_figure(
                    agree, chance=chance, title=f"Router agreement with {result.compare_source}")):
                sec.add(H.image(figures["router_agreement"], "router agreement per layer",
                                "Mean |top-k(A) ∩ top-k(B)| / K on the same tokens (OLMoE); "
                                "dashed: independent random routers."))
            sec.add(H.table(["layer", "agreement"],
                            [[lay, _fmt(v, 4)] for lay, v in agree.items()]))
            sections.append(sec)
        except Exception as err:
            errors.append(f"router agreement: {type(err).__name__}: {err}")
    result.routing_summary = summary
    return sections
