"""``moescope prune``: its flags (:func:`register`) and its runner (:func:`run`).

The library takes :class:`~moescope.prune.run.PruneOptions`; this module only maps flags
onto it. Bad input prints one line on stderr and exits with status 2 (the ``moescope``
entry point's contract).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run"]


def _fractions(text: str) -> list[float]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --levels {text!r}; use fractions separated by commas, e.g. 0.75,0.5,0.25"
        ) from None


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prune`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "prune",
        help="remove the least important experts, measured on your data",
        description=(
            "Measure every expert's importance on --data (routing frequency, router-weight "
            "mass, REAP saliency = gate weight x norm of the expert's output), measure the "
            "held-out loss at several keep levels, and write a checkpoint with N experts per "
            "layer in the model's own format (weights, router rows and config fields) plus "
            "an HTML report of the trade-off (docs/prune.md)."
        ),
    )
    p.add_argument("--model", required=True, help="model directory or cached hub id")
    p.add_argument("--data", action="append", required=True, help="calibration input (repeatable)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep", type=int, metavar="N", help="experts to keep per layer")
    how.add_argument(
        "--keep-fraction", type=float, metavar="F", help="fraction of the experts to keep"
    )
    how.add_argument(
        "--drop-unused",
        action="store_true",
        help="remove the experts no --data token was routed to (as many per layer as the "
        "layer with the fewest unused has)",
    )
    p.add_argument(
        "--by",
        choices=("saliency", "frequency", "weight"),
        default="saliency",
        help="what decides which experts stay: REAP saliency (default), routing frequency "
        "or router-weight mass",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where the pruned checkpoint goes")
    p.add_argument(
        "--eval-data",
        action="append",
        default=[],
        help="held-out input for the trade-off (default: every --holdout-th batch of --data)",
    )
    p.add_argument(
        "--levels",
        type=_fractions,
        default=[0.875, 0.75, 0.625, 0.5, 0.375, 0.25],
        help="keep fractions of the trade-off curve, comma-separated ('none': no curve)",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="calibration tokens at most")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens at most")
    p.add_argument("--holdout", type=int, default=5, help="hold out one batch in this many")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--neurons", action="store_true", help="also track neuron statistics")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16")
    p.add_argument("--text-field", default=None, help="JSONL / parquet text field")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-download", action="store_true")
    p.add_argument("--force", action="store_true", help="skip the memory check")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``moescope prune``; returns the exit status."""
    from dataclasses import fields

    # why: the pruning stack imports torch; only `prune` pays for it
    from moescope.analysis import AnalyzeError
    from moescope.errors import UnsupportedModelError
    from moescope.prune.run import REPORT_DIR, PruneOptions, prune
    from moescope.prune.surgery import PruneError

    names = {f.name for f in fields(PruneOptions)}
    try:
        opts = PruneOptions(**{k: v for k, v in vars(args).items() if k in names})
        result = prune(opts)
    except (AnalyzeError, PruneError, UnsupportedModelError) as err:
        # Printed here (not re-raised as moescope.cli.CLIError): under `python -m
        # moescope.cli` that module is __main__, whose CLIError is another class.
        print(f"moescope prune: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    saved = (
        None
        if result.checkpoint_bytes_before is None or result.checkpoint_bytes_after is None
        else result.checkpoint_bytes_before - result.checkpoint_bytes_after
    )
    print(
        f"pruned {result.num_experts} -> {result.kept} experts per layer by {result.by}: "
        f"{result.params_before:,} -> {result.params_after:,} parameters"
        + (f", checkpoint {saved:,} bytes smaller" if saved is not None else "")
    )
    print(f"checkpoint: {result.out}")
    print(f"report: {result.out}/{REPORT_DIR}/report.html")
    return 0
