"""create_moe_callback_for_transformers under real transformers Trainer runs.

Each run: gradient accumulation 2, step-wise evaluation, CPU. Checked against
independent references: token counts (micro-batches x batch x seq, or the eval masks'
sum), K assignments per token, a float64 recomputation of the averaged CV from the
window's usage counts, TensorBoard's own event reader.
"""

from __future__ import annotations

import ast
import glob
import json
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

from transformers import DefaultFlowCallback, Trainer, TrainingArguments

from hf_tiny import build_tiny
from moescope import MoECallbackOptions, create_moe_callback_for_transformers
from moescope.integrations.transformers import TRAINER_SUMMARY_METRICS, MoETrainerCallback

SEQ = 8
TRAIN_BS = 2
GA = 2
K = 2
EVAL_BS = 3


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int, seed: int, pad: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, SEQ), generator=g)
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        if pad:  # right padding of i % 4 tokens: the monitor must count real tokens only
            for i in range(n):
                p = i % 4
                if p:
                    self.mask[i, SEQ - p :] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _tiny_moe() -> nn.Module:
    from moescope.nn.hf import TinyMoEForCausalLM, TinyMoEHFConfig

    torch.manual_seed(0)
    cfg = TinyMoEHFConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=K,
        max_seq_len=32,
    )
    return TinyMoEForCausalLM(cfg)


def _mixtral() -> nn.Module:
    model, _ = build_tiny("mixtral", seed=1)
    return model


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, d)) for m in model.modules() for d in _HOOK_DICTS)


def _args(tmp_path, max_steps: int = 4, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=TRAIN_BS,
        per_device_eval_batch_size=EVAL_BS,
        gradient_accumulation_steps=GA,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _run(
    model: nn.Module, tmp_path, cb: MoETrainerCallback, vocab: int, **kw
) -> tuple[Trainer, _Rows]:
    train = _Rows(32, vocab, seed=1, pad=False)
    evald = _Rows(5, vocab, seed=2, pad=True)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, **kw),
        train_dataset=train,
        eval_dataset=evald,
        callbacks=[cb],
    )
    trainer.train()
    return trainer, evald


def _layers(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if n.endswith(".mlp") and (hasattr(m, "router") or hasattr(m, "gate"))
    ]


@pytest.mark.parametrize("build", [_tiny_moe, _mixtral], ids=["tiny_moe", "mixtral"])
def test_trainer_logs_train_and_eval_windows(build, tmp_path) -> None:
    model = build()
    vocab = model.config.vocab_size
    hooks_before = _hook_count(model)
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2,
        log_to_console=False,
        log_heatmap_every=None,
        save_detailed_logs=True,
    )
    trainer, evald = _run(model, tmp_path, cb, vocab)
    layers = _layers(model)
    assert len(layers) == 2
    hist = trainer.state.log_history

    # Train windows: exactly at steps 2 and 4, in the same entries as the Trainer's loss.
    train_entries = [h for h in hist if "loss" in h]
    assert [h["step"] for h in train_entries] == [1, 2, 3, 4]
    with_moe = [h["step"] for h in train_entries if "moe/avg_expert_cv" in h]
    assert with_moe == [2, 4]
    tokens_per_window = 2 * GA * TRAIN_BS * SEQ  # 2 optimizer steps x 2 micro-batches
    for h in train_entries:
        if h["step"] not in (2, 4):
            continue
        assert not any(k.startswith("moe/eval/") for k in h)
        for key in ("moe/avg_expert_cv", "moe/avg_routing_entropy", "moe/total_unused_experts"):
            assert math.isfinite(h[key])
        for layer in layers:
            # Every micro-batch counts, and no eval forward leaks into the train window.
            assert h[f"moe/{layer}/num_tokens"] == tokens_per_window
            for m in ("cv", "max_over_mean", "unused_experts", "routing_entropy", "aux_loss"):
                assert f"moe/{layer}/{m}" in h

    # Usage counts per window (monitor history): T_valid x K per layer.
    history = cb.session.monitor.history
    for layer in layers:
        steps, counts = history.as_array(layer)
        assert steps.tolist() == [2, 4]
        assert counts.sum(axis=1).tolist() == [tokens_per_window * K] * 2
    # avg_expert_cv recomputed in float64 from those counts (population std / mean).
    for row, h in enumerate(e for e in train_entries if e["step"] in (2, 4)):
        cvs = []
        for layer in layers:
            c = history.as_array(layer)[1][row].astype(np.float64)
            cvs.append(c.std() / c.mean())
        assert h["moe/avg_expert_cv"] == pytest.approx(float(np.mean(cvs)), rel=1e-9, abs=1e-12)

    # Eval windows: after each evaluation (steps 2 and 4), valid tokens of the whole set.
    eval_entries = [h for h in hist if "eval_loss" in h]
    assert [h["step"] for h in eval_entries] == [2, 4]
    eval_tokens = int(evald.mask.sum())
    for h in eval_entries:
        assert "moe/avg_expert_cv" not in h  # eval entries carry eval keys only
        assert math.isfinite(h["moe/eval/avg_routing_entropy"])
        for layer in layers:
            assert h[f"moe/eval/{layer}/num_tokens"] == eval_tokens

    # Detached at train end: no hook left behind.
    assert _hook_count(model) == hooks_before
    assert not cb.session.attached

    # Detailed logs: output_dir/moe_logs/moe_detailed.jsonl, one strict-JSON line per window.
    path = tmp_path / "moe_logs" / "moe_detailed.jsonl"
    lines = path.read_text().splitlines()
    records = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) for line in lines
    ]
    snaps = [r for r in records if r["kind"] == "snapshot"]
    assert [r["step"] for r in snaps] == [2, 4]
    for r in snaps:
        for layer in layers:
            assert sum(r["snapshot"]["layers"][layer]["usage_counts"]) == tokens_per_window * K

    # trainer.evaluate() after training: the callback is detached, nothing added.
    metrics = trainer.evaluate()
    assert not any(k.startswith("moe/") for k in metrics)


def _tb_scalars(root) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(root / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]).rsplit("/", 1)[0])
    acc.Reload()
    return acc


def test_report_to_tensorboard_and_wandb_offline_receive_moe_keys(tmp_path, monkeypatch) -> None:
    """attach_to_trainer: the Trainer's own TensorBoard and W&B integrations get the
    summary keys through its logs; heatmaps and alerts reach the W&B run via wandb.run."""
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    from transformers.integrations import TensorBoardCallback, WandbCallback

    # The .wandb record reader of the W&B sink's tests; a local, offline, quiet W&B.
    from test_sink_wandb import _finished_records, _history

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
        "WANDB_PROJECT": "moescope-test",
    }.items():
        monkeypatch.setenv(k, v)

    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=4, entropy_threshold=100.0
    )
    out = tmp_path / "out"
    trainer = Trainer(
        model=model,
        args=_args(out, report_to=["tensorboard", "wandb"]),
        train_dataset=_Rows(32, model.config.vocab_size, seed=1, pad=False),
        eval_dataset=_Rows(5, model.config.vocab_size, seed=2, pad=True),
        callbacks=[cb],
    )
    before = [type(c) for c in trainer.callback_handler.callbacks]
    assert cb.attach_to_trainer(trainer) is cb
    order = [type(c) for c in trainer.callback_handler.callbacks]
    # Right after DefaultFlowCallback, everything else in its original order behind it.
    assert order[:2] == [DefaultFlowCallback, MoETrainerCallback]
    assert order[2:] == [t for t in before if t not in (DefaultFlowCallback, MoETrainerCallback)]
    assert order.index(MoETrainerCallback) < min(
        order.index(TensorBoardCallback), order.index(WandbCallback)
    )
    trainer.train()
    wandb.finish()

    hist = {h["step"]: h for h in trainer.state.log_history if "moe/avg_expert_cv" in h}
    assert sorted(hist) == [2, 4]
    acc = _tb_scalars(out)
    tags = set(acc.Tags()["scalars"])
    for key in TRAINER_SUMMARY_METRICS:
        tag = f"train/moe/{key}"  # transformers' rewrite_logs prefixes train keys
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4]
        for e in events:
            assert e.value == pytest.approx(hist[e.step][f"moe/{key}"], rel=1e-6, abs=1e-6)
        assert [e.step for e in acc.Scalars(f"train/moe/eval/{key}")] == [2, 4]
    # The summary only: per-layer keys stay in log_history and moescope's own sinks.
    assert not any(t.startswith("train/moe/model.layers") for t in tags)
    assert "moe/model.layers.1.mlp/cv" in hist[2]

    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    rows = _history(_finished_records(run_dir))
    scalar_rows = [r for r in rows if "train/moe/avg_expert_cv" in r]
    assert [r["train/global_step"] for r in scalar_rows] == [2, 4]
    for r in scalar_rows:
        for key in TRAINER_SUMMARY_METRICS:
            want = hist[r["train/global_step"]][f"moe/{key}"]
            assert r[f"train/moe/{key}"] == pytest.approx(want, rel=1e-6, abs=1e-6)
    eval_rows = [r for r in rows if "train/moe/eval/avg_expert_cv" in r]
    assert [r["train/global_step"] for r in eval_rows] == [2, 4]
    # Images and alert tables through wandb.run (public module state), at moescope's step.
    # (nested W&B values read back as "<key>/<field>")
    images = [r for r in rows if "moe/model.layers.0.mlp/usage_heatmap/_type" in r]
    assert [r["moe/step"] for r in images] == [4]
    assert images[0]["moe/usage_heatmap/_type"] == "image-file"
    alerts = [r for r in rows if r.get("moe/alerts/_type") == "table-file"]
    assert [r["moe/step"] for r in alerts] == [2, 4]
    assert all(r["moe/num_alerts"] == 2 for r in alerts)  # one entropy alert per layer


def test_trainer_logs_all_and_the_unordered_warning(tmp_path, caplog) -> None:
    pytest.importorskip("tensorboard")
    model = _tiny_moe()
    vocab = model.config.vocab_size
    opts = MoECallbackOptions(log_every_n_steps=1, log_to_console=False, log_heatmap_every=None)

    # trainer_logs="all", attached: every key reaches the report_to destination.
    cb = MoETrainerCallback(opts, trainer_logs="all")
    trainer = Trainer(
        model=model,
        args=_args(tmp_path / "all", max_steps=2, eval_strategy="no", report_to="tensorboard"),
        train_dataset=_Rows(16, vocab, seed=1, pad=False),
        callbacks=[cb],
    )
    cb.attach_to_trainer(trainer)
    cb.attach_to_trainer(trainer)  # idempotent: one copy, same place
    assert [type(c) for c in trainer.callback_handler.callbacks].count(MoETrainerCallback) == 1
    trainer.train()
    tags = set(_tb_scalars(tmp_path / "all").Tags()["scalars"])
    hist = [h for h in trainer.state.log_history if "moe/avg_expert_cv" in h]
    moe_keys = {k for k in hist[0] if k.startswith("moe/")}
    assert len(moe_keys) > 20
    assert {f"train/{k}" for k in moe_keys} <= tags

    # Not attached: the report_to integration runs first and gets nothing; a warning says
    # so; state.log_history still gets every key.
    cb2 = MoETrainerCallback(opts)
    trainer2 = Trainer(
        model=model,
        args=_args(tmp_path / "plain", max_steps=2, eval_strategy="no", report_to="tensorboard"),
        train_dataset=_Rows(16, vocab, seed=1, pad=False),
        callbacks=[cb2],
    )
    with caplog.at_level(logging.WARNING, logger="moescope"):
        trainer2.train()
    assert any("attach_to_trainer" in r.getMessage() for r in caplog.records)
    tags2 = set(_tb_scalars(tmp_path / "plain").Tags()["scalars"])
    assert "train/loss" in tags2
    assert not any("moe/" in t for t in tags2)
    hist2 = [h for h in trainer2.state.log_history if "moe/avg_expert_cv" in h]
    assert [h["step"] for h in hist2] == [1, 2]
    assert {k for k in hist2[0] if k.startswith("moe/")} == moe_keys


def test_stop_on_alert_and_raising_on_alert(tmp_path) -> None:
    model = _tiny_moe()
    hooks_before = _hook_count(model)
    seen = []
    # Routing entropy is always below 100 nats: every layer alerts at every window.
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2,
        log_to_console=False,
        log_heatmap_every=None,
        entropy_threshold=100.0,
        stop_on_alert=True,
        on_alert=seen.append,
    )
    trainer, _ = _run(model, tmp_path / "a", cb, model.config.vocab_size, max_steps=8)
    assert trainer.state.global_step == 2  # stopped at the first window
    assert {a.rule for a in seen} == {"entropy_collapse"}
    assert {a.layer for a in seen} == set(_layers(model))
    assert all(a.step == 2 for a in seen)
    assert _hook_count(model) == hooks_before

    class Stop(RuntimeError):
        pass

    def boom(alert):
        raise Stop(alert.message)

    cb2 = create_moe_callback_for_transformers(
        log_every_n_steps=2,
        log_to_console=False,
        log_heatmap_every=None,
        entropy_threshold=100.0,
        on_alert=boom,
    )
    with pytest.raises(Stop, match="Routing entropy collapse"):
        _run(model, tmp_path / "b", cb2, model.config.vocab_size, max_steps=8)
    assert _hook_count(model) == hooks_before  # removed before the exception left


def test_console_alert_lines(tmp_path, capsys) -> None:
    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2,
        log_heatmap_every=None,
        entropy_threshold=100.0,
    )
    trainer, _ = _run(model, tmp_path, cb, model.config.vocab_size, max_steps=2, eval_strategy="no")
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("⚠️  MoE Alert")]
    assert "⚠️  MoE Alert at step 2: model.layers.0.mlp: Routing entropy collapse" in lines[0]
    assert "MoE step 2 | 2 layers" in out
    # The Trainer's own printer (disable_tqdm=True: PrinterCallback) prints its logs dict:
    # the seeds' three summary keys only, not one key per layer and metric.
    printed = [ast.literal_eval(ln) for ln in out.splitlines() if ln.startswith("{'loss'")]
    assert len(printed) == 2
    assert not any(k.startswith("moe/") for k in printed[0])
    assert {k for k in printed[1] if k.startswith("moe/")} == {
        f"moe/{k}" for k in TRAINER_SUMMARY_METRICS
    }
    entry = next(h for h in trainer.state.log_history if "moe/avg_expert_cv" in h)
    assert len([k for k in entry if k.startswith("moe/")]) > 30  # the full set is kept there


def test_gradient_checkpointing_and_predict_mid_training(tmp_path) -> None:
    from transformers import TrainerCallback

    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=None
    )
    test_set = _Rows(4, model.config.vocab_size, seed=3, pad=True)
    predicted: dict[str, float] = {}

    class PredictAtStep1(TrainerCallback):
        trainer: Trainer | None = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                predicted.update(self.trainer.predict(test_set).metrics)

    other = PredictAtStep1()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2, eval_strategy="no", activation_checkpointing=True),
        train_dataset=_Rows(16, model.config.vocab_size, seed=1, pad=False),
        callbacks=[cb, other],
    )
    other.trainer = trainer
    trainer.train()
    assert model.model.gradient_checkpointing  # the re-run forwards really happened
    entry = next(h for h in trainer.state.log_history if "moe/avg_expert_cv" in h)
    # Checkpoint recomputation in backward is not counted again; predict() forwards (eval
    # mode) are not counted in the train window but in moe/test/...
    assert entry["step"] == 2
    assert entry["moe/model.layers.0.mlp/num_tokens"] == 2 * GA * TRAIN_BS * SEQ
    assert predicted["moe/test/model.layers.0.mlp/num_tokens"] == int(test_set.mask.sum())


def test_early_stop_logs_the_tail_window(tmp_path) -> None:
    from transformers import TrainerCallback

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=None
    )
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=10, eval_strategy="no"),
        train_dataset=_Rows(40, model.config.vocab_size, seed=1, pad=False),
        callbacks=[cb, StopAt3()],
    )
    trainer.train()
    rows = [h for h in trainer.state.log_history if "moe/avg_expert_cv" in h]
    assert [h["step"] for h in rows] == [2, 3]
    assert rows[1]["moe/model.layers.1.mlp/num_tokens"] == 1 * GA * TRAIN_BS * SEQ


def test_none_follows_the_trainers_logging_steps(tmp_path) -> None:
    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=None, log_to_console=False, log_heatmap_every=None
    )
    trainer, _ = _run(
        model,
        tmp_path,
        cb,
        model.config.vocab_size,
        max_steps=4,
        logging_steps=3,
        eval_strategy="no",
    )
    steps = [h["step"] for h in trainer.state.log_history if "moe/avg_expert_cv" in h]
    assert steps == [3, 4]  # the Trainer's logging step, then the last step
    tokens = [
        h["moe/model.layers.0.mlp/num_tokens"]
        for h in trainer.state.log_history
        if "moe/avg_expert_cv" in h
    ]
    assert tokens == [3 * GA * TRAIN_BS * SEQ, 1 * GA * TRAIN_BS * SEQ]


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(TypeError, match="logger= accepts"):
        create_moe_callback_for_transformers(logger=42)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        create_moe_callback_for_transformers(log_every_n_steps=0)
    with pytest.raises(ValueError, match="trainer_logs"):
        MoETrainerCallback(trainer_logs="everything")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown option"):
        MoETrainerCallback(log_every=5)


def test_no_private_transformers_access() -> None:
    """The integration uses transformers' public API only: no frame walking, no private
    attribute of another callback or of the Trainer."""
    import inspect
    import re

    import moescope.integrations.transformers as mod

    src = inspect.getsource(mod)
    assert "_getframe" not in src and "f_locals" not in src
    assert not re.search(r"\b(cb|callback|trainer|handler)\._[a-z]", src)
    assert not re.search(r"getattr\([^)]*, \"_", src)
