"""MLflowSink against a local SQLite tracking store, read back with MlflowClient.

MLflow 3.x refuses the plain file store (``file://...``) unless
``MLFLOW_ALLOW_FILE_STORE=true``; ``sqlite:///`` is the supported local store (the schema
migration costs a few seconds, so one database serves the whole module). Artifacts go to
a folder under the test's tmp dir, never to ``./mlruns``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from mlflow.tracking import MlflowClient  # noqa: E402

from conftest import random_layer_stats  # noqa: E402
from moescope.alerts import AlertRules, format_alert  # noqa: E402
from moescope.plots import save_png, usage_heatmap  # noqa: E402
from moescope.sinks import LogEvent, MLflowSink, resolve_loggers  # noqa: E402
from moescope.sinks.mlflow_sink import mlflow_key  # noqa: E402
from moescope.stats import (  # noqa: E402
    LayerStats,
    Snapshot,
)


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
            "model.layers.2.mlp": _layer(step + 2, 8, 2, empty=True),
        },
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(tracking URI, experiment id) of a fresh SQLite store; restores the old URI."""
    root = tmp_path_factory.mktemp("mlflow")
    old = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("moescope-test", artifact_location=(root / "art").as_uri())
    yield uri, exp
    mlflow.set_tracking_uri(old)


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _assert_metrics(client: Any, run_id: str, snaps: list[Snapshot]) -> None:
    for snap in snaps:
        for key, val in snap.to_dict().items():
            got = _history(client, run_id, key)[snap.step]
            if math.isnan(val):
                assert math.isnan(got), key
            else:
                assert got == pytest.approx(val, rel=1e-12), key


def test_mlflow_fluent_run_round_trip(store: tuple[str, str], tmp_path: Path) -> None:
    uri, exp = store
    snaps = [_snapshot(10), _snapshot(20)]
    rules = AlertRules()
    with mlflow.start_run(experiment_id=exp) as run:
        (sink,) = resolve_loggers(mlflow)
        assert isinstance(sink, MLflowSink)
        sink.snapshots = True
        assert sink.wants_figures
        alerts = {}
        for snap in snaps:
            step = snap.step
            fig = usage_heatmap(snap)
            # The reference: the same figure saved by moescope's own PNG writer.
            save_png(fig, tmp_path / f"heat_{step}.png")
            alerts[step] = rules.check(snap)
            sink.write(
                LogEvent(
                    step=step,
                    snapshot=snap,
                    metrics=snap.to_dict(),
                    alerts=alerts[step],
                    figures={"moe/model.layers.0.mlp/usage_heatmap": fig},
                )
            )
            # Eval events log scalars only.
            sink.write(
                LogEvent(
                    step=step,
                    snapshot=snap,
                    mode="eval",
                    alerts=alerts[step],
                    metrics={"moe/eval/avg_expert_cv": snap.avg_expert_cv},
                )
            )
    client = MlflowClient(tracking_uri=uri)
    rid = run.info.run_id
    _assert_metrics(client, rid, snaps)
    assert sorted(_history(client, rid, "moe/avg_expert_cv")) == [10, 20]
    assert sorted(_history(client, rid, "moe/eval/avg_expert_cv")) == [10, 20]
    # Heatmaps: one PNG per step (log_figure), the same pixels as save_png of the figure.
    from matplotlib.image import imread

    listed = [a.path for a in client.list_artifacts(rid, "moe/model.layers.0.mlp/usage_heatmap")]
    assert listed == [
        "moe/model.layers.0.mlp/usage_heatmap/step_00000010.png",
        "moe/model.layers.0.mlp/usage_heatmap/step_00000020.png",
    ]
    for snap, path in zip(snaps, listed, strict=True):
        local = client.download_artifacts(rid, path, str(tmp_path / "dl"))
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        got, ref = imread(local), imread(tmp_path / f"heat_{snap.step}.png")
        assert got.shape == ref.shape
        # A second draw of the figure: anti-aliasing may move a few edge pixels slightly.
        diff = np.abs(got - ref)
        assert diff.max() <= 8 / 255 and (diff > 0).mean() < 0.02
    # Alerts and snapshots as text artifacts.
    assert any(alerts.values())
    for snap in snaps:
        if alerts[snap.step]:
            text = mlflow.artifacts.load_text(
                f"{run.info.artifact_uri}/moe/alerts/step_{snap.step:08d}.txt"
            )
            assert text.splitlines() == [format_alert(a) for a in alerts[snap.step]]
        js = mlflow.artifacts.load_text(
            f"{run.info.artifact_uri}/moe/snapshots/step_{snap.step:08d}.json"
        )
        back = Snapshot.from_json(js)
        for name, s in snap.layers.items():
            np.testing.assert_array_equal(back.layers[name].usage_counts, s.usage_counts)
    # Alert files only from the train events (one per step with alerts).
    assert len(client.list_artifacts(rid, "moe/alerts")) == sum(bool(a) for a in alerts.values())


def test_mlflow_client_run_id_and_large_batches(store: tuple[str, str]) -> None:
    uri, exp = store
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(exp)
    rid = run.info.run_id
    sink = MLflowSink(run_id=rid, tracking_uri=uri)
    snap = _snapshot(5)
    fig = usage_heatmap(snap)
    sink.write(
        LogEvent(
            step=5,
            snapshot=snap,
            metrics=snap.to_dict(),
            alerts=AlertRules().check(snap),
            figures={"moe/usage_heatmap": fig},
        )
    )
    # More than MLflow's 1000-metrics-per-batch limit in one call.
    many = {f"moe/model.layers.{i}.mlp/cv": i / 7 for i in range(1205)}
    sink.write(LogEvent(step=6, metrics=many))
    client.set_terminated(rid)
    # Artifacts through the client too: the figure and the alert text of step 5.
    assert [a.path for a in client.list_artifacts(rid, "moe/usage_heatmap")] == [
        "moe/usage_heatmap/step_00000005.png"
    ]
    assert [a.path for a in client.list_artifacts(rid, "moe/alerts")] == [
        "moe/alerts/step_00000005.txt"
    ]
    _assert_metrics(client, rid, [snap])
    assert _history(client, rid, "moe/model.layers.1204.mlp/cv")[6] == pytest.approx(1204 / 7)
    assert _history(client, rid, "moe/model.layers.0.mlp/cv")[6] == 0.0


def test_mlflow_key_sanitising() -> None:
    assert mlflow_key("moe/model.layers.0.mlp/cv") == "moe/model.layers.0.mlp/cv"
    assert mlflow_key("moe/h.blocks[3]/cv") == "moe/h.blocks_3_/cv"
