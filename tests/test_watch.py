"""``moescope watch``: frames from a real JSONL log of a real monitored run, and the tail
iterator on a file that appears, grows, is truncated and is replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("rich")

from moescope import create_moe_callback_for_pytorch
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.sinks import load_snapshots, read_jsonl
from moescope.watch import JsonlTail, WatchState, find_log, frame_text, usage_bar

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}
E, K = 8, 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """A real training loop on TinyMoELM with the detailed JSONL log on; entropy alerts
    forced (threshold 100 nats) so that the log carries alerts."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=16,
        num_experts=E,
        top_k=K,
        max_seq_len=32,
    )
    model = TinyMoELM(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with create_moe_callback_for_pytorch(
        model,
        log_every_n_steps=2,
        log_to_console=False,
        log_heatmap_every=None,
        save_detailed_logs=True,
        log_dir=out / "moe_logs",
        entropy_threshold=100.0,
    ) as cb:
        for _ in range(6):
            cb.on_step_begin()
            ids = torch.randint(0, 64, (3, 12), generator=gen)
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            cb.on_step_end()
        last_metrics = dict(cb.last_metrics)
    return out, last_metrics


def _watch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moescope.cli", "watch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_watch_once_frame_matches_the_snapshot(run_dir: tuple[Path, dict[str, float]]) -> None:
    out, metrics = run_dir
    log = out / "moe_logs" / "moe_detailed.jsonl"
    assert find_log(out) == log
    proc = _watch(str(out), "--once", "--width", "160")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"moescope watch {log}"
    assert lines[1].startswith("step 6 | 3 windows | ")
    snap = load_snapshots(log)[-1]
    assert any(ln.startswith("layer = model.layers.*.mlp") for ln in lines)
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["layer", "tokens"])
    for i, name in enumerate(snap.layers):
        cells = lines[header + 1 + i].split()
        c = snap.layers[name].usage_counts.astype(np.float64)  # float64 reference
        assert cells[0] == str(i)
        assert int(cells[1].replace(",", "")) == int(c.sum()) // K == 3 * 12 * 2
        assert float(cells[2]) == pytest.approx(c.max() / c.mean(), abs=5e-3)
        assert float(cells[3]) == pytest.approx(c.std() / c.mean(), abs=5e-4)
        assert float(cells[4]) == pytest.approx(metrics[f"moe/{name}/routing_entropy"], abs=5e-4)
        assert cells[5] == f"{int((c == 0).sum())}/{E}"
        bar = cells[6]
        assert len(bar) == E and bar == usage_bar(c)
        assert [ch == "·" for ch in bar] == [x == 0 for x in c]
        assert bar[int(np.argmax(c))] == "█"
    # Both layers' entropy alerts fired at every window: firing since the first one.
    alerts = lines[lines.index("alerts firing: 2") + 1 :]
    assert [a.split()[:5] for a in alerts[:2]] == [
        ["entropy_collapse", f"model.layers.{i}.mlp", "since", "step", "2"] for i in range(2)
    ]
    assert "routing entropy" in alerts[0] and "< 100.0 threshold" in alerts[0]


def test_watch_once_errors_are_one_line(tmp_path: Path) -> None:
    proc = _watch(str(tmp_path / "nothing"), "--once")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0
    assert "no JSONL log at" in proc.stderr and "save_detailed_logs=True" in proc.stderr
    bad = _watch(str(tmp_path), "--once", "--interval", "0")
    assert bad.returncode == 2 and "--interval must be > 0" in bad.stderr


def test_watch_follows_a_run_that_starts_later_and_ctrl_c_exits_0(
    run_dir: tuple[Path, dict[str, float]], tmp_path: Path
) -> None:
    src = run_dir[0] / "moe_logs" / "moe_detailed.jsonl"
    log = tmp_path / "later" / "moe_detailed.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moescope.cli", "watch", str(log), "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"waiting for {log}")
        log.parent.mkdir()
        raw = src.read_text(encoding="utf-8").splitlines(keepends=True)
        with open(log, "w", encoding="utf-8") as f:
            f.write(raw[0])
        frame = ""
        deadline = time.monotonic() + 60
        while "step 2 | 1 windows" not in frame and time.monotonic() < deadline:
            frame += proc.stdout.readline()
        assert "step 2 | 1 windows" in frame
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_tail_reads_a_growing_truncated_and_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    tail = JsonlTail(path)
    assert tail.poll() == [] and tail.path is None  # not there yet
    rec = [{"kind": "snapshot", "step": i, "x": "é" * i} for i in range(6)]
    line = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rec]
    with open(path, "wb") as f:
        f.write(line[0] + line[1][:7])  # a second line still being written
        f.flush()
        assert tail.poll() == [rec[0]]
        f.write(line[1][7:] + b"{torn\n" + line[2])
        f.flush()
        assert tail.poll() == [rec[1], rec[2]] and tail.bad_lines == 1
        assert tail.poll() == []
    # Truncated in place (a new run with the same file): read from the start again.
    with open(path, "wb") as f:
        f.write(line[3])
    assert tail.poll() == [rec[3]] and tail.restarts == 1 and tail.reset_pending
    # Replaced (rotation: a new file under the same name).
    os.replace(_write(tmp_path / "new.jsonl", line[4] + line[5]), path)
    assert tail.poll() == [rec[4], rec[5]] and tail.restarts == 2
    path.unlink()
    assert tail.poll() == []
    tail.close()


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_tail_history_starts_near_the_end(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    recs = [{"kind": "snapshot", "step": i, "pad": "x" * 5000} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    assert [r["step"] for r in JsonlTail(path, history=3).poll()] == [37, 38, 39]
    assert len(JsonlTail(path).poll()) == 40
    assert [r["step"] for r in JsonlTail(path, history=100).poll()] == list(range(40))
    # A last line still being written: the history counts complete lines only, and the
    # partial line comes once complete.
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "snapshot", "st')
    tail = JsonlTail(path, history=2)
    assert [r["step"] for r in tail.poll()] == [38, 39]
    with open(path, "a", encoding="utf-8") as f:
        f.write('ep": 40}\n')
    assert [r["step"] for r in tail.poll()] == [40]
    tail.close()


def test_state_resets_and_groups_alerts(run_dir: tuple[Path, dict[str, float]]) -> None:
    log = run_dir[0] / "moe_logs" / "moe_detailed.jsonl"
    recs = read_jsonl(log)
    state = WatchState()
    for r in recs:
        state.feed(r)
    assert state.windows == 3 and state.last is recs[-1]
    assert [(s.rule, s.since, s.windows) for s in state.tracker.active] == [
        ("entropy_collapse", 2, 3),
        ("entropy_collapse", 2, 3),
    ]
    trend = state.trend["model.layers.0.mlp"]
    assert list(trend) == pytest.approx(
        [r["snapshot"]["layers"]["model.layers.0.mlp"]["max_over_mean"] for r in recs]
    )
    text = frame_text(state, "x", width=160)
    assert "alerts firing: 2" in text
    state.reset()
    assert state.snapshot() is None and "no snapshot line yet" in frame_text(state, "x")


def test_usage_bar_pools_many_experts() -> None:
    counts = np.zeros(256)
    counts[:128] = 10
    counts[3] = 40
    bar = usage_bar(counts, width=64)
    assert len(bar) == 64  # 4 experts per cell
    assert bar[0] == "█" and set(bar[1:32]) == {"▂"} and set(bar[32:]) == {"·"}
    assert usage_bar([0, 0]) == "··" and usage_bar([]) == ""


@pytest.mark.parametrize("width", [80, 64])
def test_frame_fits_narrow_terminals_without_cutting_numbers(
    run_dir: tuple[Path, dict[str, float]], width: int
) -> None:
    """At 80 columns (and less) every number is whole: the rows equal the wide frame's
    text cells, no line is longer than the width and nothing is elided."""
    log = run_dir[0] / "moe_logs" / "moe_detailed.jsonl"
    state = WatchState()
    for r in read_jsonl(log):
        state.feed(r)
    wide = frame_text(state, "run", width=200, now=0.0).splitlines()
    narrow = frame_text(state, "run", width=width, now=0.0).splitlines()
    assert all(len(ln) <= width for ln in narrow), narrow
    assert not any("…" in ln for ln in narrow), narrow

    def rows(lines: list[str]) -> list[list[str]]:
        i = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["layer", "tokens"])
        return [ln.split()[:6] for ln in lines[i + 1 : i + 3]]

    assert rows(narrow) == rows(wide)
    snap = load_snapshots(log)[-1]
    for cells, s in zip(rows(narrow), snap.layers.values(), strict=True):
        assert cells[1] == f"{s.num_tokens:,}" and cells[2] == f"{s.max_over_mean:.2f}"
