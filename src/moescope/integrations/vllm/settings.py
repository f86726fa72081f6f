"""moescope's vLLM settings: option names and types, the environment switches, and the
checks that run before any weights load (one line naming the setting and the fix).

Imported by the package (the public :func:`options`) and by the worker glue; needs
neither vLLM nor torch.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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
    "VllmSettingsError",
    "check_options",
    "env_options",
    "jsonl_path",
    "options",
    "parse_bool",
    "preflight",
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
ENV_TRACE = "MOESCOPE_VLLM_TRACE"
ENV_REQUEST_SUMMARIES = "MOESCOPE_VLLM_REQUEST_SUMMARIES"
ENV_PER_EXPERT = "MOESCOPE_VLLM_PROMETHEUS_PER_EXPERT"

_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "enabled": (bool,),
    "counts_only": (bool,),
    "coactivation": (bool,),
    "graph_safe": (bool,),
    "jsonl": (str,),
    "prometheus_port": (int,),
    "prometheus_host": (str,),
    "interval": (int, float),
    "trace": (str,),
    "trace_max_sequences": (int,),
    "trace_max_bytes": (int,),
    "request_summaries": (int,),
    "prometheus_per_expert": (bool,),
    "prometheus_top_experts": (int,),
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
    if env.get(ENV_TRACE, "").strip():
        opts.setdefault("trace", env[ENV_TRACE].strip())
    summaries = env.get(ENV_REQUEST_SUMMARIES, "").strip()
    if summaries:
        try:
            count = int(summaries)
        except ValueError:
            count = -1
        if count < 0:
            raise VllmSettingsError(
                f"{ENV_REQUEST_SUMMARIES}={summaries!r} is not a count: set the most request "
                "summary lines per window (e.g. 100; 0 = none) or unset it"
            )
        opts.setdefault("request_summaries", count)
    per_expert = env.get(ENV_PER_EXPERT, "").strip()
    if per_expert:
        opts.setdefault("prometheus_per_expert", parse_bool(ENV_PER_EXPERT, per_expert))
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
    for key in ("trace_max_sequences", "trace_max_bytes"):
        if opts.get(key) is not None and opts[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {opts[key]}")
    for key in ("request_summaries", "prometheus_top_experts"):
        if opts.get(key) is not None and opts[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {opts[key]}")
    trace = opts.get("trace")
    if trace and not str(trace).endswith(".jsonl"):
        raise ValueError(
            f"trace must be a .jsonl file (the bounded token trace stream), got {trace!r}; "
            "convert it to .npz afterwards with RoutingTrace.load(path).save('x.npz')"
        )
    if opts.get("request_summaries") and not opts.get("jsonl"):
        raise ValueError(
            "request_summaries writes to the JSONL log: set jsonl (MOESCOPE_VLLM_JSONL) too"
        )
    return dict(opts)


def _setting(key: str, from_env: bool) -> str:
    names = {"jsonl": ENV_JSONL, "prometheus_port": ENV_PORT, "trace": ENV_TRACE}
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
    for key, what in (("jsonl", "the JSONL log"), ("trace", "the token trace stream")):
        path = opts.get(key)
        if not path:
            continue
        for i in which:
            target = Path(jsonl_path(str(path), i))
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "a", encoding="utf-8"):
                    pass
            except OSError as err:
                raise VllmSettingsError(
                    f"moescope: cannot write {what} {target} set by "
                    f"{_setting(key, key in env_keys)} ({err.strerror or err}); "
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
    trace: str | None = None,
    trace_max_sequences: int = 10000,
    trace_max_bytes: int = 1 << 30,
    request_summaries: int = 0,
    prometheus_per_expert: bool = False,
    prometheus_top_experts: int = 3,
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
        trace: write every finished request's tokens and per-layer top-k expert ids to
            this ``.jsonl`` token trace stream (``moescope.trace``; one file per reporting
            worker, ``.i`` before the suffix for i > 0), bounded by
            ``trace_max_sequences`` sequences and ``trace_max_bytes`` bytes.
        request_summaries: at most this many per-request routing summary lines per
            window in the JSONL log (``{"kind": "request"}``: unique experts, max/mean
            load and the most-used experts per layer); 0 = none. Needs ``jsonl``.
        prometheus_per_expert: also export the per-(layer, expert) series (E x L of
            them); off by default: the exporter sends per-layer load percentiles and the
            ``prometheus_top_experts`` most and least loaded experts of each layer.

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
    if trace is not None:
        opts["trace"] = str(trace)
        opts["trace_max_sequences"] = int(trace_max_sequences)
        opts["trace_max_bytes"] = int(trace_max_bytes)
    if request_summaries:
        opts["request_summaries"] = int(request_summaries)
    if prometheus_per_expert:
        opts["prometheus_per_expert"] = True
    if prometheus_top_experts != 3:
        opts["prometheus_top_experts"] = int(prometheus_top_experts)
    return {CONFIG_KEY: check_options(opts)}
