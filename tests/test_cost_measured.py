"""Measured cost from a real monitor run, against a float64 recomputation from the model."""

from __future__ import annotations

import pytest
import torch

import moescope
from moescope.cost.measured import measured_cost, measured_cost_from_reports
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.stats.neurons import NeuronOptions, NeuronThreshold


def _model(router: str = "topk", **router_kwargs: float) -> TinyMoELM:
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=48,
        num_experts=4,
        top_k=1 if router == "switch" else 2,
        router=router,
        router_kwargs=dict(router_kwargs),
        max_seq_len=32,
    )
    return TinyMoELM(cfg).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


def _kept_per_token(model: TinyMoELM, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Per layer: kept routed assignments per valid token, from the model's own routing."""
    out = model(ids, attention_mask=mask)
    valid = mask.reshape(-1).bool()
    ref = {}
    for (path, layer), ro in zip(model.moe_layers().items(), out.router_outputs, strict=True):
        kept = ro.kept() & valid.unsqueeze(-1) & (ro.topk_index < layer.experts.num_experts)
        ref[path] = float(kept.sum()) / float(valid.sum())
    return ref


def test_measured_params_follow_dropped_slots() -> None:
    model = _model("switch", capacity_factor=0.5)
    ids, mask = _batch()
    mon = moescope.MoEMonitor(model)
    with mon:
        ref = _kept_per_token(model, ids, mask)
    snap = mon.snapshot()
    params = moescope.count_parameters(model)
    cost = measured_cost_from_reports(snap, params)
    expected = float(params.active_params)
    for lp in params.moe_layers:
        kept = ref[lp.name]
        assert kept < 1.0  # capacity 0.5 really dropped slots
        expected += (kept - lp.top_k) * lp.params_per_expert
        layer = next(c for c in cost.layers if c.layer == lp.name)
        assert layer.assignments_per_token == pytest.approx(kept, rel=1e-12)
        assert layer.assignments_per_token + layer.dropped_per_token == pytest.approx(1.0)
    assert cost.measured_active_params == pytest.approx(expected, rel=1e-12)
    assert cost.measured_active_params < params.active_params


def test_no_drops_measured_equals_theoretical() -> None:
    model = _model()
    ids, mask = _batch()
    with moescope.MoEMonitor(model) as mon:
        model(ids, attention_mask=mask)
    cost = measured_cost(mon.snapshot(), model, seq_len=10)
    assert cost.measured_active_params == pytest.approx(cost.theoretical_active_params)
    assert cost.measured_matmul_flops == pytest.approx(cost.theoretical_matmul_flops)
    assert cost.computation_ratio == pytest.approx(1.0)  # neurons off: nothing skippable


def test_neuron_term_equals_float64_recompute() -> None:
    model = _model()
    ids, mask = _batch()
    tau = 0.05
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, a, p=path: inputs.__setitem__(p, a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for path, layer in model.moe_layers().items()
    ]
    mon = moescope.MoEMonitor(model, neurons=NeuronOptions(threshold=NeuronThreshold.absolute(tau)))
    with mon:
        out = model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    snap = mon.snapshot()
    cost = measured_cost(snap, model, seq_len=10)
    valid = mask.reshape(-1).bool()
    hidden = model.config.hidden_size
    expected_skip = 0.0
    for (path, layer), ro in zip(model.moe_layers().items(), out.router_outputs, strict=True):
        ex = layer.experts
        x = inputs[path].double()
        inactive = 0.0
        rows = 0
        for t in range(x.shape[0]):
            if not valid[t]:
                continue
            for k in range(ro.topk_index.shape[1]):
                e = int(ro.topk_index[t, k])
                gate, up = (x[t] @ ex.gate_up_proj[e].double().t()).chunk(2)
                h = torch.nn.functional.silu(gate) * up
                inactive += float((h.abs() <= tau).sum())
                rows += 1
        n_valid = int(valid.sum())
        expected_skip += 2.0 * hidden * inactive / n_valid
        layer_cost = next(c for c in cost.layers if c.layer == path)
        assert layer_cost.assignments_per_token == pytest.approx(rows / n_valid)
    assert cost.skippable_down_flops == pytest.approx(expected_skip, rel=1e-9)
    assert cost.skippable_down_flops > 0
    assert 0 < cost.computation_ratio < 1
    expected_ratio = (cost.theoretical_matmul_flops - expected_skip) / cost.theoretical_matmul_flops
    assert cost.computation_ratio == pytest.approx(expected_ratio, rel=1e-9)


def test_foreign_snapshot_is_rejected() -> None:
    model = _model()
    ids, mask = _batch()
    with moescope.MoEMonitor(model) as mon:
        model(ids, attention_mask=mask)
    snap = mon.snapshot()
    snap.layers["not.a.layer"] = next(iter(snap.layers.values()))
    with pytest.raises(ValueError, match="pass the model the monitor watched"):
        measured_cost_from_reports(snap, moescope.count_parameters(model))
