"""Reports open with a verdict: what is wrong, where, what it means and the fix.

A collapsed run (router weights x 0: every score ties, every token goes to the same K
experts) is analysed with the real ``run_analyze`` and its training log compared with a
balanced one through the real JsonlSink and ``compare_sources``; the first section of
each report must name the fault, the layers/experts and the console's remediation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

from conftest import random_layer_stats, save_tiny_checkpoint
from moescope import MoEMonitor
from moescope.alerts import RULES, AlertRules
from moescope.analysis.verdict import diagnose
from moescope.data import stdlib_dir
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.sinks.event import LogEvent
from moescope.sinks.jsonl import JsonlSink
from moescope.stats.snapshot import Snapshot


def _first_section(html: str) -> str:
    m = re.search(r"<section\b.*?</section>", html, re.S)
    assert m is not None
    return m.group(0)


def _text(fragment: str) -> str:
    import html as h

    return h.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_diagnose_names_layers_experts_and_fix() -> None:
    layers = {
        "model.layers.0.mlp": random_layer_stats(0, 8, 2, t=200),
        "model.layers.1.mlp": random_layer_stats(1, 8, 2, t=200, skew=60.0),
    }
    snap = Snapshot(step=3, layers=layers)
    alerts = AlertRules().check(snap)
    v = diagnose(snap, alerts)
    bad = layers["model.layers.1.mlp"]
    assert bad.unused_experts >= 2  # skewed: most slots go to the low ids
    unused = next(f for f in v.findings if f.rule == "unused_experts")
    assert unused.layers == ["model.layers.1.mlp"]
    assert unused.experts["model.layers.1.mlp"] == np.nonzero(bad.usage_counts == 0)[0].tolist()
    assert unused.fix == RULES["unused_experts"].remediation
    assert unused.threshold == 0.25
    assert f"{int(bad.unused_experts)} of the 8 experts" in unused.meaning
    assert v.status == "warning" and v.headline.startswith(f"{len(v.findings)} problem")
    # Repeated windows: one finding per rule, counting firings and windows.
    again = [*alerts, *AlertRules().check(Snapshot(step=4, layers=layers))]
    for a in again[len(alerts) :]:
        a.step = 4
    for a in alerts:
        a.step = 3
    v2 = diagnose(snap, again)
    assert len(v2.findings) == len(v.findings)
    u2 = next(f for f in v2.findings if f.rule == "unused_experts")
    assert (u2.firings, u2.windows, u2.since, u2.last) == (2, 2, 3, 4)
    # A log whose alerts stopped before its last window: resolved, healthy at the end.
    late = diagnose(snap, again, last_step=9)
    assert late.status == "healthy" and not any(f.active for f in late.findings)
    assert late.problems == 0 and "resolved" in late.headline
    assert diagnose(snap, again, last_step=4).problems == v.problems
    healthy = diagnose(Snapshot(step=1, layers={"a": layers["model.layers.0.mlp"]}), [])
    assert healthy.status == "healthy" and "max/mean load > 4" in healthy.checked


def _collapsed_checkpoint(path: Path) -> Path:
    from moescope.nn.hf import TinyMoEForCausalLM

    save_tiny_checkpoint(path, seed=0)
    model = TinyMoEForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.router.weight"):
                p.zero_()
    model.save_pretrained(path)
    return path


def test_collapsed_analysis_report_opens_with_the_verdict(tmp_path: Path) -> None:
    from moescope.analysis import run_analyze

    ckpt = _collapsed_checkpoint(tmp_path / "collapsed_run" / "checkpoint")
    report = run_analyze(
        model=str(ckpt),
        data=[str(stdlib_dir() / "bisect.py")],
        max_tokens=256,
        batch_size=4,
        seq_len=64,
        out=str(tmp_path / "out"),
        overwrite=True,
    )
    html = Path(report).read_text(encoding="utf-8")
    first = _first_section(html)
    assert 'id="verdict"' in first and "verdict warning" in first
    text = _text(first)
    assert "Unused experts" in text
    summary = json.loads((Path(report).parent / "summary.json").read_text(encoding="utf-8"))
    assert summary["verdict"]["status"] == "warning"  # the same verdict, for scripts
    assert summary["verdict"]["headline"] in text
    assert summary["verdict"]["findings"][0]["rule"] == "unused_experts"
    for i in (0, 1):
        counts = np.array(summary["layers"][f"model.layers.{i}.mlp"]["usage_counts"])
        idle = ", ".join(str(e) for e in np.nonzero(counts == 0)[0])
        assert len(idle.split(", ")) == 2  # top-2 of 4 tied scores: two experts idle
        assert f"layer {i} (experts {idle})" in text
    assert "4 of the 8 experts (50%) in 2 of 2 MoE layers received no token" in text
    assert RULES["unused_experts"].remediation in text  # the console's fix
    assert "AlertRules(unused_fraction_threshold=0.25)" in text
    # The verdict comes before the table of contents (first screen).
    assert html.index('id="verdict"') < html.index('<nav class="toc">')
    # Title: the model, not the folder it was saved in.
    title = re.search(r"<h1>(.*?)</h1>", html).group(1)  # type: ignore[union-attr]
    assert "TinyMoEForCausalLM" in title and "checkpoint" not in title
    assert "Alerts (2)" in html


def _train_log(path: Path, skew: float, experts: int = 8, steps: int = 3) -> None:
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=16, num_experts=experts, top_k=2,
    )  # fmt: skip
    model = TinyMoELM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(skew)
    mon = MoEMonitor(model, history=0)
    rules = AlertRules()
    sink = JsonlSink(path)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        with torch.no_grad():
            model(torch.randint(0, 64, (4, 16), generator=gen))
        snap = mon.snapshot(reset=True, step=step)
        sink.write(LogEvent(step=step, snapshot=snap, alerts=tuple(rules.check(snap))))
    sink.close()
    mon.detach()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verdict-logs")
    out = {}
    for name, skew, e in (("collapsed", 0.0, 8), ("balanced", 1.0, 8), ("small", 1.0, 4)):
        out[name] = root / name / "moe_logs" / "moe_detailed.jsonl"
        _train_log(out[name], skew, experts=e)
    return out


def _compare(a: Path, b: Path, out: Path) -> tuple[Any, str]:
    from moescope.analysis.compare import compare_sources, write_comparison

    cmp = compare_sources(a, b)
    report = write_comparison(cmp, out)
    return cmp, report.read_text(encoding="utf-8")


def test_compare_report_opens_with_the_verdict(logs: dict[str, Path], tmp_path: Path) -> None:
    cmp, html = _compare(logs["collapsed"], logs["balanced"], tmp_path / "cmp")
    assert cmp.healthier == "balanced"
    first = _text(_first_section(html))
    assert "balanced is healthier than collapsed." in first
    assert "unused experts: 12/16 in collapsed, 0/16 in balanced" in first
    assert "Where they differ most: layer " in first
    assert RULES["unused_experts"].remediation in first
    assert "collapsed: 1 problem on 2 of 2 MoE layers: unused experts on 2 layers." in first
    # Repeated alerts grouped: 3 windows x 2 layers = 6 alerts, one row for the rule.
    alerts = html[html.index('<section id="alerts"') :]
    assert "collapsed: 6 alerts" in alerts
    assert "balanced: 0 alerts" in alerts or "balanced: No alert" in _text(alerts)
    rows = re.findall(r"<tr><td class=\"l\"><span class=\"alert-warning\">unused_experts", alerts)
    assert len(rows) == 1
    assert " alerts</h3>" in alerts and "1 alerts" not in _text(html)
    assert cmp.to_json()["healthier"] == "balanced"


def test_compare_different_expert_counts_says_so(logs: dict[str, Path], tmp_path: Path) -> None:
    cmp, html = _compare(logs["balanced"], logs["small"], tmp_path / "cmp")
    assert all(np.isnan(x.js) for x in cmp.layers)
    assert "No divergence to draw" in html
    assert not (tmp_path / "cmp" / "divergence.png").exists()
    assert (tmp_path / "cmp" / "usage_side_by_side.png").exists()
    assert "different expert counts" in html


def test_balance_panel_with_no_unused_expert_has_a_zero_based_axis(
    logs: dict[str, Path],
) -> None:
    from moescope.analysis.compare import compare_sources
    from moescope.report.compare_report import balance_figure

    cmp = compare_sources(logs["balanced"], logs["balanced"], labels=["a", "b"])
    fig = balance_figure(cmp)
    unused_ax = fig.axes[2]
    assert unused_ax.get_ylabel() == "unused experts"
    assert unused_ax.get_ylim() == (0.0, 1.0)
