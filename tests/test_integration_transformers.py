"""create_moe_callback_for_transformers under real transformers Trainer runs.

Each run: gradient accumulation 2, step-wise evaluation, CPU. Checked against
independent references: token counts (micro-batches x batch x seq, or the eval masks'
sum), K assignments per token, a float64 recomputation of the averaged CV from the
window's usage counts, TensorBoard's own event reader.
"""

from __future__ import annotations

import glob
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

from transformers import Trainer, TrainingArguments

from hf_tiny import build_tiny
from moescope import create_moe_callback_for_transformers
from moescope.integrations.transformers import MoETrainerCallback

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
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=16,
        num_experts=4, num_experts_per_tok=K, max_seq_len=32,
    )
    return TinyMoEForCausalLM(cfg)


def _mixtral() -> nn.Module:
    model, _ = build_tiny("mixtral", seed=1)
    return model


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


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


def _run(model: nn.Module, tmp_path, cb: MoETrainerCallback, vocab: int, **kw) -> tuple[Trainer, _Rows]:
    train = _Rows(32, vocab, seed=1, pad=False)
    evald = _Rows(5, vocab, seed=2, pad=True)
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=train,
                      eval_dataset=evald, callbacks=[cb])
    trainer.train()
    return trainer, evald


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if n.endswith(".mlp") and (hasattr(m, "router") or hasattr(m, "gate"))]


@pytest.mark.parametrize("build", [_tiny_moe, _mixtral], ids=["tiny_moe", "mixtral"])
def test_trainer_logs_train_and_eval_windows(build, tmp_path) -> None:
    model = build()
    vocab = model.config.vocab_size
    hooks_before = _hook_count(model)
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=None,
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
    history = cb.session.train_monitor.history
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
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
               for line in lines]
    snaps = [r for r in records if r["kind"] == "snapshot"]
    assert [r["step"] for r in snaps] == [2, 4]
    for r in snaps:
        for layer in layers:
            assert sum(r["snapshot"]["layers"][layer]["usage_counts"]) == tokens_per_window * K

    # trainer.evaluate() after training: the callback is detached, nothing added.
    metrics = trainer.evaluate()
    assert not any(k.startswith("moe/") for k in metrics)


def test_report_to_tensorboard_receives_moe_scalars(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    pytest.importorskip("matplotlib")
    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(log_every_n_steps=2, log_to_console=False,
                                              log_heatmap_every=4, entropy_threshold=100.0)
    trainer, _ = _run(model, tmp_path, cb, model.config.vocab_size, report_to="tensorboard")
    # The callback moved itself ahead of the reporting integration.
    order = [type(c) for c in trainer.callback_handler.callbacks]
    assert order.index(MoETrainerCallback) < order.index(TensorBoardCallback)

    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    acc = EventAccumulator(str(files[0]).rsplit("/", 1)[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    hist = {h["step"]: h for h in trainer.state.log_history if "moe/avg_expert_cv" in h}
    for key in ("moe/avg_expert_cv", "moe/avg_routing_entropy", "moe/total_unused_experts",
                "moe/model.layers.1.mlp/cv"):
        tag = f"train/{key}"  # transformers' rewrite_logs prefixes train keys
        assert tag in tags
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4]
        for e in events:
            assert e.value == pytest.approx(hist[e.step][key], rel=1e-6, abs=1e-6)
    eval_events = acc.Scalars("train/moe/eval/avg_expert_cv")
    assert [e.step for e in eval_events] == [2, 4]
    # Heatmaps (step 4) and alert lines reach the Trainer's own writer too.
    images = set(acc.Tags()["images"])
    assert {"moe/usage_heatmap", "moe/model.layers.0.mlp/usage_heatmap"} <= images
    assert [e.step for e in acc.Images("moe/model.layers.0.mlp/usage_heatmap")] == [4]
    assert "moe/alerts/text_summary" in acc.Tags()["tensors"]
    png = tmp_path / "moe_logs" / "heatmaps" / "model.layers.0.mlp_step4.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_stop_on_alert_and_raising_on_alert(tmp_path) -> None:
    model = _tiny_moe()
    hooks_before = _hook_count(model)
    seen = []
    # Routing entropy is always below 100 nats: every layer alerts at every window.
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=None,
        entropy_threshold=100.0, stop_on_alert=True, on_alert=seen.append,
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
        log_every_n_steps=2, log_to_console=False, log_heatmap_every=None,
        entropy_threshold=100.0, on_alert=boom,
    )
    with pytest.raises(Stop, match="Routing entropy collapse"):
        _run(model, tmp_path / "b", cb2, model.config.vocab_size, max_steps=8)
    assert _hook_count(model) == hooks_before  # removed before the exception left


def test_console_alert_lines(tmp_path, capsys) -> None:
    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(
        log_every_n_steps=2, log_heatmap_every=None, entropy_threshold=100.0,
    )
    _run(model, tmp_path, cb, model.config.vocab_size, max_steps=2, eval_strategy="no")
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("⚠️  MoE Alert")]
    assert "⚠️  MoE Alert at step 2: model.layers.0.mlp: Routing entropy collapse" in lines[0]
    assert "MoE step 2 | 2 layers" in out


def test_gradient_checkpointing_and_predict_mid_training(tmp_path) -> None:
    from transformers import TrainerCallback

    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(log_every_n_steps=2, log_to_console=False,
                                              log_heatmap_every=None)
    test_set = _Rows(4, model.config.vocab_size, seed=3, pad=True)
    predicted: dict[str, float] = {}

    class PredictAtStep1(TrainerCallback):
        trainer: Trainer | None = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                predicted.update(self.trainer.predict(test_set).metrics)

    other = PredictAtStep1()
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=2, eval_strategy="no",
                                activation_checkpointing=True),
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
    cb = create_moe_callback_for_transformers(log_every_n_steps=2, log_to_console=False,
                                              log_heatmap_every=None)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=10, eval_strategy="no"),
                      train_dataset=_Rows(40, model.config.vocab_size, seed=1, pad=False),
                      callbacks=[cb, StopAt3()])
    trainer.train()
    rows = [h for h in trainer.state.log_history if "moe/avg_expert_cv" in h]
    assert [h["step"] for h in rows] == [2, 3]
    assert rows[1]["moe/model.layers.1.mlp/num_tokens"] == 1 * GA * TRAIN_BS * SEQ


def test_none_follows_the_trainers_logging_steps(tmp_path) -> None:
    model = _tiny_moe()
    cb = create_moe_callback_for_transformers(log_every_n_steps=None, log_to_console=False,
                                              log_heatmap_every=None)
    trainer, _ = _run(model, tmp_path, cb, model.config.vocab_size, max_steps=4,
                      logging_steps=3, eval_strategy="no")
    steps = [h["step"] for h in trainer.state.log_history if "moe/avg_expert_cv" in h]
    assert steps == [3, 4]  # the Trainer's logging step, then the last step
    tokens = [h["moe/model.layers.0.mlp/num_tokens"] for h in trainer.state.log_history
              if "moe/avg_expert_cv" in h]
    assert tokens == [3 * GA * TRAIN_BS * SEQ, 1 * GA * TRAIN_BS * SEQ]


def test_bad_logger_fails_at_construction() -> None:
    with pytest.raises(TypeError, match="logger= accepts"):
        create_moe_callback_for_transformers(logger=42)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        create_moe_callback_for_transformers(log_every_n_steps=0)
