"""GPU check of graph-safe capture: counts under CUDA graphs, overhead, host syncs.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU (make gpu-check)
    python benchmarks/gpu_check.py --device cpu    # dry run of the same code path (no graphs)

Part 1, transformers static-cache generation compiled with
``torch.compile(mode="reduce-overhead")`` (CUDA graphs), a tiny Qwen3-MoE shape (8
layers, E = 64, K = 8), greedy decoding of the same prompts:

- ``off``: no monitor; ``graph_safe``: ``MoEMonitor(model, graph_safe=True)``;
  ``eager``: the same monitor in an uncompiled model (the reference counts).
- checks the compiled monitored run's per-layer counts equal the eager run's (same tokens:
  greedy decoding is deterministic up to kernel choice; the generated ids are compared
  first and the check says so when they differ);
- host syncs per decode step with ``torch.cuda.set_sync_debug_mode("warn")`` (warnings
  counted while decoding, snapshot excluded).

Part 2, vLLM (when importable): the same prompts through ``LLM`` with its default
CUDA-graph mode, unmonitored and monitored, and an ``enforce_eager`` monitored engine as
the reference; counts must be equal.

Prints one markdown table for benchmarks/RESULTS.md. Exit code 1 when a count check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch


def _model(device: str, layers: int = 8, experts: int = 64) -> tuple[torch.nn.Module, Any]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=experts,
        num_experts_per_tok=min(8, experts),
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model, cfg


def _generate(model: torch.nn.Module, ids: torch.Tensor, new: int, static: bool) -> torch.Tensor:
    kw: dict[str, Any] = {"max_new_tokens": new, "do_sample": False, "min_new_tokens": new}
    if static:
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_part(
    device: str, steps: int, reps: int, layers: int = 8, experts: int = 64
) -> tuple[list[list[str]], bool]:
    import moescope

    model, cfg = _model(device, layers, experts)
    ids = torch.randint(3, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows: list[list[str]] = []
    ok = True

    # Reference: eager monitored run.
    mon = moescope.MoEMonitor(model)
    ref_out = _generate(model, ids, steps, static=False)
    ref = mon.snapshot(reset=True)
    mon.detach()

    if device == "cuda":
        mode = "reduce-overhead"
        compiled = torch.compile(model.forward, mode=mode)
    else:  # the dry run checks the code path; inductor's CPU compile would take minutes
        mode = "aot_eager backend"
        compiled = torch.compile(model.forward, backend="aot_eager")
    model.forward = compiled  # type: ignore[method-assign]
    times: dict[str, list[float]] = {"off": [], "graph_safe": []}
    syncs: dict[str, float] = {}
    counts_ok = "n/a"
    for variant in ("off", "graph_safe"):
        mon = moescope.MoEMonitor(model, graph_safe=True) if variant == "graph_safe" else None
        out = _generate(model, ids, steps, static=True)  # warm-up: compile and capture
        if mon is not None:
            mon.reset()
        for _ in range(reps):
            _sync()
            t0 = time.perf_counter()
            out = _generate(model, ids, steps, static=True)
            _sync()
            times[variant].append(time.perf_counter() - t0)
        if device == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                _generate(model, ids, steps, static=True)
                torch.cuda.set_sync_debug_mode("default")
            syncs[variant] = len(caught) / steps
        if mon is not None:
            snap = mon.snapshot(reset=True)
            same_tokens = torch.equal(out.cpu(), ref_out.cpu())
            if same_tokens:
                good = all(
                    np.array_equal(
                        snap.layers[p].usage_counts, (reps + (device == "cuda")) * s.usage_counts
                    )
                    for p, s in ref.layers.items()
                )
                counts_ok = "equal" if good else "DIFFERENT"
                ok &= good
            else:
                counts_ok = "tokens differ from eager (kernel numerics); counts not compared"
            mon.detach()
    base = statistics.median(times["off"])
    for variant, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            [
                f"HF static cache, compile {mode}",
                variant,
                f"{4 * steps / med:.1f}",
                f"{med / base:.3f}",
                "-" if variant not in syncs else f"{syncs[variant]:.2f}",
                counts_ok if variant == "graph_safe" else "",
            ]
        )
    return rows, ok


def vllm_part(steps: int) -> tuple[list[list[str]], bool]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [["vLLM", "skipped: vllm not importable", "", "", "", ""]], True
    import tempfile

    from vllm import LLM, SamplingParams

    import moescope.integrations.vllm as mv

    model, _ = _model("cpu")
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        prompts = [{"prompt_token_ids": list(range(5 + i, 21 + i))} for i in range(4)]
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        results: dict[str, Any] = {}
        for name, kw in (
            ("eager (reference)", {"enforce_eager": True, "additional_config": mv.options()}),
            ("graphs, off", {}),
            ("graphs, monitored", {"additional_config": mv.options()}),
        ):
            llm = LLM(model=tmp, skip_tokenizer_init=True, gpu_memory_utilization=0.3, **kw)
            llm.generate(prompts, params)  # warm-up
            if "additional_config" in kw:
                mv.snapshot(llm, reset=True)
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            dt = time.perf_counter() - t0
            snap = mv.snapshot(llm).snapshot if "additional_config" in kw else None
            results[name] = (dt, snap)
            del llm
    ref = results["eager (reference)"][1]
    got = results["graphs, monitored"][1]
    ok = all(
        np.array_equal(got.layers[p].usage_counts, s.usage_counts) for p, s in ref.layers.items()
    )
    base = results["graphs, off"][0]
    for name, (dt, _) in results.items():
        rows.append(
            [
                "vLLM",
                name,
                f"{4 * steps / dt:.1f}",
                f"{dt / base:.3f}",
                "-",
                ("equal" if ok else "DIFFERENT") if name == "graphs, monitored" else "",
            ]
        )
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    args = ap.parse_args(argv)
    rows, ok = hf_part(args.device, args.steps, args.reps, args.layers, args.experts)
    if args.device == "cuda" and not args.no_vllm:
        more, ok2 = vllm_part(args.steps)
        rows += more
        ok &= ok2
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run, no CUDA graphs)"
    print(f"\n### gpu_check on {dev}\n")
    print("| run | variant | tokens/s | time ratio | host syncs / step | counts vs eager |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
