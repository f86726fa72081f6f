"""The ``moescope`` command.

Subcommands (each one ``add_<name>_parser`` + ``_run_<name>`` pair registered in
:data:`SUBCOMMANDS`, so new ones plug in without touching the others):

- ``moescope params CONFIG.json [--embeddings both|head|none] [--seq-len S] [--json]``:
  total and active parameters (and FLOPs per token with ``--seq-len``) of an MoE model
  described by a transformers ``config.json`` or a moescope reference file (its
  ``config`` key). Nothing is downloaded; the model is built on the meta device.
- ``moescope analyze --model DIR_OR_CONFIG --data FILE [--data FILE2 ...] [--neurons]
  [--threshold SPEC] [--max-tokens N] [--batch-size B] [--seq-len S] --out DIR``: stream
  text through an MoE model and write ``report.html``, ``summary.json`` and PNG figures
  (see :mod:`moescope.report.analyze`).

Bad input prints one line on stderr (what is wrong, what to do) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2

_CONVENTION_HELP = {
    "both": "input embedding and output head counted",
    "head": "output head counted, input embedding not",
    "none": "neither embedding counted",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_short(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:g}"


# --------------------------------------------------------------------------- params


def add_params_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``moescope params``."""
    p = sub.add_parser(
        "params",
        help="total / active parameters (and FLOPs per token) of an MoE config",
        description=(
            "Count the total and per-token active parameters of a Mixture-of-Experts model "
            "from its transformers config.json (or a moescope reference file with a "
            "'config' key). The model is built on the meta device: no weights, no memory."
        ),
    )
    p.add_argument("config", help="path to config.json (or a reference file with a 'config' key)")
    p.add_argument(
        "--embeddings",
        choices=("both", "head", "none"),
        default="both",
        help="which embedding matrices count as active: "
        + "; ".join(f"{k}: {v}" for k, v in _CONVENTION_HELP.items())
        + " (default: both)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="S",
        help="also report theoretical forward FLOPs per token at context length S",
    )
    p.add_argument(
        "--attention",
        choices=("causal", "full"),
        default="causal",
        help="attention-score FLOPs: mean keys over a causal sequence, or S keys per token "
        "(Chinchilla; one decoding step at context S). Only with --seq-len.",
    )
    p.add_argument("--top-k", type=int, default=None, help="override experts per token K")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _params_table(report: Any, flops: Any | None) -> str:
    lines: list[str] = []
    head = f"model_type: {report.model_type}"
    if report.num_moe_layers:
        e = report.num_experts if report.num_experts is not None else "varies"
        k = report.top_k if report.top_k is not None else "varies"
        head += f" | {report.num_moe_layers} MoE layers, E={e}, K={k}"
        if report.routed_expert_params_per_expert is not None:
            head += f", {_fmt_int(report.routed_expert_params_per_expert)} params per routed expert"
    lines.append(head)
    tied = " (tied embedding/head matrix, counted once)" if report.tied_embeddings else ""
    lines.append(
        f"embeddings convention: {report.embeddings} "
        f"({_CONVENTION_HELP[report.embeddings]}){tied}"
    )
    lines.append("")
    w = 22
    lines.append(f"{'category':<16}{'total':>{w}}{'active':>{w}}")
    for key, total in report.breakdown.items():
        active = report.active_breakdown[key]
        lines.append(f"{key:<16}{_fmt_int(total):>{w}}{_fmt_int(active):>{w}}")
    lines.append("-" * (16 + 2 * w))
    lines.append(
        f"{'total':<16}{_fmt_int(report.total_params):>{w}}{_fmt_int(report.active_params):>{w}}"
    )
    lines.append(
        f"{'':<16}{_fmt_short(report.total_params):>{w}}{_fmt_short(report.active_params):>{w}}"
    )
    lines.append(f"activation ratio: {report.activation_ratio:.2%}")
    if flops is not None:
        lines.append("")
        lines.append(
            f"forward FLOPs per token at seq_len={flops.seq_len} ({flops.attention} attention): "
            f"{_fmt_short(flops.flops_per_token)}"
        )
        lines.append(f"  matmul (2 x active matmul params): {_fmt_int(flops.matmul_flops)}")
        lines.append(
            f"  attention scores (QK^T, AV), {flops.num_attention_layers} layers: "
            f"{flops.attention_flops:,.0f}"
        )
    return "\n".join(lines)


def _quiet_transformers() -> None:
    # Building on the meta device triggers transformers' runtime advice (RoPE, token ids)
    # that is irrelevant to counting and would bury the one-line output contract.
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()


def _run_params(args: argparse.Namespace) -> int:
    from moescope.cost.flops import flops_from_anatomy
    from moescope.cost.params import analyze_model, build_meta_model, report_from_anatomy

    if args.seq_len is not None and args.seq_len <= 0:
        raise CLIError(f"--seq-len must be a positive integer, got {args.seq_len}")
    if args.top_k is not None and args.top_k <= 0:
        raise CLIError(f"--top-k must be a positive integer, got {args.top_k}")
    _quiet_transformers()
    model = build_meta_model(args.config)
    anatomy = analyze_model(model, top_k=args.top_k)
    report = report_from_anatomy(anatomy, args.embeddings)
    flops = None
    if args.seq_len is not None:
        flops = flops_from_anatomy(anatomy, args.seq_len, args.embeddings, args.attention)
    if args.json:
        out = report.to_dict()
        if flops is not None:
            out["flops"] = flops.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(_params_table(report, flops))
    return EXIT_OK


# --------------------------------------------------------------------------- analyze


def add_analyze_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``moescope analyze``."""
    from moescope.report.analyze import add_arguments

    p = sub.add_parser(
        "analyze",
        help="stream text through an MoE model and write an HTML report",
        description=(
            "Stream one or more text files through a Mixture-of-Experts model (a transformers "
            "model directory, a saved TinyMoELM, or a config.json with random weights), monitor "
            "its routing (and neurons with --neurons) and write report.html (self-contained), "
            "summary.json and the figures as PNG into --out. Nothing is downloaded. Under "
            "torchrun the data is split across processes and rank 0 writes."
        ),
    )
    add_arguments(p)
    return p


def _run_analyze(args: argparse.Namespace) -> int:
    from moescope.errors import UnsupportedModelError
    from moescope.report.analyze import AnalyzeError, run_analyze

    try:
        report = run_analyze(args)
    except (AnalyzeError, UnsupportedModelError) as err:
        raise CLIError(str(err)) from None
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {report}")
    return EXIT_OK


# --------------------------------------------------------------------------- main

SUBCOMMANDS: dict[
    str,
    tuple[Callable[[Any], argparse.ArgumentParser], Callable[[argparse.Namespace], int]],
] = {
    "params": (add_params_parser, _run_params),
    "analyze": (add_analyze_parser, _run_analyze),
}
"""name -> (add_parser(subparsers), run(args) -> exit status). Add new subcommands here."""


def build_parser() -> argparse.ArgumentParser:
    """The ``moescope`` argument parser with every registered subcommand."""
    from moescope import __version__

    parser = argparse.ArgumentParser(
        prog="moescope",
        description="See what a Mixture-of-Experts model really does.",
    )
    parser.add_argument("--version", action="version", version=f"moescope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add, run) in SUBCOMMANDS.items():
        sp = add(sub)
        sp.set_defaults(_run=run, _name=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moescope`` console script; returns the exit status."""
    from moescope._optional import MissingExtraError
    from moescope.cost.params import CostConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except (CLIError, CostConfigError, MissingExtraError) as err:
        msg = " ".join(str(err).split())  # one line, whatever the exception held
        print(f"moescope {args._name}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
