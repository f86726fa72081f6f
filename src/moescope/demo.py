"""``python -m moescope.demo --out demo-output``: train a tiny MoE LM on stdlib bytes.

A plain PyTorch loop trains :class:`~moescope.nn.model.TinyMoELM` (4 layers, H=128, 8
experts, top-2 by default) on byte-level windows of the Python standard library's sources,
and every ``--log-every`` steps prints the loss and each MoE layer's expert usage (the share
of (token, slot) assignments each expert received since the last print). Expert counts
are accumulated on the device and read once per print. At the end it evaluates on the
held-out split and saves the model to ``<out>/checkpoint`` (``save_pretrained`` when
transformers is installed, else ``model.pt`` + ``config.json``) and a summary to
``<out>/metrics.json``.

Sized to finish in about two minutes on two CPU cores (it uses one thread by default).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from moescope.data import ByteDataset, stdlib_bytes
from moescope.nn.losses import expert_counts
from moescope.nn.model import TinyMoEConfig, TinyMoELM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moescope.demo",
        description="Train a tiny MoE byte-level LM on the Python standard library and "
        "print expert usage as it trains.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--log-every", type=int, default=50, help="print every N steps")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="stdlib bytes to read")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default 1: on a shared 2-core machine a second "
        "thread made steps several times slower; pass 2 on an idle machine)",
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "log_every", "max_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def demo_config(seq_len: int) -> TinyMoEConfig:
    """The demo model: 4 layers, H=128, 4 heads, 8 experts of I=128, top-2, MoE everywhere."""
    return TinyMoEConfig(
        vocab_size=256,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=128,
        num_experts=8,
        top_k=2,
        moe_every=1,
        max_seq_len=max(seq_len, 256),
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def format_usage(name: str, fractions: list[float]) -> str:
    """One line: layer name, per-expert percentages, max/mean imbalance."""
    mean = sum(fractions) / len(fractions)
    imbalance = max(fractions) / mean if mean > 0 else float("nan")
    cells = " ".join(f"{100 * f:4.1f}" for f in fractions)
    return f"    {name:<18} usage% [{cells}]  max/mean {imbalance:4.2f}"


@torch.no_grad()
def evaluate(
    model: TinyMoELM, ds: ByteDataset, batch_size: int, max_batches: int = 8
) -> float:
    """Mean next-byte cross entropy (nats) over up to ``max_batches`` eval batches."""
    model.eval()
    n = min(len(ds), batch_size * max_batches)
    total = torch.zeros(())
    batches = 0
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        ids = torch.stack([it["input_ids"] for it in items])
        total += model(ids, labels=ids).lm_loss
        batches += 1
    model.train()
    return float(total / max(1, batches))


def save_checkpoint(model: TinyMoELM, path: Path) -> str:
    """Save as a transformers checkpoint when possible; returns the format used."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        from moescope.nn.hf import TinyMoEForCausalLM
    except ImportError:
        torch.save(model.state_dict(), path / "model.pt")
        (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        return "torch state_dict (install moescope[hf] for save_pretrained)"
    TinyMoEForCausalLM.from_tiny(model).save_pretrained(path)
    return "transformers save_pretrained (safetensors)"


@torch.no_grad()
def sample_text(
    model: TinyMoELM,
    prompt: bytes,
    new_bytes: int,
    temperature: float = 0.7,
    generator: torch.Generator | None = None,
) -> bytes:
    """Sample a continuation of ``prompt`` at ``temperature`` (no KV cache; the model is tiny)."""
    model.eval()
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    for _ in range(new_bytes):
        probs = torch.softmax(model(ids).logits[:, -1].float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    model.train()
    return bytes(ids[0, len(prompt) :].tolist())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    data = stdlib_bytes(args.max_bytes)
    train_ds = ByteDataset(data, args.seq_len, "train")
    eval_ds = ByteDataset(data, args.seq_len, "eval")
    config = demo_config(args.seq_len)
    model = TinyMoELM(config)
    moe = model.moe_layers()
    names = list(moe)
    print(
        f"moescope demo: {len(data):,} stdlib bytes ({len(train_ds)} train / {len(eval_ds)} "
        f"eval blocks of {args.seq_len}), {model.num_parameters():,} parameters, "
        f"{len(names)} MoE layers x {config.num_experts} experts, top-{config.top_k}, "
        f"{threads} thread(s)",
        flush=True,
    )

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, min(30, args.steps // 10))
    counts = torch.zeros(len(names), config.num_experts)
    window_loss = torch.zeros(())
    window_steps = 0
    history: list[dict[str, float]] = []
    model.train()
    t_train = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        batch = train_ds.sample_batch(args.batch_size, gen)
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        with torch.no_grad():
            window_loss += out.lm_loss.detach()
            window_steps += 1
            mask = batch["attention_mask"].reshape(-1).bool()
            for li, ro in enumerate(out.router_outputs):
                counts[li] += expert_counts(ro.topk_index, config.num_experts, mask, ro.kept())

        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            # The one host transfer per print.
            lm = float(window_loss / window_steps)
            fractions = (counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).tolist()
            elapsed = time.perf_counter() - t_train
            print(
                f"step {step + 1:4d}/{args.steps}  lm_loss {lm:.3f} ({lm / math.log(2):.2f} "
                f"bits/byte)  aux {float(out.aux_loss.detach()):.3f}  z {float(out.z_loss.detach()):.2f}  "
                f"{elapsed:5.1f}s",
                flush=True,
            )
            for name, frac in zip(names, fractions, strict=True):
                print(format_usage(name, frac), flush=True)
            history.append({"step": step + 1, "lm_loss": lm, "seconds": elapsed})
            counts.zero_()
            window_loss.zero_()
            window_steps = 0

    train_seconds = time.perf_counter() - t_train
    eval_loss = evaluate(model, eval_ds, args.batch_size)
    print(f"eval lm_loss {eval_loss:.3f} ({eval_loss / math.log(2):.2f} bits/byte)", flush=True)
    prompt = b"    def __init__(self"
    sample = sample_text(model, prompt, 64, generator=torch.Generator().manual_seed(args.seed))
    print(f"sample: {(prompt + sample).decode('utf-8', errors='replace')!r}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    fmt = save_checkpoint(model, args.out / "checkpoint")
    total_seconds = time.perf_counter() - t0
    summary = {
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": threads,
        "parameters": model.num_parameters(),
        "config": config.to_dict(),
        "history": history,
        "eval_lm_loss": eval_loss,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
    }
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(
        f"saved {args.out / 'checkpoint'} ({fmt}) and {args.out / 'metrics.json'}; "
        f"total {total_seconds:.1f}s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
