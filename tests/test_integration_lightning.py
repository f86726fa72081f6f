"""MoELightningCallback in a real Lightning fit of a tiny LightningModule wrapping TinyMoELM.

References: token counts from the data (batches x micro-batches x valid tokens, K slots
each) and the CSV/recording logger's rows; no hook left after fit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from moescope import MoELightningCallback  # noqa: E402
from moescope.nn.model import TinyMoEConfig, TinyMoELM  # noqa: E402

E, K, VOCAB, SEQ, BATCH = 4, 2, 64, 6, 2
# The callback monitors the TinyMoELM inside (the shallowest module taking attention_mask).
LAYERS = ["model.layers.0.mlp", "model.layers.1.mlp"]


class _LitTiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyMoELM(
            TinyMoEConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_layers=2,
                num_heads=2,
                intermediate_size=16,
                num_experts=E,
                top_k=K,
                max_seq_len=32,
            )
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    def training_step(self, batch, batch_idx):
        return self(*batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(*batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n: int, seed: int, pad: bool) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad:
        for i in range(n):
            if i % 3:
                mask[i, SEQ - (i % 3) :] = 0
    return torch.utils.data.TensorDataset(ids, mask)


class _Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step), dict(metrics)))


def _hooks(model: nn.Module) -> int:
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return sum(len(getattr(m, n)) for m in model.modules() for n in names)


class _MemLogger(pl.loggers.Logger):
    """A Lightning logger keeping every log_metrics call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "mem"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


def test_fit_with_validation_and_grad_accumulation(tmp_path) -> None:
    lit = _LitTiny()
    hooks_before = _hooks(lit)
    mem = _MemLogger()
    cb = MoELightningCallback(
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=None, save_detailed_logs=True
    )
    train, val = _data(12, 0, pad=False), _data(5, 1, pad=True)
    trainer = pl.Trainer(
        max_steps=5,
        accumulate_grad_batches=2,
        val_check_interval=4,
        num_sanity_val_steps=1,
        callbacks=[cb],
        logger=mem,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(
        lit,
        torch.utils.data.DataLoader(train, batch_size=BATCH),
        torch.utils.data.DataLoader(val, batch_size=BATCH),
    )
    assert trainer.global_step == 5
    assert _hooks(lit) == hooks_before and not cb.session.attached

    # Train windows at global steps 2 and 4 (2 optimizer steps x 2 micro-batches each) and
    # the final partial window at step 5 (1 step x 2 micro-batches).
    train_rows = [(s, m) for s, m in mem.rows if "moe/avg_expert_cv" in m]
    assert [s for s, _ in train_rows] == [2, 4, 5]
    for s, m in train_rows:
        micro = 4 if s in (2, 4) else 2
        for layer in LAYERS:
            assert m[f"moe/{layer}/num_tokens"] == micro * BATCH * SEQ
        assert math.isfinite(m["moe/avg_routing_entropy"])
        assert "moe/total_unused_experts" in m
    history = cb.session.monitor.history
    for layer in LAYERS:
        steps, counts = history.as_array(layer)
        assert steps.tolist() == [2, 4, 5]
        assert counts.sum(axis=1).tolist() == [4 * BATCH * SEQ * K] * 2 + [2 * BATCH * SEQ * K]

    # Validation every 4 batches of an epoch of 6 batches: after global steps 2 and 5
    # (batch 4 of epochs 0 and 1); the sanity check (1 batch) is discarded, not logged.
    val_tokens = int(val.tensors[1].sum())
    eval_rows = [(s, m) for s, m in mem.rows if "moe/eval/avg_expert_cv" in m]
    assert [s for s, _ in eval_rows] == [2, 5]
    for _, m in eval_rows:
        for layer in LAYERS:
            assert m[f"moe/eval/{layer}/num_tokens"] == val_tokens
        assert not any(k.startswith("moe/") and not k.startswith("moe/eval/") for k in m)

    # callback_metrics hold the latest window of each kind.
    cm = trainer.callback_metrics
    assert "moe/avg_expert_cv" in cm and "moe/eval/avg_expert_cv" in cm
    last_cv = np.array([history.as_array(x)[1][1] for x in LAYERS], dtype=np.float64)
    ref = float(np.mean([c.std() / c.mean() for c in last_cv]))
    assert float(cm["moe/avg_expert_cv"]) == pytest.approx(ref, rel=1e-5)  # step-4 window

    detailed = tmp_path / "moe_logs" / "moe_detailed.jsonl"
    assert detailed.exists() and len(detailed.read_text().splitlines()) == 3


def test_stop_on_alert_and_external_logger(tmp_path) -> None:
    lit = _LitTiny()
    rec = _Recorder()
    cb = MoELightningCallback(
        log_every_n_steps=1,
        logger=rec,
        log_to_console=False,
        log_heatmap_every=None,
        entropy_threshold=100.0,
        stop_on_alert=True,
    )
    trainer = pl.Trainer(
        max_steps=10,
        callbacks=[cb],
        logger=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(lit, torch.utils.data.DataLoader(_data(12, 0, pad=False), batch_size=BATCH))
    assert trainer.global_step == 1  # stopped after the first window alerted
    assert [s for s, _ in rec.rows] == [1]
    assert _hooks(lit) == 0


def test_tensorboard_logger_gets_scalars_images_and_alerts(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lit = _LitTiny()
    cb = MoELightningCallback(
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=2, entropy_threshold=100.0
    )
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[cb],
        logger=tb,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(lit, torch.utils.data.DataLoader(_data(8, 0, pad=False), batch_size=BATCH))
    files = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(files[0].rsplit("/", 1)[0])
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("moe/avg_expert_cv")] == [2]
    key = f"moe/{LAYERS[0]}/num_tokens"
    assert [e.value for e in acc.Scalars(key)] == [2 * BATCH * SEQ]
    assert {"moe/usage_heatmap", f"moe/{LAYERS[1]}/usage_heatmap"} <= set(tags["images"])
    assert "moe/alerts/text_summary" in tags["tensors"]
    # Heatmaps also on disk, under the logger's log_dir.
    assert (Path(trainer.log_dir) / "moe_logs" / "heatmaps" / "all_layers_step2.png").exists()


class _LitMixtral(pl.LightningModule):
    """training_step calls the wrapped transformers model directly (not self.forward).

    The model stays in eval mode (as ``from_pretrained`` returns it): Lightning >= 2.2
    does not switch it to train mode, so the callback must pick windows by loop.
    """

    def __init__(self) -> None:
        super().__init__()
        from hf_tiny import build_tiny

        self.net, _ = build_tiny("mixtral", seed=3)

    def training_step(self, batch, batch_idx):
        ids, mask = batch
        return self.net(
            input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        ).loss

    def validation_step(self, batch, batch_idx):
        ids, mask = batch
        self.log("val_loss", self.net(input_ids=ids, attention_mask=mask, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_hf_model_inside_lightning_module_excludes_padding(tmp_path) -> None:
    pytest.importorskip("transformers")
    lit = _LitMixtral()
    mem = _MemLogger()
    cb = MoELightningCallback(log_every_n_steps=2, log_to_console=False, log_heatmap_every=None)
    train, val = _data(4, 5, pad=True), _data(3, 6, pad=True)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[cb],
        logger=mem,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        val_check_interval=2,
    )
    trainer.fit(
        lit,
        torch.utils.data.DataLoader(train, batch_size=BATCH),
        torch.utils.data.DataLoader(val, batch_size=BATCH),
    )
    assert cb.session.model is lit.net  # found via its forward's attention_mask
    ((step, m),) = [(s, m) for s, m in mem.rows if "moe/avg_expert_cv" in m]
    assert step == 2
    ((_, ev),) = [(s, m) for s, m in mem.rows if "moe/eval/avg_expert_cv" in m]
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):
        assert m[f"moe/{layer}/num_tokens"] == int(train.tensors[1].sum())  # padding excluded
        assert ev[f"moe/eval/{layer}/num_tokens"] == int(val.tensors[1].sum())
    assert _hooks(lit) == 0
