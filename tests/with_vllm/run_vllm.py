"""Run one monitored vLLM scenario in a fresh process and print its results as JSON.

Usage: ``python run_vllm.py SPEC.json`` where the spec holds ``model``, ``prompts``,
``repeat_prompt``, ``max_tokens``, ``eager``, ``options`` (moescope's vLLM options),
``model_impl`` (vLLM's, default ``auto``), ``dtype`` (default float32), ``trace_info``
(also return what ``trace_from_outputs(llm=...)`` reads from the engine), ``flush``
(``mv.flush(llm)`` before the end) and ``linger`` (seconds to wait before exiting, so
timed windows close). A spec ``{"runs": {name: spec, ...}}`` runs several engines one
after the other in this process (one vLLM import for all; a failing engine is reported
as ``{"error": ...}`` and the next one still runs).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if "runs" not in spec:
        print("RESULT " + json.dumps(run_engine(spec)))
        return
    import gc
    import traceback

    results: dict = {}
    for name, one in spec["runs"].items():
        try:
            results[name] = run_engine(one)
        except Exception as err:
            tb = traceback.format_exc().strip().splitlines()
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500], "trace": tb[-6:]}
        gc.collect()  # the engine's finalizer stops its processes before the next one
    print("RESULT " + json.dumps(results))


def run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    import moescope.integrations.vllm as mv

    llm = LLM(
        model=spec["model"],
        max_model_len=512,
        dtype=spec.get("dtype", "float32"),
        seed=0,
        enforce_eager=bool(spec.get("eager", False)),
        model_impl=spec.get("model_impl", "auto"),
        additional_config=mv.options(**spec.get("options", {})),
    )
    params = SamplingParams(max_tokens=int(spec["max_tokens"]), temperature=0.0)

    def run(prompts: list[str]) -> list[dict]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [
            {
                "prompt_ids": list(o.prompt_token_ids),
                "output_ids": list(o.outputs[0].token_ids),
                "cached": int(o.num_cached_tokens or 0),
            }
            for o in outs
        ]

    def snap(reset: bool) -> dict:
        # What mv.snapshot(llm) does, keeping the workers' raw RPC payloads too.
        payloads = llm.collective_rpc("moescope_snapshot", args=(reset,))
        s = mv.parse_rpc(payloads)
        return {"snapshot": s.snapshot.to_json(), "tokens": s.tokens, "payloads": payloads}

    result: dict = {"warmup": snap(True)}
    result["distinct"] = {"requests": run(spec["prompts"])}
    result["distinct"].update(snap(True))
    if spec.get("repeat_prompt"):
        reqs = run([spec["repeat_prompt"]]) + run([spec["repeat_prompt"]])
        result["repeat"] = {"requests": reqs, **snap(True)}
    if spec.get("trace_info"):
        from moescope.integrations.vllm.trace import _model_info

        result["trace_info"] = _model_info(llm)
    if spec.get("flush"):
        mv.flush(llm)
    time.sleep(float(spec.get("linger", 0)))
    llm.llm_engine.engine_core.shutdown()
    return result


if __name__ == "__main__":
    main()
