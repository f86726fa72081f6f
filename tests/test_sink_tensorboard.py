"""TensorBoardSink: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

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
from moescope.report.plots import save_png, usage_heatmap
from moescope.sinks import TensorBoardSink, resolve_loggers
from moescope.sinks.tb_sink import read_png_rgb
from moescope.stats import Snapshot


def _snapshots(n: int = 2) -> tuple[list[Snapshot], list[list]]:
    torch.manual_seed(1)
    cfg = TinyMoEConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=32,
                        num_experts=8, top_k=2)
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
    acc = EventAccumulator(str(log_dir), size_guidance={
        "scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_file_round_trip(tmp_path: Path) -> None:
    snaps, alerts = _snapshots()
    log_dir = tmp_path / "tb"
    sink = TensorBoardSink(log_dir=log_dir)
    pngs = {}
    for snap, al in zip(snaps, alerts, strict=True):
        step = snap.step
        sink.log_metrics(snap.to_dict(), step)
        sink.log_snapshot(snap, step)
        png = save_png(usage_heatmap(snap), tmp_path / f"heat_{step}.png")
        pngs[step] = png
        sink.log_images({"moe/usage_heatmap": png}, step)
        sink.log_alerts(al, step)
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
    # Images: present at both steps with the PNG's pixel size.
    imgs = acc.Images("moe/usage_heatmap")
    assert [e.step for e in imgs] == [10, 20]
    for e in imgs:
        h, w, c = read_png_rgb(pngs[e.step]).shape
        assert (e.height, e.width) == (h, w) and c == 3
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
    sink.log_metrics({"moe/avg_expert_cv": snaps[0].avg_expert_cv}, 3)
    sink.close()  # must not close the user's writer
    writer.add_scalar("user/loss", 1.25, 4)
    writer.close()
    acc = _read(tmp_path / "user")
    assert acc.Scalars("moe/avg_expert_cv")[0].value == pytest.approx(snaps[0].avg_expert_cv, rel=1e-6)
    assert acc.Scalars("user/loss")[0].step == 4


def test_layer_without_tokens_gets_no_histogram(tmp_path: Path) -> None:
    snaps, _ = _snapshots(1)
    empty = Snapshot(step=5, layers={})
    # A window in which no token reached any layer: counts all zero.
    from moescope.stats import LayerAccumulator, layer_stats_from_state, states_to_numpy

    acc = LayerAccumulator(8, 2)
    empty.layers["model.layers.0.mlp"] = layer_stats_from_state(
        states_to_numpy({"x": acc.state()})["x"], 8, 2)
    with TensorBoardSink(log_dir=tmp_path / "e") as sink:
        sink.log_snapshot(empty, 5)
        sink.log_snapshot(snaps[0], 6)
    ea = _read(tmp_path / "e")
    steps = [e.step for e in ea.Histograms("moe/model.layers.0.mlp/expert_load")]
    assert steps == [6]


def test_read_png_rgb_composites_alpha(tmp_path: Path) -> None:
    from matplotlib.image import imsave

    rgba = np.zeros((4, 5, 4), dtype=np.float32)
    rgba[..., 0] = 1.0  # red
    rgba[..., 3] = 0.5  # half transparent over white -> (255, 128, 128)
    imsave(tmp_path / "a.png", rgba)
    img = read_png_rgb(tmp_path / "a.png")
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(img[0, 0], [255, 128, 128], atol=1)


def test_needs_exactly_one_of_log_dir_and_writer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardSink()
    w = SummaryWriter(log_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardSink(log_dir=tmp_path, writer=w)
    w.close()
