"""The command line is derived from the options dataclasses: every field is a flag with its
help, parsed back into the dataclass; sizes with suffixes; typos get a suggestion; the
subcommand table; `plan-ep` takes run folders like `watch` and `compare`."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from conftest import routed_tiny_lm
from moescope import cli
from moescope._cliopts import option_help, options_from_args, parse_size
from moescope.analysis import AnalyzeOptions


def test_every_analyze_flag_reaches_the_options(tmp_path) -> None:
    data = tmp_path / "d.txt"
    data.write_text("x")
    args = cli.build_parser().parse_args(
        [
            "analyze",
            "--model",
            "m",
            "--data",
            str(data),
            "--data",
            "-",
            "--out",
            str(tmp_path / "o"),
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--device-map",
            "auto",
            "--allow-download",
            "--force",
            "--text-field",
            "body",
            "--overwrite",
            "--memory-budget",
            "512M",
            "--batch-size",
            "3",
            "--seq-len",
            "7",
            "--no-progress",
        ]
    )
    opts = options_from_args(args, AnalyzeOptions)
    assert opts.data == [str(data), "-"]
    assert (opts.dtype, opts.device, opts.device_map, opts.text_field) == (
        "bfloat16",
        "cpu",
        "auto",
        "body",
    )
    assert opts.allow_download and opts.force and opts.overwrite and not opts.progress
    assert opts.memory_budget == 512 * 2**20 and (opts.batch_size, opts.seq_len) == (3, 7)
    # Every option of the dataclass has a flag (none silently unreachable from the CLI).
    dests = {
        a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["analyze"]._actions
    }
    assert {f.name for f in dataclasses.fields(AnalyzeOptions)} <= dests


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1048576", 2**20),
        ("512M", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("64k", 64 * 2**10),
    ],
)
def test_size_suffixes(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_bad_size_is_a_usage_error() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. 512M"):
        parse_size("lots")


def test_subcommands_table_keeps_every_entry() -> None:
    assert {"params", "analyze", "compare", "agree"} <= set(cli.SUBCOMMANDS)


def _sub(name: str) -> argparse.ArgumentParser:
    return cli.build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize(
    ("command", "cls"),
    [
        ("analyze", "moescope.analysis.run:AnalyzeOptions"),
        ("compare", "moescope.analysis.compare:CompareOptions"),
        ("params", "moescope.cost.options:ParamsOptions"),
        ("watch", "moescope.watch:WatchOptions"),
        ("agree", "moescope.analysis.agree:AgreeOptions"),
    ],
)
def test_flags_and_help_come_from_the_option_fields(command: str, cls: str) -> None:
    import importlib

    module, _, name = cls.partition(":")
    options = getattr(importlib.import_module(module), name)
    actions = {a.dest: a for a in _sub(command)._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(options)}
    assert set(actions) == set(fields), set(actions) ^ set(fields)
    for fname, f in fields.items():
        action = actions[fname]
        assert action.help is not None and action.help.startswith(option_help(options, fname))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if action.option_strings:
            assert action.required == required, fname
            if not required and f.default not in (None, False, True):
                assert action.default == f.default, fname
                assert f"(default: {f.default})" in action.help, fname


def test_out_defaults_agree_between_analyze_and_compare(tmp_path) -> None:
    data = tmp_path / "d.txt"
    data.write_text("x")
    a = options_from_args(
        cli.build_parser().parse_args(["analyze", "--model", "m", "--data", str(data)]),
        AnalyzeOptions,
    )
    assert a.out == "moescope-analysis"
    c = cli.build_parser().parse_args(["compare", "x", "y"])
    assert c.out == "moescope-compare"


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["analyze", "--nuerons"], "unknown option --nuerons; did you mean --neurons?"),
        (["analyze", "--model", "m", "--seq_len", "4"], "did you mean --seq-len?"),
        (["params", "c.json", "--jsn"], "unknown option --jsn; did you mean --json?"),
        (["analyse", "--model", "m"], "unknown command 'analyse'; did you mean analyze?"),
        (["compare", "a", "b", "--lables", "x,y"], "did you mean --labels?"),
    ],
)
def test_typos_get_one_line_with_a_suggestion(argv, want, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1, err


def test_analyze_help_names_hub_ids_and_dtype_auto(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hub id" in text and "--allow-download" in text
    assert "auto (the dtype the config names" in text


def test_plan_ep_takes_a_run_folder(tmp_path, capsys) -> None:
    """`plan-ep RUN_DIR` reads the run's JSONL log (moe_logs/moe_detailed.jsonl) as
    `watch` and `compare` do, and gives the plan of the file itself."""
    import json

    from moescope.monitor import MoEMonitor
    from moescope.sinks import JsonlSink, LogEvent

    model = routed_tiny_lm(seed=0)
    log = tmp_path / "run" / "moe_logs" / "moe_detailed.jsonl"
    with MoEMonitor(model) as mon, torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
        with JsonlSink(log) as sink:
            sink.write(LogEvent(step=1, snapshot=mon.snapshot(step=1, reset=True)))
    assert cli.main(["plan-ep", str(log), "--gpus", "2", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert cli.main(["plan-ep", str(tmp_path / "run"), "--gpus", "2", "--json"]) == 0
    from_dir = json.loads(capsys.readouterr().out)
    assert from_dir == from_file and from_file["layers"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["plan-ep", str(empty), "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds neither summary.json" in err and len(err.strip().splitlines()) == 1
