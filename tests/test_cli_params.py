"""`moescope params`: JSON output equals the Python API; bad input exits 2 with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REFERENCE_MODELS, save_tiny_checkpoint
from moescope.cli import main
from moescope.cost import count_parameters, flops_per_token

pytest.importorskip("transformers")

MODELS_DIR = REFERENCE_MODELS

TINY_CONFIG: dict[str, Any] = {
    "model_type": "mixtral",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}


def _run(*args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if script:
        cmd = [str(Path(sys.executable).parent / "moescope"), *args]
    else:
        cmd = [sys.executable, "-m", "moescope.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _json_roundtrip(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def test_json_subprocess_equals_api(tiny_config: Path) -> None:
    proc = _run("params", str(tiny_config), "--embeddings", "head", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    api = count_parameters(tiny_config, "head")
    assert out == _json_roundtrip(api.to_dict())
    assert out["total_params"] == api.total_params
    assert out["active_params"] == api.active_params
    assert out["activation_ratio"] == pytest.approx(api.activation_ratio)


@pytest.mark.parametrize("name", ["deepseek-v3", "gpt-oss-20b"])
def test_reference_file_json_in_process(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = MODELS_DIR / f"{name}.json"
    exact = json.loads(path.read_text())["exact"]
    for conv in ("both", "head", "none"):
        assert main(["params", str(path), "--embeddings", conv, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["total_params"] == exact["total_params"]
        assert out["active_params"] == exact["active_params"][conv]
        assert out == _json_roundtrip(count_parameters(path, conv).to_dict())


def test_seq_len_adds_flops(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["params", str(tiny_config), "--json", "--seq-len", "24", "--attention", "full"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    want = flops_per_token(tiny_config, seq_len=24, embeddings="both", attention="full")
    assert out["flops"] == _json_roundtrip(want.to_dict())


def test_table_output(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", str(tiny_config), "--embeddings", "none", "--seq-len", "8"]) == 0
    text = capsys.readouterr().out
    r = count_parameters(tiny_config, "none")
    assert f"{r.total_params:,}" in text and f"{r.active_params:,}" in text
    assert f"activation ratio: {r.activation_ratio:.2%}" in text
    assert "embeddings convention: none" in text
    for key in r.breakdown:
        assert key in text
    assert "FLOPs per token at seq_len=8" in text


def test_console_script(tiny_config: Path) -> None:
    script = Path(sys.executable).parent / "moescope"
    if not script.exists():
        pytest.skip("the moescope console script is not installed in this environment")
    proc = _run("params", str(tiny_config), "--json", script=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["active_params"] == count_parameters(tiny_config).active_params


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    bad_json = tmp / "bad.json"
    bad_json.write_text('{"model_type": "mixtral",')
    unknown = tmp / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "definitely_not_a_model"}))
    dense = tmp / "dense.json"
    dense.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 32,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    no_type = tmp / "notype.json"
    no_type.write_text(json.dumps({"hidden_size": 8}))
    return {
        "missing": (tmp / "missing.json", "no such file"),
        "invalid_json": (bad_json, "invalid JSON"),
        "unknown_model_type": (unknown, "unknown model_type 'definitely_not_a_model'"),
        "no_moe": (dense, "no Mixture-of-Experts layer"),
        "no_model_type": (no_type, "no 'model_type'"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "invalid_json", "unknown_model_type", "no_moe", "no_model_type"]
)
def test_bad_input_in_process(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, needle = _bad_inputs(tmp_path)[case]
    assert main(["params", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("moescope params: error: ") and needle in lines[0]


def test_bad_input_subprocess_no_traceback(tmp_path: Path) -> None:
    # The real process: exit status 2, exactly one stderr line, no traceback.
    for case in ("missing", "no_moe"):
        path, needle = _bad_inputs(tmp_path)[case]
        proc = _run("params", str(path), "--json")
        assert proc.returncode == 2, (case, proc.stderr)
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (case, proc.stderr)


def test_bad_option_values(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", str(tiny_config), "--seq-len", "0"]) == 2
    assert "--seq-len must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse rejects an unknown convention
        main(["params", str(tiny_config), "--embeddings", "input"])
    assert exc.value.code == 2
    capsys.readouterr()
    # --attention sets how attention FLOPs are counted: without --seq-len there are none.
    assert main(["params", str(tiny_config), "--attention", "full"]) == 2
    err = capsys.readouterr().err
    assert "--attention full" in err and "add --seq-len" in err
    # With --seq-len, full attention counts S keys per token, causal (the default) (S+1)/2.
    runs = {}
    for extra in ([], ["--attention", "causal"], ["--attention", "full"]):
        assert main(["params", str(tiny_config), "--seq-len", "16", "--json", *extra]) == 0
        runs[tuple(extra)] = json.loads(capsys.readouterr().out)["flops"]
    assert runs[()] == runs[("--attention", "causal")]
    full, causal = runs[("--attention", "full")], runs[()]
    assert full["attention_flops"] == pytest.approx(causal["attention_flops"] * 16 / 8.5)


def test_multimodal_config_reports_towers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A multimodal config.json: the table says the active count is a text token's and
    lists every tower; --json carries the same numbers as the API."""
    sys.path.insert(0, str(Path(__file__).parent))
    import hf_sweep

    built = hf_sweep.build_family("qwen3_vl_moe")
    data = {**built.config.to_dict(), "architectures": [type(built.model).__name__]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    api = count_parameters(data)
    assert main(["params", str(path)]) == 0
    table = capsys.readouterr().out
    assert "active = the path of a text token: the vision tower(s)" in table
    assert f"towers: text {api.towers['text']:,}, vision {api.towers['vision']:,}" in table
    assert main(["params", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["towers"] == api.towers and out["active_path"] == "text token"
    assert (
        out["total_params"] == api.total_params == sum(p.numel() for p in built.model.parameters())
    )


def test_saved_tiny_moe_directory(tmp_path: Path) -> None:
    """A saved TinyMoELM directory (model_type moescope_tiny_moe) is counted like any
    save_pretrained directory; the counts equal the real model's parameters."""
    from moescope.nn.hf import TinyMoEForCausalLM

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    model = TinyMoEForCausalLM.from_pretrained(ckpt)
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    # per routed expert: gate/up (H -> I twice) and down (I -> H), no biases
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    inactive = cfg.num_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    # A fresh process: nothing has imported moescope.nn.hf (which registers the type).
    proc = _run("params", str(ckpt), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model_type"] == "moescope_tiny_moe"
    assert out["total_params"] == total
    assert out["active_params"] == total - inactive
