"""The key budget for loggers: what a log step sends at many layers, and what it keeps.

At more than ``per_layer_limit`` MoE layers (default 16) the loggers get the model-level
keys (averages, totals, percentiles across layers) plus the per-layer keys of the
``worst_layers`` layers with the highest max/mean load, chosen independently here from the
routers' own outputs; the JSONL log keeps every layer. ``per_layer=True`` opts back in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope import create_moe_callback_for_pytorch
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.stats.registry import AGGREGATES, LAYER_SCALAR_METRICS

LAYERS, E, K = 20, 16, 2


class _Recorder:
    """Any object with .log(dict, step=...)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))


def _model() -> TinyMoELM:
    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=64, hidden_size=16, num_layers=LAYERS, num_heads=2,
                        intermediate_size=8, num_experts=E, top_k=K, max_seq_len=32)  # fmt: skip
    return TinyMoELM(cfg)


def _run(tmp_path: Path, **kw: object) -> tuple[dict[str, float], list[dict], list[np.ndarray]]:
    model = _model()
    rec = _Recorder()
    cb = create_moe_callback_for_pytorch(model, 1, rec, False, None, save_detailed_logs=True,
                                         log_dir=str(tmp_path), **kw)  # fmt: skip
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids)
    cb.on_step_end()
    cb.cleanup()
    counts = [
        np.bincount(ro.topk_index.reshape(-1).numpy(), minlength=E) for ro in out.router_outputs
    ]
    lines = [json.loads(x) for x in (tmp_path / "moe_detailed.jsonl").read_text().splitlines()]
    return rec.rows[-1], lines, counts


def _layers_in(keys: dict[str, float]) -> set[str]:
    return {k.split("/")[1] for k in keys if k.count("/") >= 2}


def test_above_the_limit_loggers_get_aggregates_and_the_worst_layers(tmp_path: Path) -> None:
    sent, lines, counts = _run(tmp_path)
    # Independent choice of the worst layers: max/mean load from the routers' own ids.
    ratio = [c.max() / c.mean() for c in counts]
    worst = sorted(range(LAYERS), key=lambda i: (-ratio[i], i))[:4]
    assert _layers_in(sent) == {f"model.layers.{i}.mlp" for i in worst}
    per_layer = [k for k in sent if k.count("/") >= 2]
    assert len(per_layer) == 4 * len(LAYER_SCALAR_METRICS)
    for name in AGGREGATES:
        if name not in ("avg_neuron_sparsity", "avg_activated_neurons", "total_dead_neurons"):
            assert f"moe/{name}" in sent
    assert sent["moe/p90_max_over_mean"] == pytest.approx(np.percentile(ratio, 90), rel=1e-9)
    assert sent["moe/max_max_over_mean"] == pytest.approx(max(ratio), rel=1e-9)
    # The JSONL keeps the full record: every layer, with its counts.
    layers = lines[-1]["snapshot"]["layers"]
    assert len(layers) == LAYERS
    got = [np.array(v["usage_counts"]) for v in layers.values()]
    for g, c in zip(got, counts, strict=True):
        np.testing.assert_array_equal(g, c)


def test_per_layer_true_sends_every_layer_and_false_none(tmp_path: Path) -> None:
    sent, _, _ = _run(tmp_path / "a", per_layer=True)
    assert len(_layers_in(sent)) == LAYERS
    sent, _, _ = _run(tmp_path / "b", per_layer=False)
    assert not _layers_in(sent)


def test_bad_budget_options_say_what_to_pass() -> None:
    from moescope.integrations import MoECallbackOptions

    with pytest.raises(ValueError, match="per_layer must be 'auto', True or False"):
        MoECallbackOptions(per_layer="some")
    with pytest.raises(ValueError, match="worst_layers must be an int >= 0"):
        MoECallbackOptions(worst_layers=-1)
