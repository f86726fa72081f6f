"""create_moe_callback_for_pytorch in a plain training loop on TinyMoELM.

References are independent of moescope's capture/stats code: per-window expert counts and
routing entropy are recomputed in float64 from the routers' own outputs
(``TinyMoEOutput.router_outputs``) and the attention masks; a by-hand MoEMonitor is
compared as well.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moescope import MoEMonitor, UnsupportedModelError, create_moe_callback_for_pytorch
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.sinks import Sink

E, K, LAYERS, VOCAB, SEQ, BATCH = 4, 2, 2, 64, 6, 3


def _model(seed: int = 0) -> TinyMoELM:
    torch.manual_seed(seed)
    cfg = TinyMoEConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=LAYERS,
        num_heads=2,
        intermediate_size=16,
        num_experts=E,
        top_k=K,
        max_seq_len=32,
    )
    return TinyMoELM(cfg)


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    pads = torch.randint(0, SEQ - 1, (BATCH,), generator=gen)
    for b in range(BATCH):
        if pads[b]:
            mask[b, SEQ - int(pads[b]) :] = 0
    return ids, mask


class _Recorder:
    """Any object with .log(dict, step=...)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step), dict(metrics)))


class _Ref:
    """Float64 counts / entropy per layer from RouterOutput, over valid tokens."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros((LAYERS, E), dtype=np.int64)
        self.ent_sum = np.zeros(LAYERS)
        self.tokens = np.zeros(LAYERS, dtype=np.int64)

    def add(self, router_outputs, mask: torch.Tensor) -> None:
        valid = mask.reshape(-1).bool().numpy()
        for i, ro in enumerate(router_outputs):
            idx = ro.topk_index.detach().numpy()[valid]
            self.counts[i] += np.bincount(idx.reshape(-1), minlength=E)
            p = torch.softmax(ro.logits.detach().double(), dim=-1).numpy()[valid]
            self.ent_sum[i] += float(-(p * np.log(p)).sum())
            self.tokens[i] += int(valid.sum())


def _hooks(model: nn.Module) -> int:
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return sum(len(getattr(m, n)) for m in model.modules() for n in names)


def test_plain_loop_windows_match_router_outputs_and_a_hand_monitor() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = _Recorder()
    cb = create_moe_callback_for_pytorch(
        model, log_every_n_steps=3, logger=rec, log_to_console=False, log_heatmap_every=None
    )
    hand = MoEMonitor(model)
    ref, gen = _Ref(), torch.Generator().manual_seed(0)
    layers = [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    expected: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    eval_tokens = 0
    returned = []
    for step in range(1, 8):
        cb.on_step_begin()
        for _ in range(2):  # gradient accumulation: both micro-batches count
            ids, mask = _batch(gen)
            out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
            (out.loss / 2).backward()
            ref.add(out.router_outputs, mask)
        opt.step()
        opt.zero_grad()
        if step == 2:  # an evaluation pass mid-window must not leak into the train window
            model.eval()
            with torch.no_grad():
                ids, mask = _batch(gen)
                model(ids, attention_mask=mask)
                eval_tokens = int(mask.sum())
            model.train()
            ev = cb.log_eval()
            for layer in layers:
                assert ev[f"moe/eval/{layer}/num_tokens"] == eval_tokens
        returned.append(cb.on_step_end())
        if step in (3, 6):
            expected[step] = (ref.counts.copy(), ref.ent_sum / ref.tokens, ref.tokens.copy())
            hand_snap = hand.snapshot(reset=True, step=step)
            ref.reset()
    expected[7] = (ref.counts.copy(), ref.ent_sum / ref.tokens, ref.tokens.copy())
    hand_last = hand.snapshot(step=7)
    cb.cleanup()  # logs the partial window of step 7
    hand.detach()
    assert _hooks(model) == 0

    assert [r is not None for r in returned] == [False, False, True, False, False, True, False]
    train_rows = [(s, m) for s, m in rec.rows if "moe/avg_expert_cv" in m]
    eval_rows = [(s, m) for s, m in rec.rows if "moe/eval/avg_expert_cv" in m]
    assert [s for s, _ in train_rows] == [3, 6, 7]
    assert [s for s, _ in eval_rows] == [1]  # logged during step 2: 1 step completed
    history = cb.monitor.history
    for s, m in train_rows:
        counts, entropy, tokens = expected[s]
        for key in ("moe/avg_expert_cv", "moe/avg_routing_entropy", "moe/total_unused_experts"):
            assert key in m
        cvs = []
        for i, layer in enumerate(layers):
            assert m[f"moe/{layer}/num_tokens"] == tokens[i]
            assert m[f"moe/{layer}/routing_entropy"] == pytest.approx(entropy[i], rel=1e-5)
            c = counts[i].astype(np.float64)
            cvs.append(c.std() / c.mean())
            assert m[f"moe/{layer}/cv"] == pytest.approx(cvs[-1], rel=1e-9, abs=1e-12)
            assert m[f"moe/{layer}/unused_experts"] == float((counts[i] == 0).sum())
            steps, hist_counts = history.as_array(layer)
            row = steps.tolist().index(s)
            assert hist_counts[row].tolist() == counts[i].tolist()
        assert m["moe/avg_expert_cv"] == pytest.approx(float(np.mean(cvs)), rel=1e-9)
    # The by-hand monitor saw the eval forward too (it has no train/eval split); the
    # callback's last window must equal the hand monitor's last window (no eval there).
    for layer in layers:
        assert (
            hand_last.layers[layer].usage_counts.tolist()
            == expected[7][0][layers.index(layer)].tolist()
        )
        assert (
            hand_snap.layers[layer].usage_counts.tolist()
            == expected[6][0][layers.index(layer)].tolist()
        )


class _ImageSink(Sink):
    """Keeps what each event carried: figure keys and pixel sizes (figures are not kept:
    the event owns them), alerts, mode."""

    wants_figures = True

    def __init__(self) -> None:
        self.images: list[tuple[int, dict[str, tuple[int, int]]]] = []
        self.alerts: list[tuple[int, list]] = []
        self.modes: list[tuple[int, str]] = []
        self.closed = False

    def write(self, event) -> None:
        self.modes.append((event.step, event.mode))
        if event.figures:
            self.images.append(
                (
                    event.step,
                    {
                        k: tuple(int(x) for x in f.canvas.get_width_height())
                        for k, f in event.figures.items()
                    },
                )
            )
        if event.alerts:
            self.alerts.append((event.step, list(event.alerts)))

    def close(self) -> None:
        self.closed = True


def _train_steps(model: TinyMoELM, cb, n: int, gen: torch.Generator) -> None:
    for _ in range(n):
        cb.on_step_begin()
        ids, mask = _batch(gen)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        cb.on_step_end()


def test_context_manager_heatmaps_and_detailed_logs(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = _model(1)
    sink = _ImageSink()
    gen = torch.Generator().manual_seed(1)
    with create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=2,
        logger=sink,
        log_to_console=False,
        log_heatmap_every=4,
        save_detailed_logs=True,
        log_dir=tmp_path,
    ) as cb:
        _train_steps(model, cb, 8, gen)
        with cb.evaluation():  # forced eval window although the model is in train mode
            ids, mask = _batch(gen)
            model(ids, attention_mask=mask)
        assert cb.last_eval_metrics["moe/eval/model.layers.0.mlp/num_tokens"] == int(mask.sum())
    assert _hooks(model) == 0
    assert not sink.closed  # the user's own Sink is not closed for them

    # One event per window (train at 2, 4, 6, 8; the forced eval window at 8).
    assert sink.modes == [(2, "train"), (4, "train"), (6, "train"), (8, "train"), (8, "eval")]
    assert [s for s, _ in sink.images] == [4, 8]
    names = {
        "moe/usage_heatmap": "all_layers",
        "moe/model.layers.0.mlp/usage_heatmap": "model.layers.0.mlp",
        "moe/model.layers.1.mlp/usage_heatmap": "model.layers.1.mlp",
    }
    from matplotlib.image import imread

    for step, imgs in sink.images:
        assert set(imgs) == set(names)
        for key, (w, h) in imgs.items():
            # The same figure, saved once as a PNG by the session's FigureDirSink.
            png = tmp_path / "heatmaps" / f"{names[key]}_step{step}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert imread(png).shape[:2] == (h, w)

    lines = (tmp_path / "moe_detailed.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]  # every line strict JSON
    snaps = [r for r in records if r["kind"] == "snapshot"]
    assert [r["step"] for r in snaps] == [2, 4, 6, 8]
    for r in snaps:
        for st in r["snapshot"]["layers"].values():
            assert sum(st["usage_counts"]) == st["num_tokens"] * K
    assert [r["step"] for r in snaps if r.get("figures")] == [4, 8]
    assert all(set(r["figures"]) == set(names) for r in snaps if r.get("figures"))


def test_alerts_stop_flag_on_alert_raise_and_errors(tmp_path, capsys) -> None:
    model = _model(2)
    gen = torch.Generator().manual_seed(2)
    seen = []
    cb = create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=2,
        log_heatmap_every=None,
        entropy_threshold=100.0,
        stop_on_alert=True,
        on_alert=seen.append,
    )
    _train_steps(model, cb, 1, gen)
    assert not cb.should_stop
    _train_steps(model, cb, 1, gen)
    assert cb.should_stop
    assert [(a.step, a.layer, a.rule) for a in seen] == [
        (2, "model.layers.0.mlp", "entropy_collapse"),
        (2, "model.layers.1.mlp", "entropy_collapse"),
    ]
    out = capsys.readouterr().out
    assert "⚠️  MoE Alert at step 2: model.layers.0.mlp: Routing entropy collapse (entropy: " in out
    cb.cleanup()
    with pytest.raises(RuntimeError, match="after cleanup"):
        cb.on_step_begin()

    def boom(alert) -> None:
        raise KeyboardInterrupt(alert.message)

    cb2 = create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=1,
        log_to_console=False,
        log_heatmap_every=None,
        entropy_threshold=100.0,
        on_alert=boom,
    )
    with pytest.raises(KeyboardInterrupt):
        _train_steps(model, cb2, 1, gen)
    assert _hooks(model) == 0

    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        create_moe_callback_for_pytorch("model")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError):
        create_moe_callback_for_pytorch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layer_metrics"):
        create_moe_callback_for_pytorch(model, layer_metrics=["nope"])


def test_layer_metric_selection_and_logger_list() -> None:
    model = _model(3)
    a, b = _Recorder(), _Recorder()
    gen = torch.Generator().manual_seed(3)
    with create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=1,
        logger=[a, b],
        log_to_console=False,
        log_heatmap_every=None,
        layer_metrics=["cv"],
    ) as cb:
        _train_steps(model, cb, 2, gen)
    assert [s for s, _ in a.rows] == [1, 2] and a.rows == b.rows
    keys = set(a.rows[0][1])
    assert {"moe/model.layers.0.mlp/cv", "moe/model.layers.1.mlp/cv"} <= keys
    assert not any(k.endswith("/routing_entropy") and k.count("/") > 1 for k in keys)
    assert math.isfinite(a.rows[0][1]["moe/avg_routing_entropy"])


# --------------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(5)  # same weights on every rank, different data
        rec = _Recorder()
        ref = _Ref()
        gen = torch.Generator().manual_seed(10 + rank)
        log_dir = Path(out_dir) / f"logs{rank}"
        with create_moe_callback_for_pytorch(
            model,
            log_every_n_steps=2,
            logger=rec,
            log_to_console=False,
            log_heatmap_every=None,
            save_detailed_logs=True,
            log_dir=log_dir,
        ) as cb:
            for _ in range(2):
                cb.on_step_begin()
                ids, mask = _batch(gen)
                out = model(ids, attention_mask=mask, labels=ids)
                out.loss.backward()
                ref.add(out.router_outputs, mask)
                cb.on_step_end()
            reduced = cb.monitor.history.as_array("model.layers.0.mlp")[1][-1].tolist()
        with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
            json.dump(
                {
                    "rows": rec.rows,
                    "ref": ref.counts.tolist(),
                    "reduced": reduced,
                    "jsonl": (log_dir / "moe_detailed.jsonl").exists(),
                },
                f,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_reduce_counts_and_only_rank0_logs(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    total = np.array(r0["ref"]) + np.array(r1["ref"])  # [layers, E] summed over ranks
    # Both ranks hold the reduced window; only rank 0 wrote anything.
    assert r0["reduced"] == r1["reduced"] == total[0].tolist()
    assert [s for s, _ in r0["rows"]] == [2] and r1["rows"] == []
    assert r0["jsonl"] and not r1["jsonl"]
    m = r0["rows"][0][1]
    for i in range(LAYERS):
        assert m[f"moe/model.layers.{i}.mlp/num_tokens"] * K == total[i].sum()


def test_summary_writer_as_logger(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _model(4)
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    gen = torch.Generator().manual_seed(4)
    with create_moe_callback_for_pytorch(
        model, log_every_n_steps=2, logger=writer, log_to_console=False, log_heatmap_every=None
    ) as cb:
        _train_steps(model, cb, 4, gen)
        logged = [dict(cb.last_metrics)]
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("moe/avg_expert_cv")
    assert [e.step for e in events] == [2, 4]
    assert events[-1].value == pytest.approx(logged[0]["moe/avg_expert_cv"], rel=1e-6)
    assert "moe/model.layers.0.mlp/routing_entropy" in acc.Tags()["scalars"]
