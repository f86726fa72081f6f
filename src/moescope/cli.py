"""The ``moescope`` command.

Each subcommand is one entry of :data:`SUBCOMMANDS`: ``name -> (add_parser(subparsers),
run(args) -> exit status)``. Commands whose settings are an options dataclass
(``analyze``: :class:`~moescope.analysis.AnalyzeOptions`, ``compare``:
:class:`~moescope.analysis.compare.CompareOptions`, ``params``:
:class:`~moescope.cost.options.ParamsOptions`, ``watch``:
:class:`~moescope.watch.WatchOptions`) are registered with :func:`options_command`: their
flags, defaults and help come from the dataclass fields (:mod:`moescope._cliopts`), and
``run`` receives the options object. A module adds its own subcommand with one line::

    SUBCOMMANDS["prune"] = lazy_command("moescope.prune", "add_prune_parser", "run_prune")

- ``moescope params CONFIG``: total and active parameters (FLOPs per token with
  ``--seq-len``); nothing is downloaded, the model is built on the meta device.
- ``moescope analyze --model M --data INPUT [...]``: an HTML report of the routing on
  data (docs/analyze.md).
- ``moescope compare A B``: two analyses or two training logs side by side.
- ``moescope agree A B``: routing agreement of two traces / models on the same tokens
  (docs/agree.md).
- ``moescope plan-ep``, ``moescope watch``: expert placement, a live view of a run.

Both ``analyze`` and ``compare`` write into ``--out`` (default ``moescope-analysis`` /
``moescope-compare``), refusing a non-empty folder that is not a moescope output unless
``--overwrite``. Bad input prints one line on stderr (what is wrong, what to do; an
unknown flag gets a "did you mean" suggestion) and exits with status 2; Ctrl-C exits with
status 130 after one line (``analyze`` first writes a partial report).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from moescope import __version__
from moescope._cliopts import add_options, options_from_args
from moescope._optional import MissingExtraError
from moescope.errors import UnsupportedModelError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


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


def _params_table(report: Any, flops: Any | None) -> str:
    from moescope.cost.options import CONVENTION_HELP

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
        f"embeddings convention: {report.embeddings} ({CONVENTION_HELP[report.embeddings]}){tied}"
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


def _run_params(opts: Any) -> int:
    # why: the cost stack imports torch; `moescope --help` and other subcommands stay light
    from moescope.cost.flops import flops_from_anatomy
    from moescope.cost.params import analyze_model, build_meta_model, report_from_anatomy

    _quiet_transformers()
    model = build_meta_model(opts.config)
    anatomy = analyze_model(model, top_k=opts.top_k)
    report = report_from_anatomy(anatomy, opts.embeddings)
    flops = None
    if opts.seq_len is not None:
        attention = opts.attention or "causal"
        flops = flops_from_anatomy(anatomy, opts.seq_len, opts.embeddings, attention)
    if opts.json:
        out = report.to_dict()
        if flops is not None:
            out["flops"] = flops.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(_params_table(report, flops))
    return EXIT_OK


# --------------------------------------------------------------------------- analyze


_ANALYZE_DESCRIPTION = (
    "Stream one or more inputs through a Mixture-of-Experts model (a transformers model "
    "directory, a saved TinyMoELM, a config.json with random weights, or a hub id from the "
    "local Hugging Face cache), monitor its routing (and neurons with --neurons) and write "
    "report.html (self-contained), summary.json and the figures as PNG into --out. Nothing "
    "is downloaded unless --allow-download. Under torchrun the data is split across "
    "processes and rank 0 writes. Ctrl-C stops after the current forward and writes a "
    "partial report (exit status 130); a second Ctrl-C, or one while the model loads, "
    "aborts without one."
)


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


def _run_analyze(opts: Any) -> int:
    import os

    # why: moescope.analysis imports torch; only `analyze` pays for it
    from moescope.analysis import analyze, write_outputs

    try:
        with _StopOnSigint() as stop:
            try:
                result = analyze(opts, should_stop=stop.poll)
            except KeyboardInterrupt:
                raise _Interrupted("interrupted; no report written") from None
        report = write_outputs(result)
    except UnsupportedModelError as err:
        raise CLIError(str(err)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {report}")
    if result.partial:
        raise _Interrupted(
            f"interrupted after {result.total_tokens:,} tokens; partial report: {report}"
        )
    return EXIT_OK


# --------------------------------------------------------------------------- compare


_COMPARE_DESCRIPTION = (
    "Compare two runs in one self-contained HTML report: A and B are each a `moescope "
    "analyze` output directory (its summary.json) or a training log written by moescope's "
    "JSONL sink (moe_detailed.jsonl, or a run folder holding one). The report shows "
    "per-layer expert usage side by side, the Jensen-Shannon divergence between the two "
    "usage distributions per layer, balance metrics, the alerts of both and, for training "
    "logs, the metrics over steps."
)


def _run_compare(opts: Any) -> int:
    # why: moescope.analysis imports torch; only `compare` pays for it
    from moescope.analysis.compare import run_compare

    print(f"report: {run_compare(opts)}")
    return EXIT_OK


_AGREE_DESCRIPTION = (
    "Measure how often two sources route the same tokens to the same experts: A and B are "
    "each a routing trace (.jsonl/.npz written by moescope.trace, the vLLM plugin or a "
    "training-side TraceRecorder) or a model (directory, config.json, cached hub id) that "
    "replays the other side's token ids (or --tokens). Sequences are aligned by seq_id and "
    "must have equal token ids. Per MoE layer (matched by ordinal): exact top-k set match, "
    "mean Jaccard, top-1 agreement, weight-weighted overlap, agreement by position, the "
    "experts and tokens that disagree most. Writes report.html, summary.json and "
    "agreement.jsonl into --out and prints the verdict."
)


def _run_agree(opts: Any) -> int:
    # why: moescope.analysis imports torch; only `agree` pays for it
    from moescope.analysis.agree import run_agree

    result, report = run_agree(opts)
    print(result.verdict)
    print(f"report: {report}")
    return EXIT_OK


def _run_watch(opts: Any) -> int:
    from moescope.watch import run_watch

    return run_watch(opts)


def _run_plan_ep(args: argparse.Namespace) -> int:
    from moescope._rundir import resolve_run_input
    from moescope.placement import run_plan_ep

    # A run folder, as watch and compare take it: its summary.json or its JSONL log.
    args.input = str(resolve_run_input(args.input))
    return int(run_plan_ep(args))


# --------------------------------------------------------------------------- main


AddParser = Callable[[Any], argparse.ArgumentParser]
RunCommand = Callable[[Any], int]


def lazy_command(module: str, add: str, run: str) -> tuple[AddParser, RunCommand]:
    """A subcommand whose ``add(subparsers)`` and ``run(args)`` live in ``module``,
    imported only when the parser is built or the command runs."""

    def add_parser(sub: Any) -> argparse.ArgumentParser:
        return getattr(importlib.import_module(module), add)(sub)

    def run_cmd(args: Any) -> int:
        return int(getattr(importlib.import_module(module), run)(args))

    return add_parser, run_cmd


def options_command(
    name: str, options: str, run: RunCommand, *, help: str, description: str
) -> tuple[AddParser, RunCommand]:
    """A subcommand whose flags are the fields of the options dataclass ``options``
    (``"module:Class"``, imported when used); ``run`` gets the options object."""

    def cls() -> type:
        module, _, attr = options.partition(":")
        return getattr(importlib.import_module(module), attr)

    def add_parser(sub: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        add_options(p, cls())
        return p

    def run_cmd(args: argparse.Namespace) -> int:
        return run(options_from_args(args, cls()))

    return add_parser, run_cmd


SUBCOMMANDS: dict[str, tuple[AddParser, RunCommand]] = {
    "params": options_command(
        "params",
        "moescope.cost.options:ParamsOptions",
        _run_params,
        help="total / active parameters (and FLOPs per token) of an MoE config",
        description="Count the total and per-token active parameters of a Mixture-of-Experts "
        "model from its transformers config.json or model directory (or a moescope "
        "reference file with a 'config' key). The model is built on the meta device: no "
        "weights, no memory, nothing downloaded.",
    ),
    "analyze": options_command(
        "analyze",
        "moescope.analysis.run:AnalyzeOptions",
        _run_analyze,
        help="stream text through an MoE model and write an HTML report",
        description=_ANALYZE_DESCRIPTION,
    ),
    "compare": options_command(
        "compare",
        "moescope.analysis.compare:CompareOptions",
        _run_compare,
        help="one report comparing two analyses or two training logs",
        description=_COMPARE_DESCRIPTION,
    ),
    "agree": options_command(
        "agree",
        "moescope.analysis.agree:AgreeOptions",
        _run_agree,
        help="routing agreement of two engines / dtypes / checkpoints on the same tokens",
        description=_AGREE_DESCRIPTION,
    ),
    "plan-ep": (
        lazy_command("moescope.placement", "add_plan_ep_parser", "run_plan_ep")[0],
        _run_plan_ep,
    ),
    "watch": options_command(
        "watch",
        "moescope.watch:WatchOptions",
        _run_watch,
        help="live terminal view of a training run's MoE routing (tails its JSONL log)",
        description="Tail the detailed JSONL log of a monitored training run "
        "(save_detailed_logs=True: <log_dir>/moe_detailed.jsonl) and show per-layer usage, "
        "balance and the alerts firing now. Works from another shell or over ssh.",
    ),
    "prune": lazy_command("moescope.prune.cli", "register", "run"),
}
"""name -> (add_parser(subparsers), run(args) -> exit status); one line adds a command."""


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
        sp.set_defaults(_run=run, _name=name, _parser=sp)
    return parser


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _check_flags(name: str, words: list[str], parser: argparse.ArgumentParser) -> None:
    """An unknown ``--flag`` of command ``name``, before argparse reports anything else
    (a missing required option would hide the typo behind the usage)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        name
    ]
    known = list(sub._option_string_actions)
    for w in words:
        if w == "--":
            return
        if not w.startswith("--") or w in ("--",):
            continue
        flag = w.split("=", 1)[0]
        if flag in known or sum(k.startswith(flag) for k in known) == 1:
            continue  # exact, or an abbreviation argparse accepts
        raise CLIError(
            f"unknown option {flag}{_suggest(flag, known)} "
            f"(moescope {name} --help lists the options)"
        )


def _parse(words: list[str]) -> argparse.Namespace:
    """Parse ``words``; an unknown command or flag is one line with a suggestion."""
    first = next((w for w in words if not w.startswith("-")), None)
    if first is not None and first not in SUBCOMMANDS and words and words[0] == first:
        raise CLIError(
            f"unknown command {first!r}{_suggest(first, list(SUBCOMMANDS))} "
            f"(commands: {', '.join(SUBCOMMANDS)}; moescope --help lists them)"
        )
    parser = build_parser()
    if first is not None and first in SUBCOMMANDS:
        _check_flags(first, words[words.index(first) + 1 :], parser)
    args, extras = parser.parse_known_args(words)
    if extras:
        flags = list(args._parser._option_string_actions)
        bad = next((w for w in extras if w.startswith("-")), extras[0])
        if bad.startswith("-"):
            flag = bad.split("=", 1)[0]
            raise CLIError(
                f"unknown option {flag}{_suggest(flag, flags)} "
                f"(moescope {args._name} --help lists the options)"
            )
        raise CLIError(
            f"unexpected argument {bad!r} (moescope {args._name} --help shows the usage)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moescope`` console script; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    # Named before anything heavy is imported, so a Ctrl-C during imports is one line too.
    name = "moescope" + next((f" {w}" for w in words if w in SUBCOMMANDS), "")
    try:
        # why: cost.params imports torch; imported inside the try so a Ctrl-C here is one line
        from moescope._rundir import RunDirError
        from moescope.analysis.errors import AnalyzeError
        from moescope.cost.params import CostConfigError

        try:
            args = _parse(words)
            name = f"moescope {args._name}"
            return int(args._run(args))
        except (CLIError, CostConfigError, MissingExtraError, AnalyzeError, RunDirError) as err:
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
