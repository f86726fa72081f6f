"""The adapter registry: which adapters a monitor tries, in which order.

Adapters are tried from the highest priority to the lowest; the first whose ``match``
returns a LayerInfo wins a module. Priorities of the built-ins:

- ``PRIORITY_USER`` (300): the default of ``register_adapter``, so a user's adapter wins
  over every built-in one;
- ``PRIORITY_DEDICATED`` (200): family-specific transformers adapters (switch_transformers,
  nllb_moe, llama4, dbrx; ParallelExperts blocks: jetmoe; embedding experts: doge;
  task-indexed experts, which raise: vitpose_backbone) living in ``capture/hf_*.py``, and
  the training engines' MoE layers (Megatron-core: ``capture/megatron.py``; torchtitan:
  ``capture/torchtitan.py``; DeepSpeed: ``capture/deepspeed.py``);
- ``PRIORITY_NN`` (100): ``moescope.nn.MoELayer``;
- ``PRIORITY_GENERIC`` (0): the structural transformers adapter (router + fused experts).

Dedicated modules are imported tolerantly: a missing module is skipped. Such a module
either calls ``register_adapter(..., priority=PRIORITY_DEDICATED)`` at import or exposes a
module-level ``ADAPTERS`` list, which the registry registers itself.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Sequence

from torch import nn

from moescope.capture.adapter import LayerInfo, MoEAdapter
from moescope.capture.hf_generic import GenericHFAdapter
from moescope.capture.nn_adapter import NNAdapter

PRIORITY_USER = 300
PRIORITY_DEDICATED = 200
PRIORITY_NN = 100
PRIORITY_GENERIC = 0

# Modules holding dedicated adapters (transformers families, training engines), written
# against the same protocol; none imports its framework at module import.
_DEDICATED_MODULES: tuple[str, ...] = (
    "moescope.capture.hf_switch",
    "moescope.capture.hf_llama4",
    "moescope.capture.hf_dbrx",
    "moescope.capture.hf_jetmoe",
    "moescope.capture.hf_doge",
    "moescope.capture.hf_vitpose",
    "moescope.capture.megatron",
    "moescope.capture.torchtitan",
    "moescope.capture.deepspeed",
)

_lock = threading.Lock()
_entries: list[tuple[int, int, MoEAdapter]] = []
_counter = 0
_builtins_loaded = False


def register_adapter(adapter: MoEAdapter, priority: int = PRIORITY_USER) -> MoEAdapter:
    """Add ``adapter`` to the default list tried by every new ``MoEMonitor``.

    Higher ``priority`` is tried first; among equal priorities, the earlier registration
    first. Registering the same object twice is a no-op. Returns ``adapter`` (so it can
    be used as ``ADAPTER = register_adapter(MyAdapter())``).
    """
    if not isinstance(adapter, MoEAdapter):
        raise TypeError(
            f"{adapter!r} does not implement the adapter protocol "
            "(moescope.capture.adapter.MoEAdapter: a `name` attribute, "
            "`match(path, module)` and `attach(info, emit, ctx)`); see docs/custom_adapter.md"
        )
    global _counter
    with _lock:
        if any(a is adapter for _, _, a in _entries):
            return adapter
        _entries.append((priority, _counter, adapter))
        _counter += 1
    return adapter


def unregister_adapter(adapter: MoEAdapter) -> bool:
    """Remove ``adapter`` from the default list; True when it was there."""
    with _lock:
        n = len(_entries)
        _entries[:] = [e for e in _entries if e[2] is not adapter]
        return len(_entries) != n


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True

    register_adapter(NNAdapter(), priority=PRIORITY_NN)
    register_adapter(GenericHFAdapter(), priority=PRIORITY_GENERIC)
    for name in _DEDICATED_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                warnings.warn(f"moescope: skipping adapters in {name}: {e}", stacklevel=2)
            continue
        except Exception as e:  # a broken optional adapter must not break every monitor
            warnings.warn(f"moescope: skipping adapters in {name}: {e!r}", stacklevel=2)
            continue
        for adapter in getattr(mod, "ADAPTERS", ()):
            register_adapter(adapter, priority=PRIORITY_DEDICATED)


def default_adapters() -> list[MoEAdapter]:
    """Registered adapters, highest priority first (built-ins loaded on first call)."""
    _load_builtins()
    with _lock:
        return [a for _, _, a in sorted(_entries, key=lambda e: (-e[0], e[1]))]


def find_moe_layers(
    model: nn.Module, adapters: Sequence[MoEAdapter] | None = None
) -> list[tuple[MoEAdapter, LayerInfo]]:
    """Walk ``model`` in module order; the first adapter that matches a module wins it.

    A matched block is not descended into (its router / experts are not layers of their
    own). A module reachable by two paths is visited once. The root's path is ``""``.
    ``adapters`` None: :func:`default_adapters`. The monitor and the parameter counts
    (:mod:`moescope.cost`) both find layers here.
    """
    if adapters is None:
        adapters = default_adapters()
    found: list[tuple[MoEAdapter, LayerInfo]] = []
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for adapter in adapters:
            info = adapter.match(path, module)
            if info is not None:
                found.append((adapter, info))
                return
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return found
