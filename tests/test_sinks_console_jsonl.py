"""Console and JSONL sinks, resolve_loggers and the missing-extra errors.

Snapshots come from the real pipeline: MoEMonitor on a TinyMoELM, or LayerAccumulator
fed random RoutingRecords; expected numbers are recomputed here in float64 from the
usage counts (co-activation from the routed ids themselves).
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

from conftest import random_layer_stats
from moescope import MoEMonitor
from moescope._optional import MissingExtraError
from moescope.alerts import Alert, AlertRules, format_alert
from moescope.capture.record import RoutingRecord
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.sinks import (
    SCHEMA_VERSION,
    CallableLoggerSink,
    ConsoleSink,
    JsonlSink,
    LogEvent,
    LogMetricsSink,
    Sink,
    coactivation_of,
    load_snapshots,
    read_jsonl,
    resolve_loggers,
)
from moescope.sinks.console import format_model_line, shorten_layer_names
from moescope.stats import (
    LayerAccumulator,
    LayerStats,
    Snapshot,
    layer_stats_from_state,
    states_to_numpy,
)

ROOT = Path(__file__).resolve().parents[1]


def _layer(seed: int, e: int, k: int, t: int = 128, skew: float = 0.0) -> LayerStats:
    """LayerStats of random routing; ``skew`` > 0 favours low expert ids."""
    return random_layer_stats(seed, e, k, t, skew)


def _big_snapshot(n_layers: int = 60, e: int = 128, k: int = 8) -> Snapshot:
    layers = {f"model.layers.{i}.mlp": _layer(i, e, k, t=64, skew=0.1 * i) for i in range(n_layers)}
    return Snapshot(step=1500, layers=layers, time=1.7e9)


@pytest.fixture(scope="module")
def monitor_run() -> tuple[Snapshot, list[Alert]]:
    """A real monitor over a tiny model, 3 windows; alerts with a low imbalance bar."""
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        hidden_size=32, num_layers=3, num_heads=2, intermediate_size=32, num_experts=8, top_k=2
    )
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
    return (
        float(np.sqrt(((c - mean) ** 2).mean()) / mean),
        float(c.max() / mean),
        int((c == 0).sum()),
    )


# ---------------------------------------------------------------------------- console


def test_console_plain_table_matches_counts(monitor_run) -> None:
    snap, _ = monitor_run
    buf = io.StringIO()
    ConsoleSink(rich=False, stream=buf).write(LogEvent(step=30, snapshot=snap))
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
    sink = ConsoleSink(rich=True, stream=buf, table=False)
    sink.write(LogEvent(step=30, snapshot=snap, alerts=alerts))
    got = buf.getvalue().splitlines()
    want = []
    fix = "    fix: raise the load-balancing (aux) loss coefficient"
    for i, a in enumerate(alerts):
        assert a.rule == "imbalance"
        counts = snap.layers[a.layer].usage_counts.astype(np.float64)
        ratio = counts.max() / counts.mean()
        want.append(
            f"⚠️  MoE Alert at step 30: {a.layer}: Severe expert imbalance (ratio: {ratio:.2f})"
        )
        # The metric against its threshold, then (once per rule) what to do.
        want.append(f"    max/mean load {ratio:.2f} > 1.2 threshold")
        if i == 0:
            want.append(next(ln for ln in got if ln.startswith(fix)))
    assert got == want
    buf2 = io.StringIO()
    ConsoleSink(rich=False, stream=buf2).write(LogEvent(step=30))
    assert buf2.getvalue() == ""


def test_console_groups_repeated_alerts(monitor_run) -> None:
    """Three windows with the same alerts, then two without: full lines once, then
    nothing (no reminder due), then one "resolved" line per (layer, rule)."""
    snap, alerts = monitor_run
    buf = io.StringIO()
    sink = ConsoleSink(rich=False, stream=buf, table=False, remind_every=2)
    per_step = {}
    for step, al in ((30, alerts), (40, alerts), (50, alerts), (60, []), (70, [])):
        start = len(buf.getvalue())
        sink.write(LogEvent(step=step, snapshot=snap, alerts=al))
        per_step[step] = buf.getvalue()[start:].splitlines()
    n = len(alerts)
    assert sum(ln.startswith("⚠️  MoE Alert") for ln in per_step[30]) == n
    assert per_step[40] == []  # still firing: not reprinted
    # Two windows without change: one summary line naming the rule and its start.
    (summary,) = per_step[50]
    where = f"{n} layers" if n > 1 else alerts[0].layer
    assert summary.startswith(
        f"    MoE alerts still firing at step 50: imbalance on {where} since step 30"
    )
    assert per_step[60] == []  # one quiet window is not yet "resolved" (resolve_after=2)
    assert per_step[70] == [
        f"    MoE alert resolved at step 70: {a.layer}: imbalance (firing since step 30)"
        for a in alerts
    ]
    # Ungrouped: every alert of every window, as before.
    buf2 = io.StringIO()
    flat = ConsoleSink(rich=False, stream=buf2, table=False, group_alerts=False)
    for step in (30, 40):
        flat.write(LogEvent(step=step, alerts=alerts))
    lines = [ln for ln in buf2.getvalue().splitlines() if ln.startswith("⚠️")]
    assert lines == [format_alert(a) for _ in (30, 40) for a in alerts]


def test_console_rich_has_same_numbers(monitor_run) -> None:
    pytest.importorskip("rich")
    snap, _ = monitor_run
    buf = io.StringIO()
    sink = ConsoleSink(rich=True, stream=buf)
    assert sink.use_rich
    sink.write(LogEvent(step=30, snapshot=snap))
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
    ConsoleSink(rich=use_rich, stream=buf, max_layers=12).write(LogEvent(step=1500, snapshot=snap))
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
        ["0", "11"],
        "model.layers.*.mlp",
    )
    assert shorten_layer_names(["a.mlp"]) == (["a.mlp"], "")
    # Stripping would leave an empty name: keep the names whole.
    assert shorten_layer_names(["x.mlp", "x.mlp.inner"])[1] == ""
    assert shorten_layer_names(["enc.0.moe", "dec.0.moe"]) == (["enc", "dec"], "*.0.moe")


# ------------------------------------------------------------------------------ JSONL


def test_jsonl_round_trip_and_alert_embedding(tmp_path: Path, monitor_run) -> None:
    snap, alerts = monitor_run
    path = tmp_path / "logs" / "moe.jsonl"
    sink = JsonlSink(path, coactivation_full_every=40)
    sink.write(LogEvent(step=30, snapshot=snap, alerts=alerts, metrics=snap.to_dict()))
    sink.write(LogEvent(step=40, snapshot=snap, figures={"moe/usage_heatmap": object()}))
    sink.write(LogEvent(step=40, alerts=alerts[:1]))  # alerts without a snapshot
    sink.write(LogEvent(step=45, metrics={"moe/eval/avg_expert_cv": 0.5}, mode="eval"))
    sink.close()
    recs = read_jsonl(path, strict=True)
    assert [r["kind"] for r in recs] == ["snapshot", "snapshot", "alerts"]  # metrics=False
    assert [r["step"] for r in recs] == [30, 40, 40]
    assert all(r["schema"] == SCHEMA_VERSION == 2 for r in recs)
    assert [a["text"] for a in recs[0]["alerts"]] == [format_alert(a) for a in alerts]
    assert recs[0]["alerts"][0]["detail"] == alerts[0].detail
    assert recs[0]["alerts"][0]["threshold"] == 1.2
    assert recs[1]["alerts"] == [] and recs[1]["figures"] == ["moe/usage_heatmap"]
    assert "figures" not in recs[0]
    assert recs[2]["alerts"][0]["layer"] == alerts[0].layer
    assert recs[2]["alerts"][0]["value"] == pytest.approx(alerts[0].value)
    # Step 30: sparse co-activation (8 experts: every non-zero pair fits in the top 128);
    # step 40: the full matrices (coactivation_full_every=40).
    assert "coactivation_sparse" in recs[0] and "coactivation_sparse" not in recs[1]
    for name, s in snap.layers.items():
        assert recs[0]["snapshot"]["layers"][name]["coactivation"] is None
        np.testing.assert_array_equal(coactivation_of(recs[0], name), s.coactivation)
        np.testing.assert_array_equal(coactivation_of(recs[1], name), s.coactivation)
    back = load_snapshots(path)
    assert len(back) == 2
    for name, s in snap.layers.items():
        np.testing.assert_array_equal(back[0].layers[name].usage_counts, s.usage_counts)
        np.testing.assert_allclose(back[0].layers[name].usage_fraction, s.usage_fraction)
        assert back[0].layers[name].cv == s.cv
        for b in back:
            np.testing.assert_array_equal(b.layers[name].coactivation, s.coactivation)


def _coact_layer(seed: int, e: int, k: int, t: int) -> tuple[object, np.ndarray]:
    """(LayerStats with co-activation, the [E, E] matrix recomputed from the ids)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=gen) - 3.0 * torch.arange(e) / e
    idx = torch.topk(logits, k, -1).indices
    acc = LayerAccumulator(e, k, coactivation=True)
    acc.update(RoutingRecord(layer="x", num_experts=e, topk_index=idx, logits=logits))
    stats = layer_stats_from_state(states_to_numpy({"x": acc.state()})["x"], e, k)
    ref = np.zeros((e, e), dtype=np.int64)
    for row in idx.numpy():
        for a in row:
            for b in row:
                ref[a, b] += 1  # a == b: the usage count on the diagonal
    return stats, ref


def test_jsonl_line_size_is_bounded_at_256_experts(tmp_path: Path) -> None:
    e, k = 256, 8
    layers, refs = {}, {}
    for i in range(2):
        layers[f"model.layers.{i}.mlp"], refs[f"model.layers.{i}.mlp"] = _coact_layer(i, e, k, 512)
    snap = Snapshot(step=0, layers=layers, time=1.7e9)
    path = tmp_path / "big.jsonl"
    with JsonlSink(path, coactivation_top=128, coactivation_full_every=1000) as sink:
        for step in (500, 1000, 1500):
            sink.write(LogEvent(step=step, snapshot=snap))
    raw = path.read_text(encoding="utf-8").splitlines()
    sizes = [len(line.encode()) for line in raw]
    # Sparse lines: O(L x (E + top)) — under 40 KB; the full line (step 1000) holds the
    # 2 x 256 x 256 matrices (> 128 K numbers).
    assert sizes[0] < 40_000 and sizes[2] < 40_000
    assert sizes[1] > 5 * sizes[0]
    recs = [json.loads(line) for line in raw]
    for name, ref in refs.items():
        sp = recs[0]["coactivation_sparse"][name]
        upper = ref[np.triu_indices(e, 1)]
        assert sp["pairs"] == int((upper > 0).sum())
        assert len(sp["n"]) == 128 < sp["pairs"]
        # The kept counts are the 128 largest off-diagonal counts, each at its (i, j).
        assert sp["n"] == sorted(upper.tolist(), reverse=True)[:128]
        assert all(
            i < j and ref[i, j] == n for i, j, n in zip(sp["i"], sp["j"], sp["n"], strict=True)
        )
        assert coactivation_of(recs[0], name) is None  # incomplete: not a matrix by default
        part = coactivation_of(recs[0], name, partial=True)
        assert part is not None and int(part.sum() - np.trace(part)) == 2 * sum(sp["n"])
        np.testing.assert_array_equal(coactivation_of(recs[1], name), ref)
    back = load_snapshots(path)
    assert back[0].layers["model.layers.0.mlp"].coactivation is None
    np.testing.assert_array_equal(
        back[1].layers["model.layers.0.mlp"].coactivation, refs["model.layers.0.mlp"]
    )


def test_jsonl_metrics_lines_and_nan(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with JsonlSink(path, metrics=True, fsync=True) as sink:
        sink.write(LogEvent(step=7, metrics={"moe/a": 1.5, "moe/b": float("nan")}))
        sink.write(LogEvent(step=8, metrics={"moe/eval/a": 2.0}, mode="eval"))
    recs = read_jsonl(path, strict=True)
    assert [(r["kind"], r["step"], r["mode"]) for r in recs] == [
        ("metrics", 7, "train"),
        ("metrics", 8, "eval"),
    ]
    assert recs[0]["metrics"] == {"moe/a": 1.5, "moe/b": None}


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_sinks_console_jsonl import _layer
    from moescope.sinks import JsonlSink, LogEvent
    from moescope.stats import Snapshot
    sink = JsonlSink({path!r}, fsync={fsync})
    for i in range({n}):
        snap = Snapshot(step=i, layers={{"model.layers.0.mlp": _layer(i, 16, 2)}})
        sink.write(LogEvent(step=i, snapshot=snap))
    if {how!r} == "exit":
        os._exit(1)  # no close, no atexit, no buffer flush by the interpreter
    raise RuntimeError("boom")
    """
)


@pytest.mark.parametrize(("how", "fsync"), [("exit", False), ("raise", True)])
def test_jsonl_crash_leaves_every_line_valid(tmp_path: Path, how: str, fsync: bool) -> None:
    path = tmp_path / "crash.jsonl"
    n = 5
    script = _CRASH_SCRIPT.format(
        tests=str(ROOT / "tests"), path=str(path), n=n, how=how, fsync=fsync
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1, proc.stderr
    if how == "raise":
        assert "boom" in proc.stderr
    raw = path.read_text(encoding="utf-8").splitlines()
    assert len(raw) == n
    recs = [json.loads(line) for line in raw]
    assert [r["step"] for r in recs] == list(range(n))
    for i, r in enumerate(recs):
        ref = _layer(i, 16, 2)
        assert (
            r["snapshot"]["layers"]["model.layers.0.mlp"]["usage_counts"]
            == ref.usage_counts.tolist()
        )


def test_jsonl_restart_appends_and_repairs_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    s1 = Snapshot(step=1, layers={"l": _layer(1, 8, 2)})
    s2 = Snapshot(step=2, layers={"l": _layer(2, 8, 2)})
    with JsonlSink(path) as sink:
        sink.write(LogEvent(step=1, snapshot=s1))
    # The previous run died in the middle of a line.
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "snapshot", "st')
    with JsonlSink(path) as sink:  # a restarted run
        sink.write(LogEvent(step=2, snapshot=s2))
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 2]
    with pytest.raises(ValueError, match=r"run.jsonl:2: not a JSON object"):
        read_jsonl(path, strict=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert (
        len(lines) == 3 and json.loads(lines[0])["step"] == 1 and json.loads(lines[2])["step"] == 2
    )


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
        s.write(LogEvent(step=30, snapshot=snap, metrics=metrics))
    assert user.calls == [(metrics, 30)]
    finite = CallableLoggerSink(user, finite_only=True)
    finite.write(LogEvent(step=31, metrics={"a": 1.0, "b": float("nan")}))
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
    sink.write(LogEvent(step=12, metrics=snap.to_dict(), mode="eval"))
    sink.flush()
    assert lg.calls == [(snap.to_dict(), 12)] and lg.saved == 1


@pytest.mark.parametrize("bad", [object(), 3, "wandb", {"log": 1}])
def test_resolve_unknown_raises_naming_accepted(bad: object) -> None:
    with pytest.raises(
        TypeError, match=r"SummaryWriter.*mlflow module.*\.log\(dict, step=\.\.\.\).*Lightning"
    ):
        resolve_loggers(bad)


def test_base_sink_is_a_noop_and_write_is_the_whole_protocol(tmp_path: Path, monitor_run) -> None:
    snap, alerts = monitor_run
    s = Sink()
    s.write(LogEvent(step=1, snapshot=snap, metrics=snap.to_dict(), alerts=alerts))
    s.flush()
    s.close()
    assert not s.wants_figures
    # The pre-LogEvent per-part methods are gone (0.1.0): write(LogEvent) is the protocol.
    for name in ("log_metrics", "log_snapshot", "log_alerts"):
        assert not hasattr(Sink, name) and not hasattr(JsonlSink, name), name


@pytest.mark.parametrize(
    ("module", "build", "extra"),
    [
        ("wandb", "moescope.sinks.wandb_sink:WandbSink", "wandb"),
        ("mlflow", "moescope.sinks.mlflow_sink:MLflowSink", "mlflow"),
        ("tensorboard", "moescope.sinks.tb_sink:TensorBoardSink", "tensorboard"),
    ],
)
def test_missing_extra_names_it(
    monkeypatch, tmp_path: Path, module: str, build: str, extra: str
) -> None:
    import importlib

    mod_name, cls_name = build.split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    kwargs = {"log_dir": tmp_path} if module == "tensorboard" else {}
    with pytest.raises(MissingExtraError, match=rf"pip install 'moescope\[{extra}\]'"):
        cls(**kwargs)


def test_missing_matplotlib_names_plots_extra(monkeypatch) -> None:
    from moescope.plots import usage_heatmap

    snap = Snapshot(step=1, layers={"l": _layer(1, 8, 2)})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"moescope\[plots\]"):
        usage_heatmap(snap)


def test_console_default_stream_is_stdout_at_call_time(capsys, monitor_run) -> None:
    snap, alerts = monitor_run
    sink = ConsoleSink(rich=False)
    sink.write(LogEvent(step=30, snapshot=snap, alerts=alerts[:1]))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("MoE step 30 |")
    assert format_alert(alerts[0]) in out and out[-1].startswith("    fix: ")


def test_importing_sinks_and_report_pulls_no_optional_package() -> None:
    code = (
        "import sys, moescope.sinks, moescope.report; "
        "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard', 'matplotlib', 'rich') "
        "if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_real_lightning_csv_logger(tmp_path: Path, monitor_run) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    import csv

    snap, _ = monitor_run
    lg = loggers.CSVLogger(save_dir=str(tmp_path), name="run")
    (sink,) = resolve_loggers(lg)
    assert isinstance(sink, LogMetricsSink)
    sink.write(LogEvent(step=30, snapshot=snap, metrics=snap.to_dict()))
    sink.flush()
    with open(Path(lg.log_dir) / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["step"]) == 30
    assert float(row["moe/avg_expert_cv"]) == pytest.approx(snap.avg_expert_cv, rel=1e-9)
    assert float(row["moe/model.layers.1.mlp/aux_loss"]) == pytest.approx(
        snap.layers["model.layers.1.mlp"].aux_loss, rel=1e-9
    )


@pytest.mark.parametrize("rich", [False, True])
def test_console_table_does_not_break_a_live_progress_bar(
    monitor_run: tuple[Snapshot, list[Alert]], rich: bool
) -> None:
    """A tqdm bar (the Trainer's) on the same stream: the bar is cleared before the
    table and alert lines and redrawn after, so no table line starts inside the bar."""
    from tqdm.auto import tqdm

    snap, alerts = monitor_run
    buf = io.StringIO()
    bar = tqdm(total=10, file=buf, desc="train", ascii=True, mininterval=0)
    try:
        bar.update(3)
        sink = ConsoleSink(stream=buf, rich=rich, width=120)
        sink.write(LogEvent(step=5, snapshot=snap, metrics=snap.to_dict(), alerts=alerts))
    finally:
        bar.close()
    text = buf.getvalue()
    model_line = format_model_line(snap, 5)
    (line,) = [seg for seg in text.split("\n") if model_line[:20] in seg]
    # What precedes the model line on its terminal line is only the bar's clearing.
    before = line.split(model_line[:20])[0].split("\r")[-1]
    assert before.strip() == "", repr(line)
    after = text.split(model_line[:20], 1)[1]
    assert "3/10" in after  # redrawn below the table
