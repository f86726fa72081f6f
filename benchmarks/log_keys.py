"""What one log step sends to loggers at DeepSeek-V3 scale, before and after the key budget.

Model: ``moescope.nn.TinyMoELM`` with DeepSeek-V3's MoE shape, 61 MoE layers, E = 256,
K = 8 (hidden 32, expert width 8: the key count does not depend on the widths). Two train
windows, each one forward of a 4 x 64 batch ended by the plain-loop callback, with a logger that records what it receives and the detailed JSONL on. Counted: flat keys the
logger got per log step, and bytes of the JSONL lines (the full record: the first line
with the whole co-activation matrix, later lines with its top pairs), for
``per_layer="auto"`` (the default: model-level keys, percentiles across layers and the 4
worst layers above 16 layers) and ``per_layer=True`` (every layer, the old default).

    python benchmarks/log_keys.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from moescope import create_moe_callback_for_pytorch
from moescope.nn.model import TinyMoEConfig, TinyMoELM


class _Recorder:
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))


def measure(per_layer: object, layers: int, experts: int, top_k: int) -> tuple[int, int]:
    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=256, hidden_size=32, num_layers=layers, num_heads=2,
                        intermediate_size=8, num_experts=experts, top_k=top_k)  # fmt: skip
    model = TinyMoELM(cfg)
    rec = _Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        cb = create_moe_callback_for_pytorch(
            model, 1, rec, log_to_console=False, log_heatmap_every=None,
            save_detailed_logs=True, log_dir=tmp, per_layer=per_layer,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):  # the first line holds the full co-activation, later ones top pairs
            with torch.no_grad():
                model(torch.randint(0, 256, (4, 64), generator=gen))
            cb.on_step_end()
        cb.cleanup()
        lines = (Path(tmp) / "moe_detailed.jsonl").read_bytes().splitlines()
    return len(rec.rows[-1]), len(lines[0]), len(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    a = ap.parse_args()
    print(f"L={a.layers} E={a.experts} K={a.top_k}")
    print(
        "| per_layer | keys per log step | JSONL line, first (full co-activation) | JSONL line, later |"
    )
    print("|---|---:|---:|---:|")
    for mode in ("auto", True):
        keys, first, later = measure(mode, a.layers, a.experts, a.top_k)
        print(f"| {mode!r} | {keys:,} | {first:,} B | {later:,} B |")


if __name__ == "__main__":
    main()
