"""Step time of DeepSpeed MoE training with and without moescope (issue 19, DeepSpeed part).

Question: does ``moescope.integrations.deepspeed.attach(engine)`` (every DeepSpeed MoE
layer hooked, every metric on, a snapshot + alert check + flat metrics every
``steps_per_print`` optimizer steps, inside the measured steps) keep a training step
within 1.02x of the same step without it?

Model: an input projection, ``--layers`` DeepSpeed ``MoE`` layers (``deepspeed.moe.layer.MoE``,
expert = Linear(H, 2H) -> GELU -> Linear(2H, H), E experts, top-k, capacity factor 1.25,
so some tokens are dropped), residual connections, a linear head; float32; loss = mean
square of the head + 0.01 x the gates' l_aux. One step = ``engine(x)``,
``engine.backward(loss)``, ``engine.step()`` through ``deepspeed.initialize`` (one process,
gloo, torch AdamW). Batch ``--batch`` x ``--seq`` tokens.

Method: ONE engine trains throughout; reps alternate between "none" (no monitor) and
"moescope" (``attach`` before the rep, ``close`` after it: both outside the timing), the
order swapped every rep so that a shared machine's load hits both alike. A rep is
``--steps`` optimizer steps (= ``steps_per_print``, so every moescope rep contains one
snapshot). Per rep: mean step time, in wall time and in this process's CPU time (all
threads; on a shared machine other processes disturb it far less than wall time); result:
median over reps of "moescope" / median over reps of "none" (ratio of medians), for both,
with each variant's IQR.

Run:  OMP_NUM_THREADS=2 python benchmarks/engine_overhead_deepspeed.py --engine deepspeed
(in the engines venv, ``PYTHONPATH=src``). ``--quick`` for a smoke run. Results:
``benchmarks/RESULTS.md``.

This file holds the DeepSpeed mode only (``run_deepspeed``); ``benchmarks/engine_overhead.py``
(Megatron-core, torchtitan) was not on this branch when it was written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn


def _setup_single_process() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29533"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ):
        os.environ.setdefault(key, value)


class DeepSpeedMoENet(nn.Module):
    """Input projection, ``layers`` residual DeepSpeed MoE layers, linear head."""

    def __init__(self, hidden: int, experts: int, top_k: int, layers: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = nn.Linear(hidden, hidden)
        expert = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )
        self.moes = nn.ModuleList(
            MoE(hidden, expert, num_experts=experts, k=top_k, capacity_factor=1.25)
            for _ in range(layers)
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        aux = h.new_zeros(())
        for moe in self.moes:
            out, l_aux, _ = moe(h)
            h = h + out
            aux = aux + l_aux
        return self.head(h).pow(2).mean() + 0.01 * aux


def run_deepspeed(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved reps with and without moescope on one DeepSpeed engine; returns the
    per-rep step times and the ratio of medians."""
    _setup_single_process()
    import deepspeed
    import deepspeed.ops

    from moescope.integrations import deepspeed as ds_int

    # No shared-memory collective op build (a one-process job has no collectives to speed up).
    deepspeed.ops.__compatible_ops__ = {}
    torch.manual_seed(0)
    net = DeepSpeedMoENet(args.hidden, args.experts, args.top_k, args.layers)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": args.steps}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, args.seq, args.hidden, generator=gen) for _ in range(4)]

    def steps(n: int) -> tuple[float, float]:
        # Wall time and this process's CPU time (all threads) per step: other processes on
        # a shared machine disturb the second far less.
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            loss = engine(batches[i % len(batches)])
            engine.backward(loss)
            engine.step()
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

    steps(args.warmup)
    times: dict[str, list[float]] = {"none": [], "moescope": []}
    cpu: dict[str, list[float]] = {"none": [], "moescope": []}
    for rep in range(args.reps):
        order = ("none", "moescope") if rep % 2 == 0 else ("moescope", "none")
        for variant in order:
            if variant == "none":
                wall, c = steps(args.steps)
                times["none"].append(wall)
                cpu["none"].append(c)
                continue
            moe = ds_int.attach(
                engine, log_to_console=False, log_heatmap_every=None, alert_threshold_imbalance=None
            )
            wall, c = steps(args.steps)
            times["moescope"].append(wall)
            cpu["moescope"].append(c)
            assert moe.session.last_train_step is not None, "no snapshot inside the rep"
            moe.close()
        print(
            f"rep {rep + 1}/{args.reps}: none {1e3 * times['none'][-1]:.1f} ms, "
            f"moescope {1e3 * times['moescope'][-1]:.1f} ms per step (CPU "
            f"{1e3 * cpu['none'][-1]:.1f} / {1e3 * cpu['moescope'][-1]:.1f} ms)",
            file=sys.stderr,
            flush=True,
        )

    def summary(xs: list[float]) -> dict[str, float]:
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
        return {"median_ms": 1e3 * statistics.median(xs), "iqr_ms": 1e3 * (q[2] - q[0])}

    result = {
        "engine": "deepspeed",
        "deepspeed": deepspeed.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}",
        "shape": {
            "hidden": args.hidden,
            "experts": args.experts,
            "top_k": args.top_k,
            "layers": args.layers,
            "tokens_per_step": args.batch * args.seq,
        },
        "steps_per_rep": args.steps,
        "reps": args.reps,
        "none": summary(times["none"]),
        "moescope": summary(times["moescope"]),
        "ratio_of_medians": statistics.median(times["moescope"]) / statistics.median(times["none"]),
        "cpu_none": summary(cpu["none"]),
        "cpu_moescope": summary(cpu["moescope"]),
        "cpu_ratio_of_medians": statistics.median(cpu["moescope"]) / statistics.median(cpu["none"]),
        "per_rep_ms": {k: [round(1e3 * v, 3) for v in xs] for k, xs in times.items()},
        "per_rep_cpu_ms": {k: [round(1e3 * v, 3) for v in xs] for k, xs in cpu.items()},
    }
    return result


def _deepspeed(args: argparse.Namespace) -> tuple[Any, Any]:
    """The DeepSpeed entry for ``benchmarks/engine_overhead.py``'s ``ENGINES`` table (the
    Megatron helper's script): returns ``step(monitored)`` and the attached handle, whose
    ``monitor`` the caller attaches/detaches around timed blocks. Reads ``--layers``,
    ``--hidden``, ``--experts``, ``--top-k``, ``--batch``, ``--seq``, ``--log-interval``.
    An unmonitored step calls DeepSpeed's own ``engine.step`` (not moescope's wrapper), so
    it takes no snapshot."""
    _setup_single_process()
    import deepspeed
    import deepspeed.ops

    from moescope.integrations import deepspeed as ds_int

    deepspeed.ops.__compatible_ops__ = {}
    torch.manual_seed(0)
    net = DeepSpeedMoENet(args.hidden, args.experts, args.top_k, args.layers)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": args.log_interval}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(1))
    moe = ds_int.attach(
        engine, log_to_console=False, log_heatmap_every=None, alert_threshold_imbalance=None
    )
    moe.monitor.detach()
    plain_step = moe._orig_step

    def step(monitored: bool) -> None:
        loss = engine(x)
        engine.backward(loss)
        (engine.step if monitored else plain_step)()

    return step, moe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["deepspeed"], default="deepspeed")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--steps", type=int, default=10, help="optimizer steps per rep (= steps_per_print)"
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps (smoke run)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.batch, args.seq, args.reps, args.warmup, args.steps = 32, 2, 16, 2, 1, 2
    torch.set_num_threads(args.threads)
    result = run_deepspeed(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
