"""The ``moescope`` command.

Subcommands (each one ``add_<name>_parser`` + ``_run_<name>`` pair registered in
:data:`SUBCOMMANDS`, so new ones plug in without touching the others):

- ``moescope params CONFIG.json [--embeddings both|head|none] [--seq-len S] [--json]``:
  total and active parameters (and FLOPs per token with ``--seq-len``) of an MoE model
  described by a transformers ``config.json`` or a moescope reference file (its
  ``config`` key). Nothing is downloaded; the model is built on the meta device.
- ``moescope analyze --model DIR_OR_CONFIG --data INPUT [--data INPUT2 ...] [--neurons]
  ... --out DIR``: stream data through an MoE model and write ``report.html``,
  ``summary.json`` and PNG figures (:mod:`moescope.analysis.run` computes,
  :mod:`moescope.report.analysis_report` renders; docs/analyze.md).
- ``moescope compare A B [--out DIR] [--labels a,b]``: one report from two analyze outputs
  or two training JSONL logs (:mod:`moescope.analysis.compare`).

The flags live here; the library takes option dataclasses. Bad input prints one line on
stderr (what is wrong, what to do) and exits with status 2; Ctrl-C exits with status 130
after one line (``analyze`` first writes a partial report).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from moescope import __version__
from moescope._optional import MissingExtraError
from moescope.errors import UnsupportedModelError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C

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
        f"embeddings convention: {report.embeddings} ({_CONVENTION_HELP[report.embeddings]}){tied}"
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
    if report.active_path != "token":
        lines.append(
            f"active = the path of a {report.active_path}: the "
            + ", ".join(t for t in report.towers if t != "text")
            + " tower(s) are in the total, not active for text"
        )
        lines.append("towers: " + ", ".join(f"{t} {_fmt_int(n)}" for t, n in report.towers.items()))
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
    # why: the cost stack imports torch; `moescope --help` and other subcommands stay light
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


def _size(text: str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB`` or a plain number (argparse type)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad size {text!r}; use bytes or a suffix, e.g. 512M or 2G"
        ) from None


def add_analyze_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``moescope analyze`` (every flag is here; the library takes options)."""
    p = sub.add_parser(
        "analyze",
        help="stream text through an MoE model and write an HTML report",
        description=(
            "Stream one or more inputs through a Mixture-of-Experts model (a transformers "
            "model directory, a saved TinyMoELM, or a config.json with random weights), monitor "
            "its routing (and neurons with --neurons) and write report.html (self-contained), "
            "summary.json and the figures as PNG into --out. Nothing is downloaded unless "
            "--allow-download. Under torchrun the data is split across processes and rank 0 "
            "writes. Ctrl-C stops after the current forward and writes a partial report "
            "(exit status 130); a second Ctrl-C, or one while the model loads, aborts "
            "without one."
        ),
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        metavar="DIR_OR_CONFIG",
        help="transformers model directory (config.json + safetensors), a saved "
        "TinyMoELM, or a config.json (random weights, labelled so)",
    )
    g.add_argument(
        "--dtype",
        default=None,
        metavar="DTYPE",
        help="load the weights in this dtype (float32, bfloat16, float16; default: "
        "the checkpoint's)",
    )
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="spread a model too large for one device (e.g. auto; needs accelerate)",
    )
    g.add_argument(
        "--allow-download",
        action="store_true",
        help="allow fetching --model from the Hugging Face hub (off: local files only)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="load even when the model looks too large for the memory available",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own modelling code (review it first)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of random weights from a config")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="INPUT",
        help="text, JSONL, parquet, a datasets folder, or - for stdin; repeat for "
        "several domains (label = file stem)",
    )
    g.add_argument(
        "--text-field",
        default=None,
        metavar="KEY",
        help="JSONL key / column holding the text (default: text)",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="stop after N tokens of each input",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="B",
        help="rows per forward (default 8; capped by --memory-budget)",
    )
    g.add_argument(
        "--seq-len",
        type=int,
        default=256,
        metavar="S",
        help="tokens per row (default 256; also the context of the FLOP count)",
    )
    g.add_argument(
        "--memory-budget",
        type=_size,
        default=None,
        metavar="SIZE",
        help="activation memory one forward may use, e.g. 512M, 4G (default 2G; on "
        "CUDA a quarter of the free memory); larger batches run in several forwards",
    )
    g = p.add_argument_group("analyses")
    g.add_argument(
        "--neurons",
        action="store_true",
        help="also count activated neurons inside the chosen experts",
    )
    g.add_argument(
        "--threshold",
        default=None,
        metavar="SPEC",
        help="neuron threshold: TAU, absolute:TAU, magnitude:ALPHA (default 0.1), "
        "relative:P or calibrated:SPARSITY (needs --neurons)",
    )
    g.add_argument(
        "--embeddings",
        choices=("both", "head", "none"),
        default="both",
        help="which embedding matrices count as active parameters (default both)",
    )
    g.add_argument(
        "--coact-layer",
        default=None,
        metavar="LAYER",
        help="layer index or path for the co-activation plot (default: first)",
    )
    g.add_argument(
        "--token-layer",
        default=None,
        metavar="LAYER",
        help="layer index or path for the coloured tokens (default: middle)",
    )
    g.add_argument(
        "--compare",
        default=None,
        metavar="DIR",
        help="a second checkpoint: router agreement with --model on the first input",
    )
    g.add_argument(
        "--record-tokens",
        type=int,
        default=20000,
        metavar="N",
        help="tokens per input kept for the token-level analyses (default 20000)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty directory that is not a moescope output",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar on stderr"
    )
    return p


class _Interrupted(Exception):
    """Ctrl-C: the CLI prints one line and exits with status 130."""


class _StopOnSigint:
    """Ctrl-C during ``moescope analyze``. Before the first forward (loading the model):
    abort at once. Once streaming (armed by the first :meth:`poll`): the first Ctrl-C asks
    the run to stop after the current forward (it then writes a partial report), a second
    one aborts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self.armed = False
        self._old: Any = None

    def poll(self) -> bool:
        """The run's ``should_stop``: called before each forward."""
        self.armed = True
        return self.requested

    def __enter__(self) -> _StopOnSigint:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.requested or not self.armed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nmoescope: stopping after the current forward to write a partial report "
            "(Ctrl-C again to abort without one)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _options(args: argparse.Namespace, cls: Any) -> Any:
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _run_analyze(args: argparse.Namespace) -> int:
    import os

    # why: moescope.analysis imports torch; only `analyze` pays for it
    from moescope.analysis import AnalyzeError, AnalyzeOptions, analyze, write_outputs

    try:
        opts = _options(args, AnalyzeOptions)
        with _StopOnSigint() as stop:
            try:
                result = analyze(opts, should_stop=stop.poll)
            except KeyboardInterrupt:
                raise _Interrupted("interrupted; no report written") from None
        report = write_outputs(result)
    except (AnalyzeError, UnsupportedModelError) as err:
        raise CLIError(str(err)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {report}")
    if result.partial:
        raise _Interrupted(
            f"interrupted after {result.total_tokens:,} tokens; partial report: {report}"
        )
    return EXIT_OK


# --------------------------------------------------------------------------- compare


def add_compare_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``moescope compare``."""
    p = sub.add_parser(
        "compare",
        help="one report comparing two analyses or two training logs",
        description=(
            "Compare two runs in one self-contained HTML report: A and B are each a "
            "`moescope analyze` output directory (its summary.json) or a training log "
            "written by moescope's JSONL sink (moe_detailed.jsonl, or a folder holding "
            "one). The report shows per-layer expert usage side by side, the Jensen-Shannon "
            "divergence between the two usage distributions per layer, balance metrics, "
            "the alerts of both and, for training logs, the metrics over steps."
        ),
    )
    p.add_argument("a", metavar="A", help="analyze output dir / summary.json, or a JSONL log")
    p.add_argument("b", metavar="B", help="the same for the second run")
    p.add_argument(
        "--out",
        default="moescope-compare",
        metavar="DIR",
        help="output directory (default moescope-compare)",
    )
    p.add_argument(
        "--labels",
        default=None,
        metavar="A,B",
        help="names of the two runs in the report (default: from their paths)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty directory that is not a moescope output",
    )
    return p


def _run_compare(args: argparse.Namespace) -> int:
    # why: moescope.analysis imports torch; only `compare` pays for it
    from moescope.analysis import AnalyzeError
    from moescope.analysis.compare import compare_sources, write_comparison

    labels = None
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
            raise CLIError(
                f"--labels needs two different names separated by a comma, got {args.labels!r}"
            )
    try:
        cmp = compare_sources(args.a, args.b, labels=labels)
        report = write_comparison(cmp, args.out, overwrite=args.overwrite)
    except AnalyzeError as err:
        raise CLIError(str(err)) from None
    print(f"report: {report}")
    return EXIT_OK


# --------------------------------------------------------------------------- main


def _elsewhere(module: str, add: str, run: str) -> tuple[Any, Any]:
    """A subcommand whose parser and runner live in ``module``, imported when used (so
    that ``moescope`` starts without torch and a Ctrl-C at any time is one line)."""

    def add_parser(sub: Any) -> argparse.ArgumentParser:
        return getattr(importlib.import_module(module), add)(sub)

    def run_cmd(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), run)(args))

    return add_parser, run_cmd


SUBCOMMANDS: dict[
    str,
    tuple[Callable[[Any], argparse.ArgumentParser], Callable[[argparse.Namespace], int]],
] = {
    "params": (add_params_parser, _run_params),
    "analyze": (add_analyze_parser, _run_analyze),
    "compare": (add_compare_parser, _run_compare),
    "plan-ep": _elsewhere("moescope.placement", "add_plan_ep_parser", "run_plan_ep"),
    "watch": _elsewhere("moescope.watch", "add_watch_parser", "run_watch"),
    "prune": _elsewhere("moescope.prune.cli", "register", "run"),
}
"""name -> (add_parser(subparsers), run(args) -> exit status). Add new subcommands here."""


def build_parser() -> argparse.ArgumentParser:
    """The ``moescope`` argument parser with every registered subcommand."""
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
    words = list(sys.argv[1:] if argv is None else argv)
    # Named before anything heavy is imported, so a Ctrl-C during imports is one line too.
    name = "moescope" + next((f" {w}" for w in words if w in SUBCOMMANDS), "")
    try:
        # why: cost.params imports torch; imported inside the try so a Ctrl-C here is one line
        from moescope.cost.params import CostConfigError

        args = build_parser().parse_args(words)
        name = f"moescope {args._name}"
        try:
            return int(args._run(args))
        except (CLIError, CostConfigError, MissingExtraError) as err:
            msg = " ".join(str(err).split())  # one line, whatever the exception held
            print(f"{name}: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        except _Interrupted as err:
            print(f"{name}: {err}", file=sys.stderr)
            return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # one line, not a traceback, whenever it comes
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
