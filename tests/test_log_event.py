"""LogEvent, and the session's one publishing path: one event per window to every sink."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moescope import create_moe_callback_for_pytorch
from moescope.integrations.core import ExtrasOnlySink
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.sinks import FigureDirSink, LogEvent, Sink
from moescope.sinks.figures import figure_file_name
from moescope.stats import Snapshot


class _Recorder(Sink):
    """Keeps every event's parts (figure sizes, not the figures: the event owns them)."""

    def __init__(self, wants: bool = True) -> None:
        self.wants_figures = wants
        self.events: list[dict[str, Any]] = []
        self.flushes = 0

    def write(self, event: LogEvent) -> None:
        self.events.append(
            {
                "step": event.step,
                "mode": event.mode,
                "snapshot": event.snapshot,
                "metrics": dict(event.metrics),
                "alerts": list(event.alerts),
                "update": event.alert_update,
                "figures": {
                    k: tuple(f.canvas.get_width_height()) for k, f in event.figures.items()
                },
            }
        )

    def flush(self) -> None:
        self.flushes += 1


def test_log_event_is_frozen_and_validated() -> None:
    metrics = {"moe/a": 1.0}
    ev = LogEvent(step=3, metrics=metrics)
    metrics["moe/b"] = 2.0  # the event holds its own copy
    assert dict(ev.metrics) == {"moe/a": 1.0}
    with pytest.raises(TypeError):
        ev.metrics["moe/c"] = 3.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        ev.step = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="mode must be one of"):
        LogEvent(step=1, mode="test")
    with pytest.raises(TypeError, match="step must be an int"):
        LogEvent(step=1.5)  # type: ignore[arg-type]
    snap = Snapshot(step=3, layers={})
    part = LogEvent(step=3, snapshot=snap, metrics={"x": 1.0}, figures={"f": object()})
    assert part.without("snapshot", "metrics").snapshot is None
    assert dict(part.without("metrics").metrics) == {} and part.without("figures").figures == {}
    with pytest.raises(ValueError, match="unknown event part"):
        part.without("images")


def _model() -> TinyMoELM:
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=16,
        num_experts=4,
        top_k=2,
        max_seq_len=32,
    )
    return TinyMoELM(cfg)


def _steps(model: TinyMoELM, cb: Any, n: int, gen: torch.Generator) -> None:
    for _ in range(n):
        cb.on_step_begin()
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        model(ids, labels=ids).loss.backward()
        cb.on_step_end()


def test_session_writes_one_event_per_window(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = _model()
    rec, extras_inner = _Recorder(), _Recorder()
    gen = torch.Generator().manual_seed(0)
    with create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=2,
        logger=rec,
        log_to_console=False,
        log_heatmap_every=4,
        log_dir=tmp_path,
        entropy_threshold=100.0,
    ) as cb:
        cb.session.add_sinks([ExtrasOnlySink(extras_inner)])
        _steps(model, cb, 6, gen)
        with cb.evaluation():  # its eval window ends (and is logged) on exit
            model(torch.randint(0, 64, (2, 8), generator=gen))
        hist = cb.monitor.history
        layers = list(hist.layers)
    ev = rec.events
    assert [(e["step"], e["mode"]) for e in ev] == [
        (2, "train"),
        (4, "train"),
        (6, "train"),
        (6, "eval"),
    ]
    assert rec.flushes >= len(ev)  # write, then flush, per event
    for e in ev[:3]:
        snap = e["snapshot"]
        assert snap.step == e["step"]
        assert e["metrics"] == snap.to_dict(prefix="moe")
        # Entropy is always below 100 nats: every layer alerts at every window ...
        assert [(a.layer, a.rule) for a in e["alerts"]] == [(n, "entropy_collapse") for n in layers]
    # ... and the grouping says so: new at 2, still firing since 2 at 4 and 6.
    assert [len(e["update"].new) for e in ev[:3]] == [2, 0, 0]
    assert [[s.since for s in e["update"].ongoing] for e in ev[:3]] == [[], [2, 2], [2, 2]]
    assert ev[3]["alerts"] == [] and set(ev[3]["metrics"]) == set(
        ev[3]["snapshot"].to_dict(prefix="moe/eval")
    )
    # Figures only at the heatmap step (4), built once, the same keys for every sink.
    keys = {"moe/usage_heatmap", *(f"moe/{n}/usage_heatmap" for n in layers)}
    assert [sorted(e["figures"]) for e in ev] == [[], sorted(keys), [], []]
    # The ExtrasOnlySink's destination sees figures and alerts, never metrics/snapshots.
    inner = extras_inner.events
    assert [(e["step"], e["mode"]) for e in inner] == [(e["step"], e["mode"]) for e in ev]
    assert all(e["snapshot"] is None and e["metrics"] == {} for e in inner)
    assert inner[1]["figures"] == ev[1]["figures"] and inner[0]["alerts"] == ev[0]["alerts"]
    # The PNGs the session's FigureDirSink wrote have the figures' pixel sizes.
    from matplotlib.image import imread

    for key, (w, h) in ev[1]["figures"].items():
        png = tmp_path / "heatmaps" / figure_file_name(key, 4)
        assert imread(png).shape[:2] == (h, w)
    assert cb.session.last_images == {}  # the last window (6) had no figures


def test_no_figures_when_no_sink_wants_them(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = _model()
    gen = torch.Generator().manual_seed(1)
    cb = create_moe_callback_for_pytorch(
        model, log_every_n_steps=2, log_to_console=False, log_heatmap_every=2, log_dir=tmp_path
    )
    _steps(model, cb, 2, gen)
    sess = cb.session
    snap = sess.monitor.last_snapshot
    sess._next_heatmap = 4
    assert sess._maybe_heatmaps(snap, 4, [_Recorder(wants=False)]) == {}
    assert sess._next_heatmap == 6  # the cadence still advanced
    figs = sess._maybe_heatmaps(snap, 6, [_Recorder(wants=True)])
    assert set(figs) == {"moe/usage_heatmap", *(f"moe/{n}/usage_heatmap" for n in snap.layers)}
    cb.cleanup()


def test_grouped_alert_warnings_without_console(caplog: pytest.LogCaptureFixture) -> None:
    from moescope.alerts import format_alert

    model = _model()
    gen = torch.Generator().manual_seed(2)
    seen: list[Any] = []
    cb = create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=1,
        log_to_console=False,
        log_heatmap_every=None,
        entropy_threshold=100.0,
        on_alert=seen.append,
    )
    with caplog.at_level(logging.WARNING, logger="moescope"):
        _steps(model, cb, 4, gen)
    cb.cleanup()
    messages = [r.getMessage() for r in caplog.records if r.name == "moescope"]
    # Two layers alert at each of 4 windows (on_alert gets all 8); the log says it once
    # per layer, with the threshold, and the remedy once.
    assert len(seen) == 8
    assert [m for m in messages if m.startswith("⚠️")] == [
        format_alert(a) for a in seen if a.step == 1
    ]
    assert (
        sum(
            m.startswith("    routing entropy ") and m.endswith("< 100.0 threshold")
            for m in messages
        )
        == 2
    )
    assert sum(m.startswith("    fix: ") for m in messages) == 1


def test_figure_dir_sink_names_and_pixels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from moescope.plots import usage_heatmap
    from test_sinks_console_jsonl import _layer

    snap = Snapshot(
        step=7, layers={"model.layers.0.mlp": _layer(1, 8, 2), "h.blocks[3]": _layer(2, 8, 2)}
    )
    sink = FigureDirSink(tmp_path / "png")
    fig = usage_heatmap(snap)
    sink.write(
        LogEvent(step=7, figures={"moe/usage_heatmap": fig, "moe/h.blocks[3]/usage_heatmap": fig})
    )
    sink.write(LogEvent(step=8, mode="eval", figures={"moe/usage_heatmap": fig}))  # ignored
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "all_layers_step7.png",
        "h.blocks_3_step7.png",
    ]
    w, h = fig.canvas.get_width_height()
    for p in sink.last_paths.values():
        assert imread(p).shape[:2] == (h, w)
    assert (
        figure_file_name("moe/model.layers.0.mlp/usage_heatmap", 500)
        == "model.layers.0.mlp_step500.png"
    )
    assert np.all(np.isfinite(imread(sink.last_paths["moe/usage_heatmap"])))
