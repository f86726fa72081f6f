"""TinyMoEForCausalLM: Auto registration, save/load, Trainer, generate, checkpointing."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moescope.data import ByteDataset
from moescope.nn.hf import _CACHE_FIELD, TinyMoEForCausalLM, TinyMoEHFConfig, register
from moescope.nn.model import TinyMoEConfig, TinyMoELM

SMALL = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=16,
    num_experts=4,
    num_experts_per_tok=2,
    max_seq_len=64,
)


def small_model(seed: int = 0, **overrides: object) -> TinyMoEForCausalLM:
    torch.manual_seed(seed)
    config = AutoConfig.for_model("moescope_tiny_moe", **{**SMALL, **overrides})
    return AutoModelForCausalLM.from_config(config)


def test_auto_classes_build_the_model() -> None:
    register()  # idempotent
    model = small_model()
    assert isinstance(model, TinyMoEForCausalLM)
    assert isinstance(model.config, TinyMoEHFConfig)
    assert model.config.num_hidden_layers == 2 and model.config.num_local_experts == 4
    names = dict(model.named_modules())
    assert "model.layers.1.mlp.router" in names and "model.layers.1.mlp.experts" in names
    tiny = model.config.to_tiny_config()
    assert tiny.top_k == 2 and tiny.num_layers == 2


def test_matches_plain_tinymoelm_and_returns_moe_output() -> None:
    torch.manual_seed(0)
    tiny_kwargs = {("top_k" if k == "num_experts_per_tok" else k): v for k, v in SMALL.items()}
    lm = TinyMoELM(TinyMoEConfig(**tiny_kwargs))
    model = TinyMoEForCausalLM.from_tiny(lm)
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref = lm(ids, attention_mask=mask, labels=labels)
    out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (20, 4)
    # Per layer, our aux loss equals transformers' own load_balancing_loss_func.
    for ro in ref.router_outputs:
        hf_aux = load_balancing_loss_func((ro.logits,), 4, 2, mask)
        torch.testing.assert_close(ro.losses["aux_loss"], hf_aux, rtol=1e-5, atol=1e-6)
    assert model.to_tiny().state_dict().keys() == lm.state_dict().keys()


def test_save_pretrained_round_trip_is_bit_identical(tmp_path) -> None:
    model = small_model(seed=1).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TinyMoEForCausalLM)
    for (n1, p1), (n2, p2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)


def test_tied_embeddings_round_trip(tmp_path) -> None:
    model = small_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize(
    "method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"]
)
def test_checkpointing_enable_same_loss_and_grads(method: str) -> None:
    a = small_model(seed=2)
    b = small_model(seed=2)
    with warnings.catch_warnings():
        # transformers 5.x deprecates the old name (FutureWarning) but it must still work.
        warnings.simplefilter("ignore", FutureWarning)
        getattr(b, method)()
    assert b.model.gradient_checkpointing
    a.train()
    b.train()
    ids = torch.randint(0, 256, (2, 9))
    la = a(ids, labels=ids).loss
    lb = b(ids, labels=ids).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    grads = dict(a.named_parameters())
    for name, p in b.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7)


def test_generate_with_and_without_cache() -> None:
    model = small_model(seed=3).eval()
    prompt = torch.randint(0, 256, (2, 5))
    cached = model.generate(prompt, max_new_tokens=7, do_sample=False)
    plain = model.generate(prompt, max_new_tokens=7, do_sample=False, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)
    # Greedy reference: argmax of the last position, recomputed from scratch each step.
    ids = prompt
    with torch.no_grad():
        for _ in range(7):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(ids, cached)


def test_left_padded_batch_generation_matches_single_prompts() -> None:
    model = small_model(seed=6, initializer_range=0.2).eval()
    p1 = torch.randint(0, 256, (1, 6))
    p2 = torch.randint(0, 256, (1, 3))
    batch = torch.cat([p1, torch.cat([torch.zeros(1, 3, dtype=torch.long), p2], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    cached = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    plain = model.generate(
        batch, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, plain)
    alone1 = model.generate(p1, max_new_tokens=6, do_sample=False)
    alone2 = model.generate(p2, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached[0, 6:], alone1[0, 6:])
    assert torch.equal(cached[1, 6:], alone2[0, 3:])


def test_cache_under_either_name_continues_the_same_sequence() -> None:
    # generate() of transformers < 5.24 passes the cache as ``past_key_values``, 5.24 as
    # ``cache``: both must continue from it (a swallowed name restarts from empty).
    model = small_model(seed=5).eval()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = model(ids[:, :5], use_cache=True)
            step = model(ids[:, 5:], use_cache=True, **{name: prefix[_CACHE_FIELD]})
            torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-6)


def test_unknown_keyword_is_an_error_that_names_it() -> None:
    model = small_model(seed=5).eval()
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(TypeError, match="past_kv"):
        model(ids, past_kv=None)
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=object(), past_key_values=object())


def test_demo_checkpoint_generates_with_the_cache() -> None:
    from moescope.demo import DemoSettings, build_model

    model = build_model(DemoSettings(), aux_loss_coef=0.01)
    assert model.config.use_cache
    assert model.generation_config.use_cache


def test_trainer_three_steps(tmp_path) -> None:
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    model = small_model(seed=4)
    data = bytes(range(256)) * 8
    train = ByteDataset(data, seq_len=16, split="train")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train)
    result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3


def test_num_items_in_batch_changes_normalisation() -> None:
    model = small_model(seed=5, aux_loss_coef=0.0, z_loss_coef=0.0)
    ids = torch.randint(0, 256, (2, 8))
    mean_loss = model(ids, labels=ids).loss
    summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(7)).loss
    # 2 x 7 predicted positions: sum / 7 = mean * 14 / 7.
    torch.testing.assert_close(summed, mean_loss * 2, rtol=1e-5, atol=1e-6)


def test_inputs_embeds_rejected() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 32))
