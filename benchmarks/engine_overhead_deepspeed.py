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

Method: ONE engine trains throughout, with ``attach`` done once (outside the timing).
Blocks of ``--steps`` optimizer steps alternate between "moescope" (the monitor's hooks
attached, ``engine.step`` through moescope's wrapper, so the snapshot taken every
``--log-interval`` = ``steps_per_print`` steps is inside the timing: keep ``--steps`` a
multiple of it) and "none" (hooks detached, DeepSpeed's own ``engine.step``), the order
swapped every repetition so that a shared machine's load hits both alike. Each block is
timed in wall time and in this process's CPU time (``time.process_time``, all threads;
with ``--threads 1`` on a shared CPU it is what the step costs whatever else runs). Per
clock: the median per step of each variant, the ratio of the medians (moescope / none)
and the median of the per-repetition ratios. Same method as ``benchmarks/engine_overhead.py``
(the Megatron helper's script), whose ``ENGINES`` table can take :func:`_deepspeed`.

Run:  PYTHONPATH=src .venv-engines/bin/python benchmarks/engine_overhead_deepspeed.py
``--quick`` for a smoke run. Results: ``benchmarks/RESULTS.md``.

A separate file because ``benchmarks/engine_overhead.py`` (Megatron-core) was not on this
branch when this was written.
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
    """Interleaved blocks with and without moescope on one DeepSpeed engine; returns the
    per-block step times (wall and process CPU) and the ratios of medians."""
    import deepspeed

    step, moe = _deepspeed(args)
    mon = moe.monitor

    def block(monitored: bool) -> tuple[float, float]:
        if monitored:
            mon.attach()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            step(monitored)
        dw, dc = time.perf_counter() - w0, time.process_time() - c0
        if monitored:
            mon.detach()
        return dw / args.steps, dc / args.steps

    for i in range(args.warmup):
        block(i % 2 == 0)
    runs: dict[str, list[tuple[float, float]]] = {"none": [], "moescope": []}
    for rep in range(args.reps):
        order = (True, False) if rep % 2 == 0 else (False, True)
        for monitored in order:
            runs["moescope" if monitored else "none"].append(block(monitored))
        on, off = runs["moescope"][-1], runs["none"][-1]
        print(
            f"rep {rep + 1}/{args.reps}: wall {1e3 * off[0]:.1f} / {1e3 * on[0]:.1f} ms, "
            f"CPU {1e3 * off[1]:.1f} / {1e3 * on[1]:.1f} ms per step (none / moescope)",
            file=sys.stderr,
            flush=True,
        )
    assert moe.session.last_train_step is not None, "no snapshot was taken"
    moe.close()

    def summary(xs: list[float]) -> dict[str, float]:
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
        return {"median_ms": 1e3 * statistics.median(xs), "iqr_ms": 1e3 * (q[2] - q[0])}

    result: dict[str, Any] = {
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
        "steps_per_block": args.steps,
        "log_interval": args.log_interval,
        "reps": args.reps,
    }
    for i, clock in enumerate(("wall", "cpu")):
        on = [x[i] for x in runs["moescope"]]
        off = [x[i] for x in runs["none"]]
        result[clock] = {
            "none": summary(off),
            "moescope": summary(on),
            "ratio_of_medians": statistics.median(on) / statistics.median(off),
            "median_of_ratios": statistics.median(a / b for a, b in zip(on, off, strict=True)),
            "per_block_ms": {
                "none": [round(1e3 * v, 3) for v in off],
                "moescope": [round(1e3 * v, 3) for v in on],
            },
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
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    p.add_argument(
        "--log-interval", type=int, default=10, help="steps_per_print (a divisor of --steps)"
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps (smoke run)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.batch, args.seq, args.reps, args.warmup = 32, 2, 16, 2, 1
        args.steps = args.log_interval = 2
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
