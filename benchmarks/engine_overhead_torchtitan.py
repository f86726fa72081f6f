"""Cost of moescope on a torchtitan training step (issue 19; ``--engine torchtitan``).

Question: is a torchtitan training step with moescope attached at most 1.02x the same step
without it?

Model: torchtitan's own deepseek_v3 ``debugmodel`` (6 blocks: 1 dense + 5 MoE, dim 256,
8 routed experts top-3 + 2 shared, softmax router with the aux-loss-free expert bias,
vocab 2048), SDPA attention (FlexAttention has no backward on CPU), random init, float32
weights (its grouped experts compute in bf16, as torchtitan does). One step =
``zero_grad``, forward, cross-entropy, backward, torchtitan's ``OptimizersContainer``
(AdamW) step with its MoE bias-update pre-hook (``register_moe_load_balancing_hook``).

Variants, each on its own copy of the same initial model with its own optimizer, fed the
same batches:

- ``none``: no monitor;
- ``moescope``: ``MoETorchtitanCallback([model])`` (every metric, co-activation included,
  alerts), its ``on_log_step(step)`` (snapshot + alerts + flat metrics, what torchtitan's
  ``MetricsProcessor.log`` triggers) every ``--log-every`` steps, inside the timed step.

Timing: the two variants alternate one step each (the order flips every round) so the
load of a shared machine hits both alike; ``--warmup`` rounds are dropped. Reported:
median step time per variant, the ratio of medians, the amortised ratio (mean step time,
log steps included), and the ratio of medians of process CPU time (one thread by default:
other processes on a shared machine disturb it far less than wall time). The losses of both variants must be identical (the monitor
changes nothing).

Run:   PYTHONPATH=src .venv-engines/bin/python benchmarks/engine_overhead_torchtitan.py
Quick: ... engine_overhead_torchtitan.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch


def build_model(layers: int) -> tuple[Any, Any]:
    """torchtitan's deepseek_v3 debugmodel (first ``layers`` blocks) and its model spec."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import model_registry

    spec = model_registry("debugmodel")
    cfg = spec.model
    cfg.layers = cfg.layers[:layers]
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    return model, spec


def make_optimizer(model: Any, spec: Any) -> Any:
    """torchtitan's AdamW container with the MoE bias-update pre-hook (one process)."""
    from types import SimpleNamespace

    from torchtitan.components.optimizer import default_adamw

    opt = default_adamw(lr=8e-4).build(model_parts=[model])
    # The hook reads only these ParallelDims fields on one process (no mesh is needed).
    dims = SimpleNamespace(ep_enabled=False, tp=1, get_optional_mesh=lambda *_a, **_k: None)
    spec.post_optimizer_build_fn(opt, [model], dims)
    return opt


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moescope.integrations.torchtitan import MoETorchtitanCallback

    torch.set_num_threads(args.threads)
    base, spec = build_model(args.layers)
    models = {"none": base, "moescope": copy.deepcopy(base)}
    opts = {name: make_optimizer(m, spec) for name, m in models.items()}
    cb = MoETorchtitanCallback(
        [models["moescope"]],
        log_to_console=False,
        log_heatmap_every=None,
        save_detailed_logs=False,
    )
    g = torch.Generator().manual_seed(1)
    rounds = args.warmup + args.steps
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, list[float]] = {name: [] for name in models}
    log_steps = 0
    for r in range(rounds):
        batch = torch.randint(0, 2048, (args.batch, args.seq + 1), generator=g)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            model, opt = models[name], opts[name]
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad()
            pred = model(tokens)
            loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten())
            loss.backward()
            opt.step()
            if name == "moescope" and (r + 1) % args.log_every == 0:
                cb.on_log_step(r + 1)
                log_steps += r >= args.warmup
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses[name].append(float(loss.detach()))
            if r >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    cb.close()
    med = {n: statistics.median(t) for n, t in times.items()}
    mean = {n: statistics.fmean(t) for n, t in times.items()}
    cpu_med = {n: statistics.median(t) for n, t in cpu.items()}
    return {
        "cpu_median_s": cpu_med,
        "ratio_cpu_median": cpu_med["moescope"] / cpu_med["none"],
        "median_s": med,
        "mean_s": mean,
        "ratio_median": med["moescope"] / med["none"],
        "ratio_amortised": mean["moescope"] / mean["none"],
        "losses_equal": losses["none"] == losses["moescope"],
        "steps": args.steps,
        "log_steps": log_steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="torchtitan", choices=["torchtitan"])
    p.add_argument("--layers", type=int, default=6, help="blocks of debugmodel (1 dense first)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="measured rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 blocks, 6 rounds, batch 2 x 64")
    args = p.parse_args()
    if args.quick:
        args.layers, args.steps, args.warmup, args.batch, args.seq = 2, 6, 1, 2, 64
        args.log_every = 3
    res = run(args)
    print(
        f"torchtitan deepseek_v3 debugmodel[:{args.layers}], batch {args.batch} x {args.seq}, "
        f"{res['steps']} rounds ({res['log_steps']} log steps, every {args.log_every}), "
        f"{args.threads} threads"
    )
    for name in ("none", "moescope"):
        print(
            f"  {name:9s} median {res['median_s'][name] * 1e3:8.1f} ms   "
            f"mean {res['mean_s'][name] * 1e3:8.1f} ms   "
            f"CPU-time median {res['cpu_median_s'][name] * 1e3:8.1f} ms"
        )
    print(
        f"  ratio of medians {res['ratio_median']:.3f}x   amortised (means) "
        f"{res['ratio_amortised']:.3f}x   CPU-time medians {res['ratio_cpu_median']:.3f}x   "
        f"losses identical: {res['losses_equal']}"
    )


if __name__ == "__main__":
    main()
