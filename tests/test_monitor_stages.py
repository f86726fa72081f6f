"""Pipeline stages (``MoEMonitor(stage_group=...)``) and the router's expert bias.

A pipeline-parallel run holds DIFFERENT layers on different ranks. With ``stage_group``
each rank's snapshot gathers the other stages' layers, so it equals the snapshot of one
process holding the whole model and seeing the same tokens; ``process_group`` still sums
ranks that hold the SAME layers (data parallel). The reference is a single-process monitor
on the unsplit model. ``LayerStats.expert_bias`` is the router's live bias at read time.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ranks import run_ranks
from moescope import MoEMonitor, UnsupportedModelError
from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.routers import GroupLimitedRouter
from moescope.stats.snapshot import Snapshot

H, INTER, E, K, LAYERS = 16, 24, 8, 2, 4


class Stack(nn.Module):
    """Residual MoE layers ``layers.<i>`` (i = the GLOBAL layer number, kept by a stage)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            h = h + layer(h)
        return h


def _model() -> Stack:
    torch.manual_seed(0)
    layers = {}
    for i in range(LAYERS):
        router = GroupLimitedRouter(H, E, K, n_group=2, topk_group=1)
        # A distinct bias per layer, as aux-loss-free training would leave it.
        router.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, E) * (i + 1))
        layers[str(i)] = MoELayer(router, GroupedExperts(E, H, INTER))
    return Stack(layers).eval()


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 12, H, generator=g) for _ in range(n)]


def _stage(model: Stack, lo: int, hi: int) -> Stack:
    return Stack({str(i): model.layers[str(i)] for i in range(lo, hi)})


def test_expert_bias_is_read_live() -> None:
    m = _model()
    mon = MoEMonitor(m)
    with torch.no_grad():
        m(_batches(1)[0])
    snap = mon.snapshot()
    for i, s in enumerate(snap.layers.values()):
        assert s.expert_bias is not None
        np.testing.assert_allclose(s.expert_bias, np.linspace(-0.1, 0.1, E) * (i + 1), rtol=1e-6)
    m.layers["0"].router.update_bias(torch.arange(float(E)))  # the trainer's in-place update
    after = mon.snapshot().layers[next(iter(snap.layers))].expert_bias
    assert not np.allclose(after, snap.layers[next(iter(snap.layers))].expert_bias)
    # Survives the JSON round trip (JSONL logs, analyze).
    back = Snapshot.from_json(mon.snapshot().to_json())
    np.testing.assert_allclose(next(iter(back.layers.values())).expert_bias, after)


def _reference(replicas: int) -> Snapshot:
    """One process, the whole model, every replica's tokens."""
    model = _model()
    mon = MoEMonitor(model, process_group=False)
    with torch.no_grad():
        for x in _batches(replicas):
            model(x)
    return mon.snapshot()


def _stage_worker(rank: int, world: int, port: int, failures: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)  # fmt: skip
        # world 4 = 2 data-parallel replicas x 2 pipeline stages; world 2 = 2 stages.
        stages = 2
        dp = world // stages
        stage, replica = rank % stages, rank // stages
        dp_groups = [dist.new_group([r for r in range(world) if r % stages == s])
                     for s in range(stages)]  # fmt: skip
        pp_groups = [dist.new_group([r for r in range(world) if r // stages == d])
                     for d in range(dp)]  # fmt: skip
        model = _model()
        lo, hi = (0, 2) if stage == 0 else (2, 4)
        part = _stage(model, lo, hi)
        mon = MoEMonitor(part, process_group=dp_groups[stage], stage_group=pp_groups[replica])
        x = _batches(dp)[replica]
        with torch.no_grad():
            h = _stage(model, 0, lo)(x)  # what stage 0 would send to stage 1
            part(h)
        snap = mon.snapshot()
        ref = _reference(dp)  # computed in the rank: a forked child must not inherit
        # the parent's busy intra-op thread pool
        got = [k.split(".")[-1] for k in snap.layers]
        assert got == ["0", "1", "2", "3"], got
        for (_, a), (_, b) in zip(snap.layers.items(), ref.layers.items(), strict=True):
            np.testing.assert_array_equal(a.usage_counts, b.usage_counts)
            np.testing.assert_array_equal(a.coactivation, b.coactivation)
            assert a.num_tokens == b.num_tokens
            np.testing.assert_allclose(a.routing_entropy, b.routing_entropy, rtol=1e-5)
            np.testing.assert_allclose(a.expert_bias, b.expert_bias)
        dist.destroy_process_group()
    except BaseException as e:
        failures.put(f"rank {rank}: {e!r}")
        raise


@pytest.mark.distributed
@pytest.mark.xdist_group("monitor_stages")
@pytest.mark.parametrize("world", [2, 4])
def test_stage_group_gathers_every_stage_and_process_group_sums_replicas(world: int) -> None:
    run_ranks(_stage_worker, world)


def test_duplicate_layer_across_stages_is_a_clear_error() -> None:
    from moescope.core import merge_stages

    stats = next(iter(_snapshot_of_one().layers.values()))
    parts = [{"layers.0": stats}, {"layers.0": copy.deepcopy(stats)}]
    with pytest.raises(ValueError, match="reported by two pipeline stages"):
        merge_stages(parts)
    assert list(merge_stages([{"layers.0": stats}, {"layers.1": stats}])) == [
        "layers.0",
        "layers.1",
    ]


def _snapshot_of_one() -> Snapshot:
    m = _model()
    mon = MoEMonitor(m)
    m(_batches(1)[0])
    return mon.snapshot()


class _Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h)


def _dense_stage_worker(rank: int, world: int, port: int, failures: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)  # fmt: skip
        solo = [dist.new_group([r]) for r in range(world)]
        model = _model()
        # Stage 0: the 4 MoE layers; stage 1: dense layers only (no MoE layer at all).
        part: nn.Module = _stage(model, 0, LAYERS) if rank == 0 else _Dense()
        mon = MoEMonitor(part, process_group=solo[rank], stage_group=dist.group.WORLD)
        x = _batches(1)[0]
        with torch.no_grad():
            part(x if rank == 0 else _stage(model, 0, LAYERS)(x))
        snap = mon.snapshot()
        ref = _reference(1)
        assert list(snap.layers) == list(ref.layers)
        for a, b in zip(snap.layers.values(), ref.layers.values(), strict=True):
            np.testing.assert_array_equal(a.usage_counts, b.usage_counts)
        dist.destroy_process_group()
    except BaseException as e:
        failures.put(f"rank {rank}: {e!r}")
        raise


@pytest.mark.distributed
@pytest.mark.xdist_group("monitor_stages")
def test_a_dense_only_stage_joins_the_gather() -> None:
    run_ranks(_dense_stage_worker, 2)
    with pytest.raises(UnsupportedModelError):
        MoEMonitor(_Dense())  # without stage_group it is still an error
