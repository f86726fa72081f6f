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

A second table times the pieces of one MoE layer back to back on the same tensors
(experts forward, the row -> token sort of the capture pre-hook, the neuron update),
which a loaded machine disturbs less than whole-model timings.

One thread: on an oversubscribed shared machine, 2 OpenMP threads make every small GEMM
wait at a barrier for a descheduled thread (see the layer_throughput notes), which
swamps the differences measured here.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/neuron_overhead.py [--reps 12] [--quick]
      [--components-only]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moescope import MoEMonitor
from moescope.stats.neurons import NeuronOptions, NeuronThreshold


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
            model, attach=False, history=0,
            neurons=NeuronOptions(threshold=NeuronThreshold.relative(0.9)),
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


def components(reps: int, batch: int, seq: int) -> None:
    """Per-layer cost of the neuron counting alone vs the experts forward it rides on.

    Less exposed to a shared machine than whole-model timings: each repetition times
    the pieces back to back on the same tensors; median and min over ``reps``.
    """
    print("\n| model | piece (one layer) | median ms | min ms | vs experts forward (median, min) |")
    print("|---|---|---:|---:|---:|")
    for family in ("mixtral", "olmoe"):
        _components_one(family, reps, batch, seq)


def _components_one(family: str, reps: int, batch: int, seq: int) -> None:
    from moescope.stats.neurons import NeuronAccumulator

    torch.manual_seed(0)
    model = build(family, 1, 256, 512)
    blk = model.model.layers[0].mlp
    x = torch.randn(batch * seq, 256)
    with torch.no_grad():
        _, w, idx = blk.gate(x)
    e = blk.experts.num_experts
    acc = NeuronAccumulator(e, 512)
    acc_rel = NeuronAccumulator(e, 512, threshold=("relative", 0.9))
    captured: dict[str, torch.Tensor] = {}
    orig = blk.experts._apply_gate

    def grab(gu: torch.Tensor) -> torch.Tensor:
        h = orig(gu)
        captured["h"] = h
        return h

    blk.experts._apply_gate = grab
    with torch.no_grad():
        blk.experts(x, idx, w)
    del blk.experts._apply_gate
    h = captured["h"]
    ids_sorted, perm = torch.sort(idx.reshape(-1))
    valid = torch.ones(x.shape[0], dtype=torch.bool)[perm // idx.shape[1]]

    def t_experts() -> None:
        with torch.no_grad():
            blk.experts(x, idx, w)

    def t_sort() -> None:
        _, p = torch.sort(idx.reshape(-1))
        torch.ones(x.shape[0], dtype=torch.bool)[p // idx.shape[1]]

    pieces: dict[str, Callable[[], None]] = {
        "experts forward (grouped_mm)": t_experts,
        "row -> token sort (pre-hook)": t_sort,
        "NeuronAccumulator.update (magnitude)": lambda: acc.update(h, ids_sorted, valid),
        "NeuronAccumulator.update (relative)": lambda: acc_rel.update(h, ids_sorted, valid),
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for r in range(reps + 2):
        for k, f in pieces.items():
            t0 = time.perf_counter()
            f()
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    base = times["experts forward (grouped_mm)"]
    mb, nb = statistics.median(base), min(base)
    shape = "E=8, K=2" if family == "mixtral" else "E=64, K=8"
    for k, v in times.items():
        md, mn = statistics.median(v), min(v)
        print(
            f"| {family} ({shape}), {x.shape[0]} tokens | {k} | {md * 1e3:.1f} | "
            f"{mn * 1e3:.1f} | {md / mb:.3f}, {mn / nb:.3f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: smoke test only")
    ap.add_argument(
        "--components-only", action="store_true",
        help="only the per-layer piece timings (experts forward vs neuron counting)",
    )  # fmt: skip
    a = ap.parse_args()
    batch, seq, layers = (2, 32, 2) if a.quick else (8, 256, 4)
    reps = 3 if a.quick else a.reps
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batch} x {seq}, "
        f"{layers} layers, H=256, I=512, median of {reps} reps after {a.warmup} warm-up"
    )
    if a.components_only:
        components(max(reps, 10), batch, seq)
        return
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
    components(max(reps, 10), batch, seq)


if __name__ == "__main__":
    main()
