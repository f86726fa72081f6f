"""tests/with_engines runs only in the training-engines venv (``make test-engines``,
``.venv-engines``: Megatron-core, torchtitan, DeepSpeed on CPU).

In the main venv none of the engines is installed, so the folder is not collected at all
and ``make test`` shows neither failures nor skips for it. Each test module needs its own
engine; a module whose engine is missing is not collected either.
"""

import importlib.util
import sys
from pathlib import Path

_ENGINE_OF = {
    "test_megatron*.py": "megatron.core",
    "test_torchtitan*.py": "torchtitan",
    "test_deepspeed*.py": "deepspeed",
}


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


collect_ignore_glob = [glob for glob, mod in _ENGINE_OF.items() if not _have(mod)]
if not any(_have(m) for m in _ENGINE_OF.values()):
    collect_ignore_glob = ["*.py"]

# tests/dist_ranks.py (gloo rank runner) lives one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
