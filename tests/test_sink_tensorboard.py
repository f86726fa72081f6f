"""TensorBoardSink: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from torch.utils.tensorboard import SummaryWriter

from moescope import MoEMonitor
from moescope.alerts import AlertRules, format_alert
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.plots import usage_heatmap
from moescope.sinks import LogEvent, TensorBoardSink, resolve_loggers
from moescope.stats import Snapshot


def _snapshots(n: int = 2) -> tuple[list[Snapshot], list[list]]:
    torch.manual_seed(1)
    cfg = TinyMoEConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=32, num_experts=8, top_k=2
    )
    model = TinyMoELM(cfg).eval()
    mon = MoEMonitor(model, alert_rules=AlertRules(imbalance_threshold=1.2))
    snaps, alerts = [], []
    with torch.no_grad():
        for i in range(n):
            model(torch.randint(0, 256, (2, 20)))
            snaps.append(mon.snapshot(step=10 * (i + 1)))
            alerts.append(list(mon.last_alerts))
    mon.detach()
    return snaps, alerts


def _read(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def test_tensorboard_event_file_round_trip(tmp_path: Path) -> None:
    snaps, alerts = _snapshots()
    log_dir = tmp_path / "tb"
    sink = TensorBoardSink(log_dir=log_dir)
    assert sink.wants_figures
    pixels = {}
    for snap, al in zip(snaps, alerts, strict=True):
        step = snap.step
        fig = usage_heatmap(snap)
        fig.canvas.draw()
        # The figure's own rendering, the reference for what TensorBoard stores.
        pixels[step] = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
        sink.write(
            LogEvent(
                step=step,
                snapshot=snap,
                metrics=snap.to_dict(),
                alerts=al,
                figures={"moe/usage_heatmap": fig},
            )
        )
        # An eval event: scalars only (no histogram, image or alert under eval).
        sink.write(
            LogEvent(
                step=step,
                snapshot=snap,
                mode="eval",
                metrics={"moe/eval/avg_expert_cv": snap.avg_expert_cv},
            )
        )
    sink.close()
    sink.close()  # idempotent

    acc = _read(log_dir)
    tags = acc.Tags()
    # Scalars: every flat key, at both steps, float32 value of the snapshot.
    for snap in snaps:
        flat = snap.to_dict()
        assert set(flat) <= set(tags["scalars"])
        for key, val in flat.items():
            ev = {e.step: e.value for e in acc.Scalars(key)}
            got = ev[snap.step]
            if math.isnan(val):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(np.float32(val), rel=1e-6, abs=1e-6)
    assert [e.step for e in acc.Scalars("moe/avg_expert_cv")] == [10, 20]
    # Histograms: one bucket per expert holding exactly the usage counts.
    for snap in snaps:
        for name, s in snap.layers.items():
            h = {e.step: e.histogram_value for e in acc.Histograms(f"moe/{name}/expert_load")}
            hv = h[snap.step]
            np.testing.assert_array_equal(np.array(hv.bucket), s.usage_counts.astype(np.float64))
            np.testing.assert_allclose(hv.bucket_limit, np.arange(8) + 0.5)
            assert hv.num == s.usage_counts.sum()
            ids = np.arange(8)
            assert hv.sum == pytest.approx(float((ids * s.usage_counts).sum()))
            uf = {e.step: e.histogram_value for e in acc.Histograms(f"moe/{name}/usage_fraction")}
            assert uf[snap.step].num == 8
            assert uf[snap.step].max == pytest.approx(s.usage_fraction.max())
    assert [e.step for e in acc.Scalars("moe/eval/avg_expert_cv")] == [10, 20]
    assert [e.step for e in acc.Histograms("moe/model.layers.0.mlp/expert_load")] == [10, 20]
    # Images: add_figure at both steps, decoded back to the figure's own pixels.
    from matplotlib.image import imread

    imgs = acc.Images("moe/usage_heatmap")
    assert [e.step for e in imgs] == [10, 20]
    for e in imgs:
        ref = pixels[e.step]
        assert (e.height, e.width) == ref.shape[:2]
        got = imread(io.BytesIO(e.encoded_image_string), format="png")
        got = np.clip(np.rint(np.asarray(got)[:, :, :3] * 255), 0, 255).astype(np.uint8)
        # Re-drawn by add_figure: anti-aliasing may move a few edge pixels by a few levels.
        diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
        assert diff.max() <= 8 and (diff > 0).mean() < 0.02
        assert (ref < 200).mean() > 0.05  # the reference is a real drawing, not blank
    # Alerts as text.
    assert any(alerts)
    texts = acc.Tensors("moe/alerts/text_summary")
    step_text = {t.step: t.tensor_proto.string_val[0].decode() for t in texts}
    for snap, al in zip(snaps, alerts, strict=True):
        if al:
            assert step_text[snap.step].split("  \n") == [format_alert(a) for a in al]


def test_users_writer_is_resolved_flushed_not_closed(tmp_path: Path) -> None:
    snaps, _ = _snapshots(1)
    writer = SummaryWriter(log_dir=str(tmp_path / "user"))
    (sink,) = resolve_loggers(writer)
    assert isinstance(sink, TensorBoardSink) and sink.writer is writer
    sink.write(LogEvent(step=3, metrics={"moe/avg_expert_cv": snaps[0].avg_expert_cv}))
    sink.close()  # must not close the user's writer
    writer.add_scalar("user/loss", 1.25, 4)
    writer.close()
    acc = _read(tmp_path / "user")
    assert acc.Scalars("moe/avg_expert_cv")[0].value == pytest.approx(
        snaps[0].avg_expert_cv, rel=1e-6
    )
    assert acc.Scalars("user/loss")[0].step == 4


def test_layer_without_tokens_gets_no_histogram(tmp_path: Path) -> None:
    snaps, _ = _snapshots(1)
    empty = Snapshot(step=5, layers={})
    # A window in which no token reached any layer: counts all zero.
    from moescope.stats import LayerAccumulator, layer_stats_from_state, states_to_numpy

    acc = LayerAccumulator(8, 2)
    empty.layers["model.layers.0.mlp"] = layer_stats_from_state(
        states_to_numpy({"x": acc.state()})["x"], 8, 2
    )
    with TensorBoardSink(log_dir=tmp_path / "e") as sink:
        sink.write(LogEvent(step=5, snapshot=empty))
        sink.write(LogEvent(step=6, snapshot=snaps[0]))
    ea = _read(tmp_path / "e")
    steps = [e.step for e in ea.Histograms("moe/model.layers.0.mlp/expert_load")]
    assert steps == [6]


def test_needs_exactly_one_of_log_dir_and_writer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardSink()
    w = SummaryWriter(log_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardSink(log_dir=tmp_path, writer=w)
    w.close()
