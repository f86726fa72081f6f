"""MoELayer against a per-token float64 reference loop written here (forward and backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.router_output import RouterOutput
from moescope.nn.routers import TopKRouter

H, INTER, E, K = 16, 24, 6, 2


def silu(v: torch.Tensor) -> torch.Tensor:
    return v * torch.sigmoid(v)


def expert64(gate_up: torch.Tensor, down: torch.Tensor, e: int, xt: torch.Tensor) -> torch.Tensor:
    first = gate_up[e] @ xt
    return down[e] @ (silu(first[: down.shape[-1]]) * first[down.shape[-1] :])


class DroppingRouter(nn.Module):
    """Top-k on a linear router that drops every slot whose expert id is even on odd
    tokens (a deterministic stand-in for a capacity limit) and records the mask it got."""

    def __init__(self, hidden: int, experts: int, k: int):
        super().__init__()
        self.inner = TopKRouter(hidden, experts, k)
        self.seen_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        self.seen_mask = token_mask
        ro = self.inner(x, token_mask)
        odd = (torch.arange(x.shape[0]) % 2 == 1).unsqueeze(-1)
        ro.dropped = odd & (ro.topk_index % 2 == 0)
        return ro


class ChoiceLikeRouter(nn.Module):
    """Expert-choice layout (K = E, slot e is expert e): each expert keeps the tokens whose
    softmax score for it is above 1/E; the rest are dropped."""

    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) * hidden**-0.5)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        logits = x @ self.weight.t()
        probs = logits.softmax(-1)
        idx = torch.arange(probs.shape[1]).expand_as(probs)
        return RouterOutput(logits, probs, idx, probs, dropped=probs <= 1.0 / probs.shape[1])


def reference(layer: MoELayer, x: torch.Tensor, grad_out: torch.Tensor):
    """Float64 per-token loop. Routing decisions (index, dropped) are taken from the layer's
    router output; combine weights, experts and shared part are recomputed from the weights.
    Returns (y64, grads dict keyed by parameter name, x64.grad)."""
    ro = layer.router_output
    assert ro is not None
    params = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    flat = x.detach().double().reshape(-1, H).requires_grad_(True)
    rows = []
    for t in range(flat.shape[0]):
        xt = flat[t]
        if "router.weight" in params or "router.inner.weight" in params:
            wr = params.get("router.weight", params.get("router.inner.weight"))
            probs = torch.softmax(wr @ xt, dim=-1)
        acc = torch.zeros(H, dtype=torch.float64)
        chosen = ro.topk_index[t]
        if isinstance(layer.router, ChoiceLikeRouter):
            weights = probs[chosen]
        else:
            weights = probs[chosen] / probs[chosen].sum()
        for k in range(chosen.shape[0]):
            if ro.dropped is not None and bool(ro.dropped[t, k]):
                continue
            acc = acc + weights[k] * expert64(
                params["experts.gate_up_proj"], params["experts.down_proj"], int(chosen[k]), xt
            )
        if layer.shared_experts is not None:
            hmid = silu(params["shared_experts.0.weight"] @ xt)
            shared = params["shared_experts.2.weight"] @ hmid
            if layer.shared_expert_gate is not None:
                shared = torch.sigmoid(params["shared_expert_gate.weight"] @ xt) * shared
            acc = acc + shared
        rows.append(acc)
    y64 = torch.stack(rows).reshape(x.shape)
    (y64 * grad_out.double()).sum().backward()
    return y64.detach(), {n: p.grad for n, p in params.items()}, flat.grad.reshape(x.shape)


def shared_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(H, 20, bias=False), nn.SiLU(), nn.Linear(20, H, bias=False))


def build(kind: str, backend: str = "auto") -> MoELayer:
    torch.manual_seed(0)
    experts = GroupedExperts(E, H, INTER, backend=backend)  # type: ignore[arg-type]
    if kind == "topk":
        return MoELayer(TopKRouter(H, E, K), experts)
    if kind == "dropping":
        return MoELayer(DroppingRouter(H, E, K), experts)
    if kind == "choice":
        return MoELayer(ChoiceLikeRouter(H, E), experts)
    if kind == "shared":
        return MoELayer(TopKRouter(H, E, K), experts, shared_mlp())
    if kind == "shared_gate":
        return MoELayer(TopKRouter(H, E, K), experts, shared_mlp(), shared_expert_gate=True)
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("kind", ["topk", "dropping", "choice", "shared", "shared_gate"])
def test_layer_matches_float64_reference_forward_and_backward(kind: str, backend: str):
    layer = build(kind, backend)
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * grad_out).sum().backward()
    ro = layer.router_output
    assert ro is not None
    if kind == "topk":
        # The routing the layer used is the float64 top-k of the same scores.
        wr = layer.router.weight.detach().double()
        ref_idx = (x.detach().double().reshape(-1, H) @ wr.t()).topk(K, dim=-1).indices
        assert torch.equal(ro.topk_index, ref_idx)
    if kind in ("dropping", "choice"):
        assert ro.dropped is not None and bool(ro.dropped.any()) and not bool(ro.dropped.all())
    y64, grads64, xgrad64 = reference(layer, x, grad_out)
    tol = {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(x.grad.double(), xgrad64, **tol)
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), grads64[name], **tol, msg=name)


def test_token_mask_goes_to_router_and_does_not_change_outputs():
    layer = build("dropping")
    x = torch.randn(2, 5, H)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    y_masked = layer(x, token_mask=mask)
    seen = layer.router.seen_mask
    assert seen is not None and torch.equal(seen, mask.reshape(-1))
    aux_masked = layer.router_output.losses["aux_loss"]
    y_plain = layer(x)
    assert layer.router.seen_mask is None
    torch.testing.assert_close(y_masked, y_plain, atol=0, rtol=0)
    # The mask reached the loss: padding changes the aux loss.
    assert not torch.allclose(aux_masked, layer.router_output.losses["aux_loss"])


def test_bfloat16_layer_close_to_float32():
    layer = build("shared_gate")
    x = torch.randn(4, 32, H, generator=torch.Generator().manual_seed(3))
    y32 = layer(x)
    idx32 = layer.router_output.topk_index
    layer_bf = build("shared_gate").to(torch.bfloat16)
    xb = x.bfloat16().requires_grad_(True)
    yb = layer_bf(xb)
    assert yb.dtype == torch.bfloat16
    # Compare only tokens whose routing agrees (bf16 rounding may flip near-ties).
    same = (layer_bf.router_output.topk_index.sort(-1).values == idx32.sort(-1).values).all(-1)
    assert same.float().mean() > 0.8
    a, b = yb.float().reshape(-1, H)[same], y32.reshape(-1, H)[same]
    assert (a - b).norm() / b.norm() < 3e-2
    yb.float().square().sum().backward()
    assert torch.isfinite(xb.grad.float()).all()
    assert torch.isfinite(layer_bf.experts.gate_up_proj.grad.float()).all()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="shared_expert_gate=True needs shared_experts"):
        MoELayer(TopKRouter(H, E, K), GroupedExperts(E, H, INTER), shared_expert_gate=True)
    layer = build("topk")
    with pytest.raises(ValueError, match="hidden size 16"):
        layer(torch.randn(3, H + 1))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, H), token_mask=torch.ones(6, dtype=torch.bool))


@pytest.mark.parametrize("router_name", ["SwitchRouter", "ExpertChoiceRouter"])
def test_capacity_routers_from_routers_py(router_name: str):
    """Integration with the capacity-limited routers: whatever RouterOutput they emit (top-1
    with drops; expert choice with K = E and unpicked slots dropped), the layer computes
    sum over kept slots of topk_weight * expert(x), with expert-weight gradients to match."""
    from moescope.nn import routers

    torch.manual_seed(0)
    cls = getattr(routers, router_name)
    router = cls(H, E, capacity_factor=0.5)
    nn.init.normal_(router.weight, std=H**-0.5)
    layer = MoELayer(router, GroupedExperts(E, H, INTER))
    x = torch.randn(20, H, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    ro = layer.router_output
    assert ro is not None and ro.dropped is not None and bool(ro.dropped.any())
    if router_name == "ExpertChoiceRouter":
        assert ro.topk_index.shape == (20, E)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    gu = layer.experts.gate_up_proj.detach().double().requires_grad_(True)
    dn = layer.experts.down_proj.detach().double().requires_grad_(True)
    rows = []
    for t in range(20):
        acc = torch.zeros(H, dtype=torch.float64)
        for k in range(ro.topk_index.shape[1]):
            if not bool(ro.dropped[t, k]):
                e = int(ro.topk_index[t, k])
                acc = acc + float(ro.topk_weight[t, k].detach()) * expert64(
                    gu, dn, e, x[t].double()
                )
        rows.append(acc)
    y64 = torch.stack(rows)
    (y64 * grad_out.double()).sum().backward()
    tol = {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(y.detach().double(), y64.detach(), **tol)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad.double(), gu.grad, **tol)
    torch.testing.assert_close(layer.experts.down_proj.grad.double(), dn.grad, **tol)
