"""What the capture engine costs: aten ops per MoE layer call, decode and training overhead.

Four questions, each answered by ratios measured in one run:

1. ``ops``: aten ops the monitor adds per MoE layer call (a ``TorchDispatchMode`` counter:
   on a GPU every non-view op is a kernel launch), amortised over a ``generate()`` call
   with the snapshot that follows it included; default, ``neurons=True``,
   ``counts_only=True`` and the graph-safe path (``graph_safe=True``, with and without
   ``counts_only``). With ``--before REF`` the same measurement runs on the package
   of git revision REF (a temporary worktree, in a subprocess) for the before/after table.
2. ``decode``: wall time of ``generate()`` with and without the monitor (batch 1 and 16,
   hidden 256 and 1024), variants interleaved in every repetition.
3. ``train``: an eager training step (forward, backward, AdamW) with and without the
   monitor, snapshot every 10 steps, the two alternating step by step.
4. ``compiled``: the same step under ``torch.compile`` (inductor) with and without the
   monitor attached before compiling.

Model: transformers' Qwen3-MoE with the issue's shape: 8 layers, E = 64 routed experts,
K = 8, hidden 256 or 1024, expert intermediate size 256 (Qwen3-30B-A3B: 768 at hidden
2048), random weights (no download).

Usage::

    python benchmarks/capture_overhead.py ops --before aac86c8
    python benchmarks/capture_overhead.py decode --reps 7
    python benchmarks/capture_overhead.py train compiled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def build_model(hidden: int = 256, layers: int = 8, experts: int = 64, top_k: int = 8) -> Any:
    """A random Qwen3-MoE causal LM of the given shape, eval mode, float32, CPU."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def prompts(batch: int, length: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch, 2):
        mask[b, : b % length] = 0  # left padding on every other row
    return ids, mask


def generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )


def make_monitor(model: Any, variant: str) -> Any:
    from moescope import MoEMonitor

    if variant == "default":
        return MoEMonitor(model)
    if variant == "neurons":
        return MoEMonitor(model, neurons=True)
    if variant == "counts_only":
        return MoEMonitor(model, counts_only=True)
    if variant == "graph_safe":
        return MoEMonitor(model, graph_safe=True)
    if variant == "graph_safe_counts_only":
        return MoEMonitor(model, graph_safe=True, counts_only=True)
    raise ValueError(variant)


# --------------------------------------------------------------------------- 1. ops


def count_ops(fn: Callable[[], Any]) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


def ops_rows(variants: Sequence[str], batches: Sequence[int], new: int) -> list[dict[str, Any]]:
    """Ops added per MoE layer call: (monitored generate + snapshot - plain) / calls."""
    import warnings

    model = build_model()
    layers = model.config.num_hidden_layers
    rows = []
    for batch in batches:
        ids, mask = prompts(batch)
        generate(model, ids, mask, 2)  # warm-up (lazy inits)
        base = count_ops(lambda: generate(model, ids, mask, new))  # noqa: B023
        for variant in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    mon = make_monitor(model, variant)
                except TypeError:
                    continue  # an older moescope without this option
            generate(model, ids, mask, 2)
            mon.snapshot()

            def run() -> None:
                generate(model, ids, mask, new)  # noqa: B023
                mon.snapshot()  # noqa: B023

            total = count_ops(run)
            mon.detach()
            calls = new * layers  # prefill + (new - 1) decode forwards, each over L layers
            rows.append(
                {
                    "variant": variant,
                    "batch": batch,
                    "ops_per_call": (total - base) / calls,
                    "base_ops_per_forward": base / new,
                }
            )
    return rows


def ops_in_worktree(ref: str, variants: Sequence[str], batches: Sequence[int], new: int) -> Any:
    """Run :func:`ops_rows` on the package of git revision ``ref`` (subprocess)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
            check=True,
            capture_output=True,
        )
        try:
            code = (
                f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                "import capture_overhead as c; "
                f"print('ROWS', json.dumps(c.ops_rows({list(variants)!r}, {list(batches)!r}, {new})))"
            )
            env = {**os.environ, "PYTHONPATH": str(tree / "src")}
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
            )
    line = next(x for x in out.stdout.splitlines() if x.startswith("ROWS "))
    return json.loads(line[5:])


# --------------------------------------------------------------------------- timing


def ratio_ci(a: np.ndarray, b: np.ndarray, boot: int = 2000) -> tuple[float, float, float]:
    """median(a) / median(b) with a bootstrap 95 % interval (a = monitored, b = plain)."""
    rng = np.random.default_rng(0)
    est = float(np.median(a) / np.median(b))
    draws = [
        np.median(rng.choice(a, a.size)) / np.median(rng.choice(b, b.size)) for _ in range(boot)
    ]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return est, float(lo), float(hi)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_rows(hiddens: Sequence[int], batches: Sequence[int], new: int, reps: int) -> list[dict]:
    """``generate()`` + snapshot per request; variants alternate inside every repetition
    (order rotated), wall and process CPU time both recorded."""
    rows = []
    for hidden in hiddens:
        model = build_model(hidden)
        for batch in batches:
            ids, mask = prompts(batch)
            variants = ["none", "default", "counts_only"]
            wall: dict[str, list[float]] = {v: [] for v in variants}
            cpu: dict[str, list[float]] = {v: [] for v in variants}
            for rep in range(reps + 1):
                order = variants[rep % 3 :] + variants[: rep % 3]
                for variant in order:
                    mon = None if variant == "none" else make_monitor(model, variant)
                    w0, c0 = time.perf_counter(), time.process_time()
                    generate(model, ids, mask, new)
                    if mon is not None:
                        mon.snapshot()
                    w, c = time.perf_counter() - w0, time.process_time() - c0
                    if mon is not None:
                        mon.detach()
                    if rep:  # the first round warms up every variant
                        wall[variant].append(w)
                        cpu[variant].append(c)
            for variant in ("default", "counts_only"):
                est, lo, hi = ratio_ci(np.array(wall[variant]), np.array(wall["none"]))
                paired = np.array(wall[variant]) / np.array(wall["none"])
                rows.append(
                    {
                        "hidden": hidden,
                        "batch": batch,
                        "variant": variant,
                        "plain_ms": 1e3 * statistics.median(wall["none"]),
                        "monitored_ms": 1e3 * statistics.median(wall[variant]),
                        "ratio": est,
                        "lo": lo,
                        "hi": hi,
                        "paired": float(np.median(paired)),
                        "cpu_ratio": statistics.median(cpu[variant])
                        / statistics.median(cpu["none"]),
                    }
                )
    return rows


def train_rows(steps: int, compiled: bool, hidden: int = 256) -> list[dict]:
    """Median step time with and without the monitor (snapshot every 10 steps); the two
    variants alternate step by step so that machine noise hits both alike."""
    ids, mask = prompts(8, length=64)
    out: dict[str, list[float]] = {"none": [], "moescope": []}
    models: dict[str, Any] = {}
    for variant in out:
        torch.manual_seed(0)
        model = build_model(hidden).train()
        mon = make_monitor(model, "default") if variant == "moescope" else None
        fwd = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        models[variant] = (fwd, opt, mon)
    warmup = 3 if compiled else 1
    order = list(models)
    for i in range(steps + warmup):
        order.reverse()  # alternate which variant runs first
        for variant in order:
            fwd, opt, mon = models[variant]
            t0 = time.perf_counter()
            loss = fwd(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mon is not None and (i + 1) % 10 == 0:
                mon.snapshot()
            if i >= warmup:
                out[variant].append(time.perf_counter() - t0)
    est, lo, hi = ratio_ci(np.array(out["moescope"]), np.array(out["none"]))
    paired = np.array(out["moescope"]) / np.array(out["none"])
    return [
        {
            "compiled": compiled,
            "steps": steps,
            "paired": float(np.median(paired)),
            "plain_ms": 1e3 * statistics.median(out["none"]),
            "monitored_ms": 1e3 * statistics.median(out["moescope"]),
            "ratio": est,
            "lo": lo,
            "hi": hi,
        }
    ]


# --------------------------------------------------------------------------- report


def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="+", choices=["ops", "decode", "train", "compiled"])
    ap.add_argument("--before", help="git revision to measure aten ops on too")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--train-steps", type=int, default=40)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "ops" in args.parts:
        variants = ["default", "neurons", "counts_only", "graph_safe", "graph_safe_counts_only"]
        after = ops_rows(variants, args.batch, args.new_tokens)
        for r in after:
            r["code"] = "this tree"
        rows = after
        if args.before:
            before = ops_in_worktree(args.before, variants, args.batch, args.new_tokens)
            for r in before:
                r["code"] = args.before
            rows = before + after
        print("\n### aten ops added per MoE layer call (generate + snapshot)\n")
        print(_table(rows, ["code", "variant", "batch", "ops_per_call", "base_ops_per_forward"]))
    if "decode" in args.parts:
        rows = decode_rows(args.hidden, args.batch, args.new_tokens, args.reps)
        print("\n### generate() decode, monitored / plain\n")
        cols = ["hidden", "batch", "variant", "plain_ms", "monitored_ms", "ratio", "lo", "hi"]
        print(_table(rows, [*cols, "paired", "cpu_ratio"]))
    for part in ("train", "compiled"):
        if part in args.parts:
            rows = train_rows(args.train_steps, compiled=part == "compiled")
            print(f"\n### {part} training step, monitored / plain\n")
            print(
                _table(
                    rows,
                    [
                        "compiled",
                        "steps",
                        "plain_ms",
                        "monitored_ms",
                        "ratio",
                        "lo",
                        "hi",
                        "paired",
                    ],
                )
            )


if __name__ == "__main__":
    main()
