"""Snapshots taken from another thread while forwards run lose no count."""

from __future__ import annotations

import threading

import torch

import moescope
from moescope.nn.model import TinyMoEConfig, TinyMoELM


def test_concurrent_snapshots_lose_nothing() -> None:
    torch.manual_seed(0)
    model = TinyMoELM(
        TinyMoEConfig(
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=32,
            num_experts=8,
            top_k=2,
            max_seq_len=16,
        )
    ).eval()
    ids = torch.randint(0, 256, (4, 16))
    n_forwards = 60
    mon = moescope.MoEMonitor(model, neurons=True)
    windows: list[moescope.stats.Snapshot] = []
    done = threading.Event()

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(n_forwards):
                model(ids)
        done.set()

    with mon:
        worker = threading.Thread(target=forwards)
        worker.start()
        while not done.is_set():
            windows.append(mon.snapshot(reset=True))
        worker.join()
        windows.append(mon.snapshot(reset=True))
    assert len(windows) > 2  # the snapshots really interleaved with the forwards
    for path in mon.layers:
        counted = sum(int(w.layers[path.path].usage_counts.sum()) for w in windows)
        rows = sum(int(w.layers[path.path].neuron_rows) for w in windows)
        assert counted == rows == n_forwards * ids.numel() * 2
