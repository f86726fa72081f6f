"""The `moescope analyze` / `compare` flags (cli.py owns them): parsed into the library's
option dataclass, sizes with suffixes, the subcommand table."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from moescope import cli
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
    opts = cli._options(args, AnalyzeOptions)
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
    assert cli._size(text) == value


def test_bad_size_is_a_usage_error() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. 512M"):
        cli._size("lots")


def test_subcommands_table_keeps_every_entry() -> None:
    assert {"params", "analyze", "compare"} <= set(cli.SUBCOMMANDS)
