"""vLLM glue: runs in vLLM's processes (loaded by the ``vllm.general_plugins`` entry point).

What it patches, and why (facts read off vLLM 0.32; see docs/vllm.md):

- ``BaseModelLoader.load_model``: right after the worker built and loaded the model (and
  before the first forward, so before ``torch.compile`` traces it), every MoE runner's
  router gets moescope's capture when monitoring is on for this engine. The capture wraps
  ``BaseRouter._compute_routing``, which returns the *logical* ``topk_ids`` (before the
  EPLB logical-to-physical mapping) next to the ``router_logits`` and ``topk_weights``; it
  never touches ``router.capture_fn`` (vLLM's own routed-experts capturer keeps that slot).
  The wrapper calls the opaque op ``moescope_vllm::capture``, so a compiled graph keeps it.
- ``GPUModelRunner._dummy_run`` (the profiling / warm-up / graph-capture forwards; the CPU
  runner inherits it): counting is paused inside it.
- ``GPUModelRunner.execute_model``: every step runs under the monitor's lock (a snapshot
  never splits a forward) and adds the scheduler's token bookkeeping (tokens scheduled,
  prompt tokens of new requests already computed = prefix-cache hits).
- ``WorkerBase`` gains ``moescope_snapshot`` / ``moescope_reset`` so that
  ``llm.collective_rpc("moescope_snapshot")`` brings the totals back to the caller (no
  ``worker_extension_cls`` needed; :class:`~moescope.integrations.vllm.MoescopeWorkerExtension`
  offers the same methods for setups that load no plugins).

Monitoring is on when ``additional_config={"moescope": {...}}`` is given to the engine, or
``MOESCOPE_VLLM=1`` is set in its environment (then the options are written into
``additional_config["moescope"]`` in the worker, so vLLM's compile-cache key differs from
an unmonitored run's and a graph compiled without the op is never reused).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from moescope.integrations.vllm.capture import (
    VllmLayer,
    VllmRoutingMonitor,
    served_summary,
    set_runtime_context,
)

_log = logging.getLogger("moescope.vllm")

#: The worker's monitor (one model per worker process).
STATE: dict[str, Any] = {"monitor": None, "exporter": None, "jsonl": None, "timer": None}
_PAUSE = threading.local()
_PATCHED: set[str] = set()


# -------------------------------------------------------------------- options


def _env_options() -> dict[str, Any] | None:
    from moescope.integrations.vllm import ENV, ENV_COUNTS_ONLY, ENV_INTERVAL, ENV_JSONL, ENV_PORT

    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in ("", "0", "false", "no", "off"):
        return None
    opts: dict[str, Any] = json.loads(raw) if raw.startswith("{") else {}
    if os.environ.get(ENV_JSONL):
        opts.setdefault("jsonl", os.environ[ENV_JSONL])
    if os.environ.get(ENV_PORT):
        opts.setdefault("prometheus_port", int(os.environ[ENV_PORT]))
    if os.environ.get(ENV_INTERVAL):
        opts.setdefault("interval", float(os.environ[ENV_INTERVAL]))
    if os.environ.get(ENV_COUNTS_ONLY, "").lower() in ("1", "true", "yes"):
        opts.setdefault("counts_only", True)
    return opts


def resolve_options(vllm_config: Any) -> dict[str, Any] | None:
    """The monitoring options of this engine, or None when monitoring is off.

    Environment options are copied into ``vllm_config.additional_config["moescope"]``
    (a field vLLM hashes into its compile-cache key)."""
    from moescope.integrations.vllm import CONFIG_KEY, check_options

    extra = getattr(vllm_config, "additional_config", None)
    given = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    env = _env_options()
    if given is None and env is None:
        return None
    opts = {**(env or {}), **(given if isinstance(given, dict) else {})}
    opts.setdefault("enabled", True)
    if not opts["enabled"]:
        return None
    opts = check_options(opts)
    if isinstance(extra, dict):
        extra[CONFIG_KEY] = dict(opts)
    else:
        _log.warning(
            "moescope: additional_config is not a dict; vLLM's compile cache cannot tell a "
            "monitored run apart. Set VLLM_DISABLE_COMPILE_CACHE=1 or pass "
            "additional_config={'moescope': {...}}."
        )
    return opts


# -------------------------------------------------------------------- model install


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, Any]]:
    """``(path, runner module, router)`` of every vLLM MoE layer with a router."""
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

    out = []
    for name, mod in model.named_modules():
        router = getattr(mod, "router", None)
        if isinstance(router, FusedMoERouter):
            out.append((str(getattr(mod, "layer_name", None) or name), mod, router))
    return out


def _layer_info(path: str, mod: nn.Module, router: Any, device: torch.device) -> VllmLayer:
    cfg = getattr(mod, "moe_config", None)
    e = getattr(cfg, "num_logical_experts", None) or getattr(router, "global_num_experts", None)
    k = getattr(router, "top_k", None) or getattr(cfg, "experts_per_token", None)
    if not e or not k:
        raise RuntimeError(
            f"moescope: cannot read the expert count / top_k of vLLM layer {path} "
            f"({type(router).__name__}); report the vLLM version and model"
        )
    score = str(getattr(router, "scoring_func", "softmax"))
    return VllmLayer(
        path=path,
        num_experts=int(e),
        top_k=int(k),
        score_fn=score if score in ("softmax", "sigmoid") else "softmax",
        scores=score in ("softmax", "sigmoid"),
        device=str(device),
        module=mod,
    )


def _wrap_router(router: Any, monitor: VllmRoutingMonitor, index: int, layer: VllmLayer) -> None:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    if isinstance(router, BaseRouter):
        # Logical ids (before EPLB mapping) with the logits and weights that chose them.
        inner = router._compute_routing

        @functools.wraps(inner)
        def compute_routing(hidden_states, router_logits, indices_type, **kw):
            weights, ids = inner(hidden_states, router_logits, indices_type, **kw)
            monitor.capture(index, ids, router_logits, weights)
            return weights, ids

        router._compute_routing = compute_routing
        return
    if getattr(router, "eplb_state", None) is not None:
        raise RuntimeError(
            f"moescope: router {type(router).__name__} of {layer.path} is not a BaseRouter "
            "and EPLB is on, so its select_experts returns physical expert ids; run "
            "without --enable-eplb while monitoring, or report the router class"
        )
    inner_sel = router.select_experts

    @functools.wraps(inner_sel)
    def select_experts(hidden_states, router_logits, topk_indices_dtype=None, **kw):
        weights, ids = inner_sel(hidden_states, router_logits, topk_indices_dtype, **kw)
        monitor.capture(index, ids, router_logits, weights)
        return weights, ids

    router.select_experts = select_experts


def _padding() -> torch.Tensor | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    return get_forward_context().is_padding


def _paused() -> bool:
    return getattr(_PAUSE, "depth", 0) > 0


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Do not count forwards run inside (vLLM's dummy / profiling runs)."""
    _PAUSE.depth = getattr(_PAUSE, "depth", 0) + 1
    try:
        yield
    finally:
        _PAUSE.depth -= 1


def uses_cuda_graphs(vllm_config: Any, device: torch.device) -> bool:
    """Whether this engine replays CUDA graphs (then capture must be graph-safe: a replay
    runs no Python)."""
    if device.type != "cuda":
        return False
    if getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False):
        return False
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def install(model: nn.Module, vllm_config: Any, opts: dict[str, Any]) -> VllmRoutingMonitor:
    """Build the worker's monitor for ``model`` and wrap its routers (before compilation)."""
    found = find_layers(model)
    if not found:
        raise RuntimeError(
            f"moescope: monitoring is on but {type(model).__name__} has no vLLM MoE "
            "router (FusedMoE); unset MOESCOPE_VLLM / additional_config['moescope'] for "
            "dense models"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    layers = [_layer_info(p, m, r, device) for p, m, r in found]
    monitor = VllmRoutingMonitor(
        layers,
        counts_only=bool(opts.get("counts_only", False)),
        coactivation=bool(opts.get("coactivation", True)),
        graph_safe=uses_cuda_graphs(vllm_config, device) or bool(opts.get("graph_safe")),
    )
    for i, ((_, _, router), info) in enumerate(zip(found, layers, strict=True)):
        _wrap_router(router, monitor, i, info)
    set_runtime_context(padding=_padding, paused=_paused)
    STATE["monitor"] = monitor
    _patch_runner()
    _patch_worker()
    _start_outputs(monitor, opts)
    _log.info("moescope: monitoring %d MoE layers", len(layers))
    return monitor


# -------------------------------------------------------------------- outputs


def _output_index() -> tuple[int, bool]:
    """(index of this worker among the non-replicated ones, whether it reports).

    Tensor-parallel ranks hold replicated routers that see the same tokens: only TP
    rank 0 reports, so counts are never multiplied by the TP size."""
    try:
        from vllm.distributed.parallel_state import get_tp_group, get_world_group

        tp = get_tp_group()
        return get_world_group().rank // max(1, tp.world_size), tp.rank_in_group == 0
    except Exception:  # not initialised (tests) -> a single worker
        return 0, True


def _start_outputs(monitor: VllmRoutingMonitor, opts: dict[str, Any]) -> None:
    index, reports = _output_index()
    if not reports:
        return
    interval = float(opts.get("interval", 15.0))
    path = opts.get("jsonl")
    if path:
        from moescope.sinks.event import LogEvent
        from moescope.sinks.jsonl import JsonlSink

        base, ext = os.path.splitext(str(path))
        sink = JsonlSink(f"{base}.{index}{ext}" if index else str(path), metrics=True)
        STATE["jsonl"] = sink

        def write(snap: Any, tokens: dict[str, int]) -> None:
            served = {f"vllm/{k}": v for k, v in served_summary(snap, tokens).items()}
            sink.write(LogEvent(step=int(snap.step or 0), snapshot=snap, metrics=served))
            sink.flush()

        monitor.window_listeners.append(write)
    port = opts.get("prometheus_port")
    if port is not None:
        from moescope.serve import PrometheusExporter

        exporter = PrometheusExporter(
            monitor,  # type: ignore[arg-type]
            port=int(port) + index if int(port) else 0,
            host=str(opts.get("prometheus_host", "127.0.0.1")),
            interval=interval,
            lock_forwards=False,  # the runner patch holds monitor.lock around each step
        )
        exporter.registry.register(_TokenCollector(monitor))
        exporter.start()
        STATE["exporter"] = exporter
        _log.info("moescope: Prometheus metrics on %s", exporter.url)
    elif path:
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                try:
                    monitor.snapshot(reset=True)
                except Exception:
                    _log.exception("moescope: window snapshot failed")

        timer = threading.Thread(target=run, name="moescope-vllm-windows", daemon=True)
        timer.start()
        STATE["timer"] = (timer, stop)
    if path or port is not None:
        atexit.register(shutdown)


def shutdown() -> None:
    """Close the last window (so the JSONL log holds every counted token) and stop."""
    exporter, STATE["exporter"] = STATE["exporter"], None
    timer, STATE["timer"] = STATE["timer"], None
    if timer is not None:
        timer[1].set()
    if exporter is not None:
        exporter.stop()
    monitor = STATE["monitor"]
    sink, STATE["jsonl"] = STATE["jsonl"], None
    if monitor is not None and sink is not None:
        with contextlib.suppress(Exception):
            monitor.snapshot(reset=True)
        sink.close()


class _TokenCollector:
    """Prometheus counters for tokens routed vs served (closed windows + open one)."""

    def __init__(self, monitor: VllmRoutingMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        with self.monitor.lock:
            totals = dict(self.monitor.lifetime_tokens)
        out = []
        for key, help_ in (
            ("scheduled_tokens", "Tokens vLLM fed through the model (real rows, no padding)."),
            ("prefix_cached_tokens", "Prompt tokens served from the prefix cache (never routed)."),
            ("forwards", "vLLM model-runner steps that ran a forward."),
        ):
            fam = CounterMetricFamily(f"moescope_vllm_{key}", help_)
            fam.add_metric([], float(totals[key]))
            out.append(fam)
        return out

    def describe(self) -> list[Any]:
        return self.collect()


# -------------------------------------------------------------------- patches


def _patch_runner() -> None:
    if "runner" in _PATCHED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    dummy = GPUModelRunner._dummy_run
    execute = GPUModelRunner.execute_model

    @functools.wraps(dummy)
    def _dummy_run(self, *args, **kwargs):
        monitor = STATE["monitor"]
        with paused():
            if monitor is None or not monitor.graph_safe:
                return dummy(self, *args, **kwargs)
            # Graph capture happens in here: the captured kernels read the gate (off now,
            # on at every later replay) instead of Python's pause flag.
            monitor.set_paused(True)
            try:
                return dummy(self, *args, **kwargs)
            finally:
                monitor.set_paused(False)

    @functools.wraps(execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        monitor = STATE["monitor"]
        if monitor is None or _paused():
            return execute(self, scheduler_output, *args, **kwargs)
        with monitor.lock:
            if monitor.graph_safe:
                # Rows past the scheduled tokens are padding to a CUDA-graph size.
                monitor.set_valid_tokens(
                    int(getattr(scheduler_output, "total_num_scheduled_tokens", 0)) or None
                )
            out = execute(self, scheduler_output, *args, **kwargs)
            cached = sum(
                int(getattr(r, "num_computed_tokens", 0) or 0)
                for r in getattr(scheduler_output, "scheduled_new_reqs", ())
            )
            monitor.count_tokens(
                int(getattr(scheduler_output, "total_num_scheduled_tokens", 0)), cached
            )
        return out

    GPUModelRunner._dummy_run = _dummy_run
    GPUModelRunner.execute_model = execute_model
    _PATCHED.add("runner")


def rpc_snapshot(reset: bool = False) -> dict[str, Any]:
    """This worker's totals as JSON-able data (what ``collective_rpc`` carries back)."""
    monitor = STATE["monitor"]
    index, reports = _output_index()
    if monitor is None:
        return {"enabled": False, "index": index, "reports": reports}
    snap, tokens = monitor.total(reset=reset)
    return {
        "enabled": True,
        "index": index,
        "reports": reports,
        "snapshot": snap.to_json(),
        "tokens": tokens,
    }


def _patch_worker() -> None:
    if "worker" in _PATCHED:
        return
    from vllm.v1.worker.worker_base import WorkerBase

    def moescope_snapshot(self: Any, reset: bool = False) -> dict[str, Any]:
        return rpc_snapshot(reset)

    def moescope_reset(self: Any) -> None:
        rpc_snapshot(reset=True)

    WorkerBase.moescope_snapshot = moescope_snapshot
    WorkerBase.moescope_reset = moescope_reset
    _PATCHED.add("worker")


def register() -> None:
    """Patch the model loader (idempotent): the plugin's work in every vLLM process."""
    if "loader" in _PATCHED:
        return
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    load = BaseModelLoader.load_model

    @functools.wraps(load)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = load(self, vllm_config, model_config, *args, **kwargs)
        opts = resolve_options(vllm_config)
        # The target model only (a speculative-decoding drafter is loaded the same way).
        if opts is not None and model_config is getattr(vllm_config, "model_config", None):
            install(model, vllm_config, opts)
        return model

    BaseModelLoader.load_model = load_model
    _PATCHED.add("loader")
