"""TrainingSession builds ONE MoEMonitor with named windows "train" / "eval".

Checks: the session hooks every module exactly as one plain MoEMonitor does (no second
monitor, no per-layer switch hook of its own); train and eval counts stay in their own
windows, compared with an independent count taken by a plain forward pre-hook on each
layer's experts module (the top-k ids the experts actually receive); eval snapshots do
not reach the monitor's history or its alert rules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moescope import MoEMonitor, create_moe_callback_for_pytorch
from moescope.alerts import AlertRules
from moescope.integrations.core import TrainingSession
from moescope.nn.model import TinyMoEConfig, TinyMoELM

E, K, LAYERS, VOCAB, SEQ, BATCH = 4, 2, 2, 64, 6, 3
NAMES = [f"model.layers.{i}.mlp" for i in range(LAYERS)]
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


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


def _hook_table(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: tuple(len(getattr(m, d)) for d in _HOOK_DICTS) for name, m in model.named_modules()
    }


def _delta(
    after: dict[str, tuple[int, ...]], before: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, counts in after.items():
        d = tuple(a - b for a, b in zip(counts, before[name], strict=True))
        if any(d):
            out[name] = d
    return out


class _ExpertCounter:
    """Independent reference: a plain forward pre-hook on every layer's experts module
    adds the bincount of the top-k ids it receives to the bucket the test names."""

    def __init__(self, model: TinyMoELM) -> None:
        self.bucket = "train"
        self.counts: dict[str, np.ndarray] = {}
        self.handles = [
            model.get_submodule(f"{name}.experts").register_forward_pre_hook(self._hook(i))
            for i, name in enumerate(NAMES)
        ]

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            topk_index = args[1]
            c = self.counts.setdefault(self.bucket, np.zeros((LAYERS, E), dtype=np.int64))
            c[layer] += np.bincount(topk_index.detach().reshape(-1).numpy(), minlength=E)

        return hook

    def take(self, bucket: str) -> np.ndarray:
        return self.counts.pop(bucket, np.zeros((LAYERS, E), dtype=np.int64))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _forward(model: TinyMoELM, gen: torch.Generator, backward: bool = True) -> None:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)  # no padding: every token counts
    if backward:
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    else:
        with torch.no_grad():
            model(ids, attention_mask=mask)


class _Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step), dict(metrics)))


@pytest.mark.parametrize("track_eval", [True, False])
def test_session_hooks_every_module_exactly_like_one_monitor(track_eval: bool) -> None:
    model = _model()
    before = _hook_table(model)

    plain = MoEMonitor(model)
    one_monitor = _delta(_hook_table(model), before)
    plain.detach()
    assert _hook_table(model) == before
    for name in NAMES:  # the MoE blocks are hooked (else the comparison says nothing)
        assert name in one_monitor

    session = TrainingSession(log_to_console=False, log_heatmap_every=None, track_eval=track_eval)
    session.attach(model)
    session.attach(model)  # idempotent
    assert _delta(_hook_table(model), before) == one_monitor
    assert session.monitor is not None and session.monitor.split_by_mode
    # One monitor; the 0.1.0 leftovers train_monitor / eval_monitor are gone.
    assert not hasattr(session, "train_monitor") and not hasattr(session, "eval_monitor")
    # Options are read from the one frozen options object, not copied onto the session.
    assert session.track_eval is session.options.track_eval is track_eval
    assert "track_eval" not in vars(session)

    session.force_window("train")
    assert session.monitor.window == "train"
    if track_eval:
        session.force_window("eval")
        assert session.monitor.window == "eval"
    else:
        with pytest.raises(RuntimeError, match="track_eval=False"):
            session.force_window("eval")
    session.force_window(None)
    assert session.monitor.window == "default"  # split by each block's training flag
    assert _delta(_hook_table(model), before) == one_monitor

    session.close()
    assert _hook_table(model) == before
    session.attach(model)  # re-attach after close: still one set
    assert _delta(_hook_table(model), before) == one_monitor
    session.close()
    assert _hook_table(model) == before


def test_train_and_eval_windows_stay_separate() -> None:
    model = _model(1)
    ref = _ExpertCounter(model)
    rec = _Recorder()
    # Monitor-level alert rules that fire on every window with a token: they must see the
    # train windows only (as the old separate eval monitor had none of the train's).
    rules = AlertRules(
        imbalance_threshold=None, unused_fraction_threshold=None, entropy_threshold=100.0
    )
    cb = create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=2,
        logger=rec,
        log_to_console=False,
        log_heatmap_every=None,
        alert_rules=AlertRules(
            imbalance_threshold=None, unused_fraction_threshold=None, entropy_threshold=None
        ),
        monitor_kwargs={"alert_rules": rules},
    )
    gen = torch.Generator().manual_seed(1)
    expected_train: dict[int, np.ndarray] = {}
    eval_metrics: list[tuple[np.ndarray, dict[str, float]]] = []
    for step in range(1, 5):
        cb.on_step_begin()
        ref.bucket = "train"
        _forward(model, gen)
        if step == 1:
            # eval mode in the middle of a train window, logged at once
            model.eval()
            ref.bucket = "eval"
            _forward(model, gen, backward=False)
            _forward(model, gen, backward=False)
            model.train()
            ref.bucket = "train"
            eval_metrics.append((ref.take("eval"), cb.log_eval()))
            _forward(model, gen)  # a second micro-batch after the evaluation
        if step == 3:
            # forced eval window although the model is in train mode
            ref.bucket = "eval"
            with cb.evaluation():
                _forward(model, gen, backward=False)
            eval_metrics.append((ref.take("eval"), dict(cb.last_eval_metrics)))
            ref.bucket = "train"
            assert cb.monitor.last_snapshot is not None
            assert cb.monitor.last_snapshot.step == 2  # the eval snapshot left no trace
            assert {a.step for a in cb.monitor.last_alerts} == {2}
        cb.on_step_end()
        if step % 2 == 0:
            expected_train[step] = ref.take("train")
    mon = cb.monitor
    cb.cleanup()
    ref.remove()
    assert mon.windows and set(mon.windows) <= {"train", "eval", "default"}

    # Train windows: exact per-expert counts in the history == the experts' own inputs.
    for i, name in enumerate(NAMES):
        steps, counts = mon.history.as_array(name)
        assert steps.tolist() == [2, 4]  # no eval snapshot in the history
        for row, s in enumerate(steps.tolist()):
            assert counts[row].tolist() == expected_train[s][i].tolist()
    train_rows = [(s, m) for s, m in rec.rows if "moe/avg_expert_cv" in m]
    assert [s for s, _ in train_rows] == [2, 4]
    for s, m in train_rows:
        for i, name in enumerate(NAMES):
            assert m[f"moe/{name}/num_tokens"] * K == expected_train[s][i].sum()
    # The monitor's own rules ran on the train windows only.
    assert {a.step for a in mon.last_alerts} == {4}

    # Eval windows: token counts and per-expert CV from the same independent counts.
    assert len(eval_metrics) == 2
    for counts, m in eval_metrics:
        assert counts.sum() > 0
        for i, name in enumerate(NAMES):
            assert m[f"moe/eval/{name}/num_tokens"] * K == counts[i].sum()
            c = counts[i].astype(np.float64)
            assert m[f"moe/eval/{name}/cv"] == pytest.approx(c.std() / c.mean(), rel=1e-9)
            assert m[f"moe/eval/{name}/unused_experts"] == float((counts[i] == 0).sum())


def test_track_eval_false_keeps_eval_forwards_out_of_the_train_window() -> None:
    model = _model(2)
    ref = _ExpertCounter(model)
    rec = _Recorder()
    cb = create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=2,
        logger=rec,
        log_to_console=False,
        log_heatmap_every=None,
        track_eval=False,
    )
    gen = torch.Generator().manual_seed(2)
    expected: dict[int, np.ndarray] = {}
    for step in range(1, 5):
        cb.on_step_begin()
        ref.bucket = "train"
        _forward(model, gen)
        if step in (1, 3):
            model.eval()
            ref.bucket = "eval"
            _forward(model, gen, backward=False)
            model.train()
            assert cb.log_eval() == {}
        cb.on_step_end()
        if step % 2 == 0:
            expected[step] = ref.take("train")
    mon = cb.monitor
    cb.cleanup()
    ref.remove()
    assert ref.take("eval").sum() > 0
    for i, name in enumerate(NAMES):
        steps, counts = mon.history.as_array(name)
        assert steps.tolist() == [2, 4]
        for row, s in enumerate(steps.tolist()):
            assert counts[row].tolist() == expected[s][i].tolist()
    assert not any("moe/eval/" in k for _, m in rec.rows for k in m)


def test_lightning_track_eval_false_keeps_validation_out_of_the_train_window(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from moescope import MoELightningCallback

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model(3)

        def training_step(self, batch, batch_idx):
            ids, mask = batch
            return self.model(ids, attention_mask=mask, labels=ids).loss

        def validation_step(self, batch, batch_idx):
            ids, mask = batch
            self.log("val_loss", self.model(ids, attention_mask=mask, labels=ids).loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def data(n: int, seed: int) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        ds = torch.utils.data.TensorDataset(ids, torch.ones(n, SEQ, dtype=torch.long))
        return torch.utils.data.DataLoader(ds, batch_size=BATCH)

    rec = _Recorder()
    cb = MoELightningCallback(
        log_every_n_steps=2,
        logger=rec,
        log_to_console=False,
        log_heatmap_every=None,
        track_eval=False,
    )
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=2,
        num_sanity_val_steps=1,
        callbacks=[cb],
        logger=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Lit(), data(4 * BATCH, 0), data(2 * BATCH, 1))
    assert trainer.global_step == 4
    rows = [(s, m) for s, m in rec.rows if "moe/avg_expert_cv" in m]
    assert [s for s, _ in rows] == [2, 4]
    for _, m in rows:  # 2 optimizer steps of one batch each; no validation token
        for name in NAMES:
            assert m[f"moe/{name}/num_tokens"] == 2 * BATCH * SEQ
    assert not any("moe/eval/" in k for _, m in rec.rows for k in m)


def test_heatmaps_skip_with_one_warning_when_matplotlib_is_missing(tmp_path: Path) -> None:
    """Without the 'plots' extra a heatmap step logs one warning and the step's other
    outputs (the JSONL line) are still written; no exception reaches the training loop."""
    code = f"""
import logging, sys
sys.modules["matplotlib"] = None  # as if the plots extra were not installed
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
import torch
import moescope
from moescope.nn.model import TinyMoEConfig, TinyMoELM
torch.manual_seed(0)
model = TinyMoELM(TinyMoEConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                intermediate_size=8, num_experts=4, top_k=2, max_seq_len=16))
cb = moescope.create_moe_callback_for_pytorch(
    model, log_every_n_steps=1, logger=None, log_to_console=False, log_heatmap_every=1,
    save_detailed_logs=True, log_dir={str(tmp_path)!r})
for step in range(3):
    cb.on_step_begin()
    model(torch.randint(0, 32, (2, 8)))
    cb.on_step_end()
cb.cleanup()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("usage heatmaps skipped") == 1, proc.stderr[-2000:]
    lines = (tmp_path / "moe_detailed.jsonl").read_text().splitlines()
    assert sum('"snapshot"' in line for line in lines) == 3
