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
import math
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.stats.snapshot import Snapshot

__all__ = [
    "CONFIG_KEY",
    "ENV",
    "MoescopeWorkerExtension",
    "VllmSettingsError",
    "VllmSnapshot",
    "check_options",
    "env_options",
    "options",
    "parse_bool",
    "plugin",
    "preflight",
    "snapshot",
]

#: Key of moescope's options in vLLM's ``additional_config``.
CONFIG_KEY = "moescope"
#: ``1`` (or a JSON object of options) turns monitoring on in a vLLM process tree; flags
#: accept 1/0, true/false, yes/no, on/off (any case).
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

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class VllmSettingsError(ValueError):
    """A moescope vLLM setting (environment variable or ``additional_config`` option) that
    cannot be used; the message is one line naming the setting and the fix."""


def parse_bool(name: str, raw: str) -> bool:
    """An environment flag: ``1/0``, ``true/false``, ``yes/no``, ``on/off`` (any case).

    Raises:
        VllmSettingsError: naming ``name`` for any other spelling.
    """
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise VllmSettingsError(
        f"{name}={raw!r} is not a boolean: set 1/0, true/false, yes/no or on/off"
    )


def env_options(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The options set by ``MOESCOPE_VLLM*`` environment variables, validated, or None
    when ``MOESCOPE_VLLM`` is unset or false (the other variables are then ignored).

    Raises:
        VllmSettingsError: one line naming the variable and what to set instead.
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV, "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        try:
            opts = json.loads(raw)
        except ValueError as err:
            raise VllmSettingsError(
                f"{ENV} is not valid JSON ({err}); set {ENV}=1 or a JSON object of options "
                'such as {"counts_only": true}'
            ) from None
        if not isinstance(opts, dict):
            raise VllmSettingsError(f"{ENV} must be 1/0 or a JSON object of options")
        try:
            check_options(opts)
        except ValueError as err:
            raise VllmSettingsError(f"{ENV}: {err}") from None
    elif parse_bool(ENV, raw):
        opts = {}
    else:
        return None
    if env.get(ENV_JSONL, "").strip():
        opts.setdefault("jsonl", env[ENV_JSONL].strip())
    port = env.get(ENV_PORT, "").strip()
    if port:
        try:
            value = int(port)
        except ValueError:
            value = -1
        if not 0 <= value <= 65535:
            raise VllmSettingsError(
                f"{ENV_PORT}={port!r} is not a port number: set an integer in 0..65535 "
                "(0 = any free port) or unset it"
            )
        opts.setdefault("prometheus_port", value)
    interval = env.get(ENV_INTERVAL, "").strip()
    if interval:
        try:
            seconds = float(interval)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise VllmSettingsError(
                f"{ENV_INTERVAL}={interval!r} is not a positive number of seconds: set e.g. "
                f"{ENV_INTERVAL}=15 or unset it"
            )
        opts.setdefault("interval", seconds)
    counts_only = env.get(ENV_COUNTS_ONLY, "").strip()
    if counts_only:
        opts.setdefault("counts_only", parse_bool(ENV_COUNTS_ONLY, counts_only))
    return opts


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
    if interval is not None and not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval must be a positive number of seconds, got {interval}")
    return dict(opts)


def _setting(key: str, from_env: bool) -> str:
    names = {"jsonl": ENV_JSONL, "prometheus_port": ENV_PORT}
    if from_env and key in names:
        return names[key]
    return f"additional_config['{CONFIG_KEY}']['{key}']"


def jsonl_path(path: str, index: int) -> str:
    """The JSONL file of reporting worker ``index`` (0: ``path`` itself; i > 0: a ``.i``
    suffix before the extension, one file per pipeline stage / data-parallel replica)."""
    base, ext = os.path.splitext(str(path))
    return f"{base}.{index}{ext}" if index else str(path)


def preflight(
    opts: Mapping[str, Any],
    replicas: int = 1,
    from_env: Iterable[str] = (),
    indices: Iterable[int] | None = None,
) -> None:
    """Check, before a model loads, that the outputs asked for can be opened: the JSONL
    file(s) can be appended to and the Prometheus port(s) are free on their host.

    Args:
        opts: validated options (:func:`check_options`).
        replicas: reporting workers (pipeline stages x data-parallel replicas); replica i
            writes :func:`jsonl_path` (path, i) and listens on ``port + i``.
        from_env: option keys that came from environment variables (named in errors).
        indices: check only these replicas (a worker checks its own); default all.

    Raises:
        VllmSettingsError: one line naming the setting and the fix.
    """
    env_keys = set(from_env)
    which = list(range(max(1, replicas)) if indices is None else indices)
    path = opts.get("jsonl")
    if path:
        for i in which:
            target = Path(jsonl_path(str(path), i))
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "a", encoding="utf-8"):
                    pass
            except OSError as err:
                raise VllmSettingsError(
                    f"moescope: cannot write the JSONL log {target} set by "
                    f"{_setting('jsonl', 'jsonl' in env_keys)} ({err.strerror or err}); "
                    "choose a writable file path"
                ) from None
    port = opts.get("prometheus_port")
    if port:  # 0 = any free port: nothing to check
        host = str(opts.get("prometheus_host", "127.0.0.1"))
        for i in which:
            try:
                with socket.socket(
                    socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
                ) as s:
                    # Same option as the exporter's HTTP server: only a live listener blocks.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, int(port) + i))
            except OSError as err:
                raise VllmSettingsError(
                    f"moescope: cannot serve Prometheus metrics on {host}:{int(port) + i} set "
                    f"by {_setting('prometheus_port', 'prometheus_port' in env_keys)} "
                    f"({err.strerror or err}); pick a free port, or 0 for any free port"
                ) from None


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
