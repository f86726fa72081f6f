"""Load the model of ``moescope analyze``: local directory, config.json or hub id; a dtype;
one device or a ``device_map``; and a memory check before anything is allocated.

Sources (:func:`resolve_model_source`):

- a local directory with ``config.json`` (a ``save_pretrained`` output, with or without
  weights; a saved ``TinyMoELM`` too: importing :mod:`moescope.nn.hf` registers its type);
- a ``config.json`` file, or a moescope reference file whose ``"config"`` key holds one
  (random weights, labelled so everywhere);
- a hub id ``org/name`` (optionally ``org/name@revision``) looked up in the standard
  Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
  The network is never touched unless ``allow_download=True`` (``--allow-download``), and
  then only by ``huggingface_hub.snapshot_download``; loading itself is always local.

Dtype (:func:`parse_dtype`): ``auto`` is the config's ``dtype`` / ``torch_dtype`` when it
is float32, bfloat16 or float16, else float32. Weights are created in that dtype directly
(never float32 first), so the peak is the estimate below.

Memory (:func:`estimate_model_bytes`, :func:`check_memory`): parameters (counted on the
meta device by :func:`moescope.cost.params.count_parameters`, no allocation) x the dtype's
size, times :data:`MEMORY_HEADROOM` = 1.2 for activations of a batch, the allocator's
fragmentation and the tokenizer/runtime, must fit in what is available:

- ``device_map=None`` on CUDA: the device's free memory (``torch.cuda.mem_get_info``);
- ``device_map=None`` on CPU: ``MemAvailable`` of ``/proc/meminfo`` (bounded by a cgroup
  limit when one is set), else ``os.sysconf`` free pages; divided by ``LOCAL_WORLD_SIZE``
  under torchrun, since every local rank holds its own copy;
- ``device_map="auto"``: the free memory of every CUDA device plus the host's (accelerate
  fills the GPUs and puts the rest on the CPU).

Otherwise :class:`AnalyzeError` says the estimate, what is available and what to do
(``--dtype bfloat16``, ``--device-map auto``, ``--force``), before any weight exists.

Random weights (a config without weights) are initialised with ``torch.manual_seed(seed)``
directly on the target device (a CPU build of a real-size model would need host memory for
all of it and take minutes): the same seed gives the same weights on the same kind of
device. With ``device_map="auto"`` they are built in host memory, then dispatched with
accelerate (``infer_auto_device_map`` + ``dispatch_model``): random weights need somewhere
to be initialised, and host memory is what a model too large for one GPU usually has; the
memory check then also requires the host to hold the model. A checkpoint with
``device_map="auto"`` is loaded by ``from_pretrained(..., device_map="auto")`` straight to
its devices.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moescope._optional import require
from moescope.analysis.errors import AnalyzeError
from moescope.cost.params import CostConfigError, build_meta_model, count_parameters

__all__ = [
    "DTYPES",
    "MEMORY_HEADROOM",
    "LoadedModel",
    "available_memory",
    "check_memory",
    "estimate_model_bytes",
    "hf_cache_dir",
    "host_available_bytes",
    "load_model",
    "parse_dtype",
    "resolve_device",
    "resolve_model_source",
]

MEMORY_HEADROOM = 1.2
"""Weights x this must fit: room for a batch's activations, allocator fragmentation, the
tokenizer and the runtime (20 %: a forward of the default 8 x 256 batch of a 7B model
needs well under 1 GB beside 14 GB of bf16 weights)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
    "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
)  # fmt: skip
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
_GENERIC_TOKENIZERS = frozenset(
    {"PreTrainedTokenizerFast", "PreTrainedTokenizer", "PreTrainedTokenizerBase", "AutoTokenizer"}
)
# The value of HF_HUB_OFFLINE before this module forced offline mode: --allow-download
# honours a user's own HF_HUB_OFFLINE=1 but not the one _offline() set.
_USER_OFFLINE = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")


# --------------------------------------------------------------------------- result


@dataclass
class LoadedModel:
    """A model ready to analyse and how it was obtained.

    ``tokenizer`` is a transformers tokenizer or None (bytes); ``random_weights`` is True
    when the weights were initialised from a config rather than loaded. ``source`` is what
    the user named (a path or a hub id), ``path`` the local directory or file it resolved
    to. ``device`` is where input ids go (the input embedding's device under a
    ``device_map``); ``device_map`` is accelerate's module -> device map, or None.
    """

    model: torch.nn.Module
    tokenizer: Any | None
    source: str
    random_weights: bool
    model_type: str
    vocab_size: int | None
    description: str
    path: str = ""
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_map: dict[str, Any] | None = None
    estimated_bytes: int | None = None
    tokenizer_label: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokenizer_name(self) -> str:
        """What tokenizes the data: the model's name (class added when informative), or
        ``bytes (ids 0-255)``."""
        if self.tokenizer is None:
            return "bytes (ids 0-255)"
        if self.tokenizer_label:
            return self.tokenizer_label
        return _tokenizer_label(self.tokenizer, None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens; bytes when there is no tokenizer)."""
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


def _tokenizer_label(tokenizer: Any, name: str | None) -> str:
    cls = type(tokenizer).__name__
    if not name:
        raw = str(getattr(tokenizer, "name_or_path", "") or "")
        name = Path(raw).name if raw and Path(raw).exists() else raw
    generic = cls in _GENERIC_TOKENIZERS or cls.endswith("Backend")
    if not name:
        return cls
    return name if generic else f"{name} ({cls})"


# --------------------------------------------------------------------------- sources


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import):
    ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _download_command(repo: str, rev: str | None) -> str:
    try:
        import huggingface_hub

        major = int(huggingface_hub.__version__.split(".")[0])
    except (ImportError, ValueError):
        major = 0
    cli = "hf" if major >= 1 else "huggingface-cli"  # huggingface-cli is gone from 1.0 on
    return f"{cli} download {repo}" + (f" --revision {rev}" if rev else "")


@contextlib.contextmanager
def _online() -> Iterator[None]:
    """Undo the offline switch _offline() set (a user's own HF_HUB_OFFLINE stays)."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    try:
        import huggingface_hub.constants as hc

        have_hc = True
    except ImportError:
        have_hc = False
    old_const = getattr(hc, "HF_HUB_OFFLINE", None) if have_hc else None
    user = _USER_OFFLINE
    if user is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = user
    if have_hc:
        hc.HF_HUB_OFFLINE = str(user or "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if have_hc and old_const is not None:
            hc.HF_HUB_OFFLINE = old_const


def _resolve_hub(spec: str, repo: str, rev: str | None, allow_download: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AnalyzeError(
            f"--model {spec}: no such file or directory, and huggingface_hub (needed to look "
            "up hub ids) is not installed; pip install 'moescope[hf]'"
        ) from None
    cache = hf_cache_dir()
    try:
        folder = Path(
            str(snapshot_download(repo, revision=rev, cache_dir=str(cache), local_files_only=True))
        )
    except Exception:  # LocalEntryNotFoundError and friends: not cached (or not this revision)
        folder = None
    if folder is None or not (folder / "config.json").is_file():
        if not allow_download:
            what = (
                "is not in the Hugging Face cache"
                if folder is None
                else (f"is in the Hugging Face cache without its config.json ({folder})")
            )
            raise AnalyzeError(
                f"model {repo}{'@' + rev if rev else ''} {what} (HF_HUB_CACHE={cache}) and "
                f"is not a local path; download it first with '{_download_command(repo, rev)}' "
                "or pass --allow-download"
            )
        try:
            with _online():
                folder = Path(str(snapshot_download(repo, revision=rev, cache_dir=str(cache))))
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise AnalyzeError(
                f"cannot download {repo}{'@' + rev if rev else ''} ({type(err).__name__}: {msg}); "
                f"check the id and your network, or download it with '{_download_command(repo, rev)}'"
            ) from None
    if not (folder / "config.json").is_file():
        raise AnalyzeError(
            f"{repo}: the downloaded snapshot {folder} has no config.json; is it a transformers model?"
        )
    return folder


def resolve_model_source(spec: str | os.PathLike[str], *, allow_download: bool = False) -> Path:
    """The local directory or config file that ``spec`` names (module docstring).

    A local path wins over a hub id of the same spelling. Returns a directory holding
    ``config.json``, or a JSON file (a config.json or a reference file with ``"config"``).

    Raises:
        AnalyzeError: no such path and not a cached hub id; a directory without
            config.json; a hub id not in the cache (says how to download it).
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise AnalyzeError(
                f"--model {path} is a directory without config.json; pass a transformers model "
                "directory (save_pretrained output) or a config.json file"
            )
        return path
    m = _HUB_ID.match(text)
    if m is None or text.startswith((".", "~")):
        raise AnalyzeError(
            f"--model {text}: no such file or directory; pass a model directory "
            "(config.json + safetensors weights), a config.json, or a hub id like org/name"
        )
    return _resolve_hub(text, m["repo"], m["rev"], allow_download)


# --------------------------------------------------------------------------- dtype + memory


def parse_dtype(name: str | torch.dtype | None, config: Any = None) -> torch.dtype:
    """The torch dtype of ``--dtype NAME``: ``float32``, ``bfloat16``, ``float16`` (also
    ``fp32``, ``bf16``, ``fp16``) or ``auto`` (the config's ``dtype`` / ``torch_dtype``
    when it is one of those three, else float32). ``config``: a config object, a dict, or None.
    """
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise AnalyzeError(
            f"--dtype {name} is not supported; use auto, float32, bfloat16 or float16"
        )
    key = "auto" if name is None else str(name).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key in DTYPES:
        return DTYPES[key]
    if key != "auto":
        raise AnalyzeError(f"bad --dtype {name!r}; use auto, float32, bfloat16 or float16")
    for attr in ("dtype", "torch_dtype"):
        if isinstance(config, Mapping):
            value = config.get(attr)
            if value is None and isinstance(config.get("config"), Mapping):
                value = config["config"].get(attr)
        else:
            value = getattr(config, attr, None) if config is not None else None
        if isinstance(value, torch.dtype) and value in DTYPES.values():
            return value
        if isinstance(value, str):
            v = value.lower().removeprefix("torch.")
            if v in DTYPES:
                return DTYPES[v]
    return torch.float32


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def estimate_model_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in ``dtype``: the parameter count of the model
    ``config`` describes, built on the meta device (nothing allocated), x the dtype's size.

    ``config``: a transformers config, a dict of config fields, a config.json path or an
    ``nn.Module``. Raises :class:`AnalyzeError` when the model cannot be built.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    try:
        n = count_parameters(config, "both", require_moe=False).total_params
    except Exception:  # e.g. no K for an MoE-looking block: count every tensor instead
        try:
            model = build_meta_model(config)
            n = sum(p.numel() for p in model.parameters())
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            if not isinstance(err, CostConfigError):
                msg = f"{type(err).__name__}: {msg}"
            raise AnalyzeError(
                f"cannot estimate the model's memory ({msg}); pass --force to load it anyway"
            ) from None
    return int(n) * itemsize


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup memory limit (containers: /proc/meminfo shows the host)."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    )
    for limit_file, usage_file in pairs:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def host_available_bytes() -> int | None:
    """Memory the host can give now: MemAvailable (bounded by a cgroup limit), else
    ``os.sysconf`` free pages, else None (unknown)."""
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    cg = _cgroup_available()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return avail


def available_memory(device: str | torch.device, device_map: str | None) -> tuple[int | None, str]:
    """(bytes available, where) for a model on ``device`` or spread by ``device_map``."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if device_map == "auto":
        total, parts = 0, []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, _ = torch.cuda.mem_get_info(i)
                total += free
            parts.append(f"{torch.cuda.device_count()} GPU(s)")
        host = host_available_bytes()
        if host is not None:
            total += host
            parts.append("host memory")
        return (total if parts else None), " + ".join(parts) or "unknown"
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free, f"{dev} free"
    host = host_available_bytes()
    # Under torchrun every local rank loads its own copy into the same host memory at once.
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if host is None or local == 1:
        return host, "host memory available"
    return host // local, f"host memory available / {local} local ranks"


def check_memory(
    nbytes: int,
    device: str | torch.device,
    device_map: str | None,
    *,
    force: bool,
    dtype: torch.dtype | None = None,
    what: str = "the model",
    suggest_device_map: bool | None = None,
) -> None:
    """Refuse (one line) when ``nbytes`` x :data:`MEMORY_HEADROOM` exceeds the memory
    available where the model goes (module docstring); ``force`` skips the check.
    ``dtype`` and ``suggest_device_map`` (default: ``device_map`` is not "auto" and a GPU
    exists) decide which remedies the message offers."""
    if force:
        return
    avail, where = available_memory(device, device_map)
    if avail is None:
        return  # unknown: nothing to compare with
    need = nbytes * MEMORY_HEADROOM
    if need <= avail:
        return
    dt = str(dtype).removeprefix("torch.") if dtype is not None else None
    hints = []
    if dtype is None or dtype == torch.float32:
        hints.append("--dtype bfloat16 (half the memory)")
    if suggest_device_map is None:  # without a GPU a device map only reaches the same host memory
        suggest_device_map = device_map != "auto" and torch.cuda.is_available()
    if suggest_device_map:
        hints.append("--device-map auto (spread over GPUs and host memory)")
    hints.append("--force to try anyway")
    raise AnalyzeError(
        f"{what} needs about {_fmt_bytes(nbytes)}{' in ' + dt if dt else ''} "
        f"({_fmt_bytes(need)} with {MEMORY_HEADROOM:g}x headroom) but only "
        f"{_fmt_bytes(avail)} is available ({where}); pass " + ", ".join(hints)
    )


# --------------------------------------------------------------------------- loading


def _offline() -> None:
    # Loading never reaches the network: local files only (also passed explicitly).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def _transformers() -> Any:
    tr = require("transformers", "hf")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bar is the one progress display
    # why: moescope.nn.hf imports transformers (the optional 'hf' extra), checked just above
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
        raise AnalyzeError(
            f"{path}: cannot read the file ({err}); check the path and permissions"
        ) from None
    if not isinstance(data, dict):
        raise AnalyzeError(
            f"{path}: expected a JSON object (a config.json), got {type(data).__name__}"
        )
    if "model_type" not in data and isinstance(data.get("config"), dict):
        data = dict(data["config"])  # a moescope reference file: {"config": {...}, "official": ...}
    return data


def _check_model_type(data: dict[str, Any], where: Path, trust_remote_code: bool) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise AnalyzeError(
            f"{where} has no 'model_type'; pass a transformers config.json (it names the "
            'architecture, e.g. "model_type": "mixtral")'
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


def _check_shards(d: Path) -> None:
    """A sharded checkpoint must have every shard its index names (a partial download
    would otherwise fail deep inside transformers)."""
    for index in d.glob("*.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            continue
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise AnalyzeError(
                f"{d}: {len(missing)} weight shard(s) named by {index.name} are missing "
                f"(e.g. {missing[0]}); the download is incomplete: download the model again"
            )


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (CUDA ``LOCAL_RANK`` when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""
    if isinstance(device, torch.device):
        return device
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


def _config_from_dict(tr: Any, data: dict[str, Any], where: Path, trust_remote_code: bool) -> Any:
    fields_ = {k: v for k, v in data.items() if k != "model_type"}
    if "torch_dtype" in fields_:  # the pre-5.0 name; transformers 5 warns about it
        fields_.setdefault("dtype", fields_.pop("torch_dtype"))
    try:
        if trust_remote_code and data.get("auto_map"):
            return tr.AutoConfig.from_pretrained(
                str(where.parent), local_files_only=True, trust_remote_code=True
            )
        return tr.AutoConfig.for_model(data["model_type"], **fields_)
    except Exception as err:
        raise AnalyzeError(f"invalid {data['model_type']} config in {where}: {err}") from None


def _model_from_config(
    tr: Any, config: Any, trust_remote_code: bool, dtype: torch.dtype
) -> torch.nn.Module:
    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModel"):
        cls = getattr(tr, auto)
        try:
            return cls.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
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


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _input_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    """Where input ids must go: the input embedding's device (under a device_map)."""
    try:
        get_emb = getattr(model, "get_input_embeddings", None)  # transformers models
        emb = get_emb() if get_emb is not None else None
        w = getattr(emb, "weight", None)
        if w is not None and w.device.type != "meta":
            return w.device
    except (AttributeError, NotImplementedError):
        pass
    return fallback


def _dispatch_auto(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """Spread a model built in host memory over the GPUs (rest on the CPU) with accelerate."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise AnalyzeError(
            "--device-map auto needs accelerate, which is not installed; pip install accelerate"
        ) from None
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, no_split_module_classes=no_split, dtype=dtype)
    dispatch_model(model, device_map=device_map)
    return dict(device_map)


def load_model(
    source: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    device_map: str | None = None,
    allow_download: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    need_text: bool = True,
) -> LoadedModel:
    """Load a model for analysis (module docstring), in eval mode.

    Args:
        source: a model directory, a config.json / reference file, or a hub id
            (``org/name[@revision]``) in the local Hugging Face cache.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16`` or a torch dtype.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a torch.device (ignored for
            placement when ``device_map`` is given).
        device_map: None (everything on ``device``) or ``"auto"`` (accelerate).
        allow_download: fetch a hub id that is not cached (the only network access).
        force: skip the memory check.
        trust_remote_code: allow a checkpoint's own modelling code.
        seed: seed of random weights (config without weights).
        need_text: refuse a model without tokenizer whose vocabulary cannot hold bytes
            (False when token ids are given, e.g. ``moescope agree`` replaying a trace).

    Raises:
        AnalyzeError: missing path, hub id not cached, no config.json, unknown
            architecture, not enough memory, a checkpoint transformers cannot load.
    """
    if device_map not in (None, "auto"):
        raise AnalyzeError(
            f"bad --device-map {device_map!r}; use auto (or leave it out for one device)"
        )
    spec = os.fspath(source)
    path = resolve_model_source(spec, allow_download=allow_download)
    is_hub = not Path(spec).expanduser().exists()
    _offline()
    tr = _transformers()
    dev = resolve_device(device)
    config_path = path / "config.json" if path.is_dir() else path
    data = _read_config_json(config_path)
    model_type = _check_model_type(data, config_path, trust_remote_code)
    config = _config_from_dict(tr, data, config_path, trust_remote_code)
    torch_dtype = parse_dtype(dtype, data)
    has_weights = path.is_dir() and _has_weights(path)
    if has_weights:
        _check_shards(path)
    notes: list[str] = []
    estimate: int | None = None
    try:
        estimate = estimate_model_bytes(config, torch_dtype)
    except AnalyzeError as err:
        if not (force or trust_remote_code):
            raise
        notes.append(f"memory not checked: {err}")
    if estimate is not None:
        if has_weights or device_map is None:
            check_memory(estimate, dev, device_map, force=force, dtype=torch_dtype)
        else:  # random weights under a device map are built in host memory first
            check_memory(
                estimate,
                "cpu",
                None,
                force=force,
                dtype=torch_dtype,
                suggest_device_map=False,
                what="the model (random weights are built in host memory, then dispatched)",
            )
    label = spec if is_hub else (path.name if path.is_dir() else path.parent.name or path.name)
    hf_map: dict[str, Any] | None = None
    if has_weights:
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if device_map == "auto":
            kwargs["device_map"] = "auto"
        elif dev.type != "cpu":
            kwargs["device_map"] = {"": str(dev)}  # straight to the device, no host copy
        try:
            model = tr.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
            )
        except Exception as err:  # transformers raises many types for a bad checkpoint
            raise AnalyzeError(
                f"transformers could not load the checkpoint in {path} ({type(err).__name__}: "
                f"{_first_line(err)}); check that it is a complete causal-LM save_pretrained directory"
            ) from None
        random_weights = False
        description = f"weights loaded from {spec}"
        if device_map == "auto":
            # transformers leaves hf_device_map unset when everything lands on one device
            hf_map = dict(
                getattr(model, "hf_device_map", None)
                or {"": str(_input_device(model, torch.device("cpu")))}
            )
    else:
        torch.manual_seed(seed)
        build_on = torch.device("cpu") if device_map == "auto" else dev
        with torch.device(build_on):
            model = _model_from_config(tr, config, trust_remote_code, torch_dtype)
        if device_map == "auto":
            hf_map = _dispatch_auto(model, torch_dtype)
        random_weights = True
        description = (
            f"RANDOM WEIGHTS (seed {seed}) built from {config_path}: routing statistics "
            "describe an untrained model"
        )
    tokenizer = None
    # A config.json given by path uses the tokenizer saved next to it, as its directory would.
    tok_dir = path if path.is_dir() else path.parent
    if _has_tokenizer(tok_dir):
        try:
            tokenizer = tr.AutoTokenizer.from_pretrained(
                str(tok_dir), local_files_only=True, trust_remote_code=trust_remote_code
            )
        except Exception as err:
            raise AnalyzeError(
                f"cannot load the tokenizer in {tok_dir} ({_first_line(err)}); fix or remove "
                "its tokenizer files (without them, bytes 0-255 are used)"
            ) from None
    cfg: Any = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text_cfg, "vocab_size", None)
    if need_text and tokenizer is None and (vocab is None or int(vocab) < 256):
        raise AnalyzeError(
            f"{path} has no tokenizer and a vocabulary of {vocab} ids, too small for bytes "
            "(0-255); save a tokenizer next to the model (tokenizer.save_pretrained(DIR)) "
            "or use a model with vocab_size >= 256"
        )
    if hf_map is None and not has_weights:
        model.to(dev)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=spec,
        random_weights=random_weights,
        model_type=model_type,
        vocab_size=None if vocab is None else int(vocab),
        description=description,
        path=str(path),
        dtype=torch_dtype,
        device=_input_device(model, dev) if hf_map else dev,
        device_map=hf_map,
        estimated_bytes=estimate,
        tokenizer_label=None if tokenizer is None else _tokenizer_label(tokenizer, label),
        notes=notes,
    )
