"""``moescope compare`` (moescope.analysis.compare + report.compare_report): two training
logs written by the real JsonlSink, or an analyze summary written by the real
``write_summary``, read back and compared; divergences checked against scipy, usage and
time series against the snapshots that were logged, files read back from disk."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from moescope import MoEMonitor
from moescope.alerts import AlertRules
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.sinks.event import LogEvent
from moescope.sinks.jsonl import JsonlSink

STEPS = 3


def _strict(text: str) -> Any:
    def no_constant(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


def _train_log(path: Path, skew: float) -> list[tuple[Any, list[Any]]]:
    """Three logged windows of a tiny MoE with router weights x ``skew`` (0: every router
    score ties, so every token goes to the same K experts: a collapsed router); returns
    [(snapshot, alerts)] as logged."""
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=16,
        num_experts=8,
        top_k=2,
    )
    model = TinyMoELM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(skew)
    mon = MoEMonitor(model, history=0)
    rules = AlertRules()
    sink = JsonlSink(path)
    logged = []
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            model(torch.randint(0, 64, (4, 16), generator=gen))
        snap = mon.snapshot(reset=True, step=step)
        alerts = rules.check(snap)
        sink.write(LogEvent(step=step, snapshot=snap, alerts=tuple(alerts)))
        logged.append((snap, alerts))
    sink.close()
    mon.detach()
    return logged


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("logs")
    out = {}
    for name, skew in (("balanced", 1.0), ("collapsed", 0.0)):
        path = root / name / "moe_logs" / "moe_detailed.jsonl"
        out[name] = (path, _train_log(path, skew))
    return out


def test_two_training_logs(logs: dict[str, Any], tmp_path: Path) -> None:
    from scipy.spatial.distance import jensenshannon

    from moescope.analysis.compare import compare_sources, write_comparison

    (pa, la), (pb, lb) = logs["collapsed"], logs["balanced"]
    # A run directory is enough: its moe_logs/moe_detailed.jsonl is found, label = run name.
    cmp = compare_sources(pa.parent.parent, pb)
    assert (cmp.a.label, cmp.b.label) == ("collapsed", "balanced")
    assert cmp.a.kind == cmp.b.kind == "training"
    last_a, last_b = la[-1][0], lb[-1][0]
    assert [x.layer for x in cmp.layers] == list(last_a.layers)
    for x in cmp.layers:
        ua, ub = last_a.layers[x.layer].usage_fraction, last_b.layers[x.layer].usage_fraction
        np.testing.assert_allclose(x.usage_a, ua, rtol=0, atol=1e-12)
        np.testing.assert_allclose(x.usage_b, ub, rtol=0, atol=1e-12)
        assert x.js == pytest.approx(jensenshannon(ua, ub) ** 2, abs=1e-12)
        assert x.metrics["cv"] == pytest.approx(
            (last_a.layers[x.layer].cv, last_b.layers[x.layer].cv), rel=1e-12
        )
    assert cmp.mean_js == pytest.approx(np.mean([x.js for x in cmp.layers]), rel=1e-12)
    assert cmp.mean_js > 0.05  # a collapsed router against a balanced one
    # Time series: one point per logged window, equal to what was logged.
    assert cmp.a.steps == list(range(1, STEPS + 1))
    assert cmp.a.series["avg_expert_cv"] == pytest.approx([s.avg_expert_cv for s, _ in la])
    assert cmp.a.series["total_unused_experts"] == [s.total_unused_experts for s, _ in la]
    # Alerts: every alert that was logged, and only those.
    assert len(cmp.a.alerts) == sum(len(a) for _, a in la) > 0
    assert len(cmp.b.alerts) == sum(len(a) for _, a in lb)

    report = write_comparison(cmp, tmp_path / "cmp")
    assert report == tmp_path / "cmp" / "report.html"
    data = _strict((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["a"]["label"] == "collapsed" and data["b"]["alert_counts"] == cmp.b.alert_counts()
    assert [round(x["js"], 12) for x in data["layers"]] == [round(x.js, 12) for x in cmp.layers]
    html = report.read_text()
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert pngs == ["balance.png", "divergence.png", "series.png", "usage_side_by_side.png"]
    assert len(re.findall(r"<img ", html)) == len(pngs)
    for sid in ("overview", "usage", "divergence", "balance", "series", "alerts"):
        assert f'<section id="{sid}">' in html, sid
    assert "<script" not in html.lower()


def test_analysis_summary_against_a_log(logs: dict[str, Any], tmp_path: Path) -> None:
    from moescope.analysis.compare import compare_sources, write_comparison
    from moescope.analysis.result import AnalysisResult, DomainInfo, ModelInfo, write_summary

    path, logged = logs["balanced"]
    snap = logged[0][0]
    result = AnalysisResult(
        settings={"batch_size": 4, "seq_len": 16},
        snapshot=snap,
        alerts=[],
        model=ModelInfo(
            "ckpt", "moescope_tiny_moe", "TinyMoELM", False, "", "bytes", 64, "cpu", "float32"
        ),
        domains=[DomainInfo("x", "x.txt", tokens=snap.total_tokens)],
        partial=True,
    )
    out = tmp_path / "analysis"
    out.mkdir()
    write_summary(result, out)
    cmp = compare_sources(out, path, labels=["analysed", "trained"])
    assert (cmp.a.kind, cmp.b.kind) == ("analysis", "training")
    assert cmp.a.tokens == snap.total_tokens and cmp.a.steps == []
    assert any("partial" in n for n in cmp.notes)
    # Window 1 of the log against its last window: same model, data moved on.
    for x in cmp.layers:
        np.testing.assert_allclose(x.usage_a, snap.layers[x.layer].usage_fraction, atol=1e-12)
    report = write_comparison(cmp, tmp_path / "cmp")
    assert '<section id="series">' in report.read_text()  # the log side has a series


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moescope.cli", "compare", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_and_bad_input(logs: dict[str, Any], tmp_path: Path) -> None:
    from moescope.cli import main

    a, b = str(logs["collapsed"][0]), str(logs["balanced"][0])
    out = tmp_path / "out"
    proc = _cli(a, b, "--out", str(out), "--labels", "no_balance,balanced")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {out / 'report.html'}"
    assert "no_balance vs balanced" in (out / "report.html").read_text()

    not_summary = tmp_path / "other.json"
    not_summary.write_text(json.dumps({"format": "something/1"}))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    no_snapshots = tmp_path / "alerts_only.jsonl"
    no_snapshots.write_text('{"kind": "alerts", "step": 1, "alerts": []}\n')
    cases = {
        "missing": ([str(tmp_path / "nope"), b], "no such file or directory"),
        "empty dir": ([str(empty_dir), b], "neither summary.json"),
        "not a summary": ([str(not_summary), b], "not a moescope analyze summary"),
        "no snapshot": ([str(no_snapshots), b], "no snapshot line"),
        "bad labels": ([a, b, "--labels", "one"], "two different names"),
    }
    # One fresh interpreter shows the one-line contract as a user sees it; the rest run
    # through main() in this process.
    proc = _cli(*cases["missing"][0], "--out", str(tmp_path / "bad"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("moescope compare: error: ")
    assert "no such file or directory" in lines[0]
    for name, (args, needle) in cases.items():
        buf = io.StringIO()  # main() prints to sys.stderr
        with contextlib.redirect_stderr(buf):
            assert main(["compare", *args, "--out", str(tmp_path / "bad")]) == 2
        lines = buf.getvalue().strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (name, lines)
    assert not (tmp_path / "bad").exists()
