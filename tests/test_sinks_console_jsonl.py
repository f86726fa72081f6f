"""Console and JSONL sinks, resolve_loggers and the missing-extra errors.

Snapshots come from the real pipeline: MoEMonitor on a TinyMoELM, or LayerAccumulator
fed random RoutingRecords; expected numbers are recomputed here in float64 from the
usage counts.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope import MoEMonitor
from moescope._optional import MissingExtraError
from moescope.alerts import Alert, AlertRules, format_alert
from moescope.capture.record import RoutingRecord
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.sinks import (
    CallableLoggerSink,
    ConsoleSink,
    JsonlSink,
    LogMetricsSink,
    Sink,
    load_snapshots,
    read_jsonl,
    resolve_loggers,
)
from moescope.sinks.console import shorten_layer_names
from moescope.stats import LayerAccumulator, Snapshot, layer_stats_from_state, states_to_numpy

ROOT = Path(__file__).resolve().parents[1]


def _layer(seed: int, e: int, k: int, t: int = 128, skew: float = 0.0):
    """LayerStats of random routing; ``skew`` > 0 favours low expert ids."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=gen) - skew * torch.arange(e) / e
    idx = torch.topk(logits, k, -1).indices
    acc = LayerAccumulator(e, k, coactivation=False)
    acc.update(RoutingRecord(layer="x", num_experts=e, topk_index=idx, logits=logits))
    return layer_stats_from_state(states_to_numpy({"x": acc.state()})["x"], e, k)


def _big_snapshot(n_layers: int = 60, e: int = 128, k: int = 8) -> Snapshot:
    layers = {f"model.layers.{i}.mlp": _layer(i, e, k, t=64, skew=0.1 * i)
              for i in range(n_layers)}
    return Snapshot(step=1500, layers=layers, time=1.7e9)


@pytest.fixture(scope="module")
def monitor_run() -> tuple[Snapshot, list[Alert]]:
    """A real monitor over a tiny model, 3 windows; alerts with a low imbalance bar."""
    torch.manual_seed(0)
    cfg = TinyMoEConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=32,
                        num_experts=8, top_k=2)
    model = TinyMoELM(cfg).eval()
    mon = MoEMonitor(model, alert_rules=AlertRules(imbalance_threshold=1.2))
    snap = None
    with torch.no_grad():
        for step in (10, 20, 30):
            model(torch.randint(0, 256, (2, 24)))
            snap = mon.snapshot(step=step)
    mon.detach()
    assert snap is not None and mon.last_alerts
    return snap, list(mon.last_alerts)


def _ref_row(counts: np.ndarray) -> tuple[float, float, int]:
    c = counts.astype(np.float64)
    mean = c.mean()
    return float(np.sqrt(((c - mean) ** 2).mean()) / mean), float(c.max() / mean), int((c == 0).sum())


# ---------------------------------------------------------------------------- console


def test_console_plain_table_matches_counts(monitor_run) -> None:
    snap, _ = monitor_run
    buf = io.StringIO()
    ConsoleSink(rich=False, stream=buf).log_snapshot(snap, 30)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("MoE step 30 | 3 layers | ")
    assert f"{snap.total_tokens:,} tokens" in lines[0]
    assert lines[1].split()[:2] == ["layer", "(model.layers.*.mlp)"]
    assert lines[1].split()[2:] == ["tokens", "cv", "max/mean", "unused", "entropy", "top-1", "aux"]
    rows = lines[2:]
    assert len(rows) == 3
    for i, row in enumerate(rows):
        s = snap.layers[f"model.layers.{i}.mlp"]
        cells = row.split()
        assert cells[0] == str(i)
        assert int(cells[1].replace(",", "")) == int(s.usage_counts.sum()) // 2  # K = 2
        cv, ratio, unused = _ref_row(s.usage_counts)
        assert float(cells[2]) == pytest.approx(cv, abs=5e-4)
        assert float(cells[3]) == pytest.approx(ratio, abs=5e-3)
        assert cells[4] == f"{unused}/8"
        assert float(cells[5]) == pytest.approx(s.routing_entropy, abs=5e-4)
        assert 0 < float(cells[5]) <= math.log(8) + 1e-3
        assert float(cells[6]) == pytest.approx(s.top1_prob, abs=5e-4)
        assert float(cells[7]) == pytest.approx(s.aux_loss, abs=5e-4)


def test_console_alert_lines_exact_seed_format(monitor_run) -> None:
    snap, alerts = monitor_run
    buf = io.StringIO()
    sink = ConsoleSink(rich=True, stream=buf)
    sink.log_alerts(alerts, 30)
    got = buf.getvalue().splitlines()
    want = []
    for a in alerts:
        assert a.rule == "imbalance"
        counts = snap.layers[a.layer].usage_counts.astype(np.float64)
        ratio = counts.max() / counts.mean()
        want.append(f"⚠️  MoE Alert at step 30: {a.layer}: Severe expert imbalance (ratio: {ratio:.2f})")
    assert got == want
    buf2 = io.StringIO()
    ConsoleSink(rich=False, stream=buf2).log_alerts([], 30)
    assert buf2.getvalue() == ""


def test_console_rich_has_same_numbers(monitor_run) -> None:
    pytest.importorskip("rich")
    snap, _ = monitor_run
    buf = io.StringIO()
    sink = ConsoleSink(rich=True, stream=buf)
    assert sink.use_rich
    sink.log_snapshot(snap, 30)
    text = buf.getvalue()
    assert "\x1b[" not in text  # not a terminal: no escape codes
    first = text.splitlines()[0]
    assert first.startswith("MoE step 30 | 3 layers")
    for name, s in snap.layers.items():
        row = next(ln for ln in text.splitlines() if ln.split()[:1] == [name.split(".")[2]])
        assert f"{_ref_row(s.usage_counts)[0]:.3f}" in row
        assert f"{s.routing_entropy:.3f}" in row


@pytest.mark.parametrize("use_rich", [False, True])
def test_console_compact_for_60_layers_128_experts(use_rich: bool) -> None:
    if use_rich:
        pytest.importorskip("rich")
    snap = _big_snapshot()
    buf = io.StringIO()
    ConsoleSink(rich=use_rich, stream=buf, max_layers=12).log_snapshot(snap, 1500)
    lines = buf.getvalue().splitlines()
    assert len(lines) <= 12 + 5
    assert max(len(ln) for ln in lines[1:]) <= 120
    # The 12 most imbalanced layers (independent ranking) are the ones listed.
    ratios = {n: _ref_row(s.usage_counts)[1] for n, s in snap.layers.items()}
    top = sorted(ratios, key=ratios.__getitem__, reverse=True)[:12]
    shown = [ln.split()[0] for ln in lines if ln.split() and ln.split()[0].isdigit()]
    assert sorted(shown, key=int) == sorted((n.split(".")[2] for n in top), key=int)
    assert any("48 more layers not shown" in ln for ln in lines)
    assert f"unused {snap.total_unused_experts}/{60 * 128}" in lines[0]


def test_shorten_layer_names() -> None:
    assert shorten_layer_names(["model.layers.0.mlp", "model.layers.11.mlp"]) == (
        ["0", "11"], "model.layers.*.mlp")
    assert shorten_layer_names(["a.mlp"]) == (["a.mlp"], "")
    # Stripping would leave an empty name: keep the names whole.
    assert shorten_layer_names(["x.mlp", "x.mlp.inner"])[1] == ""
    assert shorten_layer_names(["enc.0.moe", "dec.0.moe"]) == (["enc", "dec"], "*.0.moe")


# ------------------------------------------------------------------------------ JSONL


def test_jsonl_round_trip_and_alert_embedding(tmp_path: Path, monitor_run) -> None:
    snap, alerts = monitor_run
    path = tmp_path / "logs" / "moe.jsonl"
    sink = JsonlSink(path)
    sink.log_alerts(alerts, 30)  # before its snapshot: embedded in the snapshot line
    sink.log_snapshot(snap, 30)
    sink.log_snapshot(snap, 40)
    sink.log_alerts(alerts[:1], 40)  # after: its own line
    sink.log_metrics({"moe/avg_expert_cv": 0.5}, 40)  # metrics=False: not written
    sink.log_images({"moe/usage_heatmap": tmp_path / "h.png"}, 40)
    sink.close()
    recs = read_jsonl(path, strict=True)
    assert [r["kind"] for r in recs] == ["snapshot", "snapshot", "alerts", "images"]
    assert [r["step"] for r in recs] == [30, 40, 40, 40]
    assert recs[3]["images"] == {"moe/usage_heatmap": str((tmp_path / "h.png").resolve())}
    assert [a["text"] for a in recs[0]["alerts"]] == [format_alert(a) for a in alerts]
    assert recs[1]["alerts"] == []
    assert recs[2]["alerts"][0]["layer"] == alerts[0].layer
    assert recs[2]["alerts"][0]["value"] == pytest.approx(alerts[0].value)
    back = load_snapshots(path)
    assert len(back) == 2
    for name, s in snap.layers.items():
        np.testing.assert_array_equal(back[0].layers[name].usage_counts, s.usage_counts)
        np.testing.assert_allclose(back[0].layers[name].usage_fraction, s.usage_fraction)
        assert back[0].layers[name].cv == s.cv
        assert back[0].layers[name].coactivation.shape == (8, 8)


def test_jsonl_metrics_lines_and_nan(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with JsonlSink(path, metrics=True, fsync=True) as sink:
        sink.log_metrics({"moe/a": 1.5, "moe/b": float("nan")}, 7)
    (rec,) = read_jsonl(path, strict=True)
    assert rec["kind"] == "metrics" and rec["step"] == 7
    assert rec["metrics"] == {"moe/a": 1.5, "moe/b": None}


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_sinks_console_jsonl import _layer
    from moescope.sinks import JsonlSink
    from moescope.stats import Snapshot
    sink = JsonlSink({path!r}, fsync={fsync})
    for i in range({n}):
        snap = Snapshot(step=i, layers={{"model.layers.0.mlp": _layer(i, 16, 2)}})
        sink.log_snapshot(snap, i)
    if {how!r} == "exit":
        os._exit(1)  # no close, no atexit, no buffer flush by the interpreter
    raise RuntimeError("boom")
    """
)


@pytest.mark.parametrize(("how", "fsync"), [("exit", False), ("raise", True)])
def test_jsonl_crash_leaves_every_line_valid(tmp_path: Path, how: str, fsync: bool) -> None:
    path = tmp_path / "crash.jsonl"
    n = 5
    script = _CRASH_SCRIPT.format(tests=str(ROOT / "tests"), path=str(path), n=n,
                                  how=how, fsync=fsync)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    if how == "raise":
        assert "boom" in proc.stderr
    raw = path.read_text(encoding="utf-8").splitlines()
    assert len(raw) == n
    recs = [json.loads(line) for line in raw]
    assert [r["step"] for r in recs] == list(range(n))
    for i, r in enumerate(recs):
        ref = _layer(i, 16, 2)
        assert r["snapshot"]["layers"]["model.layers.0.mlp"]["usage_counts"] == ref.usage_counts.tolist()


def test_jsonl_restart_appends_and_repairs_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    s1 = Snapshot(step=1, layers={"l": _layer(1, 8, 2)})
    s2 = Snapshot(step=2, layers={"l": _layer(2, 8, 2)})
    with JsonlSink(path) as sink:
        sink.log_snapshot(s1, 1)
    # The previous run died in the middle of a line.
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "snapshot", "st')
    with JsonlSink(path) as sink:  # a restarted run
        sink.log_snapshot(s2, 2)
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 2]
    with pytest.raises(ValueError, match=r"run.jsonl:2: not a JSON object"):
        read_jsonl(path, strict=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["step"] == 1 and json.loads(lines[2])["step"] == 2


# --------------------------------------------------------------------- resolve_loggers


class _DictLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int]] = []

    def log(self, data: dict, step: int | None = None) -> None:
        self.calls.append((dict(data), step))


def test_resolve_generic_and_lists(monitor_run) -> None:
    snap, _ = monitor_run
    assert resolve_loggers(None) == []
    console = ConsoleSink(stream=io.StringIO())
    assert resolve_loggers(console) == [console]
    user = _DictLogger()
    sinks = resolve_loggers([user, [console, None]])
    assert isinstance(sinks[0], CallableLoggerSink) and sinks[1] is console
    metrics = snap.to_dict()
    for s in sinks:
        s.log_metrics(metrics, 30)
    assert user.calls == [(metrics, 30)]
    finite = CallableLoggerSink(user, finite_only=True)
    finite.log_metrics({"a": 1.0, "b": float("nan")}, 31)
    assert user.calls[-1] == ({"a": 1.0}, 31)


class _LightningLikeLogger:
    """The part of lightning.pytorch.loggers.Logger a sink uses."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, int | None]] = []
        self.saved = 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))

    def save(self) -> None:
        self.saved += 1


def test_resolve_log_metrics_objects(monitor_run) -> None:
    snap, _ = monitor_run
    lg = _LightningLikeLogger()
    (sink,) = resolve_loggers(lg)
    assert isinstance(sink, LogMetricsSink)
    sink.log_metrics(snap.to_dict(), 12)
    sink.flush()
    assert lg.calls == [(snap.to_dict(), 12)] and lg.saved == 1


@pytest.mark.parametrize("bad", [object(), 3, "wandb", {"log": 1}])
def test_resolve_unknown_raises_naming_accepted(bad: object) -> None:
    with pytest.raises(TypeError, match=r"SummaryWriter.*mlflow module.*\.log\(dict, step=\.\.\.\).*Lightning"):
        resolve_loggers(bad)


def test_base_sink_is_a_noop(monitor_run) -> None:
    snap, alerts = monitor_run
    s = Sink()
    s.log_metrics(snap.to_dict(), 1)
    s.log_snapshot(snap, 1)
    s.log_alerts(alerts, 1)
    s.log_images({}, 1)
    s.flush()
    s.close()


@pytest.mark.parametrize(
    ("module", "build", "extra"),
    [
        ("wandb", "moescope.sinks.wandb_sink:WandbSink", "wandb"),
        ("mlflow", "moescope.sinks.mlflow_sink:MLflowSink", "mlflow"),
        ("tensorboard", "moescope.sinks.tb_sink:TensorBoardSink", "tensorboard"),
    ],
)
def test_missing_extra_names_it(monkeypatch, tmp_path: Path, module: str, build: str,
                                extra: str) -> None:
    import importlib

    mod_name, cls_name = build.split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    kwargs = {"log_dir": tmp_path} if module == "tensorboard" else {}
    with pytest.raises(MissingExtraError, match=rf"pip install 'moescope\[{extra}\]'"):
        cls(**kwargs)


def test_missing_matplotlib_names_plots_extra(monkeypatch) -> None:
    from moescope.report.plots import usage_heatmap

    snap = Snapshot(step=1, layers={"l": _layer(1, 8, 2)})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"moescope\[plots\]"):
        usage_heatmap(snap)


def test_console_default_stream_is_stdout_at_call_time(capsys, monitor_run) -> None:
    snap, alerts = monitor_run
    sink = ConsoleSink(rich=False)
    sink.log_snapshot(snap, 30)
    sink.log_alerts(alerts[:1], 30)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("MoE step 30 |") and out[-1] == format_alert(alerts[0])


def test_importing_sinks_and_report_pulls_no_optional_package() -> None:
    code = (
        "import sys, moescope.sinks, moescope.report; "
        "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard', 'matplotlib', 'rich') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_real_lightning_csv_logger(tmp_path: Path, monitor_run) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    import csv

    snap, _ = monitor_run
    lg = loggers.CSVLogger(save_dir=str(tmp_path), name="run")
    (sink,) = resolve_loggers(lg)
    assert isinstance(sink, LogMetricsSink)
    sink.log_metrics(snap.to_dict(), 30)
    sink.flush()
    with open(Path(lg.log_dir) / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["step"]) == 30
    assert float(row["moe/avg_expert_cv"]) == pytest.approx(snap.avg_expert_cv, rel=1e-9)
    assert float(row["moe/model.layers.1.mlp/aux_loss"]) == pytest.approx(
        snap.layers["model.layers.1.mlp"].aux_loss, rel=1e-9)
