"""tests/with_vllm runs only where vLLM is installed (``make test-vllm``, in .venv-vllm).

In the main venv (no vLLM) the folder is not collected at all, so ``make test`` shows
neither failures nor skips for it.
"""

import importlib.util


def _have_vllm() -> bool:
    # A namespace package (origin None) named vllm is not vLLM.
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


collect_ignore_glob = [] if _have_vllm() else ["*.py"]


if _have_vllm():
    import pytest

    @pytest.fixture(scope="session")
    def qwen_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple:
        """One monitored float32 Qwen3-MoE engine (torch.compile, the CPU default) shared
        by test_vllm_monitor.py and test_vllm_trace.py: 3 distinct prompts, then one long
        prompt twice (the second hits the prefix cache); timed JSONL windows (0.5 s), the
        token trace stream and request summaries (2 per window) on; ``mv.flush`` at the
        end. Returns ``(checkpoint dir, run_vllm result, folder of its files)``."""
        from test_vllm_monitor import MAX_TOKENS, _prompts, _repeat_prompt, run_scenario
        from tiny_ckpt import build_checkpoint

        tmp = tmp_path_factory.mktemp("qwen")
        model = build_checkpoint(tmp / "ckpt", "qwen3_moe")
        spec = {
            "model": str(model),
            "prompts": _prompts(),
            "repeat_prompt": _repeat_prompt(),
            "max_tokens": MAX_TOKENS,
            "eager": False,  # the CPU default: torch.compile
            "options": {
                "jsonl": str(tmp / "routing.jsonl"),
                "interval": 0.5,
                "trace": str(tmp / "trace.jsonl"),
                "request_summaries": 2,
            },
            "flush": True,
            "trace_info": True,
            "linger": 2.0,
        }
        return model, run_scenario(tmp, spec), tmp
