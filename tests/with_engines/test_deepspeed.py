"""DeepSpeed MoE (``deepspeed.moe.layer.MoE``) monitored through real DeepSpeed training.

Every DeepSpeed run happens in forked gloo ranks (tests/dist_ranks.py), the single-process
ones too, so that this pytest process never initialises ``torch.distributed``. The
references are DeepSpeed's own: ``exp_counts`` (what the gate chose, counted by DeepSpeed
before its capacity limit) and the rows each expert module really received (the non-zero
rows of ``Experts.forward``'s input, after the all-to-all; unused capacity slots are zero
rows).

What equals what (per layer, summed over the window):

- ``usage_counts`` == rows the experts received (every rank's, summed);
- ``usage_counts + dropped_counts`` == ``exp_counts`` where the gate's choice of a dropped
  route is recoverable (no noise), and <= it elementwise otherwise;
- ``dropped_fraction * num_slots`` == ``sum(exp_counts) - rows received``;
- N ranks with ep_size=2 == one process on the same global batch (no capacity drops:
  capacities depend on each rank's token count) == DeepSpeed's counters.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dist_ranks import run_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
import deepspeed.ops
from deepspeed.moe.layer import MoE

# DeepSpeed builds its shared-memory collective op (a C++ build of about 90 s the first
# time) for every CPU process group; gloo does these collectives, so skip it.
deepspeed.ops.__compatible_ops__ = {}

H, D_IN, E = 16, 8, 4
B, S = 4, 6  # micro-batch of one rank: B sequences of S tokens

# Gate configurations, one MoE layer each; "known": every dropped route's expert is
# recoverable (no noise decided it).
SINGLE_SPECS: list[dict[str, Any]] = [
    dict(k=1, capacity_factor=0.5, min_capacity=0, used=True),  # RTS (default), used_token
    dict(k=1, capacity_factor=0.5, min_capacity=0, noisy_gate_policy="RSample", known=False),
    dict(k=1, capacity_factor=0.5, min_capacity=0, noisy_gate_policy="Jitter", known=False),
    dict(k=2, capacity_factor=0.5, min_capacity=0, top2_2nd_expert_sampling=False),
    dict(k=2, capacity_factor=0.5, min_capacity=0, known=False),  # Gumbel-sampled 2nd expert
    dict(k=3, capacity_factor=0.5, min_capacity=0),
    dict(k=1, drop_tokens=False),
]
DIST_SPECS: list[dict[str, Any]] = [
    dict(k=1, drop_tokens=False),
    dict(k=2, drop_tokens=False, top2_2nd_expert_sampling=False),
    dict(k=1, capacity_factor=0.5, min_capacity=0, use_rts=False),  # drops: per-rank capacity
]


def _moe_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("used", "known")}


class Net(nn.Module):
    """A small model with DeepSpeed MoE layers, unchanged by moescope."""

    def __init__(self, specs: list[dict[str, Any]], ep_size: int = 1) -> None:
        super().__init__()
        self.specs = specs
        self.inp = nn.Linear(D_IN, H)
        expert = nn.Sequential(nn.Linear(H, 2 * H), nn.ReLU(), nn.Linear(2 * H, H))
        self.moes = nn.ModuleList(
            MoE(H, expert, num_experts=E, ep_size=ep_size, **_moe_kwargs(s)) for s in specs
        )
        self.head = nn.Linear(H, 1)
        self.forward_counts = [torch.zeros(E, dtype=torch.long) for _ in specs]

    #: Run each MoE layer under DeepSpeed's activation checkpointing (recomputed in backward).
    checkpointed = False

    def forward(self, x: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x)
        aux = h.new_zeros(())
        for i, (spec, moe) in enumerate(zip(self.specs, self.moes, strict=True)):
            if self.checkpointed:
                out, l_aux, counts = deepspeed.checkpointing.checkpoint(moe, h)
                # Net.forward runs once per step (the recomputation runs only ``moe``).
                self.forward_counts[i] += counts.long()
            elif spec.get("used") and used is not None:
                out, l_aux, _ = moe(h, used)
            else:
                out, l_aux, _ = moe(h)
            h = h + out
            aux = aux + l_aux
        return self.head(h).pow(2).mean() + 0.01 * aux


class DeepSpeedCounters:
    """DeepSpeed's own per-layer counters, summed over forwards (test-side hooks)."""

    def __init__(self, net: Net) -> None:
        from deepspeed.utils import groups

        n = len(net.moes)
        self.exp = [torch.zeros(E, dtype=torch.long) for _ in range(n)]
        self.received = [torch.zeros(E, dtype=torch.long) for _ in range(n)]
        self.l_aux: list[float] = [float("nan")] * n
        for i, moe in enumerate(net.moes):
            ep_rank = groups._get_expert_parallel_rank(moe.expert_group_name)
            local = moe.num_local_experts
            ids = torch.arange(local) + ep_rank * local
            moe.register_forward_hook(self._exp_hook(i))
            moe.deepspeed_moe.experts.register_forward_pre_hook(self._recv_hook(i, ids))

    def _exp_hook(self, i: int) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            self.exp[i] += out[2].detach().long()
            self.l_aux[i] = float(out[1])

        return hook

    def _recv_hook(self, i: int, ids: torch.Tensor) -> Any:
        def hook(_m: nn.Module, args: Any) -> None:
            x = args[0]  # [ep_size (source rank), local experts, capacity, H]
            self.received[i].index_add_(0, ids, x.ne(0).any(-1).sum(dim=(0, 2)).long())

        return hook

    def all_reduced(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        import torch.distributed as dist

        exp = [t.clone() for t in self.exp]
        rec = [t.clone() for t in self.received]
        for t in exp + rec:
            dist.all_reduce(t)
        return exp, rec


def _init_rank(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
    )
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def _engine(net: Net, micro: int, **config: Any) -> Any:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "steps_per_print": 1000,
        "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
        **config,
    }
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    return engine


def _global_batches(steps: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        x = torch.randn(B * world, S, D_IN, generator=g)
        used = (torch.rand(B * world * S, generator=g) > 0.25).long()
        out.append((x, used))
    return out


def _worker(rank: int, world: int, port: int, scenario: str, *extra: Any) -> None:
    failures = extra[-1]
    try:
        _init_rank(rank, world, port)
        SCENARIOS[scenario](rank, world, *extra[:-1])
    except BaseException:
        failures.put(f"rank {rank}: {traceback.format_exc()}")
        raise


# ---------------------------------------------------------------- scenarios (in ranks)


def _single_process_gates(rank: int, world: int) -> None:
    from moescope import MoEMonitor

    torch.manual_seed(0)
    net = Net(SINGLE_SPECS)
    engine = _engine(net, B)
    refs = DeepSpeedCounters(net)
    mon = MoEMonitor(engine.module)
    assert [i.adapter for i in mon.layers] == ["deepspeed_moe"] * len(SINGLE_SPECS)
    n_used = 0
    for x, used in _global_batches(3, 1):
        loss = engine(x, used)
        engine.backward(loss)
        engine.step()
        n_used += int(used.sum())
    snap = mon.snapshot(reset=True)
    for i, spec in enumerate(SINGLE_SPECS):
        lay = snap.layers[f"moes.{i}"]
        exp, rec = refs.exp[i].numpy(), refs.received[i].numpy()
        assert lay.top_k == spec["k"]
        np.testing.assert_array_equal(lay.usage_counts, rec, err_msg=f"layer {i}")
        n_dropped = round(lay.dropped_fraction * lay.num_slots)
        assert n_dropped == exp.sum() - rec.sum(), (i, n_dropped, exp, rec)
        both = lay.usage_counts + lay.dropped_counts
        if spec.get("known", True):
            np.testing.assert_array_equal(both, exp, err_msg=f"layer {i}")
        else:
            assert (both <= exp).all() and lay.dropped_counts.sum() < n_dropped, (i, both, exp)
        if spec.get("drop_tokens", True):
            assert n_dropped > 0, f"layer {i} dropped nothing: the test would prove nothing"
        else:
            assert n_dropped == 0
        assert lay.num_tokens == (n_used if spec.get("used") else 3 * B * S)

    # One forward: DeepSpeed's top-1 l_aux (E * sum_e mean-prob_e * chosen-fraction_e) is
    # the monitor's aux_loss for an unmasked top-1 layer; its probabilities are the gate's.
    with torch.no_grad():
        engine(_global_batches(1, 1)[0][0])
    snap = mon.snapshot(reset=True)
    lay = snap.layers[f"moes.{len(SINGLE_SPECS) - 1}"]
    assert abs(lay.aux_loss - refs.l_aux[-1]) < 1e-5, (lay.aux_loss, refs.l_aux[-1])
    # Top-k (k > 2): DeepSpeed divides by k what the Switch/HF loss sums over the k slots
    # (the routes it chose before dropping, which the monitor recovers exactly).
    lay = snap.layers["moes.5"]
    assert abs(lay.aux_loss - 3 * refs.l_aux[5]) < 1e-5, (lay.aux_loss, refs.l_aux[5])

    # A gate output the adapter cannot read (the dense [S, E, C] form DeepSpeed's gate
    # returns when called without sparse_routes) switches that layer off with one warning;
    # the model and the other layers go on.
    x = _global_batches(1, 1)[0][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            dense = net.moes[6].deepspeed_moe.gate(net.inp(x).reshape(-1, H))
            engine(x)
    assert len(dense) == 4 and dense[2].dim() == 3  # l_aux, combine, dispatch [S,E,C], counts
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "moes.6" in msgs[0], msgs
    snap = mon.snapshot(reset=True)
    assert snap.layers["moes.6"].num_tokens == 0
    assert snap.layers["moes.0"].num_tokens == B * S
    mon.detach()


def _ranks_vs_single(rank: int, world: int, n_global: int, out: str) -> None:
    """ep_size=2 on ``world`` ranks, each taking its shard of a global batch of
    ``n_global`` x B sequences (world=1: the single-process reference, ep_size=1)."""
    from moescope import MoEMonitor

    torch.manual_seed(0)
    micro = B * n_global // world
    net = Net(DIST_SPECS, ep_size=2 if world > 1 else 1)
    engine = _engine(net, micro)
    refs = DeepSpeedCounters(net)
    mon = MoEMonitor(engine.module)
    for x, _ in _global_batches(3, n_global):
        loss = engine(x[rank * micro : (rank + 1) * micro])
        engine.backward(loss)
        engine.step()
    snap = mon.snapshot()
    exp, rec = refs.all_reduced() if world > 1 else (refs.exp, refs.received)
    result = {}
    for i in range(len(DIST_SPECS)):
        lay = snap.layers[f"moes.{i}"]
        np.testing.assert_array_equal(lay.usage_counts, rec[i].numpy(), err_msg=f"layer {i}")
        np.testing.assert_array_equal(
            lay.usage_counts + lay.dropped_counts, exp[i].numpy(), err_msg=f"layer {i}"
        )
        result[f"moes.{i}"] = {
            "usage": lay.usage_counts.tolist(),
            "dropped": lay.dropped_counts.tolist(),
            "tokens": lay.num_tokens,
            "exp": exp[i].tolist(),
        }
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    mon.detach()


def _logging(rank: int, world: int, out: str) -> None:
    from moescope.integrations import deepspeed as ds_int

    torch.manual_seed(0)
    net = Net(DIST_SPECS[:2])
    engine = _engine(
        net,
        B,
        steps_per_print=2,
        gradient_accumulation_steps=2,
        csv_monitor={"enabled": True, "output_path": f"{out}/csv", "job_name": "run"},
        tensorboard={"enabled": True, "output_path": f"{out}/tb", "job_name": "run"},
    )
    refs = DeepSpeedCounters(net)
    alerts: list[Any] = []
    moe = ds_int.attach(
        engine,
        log_to_console=False,
        save_detailed_logs=True,
        log_dir=f"{out}/moe",
        log_heatmap_every=None,
        alert_threshold_imbalance=1.0,  # any imbalance fires: checks the alert path
        on_alert=alerts.append,
    )
    assert moe.log_every_n_steps == 2  # DeepSpeed's steps_per_print
    usage_at: dict[int, list[int]] = {}
    batches = _global_batches(9, 1)
    for n, (x, _) in enumerate(batches[:8]):  # 8 micro-batches: 4 optimizer steps
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        if n in (3, 7):  # end of optimizer steps 2 and 4 (2 micro-batches per step)
            usage_at[int(engine.global_steps)] = [int(t.sum()) for t in refs.exp]
            for t in refs.exp:
                t.zero_()
    assert engine.global_steps == 4
    engine.eval()
    with torch.no_grad():
        engine(batches[8][0])
    engine.train()
    eval_metrics = moe.log_eval()
    assert eval_metrics["moe/eval/moes.0/num_tokens"] == B * S
    moe.close()
    assert "step" not in vars(engine), "close() must restore engine.step"
    assert alerts, "alert_threshold_imbalance=1.0 must fire"
    Path(f"{out}/usage.json").write_text(json.dumps(usage_at))


def _checkpointing(rank: int, world: int) -> None:
    """DeepSpeed's activation checkpointing re-runs each MoE layer in backward: counted once."""
    from moescope import MoEMonitor

    torch.manual_seed(0)
    net = Net(DIST_SPECS[:2])
    net.checkpointed = True
    deepspeed.checkpointing.configure(None)
    engine = _engine(net, B)
    refs = DeepSpeedCounters(net)  # its hooks also see the recomputation: twice
    mon = MoEMonitor(engine.module)
    for x, _ in _global_batches(2, 1):
        loss = engine(x)
        engine.backward(loss)
        engine.step()
    snap = mon.snapshot()
    for i in range(2):
        lay = snap.layers[f"moes.{i}"]
        assert lay.num_tokens == 2 * B * S
        np.testing.assert_array_equal(lay.usage_counts, net.forward_counts[i].numpy())
        np.testing.assert_array_equal(2 * lay.usage_counts, refs.exp[i].numpy())
    mon.detach()


def _benchmark_smoke(rank: int, world: int, out: str) -> None:
    import contextlib
    import io

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import engine_overhead

    tiny = "--hidden 32 --experts 4 --top-k 2 --layers 2 --batch 2 --seq 8"
    argv = f"--engine deepspeed --reps 1 --warmup 0 --steps 2 --log-interval 2 {tiny}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        engine_overhead.main(argv.split())
    Path(out).write_text(buf.getvalue())


SCENARIOS = {
    "single_process_gates": _single_process_gates,
    "ranks_vs_single": _ranks_vs_single,
    "logging": _logging,
    "benchmark_smoke": _benchmark_smoke,
    "checkpointing": _checkpointing,
}


# ---------------------------------------------------------------- tests


def test_adapter_matches_every_gate_config_against_deepspeed_counters() -> None:
    """Top-1/top-2/top-3, capacity drops, RTS, RSample/Jitter, used_token, drop_tokens=False."""
    run_ranks(_worker, 1, "single_process_gates")


def test_activation_checkpointing_counts_each_forward_once() -> None:
    run_ranks(_worker, 1, "checkpointing")


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_ranks_equal_single_process(world: int, tmp_path: Path) -> None:
    run_ranks(_worker, 1, "ranks_vs_single", world, str(tmp_path / "single.json"))
    run_ranks(_worker, world, "ranks_vs_single", world, str(tmp_path / "ranks.json"))
    single = json.loads((tmp_path / "single.json").read_text())
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    for i, spec in enumerate(DIST_SPECS):
        name = f"moes.{i}"
        assert ranks[name]["tokens"] == single[name]["tokens"] == 3 * world * B * S
        if spec.get("drop_tokens", True):
            # Capacity is per rank (from its own token count): only the gate's choices agree.
            assert sum(ranks[name]["dropped"]) > 0
            full = np.add(ranks[name]["usage"], ranks[name]["dropped"]).tolist()
            assert full == ranks[name]["exp"]
        else:
            assert ranks[name]["usage"] == single[name]["usage"] == single[name]["exp"], name
            assert ranks[name]["exp"] == single[name]["exp"]


def _read_csv(path: Path) -> list[tuple[int, float]]:
    with path.open() as f:
        rows = list(csv.reader(f))
    return [(int(r[0]), float(r[1])) for r in rows[1:]]


def test_attach_logs_into_deepspeed_monitor(tmp_path: Path) -> None:
    from moescope.sinks.jsonl import load_snapshots

    run_ranks(_worker, 1, "logging", str(tmp_path))
    snaps = load_snapshots(tmp_path / "moe" / "moe_detailed.jsonl")
    # Windows end at optimizer steps 2 and 4 (steps_per_print=2); each holds the forwards
    # of its 2 x 2 micro-batches (gradient accumulation).
    assert [s.step for s in snaps] == [2, 4]
    usage = {int(k): v for k, v in json.loads((tmp_path / "usage.json").read_text()).items()}
    for snap in snaps:
        got = [int(snap.layers[f"moes.{i}"].usage_counts.sum()) for i in range(2)]
        assert got == usage[snap.step], (snap.step, got, usage)
    # DeepSpeed's CSV monitor: one file per key, x = global samples (8 per optimizer step).
    csv_dir = tmp_path / "csv" / "run"
    for key in ("moe/avg_expert_cv", "moe/moes.1/cv", "moe/moes.0/routing_entropy"):
        rows = _read_csv(csv_dir / (key.replace("/", "_") + ".csv"))
        assert [x for x, _ in rows] == [16, 32], rows
        for (_, value), snap in zip(rows, snaps, strict=True):
            assert value == pytest.approx(snap.to_dict(prefix="moe")[key], rel=1e-12)
    assert (csv_dir / "moe_eval_moes.0_num_tokens.csv").exists()
    # TensorBoard event file of DeepSpeed's TensorBoardMonitor.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "run"))
    acc.Reload()
    scalars = acc.Scalars("moe/avg_expert_cv")
    assert [e.step for e in scalars] == [16, 32]
    for e, snap in zip(scalars, snaps, strict=True):
        assert e.value == pytest.approx(snap.to_dict(prefix="moe")["moe/avg_expert_cv"], rel=1e-6)


def test_overhead_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/engine_overhead.py --engine deepspeed on a tiny model, so that the mode
    does not rot."""
    run_ranks(_worker, 1, "benchmark_smoke", str(tmp_path / "bench.txt"))
    table = (tmp_path / "bench.txt").read_text()
    assert "engine=deepspeed" in table
    rows = [line for line in table.splitlines() if line.startswith("| process CPU |")]
    assert len(rows) == 1 and float(rows[0].split("|")[4]) > 0, table
