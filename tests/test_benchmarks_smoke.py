"""Smoke tests of benchmarks/monitor_overhead.py and benchmarks/naive_monitor.py.

They run the benchmark's own functions on a tiny Mixtral for a couple of steps so that the
script does not rot, and check what its numbers rest on: the naive baseline counts what
the router chose (against an independent float64 recomputation), the memory accounting
adds exactly one history row per snapshot to moescope's constant accumulator state, and
the monitors leave the training losses unchanged.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

import monitor_overhead as mo
from naive_monitor import NaiveMonitor, find_routers

TINY = mo.ModelSpec(
    "mixtral",
    hidden=32,
    intermediate=64,
    num_experts=8,
    top_k=2,
    layers=2,
    heads=4,
    vocab=128,
    batch=2,
    seq=16,
)
TINY_OLMOE = mo.ModelSpec(
    "olmoe",
    hidden=32,
    intermediate=16,
    num_experts=16,
    top_k=4,
    layers=2,
    heads=4,
    vocab=128,
    batch=2,
    seq=16,
)


def _bytes_per_layer(e: int) -> int:
    # RoutingSums row with co-activation: 3 int64 [E] + float64 [E] + float64 [E + 2]
    # (weight bins) + int64 [E + 2, E + 2] (pair bins) + 9 int64 + 4 float64 scalars
    # + int64 unique_max.
    return 8 * (4 * e + (e + 2) + (e + 2) ** 2 + 14)


def _history_row_bytes(e: int) -> int:
    # UsageHistory row: int64 step + int64 [E] counts + 3 float64 scalar metrics.
    return 8 * (1 + e + 3)


@pytest.mark.parametrize("spec", [TINY, TINY_OLMOE], ids=["mixtral", "olmoe"])
def test_time_model_runs_every_variant_and_keeps_losses(spec: mo.ModelSpec) -> None:
    variants = mo.available_variants(mo.VARIANTS)
    mt = mo.time_model(spec, variants, steps=2, warmup=1, log_every=1)
    assert set(mt.variants) == set(variants)
    for name, vt in mt.variants.items():
        assert len(vt.train) == 2 and all(t > 0 for t in vt.train), name
        assert len(vt.post) == 2
        # log_every=1: every measured step is a log step.
        assert len(vt.log) == 2, name
        # A monitor only reads the routing: training is unchanged (float32 noise at most).
        assert vt.losses == pytest.approx(mt.variants["none"].losses, rel=1e-5, abs=1e-6), name
        assert all(math.isfinite(x) and x > 0 for x in vt.losses)
    rows = mo.summarize(mt, boot=50)
    by = {r["variant"]: r for r in rows}
    assert by["none"]["ratio"] == pytest.approx(1.0)
    assert by["none"]["cpu_ratio"] == pytest.approx(1.0)
    for r in rows:
        assert math.isfinite(r["ratio"]) and r["ci_lo"] <= r["ci_hi"]
        assert math.isfinite(r["cpu_ratio"]) and r["cpu_lo"] <= r["cpu_hi"]
        assert r["amortised_ms"] >= r["median_ms"]
    table = mo.timing_table(mt, rows)
    assert table.count("\n| ") == len(variants) + 1  # header + one row per variant
    # moescope's state after the last snapshot: constant accumulators + 3 history rows
    # (warm-up step + 2 measured steps, log_every=1).
    e = spec.num_experts
    assert mt.state_nbytes["moescope"] == spec.layers * (
        _bytes_per_layer(e) + 3 * _history_row_bytes(e)
    )


def test_naive_monitor_counts_match_router_output() -> None:
    model = mo.build_model(TINY, seed=1).eval()
    ids, mask = mo.make_batches(TINY, 1, seed=1)[0]
    routers = find_routers(model)
    assert len(routers) == TINY.layers and all(e == TINY.num_experts for _, e in routers.values())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    handles = [
        r.register_forward_hook(lambda m, a, out, p=p: seen.__setitem__(p, out))
        for p, (r, _) in routers.items()
    ]
    naive = NaiveMonitor(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    naive.detach()
    for path, (logits, weights, index) in seen.items():
        (row,) = naive.history[path]
        ref_counts = torch.bincount(index.reshape(-1), minlength=TINY.num_experts)
        assert row["counts"] == ref_counts.tolist()
        ref_w = torch.zeros(TINY.num_experts, dtype=torch.float64).index_add_(
            0, index.reshape(-1), weights.reshape(-1).double()
        )
        assert row["weights"] == pytest.approx(ref_w.tolist(), rel=1e-5, abs=1e-6)
        p = torch.softmax(logits.double(), dim=-1)
        ref_h = float((-(p * p.log()).sum(-1)).mean())
        assert row["entropy"] == pytest.approx(ref_h, rel=1e-4)
    snap = naive.snapshot(step=1)
    total_unused = sum(
        int((torch.bincount(idx.reshape(-1), minlength=TINY.num_experts) == 0).sum())
        for _, _, idx in seen.values()
    )
    assert snap["moe/total_unused_experts"] == total_unused
    # The window moved: a second snapshot without new calls has no layer metrics.
    assert "moe/avg_expert_cv" not in naive.snapshot()


def test_memory_accounting_over_steps() -> None:
    steps, every = 40, 10
    mem = {
        v: mo.run_memory(v, steps, every, checkpoints=(10, 20), spec=TINY)
        for v in mo.available_variants(mo.VARIANTS)
    }
    for rows in mem.values():
        assert [r["step"] for r in rows] == [10, 20, 40]
        assert all(r["rss_bytes"] > 0 for r in rows)
    e, layers = TINY.num_experts, TINY.layers
    sc = [r["state_bytes"] for r in mem["moescope"]]
    # 1, 2 and 4 snapshots: accumulators constant, one history row per layer per snapshot.
    assert sc == [layers * (_bytes_per_layer(e) + n * _history_row_bytes(e)) for n in (1, 2, 4)]
    assert [r["accumulator_bytes"] for r in mem["moescope"]] == [layers * _bytes_per_layer(e)] * 3
    assert [r["accumulator_bytes"] for r in mem["naive"]] == [-1] * 3
    assert [r["state_bytes"] for r in mem["none"]] == [0, 0, 0]
    naive = [r["state_bytes"] for r in mem["naive"]]
    # The seeds' lists grow linearly: every call adds the same row size.
    assert naive[1] - naive[0] == pytest.approx((naive[2] - naive[1]) / 2, rel=0.05)
    assert naive[2] > naive[0] > 0
    if "moewatch" in mem:
        mw = [r["state_bytes"] for r in mem["moewatch"]]
        # moewatch keeps every event's [T, E] float32 logits + [E] int64 counts.
        t = TINY.batch * TINY.seq
        per_event = 4 * t * e + 8 * e
        assert mw[2] - mw[1] == 20 * layers * per_event


@pytest.mark.slow  # builds the full-size Mixtral of the benchmark (~15 s on a busy machine)
def test_memory_table_and_main_quick(tmp_path: object) -> None:
    table = mo.memory_table(
        {"moescope": [{"step": 100, "state_bytes": 10, "rss_bytes": 2**20}]}, 100
    )
    assert "| moescope | 10 | 1.0 |" in table
    table = mo.memory_table(
        {
            "moescope": [
                {"step": 100, "state_bytes": 10, "rss_bytes": 2**20, "accumulator_bytes": 7}
            ]
        },
        100,
    )
    assert "| moescope: accumulators only | 7 | |" in table
    out = os.path.join(str(tmp_path), "out.md")
    text = mo.main(
        [
            "--quick",
            "--models",
            "mixtral",
            "--variants",
            "none,moescope",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--log-every",
            "1",
            "--memory-steps",
            "0",
            "--markdown-out",
            out,
        ],
        emit=lambda s: None,
    )
    assert "| moescope |" in text and "| none |" in text
    with open(out) as f:
        assert f.read() == text


def test_profile_report_runs() -> None:
    report = mo.profile_moescope(TINY, steps=1, top=5)
    assert "LayerAccumulator.update alone" in report
    assert "aten::" in report  # the torch.profiler table of the accumulator's ops


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        mo.available_variants(["none", "fancy"])
    with pytest.raises(ValueError, match="steps >= 1"):
        mo.time_model(TINY, ["none"], steps=0)
    with pytest.raises(ValueError, match="no MoE router"):
        NaiveMonitor(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_gpu_check_dry_run_counts_like_eager() -> None:
    """benchmarks/gpu_check.py on CPU (no CUDA graphs): the same code path a GPU runs,
    graph-safe monitor in a compiled static-cache generate, counts equal to eager."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    args = ["--device", "cpu", "--steps", "3", "--reps", "1", "--layers", "2", "--experts", "8"]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    row = [ln for ln in proc.stdout.splitlines() if "| graph_safe |" in ln]
    assert row and row[0].rstrip().endswith("| equal |"), proc.stdout
