"""``moescope prune`` end to end (subprocess), and the ordering on a trained demo model.

The CLI test runs the real command (``moescope.cli.main``, in process) on a saved TinyMoELM checkpoint and reads back what it
wrote: the checkpoint reloads with ``from_pretrained`` at the kept size, ``summary.json``
agrees with the files on disk (bytes saved = the difference of the weight files), and the
report embeds the trade-off figure. The ordering test trains the demo's model (its
no-balance run, shortened) and checks that keeping the most REAP-salient experts costs no
more held-out loss than keeping the least salient, at every level.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from conftest import save_tiny_checkpoint
from moescope.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # In process (the console script's own main): a subprocess would spend most of the
    # test importing transformers again.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["prune", *args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def _text(tmp: Path) -> Path:
    import argparse

    p = tmp / "code.py"
    p.write_text(Path(argparse.__file__).read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return p


def test_cli_writes_a_checkpoint_and_report(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import moescope.nn.hf  # noqa: F401  registers moescope_tiny_moe

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "pruned"
    r = _run(
        "--model", str(ckpt), "--data", str(_text(tmp_path)), "--keep", "3", "--by",
        "saliency", "--out", str(out), "--seq-len", "64", "--levels", "0.5",
        "--max-tokens", "3000", "--eval-tokens", "1000",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"checkpoint: {out}" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 3
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3
    summary = json.loads((out / "moescope-prune" / "summary.json").read_text())
    before = (ckpt / "model.safetensors").stat().st_size
    after = (out / "model.safetensors").stat().st_size
    assert summary["checkpoint_bytes_before"] == before
    assert summary["checkpoint_bytes_after"] == after
    assert summary["params_after"] == sum(p.numel() for p in model.parameters())
    kept = {tuple(v) for v in summary["keep"].values()}
    assert all(len(k) == 3 for k in kept)
    levels = {(c["ordering"], c["kept"]) for c in summary["curve"]}
    assert {("none", 4), ("saliency", 3), ("saliency", 2), ("reverse", 2)} <= levels
    html = (out / "moescope-prune" / "report.html").read_text()
    assert "Keep vs loss" in html and "data:image/png;base64" in html


def test_cli_refuses_in_one_line(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    r = _run("--model", str(ckpt), "--data", str(_text(tmp_path)), "--keep", "1", "--out",
             str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fewer than the 2" in lines[0] and "keep at least 2" in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_saliency_beats_the_reverse_order_on_the_demo_model(tmp_path: Path) -> None:
    from moescope import demo
    from moescope.prune import measure_saliency, tradeoff

    settings = demo.DemoSettings(
        steps=80, log_every=20, eval_every=80, heatmap_every=80, max_bytes=400_000,
        eval_blocks=16, console=False,
    )  # fmt: skip
    train_ds, eval_ds = demo.load_data(settings)
    run = demo.train_run("no_balance", tmp_path / "run", settings, 0.0, train_ds, eval_ds)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run.checkpoint).eval()
    calib = [torch.stack([train_ds[i]["input_ids"] for i in range(j, j + 8)]) for j in (0, 8, 16)]
    held = [torch.stack([eval_ds[i]["input_ids"] for i in range(j, j + 8)]) for j in (0, 8)]
    sal = measure_saliency(model, calib)
    points = tradeoff(model, sal, [12, 8, 4], held, orderings=("saliency", "reverse"))
    loss = {(p.ordering, p.kept): p.loss for p in points}
    for n in (12, 8, 4):
        assert loss["saliency", n] <= loss["reverse", n], (n, loss)
    # ...and the ordering matters: the reverse order costs clearly more at half the experts.
    assert loss["reverse", 8] - loss["saliency", 8] > 0.05
