"""Tokens/s of vLLM offline generation with and without moescope monitoring.

Three engines of the same checkpoint live side by side in one process (each with its own
engine-core and worker processes): ``off`` (no monitoring), ``full`` (counts plus router
probabilities: entropy, top-1, aux loss) and ``counts`` (``counts_only=True``). Every
repetition runs the same batch through each engine in turn, in a rotating order, so slow
drifts of the machine hit all three alike; a monitored engine's timing includes a
``snapshot`` after its batch (the reduction of what the batch staged is deferred to the
next snapshot, so leaving it out would hide it). The table reports the median tokens/s
over repetitions, the ratio off / monitored of the medians, and the median of the ratios
taken within each repetition (goal <= 1.05).

Model: transformers' Qwen3-MoE config with random weights (no download) saved with a
locally trained tokenizer (tests/with_vllm/tiny_ckpt.py): by default 8 layers, E = 64 routed
experts, K = 8, hidden 256 (the issue's shape at a CPU-friendly width), float32, default
CPU compilation (torch.compile), greedy decoding with ``ignore_eos``.

Run it in the vLLM venv (``make test-vllm`` builds it)::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py --reps 5

``--op-cost`` instead times what the capture adds per MoE layer call without vLLM (any
venv): ``VllmRoutingMonitor.record`` (the body of the ``moescope_vllm::capture`` op) for
decode-sized calls, with the reduction (flush + snapshot) amortised over the calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def build_model(out: Path, layers: int, hidden: int, experts: int, top_k: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "with_vllm"))
    from tiny_ckpt import build_checkpoint

    return build_checkpoint(
        out,
        "qwen3_moe",
        layers=layers,
        hidden=hidden,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=hidden,
    )


def op_cost(rows: int, experts: int, top_k: int, layers: int, calls: int) -> None:
    """Microseconds per layer call of the capture body, reduction included."""
    import torch

    from moescope.integrations.vllm.capture import VllmLayer, VllmRoutingMonitor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, experts, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    pad = torch.zeros(rows, dtype=torch.bool)
    print(f"\nrows {rows}, E={experts}, K={top_k}, {layers} layers, {calls} calls per layer")
    print("\n| variant | us per layer call (record + amortised reduction) |")
    print("|---|---|")
    for counts_only in (False, True):
        mon = VllmRoutingMonitor(
            [VllmLayer(f"layers.{i}", experts, top_k) for i in range(layers)],
            counts_only=counts_only,
        )
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _c in range(calls):
                    for layer in range(layers):
                        mon.record(layer, ids, logits, w, pad)
            mon.snapshot(reset=True)
            best = min(best, (time.perf_counter() - t0) / (calls * layers))
        print(f"| {'counts_only' if counts_only else 'full'} | {best * 1e6:.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--op-cost", action="store_true", help="time the capture body only")
    args = ap.parse_args(argv)
    if args.op_cost:
        op_cost(args.batch, args.experts, args.top_k, args.layers, calls=200)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The checkpoint (about 400 MB at the default shape) lives only as long as the run,
    # whatever ends it (an error, Ctrl-C).
    with tempfile.TemporaryDirectory(prefix="moescope-vllm-bench-") as tmp:
        model = build_model(Path(tmp) / "ckpt", args.layers, args.hidden, args.experts, args.top_k)
        run_engines(args, model)


def run_engines(args: argparse.Namespace, model: Path) -> None:
    """Time the three engines on ``model`` and print the table."""
    from vllm import LLM, SamplingParams

    import moescope.integrations.vllm as mv

    variants: dict[str, dict[str, Any] | None] = {
        "off": None,
        "full": mv.options(),
        "counts": mv.options(counts_only=True),
    }
    engines = {}
    for name, cfg in variants.items():
        kw: dict[str, Any] = {"additional_config": cfg} if cfg else {}
        engines[name] = LLM(
            model=str(model), max_model_len=512, dtype="float32", seed=0,
            enforce_eager=args.eager, **kw,
        )  # fmt: skip
    words = Path(__import__("json").decoder.__file__).read_text().split()
    prompts = [" ".join(words[i * 7 : i * 7 + 24]) for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    for llm in engines.values():  # warm-up: compile caches, first-batch shapes
        llm.generate(prompts, params, use_tqdm=False)
    rates: dict[str, list[float]] = {n: [] for n in engines}
    names = list(engines)
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            outs = engines[name].generate(prompts, params, use_tqdm=False)
            if variants[name] is not None:
                # Inside the timed region: the reduction of everything this batch staged
                # (it is deferred to the next snapshot) and the RPC that brings it back.
                mv.snapshot(engines[name], reset=False)
            dt = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(n / dt)
    snap = mv.snapshot(
        engines["full"], reset=False
    )  # totals since the start (snapshots do not reset)
    med = {n: statistics.median(v) for n, v in rates.items()}
    print(
        f"\nQwen3-MoE shape: {args.layers} layers, E={args.experts}, K={args.top_k}, hidden "
        f"{args.hidden}; batch {args.batch} x {args.max_tokens} new tokens; "
        f"{'eager' if args.eager else 'torch.compile (CPU default)'}; {args.reps} repetitions"
    )
    print(
        "\n| variant | tokens/s (median) | min | max | ratio of medians off / variant "
        "| median of per-repetition ratios |"
    )
    print("|---|---|---|---|---|---|")
    for n in names:
        paired = statistics.median(a / b for a, b in zip(rates["off"], rates[n], strict=True))
        print(
            f"| {n} | {med[n]:.1f} | {min(rates[n]):.1f} | {max(rates[n]):.1f} | "
            f"{med['off'] / med[n]:.3f} | {paired:.3f} |"
        )
    print(
        "\nper repetition (tokens/s): "
        + "; ".join(f"{n}: " + ", ".join(f"{r:.0f}" for r in rates[n]) for n in names)
    )
    print(
        f"\nmonitored tokens (full engine, all repetitions + warm-up): "
        f"{snap.snapshot.total_tokens} routed, {snap.tokens['forwards']} forwards"
    )


if __name__ == "__main__":
    main()
