"""benchmarks/vllm_overhead.py leaves no checkpoint behind, even when the run fails."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import vllm_overhead  # noqa: E402


def test_checkpoint_dir_is_removed_when_the_run_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setitem(sys.modules, "vllm", None)  # the engine start fails: no vLLM
    built: list[Path] = []
    real_build = vllm_overhead.build_model

    def build(out: Path, *args: int) -> Path:
        built.append(real_build(out, *args))
        assert (built[-1] / "config.json").is_file()
        return built[-1]

    monkeypatch.setattr(vllm_overhead, "build_model", build)
    with pytest.raises(ImportError):
        vllm_overhead.main(["--layers", "1", "--hidden", "32", "--experts", "4", "--top-k", "2"])
    assert built and built[0].is_relative_to(tmp_path)
    assert not built[0].exists()
    # (torch may leave its own cache folder there; the benchmark's is gone)
    assert [n for n in os.listdir(tmp_path) if n.startswith("moescope-vllm-bench-")] == []
