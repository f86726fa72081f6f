"""moescope inside vLLM: per-layer expert routing of a serving engine, counted exactly.

Turn it on (docs/vllm.md has the details):

- offline: ``LLM(model, additional_config=moescope.integrations.vllm.options())``, then
  :func:`snapshot` (``llm.collective_rpc("moescope_snapshot")`` underneath);
- ``vllm serve``: ``MOESCOPE_VLLM=1`` (plus ``MOESCOPE_VLLM_PROMETHEUS_PORT=9400`` and/or
  ``MOESCOPE_VLLM_JSONL=path``) in the server's environment, or
  ``--additional-config '{"moescope": {"prometheus_port": 9400}}'``.

The plugin (entry point ``vllm.general_plugins`` -> :func:`plugin`) loads in every vLLM
process and patches the model loader; the capture itself is installed on the worker's
model before ``torch.compile`` traces it. Importing this package needs torch only (not
vLLM, not transformers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.integrations.vllm.settings import (
    CONFIG_KEY,
    ENV,
    ENV_COUNTS_ONLY,
    ENV_INTERVAL,
    ENV_JSONL,
    ENV_PER_EXPERT,
    ENV_PORT,
    ENV_REQUEST_SUMMARIES,
    ENV_TRACE,
    VllmSettingsError,
    check_options,
    env_options,
    jsonl_path,
    options,
    parse_bool,
    preflight,
)
from moescope.stats.snapshot import Snapshot

__all__ = [
    "CONFIG_KEY",
    "ENV",
    "ENV_COUNTS_ONLY",
    "ENV_INTERVAL",
    "ENV_JSONL",
    "ENV_PER_EXPERT",
    "ENV_PORT",
    "ENV_REQUEST_SUMMARIES",
    "ENV_TRACE",
    "MoescopeWorkerExtension",
    "VllmSettingsError",
    "VllmSnapshot",
    "check_options",
    "env_options",
    "flush",
    "jsonl_path",
    "options",
    "parse_bool",
    "plugin",
    "preflight",
    "snapshot",
]


def plugin() -> None:
    """Entry point of the ``vllm.general_plugins`` group (runs in every vLLM process).

    Bad ``MOESCOPE_VLLM*`` environment variables fail here, in the first vLLM process,
    before any engine starts (:class:`VllmSettingsError`, one line)."""
    env_options()
    from moescope.integrations.vllm.worker import register

    register()


@dataclass
class VllmSnapshot:
    """What :func:`snapshot` returns.

    Attributes:
        snapshot: per-layer routing statistics since the last reset (layer keys are vLLM
            module paths, e.g. ``model.layers.0.mlp.experts``), data-parallel replicas
            added together, pipeline stages side by side.
        tokens: ``scheduled_tokens`` (tokens fed through the model), ``prefix_cached_tokens``
            (prompt tokens served from the prefix cache, never routed), ``forwards``;
            summed over data-parallel replicas.
        ranks: each reporting worker's own snapshot and counters (one per pipeline stage
            and data-parallel replica; tensor-parallel replicas of the same tokens are
            left out).
    """

    snapshot: Snapshot
    tokens: dict[str, int]
    ranks: list[tuple[Snapshot, dict[str, int]]] = field(default_factory=list)

    @property
    def served(self) -> dict[str, float]:
        """Tokens routed vs served (see ``capture.served_summary``)."""
        from moescope.integrations.vllm.capture import served_summary

        return served_summary(self.snapshot, self.tokens)


def _rank_entry(r: Mapping[str, Any]) -> tuple[Snapshot, dict[str, int]]:
    return Snapshot.from_json(r["snapshot"]), {k: int(v) for k, v in r["tokens"].items()}


def _sum_replicas(replicas: list[Mapping[str, Any]]) -> tuple[Snapshot, dict[str, int]]:
    """One pipeline stage: its data-parallel replicas added (states, then metrics)."""
    from moescope.stats.accumulator import merge_states
    from moescope.stats.snapshot import layer_stats_from_state

    if len(replicas) == 1:
        return _rank_entry(replicas[0])
    missing = [i for i, r in enumerate(replicas) if not isinstance(r.get("states"), dict)]
    if missing:
        raise RuntimeError(
            "moescope: a data-parallel replica sent no accumulator states (an older "
            "moescope in the workers?); install the same moescope in every process"
        )
    first = Snapshot.from_json(replicas[0]["snapshot"])
    layers = {}
    for name, stats in first.layers.items():
        merged: dict[str, Any] | None = None
        for r in replicas:
            state = {
                k: np.asarray(np.nan if v is None else v) for k, v in r["states"][name].items()
            }
            merged = merge_states(merged, state)
        assert merged is not None
        layers[name] = layer_stats_from_state(merged, stats.num_experts, stats.top_k)
    tokens: dict[str, int] = {}
    for r in replicas:
        for k, v in r["tokens"].items():
            tokens[k] = tokens.get(k, 0) + int(v)
    return Snapshot(step=first.step, layers=layers, time=first.time), tokens


def parse_rpc(results: list[dict[str, Any]]) -> VllmSnapshot:
    """Turn the per-worker results of ``collective_rpc("moescope_snapshot")`` into one
    :class:`VllmSnapshot`: data-parallel replicas of a pipeline stage are added (their
    accumulator states, so every metric is the one of all their tokens together),
    pipeline stages (different layers, the same tokens) are put side by side; every
    reporting worker's own result stays in ``ranks``."""
    reporting = [r for r in results if r.get("enabled") and r.get("reports", True)]
    if not reporting:
        raise RuntimeError(
            "moescope monitoring is off in this vLLM engine: pass "
            "additional_config=moescope.integrations.vllm.options() to LLM(...) or set "
            "MOESCOPE_VLLM=1 before it starts"
        )
    stages: dict[int, list[Mapping[str, Any]]] = {}
    for r in reporting:
        stages.setdefault(int(r.get("pp_rank", 0)), []).append(r)
    summed = [_sum_replicas(stages[p]) for p in sorted(stages)]
    snap = summed[0][0]
    if len(summed) > 1:
        layers = {name: s for stage, _ in summed for name, s in stage.layers.items()}
        snap = Snapshot(step=snap.step, layers=layers, time=snap.time)
    return VllmSnapshot(
        snapshot=snap, tokens=summed[0][1], ranks=[_rank_entry(r) for r in reporting]
    )


def flush(llm: Any) -> None:
    """Write what the workers hold now: every recorded request to the token trace stream
    and the request summaries (finished or not: after an offline ``generate`` the
    workers have not yet been told its requests finished), and the open window to the
    JSONL log. The same runs when the engine process exits normally."""
    llm.collective_rpc("moescope_flush")


def snapshot(llm: Any, reset: bool = False) -> VllmSnapshot:
    """Routing statistics of a monitored ``vllm.LLM`` since its start or the last reset.

    Args:
        llm: a ``vllm.LLM`` built with monitoring on.
        reset: start counting again after reading.
    """
    try:
        results = llm.collective_rpc("moescope_snapshot", args=(bool(reset),))
    except AttributeError as exc:
        raise RuntimeError(
            "the vLLM workers have no moescope_snapshot method: monitoring is off (pass "
            "additional_config=moescope.integrations.vllm.options() or set MOESCOPE_VLLM=1) "
            "or the moescope plugin was not loaded (check VLLM_PLUGINS)"
        ) from exc
    return parse_rpc([r if isinstance(r, dict) else json.loads(r) for r in results])


class MoescopeWorkerExtension:
    """``worker_extension_cls`` with moescope's RPC methods, for engines that load no
    plugins (``VLLM_PLUGINS`` set without ``moescope``): then also call
    ``moescope.integrations.vllm.worker.register()`` before building the engine in a
    process that loads the model."""

    def moescope_snapshot(self, reset: bool = False) -> dict[str, Any]:
        from moescope.integrations.vllm.worker import rpc_snapshot

        return rpc_snapshot(reset)

    def moescope_reset(self) -> None:
        from moescope.integrations.vllm.worker import rpc_snapshot

        rpc_snapshot(reset=True)
