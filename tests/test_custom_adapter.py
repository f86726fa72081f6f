"""User adapters: SimpleAdapter + register_adapter on a hand-written MoE, the protocol
implemented directly, and the registry's order."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moescope
from moescope import MoEMonitor
from moescope.capture import (
    PRIORITY_DEDICATED,
    PRIORITY_GENERIC,
    CaptureContext,
    LayerInfo,
    RoutingRecord,
    SimpleAdapter,
    default_adapters,
    registry,
    unregister_adapter,
)
from moescope.capture.hf_generic import GenericHFAdapter
from moescope.capture.registry import register_adapter


class G3Router(nn.Module):
    """Like the seeds' router: returns (weights [T, K], indices [T, K]), no logits."""

    def __init__(self, h: int, e: int, k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(h, e, bias=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, i = torch.topk(F.softmax(self.proj(x), -1), self.k, dim=-1)
        return w / w.sum(-1, keepdim=True), i


class G3MoE(nn.Module):
    """A custom MoE block the built-in adapters do not know (experts in a ModuleList)."""

    def __init__(self, h: int = 8, e: int = 6, k: int = 2) -> None:
        super().__init__()
        self.num_experts = e
        self.router = G3Router(h, e, k)
        self.experts = nn.ModuleList(nn.Linear(h, h) for _ in range(e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            sel = (idx == e).any(-1)
            out[sel] += (w * (idx == e))[sel].sum(-1, keepdim=True) * expert(flat[sel])
        return out.reshape(x.shape)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(G3MoE() for _ in range(2))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        for b in self.blocks:
            x = x + b(x)
        return x


@pytest.fixture
def g3_adapter() -> Iterator[SimpleAdapter]:
    # The whole user-side integration (docs/custom_adapter.md): under 20 lines.
    adapter = moescope.register_adapter(
        SimpleAdapter(
            match=lambda path, m: isinstance(m, G3MoE),
            target="router",
            num_experts=lambda m: m.num_experts,
            top_k=lambda m: m.router.k,
            extract=lambda mod, args, out: {"topk_weight": out[0], "topk_index": out[1]},
            name="g3moe",
        )
    )
    yield adapter
    assert unregister_adapter(adapter)


def test_simple_adapter_counts_masked_tokens(g3_adapter: SimpleAdapter) -> None:
    torch.manual_seed(0)
    net = Net()
    with pytest.raises(moescope.UnsupportedModelError):
        MoEMonitor(net, adapters=[GenericHFAdapter()])  # ModuleList experts: not generic
    mon = MoEMonitor(net)
    assert [(i.path, i.adapter, i.num_experts, i.top_k) for i in mon.layers] == [
        ("blocks.0", "g3moe", 6, 2),
        ("blocks.1", "g3moe", 6, 2),
    ]
    seen: list[torch.Tensor] = []
    hooks = [b.router.register_forward_hook(lambda m, a, o: seen.append(o[1])) for b in net.blocks]
    x = torch.randn(2, 5, 8)
    am = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    net(x, am)
    for h in hooks:
        h.remove()
    snap = mon.snapshot()
    valid = am.reshape(-1).bool()
    for st, idx in zip(snap.layers.values(), seen, strict=True):
        want = torch.bincount(idx[valid].reshape(-1), minlength=6)
        assert st.usage_counts.tolist() == want.tolist()
        assert st.num_tokens == 6
        assert st.weight_sums.sum() == pytest.approx(6.0, rel=1e-6)  # renormalised weights
        assert st.routing_entropy != st.routing_entropy  # NaN: the router gave no logits
    mon.detach()


class ProtocolAdapter:
    """The protocol written out by hand: hook the router, emit with logits."""

    name = "g3-protocol"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        if not isinstance(module, G3MoE):
            return None
        return LayerInfo(path, self.name, module.num_experts, module.router.k, module)

    def attach(self, info: LayerInfo, emit: Any, ctx: CaptureContext) -> Any:
        router = info.module.router

        def hook(mod: nn.Module, args: tuple, out: tuple) -> None:
            if ctx.counting:
                logits = F.linear(args[0], mod.proj.weight)  # recomputed only for the test
                emit(
                    RoutingRecord(
                        info.path,
                        info.num_experts,
                        out[1],
                        logits=logits,
                        topk_weight=out[0],
                        token_mask=ctx.token_mask(out[1].shape[0]),
                    )
                )

        return router.register_forward_hook(hook).remove


def test_protocol_adapter_passed_explicitly() -> None:
    torch.manual_seed(1)
    net = Net()
    with MoEMonitor(net, adapters=[ProtocolAdapter()]) as mon:
        x = torch.randn(3, 4, 8)
        net(x)
    snap = mon.snapshot()
    h = x.reshape(-1, 8)
    p = torch.softmax(F.linear(h, net.blocks[0].router.proj.weight).double(), -1)
    ent = (-(p * p.log()).sum(-1)).mean().item()
    assert snap.layers["blocks.0"].routing_entropy == pytest.approx(ent, rel=1e-6)
    assert snap.layers["blocks.0"].num_tokens == 12


def test_simple_adapter_rejects_unknown_fields() -> None:
    net = Net()
    bad = SimpleAdapter(
        match=lambda p, m: isinstance(m, G3MoE),
        target="router",
        num_experts=6,
        top_k=2,
        extract=lambda m, a, o: {"topk_index": o[1], "indices": o[1]},
    )
    MoEMonitor(net, adapters=[bad])
    with pytest.raises(KeyError, match="unknown fields"):
        net(torch.randn(2, 8))


def _dedicated() -> list[Any]:
    out = []
    for name in registry._DEDICATED_MODULES:
        try:
            out += list(importlib.import_module(name).ADAPTERS)
        except ModuleNotFoundError:
            continue
    return out


def test_registry_order_and_protocol_check() -> None:
    adapters = default_adapters()
    names = [a.name for a in adapters]
    # Dedicated transformers adapters come first, then moescope.nn, then the generic one.
    assert names[-2:] == ["moescope.nn", "transformers.generic"]
    dedicated = _dedicated()
    assert all(any(a is d for a in adapters[: len(dedicated)]) for d in dedicated)
    assert PRIORITY_DEDICATED > PRIORITY_GENERIC
    with pytest.raises(TypeError, match="adapter protocol"):
        register_adapter(object())  # type: ignore[arg-type]


def test_missing_dedicated_module_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_entries", [])
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    monkeypatch.setattr(registry, "_DEDICATED_MODULES", ("moescope.capture.hf_not_written_yet",))
    names = [a.name for a in default_adapters()]
    assert names == ["moescope.nn", "transformers.generic"]


def test_user_adapter_wins_over_builtin() -> None:
    class Wrapped(GenericHFAdapter):
        name = "mine"

    mine = register_adapter(Wrapped())
    try:
        assert default_adapters()[0] is mine
    finally:
        unregister_adapter(mine)
    assert mine not in default_adapters()


def test_layer_info_carries_typed_fields_not_extra() -> None:
    """What adapters, neuron capture and cost read from each other are typed LayerInfo
    fields; ``extra`` stays empty for the built-in adapters (private to an adapter)."""
    model = G3MoE()
    adapter = SimpleAdapter(
        match=lambda path, m: isinstance(m, G3MoE),
        target="router",
        num_experts=6,
        top_k=2,
        extract=lambda mod, args, out: {"topk_weight": out[0], "topk_index": out[1]},
    )
    (info,) = MoEMonitor(model, adapters=[adapter], attach=False).layers
    assert info.hooked is model.router and info.extra == {}
    assert info.experts is None and info.score_fn == "softmax"

    pytest.importorskip("transformers")
    import inspect

    from hf_tiny import build_tiny

    hf, _ = build_tiny("qwen3_moe")
    infos = MoEMonitor(hf, attach=False).layers
    assert infos
    for info in infos:
        experts = info.module.experts
        names = list(inspect.signature(experts.forward).parameters)
        assert info.experts is experts and info.extra == {}
        assert (info.index_arg, info.weight_arg) == (names[1], names[2])
