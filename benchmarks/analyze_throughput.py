"""Throughput and peak memory of `moescope analyze` (issue 6).

Question: what does the analysis cost over the bare model forward on the same data, with
and without neuron statistics, and does its memory stay flat when the data grows 10x?

Model: a demo-sized TinyMoELM checkpoint (4 layers, H=128, 16 experts of I=64, top-2,
saved with ``save_pretrained``), random weights (routing cost does not depend on training).
Data: the Python standard library's ``.py`` sources concatenated into one file of
``--tokens`` bytes (byte-level tokens), and a second file 10x as long.

Each measurement runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own:

- ``bare``: the same batches (``iter_batches`` of the same stream) through the model under
  ``no_grad``, nothing attached;
- ``analyze``: ``moescope.analysis.analyze()`` (monitor + token recorder + streaming),
  without and with ``--neurons``; the report writing (plots, HTML) is timed apart since it
  does not grow with the data.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/analyze_throughput.py [--tokens 200000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(out: Path) -> Path:
    from moescope.nn.hf import TinyMoEForCausalLM, TinyMoEHFConfig
    from moescope.nn.model import TinyMoEConfig

    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=64,
        num_experts=16,
        top_k=2,
        max_seq_len=512,
    )
    model = TinyMoEForCausalLM(TinyMoEHFConfig.from_tiny_config(cfg))
    model.save_pretrained(out)
    return out


def make_data(path: Path, n_bytes: int) -> Path:
    from moescope.data import stdlib_bytes

    data = stdlib_bytes(max_bytes=n_bytes)
    while len(data) < n_bytes:  # repeat when the stdlib is shorter than asked
        data += data[: n_bytes - len(data)]
    path.write_bytes(data[:n_bytes])
    return path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(mode: str, ckpt: str, data: str, threads: int, batch: int, seq: int) -> dict:
    """One measurement in this process (called in a subprocess by main)."""
    torch.set_num_threads(threads)
    from moescope.analysis import AnalyzeOptions, analyze, iter_batches, write_outputs
    from moescope.analysis.loading import load_model
    from moescope.analysis.sources import open_data

    if mode == "bare":
        loaded = load_model(ckpt, device="cpu")
        model = loaded.model
        n = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for ids in iter_batches(open_data(data).token_chunks(), batch, seq):
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                n += ids.numel()
        secs = time.perf_counter() - t0
        return {"mode": mode, "tokens": n, "seconds": secs, "peak_rss_mb": _peak_rss_mb()}
    opts = AnalyzeOptions(
        model=ckpt,
        data=[data],
        out=tempfile.mkdtemp(),
        neurons=mode == "neurons",
        batch_size=batch,
        seq_len=seq,
        device="cpu",
        progress=False,
    )
    t0 = time.perf_counter()
    result = analyze(opts)
    secs = time.perf_counter() - t0
    rss_stream = _peak_rss_mb()
    t1 = time.perf_counter()
    write_outputs(result)
    return {
        "mode": mode,
        "tokens": int(result.snapshot.total_tokens),
        "seconds": secs,
        "report_seconds": time.perf_counter() - t1,
        "peak_rss_mb": rss_stream,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="bytes of the small data file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CKPT", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, ckpt, data = args.child
        print(json.dumps(run_one(mode, ckpt, data, args.threads, args.batch_size, args.seq_len)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    ckpt = make_checkpoint(tmp / "ckpt")
    sizes = {"1x": args.tokens, "10x": 10 * args.tokens}
    files = {k: make_data(tmp / f"data_{k}.py", n) for k, n in sizes.items()}
    rows = []
    for size, data in files.items():
        for mode in ("bare", "routing", "neurons"):
            cmd = [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
                "--child",
                mode,
                str(ckpt),
                str(data),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["size"] = size
            rows.append(r)
            print(
                f"{size:>4} {mode:>8}: {r['tokens'] / r['seconds']:,.0f} tok/s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n`torch {torch.__version__}, threads {args.threads}, batch {args.batch_size} x "
        f"{args.seq_len}, TinyMoELM 4 layers H=128 E=16 K=2`\n"
    )
    print("| data | mode | tokens | tok/s | vs bare | peak RSS (MB) | report writing (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    bare = {r["size"]: r["tokens"] / r["seconds"] for r in rows if r["mode"] == "bare"}
    for r in rows:
        tps = r["tokens"] / r["seconds"]
        rep = f"{r['report_seconds']:.1f}" if "report_seconds" in r else "-"
        print(
            f"| {r['size']} | {r['mode']} | {r['tokens']:,} | {tps:,.0f} | "
            f"{tps / bare[r['size']]:.2f}x | {r['peak_rss_mb']:.0f} | {rep} |"
        )
    # analyze() has a fixed cost (model load, parameter/FLOP accounting on the meta device,
    # recorder set-up); the streaming rate is the slope between the two data sizes.
    print("\n| mode | fixed cost (s) | streaming tok/s | vs bare | peak RSS 10x / 1x |")
    print("|---|---:|---:|---:|---:|")
    by = {(r["mode"], r["size"]): r for r in rows}
    slope_bare = None
    for mode in ("bare", "routing", "neurons"):
        a, b = by[(mode, "1x")], by[(mode, "10x")]
        per_tok = (b["seconds"] - a["seconds"]) / (b["tokens"] - a["tokens"])
        fixed = a["seconds"] - per_tok * a["tokens"]
        slope_bare = slope_bare or 1.0 / per_tok
        print(
            f"| {mode} | {fixed:.1f} | {1.0 / per_tok:,.0f} | {(1.0 / per_tok) / slope_bare:.2f}x | "
            f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f} |"
        )


if __name__ == "__main__":
    main()
