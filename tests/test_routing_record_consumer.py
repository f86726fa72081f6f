"""RoutingRecorder as a consumer of the monitor's one capture pipeline: with ``monitor=``
every MoE layer is hooked once for both; a forward's calls arriving in several groups
(different shapes), across budget flushes, or after stale staged calls are assembled per
layer; the monitor's own statistics are unchanged by the recorder's flushes.

Ground truth: forward pre-hooks on each ``experts`` module (what the experts received),
restricted to the real tokens, slots ordered by descending combine weight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moescope import MoEMonitor
from moescope.capture.pipeline import DEFAULT_BUDGET_BYTES
from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.nn.routers import TopKRouter
from moescope.stats.token_recorder import RoutingRecorder

H = 16


class _TwoShapes(nn.Module):
    """Layer ``a`` (E=8, K=2) runs twice per forward (weight sharing), layer ``b``
    (E=4, K=1) once: one forward's calls reach the consumers as two batch groups."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, H)
        self.a = MoELayer(TopKRouter(H, 8, 2), GroupedExperts(8, H, H))
        self.b = MoELayer(TopKRouter(H, 4, 1), GroupedExperts(4, H, H))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        m = attention_mask.bool() if attention_mask is not None else None
        x = x + self.a(x, m)
        x = x + self.b(x, m)
        return x + self.a(x, m)


def _model(seed: int = 0) -> _TwoShapes:
    torch.manual_seed(seed)
    model = _TwoShapes().eval()
    with torch.no_grad():
        model.a.router.weight.mul_(20.0)
        model.b.router.weight.mul_(20.0)
    return model


def _batch(seed: int, b: int = 3, s: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s - 3 :] = 0
    mask[2, :4] = 0
    return ids, mask


def _hooks(model: nn.Module) -> dict[str, int]:
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()
    }


def _spy(model: _TwoShapes) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Per layer, per call: the experts' topk index, slots by descending weight."""
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    handles = []
    for path in got:

        def hook(m: nn.Module, args: tuple, path: str = path) -> None:
            idx, w = args[1].detach(), args[2].detach()
            order = w.float().argsort(dim=1, descending=True, stable=True)
            got[path].append(idx.gather(1, order).clone())

        handles.append(getattr(model, path).experts.register_forward_pre_hook(hook))
    return got, handles


@pytest.mark.parametrize("budget", [DEFAULT_BUDGET_BYTES, 1])
def test_shared_monitor_hooks_once_and_records_every_group(budget: int) -> None:
    """budget=1: the pipeline flushes at every layer call, so batches arrive during the
    forward, one call each; the default budget: at forward_end, in two shape groups."""
    model = _model()
    mon = MoEMonitor(model, budget_bytes=budget)
    with_monitor = _hooks(model)
    ref = MoEMonitor(model)  # an independent monitor: the recorder must not change counts
    got, handles = _spy(model)
    batches = [_batch(1), _batch(2)]
    rec = RoutingRecorder(model, monitor=mon)
    assert rec.layers == ["a", "b"] and rec.num_experts == {"a": 8, "b": 4}
    with rec, torch.no_grad():
        model(batches[0][0], batches[0][1])
        model(input_ids=batches[1][0], attention_mask=batches[1][1])
    for h in handles:
        h.remove()
    ref_snap = ref.snapshot()
    ref.detach()
    assert _hooks(model) == with_monitor  # the user's monitor keeps its hooks
    assert mon.attached and not rec.attached
    snap = mon.snapshot()
    for path in ("a", "b"):
        np.testing.assert_array_equal(
            snap.layers[path].usage_counts, ref_snap.layers[path].usage_counts
        )
    tr = rec.result()
    masks = [m.reshape(-1).bool() for _, m in batches]
    assert tr.num_tokens == sum(int(m.sum()) for m in masks)
    # a ran twice per forward: its first call is recorded.
    want_a = torch.cat([got["a"][0][masks[0]], got["a"][2][masks[1]]])
    want_b = torch.cat([got["b"][0][masks[0]], got["b"][1][masks[1]]])
    np.testing.assert_array_equal(tr.topk["a"], want_a.numpy())
    np.testing.assert_array_equal(tr.topk["b"], want_b.numpy())
    assert tr.topk["a"].shape[1] == 2 and tr.topk["b"].shape[1] == 1
    want_ids = torch.cat([i.reshape(-1)[m] for (i, _), m in zip(batches, masks, strict=True)])
    np.testing.assert_array_equal(tr.token_ids, want_ids.numpy())
    mon.detach()


def test_one_hook_per_layer_with_monitor_and_recorder() -> None:
    model = _model()
    mon = MoEMonitor(model)
    alone = _hooks(model)
    with RoutingRecorder(model, monitor=mon), torch.no_grad():
        assert _hooks(model) == alone  # nothing hooked a second time
        model(*_batch(0))
    assert _hooks(model) == alone
    mon.detach()
    assert sum(_hooks(model).values()) == 0


def test_stale_staged_calls_are_not_recorded() -> None:
    """A direct call of a sub-module (same token count) staged before the top-level
    forward belongs to no top-level forward: not recorded."""
    model = _model()
    mon = MoEMonitor(model)
    got, handles = _spy(model)
    ids, mask = _batch(3)
    with RoutingRecorder(model, monitor=mon) as rec, torch.no_grad():
        model.a(torch.randn(3, 10, H))  # staged in the pipeline, not yet flushed
        assert mon.pipeline.pending == 1
        model(ids, mask)
    for h in handles:
        h.remove()
    valid = mask.reshape(-1).bool()
    tr = rec.result()
    np.testing.assert_array_equal(tr.topk["a"], got["a"][1][valid].numpy())
    assert mon.snapshot().layers["a"].num_updates == 3  # the monitor counts all calls
    mon.detach()


def test_a_forward_inside_an_except_handler_is_recorded() -> None:
    model = _model()
    ids, mask = _batch(4)
    with RoutingRecorder(model) as rec, torch.no_grad():
        try:
            raise KeyError("outer")
        except KeyError:
            model(ids, mask)  # the outer exception is active, the forward succeeds
        assert rec.num_recorded() == int(mask.sum())


def test_monitor_attach_ownership_and_errors() -> None:
    model = _model()
    # The recorder's own monitor: attached and detached with it.
    rec = RoutingRecorder(model)
    assert rec.monitor.history is None and not rec.monitor.coactivation
    with rec:
        assert rec.monitor.attached
    assert not rec.monitor.attached and sum(_hooks(model).values()) == 0
    # A given monitor that was not attached: the recorder attaches it and undoes that.
    mon = MoEMonitor(model, attach=False)
    with RoutingRecorder(model, monitor=mon), torch.no_grad():
        assert mon.attached
        model(*_batch(5))
    assert not mon.attached and sum(_hooks(model).values()) == 0
    assert mon.snapshot().layers["b"].num_updates == 1  # what it counted is kept
    # A given attached monitor stays attached; the recorder is removed as a consumer.
    mon.attach()
    rec2 = RoutingRecorder(model, monitor=mon).attach()
    assert rec2 in mon.pipeline.listeners
    rec2.detach()
    rec2.detach()  # idempotent
    assert rec2 not in mon.pipeline.listeners and mon.attached
    mon.detach()
    other = TinyMoELM(
        TinyMoEConfig(
            hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16, num_experts=4, top_k=2
        )
    )
    with pytest.raises(ValueError, match="not the recorded model"):
        RoutingRecorder(other, monitor=mon)
    with pytest.raises(ValueError, match="adapters"):
        RoutingRecorder(model, monitor=mon, adapters=[])
    with pytest.raises(ValueError, match="not MoE layers"):
        RoutingRecorder(model, monitor=mon, layers=["embed"])
    only_b = RoutingRecorder(model, monitor=mon, layers=["b"])
    with only_b, torch.no_grad():
        model(*_batch(6))
    assert only_b.result().layers == ["b"]
