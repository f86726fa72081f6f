"""GroupedExperts against a per-(token, slot) float64 loop written here."""

from __future__ import annotations

import pytest
import torch

from moescope.nn.experts import GroupedExperts, grouped_mm_supported

ACTS = {
    "silu": lambda v: v * torch.sigmoid(v),
    "gelu": lambda v: 0.5 * v * (1.0 + torch.erf(v / 2.0**0.5)),
    "relu": lambda v: torch.clamp(v, min=0.0),
}
BACKENDS = ["grouped_mm", "loop"]


def dense_reference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    dropped: torch.Tensor | None,
    act: str,
    gated: bool,
) -> torch.Tensor:
    """y[t] = sum over kept slots of w[t,k] * W_down[e] h, h from explicit per-slot math."""
    i_size = down.shape[-1]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(idx.shape[1]):
            if dropped is not None and bool(dropped[t, k]):
                continue
            e = int(idx[t, k])
            first = gate_up[e] @ x[t]
            if gated:
                h = ACTS[act](first[:i_size]) * first[i_size:]
            else:
                h = ACTS[act](first)
            acc = acc + w[t, k] * (down[e] @ h)
        rows.append(acc)
    return torch.stack(rows)


def make_inputs(t: int, e: int, k: int, h: int, seed: int, drop_frac: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    idx = torch.rand(t, e, generator=g).topk(k, dim=-1).indices
    w = torch.rand(t, k, generator=g)
    dropped = (torch.rand(t, k, generator=g) < drop_frac) if drop_frac > 0 else None
    return x, idx, w, dropped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("act", "gated", "drop_frac"),
    [
        ("silu", True, 0.0),
        ("silu", True, 0.4),
        ("gelu", False, 0.3),
        ("relu", False, 0.0),
        ("gelu", True, 0.0),
    ],
)
def test_forward_backward_match_float64_loop(backend: str, act: str, gated: bool, drop_frac: float):
    torch.manual_seed(0)
    t, e, k, hs, i = 24, 6, 3, 16, 24
    experts = GroupedExperts(e, hs, i, activation=act, gated=gated, backend=backend)
    x, idx, w, dropped = make_inputs(t, e, k, hs, seed=1, drop_frac=drop_frac)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = experts(x, idx, w, dropped)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    gu64 = experts.gate_up_proj.detach().double().requires_grad_(True)
    dn64 = experts.down_proj.detach().double().requires_grad_(True)
    y64 = dense_reference(x64, gu64, dn64, idx, w64, dropped, act, gated)
    (y64 * grad_out.double()).sum().backward()

    tol = {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(y.double(), y64.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(experts.gate_up_proj.grad.double(), gu64.grad, **tol)
    torch.testing.assert_close(experts.down_proj.grad.double(), dn64.grad, **tol)
    if dropped is not None:
        # A dropped slot's weight receives exactly zero gradient.
        assert bool((w.grad[dropped] == 0).all())


def test_grouped_mm_is_used_for_float32_when_available():
    experts = GroupedExperts(4, 16, 32)
    x = torch.randn(8, 16)
    if not grouped_mm_supported(x, experts.gate_up_proj, experts.down_proj):
        pytest.skip("this torch build has no CPU grouped_mm")
    assert experts._use_grouped_mm(x)
    # Float64 has no grouped_mm kernel: auto falls back, an explicit request errors clearly.
    assert not experts.double()._use_grouped_mm(x.double())
    experts.backend = "grouped_mm"
    with pytest.raises(ValueError, match="backend='auto' or 'loop'"):
        experts(x.double(), torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1))


def test_float64_auto_falls_back_to_loop_and_is_exact():
    torch.manual_seed(0)
    experts = GroupedExperts(5, 12, 10).double()  # 10 * 8 bytes: unaligned for grouped_mm
    x, idx, w, dropped = make_inputs(15, 5, 2, 12, seed=3, drop_frac=0.3)
    y = experts(x.double(), idx, w.double(), dropped)
    ref = dense_reference(
        x.double(),
        experts.gate_up_proj.detach(),
        experts.down_proj.detach(),
        idx,
        w.double(),
        dropped,
        "silu",
        True,
    )
    torch.testing.assert_close(y.detach(), ref, atol=1e-12, rtol=1e-12)


def test_all_slots_dropped_gives_zero_output_and_zero_grads():
    experts = GroupedExperts(4, 16, 32)
    x, idx, w, _ = make_inputs(10, 4, 2, 16, seed=4)
    x.requires_grad_(True)
    y = experts(x, idx, w, torch.ones(10, 2, dtype=torch.bool))
    assert bool((y == 0).all())
    y.sum().backward()
    assert bool((x.grad == 0).all())
    assert experts.gate_up_proj.grad is None or bool((experts.gate_up_proj.grad == 0).all())


def test_expert_rows_with_no_rows_gives_zero_not_none_grads():
    experts = GroupedExperts(4, 16, 32)
    out, h = experts.expert_rows(torch.zeros(0, 16), torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, 16) and h.shape == (0, 32)
    out.sum().backward()
    assert bool((experts.gate_up_proj.grad == 0).all()) and bool(
        (experts.down_proj.grad == 0).all()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_close_to_float32(backend: str):
    torch.manual_seed(0)
    experts = GroupedExperts(8, 64, 128, backend=backend)
    x, idx, w, dropped = make_inputs(64, 8, 2, 64, seed=5, drop_frac=0.2)
    y32 = experts(x, idx, w, dropped)
    experts_bf = GroupedExperts(8, 64, 128, backend=backend).to(torch.bfloat16)
    experts_bf.load_state_dict(experts.state_dict())
    xb = x.bfloat16().requires_grad_(True)
    yb = experts_bf(xb, idx, w.bfloat16(), dropped)
    assert yb.dtype == torch.bfloat16
    rel = (yb.float() - y32).norm() / y32.norm()
    assert rel < 2e-2, rel
    yb.float().sum().backward()
    assert xb.grad is not None and torch.isfinite(xb.grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("act", "gated"), [("silu", True), ("relu", False)])
def test_neuron_observer_gets_intermediate_of_every_kept_slot(backend: str, act: str, gated: bool):
    torch.manual_seed(0)
    t, e, k, hs, i = 20, 5, 2, 16, 8
    experts = GroupedExperts(e, hs, i, activation=act, gated=gated, backend=backend)
    x, idx, w, dropped = make_inputs(t, e, k, hs, seed=6, drop_frac=0.3)
    assert dropped is not None
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    experts.neuron_observer = lambda h, eid, sid: calls.append(
        (h.clone(), eid.clone(), sid.clone())
    )
    x.requires_grad_(True)
    y = experts(x, idx, w, dropped)
    assert len(calls) == 1
    h, eid, sid = calls[0]
    assert not h.requires_grad
    # Rows of dropped slots come last, marked with expert id E (consumers ignore them).
    n_kept = int((~dropped).sum())
    assert bool((eid[n_kept:] == e).all()) and bool((eid[:n_kept] < e).all())
    assert sorted(sid[n_kept:].tolist()) == dropped.reshape(-1).nonzero().squeeze(-1).tolist()
    h, eid, sid = h[:n_kept], eid[:n_kept], sid[:n_kept]
    kept = (~dropped).reshape(-1).nonzero().squeeze(-1)
    # Exactly the kept slots, each once, rows sorted by expert id.
    assert sorted(sid.tolist()) == kept.tolist()
    assert bool((eid[1:] >= eid[:-1]).all())
    assert torch.equal(eid, idx.reshape(-1)[sid])
    gu = experts.gate_up_proj.detach().double()
    for row in range(sid.shape[0]):
        slot = int(sid[row])
        first = gu[int(eid[row])] @ x.detach().double()[slot // k]
        ref = ACTS[act](first[:i]) * first[i:] if gated else ACTS[act](first)
        torch.testing.assert_close(h[row].double(), ref, atol=1e-5, rtol=1e-4)
    # Observing does not change the result.
    experts.neuron_observer = None
    torch.testing.assert_close(experts(x, idx, w, dropped), y, atol=0, rtol=0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(4, 8, 8, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        GroupedExperts(4, 8, 8, backend="fast")  # type: ignore[arg-type]
    experts = GroupedExperts(4, 8, 8)
    with pytest.raises(ValueError, match=r"x must be \[T, H=8\]"):
        experts(torch.randn(3, 7), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match="topk_weight"):
        experts(torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match="dropped"):
        experts(
            torch.randn(3, 8),
            torch.zeros(3, 2, dtype=torch.long),
            torch.ones(3, 2),
            torch.zeros(3, 1, dtype=torch.bool),
        )
