"""The moescope.nn adapter: MoELayer blocks with every router kind.

References: the RouterOutput the layer itself kept (``layer.router_output``) or the
model's ``router_outputs``, recomputed in float64 in the test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moescope import MoEMonitor
from moescope.nn import GroupedExperts, MoELayer, TopKRouter
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.nn.routers import ExpertChoiceRouter, SwitchRouter

E, H = 8, 16


def _layer(router: nn.Module) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(router, GroupedExperts(E, H, 24))


def _bincount(idx: torch.Tensor, keep: torch.Tensor) -> list[int]:
    return torch.bincount(idx[keep], minlength=E).tolist()


def test_tiny_lm_counts_entropy_and_mask() -> None:
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=32,
        num_experts=E,
        top_k=2,
    )
    model = TinyMoELM(cfg).eval()
    ids = torch.randint(0, 64, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    mon = MoEMonitor(model)
    assert [i.adapter for i in mon.layers] == ["moescope.nn"] * 2
    assert [(i.num_experts, i.top_k) for i in mon.layers] == [(E, 2), (E, 2)]
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    snap = mon.snapshot()
    valid = mask.reshape(-1).bool()
    for info, ro in zip(mon.layers, out.router_outputs, strict=True):
        st = snap.layers[info.path]
        keep = valid[:, None].expand_as(ro.topk_index)
        assert st.usage_counts.tolist() == _bincount(ro.topk_index, keep)
        p = torch.softmax(ro.logits[valid].double(), -1)
        ent = (-(p * p.log()).sum(-1)).mean().item()
        assert st.routing_entropy == pytest.approx(ent, rel=1e-6)
        assert st.num_tokens == int(valid.sum())
        w = torch.zeros(E, dtype=torch.float64).index_add_(
            0, ro.topk_index[valid].reshape(-1), ro.topk_weight[valid].reshape(-1).double()
        )
        assert st.weight_sums == pytest.approx(w.numpy(), rel=1e-6)
    mon.detach()


def test_layer_own_token_mask_used_without_top_level_mask() -> None:
    layer = _layer(TopKRouter(H, E, 2))
    x = torch.randn(2, 5, H)
    tm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with MoEMonitor(layer) as mon:
        layer(x, tm)  # positional
        ro1 = layer.router_output
        layer(x, token_mask=tm)  # keyword
    snap = mon.snapshot()
    st = next(iter(snap.layers.values()))
    keep = tm.reshape(-1)[:, None].expand(-1, 2)
    want = [2 * c for c in _bincount(ro1.topk_index, keep)]
    assert st.usage_counts.tolist() == want
    assert st.num_tokens == 2 * int(tm.sum())


class _Wrapper(nn.Module):
    """A top-level model whose attention_mask differs from what the layer is told."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.block = layer

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.block(x, torch.ones(x.shape[:2], dtype=torch.bool))


def test_top_level_attention_mask_preferred() -> None:
    model = _Wrapper(_layer(TopKRouter(H, E, 2)))
    x = torch.randn(2, 5, H)
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with MoEMonitor(model) as mon:
        model(x, am)
    st = mon.snapshot().layers["block"]
    assert st.num_tokens == int(am.sum())
    keep = am.reshape(-1).bool()[:, None].expand(-1, 2)
    assert st.usage_counts.tolist() == _bincount(model.block.router_output.topk_index, keep)


def test_switch_capacity_drops_are_not_counted_as_usage() -> None:
    layer = _layer(SwitchRouter(H, E, capacity_factor=0.5))
    with MoEMonitor(layer) as mon:
        layer(torch.randn(40, H))
    ro = layer.router_output
    assert ro.dropped is not None and bool(ro.dropped.any())
    st = mon.snapshot().layers[mon.layers[0].path]
    assert mon.layers[0].top_k == 1
    assert st.usage_counts.tolist() == _bincount(ro.topk_index, ~ro.dropped)
    assert st.dropped_fraction == pytest.approx(ro.dropped.double().mean().item())
    assert st.dropped_counts.tolist() == _bincount(ro.topk_index, ro.dropped)


def test_expert_choice_uses_k_equal_e() -> None:
    layer = _layer(ExpertChoiceRouter(H, E, capacity_factor=2.0))
    with MoEMonitor(layer) as mon:
        layer(torch.randn(24, H))
    ro = layer.router_output
    assert mon.layers[0].top_k == E
    st = mon.snapshot().layers[mon.layers[0].path]
    assert st.usage_counts.tolist() == (~ro.dropped).sum(0).tolist()


def test_tiny_lm_gradient_checkpointing_counted_once() -> None:
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=32,
        num_experts=E,
        top_k=2,
    )
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    snaps = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = TinyMoELM(cfg).train()
        model.model.gradient_checkpointing = ckpt
        calls: list[int] = []
        router = model.model.layers[0].mlp.router
        h = router.register_forward_hook(lambda m, a, o, calls=calls: calls.append(1))
        with MoEMonitor(model) as mon:
            model(ids, labels=ids).loss.backward()
        h.remove()
        assert len(calls) == (2 if ckpt else 1)  # really recomputed in backward
        snaps.append(mon.snapshot())
    for path, st in snaps[0].layers.items():
        assert snaps[1].layers[path].usage_counts.tolist() == st.usage_counts.tolist()
        assert snaps[1].layers[path].num_tokens == st.num_tokens == 12
