"""TinyMoELM: shapes, causality, padding, loss composition, checkpointing, training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moescope.nn import MoELayer
from moescope.nn.model import ROUTER_CLASSES, TinyMoEConfig, TinyMoELM, build_router


def small_config(**overrides: object) -> TinyMoEConfig:
    base: dict[str, object] = dict(
        vocab_size=256,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=16,
        num_experts=4,
        top_k=2,
        moe_every=1,
        max_seq_len=64,
        initializer_range=0.2,  # large enough that routing differs between tokens
    )
    base.update(overrides)
    return TinyMoEConfig(**base)  # type: ignore[arg-type]


def make_model(seed: int = 0, **overrides: object) -> TinyMoELM:
    torch.manual_seed(seed)
    return TinyMoELM(small_config(**overrides)).double()


def test_shapes_and_module_paths() -> None:
    model = make_model(moe_every=2, num_layers=4)
    ids = torch.randint(0, 256, (3, 11))
    out = model(ids)
    assert out.logits.shape == (3, 11, 256)
    assert out.loss is None and out.lm_loss is None
    # moe_every=2: layers 1 and 3 are MoE, 0 and 2 dense.
    assert list(model.moe_layers()) == ["model.layers.1.mlp", "model.layers.3.mlp"]
    assert not isinstance(model.model.layers[0].mlp, MoELayer)
    assert len(out.router_outputs) == 2
    for ro in out.router_outputs:
        assert ro.logits.shape == (33, 4)
        assert ro.topk_index.shape == (33, 2)
    names = dict(model.named_modules())
    for path in ("model.embed_tokens", "model.layers.0.self_attn", "model.norm", "lm_head"):
        assert path in names


def test_causal_future_token_does_not_change_past() -> None:
    model = make_model()
    ids = torch.randint(0, 256, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 7) % 256
    a = model(ids).logits
    b = model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_right_padding_matches_unpadded_and_router_losses_exclude_padding() -> None:
    model = make_model()
    long_ids = torch.randint(0, 256, (1, 12))
    short_ids = torch.randint(0, 256, (1, 7))
    pad = torch.full((1, 5), 3)
    batch = torch.cat([long_ids, torch.cat([short_ids, pad], dim=1)])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0

    out = model(batch, attention_mask=mask)
    ref_long = model(long_ids)
    ref_short = model(short_ids)
    torch.testing.assert_close(out.logits[0], ref_long.logits[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.logits[1, :7], ref_short.logits[0], rtol=1e-9, atol=1e-9)

    # Router losses over the real tokens only, recomputed independently in float64 from
    # the unpadded runs' router outputs (per layer, then the mean over layers).
    def aux_z(ro_list: list) -> tuple[torch.Tensor, torch.Tensor]:
        aux, z = [], []
        for logits, topk in ro_list:
            probs = torch.softmax(logits.double(), -1)
            e = probs.shape[-1]
            f = torch.zeros(e, dtype=torch.float64)
            for t in range(topk.shape[0]):
                for k in range(topk.shape[1]):
                    f[topk[t, k]] += 1.0
            f = f / topk.shape[0]
            aux.append(e * (f * probs.mean(0)).sum())
            z.append((torch.logsumexp(logits.double(), -1) ** 2).mean())
        return torch.stack(aux).mean(), torch.stack(z).mean()

    real = []
    for lo, sh in zip(ref_long.router_outputs, ref_short.router_outputs, strict=True):
        real.append((torch.cat([lo.logits, sh.logits]), torch.cat([lo.topk_index, sh.topk_index])))
    aux_ref, z_ref = aux_z(real)
    torch.testing.assert_close(out.aux_loss.double(), aux_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.z_loss.double(), z_ref, rtol=1e-5, atol=1e-6)
    # And the padded tokens would have changed the losses had they been counted.
    unmasked = model(batch)
    assert not torch.allclose(unmasked.z_loss, out.z_loss)


def test_left_padding_gives_finite_outputs_and_matches_real_positions() -> None:
    model = make_model()
    ids = torch.randint(0, 256, (1, 6))
    batch = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(batch, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
    # RoPE is relative, so a constant position shift leaves the real positions unchanged.
    torch.testing.assert_close(out.logits[0, 3:], model(ids).logits[0], rtol=1e-9, atol=1e-9)


def test_loss_is_lm_loss_plus_weighted_router_losses() -> None:
    model = make_model(aux_loss_coef=0.05, z_loss_coef=0.003)
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    # Independent next-token cross entropy in float64.
    logp = torch.log_softmax(out.logits.double(), -1)
    terms = []
    for b in range(2):
        for t in range(9):
            y = labels[b, t + 1]
            if y != -100:
                terms.append(-logp[b, t, y])
    lm_ref = torch.stack(terms).mean()
    torch.testing.assert_close(out.lm_loss.double(), lm_ref, rtol=1e-10, atol=1e-10)
    total_ref = lm_ref + 0.05 * out.aux_loss.double() + 0.003 * out.z_loss.double()
    # Router losses are float32 by design (routers compute them in float32).
    torch.testing.assert_close(out.loss.double(), total_ref, rtol=1e-7, atol=1e-7)
    assert not torch.allclose(out.loss, out.lm_loss)
    # The model's aux loss is the mean of the per-layer router losses.
    per_layer = torch.stack([ro.losses["aux_loss"] for ro in out.router_outputs])
    torch.testing.assert_close(out.aux_loss, per_layer.float().mean())


def test_gradient_checkpointing_same_loss_and_grads() -> None:
    model = make_model()
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing = True
    assert ckpt.model.gradient_checkpointing
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    a = model(ids, attention_mask=mask, labels=ids)
    b = ckpt(ids, attention_mask=mask, labels=ids)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-12)
    grads_a = dict(model.named_parameters())
    for name, p in ckpt.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads_a[name].grad, rtol=1e-9, atol=1e-12)
    # The router gets gradient from the aux/z losses through the checkpointed layers too.
    assert ckpt.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_training_reduces_loss_on_repeated_batch() -> None:
    torch.manual_seed(0)
    model = TinyMoELM(small_config(initializer_range=0.02))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (4, 16))
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.detach())
    assert losses[-1] < 0.5 * losses[0]


def test_tied_embeddings_share_storage() -> None:
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n_untied = make_model(tie_embeddings=False).num_parameters()
    assert n_untied - model.num_parameters() == 256 * 32


def test_shared_experts_and_kv_cache_protocol() -> None:
    model = make_model(num_shared_experts=1)
    assert model.model.layers[0].mlp.shared_experts is not None

    class ListCache:
        """Minimal KV cache with transformers' ``update``/``get_seq_length`` API."""

        def __init__(self) -> None:
            self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def update(self, k, v, layer_idx, *args):
            if layer_idx in self.kv:
                pk, pv = self.kv[layer_idx]
                k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            self.kv[layer_idx] = (k, v)
            return k, v

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.kv[layer_idx][0].shape[2] if layer_idx in self.kv else 0

    ids = torch.randint(0, 256, (2, 9))
    full = model(ids).logits
    cache = ListCache()
    first = model(ids[:, :6], past_key_values=cache).logits
    rest = model(ids[:, 6:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-9, atol=1e-9)


def test_config_and_router_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TinyMoEConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        TinyMoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="unknown router"):
        TinyMoEConfig(router="nope")
    model = make_model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kind", sorted(ROUTER_CLASSES))
def test_every_named_router_builds_and_trains(kind: str) -> None:
    import moescope.nn.routers as routers

    cls_name = ROUTER_CLASSES[kind]
    cfg = small_config(router=kind)
    if not hasattr(routers, cls_name):
        with pytest.raises(ValueError, match=cls_name):
            build_router(cfg)
        return
    torch.manual_seed(0)
    model = TinyMoELM(cfg)
    assert type(model.model.layers[0].mlp.router).__name__ == cls_name
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    assert len(out.router_outputs) == cfg.num_layers


def test_dense_only_model_has_zero_router_losses() -> None:
    model = make_model(moe_every=10, num_layers=2)
    ids = torch.randint(0, 256, (1, 5))
    out = model(ids, labels=ids)
    assert out.router_outputs == ()
    assert out.aux_loss == 0 and out.z_loss == 0
    torch.testing.assert_close(out.loss, out.lm_loss)
    torch.testing.assert_close(
        out.lm_loss,
        F.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:]).to(out.lm_loss.dtype),
    )
