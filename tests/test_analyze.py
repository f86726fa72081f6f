"""`moescope analyze`: summary.json equals an independent monitor run over the same token
stream; the report is one self-contained file; random weights are labelled; --max-tokens
holds; bad input exits 2 with one line; torchrun splits the data without losing a token."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from conftest import TINY_MIXTRAL, save_tiny_checkpoint
from moescope.data import stdlib_dir
from moescope.monitor import MoEMonitor
from moescope.nn.model import TinyMoEConfig, TinyMoELM

DATA_A = stdlib_dir() / "bisect.py"
DATA_B = stdlib_dir() / "colorsys.py"
B, S = 4, 48


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "moescope.cli", "analyze", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


def _reference_batches(path: Path, max_tokens: int | None) -> list[torch.Tensor]:
    """The documented batching, written independently: rows of S consecutive bytes, B rows
    per batch, then the leftover full rows, then the last partial row."""
    data = path.read_bytes()[:max_tokens]
    ids = torch.tensor(list(data), dtype=torch.long)
    out = []
    n_rows = ids.numel() // S
    full = n_rows // B
    for i in range(full):
        out.append(ids[i * B * S : (i + 1) * B * S].view(B, S))
    if n_rows % B:
        out.append(ids[full * B * S : n_rows * S].view(-1, S))
    if ids.numel() % S:
        out.append(ids[n_rows * S :].view(1, -1))
    return out


def _independent_snapshot(model_dir: Path, files: list[Path], max_tokens: int | None) -> Any:
    from transformers import AutoModelForCausalLM

    import moescope.nn.hf  # noqa: F401  (registers the model type)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    mon = MoEMonitor(model, neurons=True, history=0)
    with torch.no_grad():
        for f in files:
            for ids in _reference_batches(f, max_tokens):
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return mon.snapshot()


def _img_and_links(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)


# --------------------------------------------------------------------------- main run


@pytest.fixture(scope="module")
def tiny_run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moescope.analysis import run_analyze

    out = tmp_path_factory.mktemp("analysis")
    report = run_analyze(
        model=str(ckpt),
        data=[str(DATA_A), str(DATA_B)],
        neurons=True,
        max_tokens=700,
        batch_size=B,
        seq_len=S,
        out=str(out),
        compare=str(ckpt),
        progress=False,
    )
    assert report == out / "report.html"
    return out


def test_summary_equals_independent_monitor(tiny_run: Path, ckpt: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    ref = _independent_snapshot(ckpt, [DATA_A, DATA_B], 700)
    assert summary["total_tokens"] == ref.total_tokens == 1400
    assert [d["tokens"] for d in summary["data"]] == [700, 700]
    assert [d["batches"] for d in summary["data"]] == [len(_reference_batches(DATA_A, 700))] * 2
    assert set(summary["layers"]) == set(ref.layers)
    for name, s in ref.layers.items():
        got = summary["layers"][name]
        assert got["usage_counts"] == s.usage_counts.tolist()
        assert got["coactivation"] == s.coactivation.tolist()
        assert got["num_tokens"] == s.num_tokens
        for key in (
            "cv",
            "routing_entropy",
            "aux_loss",
            "top1_prob",
            "activated_neurons_mean",
            "neuron_sparsity",
            "dead_neurons",
        ):
            assert math.isclose(got[key], float(getattr(s, key)), rel_tol=1e-9, abs_tol=1e-12), key
        assert got["expert_dead_neurons"] == s.expert_dead_neurons.tolist()
    for key, v in ref.aggregates().items():
        assert summary["aggregates"][key] == pytest.approx(v, rel=1e-9, abs=1e-12), key
    # Parameters: total = every tensor of the model, counted here directly.
    model = TinyMoELM(
        TinyMoEConfig(
            vocab_size=256,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=32,
            num_experts=4,
            top_k=2,
            max_seq_len=128,
        )
    )
    assert summary["params"]["total_params"] == sum(p.numel() for p in model.parameters())
    assert summary["model"]["random_weights"] is False


def test_domains_and_router_agreement(tiny_run: Path, ckpt: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    ra = summary["routing_analysis"]
    # Each domain's recorded distribution equals a monitor run over that file alone.
    for f in (DATA_A, DATA_B):
        ref = _independent_snapshot(ckpt, [f], 700)
        for name, s in ref.layers.items():
            np.testing.assert_allclose(
                ra["expert_distribution"][f.stem][name], s.usage_fraction, rtol=0, atol=1e-12
            )
    assert set(ra["domain_divergence_mean"]) == set(ref.layers)
    assert all(0.0 <= v <= math.log(2) for v in ra["domain_divergence_mean"].values())
    # --compare with the same checkpoint: identical routing on identical tokens.
    assert ra["router_agreement"] == {name: 1.0 for name in ref.layers}
    html = (tiny_run / "report.html").read_text()
    for section in (
        'id="domains"',
        'id="tokens"',
        'id="specialisation"',
        'id="agreement"',
        'class="moe-tok"',
    ):
        assert section in html, section


def test_report_is_self_contained(tiny_run: Path) -> None:
    html = (tiny_run / "report.html").read_text()
    refs = _img_and_links(html)
    imgs = re.findall(r"<img [^>]*>", html)
    pngs = sorted(p.name for p in tiny_run.glob("*.png"))
    for name in (
        "usage_heatmap",
        "usage_distribution",
        "entropy_cv",
        "coactivation",
        "neuron_sparsity",
        "dead_neurons",
        "parameters",
        "domain_distribution",
        "router_agreement",
    ):
        assert f"{name}.png" in pngs, name
    assert len(imgs) == len(pngs)
    assert refs, "no src/href found at all"
    for r in refs:
        assert r.startswith("data:image/png;base64,") or r.startswith("#"), r[:60]
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert "url(" not in html  # no CSS-loaded resource either
    assert "random weights" not in html.lower()


# --------------------------------------------------------------------------- config + CLI


def test_cli_random_weights_config_and_max_tokens(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_MIXTRAL))
    out = tmp_path / "out"
    proc = _cli(
        "--model",
        str(cfg),
        "--data",
        str(DATA_A),
        "--max-tokens",
        "350",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--embeddings",
        "head",
        "--out",
        str(out),
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == f"report: {out / 'report.html'}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["random_weights"] is True
    assert summary["total_tokens"] == 350  # --max-tokens respected exactly
    # 350 tokens in [2, 64] batches: two full batches (256), one [1, 64] batch of the last
    # full row, one [1, 30] batch of the rest.
    assert summary["data"][0]["batches"] == 4
    for s in summary["layers"].values():
        assert s["num_tokens"] == 350
        assert sum(s["usage_counts"]) == 350 * 2  # every token to K = 2 experts
    assert summary["params"]["embeddings"] == "head"
    html = (out / "report.html").read_text()
    assert "random weights" in html.lower()
    assert "banner random" in html


def test_threshold_calibrated_hits_target(ckpt: Path, tmp_path: Path) -> None:
    from moescope.analysis import run_analyze

    report = run_analyze(
        model=str(ckpt),
        data=str(DATA_A),
        neurons=True,
        threshold="calibrated:0.5",
        max_tokens=2 * B * S,
        batch_size=B,
        seq_len=S,
        out=str(tmp_path / "o"),
        progress=False,
    )
    summary = json.loads(report.with_name("summary.json").read_text())
    assert "calibrated(target_sparsity=0.5" in summary["settings"]["threshold"]
    # Calibrated on the first of the two batches: the sparsity over both is near 0.5.
    assert summary["aggregates"]["avg_neuron_sparsity"] == pytest.approx(0.5, abs=0.1)


def test_threshold_specs() -> None:
    from moescope.analysis import AnalyzeError, parse_threshold
    from moescope.stats.neurons import NeuronThreshold

    assert parse_threshold(None) == (None, None)
    assert parse_threshold("0.01") == (NeuronThreshold.absolute(0.01), None)
    assert parse_threshold("magnitude:0.2") == (NeuronThreshold.magnitude(0.2), None)
    assert parse_threshold("relative:0.9") == (NeuronThreshold.relative(0.9), None)
    assert parse_threshold("calibrated:0.3") == (None, 0.3)
    for bad in ("fast", "magnitude:x", "calibrated:1.5", "relative:2", "bogus:1"):
        with pytest.raises(AnalyzeError):
            parse_threshold(bad)


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _word_tokenizer_dir(path: Path, chat_template: str | None = None) -> Any:
    """A directory with a small word-level tokenizer (built locally, with ``chat_template``
    if given) and a Mixtral config.json without weights: random weights + the directory's
    own tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "def",
        "return",
        "if",
        "else",
        "for",
        "in",
        "self",
        "lo",
        "hi",
        "x",
        "a",
        "=",
        ":",
        "(",
        ")",
        ",",
        "[",
        "]",
        "+",
        "<",
        "1",
        "0",
        "mid",
        "len",
        "while",
    ]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if chat_template is not None:
        tok.add_special_tokens(["<|user|>", "<|assistant|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", chat_template=chat_template
    )
    fast.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({**TINY_MIXTRAL, "vocab_size": 64}))
    return fast


def test_tokenizer_directory_and_chunked_encoding(tmp_path: Path) -> None:
    from moescope.analysis import run_analyze
    from moescope.analysis.sources import open_data

    model_dir = tmp_path / "tokmodel"
    fast = _word_tokenizer_dir(model_dir)
    whole = fast(DATA_A.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    # Reading 200 bytes at a time and cutting at newlines gives the whole-file encoding.
    chunks = list(open_data(DATA_A, tokenizer=fast).token_chunks(200))
    assert len(chunks) > 5
    assert torch.cat(chunks).tolist() == whole
    raw = list(open_data(DATA_A).token_chunks(100))
    assert torch.cat(raw).tolist() == list(DATA_A.read_bytes())
    report = run_analyze(
        model=str(model_dir),
        data=[str(DATA_A)],
        batch_size=2,
        seq_len=32,
        out=str(tmp_path / "o"),
        progress=False,
    )
    summary = json.loads(report.with_name("summary.json").read_text())
    assert summary["total_tokens"] == len(whole)
    assert summary["model"]["random_weights"] is True
    # Named by what it is (the tokenizers model kind and size), not the wrapper class.
    assert summary["model"]["tokenizer"].startswith(f"WordLevel, {len(fast):,} ids"), summary

    tops = summary["routing_analysis"]["top_tokens"]["bisect"]
    decoded = {t[0] for v in tops.values() for t in v}
    assert decoded <= {*fast.get_vocab()}, decoded  # decoded through the tokenizer


def test_chat_jsonl_with_the_model_directory_tokenizer(tmp_path: Path) -> None:
    """Chat records are accepted when the model directory has a tokenizer with a chat
    template (the pre-flight data check runs before the tokenizer is loaded), also when
    --model names the config.json next to the tokenizer; the token count is the
    template's rendering encoded by the tokenizer, independently of moescope."""
    import jinja2

    from moescope.cli import main

    model_dir = tmp_path / "chatmodel"
    fast = _word_tokenizer_dir(model_dir, CHAT_TEMPLATE)
    chats = [
        [
            {"role": "user", "content": "def x ( a ) :"},
            {"role": "assistant", "content": "return a"},
        ],
        [{"role": "user", "content": "for x in a : mid = lo + hi"}],
    ] * 20
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    render = env.from_string(CHAT_TEMPLATE)
    want = sum(
        len(fast(render.render(messages=c), add_special_tokens=False)["input_ids"]) for c in chats
    )
    for i, model in enumerate((model_dir, model_dir / "config.json")):
        out = tmp_path / f"o{i}"
        args = ["analyze", "--model", str(model), "--data", str(data), "--out", str(out)]
        assert main([*args, "--seq-len", "16", "--batch-size", "2", "--no-progress"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["total_tokens"] == want
        assert summary["model"]["tokenizer"].startswith("WordLevel"), summary["model"]


# --------------------------------------------------------------------------- bad input


def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moescope.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    dense = tmp_path / "dense.json"
    dense.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 256,
                "hidden_size": 16,
                "intermediate_size": 24,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            }
        )
    )
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no_such_arch_xyz", "hidden_size": 8}))
    small_vocab = tmp_path / "small"
    small_vocab.mkdir()
    (small_vocab / "config.json").write_text(json.dumps({**TINY_MIXTRAL, "vocab_size": 64}))
    out = str(tmp_path / "out")
    data = str(DATA_A)
    cases = {
        "missing model": (
            ["--model", str(tmp_path / "nope"), "--data", data],
            "no such file or directory",
        ),
        "empty data": (["--model", str(ckpt), "--data", str(empty)], "is empty"),
        "unreadable data (a directory)": (
            ["--model", str(ckpt), "--data", str(tmp_path)],
            "is a directory",
        ),
        "non-MoE model": (["--model", str(dense), "--data", data], "no Mixture-of-Experts layer"),
        "missing data": (
            ["--model", str(ckpt), "--data", str(tmp_path / "nope.txt")],
            "no such file",
        ),
        "unknown architecture": (["--model", str(unknown), "--data", data], "unknown architecture"),
    }
    in_process = {
        "vocab too small for bytes": (
            ["--model", str(small_vocab), "--data", data],
            "no tokenizer",
        ),
        "threshold without --neurons": (
            ["--model", str(ckpt), "--data", data, "--threshold", "0.1"],
            "add --neurons",
        ),
        "bad --coact-layer": (
            ["--model", str(ckpt), "--data", data, "--coact-layer", "7"],
            "out of range",
        ),
    }
    # All at once: each is a fresh interpreter, as a user would run it.
    procs = {name: _cli(*args, "--out", out) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        assert len(lines) == 1, (name, stderr)
        assert lines[0].startswith("moescope analyze: error: "), (name, lines[0])
        assert cases[name][1] in lines[0], (name, lines[0])
    # The same contract through main() in this process (cheaper: transformers is loaded).
    for name, (args, needle) in in_process.items():
        code = main(["analyze", *args, "--out", out, "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("moescope analyze: error: "), (name, lines)
        assert needle in lines[0], (name, lines[0])
    assert not Path(out).exists()


# --------------------------------------------------------------------------- torchrun


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_equal_single(ckpt: Path, tmp_path: Path) -> None:
    from moescope.analysis import run_analyze

    single = run_analyze(
        model=str(ckpt),
        data=str(DATA_A),
        max_tokens=900,
        batch_size=2,
        seq_len=S,
        out=str(tmp_path / "single"),
        progress=False,
    )
    out = tmp_path / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "moescope.cli",
            "analyze",
            "--model",
            str(ckpt),
            "--data",
            str(DATA_A),
            "--max-tokens",
            "900",
            "--batch-size",
            "2",
            "--seq-len",
            str(S),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # only rank 0 reports (and writes)
    a = json.loads(single.with_name("summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b["settings"]["world_size"] == 2
    assert b["total_tokens"] == a["total_tokens"] == 900
    for name, s in a["layers"].items():
        assert b["layers"][name]["usage_counts"] == s["usage_counts"]
        assert b["layers"][name]["coactivation"] == s["coactivation"]
        assert b["layers"][name]["routing_entropy"] == pytest.approx(s["routing_entropy"], rel=1e-9)


# --------------------------------------------------------------------------- interrupts


def test_stop_between_forwards_writes_a_partial_report(ckpt: Path, tmp_path: Path) -> None:
    from moescope.analysis import AnalyzeOptions, analyze, write_outputs

    calls = []

    def stop() -> bool:  # what the CLI's Ctrl-C handler does, after three forwards
        calls.append(1)
        return len(calls) > 3

    opts = AnalyzeOptions(
        model=str(ckpt),
        data=[str(DATA_A), str(DATA_B)],
        batch_size=B,
        seq_len=S,
        out=str(tmp_path / "o"),
        progress=False,
    )
    result = analyze(opts, should_stop=stop)
    report = write_outputs(result)
    summary = json.loads(report.with_name("summary.json").read_text())
    assert summary["partial"] is True and result.partial
    # Exactly the first three forwards of the first file, counted like a plain monitor.
    ref = _independent_snapshot(ckpt, [DATA_A], 3 * B * S)
    assert summary["total_tokens"] == ref.total_tokens == 3 * B * S
    assert [d["tokens"] for d in summary["data"]] == [3 * B * S, 0]
    for name, s in ref.layers.items():
        assert summary["layers"][name]["usage_counts"] == s.usage_counts.tolist()
    assert summary["notes"][0].startswith(
        f"interrupted: this report covers the first {3 * B * S:,} tokens"
    )
    html = report.read_text()
    assert 'class="banner partial"' in html and "Partial report" in html


def test_ctrl_c_exits_130_with_a_partial_report(ckpt: Path, tmp_path: Path) -> None:
    import signal
    import threading

    big = tmp_path / "big.txt"
    big.write_bytes(DATA_A.read_bytes() * 400)  # ~1 MB: minutes of work, never finished here
    out = tmp_path / "out"
    proc = _cli(
        "--model",
        str(ckpt),
        "--data",
        str(big),
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(out),
    )
    err: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        # stderr is a pipe, so no bar: whole lines, the first one once a forward is done
        for line in iter(proc.stderr.readline, ""):
            err.append(line)
            if "streaming (first forward done)" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(240), "".join(err)[-2000:]
    proc.send_signal(signal.SIGINT)
    # The reader thread owns stderr up to EOF (communicate() would race it for the last
    # lines); stdout is one short line, so waiting first cannot block on a full pipe.
    proc.wait(timeout=240)
    reader.join(60)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    stderr = "".join(err)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("moescope analyze: interrupted after ") and "partial report" in last
    assert stdout.strip() == f"report: {out / 'report.html'}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is True
    assert 2 * 32 <= summary["total_tokens"] < big.stat().st_size  # >= the first forward
    assert summary["total_tokens"] == summary["data"][0]["tokens"]
    assert "Partial report" in (out / "report.html").read_text()


def test_cli_module_imports_no_torch() -> None:
    """torch is imported inside main(), under its Ctrl-C handling, never when the module
    loads (a Ctrl-C there would print a traceback)."""
    code = "import sys, moescope.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_ctrl_c_before_streaming_aborts_with_one_line(ckpt: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "out"
    proc = _cli("--model", str(ckpt), "--data", str(DATA_A), "--out", str(out))
    # Inside main() (the CLI imports torch there, never at module level): importing
    # torch or loading the model, no forward yet. Wait for torch's library, not a clock.
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moescope analyze: interrupted"), stderr
    assert stdout == "" and not out.exists()


# --------------------------------------------------------------------------- memory


def test_rows_per_forward_caps_the_batch_and_refuses_a_row_too_large() -> None:
    from moescope.analysis import AnalyzeError
    from moescope.analysis.run import forward_bytes_per_token, rows_per_forward

    per = forward_bytes_per_token(
        hidden=32,
        intermediate=32,
        top_k=2,
        num_experts=4,
        heads=2,
        seq_len=256,
        vocab=256,
        logits=False,
    )
    # 2 x 4 bytes x (8 H + 2 heads S + 3 K I + K H + 2 E): written out for this shape.
    assert per == 8 * (8 * 32 + 2 * 2 * 256 + 3 * 2 * 32 + 2 * 32 + 2 * 4)
    assert (
        forward_bytes_per_token(
            hidden=32,
            intermediate=32,
            top_k=2,
            num_experts=4,
            heads=2,
            seq_len=256,
            vocab=256,
            logits=True,
        )
        == per + 8 * 256
    )
    budget = 1 << 30
    rows = rows_per_forward(100_000, 256, per, budget)
    assert rows * 256 * per <= budget < (rows + 1) * 256 * per
    assert rows_per_forward(8, 256, per, budget) == 8
    with pytest.raises(AnalyzeError, match="lower --seq-len or raise --memory-budget"):
        rows_per_forward(1, 10**7, per, budget)


def test_huge_batch_size_runs_in_bounded_forwards(ckpt: Path, tmp_path: Path) -> None:
    from moescope.analysis import AnalyzeOptions, analyze
    from moescope.analysis.run import forward_bytes_per_token

    budget = 1 << 20  # 1 MiB of activations per forward
    opts = AnalyzeOptions(
        model=str(ckpt),
        data=[str(DATA_A)],
        batch_size=100_000,
        seq_len=S,
        max_tokens=700,
        memory_budget=budget,
        out=str(tmp_path / "o"),
        progress=False,
    )
    result = analyze(opts)
    # The tiny model: H = 32, I = 32, K = 2, E = 4, 2 heads; TinyMoE computes only the last
    # position's logits (logits_to_keep), so the vocabulary does not count.
    per = forward_bytes_per_token(
        hidden=32,
        intermediate=32,
        top_k=2,
        num_experts=4,
        heads=2,
        seq_len=S,
        vocab=256,
        logits=False,
    )
    assert result.rows_per_forward == budget // (S * per) < 100_000
    full_rows, rest = divmod(700, S)
    assert result.domains[0].batches == -(-full_rows // result.rows_per_forward) + (rest > 0)
    # Same counts as forwards of B rows: routing of a row does not depend on its batch.
    ref = _independent_snapshot(ckpt, [DATA_A], 700)
    for name, s in ref.layers.items():
        assert result.snapshot.layers[name].usage_counts.tolist() == s.usage_counts.tolist()
    assert any("--batch-size 100000" in n for n in result.notes)


def test_stdin_data_and_dtype_flag(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moescope.cli",
            "analyze",
            "--model",
            str(ckpt),
            "--data",
            "-",
            "--dtype",
            "bfloat16",
            "--max-tokens",
            "300",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--no-progress",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=False,
        env=_env(),
    )
    _, stderr = proc.communicate(DATA_A.read_bytes(), timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == [
        {"label": "stdin", "path": "-", "kind": "stdin", "tokens": 300, "batches": 6}
    ]  # 300 = 4 forwards of [2, 32], [1, 32], [1, 12]
    assert summary["model"]["dtype"] == "bfloat16" and summary["total_tokens"] == 300
    assert summary["settings"]["dtype"] == "bfloat16"


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr redirected to a file or pipe: no bar, so no line per update in the log;
    on a terminal the bar is drawn (tqdm)."""
    from moescope.analysis import run as run_mod

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = run_mod._progress(None, True)
    bar.update(5)
    bar.close()
    assert "moescope analyze" in term.getvalue()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = run_mod._progress(None, True)
    for _ in range(30):
        bar.update(5)
    bar.close()
    # Two lines whatever the number of updates: streaming started, tokens at the end.
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0] == "moescope analyze: streaming (first forward done)"
    assert lines[1].startswith("moescope analyze: 150 tokens in ")
