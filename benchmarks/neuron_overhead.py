"""Inference overhead of neuron-level monitoring (``MoEMonitor(neurons=True)``).

Question: how much does counting activated neurons (issue 4) add to a model's forward,
compared with the routing-only monitor and with no monitor at all? Goal: neurons-on at
most 1.10x the routing-only monitor.

Models: random transformers models built from config classes (no weights downloaded),
4 decoder layers, H = 256, I = 512 per expert, vocab 1024, every layer sparse,
transformers' default ``grouped_mm`` experts backend:

- ``mixtral``: ``MixtralForCausalLM``, E = 8, K = 2;
- ``olmoe``: ``OlmoeForCausalLM``, E = 64, K = 8.

Input: batch 8 x 256 tokens with an ``attention_mask`` (last 32 positions of half the
rows padded, so the padding path of the capture runs). Timed: one inference forward
under ``torch.no_grad()``. Modes, run round-robin within every repetition (rotating the
order) so the load of a shared machine hits them alike:

- ``no monitor``;
- ``routing`` : ``MoEMonitor(model)`` (neurons off);
- ``neurons`` : ``MoEMonitor(model, neurons=True)`` (default magnitude threshold,
  per-neuron firing counts on);
- ``neurons, relative p=0.9``: the sort-based threshold (the costliest rule).

Snapshots are not in the timed path (they run once per log step, not per forward).
Reported: median wall-clock seconds and median process CPU seconds (``time.process_time``,
all threads; less sensitive than wall time to other processes on a shared machine) per
forward over ``--reps`` repetitions after ``--warmup``, and ratios of medians measured in
the same run.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/neuron_overhead.py [--reps 12] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moescope import MoEMonitor
from moescope.stats.neurons import NeuronThreshold


def build(family: str, layers: int, hidden: int, inter: int) -> torch.nn.Module:
    import transformers

    common = dict(
        vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_experts=64, num_experts_per_tok=8)
        model = transformers.OlmoeForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # random routers (some inits are all-zero: every score tied)
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model.eval()


def run(
    family: str, reps: int, warmup: int, batch: int, seq: int, layers: int
) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    model = build(family, layers, 256, 512)
    ids = torch.randint(1, 1024, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[::2, -seq // 8 :] = 0
    mons = {
        "routing": MoEMonitor(model, attach=False, history=0),
        "neurons": MoEMonitor(model, attach=False, history=0, neurons=True),
        "neurons, relative p=0.9": MoEMonitor(
            model, attach=False, history=0, neurons=True,
            neuron_threshold=NeuronThreshold.relative(0.9),
        ),
    }  # fmt: skip

    def step(mode: str) -> Callable[[], tuple[float, float]]:
        def f() -> tuple[float, float]:
            mon = mons.get(mode)
            if mon is not None:
                mon.attach()
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
                return time.perf_counter() - t0, time.process_time() - c0
            finally:
                if mon is not None:
                    mon.detach()

        return f

    modes = ["no monitor", *mons]
    fns = {m: step(m) for m in modes}
    for _ in range(warmup):
        for m in modes:
            fns[m]()
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for r in range(reps):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for m in order:
            times[m].append(fns[m]())
    snap = mons["neurons"].snapshot()
    print(
        f"  [{family}] neuron rows counted: {sum(s.neuron_rows for s in snap.layers.values())}, "
        f"avg neuron sparsity {snap.avg_neuron_sparsity:.3f}"
    )
    return {
        m: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for m, v in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: smoke test only")
    a = ap.parse_args()
    batch, seq, layers = (2, 32, 2) if a.quick else (8, 256, 4)
    reps = 3 if a.quick else a.reps
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batch} x {seq}, "
        f"{layers} layers, H=256, I=512, median of {reps} reps after {a.warmup} warm-up"
    )
    rows = []
    for family in ("mixtral", "olmoe"):
        med = run(family, reps, a.warmup, batch, seq, layers)
        rows.append((family, med))
    print()
    print(
        "| model | mode | median wall s | wall vs no monitor | wall vs routing | "
        "median CPU s | CPU vs no monitor | CPU vs routing |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for family, med in rows:
        shape = "E=8, K=2" if family == "mixtral" else "E=64, K=8"
        w0, c0 = med["no monitor"]
        wr, cr = med["routing"]
        for m, (w, c) in med.items():
            print(
                f"| {family} ({shape}) | {m} | {w:.4f} | {w / w0:.3f}x | {w / wr:.3f}x | "
                f"{c:.4f} | {c / c0:.3f}x | {c / cr:.3f}x |"
            )


if __name__ == "__main__":
    main()
