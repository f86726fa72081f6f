"""Run a test's worker in ``world`` forked gloo processes and report their failures.

A worker is ``worker(rank, world, port, *extra, failures)``: it initialises the process
group on ``127.0.0.1:port`` and puts a message into ``failures`` (then re-raises) when it
fails, so a broken rank is reported instead of hanging the others.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable[..., Any], world: int, *extra: Any, timeout: float = 240) -> None:
    """Start ``world`` ranks, wait for them, and fail the test on any error or hang."""
    # fork avoids re-importing torch in every rank (seconds each on a loaded machine).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    failures = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, world, port, *extra, failures)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not alive, f"ranks hung: {errors}"
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
