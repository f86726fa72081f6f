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
from dataclasses import dataclass, field
from typing import Any

from moescope.stats.snapshot import Snapshot

__all__ = [
    "CONFIG_KEY",
    "ENV",
    "MoescopeWorkerExtension",
    "VllmSnapshot",
    "check_options",
    "options",
    "plugin",
    "snapshot",
]

#: Key of moescope's options in vLLM's ``additional_config``.
CONFIG_KEY = "moescope"
#: ``1`` (or a JSON object of options) turns monitoring on in a vLLM process tree.
ENV = "MOESCOPE_VLLM"
ENV_JSONL = "MOESCOPE_VLLM_JSONL"
ENV_PORT = "MOESCOPE_VLLM_PROMETHEUS_PORT"
ENV_INTERVAL = "MOESCOPE_VLLM_INTERVAL"
ENV_COUNTS_ONLY = "MOESCOPE_VLLM_COUNTS_ONLY"

_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "enabled": (bool,),
    "counts_only": (bool,),
    "coactivation": (bool,),
    "graph_safe": (bool,),
    "jsonl": (str,),
    "prometheus_port": (int,),
    "prometheus_host": (str,),
    "interval": (int, float),
}


def check_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Validate moescope's vLLM options (raises ValueError naming the bad key)."""
    for key, value in opts.items():
        types = _OPTION_TYPES.get(key)
        if types is None:
            raise ValueError(
                f"unknown moescope vLLM option {key!r}; known: {sorted(_OPTION_TYPES)}"
            )
        if value is not None and (
            not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        ):
            raise ValueError(
                f"moescope vLLM option {key!r} must be {'/'.join(t.__name__ for t in types)}, "
                f"got {value!r}"
            )
    port = opts.get("prometheus_port")
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"prometheus_port must be in [0, 65535] (0 = any free port), got {port}")
    interval = opts.get("interval")
    if interval is not None and interval <= 0:
        raise ValueError(f"interval must be a positive number of seconds, got {interval}")
    return dict(opts)


def options(
    *,
    counts_only: bool = False,
    coactivation: bool = True,
    jsonl: str | None = None,
    prometheus_port: int | None = None,
    prometheus_host: str = "127.0.0.1",
    interval: float = 15.0,
    graph_safe: bool = False,
) -> dict[str, Any]:
    """``additional_config`` for ``vllm.LLM(...)`` that turns monitoring on.

    Args:
        counts_only: capture expert ids only (no entropy / top-1 / aux loss); cheapest.
        coactivation: keep [E, E] co-activation counts per layer.
        jsonl: append one snapshot line per window to this file (worker side).
        prometheus_port: serve ``/metrics`` from the worker on this port (0 = any).
        prometheus_host: address the exporter binds (loopback by default).
        interval: seconds per window for the JSONL log and the exporter.
        graph_safe: accumulate every router call at once into persistent device buffers
            (what CUDA-graph replay needs). Engines that replay CUDA graphs use it
            whatever this says; True forces it elsewhere (e.g. to test it on a CPU).

    Returns:
        ``{"moescope": {...}}``: pass it as ``LLM(..., additional_config=...)`` (merge it
        into an existing ``additional_config`` dict if you have one).
    """
    opts: dict[str, Any] = {
        "enabled": True,
        "counts_only": counts_only,
        "coactivation": coactivation,
        "prometheus_host": prometheus_host,
        "interval": float(interval),
        "graph_safe": bool(graph_safe),
    }
    if jsonl is not None:
        opts["jsonl"] = str(jsonl)
    if prometheus_port is not None:
        opts["prometheus_port"] = int(prometheus_port)
    return {CONFIG_KEY: check_options(opts)}


def plugin() -> None:
    """Entry point of the ``vllm.general_plugins`` group (runs in every vLLM process)."""
    from moescope.integrations.vllm.worker import register

    register()


@dataclass
class VllmSnapshot:
    """What :func:`snapshot` returns.

    Attributes:
        snapshot: per-layer routing statistics since the last reset (layer keys are vLLM
            module paths, e.g. ``model.layers.0.mlp.experts``).
        tokens: ``scheduled_tokens`` (tokens fed through the model), ``prefix_cached_tokens``
            (prompt tokens served from the prefix cache, never routed), ``forwards``.
        ranks: the same for every reporting worker (one per pipeline-/data-parallel
            replica; tensor-parallel replicas of the same tokens are left out).
    """

    snapshot: Snapshot
    tokens: dict[str, int]
    ranks: list[tuple[Snapshot, dict[str, int]]] = field(default_factory=list)

    @property
    def served(self) -> dict[str, float]:
        """Tokens routed vs served (see ``capture.served_summary``)."""
        from moescope.integrations.vllm.capture import served_summary

        return served_summary(self.snapshot, self.tokens)


def parse_rpc(results: list[dict[str, Any]]) -> VllmSnapshot:
    """Turn the per-worker results of ``collective_rpc("moescope_snapshot")`` into a
    :class:`VllmSnapshot` (the first reporting worker's; all of them in ``ranks``)."""
    ranks = [
        (Snapshot.from_json(r["snapshot"]), {k: int(v) for k, v in r["tokens"].items()})
        for r in results
        if r.get("enabled") and r.get("reports", True)
    ]
    if not ranks:
        raise RuntimeError(
            "moescope monitoring is off in this vLLM engine: pass "
            "additional_config=moescope.integrations.vllm.options() to LLM(...) or set "
            "MOESCOPE_VLLM=1 before it starts"
        )
    return VllmSnapshot(snapshot=ranks[0][0], tokens=ranks[0][1], ranks=ranks)


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
