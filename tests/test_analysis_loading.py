"""Model loading for analyze: hub ids through a real Hugging Face cache layout (no network),
dtypes, device_map="auto", the memory check (refusal before any allocation), and the
loader's one-line errors."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from conftest import TINY_MIXTRAL, save_tiny_checkpoint
from moescope.analysis.errors import AnalyzeError
from moescope.analysis.loading import (
    MEMORY_HEADROOM,
    check_memory,
    estimate_model_bytes,
    hf_cache_dir,
    host_available_bytes,
    load_model,
    parse_dtype,
    resolve_model_source,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _word_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["def", "return", "x", "=", "1"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(path)
    return fast


def _fake_hub_cache(cache: Path, repo: str, src: Path, commit: str = COMMIT) -> Path:
    """The on-disk layout huggingface_hub writes: blobs named by hash, a snapshot folder of
    symlinks into them, and refs/main holding the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (root / "refs" / "main").write_text(commit)
    return snap


def _logits(model: torch.nn.Module, device: torch.device | str = "cpu") -> torch.Tensor:
    ids = torch.arange(40).reshape(2, 20) % 250
    with torch.no_grad():
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


# --------------------------------------------------------------------------- hub ids


def test_hub_id_resolves_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = save_tiny_checkpoint(tmp_path / "saved", seed=1)
    _word_tokenizer(saved)
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "acme/tiny-moe", saved)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hf_cache_dir() == cache
    assert resolve_model_source("acme/tiny-moe") == snap
    assert resolve_model_source(f"acme/tiny-moe@{COMMIT}") == snap
    # HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    home = tmp_path / "home"
    shutil.copytree(tmp_path / "hub", home / "hub", symlinks=True)
    monkeypatch.setenv("HF_HOME", str(home))
    got = resolve_model_source("acme/tiny-moe")
    assert got == home / "hub" / "models--acme--tiny-moe" / "snapshots" / COMMIT
    loaded = load_model("acme/tiny-moe")
    assert not loaded.random_weights and loaded.source == "acme/tiny-moe"
    assert loaded.path == str(got)
    assert loaded.tokenizer_name == "acme/tiny-moe"  # not the tokenizer's class
    direct = load_model(saved)
    torch.testing.assert_close(_logits(loaded.model), _logits(direct.model), rtol=0, atol=0)


def test_hub_id_not_cached_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(AnalyzeError) as err:
        resolve_model_source("Qwen/Qwen1.5-MoE-A2.7B")
    msg = str(err.value)
    assert "\n" not in msg
    assert (
        f"model Qwen/Qwen1.5-MoE-A2.7B is not in the Hugging Face cache (HF_HUB_CACHE={cache})"
        in msg
    )
    assert "download Qwen/Qwen1.5-MoE-A2.7B" in msg and "--allow-download" in msg
    with pytest.raises(AnalyzeError, match="--revision v2"):
        resolve_model_source("Qwen/Qwen1.5-MoE-A2.7B@v2")
    # A partial download: the snapshot exists but config.json never arrived.
    part = tmp_path / "part"
    part.mkdir()
    (part / "README.md").write_text("x")
    _fake_hub_cache(cache, "acme/partial", part)
    with pytest.raises(AnalyzeError, match=r"without its config\.json"):
        resolve_model_source("acme/partial")


def test_allow_download_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--allow-download goes to the endpoint (here a closed local port: nothing leaves the
    machine) and a failure is one line."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    t0 = time.perf_counter()
    with pytest.raises(AnalyzeError) as err:
        resolve_model_source("acme/not-there", allow_download=True)
    assert time.perf_counter() - t0 < 60
    msg = str(err.value)
    assert msg.startswith("cannot download acme/not-there") and "\n" not in msg


def test_missing_local_paths(tmp_path: Path) -> None:
    with pytest.raises(AnalyzeError, match="no such file or directory"):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(AnalyzeError, match="no such file or directory"):
        resolve_model_source("./relative/nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(AnalyzeError, match=r"directory without config\.json"):
        resolve_model_source(tmp_path / "d")


# --------------------------------------------------------------------------- dtype


def test_parse_dtype() -> None:
    assert parse_dtype("auto", None) is torch.float32
    assert parse_dtype("auto", {"torch_dtype": "bfloat16"}) is torch.bfloat16
    assert parse_dtype("auto", {"dtype": "float16"}) is torch.float16
    assert parse_dtype("auto", {"config": {"torch_dtype": "bfloat16"}}) is torch.bfloat16
    assert parse_dtype("auto", {"torch_dtype": "float64"}) is torch.float32  # unsupported: fp32
    from transformers import MixtralConfig

    assert parse_dtype("auto", MixtralConfig(dtype="bfloat16")) is torch.bfloat16
    assert parse_dtype("bf16", None) is torch.bfloat16
    assert parse_dtype("float16", {"torch_dtype": "bfloat16"}) is torch.float16  # explicit wins
    for bad in ("int8", "float64", "fast"):
        with pytest.raises(AnalyzeError, match="use auto, float32, bfloat16 or float16"):
            parse_dtype(bad, None)


def test_checkpoint_in_bfloat16_equals_cast_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    stored = {}
    for f in ckpt.glob("*.safetensors"):
        stored.update(load_file(f))
    loaded = load_model(ckpt, dtype="bfloat16")
    assert loaded.dtype is torch.bfloat16
    params = dict(loaded.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    matched = 0
    for name, t in stored.items():
        if name in params:
            assert torch.equal(params[name], t.to(torch.bfloat16)), name
            matched += 1
    assert matched >= len(params) - 1  # every stored tensor (a tied head may be stored once)


def test_random_weights_follow_config_dtype_and_seed(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY_MIXTRAL, "torch_dtype": "bfloat16"}))
    a = load_model(cfg, seed=3)
    assert a.random_weights and a.dtype is torch.bfloat16
    assert {p.dtype for p in a.model.parameters()} == {torch.bfloat16}
    b = load_model(cfg, seed=3, dtype="float32")
    assert {p.dtype for p in b.model.parameters()} == {torch.float32}
    c = load_model(cfg, seed=3)
    for (n, p), (_, q) in zip(a.model.named_parameters(), c.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # same seed, same weights
    d = load_model(cfg, seed=4)
    assert not all(
        torch.equal(p, q) for p, q in zip(a.model.parameters(), d.model.parameters(), strict=True)
    )


# --------------------------------------------------------------------------- device_map


def test_device_map_auto_gives_the_same_model(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    plain = load_model(ckpt)
    mapped = load_model(ckpt, device_map="auto")
    assert mapped.device_map and mapped.device.type in ("cpu", "cuda")
    torch.testing.assert_close(
        _logits(mapped.model, mapped.device), _logits(plain.model), rtol=1e-5, atol=1e-5
    )
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_MIXTRAL))
    r1 = load_model(cfg, seed=5)
    r2 = load_model(cfg, seed=5, device_map="auto")
    assert r2.random_weights and r2.device_map
    torch.testing.assert_close(
        _logits(r2.model, r2.device), _logits(r1.model), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(AnalyzeError, match="bad --device-map"):
        load_model(cfg, device_map="balanced")


# --------------------------------------------------------------------------- memory


def _built_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_estimate_equals_the_built_model(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in TINY_MIXTRAL.items() if k != "model_type"}
    for dtype in (torch.float32, torch.bfloat16):
        config = AutoConfig.for_model("mixtral", **fields)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        assert estimate_model_bytes(config, dtype) == _built_bytes(model)
    tied = AutoConfig.for_model("mixtral", **{**fields, "tie_word_embeddings": True})
    model = AutoModelForCausalLM.from_config(tied, dtype=torch.float16)
    assert estimate_model_bytes(tied, torch.float16) == _built_bytes(model)  # counted once
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    loaded = load_model(ckpt)
    assert loaded.estimated_bytes == _built_bytes(loaded.model)


def _huge_config(tmp_path: Path) -> Path:
    """~1.3e12 parameters (5 TB in float32): more than any test machine has."""
    cfg = {
        **TINY_MIXTRAL,
        "vocab_size": 10_000_000,
        "hidden_size": 65536,
        "head_dim": 32768,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
    }
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(cfg))
    return path


def test_memory_refusal_allocates_nothing(tmp_path: Path) -> None:
    path = _huge_config(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(AnalyzeError) as err:
        load_model(path)
    elapsed = time.perf_counter() - t0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    msg = str(err.value)
    assert "\n" not in msg
    assert "needs about" in msg and "in float32" in msg and "host memory available" in msg
    for hint in ("--dtype bfloat16", "--force"):
        assert hint in msg, hint
    # A device map only helps when there is a GPU to spread over.
    assert ("--device-map auto" in msg) == torch.cuda.is_available()
    assert grown_mib < 500, grown_mib  # the peak did not move: nothing was allocated
    assert elapsed < 30
    # bfloat16 halves the estimate; still far too big, and the hint is gone.
    with pytest.raises(AnalyzeError) as err:
        load_model(path, dtype="bfloat16", device_map="auto")
    assert "in bfloat16" in str(err.value) and "--dtype bfloat16" not in str(err.value)
    assert "--device-map" not in str(err.value) and "--force" in str(err.value)


def test_check_memory_against_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    psutil = pytest.importorskip("psutil")
    host = host_available_bytes()
    ref = psutil.virtual_memory().available
    assert host is not None and 0.5 * ref <= host <= 1.5 * ref
    check_memory(1 << 20, "cpu", None, force=False)  # 1 MiB fits anywhere
    too_big = int(host / MEMORY_HEADROOM * 1.5)
    with pytest.raises(AnalyzeError, match="headroom"):
        check_memory(too_big, "cpu", None, force=False, dtype=torch.float32)
    check_memory(too_big, "cpu", None, force=True)  # --force: no check
    # torchrun: each of the local ranks holds a copy, so each gets a share of the host.
    half = int(host / MEMORY_HEADROOM * 0.4)
    check_memory(half, "cpu", None, force=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(AnalyzeError, match="/ 4 local ranks"):
        check_memory(half, "cpu", None, force=False)


# --------------------------------------------------------------------------- loader errors


def test_reference_file_with_config_key(tmp_path: Path) -> None:
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"name": "tiny", "config": TINY_MIXTRAL, "official": {}}))
    loaded = load_model(ref)
    assert loaded.random_weights and loaded.model_type == "mixtral"
    assert "RANDOM WEIGHTS (seed 0)" in loaded.description


def test_loader_errors_are_one_line(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no_such_arch_xyz"}))
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**TINY_MIXTRAL, "vocab_size": 64}))
    notjson = tmp_path / "bad.json"
    notjson.write_text("{oops")
    cases = {unknown: "unknown architecture", small: "no tokenizer", notjson: "invalid JSON"}
    for path, needle in cases.items():
        with pytest.raises(AnalyzeError) as err:
            load_model(path)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(AnalyzeError, match="bad --device"):
        load_model(small, device="tpu:0")


def test_incomplete_sharded_download(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                },
            }
        )
    )
    with pytest.raises(AnalyzeError, match=r"2 weight shard.*missing.*download the model again"):
        load_model(ckpt)


def test_tokenizer_name_is_the_model_not_the_class(tmp_path: Path) -> None:
    d = tmp_path / "word-moe"
    d.mkdir()
    _word_tokenizer(d)
    (d / "config.json").write_text(json.dumps(TINY_MIXTRAL))
    loaded = load_model(d)
    assert loaded.tokenizer_name == "word-moe"
    assert type(loaded.tokenizer).__name__ not in loaded.tokenizer_name
    # A config.json given by path uses the tokenizer saved next to it.
    assert load_model(tmp_path / "word-moe" / "config.json").tokenizer_name == "word-moe"
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text(json.dumps(TINY_MIXTRAL))
    assert load_model(alone / "config.json").tokenizer_name == "bytes (ids 0-255)"
