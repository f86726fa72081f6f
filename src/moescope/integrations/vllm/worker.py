"""vLLM glue: runs in vLLM's processes (loaded by the ``vllm.general_plugins`` entry point).

What it patches, and why (facts read off vLLM 0.32; see docs/vllm.md):

- ``BaseModelLoader.load_model``: right after the worker built and loaded the model (and
  before the first forward, so before ``torch.compile`` traces it), every MoE runner's
  router gets moescope's capture when monitoring is on for this engine. The capture wraps
  ``BaseRouter._compute_routing``, which returns the *logical* ``topk_ids`` (before the
  EPLB logical-to-physical mapping) next to the ``router_logits`` and ``topk_weights``; it
  never touches ``router.capture_fn`` (vLLM's own routed-experts capturer keeps that slot).
  The wrapper calls ``VllmRoutingMonitor.capture``, which a compiled graph keeps as the
  one opaque capture op ``moescope::capture``.
- ``GPUModelRunner._dummy_run`` (the profiling / warm-up / graph-capture forwards; the CPU
  runner inherits it): counting is paused inside it.
- ``GPUModelRunner.execute_model``: every step runs under the monitor's lock (a snapshot
  never splits a forward) and adds the scheduler's token bookkeeping (tokens scheduled,
  prompt tokens of new requests already computed = prefix-cache hits).
- ``EngineArgs.create_engine_config`` (the front end, before any engine process starts)
  and the loader (the worker, before the weights load) check the options: a bad setting
  stops the start in one line naming it (:class:`~moescope.integrations.vllm.settings.VllmSettingsError`).
- ``AsyncLLM.shutdown`` (the API server, on SIGINT / SIGTERM): every engine's workers
  write their open window (``moescope_flush``) before vLLM kills the engine processes.
- ``WorkerBase`` gains ``moescope_snapshot`` / ``moescope_reset`` / ``moescope_flush`` so that
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
import logging
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
from moescope.integrations.vllm.requests import RequestRecorder

_log = logging.getLogger("moescope.vllm")

#: The worker's monitor (one model per worker process).
STATE: dict[str, Any] = {
    "monitor": None,
    "exporter": None,
    "jsonl": None,
    "timer": None,
    "requests": None,
}
_PAUSE = threading.local()
_PATCHED: set[str] = set()


# -------------------------------------------------------------------- options


def resolve_options(vllm_config: Any) -> dict[str, Any] | None:
    """The monitoring options of this engine, or None when monitoring is off.

    Environment options are copied into ``vllm_config.additional_config["moescope"]``
    (a field vLLM hashes into its compile-cache key).

    Raises:
        VllmSettingsError: a bad environment variable or ``additional_config`` option
            (one line naming it and the fix).
    """
    from moescope.integrations.vllm.settings import (
        CONFIG_KEY,
        VllmSettingsError,
        check_options,
        env_options,
    )

    extra = getattr(vllm_config, "additional_config", None)
    given = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if given is not None and not isinstance(given, dict):
        raise VllmSettingsError(
            f"additional_config['{CONFIG_KEY}'] must be a dict of options, got {given!r}; "
            "use moescope.integrations.vllm.options()"
        )
    env = env_options()
    if given is None and env is None:
        return None
    opts = {**(env or {}), **(given or {})}
    opts.setdefault("enabled", True)
    try:
        opts = check_options(opts)
    except ValueError as err:
        raise VllmSettingsError(f"additional_config['{CONFIG_KEY}']: {err}") from None
    if not opts["enabled"]:
        return None
    STATE["from_env"] = sorted(k for k in (env or {}) if k not in (given or {}))
    if isinstance(extra, dict):
        extra[CONFIG_KEY] = dict(opts)
    else:
        _log.warning(
            "moescope: additional_config is not a dict; vLLM's compile cache cannot tell a "
            "monitored run apart. Set VLLM_DISABLE_COMPILE_CACHE=1 or pass "
            "additional_config={'moescope': {...}}."
        )
    return opts


def reporting_workers(vllm_config: Any) -> int:
    """Workers that report (own a JSONL file / exporter port): one per pipeline stage
    and data-parallel replica (tensor-parallel replicas of the same tokens do not)."""
    par = getattr(vllm_config, "parallel_config", None)
    if par is None:
        return 1
    try:
        across = int(par.world_size_across_dp)
        tp = max(1, int(par.tensor_parallel_size))
    except (AttributeError, TypeError, ValueError):
        return 1
    return max(1, across // tp)


def check_config(vllm_config: Any, worker: bool = False) -> dict[str, Any] | None:
    """Resolve and check the options of an engine before any model loads (the front
    end, right after vLLM built its config: every replica's outputs; a worker, before
    loading weights: its own outputs, if it reports)."""
    from moescope.integrations.vllm.settings import preflight

    opts = resolve_options(vllm_config)
    if opts is None:
        return None
    from_env = STATE.get("from_env", ())
    if not worker:
        preflight(opts, reporting_workers(vllm_config), from_env)
    else:
        index, reports = _output_index()
        if reports:  # other workers' exporters may already listen on their own ports
            preflight(opts, from_env=from_env, indices=[index])
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


def moe_layer_ids(model: nn.Module) -> list[tuple[int, str]]:
    """``(decoder layer index, path)`` of every MoE layer (the layer axis of vLLM's
    returned ``routed_experts`` counts decoder layers, dense ones included)."""
    from vllm.model_executor.models.utils import extract_layer_index

    out = []
    for path, _, _ in find_layers(model):
        try:
            out.append((int(extract_layer_index(path)), path))
        except (AssertionError, ValueError):  # a path without one layer number
            out.append((len(out), path))
    return out


#: vLLM's custom routing functions -> how their ``router_logits`` map to a distribution
#: (keyed by module and function name; read off vLLM 0.32). The router's own
#: ``scoring_func`` attribute does not say: ``CPURouter`` keeps its default "softmax"
#: beside any custom function (Llama-4 routes top-k -> sigmoid).
CUSTOM_ROUTING_SCORES: dict[tuple[str, str], str] = {
    ("vllm.model_executor.models.llama4", "custom_routing_function"): "sigmoid",
    ("vllm.model_executor.models.cohere2_moe", "token_choice_with_bias"): "sigmoid",
    ("vllm.model_executor.models.gemma4", "routing_function"): "softmax",
    ("vllm.model_executor.models.phimoe", "phimoe_routing_function"): "softmax",
    ("vllm.model_executor.models.interns1_pro", "_custom_routing_function"): "softmax",
}
#: vLLM's Transformers backend: its routing function returns the top-k weights that the
#: transformers router already computed; the ``router_logits`` it is given are those
#: [T, K] weights, not [T, E] logits.
TRANSFORMERS_BACKEND = "vllm.model_executor.models.transformers.moe"


def _function_key(fn: Any) -> tuple[str, str]:
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    name = str(getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__)))
    return str(getattr(fn, "__module__", "")), name.rsplit(".", 1)[-1]


def score_function(router: Any) -> tuple[str | None, str]:
    """How a vLLM router's ``router_logits`` map to a distribution.

    Returns:
        ``(score_fn, why)``: ``"softmax"`` / ``"sigmoid"``, or None when moescope cannot
        read the scores (then the layer's counts and weights are kept, the
        router-probability metrics are not); ``why`` names the rule.
    """
    custom = getattr(router, "custom_routing_function", None)
    if custom is not None:
        key = _function_key(custom)
        if key[0] == TRANSFORMERS_BACKEND:
            return None, "vLLM's Transformers backend passes top-k weights, not logits"
        if key in CUSTOM_ROUTING_SCORES:
            return CUSTOM_ROUTING_SCORES[key], f"custom routing function {key[0]}.{key[1]}"
        return None, f"unknown custom routing function {key[0]}.{key[1]}"
    score = str(getattr(router, "scoring_func", "softmax"))
    if score in ("softmax", "sigmoid"):
        return score, f"scoring_func={score}"
    return None, f"scoring_func={score} (not softmax/sigmoid)"


def _layer_info(path: str, mod: nn.Module, router: Any, device: torch.device) -> VllmLayer:
    base = _layer_info_counts(path, mod, device)
    e, k = base.num_experts, base.top_k
    score, why = score_function(router)
    if score is None:
        _log.warning(
            "moescope: layer %s: %s; counting its expert ids and weights only (no "
            "entropy / top-1 / aux loss for it)",
            path,
            why,
        )
    return VllmLayer(
        path=path,
        num_experts=int(e),
        top_k=int(k),
        score_fn=score or "softmax",
        scores=score is not None,
        device=str(device),
        module=mod,
    )


def _hf_layer_info(
    path: str, mod: nn.Module, hf_router: nn.Module, model: nn.Module, device: torch.device
) -> VllmLayer:
    """A Transformers-backend layer: E and K from the vLLM side, the score function from
    the transformers router (as moescope's HF adapter reads it)."""
    from moescope.capture.hf_structure import find_top_k, router_score_fn

    info = _layer_info_counts(path, mod, device)
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    score = router_score_fn(hf_router, config)
    # K as the transformers router picks it (vLLM's runner may hold another default).
    k = find_top_k(hf_router, None, config) or info.top_k
    return VllmLayer(
        path=path,
        num_experts=info.num_experts,
        top_k=int(k),
        score_fn=score if score in ("softmax", "sigmoid") else "softmax",
        scores=score in ("softmax", "sigmoid"),
        device=str(device),
        module=mod,
    )


def _layer_info_counts(path: str, mod: nn.Module, device: torch.device) -> VllmLayer:
    router = getattr(mod, "router", None)
    cfg = getattr(mod, "moe_config", None)
    e = getattr(cfg, "num_logical_experts", None) or getattr(router, "global_num_experts", None)
    k = getattr(router, "top_k", None) or getattr(cfg, "experts_per_token", None)
    if not e or not k:
        raise RuntimeError(
            f"moescope: cannot read the expert count / top_k of vLLM layer {path} "
            f"({type(router).__name__}); report the vLLM version and model"
        )
    return VllmLayer(path=path, num_experts=int(e), top_k=int(k), device=str(device))


def _wrap_router(
    router: Any,
    monitor: VllmRoutingMonitor,
    index: int,
    layer: VllmLayer,
    recorder: RequestRecorder | None = None,
) -> None:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    with_logits = layer.scores
    num_experts = layer.num_experts

    def scores(router_logits: Any) -> Any:
        # Only [T, E] logits are scores; anything else (a router that scores another
        # layout) leaves this layer with counts and weights, never a crash.
        if (
            with_logits
            and isinstance(router_logits, torch.Tensor)
            and router_logits.dim() == 2
            and router_logits.shape[-1] == num_experts
        ):
            return router_logits
        return None

    if isinstance(router, BaseRouter):
        # Logical ids (before EPLB mapping) with the logits and weights that chose them.
        inner = router._compute_routing

        @functools.wraps(inner)
        def compute_routing(hidden_states, router_logits, indices_type, **kw):
            weights, ids = inner(hidden_states, router_logits, indices_type, **kw)
            monitor.capture(index, ids, scores(router_logits), weights)
            if recorder is not None:
                recorder.stash(index, ids)
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
        monitor.capture(index, ids, scores(router_logits), weights)
        if recorder is not None:
            recorder.stash(index, ids)
        return weights, ids

    router.select_experts = select_experts


def _hf_router_of(model: nn.Module, name: str, mod: nn.Module) -> nn.Module | None:
    """The transformers router beside a FusedMoE that vLLM's Transformers backend put in
    place of a block's ``experts`` (external routing: the router still runs in
    transformers and returns ``(logits [T, E], weights [T, K], ids [T, K])``)."""
    from moescope.capture.hf_structure import find_router

    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return None
    found = find_router(parent, exclude=mod)
    return None if found is None else found[1]


def _router_outputs(out: Any, num_experts: int, top_k: int) -> tuple[Any, Any, Any]:
    """``(ids [T, K], logits [T, E] or None, weights [T, K] or None)`` of a transformers
    router's output tuple, told apart by dtype and shape (families return them in
    different orders: ``(logits, weights, ids)`` mostly, granitemoe 5.19
    ``(ids, weights, logits)``); ``(None, None, None)`` when there are no [T, K] ids."""
    if not isinstance(out, tuple):
        return None, None, None
    tensors = [t for t in out if isinstance(t, torch.Tensor) and t.dim() == 2]
    ids = next((t for t in tensors if not t.is_floating_point() and t.shape[-1] == top_k), None)
    if ids is None:
        return None, None, None
    floats = [t for t in tensors if t.is_floating_point() and t.shape[0] == ids.shape[0]]
    logits = next((t for t in floats if t.shape[-1] == num_experts), None)
    weights = next((t for t in floats if t.shape[-1] == top_k and t is not logits), None)
    return ids, logits, weights


def _wrap_hf_router(
    hf_router: nn.Module,
    monitor: VllmRoutingMonitor,
    index: int,
    layer: VllmLayer,
    recorder: RequestRecorder | None = None,
) -> None:
    """Capture at the transformers router itself: its real [T, E] logits with the ids and
    weights it chose (what the vLLM router of this layer is only handed back)."""
    num_experts, top_k = layer.num_experts, layer.top_k
    inner = hf_router.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        ids, logits, weights = _router_outputs(out, num_experts, top_k)
        if ids is not None:
            monitor.capture(index, ids, logits, weights)
            if recorder is not None:
                recorder.stash(index, ids)
        return out

    hf_router.forward = forward


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
    # vLLM's Transformers backend with external routing: the transformers router
    # computes the real logits; capture there instead of at the vLLM router.
    hf_routers: dict[int, nn.Module] = {}
    for i, (path, mod, router) in enumerate(found):
        if _function_key(getattr(router, "custom_routing_function", None))[0] == (
            TRANSFORMERS_BACKEND
        ):
            name = next((n for n, m in model.named_modules() if m is mod), path)
            hf = _hf_router_of(model, name, mod)
            if hf is not None:
                hf_routers[i] = hf
    layers = [
        _hf_layer_info(p, m, hf_routers[i], model, device)
        if i in hf_routers
        else _layer_info(p, m, r, device)
        for i, (p, m, r) in enumerate(found)
    ]
    monitor = VllmRoutingMonitor(
        layers,
        counts_only=bool(opts.get("counts_only", False)),
        coactivation=bool(opts.get("coactivation", True)),
        graph_safe=uses_cuda_graphs(vllm_config, device) or bool(opts.get("graph_safe")),
    )
    recorder = _make_recorder(layers, vllm_config, device, opts)
    for i, ((_, _, router), info) in enumerate(zip(found, layers, strict=True)):
        if i in hf_routers:
            _wrap_hf_router(hf_routers[i], monitor, i, info, recorder)
        else:
            _wrap_router(router, monitor, i, info, recorder)
    set_runtime_context(padding=_padding, paused=_paused)
    STATE["monitor"] = monitor
    _patch_runner()
    _patch_worker()
    _start_outputs(monitor, opts)
    _log.info("moescope: monitoring %d MoE layers", len(layers))
    return monitor


# -------------------------------------------------------------------- per request


def _make_recorder(
    layers: list[VllmLayer], vllm_config: Any, device: torch.device, opts: dict[str, Any]
) -> RequestRecorder | None:
    """The per-request recorder, when the trace stream or request summaries are asked for."""
    if not (opts.get("trace") or opts.get("request_summaries")):
        return None
    if not _output_index()[1]:
        return None  # a tensor-parallel replica: rank 0 of its group records the same tokens
    sched = getattr(vllm_config, "scheduler_config", None)
    rows = int(getattr(sched, "max_num_batched_tokens", 0) or 0) or 8192
    rec = RequestRecorder(
        num_layers=len(layers),
        top_k=max(info.top_k for info in layers),
        max_rows=rows,
        device=device,
        max_pending=int(getattr(sched, "max_num_seqs", 0) or 0) * 4 or 4096,
    )
    STATE["recorder"] = rec
    return rec


def _start_requests(monitor: VllmRoutingMonitor, opts: dict[str, Any], index: int) -> None:
    """Open the trace stream of this worker and route request summaries to the JSONL log."""
    from moescope.integrations.vllm.requests import RequestStreams

    rec = STATE.get("recorder")
    if rec is None:
        return
    writer = None
    path = opts.get("trace")
    if path:
        from moescope.integrations.vllm.settings import jsonl_path
        from moescope.trace import TraceWriter

        try:
            import vllm

            version = str(getattr(vllm, "__version__", ""))
        except ImportError:  # pragma: no cover - always there in a worker
            version = ""
        writer = TraceWriter(
            jsonl_path(str(path), index),
            layers=[info.path for info in monitor.layers],
            num_experts=max(info.num_experts for info in monitor.layers),
            top_k=rec.top_k,
            source={"engine": "vllm", "version": version, "recorder": "moescope-worker"},
            max_sequences=opts.get("trace_max_sequences", 10000),
            max_bytes=opts.get("trace_max_bytes", 1 << 30),
        )
    sink = STATE.get("jsonl")
    summaries = None
    if sink is not None and int(opts.get("request_summaries") or 0) > 0:

        def summaries(line: dict[str, Any]) -> None:
            try:
                sink.write_line(line)
            except OSError as err:
                _log.warning("moescope: request summary not written (%s)", err.strerror or err)

    STATE["requests"] = RequestStreams(
        rec,
        [info.path for info in monitor.layers],
        [info.num_experts for info in monitor.layers],
        trace=writer,
        summaries=summaries,
        max_summaries=int(opts.get("request_summaries") or 0),
    )


def _lookup(runner: Any) -> Any:
    """``req_id -> (prompt ids, output ids)`` from the model runner's request states."""

    def lookup(req_id: str) -> tuple[list[int], list[int]] | None:
        state = getattr(runner, "requests", {}).get(req_id)
        if state is None:
            return None
        return list(state.prompt_token_ids or []), list(state.output_token_ids or [])

    return lookup


def _step_starts(scheduler_output: Any) -> dict[str, int]:
    """Position of each scheduled request's first row: tokens computed before the step."""
    starts = {
        r.req_id: int(r.num_computed_tokens or 0)
        for r in getattr(scheduler_output, "scheduled_new_reqs", ())
    }
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    if cached is not None:
        for rid, n in zip(cached.req_ids, cached.num_computed_tokens, strict=False):
            starts[rid] = int(n)
    return starts


def flush_requests() -> int:
    """Write every request the worker holds (trace stream, summaries); returns how many."""
    streams, runner, monitor = STATE.get("requests"), STATE.get("runner"), STATE["monitor"]
    if streams is None or runner is None or monitor is None:
        return 0
    with monitor.lock:
        return streams.flush(_lookup(runner))


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
        from moescope.integrations.vllm.settings import jsonl_path
        from moescope.sinks.event import LogEvent
        from moescope.sinks.jsonl import JsonlSink

        sink = JsonlSink(jsonl_path(str(path), index), metrics=True)
        STATE["jsonl"] = sink

        def write(snap: Any, tokens: dict[str, int]) -> None:
            served = {f"vllm/{k}": v for k, v in served_summary(snap, tokens).items()}
            streams = STATE.get("requests")
            if streams is not None:
                served.update({f"vllm/{k}": v for k, v in streams.take_counters().items()})
            try:
                sink.write(
                    LogEvent(step=int(snap.step or 0), snapshot=snap, metrics=served, mode="serve")
                )
                sink.flush()
            except OSError as err:
                # Monitoring never stops the job: one warning, then no more JSONL lines.
                _log.warning(
                    "moescope: cannot write the JSONL log %s (%s); no more routing windows "
                    "will be written to it",
                    sink.path,
                    err.strerror or err,
                )
                with contextlib.suppress(ValueError):
                    monitor.window_listeners.remove(write)

        monitor.window_listeners.append(write)
    _start_requests(monitor, opts, index)
    port = opts.get("prometheus_port")
    if port is not None:
        from moescope.serve import PrometheusExporter

        exporter = PrometheusExporter(
            monitor,  # type: ignore[arg-type]
            port=int(port) + index if int(port) else 0,
            host=str(opts.get("prometheus_host", "127.0.0.1")),
            interval=interval,
            lock_forwards=False,  # the runner patch holds monitor.lock around each step
            per_expert=bool(opts.get("prometheus_per_expert", False)),
            top_experts=int(opts.get("prometheus_top_experts", 3)),
        )
        exporter.registry.register(_TokenCollector(monitor))
        try:
            exporter.start()
        except OSError as err:
            from moescope.integrations.vllm.settings import VllmSettingsError

            raise VllmSettingsError(
                f"moescope: cannot serve Prometheus metrics on {exporter.host}:{exporter.port} "
                f"({err.strerror or err}); pick a free port, or 0 for any free port"
            ) from None
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
    if path or port is not None or STATE.get("requests") is not None:
        atexit.register(shutdown)


def flush() -> bool:
    """Close the open window now, so the JSONL log holds every token counted so far
    (what a clean shutdown of the engine asks every worker before it stops them).

    Returns:
        True when a JSONL log got the window.
    """
    monitor = STATE["monitor"]
    flush_requests()
    if monitor is None or STATE["jsonl"] is None:
        return False
    monitor.snapshot(reset=True)
    return True


def shutdown() -> None:
    """Close the last window (so the JSONL log holds every counted token) and stop."""
    exporter, STATE["exporter"] = STATE["exporter"], None
    timer, STATE["timer"] = STATE["timer"], None
    if timer is not None:
        timer[1].set()
    if exporter is not None:
        exporter.stop()
    monitor = STATE["monitor"]
    with contextlib.suppress(Exception):
        flush_requests()
    sink = STATE["jsonl"]
    if monitor is not None and sink is not None:
        with contextlib.suppress(Exception):
            monitor.snapshot(reset=True)
    streams, STATE["requests"] = STATE.get("requests"), None
    if streams is not None and streams.trace is not None:
        streams.trace.close()
    STATE["jsonl"] = None
    if sink is not None:
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
        streams = STATE.get("requests")
        with monitor.lock:
            if streams is not None:
                STATE["runner"] = self
                # Their state is still in self.requests; the step below drops it.
                finished = getattr(scheduler_output, "finished_req_ids", ())
                if finished:
                    streams.finished(sorted(finished), _lookup(self))
            if monitor.graph_safe:
                # Rows past the scheduled tokens are padding to a CUDA-graph size.
                monitor.set_valid_tokens(
                    int(getattr(scheduler_output, "total_num_scheduled_tokens", 0)) or None
                )
            out = execute(self, scheduler_output, *args, **kwargs)
            if streams is not None:
                # The rows of this forward, in the batch order the runner laid them out.
                streams.end_step(
                    list(self.input_batch.req_ids),
                    dict(getattr(scheduler_output, "num_scheduled_tokens", {}) or {}),
                    _step_starts(scheduler_output),
                )
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


def _parallel_ranks() -> dict[str, int]:
    try:
        from vllm.distributed.parallel_state import get_dp_group, get_pp_group

        return {"dp_rank": get_dp_group().rank_in_group, "pp_rank": get_pp_group().rank_in_group}
    except Exception:  # not initialised (tests) -> a single replica
        return {"dp_rank": 0, "pp_rank": 0}


def rpc_snapshot(reset: bool = False) -> dict[str, Any]:
    """This worker's totals as JSON-able data (what ``collective_rpc`` carries back):
    the snapshot, the token counters, the per-layer states (so that data-parallel
    replicas add up exactly) and the worker's data- / pipeline-parallel ranks."""
    from moescope._json import json_safe

    monitor = STATE["monitor"]
    index, reports = _output_index()
    if monitor is None:
        return {"enabled": False, "index": index, "reports": reports}
    snap, tokens, states = monitor.total_states(reset)
    return {
        "enabled": True,
        "index": index,
        "reports": reports,
        **_parallel_ranks(),
        "snapshot": snap.to_json(),
        "tokens": tokens,
        "states": json_safe(states),
    }


def _patch_worker() -> None:
    if "worker" in _PATCHED:
        return
    from vllm.v1.worker.worker_base import WorkerBase

    def moescope_snapshot(self: Any, reset: bool = False) -> dict[str, Any]:
        return rpc_snapshot(reset)

    def moescope_reset(self: Any) -> None:
        rpc_snapshot(reset=True)

    def moescope_flush(self: Any) -> bool:
        return flush()

    def moescope_moe_layers(self: Any) -> list[tuple[int, str]]:
        return moe_layer_ids(self.model_runner.model)

    WorkerBase.moescope_snapshot = moescope_snapshot
    WorkerBase.moescope_reset = moescope_reset
    WorkerBase.moescope_flush = moescope_flush
    WorkerBase.moescope_moe_layers = moescope_moe_layers
    _PATCHED.add("worker")


#: Seconds a shutting-down front end waits for the workers to write their open window.
FLUSH_TIMEOUT_S = 10.0


def _flush_before_shutdown(engine: Any) -> None:
    """Ask every engine's workers to write their open window (``moescope_flush``) before
    vLLM stops them: with ``shutdown_timeout=0`` (the default) the API server sends
    SIGTERM and then SIGKILL to the engine-core process at once, and the workers never
    reach their own exit handlers. Runs in the front end's shutdown thread while its
    event loop still runs; best effort (a warning, never an exception)."""
    import asyncio

    from moescope.integrations.vllm.settings import CONFIG_KEY

    extra = getattr(getattr(engine, "vllm_config", None), "additional_config", None)
    opts = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if not isinstance(opts, dict) or not opts.get("enabled", True):
        return
    if not (opts.get("jsonl") or opts.get("trace")):
        return
    core = getattr(engine, "engine_core", None)
    if core is None or getattr(getattr(core, "resources", None), "engine_dead", False):
        return
    handler = getattr(engine, "output_handler", None)
    loop = handler.get_loop() if handler is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return  # no request was ever served: the open window is empty
    with contextlib.suppress(RuntimeError):
        if asyncio.get_running_loop() is loop:
            return  # called from the loop itself (e.g. __del__): cannot wait on it
    rpc = ("collective_rpc", "moescope_flush", FLUSH_TIMEOUT_S, (), None)
    all_engines = getattr(core, "call_utility_all_async", None)
    coro = all_engines(*rpc) if all_engines is not None else core.call_utility_async(*rpc)
    try:
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=FLUSH_TIMEOUT_S + 2)
    except Exception as err:  # monitoring never stops the shutdown
        _log.warning("moescope: the workers could not write their last window (%r)", err)


def register() -> None:
    """Patch vLLM (idempotent): the plugin's work in every vLLM process.

    - ``EngineArgs.create_engine_config`` (the front end, before any engine process
      starts): resolve and check the options (bad settings fail here, in one line);
    - ``BaseModelLoader.load_model`` (the worker): check again before the weights load,
      install the capture right after;
    - ``AsyncLLM.shutdown`` (the API server): the workers write their open window first.
    """
    if "loader" in _PATCHED:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    load = BaseModelLoader.load_model

    @functools.wraps(load)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        target = model_config is getattr(vllm_config, "model_config", None)
        # The target model only (a speculative-decoding drafter is loaded the same way).
        opts = check_config(vllm_config, worker=True) if target else None
        model = load(self, vllm_config, model_config, *args, **kwargs)
        if opts is not None:
            install(model, vllm_config, opts)
        return model

    BaseModelLoader.load_model = load_model

    create = EngineArgs.create_engine_config

    @functools.wraps(create)
    def create_engine_config(self, *args, **kwargs):
        config = create(self, *args, **kwargs)
        check_config(config)
        return config

    EngineArgs.create_engine_config = create_engine_config
    _patch_worker()  # the RPC methods answer (monitoring off) even without a monitor
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:  # pragma: no cover - a vLLM without the v1 async engine
        AsyncLLM = None
    if AsyncLLM is not None:
        stop = AsyncLLM.shutdown

        @functools.wraps(stop)
        def shutdown_engine(self, *args, **kwargs):
            _flush_before_shutdown(self)
            return stop(self, *args, **kwargs)

        AsyncLLM.shutdown = shutdown_engine
    _PATCHED.add("loader")
