"""A failing attach leaves no hook behind (monitor and token recorder alike)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moescope
from moescope.capture.nn_adapter import NNAdapter
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.stats.token_recorder import RoutingRecorder


class _FailsOnSecondLayer(NNAdapter):
    """The moescope.nn adapter, except that attaching its second layer raises."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def attach(self, info, emit, ctx):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("attach failed")
        return super().attach(info, emit, ctx)


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda model, adapter: moescope.MoEMonitor(model, adapters=[adapter], attach=False),
        lambda model, adapter: RoutingRecorder(model, adapters=[adapter]),
    ],
)
def test_failed_attach_rolls_back_every_hook(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = TinyMoELM(
        TinyMoEConfig(
            hidden_size=16, num_layers=2, num_heads=2, intermediate_size=16, num_experts=4, top_k=2
        )
    )
    before = _hook_count(model)
    adapter = _FailsOnSecondLayer()
    watcher = make(model, adapter)
    with pytest.raises(RuntimeError, match="attach failed"):
        watcher.attach()
    assert adapter.calls == 2  # the first layer's hooks were installed, then undone
    assert _hook_count(model) == before
    assert not watcher.attached
