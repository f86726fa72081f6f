"""WandbSink against a real offline W&B run, read back from the run's ``.wandb`` file.

The ``.wandb`` file is a LevelDB-style log of ``wandb.proto`` ``Record`` messages (a 7-byte
``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header: crc32c, length,
type). The installed wandb has no Python reader any more (the writer moved to
``wandb-core``), so the test decodes the chunks itself and parses each record with
wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")
pytest.importorskip("matplotlib")

from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from conftest import random_layer_stats  # noqa: E402
from moescope.alerts import AlertRules, format_alert  # noqa: E402
from moescope.plots import save_png, usage_heatmap  # noqa: E402
from moescope.sinks import LogEvent, WandbSink, resolve_loggers  # noqa: E402
from moescope.sinks.wandb_sink import LAYER_TABLE_COLUMNS  # noqa: E402
from moescope.stats import (  # noqa: E402
    LayerStats,
    Snapshot,
)

_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_BLOCK = 32768


def _records(path: Path) -> list[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left - 7
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _finished_records(run_dir: Path, timeout: float = 60.0) -> list[Any]:
    """Records of the run's ``.wandb`` file once its ``exit`` record is there.

    ``run.finish()`` can return before wandb-core has written the file (offline mode
    writes asynchronously), so poll for the final record.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = list(run_dir.glob("run-*.wandb"))
        if files:
            try:
                recs = _records(files[0])
            except Exception:  # a record still being written: retry
                recs = []
            if any(r.WhichOneof("record_type") == "exit" for r in recs):
                return recs
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished .wandb file in {run_dir} after {timeout} s")
        time.sleep(0.05)


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({_item_key(i): json.loads(i.value_json) for i in r.history.item})
    return rows


def _layer(
    seed: int, e: int, k: int, t: int = 96, skew: float = 0.0, empty: bool = False
) -> LayerStats:
    return random_layer_stats(seed, e, k, t, skew, mask="none" if empty else "all")


def _snapshot(step: int) -> Snapshot:
    return Snapshot(
        step=step,
        layers={
            "model.layers.0.mlp": _layer(step, 8, 2, skew=6.0),
            "model.layers.1.mlp": _layer(step + 1, 16, 4),
            "model.layers.2.mlp": _layer(step + 2, 8, 2, empty=True),  # all padding: NaN metrics
        },
    )


@pytest.fixture
def offline_env(monkeypatch, tmp_path: Path) -> Path:
    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_META": "true",
    }.items():
        monkeypatch.setenv(k, v)
    return tmp_path


def _init(tmp_path: Path) -> Any:
    return wandb.init(
        mode="offline",
        dir=str(tmp_path),
        project="moescope-test",
        settings=wandb.Settings(
            console="off",
            x_disable_stats=True,
            x_disable_meta=True,
            disable_git=True,
            disable_code=True,
        ),
    )


def test_wandb_offline_run_round_trip(offline_env: Path) -> None:
    tmp_path = offline_env
    run = _init(tmp_path)
    (sink,) = resolve_loggers(wandb)  # the module: logs to wandb.run
    assert isinstance(sink, WandbSink)
    rules = AlertRules()
    snaps = [_snapshot(10), _snapshot(20)]
    sent_alerts = {}
    assert sink.wants_figures
    for snap in snaps:
        step = snap.step
        fig = usage_heatmap(snap)
        save_png(fig, tmp_path / f"heat_{step}.png")  # the reference pixel size
        sent_alerts[step] = rules.check(snap)
        sink.write(
            LogEvent(
                step=step,
                snapshot=snap,
                metrics=snap.to_dict(),
                alerts=sent_alerts[step],
                figures={"moe/usage_heatmap": fig},
            )
        )
        sink.write(
            LogEvent(
                step=step,
                snapshot=snap,
                mode="eval",
                metrics={"moe/eval/avg_expert_cv": snap.avg_expert_cv},
            )
        )
    run_dir = Path(run.dir).parent
    run.finish()

    records = _finished_records(run_dir)
    hist = _history(records)
    # Scalars: every flat key, stamped with moe/step = the training step, never step=.
    assert math.isnan(snaps[0].to_dict()["moe/model.layers.2.mlp/cv"])
    for snap in snaps:
        flat = snap.to_dict()
        (row,) = [h for h in hist if h.get("moe/step") == snap.step and "moe/avg_expert_cv" in h]
        for key, val in flat.items():
            got = row[key]
            if math.isnan(val):
                assert isinstance(got, float) and math.isnan(got), key
            else:
                assert got == pytest.approx(val, rel=1e-12), key
    # One row per event: the train event's row holds every part, the eval row scalars only.
    for snap in snaps:
        rows = [h for h in hist if h.get("moe/step") == snap.step]
        assert len(rows) == 2
        assert "moe/layer_stats/path" in rows[0] and "moe/usage_heatmap/path" in rows[0]
        assert rows[1]["moe/eval/avg_expert_cv"] == pytest.approx(snap.avg_expert_cv, rel=1e-12)
        assert not any(
            k.startswith(("moe/layer_stats", "moe/usage_heatmap", "moe/alerts")) for k in rows[1]
        )
    # moe/step is the x axis of every moe/* key.
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "moe/*" and m.step_metric == "moe/step" for m in metrics)
    # Per-layer table: rows equal the LayerStats fields.
    for snap in snaps:
        (row,) = [h for h in hist if h.get("moe/step") == snap.step and "moe/layer_stats/path" in h]
        assert row["moe/layer_stats/_type"] == "table-file"
        path = row["moe/layer_stats/path"]
        table = json.loads((run_dir / "files" / path).read_text())
        assert table["columns"] == list(LAYER_TABLE_COLUMNS)
        assert [r[0] for r in table["data"]] == list(snap.layers)
        for r in table["data"]:
            s = snap.layers[r[0]]
            assert r[1] == s.num_experts and r[3] == s.num_tokens
            for col, v in zip(LAYER_TABLE_COLUMNS[4:], r[4:], strict=True):
                ref = float(getattr(s, col))
                assert (v is None and math.isnan(ref)) or v == pytest.approx(ref, rel=1e-12), col
        # Histograms over expert ids: counts as logged.
        for name, s in snap.layers.items():
            if s.num_tokens == 0:
                assert not any(f"moe/{name}/expert_load/values" in h for h in hist)
                continue
            hrow = next(
                h
                for h in hist
                if h.get("moe/step") == snap.step and f"moe/{name}/expert_load/values" in h
            )
            assert hrow[f"moe/{name}/expert_load/_type"] == "histogram"
            np.testing.assert_array_equal(hrow[f"moe/{name}/expert_load/values"], s.usage_counts)
            np.testing.assert_array_equal(
                hrow[f"moe/{name}/expert_load/bins"], np.arange(s.num_experts + 1)
            )
    # Images: written as media files of the PNG's size.
    for snap in snaps:
        irow = next(
            h for h in hist if h.get("moe/step") == snap.step and "moe/usage_heatmap/path" in h
        )
        assert irow["moe/usage_heatmap/_type"] == "image-file"
        path = irow["moe/usage_heatmap/path"]
        media = run_dir / "files" / path
        assert media.is_file() and media.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        from matplotlib.image import imread

        h, w = imread(media).shape[:2]
        h0, w0 = imread(tmp_path / f"heat_{snap.step}.png").shape[:2]
        assert (h, w) == (h0, w0)
    # Alerts: the imbalanced layer 0 fired; the table holds the console lines.
    assert any(sent_alerts.values())
    for snap in snaps:
        al = sent_alerts[snap.step]
        if not al:
            continue
        arow = next(h for h in hist if h.get("moe/step") == snap.step and "moe/num_alerts" in h)
        assert arow["moe/num_alerts"] == len(al)
        path = arow["moe/alerts/path"]
        table = json.loads((run_dir / "files" / path).read_text())
        assert [r[-1] for r in table["data"]] == [format_alert(a) for a in al]


def test_wandb_run_object_and_use_wandb_step(offline_env: Path) -> None:
    run = _init(offline_env)
    (sink,) = resolve_loggers(run)
    assert isinstance(sink, WandbSink)
    direct = WandbSink(run, use_wandb_step=True, table=False, histograms=False)
    snap = _snapshot(3)
    direct.write(LogEvent(step=7, snapshot=snap, metrics={"moe/avg_expert_cv": snap.avg_expert_cv}))
    direct.write(LogEvent(step=9, metrics={"moe/avg_expert_cv": 0.25}))
    run_dir = Path(run.dir).parent
    run.finish()
    hist = _history(_finished_records(run_dir))
    rows = [(h["_step"], h["moe/avg_expert_cv"]) for h in hist if "moe/avg_expert_cv" in h]
    assert rows == [(7, pytest.approx(snap.avg_expert_cv)), (9, 0.25)]


def test_wandb_module_without_run_says_init_first(offline_env: Path) -> None:
    assert wandb.run is None
    sink = WandbSink(wandb)
    with pytest.raises(RuntimeError, match=r"wandb.init"):
        sink.write(LogEvent(step=1, metrics={"moe/x": 1.0}))
