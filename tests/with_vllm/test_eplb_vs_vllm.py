"""moescope's expert placement against vLLM's own EPLB (``DefaultEplbPolicy.rebalance_experts``).

Run with the vLLM environment:
``.venv-vllm/bin/python -m pytest -q -p no:xdist tests/with_vllm/test_eplb_vs_vllm.py``
(skipped where vLLM is not installed).

vLLM returns only the physical-to-logical map [L, P]. On loads without ties the two
plans must be the same map, slot for slot. Where loads tie (integer counts, zeros), the
two implementations may order equal items differently (moescope: stable, lowest id first;
vLLM: ``np.argsort``), so there the test asks for what ties cannot change: the same
replica counts and the same load on every GPU.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from vllm.distributed.eplb.policy.default import DefaultEplbPolicy  # noqa: E402

from moescope.placement import plan_expert_placement  # noqa: E402

# (E, R, groups, nodes, G): DeepSeek-V3-like (256 experts, 8 groups), Qwen3-like (128
# experts, one group), the global fallback (groups not a multiple of nodes), no
# redundancy, one slot per GPU, one GPU per node.
CONFIGS = [
    (256, 32, 8, 4, 32),
    (256, 64, 8, 8, 64),
    (128, 16, 1, 1, 16),
    (128, 0, 1, 1, 8),
    (64, 16, 4, 4, 16),
    (64, 16, 1, 2, 8),
    (60, 4, 4, 2, 8),
    (16, 0, 1, 1, 16),
    (32, 8, 4, 2, 2),
]


def _vllm_phy2log(loads: np.ndarray, p: int, groups: int, nodes: int, g: int) -> np.ndarray:
    out = DefaultEplbPolicy.rebalance_experts(torch.from_numpy(loads), p, groups, nodes, g)
    return np.asarray(out.numpy(), dtype=np.int64)


def _gpu_loads(loads: np.ndarray, phys: np.ndarray, g: int) -> np.ndarray:
    """Per-GPU load of a phy2log map, recomputed here (replicas split the load evenly)."""
    n_layers, p = phys.shape
    out = np.zeros((n_layers, g))
    for li in range(n_layers):
        cnt = np.bincount(phys[li], minlength=loads.shape[1])
        assert (cnt >= 1).all()
        for s in range(p):
            out[li, s // (p // g)] += loads[li, phys[li, s]] / cnt[phys[li, s]]
    return out


def _tie_free(rng: np.random.Generator, n_layers: int, e: int) -> np.ndarray:
    """Distinct integer loads, exact in float32 (vLLM casts to float32), whose group sums
    and per-replica shares practically never tie: large odd-spread values."""
    return np.stack(
        [
            rng.choice(np.arange(10_000, 4_000_000, 3), size=e, replace=False)
            for _ in range(n_layers)
        ]
    ).astype(np.float64)


@pytest.mark.parametrize(("e", "r", "groups", "nodes", "g"), CONFIGS)
def test_identical_placement_on_tie_free_loads(
    e: int, r: int, groups: int, nodes: int, g: int
) -> None:
    rng = np.random.default_rng(e + 7 * r + 11 * groups + 13 * nodes + g)
    loads = _tie_free(rng, 6, e)
    # Skew half of the layers hard: a few hot experts, as real routers produce.
    loads[3:] *= rng.zipf(1.4, size=(3, e)).clip(max=50)
    ours = plan_expert_placement(
        loads, num_physical=e + r, num_groups=groups, num_nodes=nodes, num_gpus=g
    )
    theirs = _vllm_phy2log(loads, e + r, groups, nodes, g)
    np.testing.assert_array_equal(ours.physical_to_logical, theirs)
    np.testing.assert_allclose(ours.gpu_load_after, _gpu_loads(loads, theirs, g), rtol=1e-12)


@pytest.mark.parametrize(("e", "r", "groups", "nodes", "g"), CONFIGS)
@pytest.mark.parametrize("kind", ["uniform_counts", "zipf_counts", "sparse_counts"])
def test_same_gpu_loads_on_counts_with_ties(
    e: int, r: int, groups: int, nodes: int, g: int, kind: str
) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((e, r, groups, nodes, g, kind)).encode()))
    n_layers = 6
    if kind == "uniform_counts":
        loads = rng.integers(0, 200, size=(n_layers, e))
    elif kind == "zipf_counts":
        loads = rng.zipf(1.3, size=(n_layers, e)).clip(max=100_000)
    else:  # many idle experts (zeros tie) and a few busy ones
        loads = rng.integers(0, 1000, size=(n_layers, e)) * (rng.random((n_layers, e)) < 0.3)
    loads = loads.astype(np.float64)
    ours = plan_expert_placement(
        loads, num_physical=e + r, num_groups=groups, num_nodes=nodes, num_gpus=g
    )
    theirs = _vllm_phy2log(loads, e + r, groups, nodes, g)
    their_counts = np.stack([np.bincount(t, minlength=e) for t in theirs])
    np.testing.assert_array_equal(ours.replica_count, their_counts)
    # Ties only swap which of two equally heavy items goes first; the greedy packing then
    # sees the same sequence of weights, so every GPU ends with the same load, GPU by GPU
    # (most of these layers do get a different slot map).
    np.testing.assert_allclose(ours.gpu_load_after, _gpu_loads(loads, theirs, g), rtol=1e-9)


def test_deepseek_v3_scale_balance(record_property: Any) -> None:
    """61 layers x 256 experts on 32 GPUs in 4 nodes with 32 redundant slots (the setting
    DeepSeek's EPLB README describes): same map and the balance vLLM reaches."""
    rng = np.random.default_rng(2026)
    loads = _tie_free(rng, 61, 256) * rng.zipf(1.6, size=(61, 256)).clip(max=30)
    ours = plan_expert_placement(loads, num_physical=288, num_groups=8, num_nodes=4, num_gpus=32)
    theirs = _vllm_phy2log(loads, 288, 8, 4, 32)
    np.testing.assert_array_equal(ours.physical_to_logical, theirs)
    before = float(np.mean(ours.balance_before))
    after = float(np.mean(ours.balance_after))
    record_property("max_over_mean_before", before)
    record_property("max_over_mean_after", after)
    assert after < before
