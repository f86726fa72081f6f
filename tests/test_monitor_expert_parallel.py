"""MoEMonitor on ExpertParallelMoELayer: the all-reduced snapshot of 2 and 4 gloo ranks
equals single-process monitoring of the unsharded MoELayer over every rank's tokens.

What is equal, and to what:

- Top-2 (``TopKRouter``, nothing dropped): one ``MoELayer`` called ONCE on the
  concatenation of all shards gives the same usage / dropped / co-activation counts and
  token count (exactly) and the same aux loss, entropies, z-loss, top-1 probability and
  combine-weight sums (float32 per-call sums in another order: 1e-6 relative).
  Per-update quantities differ by design: every rank contributes one update per call.
- Switch with a capacity: the EP layer applies the capacity to each rank's own tokens, so
  the reference is the unsharded layer called once PER SHARD into one monitor; then every
  statistic matches, per-update ones included. Against one call on the concatenation only
  what precedes the capacity matches: kept + dropped per expert (= first choices), aux
  loss, entropy, z-loss, top-1 probability.
- Every rank holds the identical snapshot; monitoring changes no output or gradient bit.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ranks import free_port, run_ranks
from moescope import MoEMonitor
from moescope.nn.expert_parallel import ExpertParallelMoELayer
from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.routers import SwitchRouter, TopKRouter
from moescope.stats.snapshot import LayerStats, Snapshot

H, INTER, K = 16, 24, 2
SWITCH_CAPACITY_FACTOR = 1.0  # small enough that every world size drops some tokens

INT_FIELDS = ("num_tokens", "num_slots", "extra_slots", "nonfinite_tokens")
INT_ARRAYS = ("usage_counts", "dropped_counts", "coactivation")
FLOAT_FIELDS = (
    "aux_loss",
    "routing_entropy",
    "routing_entropy_norm",
    "z_loss",
    "top1_prob",
    "cv",
    "max_over_mean",
    "load_entropy_norm",
    "dropped_fraction",
)
PER_UPDATE_FIELDS = ("num_updates", "unique_experts_per_batch", "unique_experts_max")


class TwoBlocks(nn.Module):
    """A Switch block and a top-2 block reading the same input (so the EP layers' rounding
    in one block cannot move the other's routing), masked by ``attention_mask``."""

    def __init__(self, switch: nn.Module, topk: nn.Module):
        super().__init__()
        self.switch = switch
        self.topk = topk

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.bool()
        return x + self.switch(x, mask) + self.topk(x, mask)


def build_full(num_experts: int) -> TwoBlocks:
    torch.manual_seed(0)  # identical weights on every rank and in the parent
    switch = MoELayer(
        SwitchRouter(H, num_experts, capacity_factor=SWITCH_CAPACITY_FACTOR),
        GroupedExperts(num_experts, H, INTER),
    )
    topk = MoELayer(TopKRouter(H, num_experts, K), GroupedExperts(num_experts, H, INTER))
    return TwoBlocks(switch, topk).eval()


def to_expert_parallel(full: TwoBlocks) -> TwoBlocks:
    return TwoBlocks(
        ExpertParallelMoELayer.from_moe_layer(full.switch),
        ExpertParallelMoELayer.from_moe_layer(full.topk),
    ).eval()


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens: x [2, S_r, H] and attention_mask [2, S_r] (long, 0 = pad),
    of a different length and padding on every rank."""
    s = 5 + rank
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, s, H, generator=g)
    mask = torch.ones(2, s, dtype=torch.long)
    mask[1, s - 1 - rank % 3 :] = 0
    mask[0, 0] = rank % 2  # a masked token at the start of some shards too
    return x, mask


def all_tokens(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenation of every shard: x [1, T, H], attention_mask [1, T]."""
    xs, ms = zip(*(shard(r) for r in range(world)), strict=True)
    x = torch.cat([v.reshape(-1, H) for v in xs])
    mask = torch.cat([m.reshape(-1) for m in ms])
    return x.unsqueeze(0), mask.unsqueeze(0)


def kept_per_expert(layer: MoELayer, num_experts: int) -> torch.Tensor:
    """Kept slots per expert of the layer's last call, padding tokens included: the rows
    the experts computed."""
    ro = layer.router_output
    assert ro is not None
    return torch.bincount(ro.topk_index[ro.kept()], minlength=num_experts)


def run_and_grads(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor):
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    y = model(xr, attention_mask=mask)
    (y * grad).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), xr.grad.clone(), grads


def worker(rank: int, world: int, port: int, out_dir: str, failures: Any) -> None:
    torch.set_num_threads(1)  # as the parent's reference, so float32 matmuls round alike
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        e = 2 * world
        full = build_full(e)
        ep = to_expert_parallel(full)
        x, mask = shard(rank)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + rank))

        # Unmonitored, then monitored: outputs and every gradient bit-identical.
        y0, gx0, grads0 = run_and_grads(ep, x, mask, grad)
        mon = MoEMonitor(ep)
        assert [(i.path, i.adapter, i.num_experts, i.top_k) for i in mon.layers] == [
            ("switch", "moescope.nn", e, 1),
            ("topk", "moescope.nn", e, K),
        ]
        y1, gx1, grads1 = run_and_grads(ep, x, mask, grad)  # counted once (not in backward)
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
        assert grads0.keys() == grads1.keys() and len(grads0) > 0
        for name, g0 in grads0.items():
            assert torch.equal(g0, grads1[name]), name
        load = {n: getattr(ep, n).local_expert_load.tolist() for n in ("switch", "topk")}
        snap = mon.snapshot(step=1)
        mon.detach()
        with torch.no_grad():
            assert torch.equal(ep(x, attention_mask=mask), y0)

        # A bare EP layer as the monitored root, masked through its own token_mask.
        bare = ExpertParallelMoELayer.from_moe_layer(full.topk)
        mon_bare = MoEMonitor(bare)
        assert [(i.num_experts, i.top_k) for i in mon_bare.layers] == [(e, K)]
        with torch.no_grad():
            y_bare = bare(x, token_mask=mask.bool())
            y_plain = ep.topk(x, mask.bool())
        assert torch.equal(y_bare, y_plain)
        bare_snap = mon_bare.snapshot(step=1)

        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"snap": snap.to_json(), "bare": bare_snap.to_json(), "load": load}, f)
        dist.barrier()
    except BaseException as err:  # report to the parent instead of hanging the others
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def assert_stats_equal(
    got: LayerStats,
    want: LayerStats,
    fields_int=INT_FIELDS,
    fields_float=FLOAT_FIELDS,
    arrays_int=INT_ARRAYS,
    weights: bool = True,
    per_update: bool = False,
    what: str = "",
) -> None:
    assert (got.num_experts, got.top_k) == (want.num_experts, want.top_k), what
    for name in arrays_int:
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), f"{what}: {name}"
        if g is not None:
            assert np.array_equal(g, w), f"{what}: {name}: {g} != {w}"
    for name in fields_int:
        assert getattr(got, name) == getattr(want, name), f"{what}: {name}"
    for name in fields_float:
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-6), f"{what}: {name}"
    if weights:  # combine weights of kept slots
        assert got.weight_sums == pytest.approx(want.weight_sums, rel=1e-6), f"{what}: weights"
    if per_update:
        for name in PER_UPDATE_FIELDS:
            assert getattr(got, name) == getattr(want, name), f"{what}: {name}"


@pytest.mark.distributed
@pytest.mark.xdist_group("monitor_expert_parallel")
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_snapshot_equals_single_process(world: int) -> None:
    e = 2 * world
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(worker, world, tmp)
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))

    # Every rank holds the same global snapshot, bit for bit.
    layers0 = json.loads(ranks[0]["snap"])["layers"]
    bare0 = json.loads(ranks[0]["bare"])["layers"]
    for r in range(1, world):
        assert json.loads(ranks[r]["snap"])["layers"] == layers0, f"rank {r}"
        assert json.loads(ranks[r]["bare"])["layers"] == bare0, f"rank {r}"
    dist_snap = Snapshot.from_json(ranks[0]["snap"])
    (bare_stats,) = Snapshot.from_json(ranks[0]["bare"]).layers.values()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        full = build_full(e)
        # Reference 1: the unsharded model called once per shard into one monitor.
        mon = MoEMonitor(full)
        rows = {
            "switch": torch.zeros(e, dtype=torch.long),
            "topk": torch.zeros(e, dtype=torch.long),
        }
        with torch.no_grad():
            for r in range(world):
                full(*shard(r))
                for name in rows:
                    rows[name] += kept_per_expert(getattr(full, name), e)
        per_shard = mon.snapshot(step=1)
        mon.detach()
        # Reference 2: the unsharded model called once on the concatenation of all shards.
        mon = MoEMonitor(full)
        with torch.no_grad():
            full(*all_tokens(world))
        global_ = mon.snapshot(step=1)
        mon.detach()
    finally:
        torch.set_num_threads(threads)

    assert dist_snap.layers.keys() == per_shard.layers.keys() == {"switch", "topk"}
    n_valid = int(all_tokens(world)[1].sum())
    for path in ("switch", "topk"):
        got = dist_snap.layers[path]
        assert got.num_experts == e and got.num_tokens == n_valid
        assert got.num_updates == world  # one update per rank
        assert_stats_equal(got, per_shard.layers[path], per_update=True, what=f"{path} per shard")

    # Switch: the per-rank capacity did drop tokens; before the capacity, all is global.
    sw, sw_ref = dist_snap.layers["switch"], global_.layers["switch"]
    assert sw.dropped_counts is not None and sw.dropped_counts.sum() > 0
    assert np.array_equal(
        sw.usage_counts + sw.dropped_counts, sw_ref.usage_counts + sw_ref.dropped_counts
    )
    assert_stats_equal(
        sw,
        sw_ref,
        fields_int=("num_tokens", "num_slots"),
        fields_float=("aux_loss", "routing_entropy", "z_loss", "top1_prob"),
        arrays_int=(),
        weights=False,
        what="switch vs one call",
    )
    # Top-2 (nothing dropped): equal to one call on all tokens.
    assert_stats_equal(dist_snap.layers["topk"], global_.layers["topk"], what="topk vs one call")
    assert_stats_equal(bare_stats, global_.layers["topk"], what="bare layer vs one call")
    assert bare_stats.num_updates == world

    # local_expert_load: rank r's experts processed exactly the kept rows routed to them
    # from every shard, padding included (top-2 dispatches padding; Switch does not).
    el = e // world
    for name, want in rows.items():
        got_rows = [x for r in range(world) for x in ranks[r]["load"][name]]
        assert got_rows == want.tolist(), name
        assert len(ranks[0]["load"][name]) == el
    assert sum(sum(ranks[r]["load"]["topk"]) for r in range(world)) > int(
        dist_snap.layers["topk"].usage_counts.sum()
    ), "the shards should hold padding tokens"


@pytest.mark.distributed
@pytest.mark.xdist_group("monitor_expert_parallel")
def test_single_rank_group_reports_global_experts() -> None:
    """World size 1 (no spawn): matched with E and K, and the snapshot (nothing to
    reduce) is the unsharded layer's, counts exactly."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        full = build_full(4)
        ep = to_expert_parallel(full)
        x, mask = all_tokens(2)
        mon_ep, mon_full = MoEMonitor(ep), MoEMonitor(full)
        assert (
            [(i.path, i.num_experts, i.top_k) for i in mon_ep.layers]
            == [(i.path, i.num_experts, i.top_k) for i in mon_full.layers]
            == [("switch", 4, 1), ("topk", 4, K)]
        )
        with torch.no_grad():
            ep(x, attention_mask=mask)
            full(x, attention_mask=mask)
        got, want = mon_ep.snapshot(), mon_full.snapshot()
        for path in ("switch", "topk"):
            assert_stats_equal(got.layers[path], want.layers[path], per_update=True, what=path)
            assert (
                ep.get_submodule(path).local_expert_load.tolist()
                == kept_per_expert(full.get_submodule(path), 4).tolist()
            )
        mon_ep.detach()
        mon_full.detach()
    finally:
        dist.destroy_process_group()
