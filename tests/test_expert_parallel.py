"""ExpertParallelMoELayer on 2 and 4 gloo processes equals the single-process MoELayer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ranks import run_ranks
from moescope.nn.expert_parallel import ExpertParallelMoELayer, all_to_all_rows
from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.router_output import RouterOutput
from moescope.nn.routers import TopKRouter

H, INTER, K, T_PER_RANK = 16, 24, 2, 10


class DroppingRouter(nn.Module):
    """TopKRouter that drops slot 1 of every third token (a deterministic capacity stand-in;
    depends on the token's content only, so sharding tokens does not change it)."""

    def __init__(self, hidden: int, experts: int, k: int):
        super().__init__()
        self.inner = TopKRouter(hidden, experts, k)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        ro = self.inner(x, token_mask)
        dropped = torch.zeros_like(ro.topk_index, dtype=torch.bool)
        dropped[:, 1] = x[:, 0] > 0.3
        ro.dropped = dropped
        return ro


def build_full(num_experts: int, kind: str) -> MoELayer:
    torch.manual_seed(0)  # identical weights on every rank
    experts = GroupedExperts(num_experts, H, INTER)
    if kind == "dropping":
        return MoELayer(DroppingRouter(H, num_experts, K), experts)
    shared = nn.Sequential(nn.Linear(H, 20, bias=False), nn.SiLU(), nn.Linear(20, H, bias=False))
    return MoELayer(TopKRouter(H, num_experts, K), experts, shared, shared_expert_gate=True)


def e_local_of(num_experts: int, world: int) -> int:
    return num_experts // world


def check_against_single_process(rank: int, world: int, num_experts: int, kind: str) -> None:
    full = build_full(num_experts, kind)
    ep = ExpertParallelMoELayer.from_moe_layer(full)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * T_PER_RANK, H, generator=g)
    grad_all = torch.randn(world * T_PER_RANK, H, generator=g)
    if kind == "skewed":
        # Every token prefers rank 0's experts (e_local >= K), so the other ranks receive
        # no rows at all and must still return zero expert gradients.
        x_all[:, 0] = 4.0
        with torch.no_grad():
            full.router.weight[:, 0] = -3.0
            full.router.weight[: num_experts // world, 0] = 3.0
            ep.router.weight.copy_(full.router.weight)
    mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)

    x_ref = x_all.clone().requires_grad_(True)
    y_ref = full(x_ref)
    (y_ref * grad_all).sum().backward()

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    ep.local_experts.neuron_observer = lambda h, eid, rows: seen.append((h, eid))
    x = x_all[mine].clone().reshape(2, T_PER_RANK // 2, H).requires_grad_(True)
    y = ep(x)
    # The local experts saw every row routed to them from all ranks, with local ids.
    ((h_seen, eid_seen),) = seen
    kept_ref = full.router_output.kept()
    owner = full.router_output.topk_index // e_local_of(num_experts, world)
    n_mine = int((kept_ref & (owner == rank)).sum())
    assert h_seen.shape == (n_mine, INTER) and bool((eid_seen < num_experts // world).all())
    if kind == "skewed":
        n_all = torch.tensor([n_mine])
        dist.all_reduce(n_all, op=dist.ReduceOp.MIN)
        assert int(n_all) == 0, "the skewed case should leave some rank without rows"
    assert y.shape == x.shape
    (y * grad_all[mine].reshape(x.shape)).sum().backward()

    tol = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(y.reshape(-1, H), y_ref[mine].detach(), **tol)
    torch.testing.assert_close(x.grad.reshape(-1, H), x_ref.grad[mine], **tol)
    e_local = num_experts // world
    sl = slice(rank * e_local, (rank + 1) * e_local)
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(ep.local_experts, name).grad
        want = getattr(full.experts, name).grad[sl]
        torch.testing.assert_close(got, want, **tol, msg=name)
    # Replicated parameters: the sum over ranks of the local gradients is the full gradient.
    full_params = dict(full.named_parameters())
    for name, p in ep.named_parameters():
        if name.startswith("local_experts."):
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, full_params[name].grad, **tol, msg=name)


def worker(rank: int, world: int, port: int, failures: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        # The autograd all-to-all alone: rank r sends r + d + 1 rows to rank d.
        ins = [rank + d + 1 for d in range(world)]
        outs = [s + rank + 1 for s in range(world)]
        rows = torch.full((sum(ins), 3), float(rank), requires_grad=True)
        got = all_to_all_rows(rows, outs, ins)
        expect = torch.cat([torch.full((n, 3), float(s)) for s, n in enumerate(outs)])
        torch.testing.assert_close(got.detach(), expect)
        (got * (rank + 1)).sum().backward()
        # Row sent to rank d comes back with d's factor (d + 1).
        back = torch.cat([torch.full((n, 3), float(d + 1)) for d, n in enumerate(ins)])
        torch.testing.assert_close(rows.grad, back)

        for kind in ("shared_gate", "dropping", "skewed"):
            check_against_single_process(rank, world, 2 * world, kind)
        check_against_single_process(rank, world, 4 * world, "dropping")

        try:
            ExpertParallelMoELayer.from_moe_layer(build_full(world + 1, "dropping"))
        except ValueError as err:
            assert "not divisible by the world size" in str(err)
        else:
            raise AssertionError("non-divisible expert count was accepted")
        dist.barrier()
    except BaseException as err:  # report to the parent instead of hanging the others
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world: int):
    # The workers set one intra-op thread before any computation.
    run_ranks(worker, world)


def test_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoELayer(TopKRouter(H, 4, 2), GroupedExperts(2, H, INTER), 4)
