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
