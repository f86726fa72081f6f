"""Hooks and patches that stay with the module and monitor they were made for.

A monitored model is often copied: an EMA or teacher copy (``copy.deepcopy``),
``torch.save(model)``, pickling to another process, ``ExpertParallelMoELayer.from_moe_layer``.
PyTorch copies a module's hook dictionaries with it, and ``deepcopy`` keeps a plain
function (a closure) as the very same object, so the copy would report into the original
monitor, and pickling fails on the monitor's lock. Every hook moescope installs is
therefore wrapped here:

- :class:`BoundHook` runs only for the module it was registered on (a shallow copy
  sharing the hook dictionaries is skipped), becomes inert in a deep copy, and pickles
  as an inert hook;
- :class:`CopySafePatch` is an instance-attribute patch (``experts._apply_gate``,
  ``act_fn``, ``neuron_observer``) that, in a copy or an unpickled model, is the value the
  attribute had before the patch.

:func:`wrap_new_hooks` wraps the hooks an adapter registered during ``attach`` (found by
comparing the hook dictionaries before and after), so third-party adapters written
against the plain protocol get the same guarantees without changing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

__all__ = ["BoundHook", "CopySafePatch", "hook_keys", "inert_hook", "wrap_new_hooks"]

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)


class _InertHook:
    """A hook that does nothing (what a moescope hook becomes in a copy)."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (inert_hook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> _InertHook:
        return self


_INERT = _InertHook()


def inert_hook() -> _InertHook:
    """The shared inert hook (also what unpickling a moescope hook gives)."""
    return _INERT


class BoundHook:
    """``fn`` as a hook of ``module`` only: skipped when PyTorch calls it for another
    module (a shallow copy sharing the hook dictionary), inert in a deep copy, pickled
    as an inert hook."""

    __slots__ = ("fn", "module")

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        self.module = module
        self.fn = fn

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        if module is not self.module:
            return None
        return self.fn(module, *args)

    def __deepcopy__(self, memo: dict[int, Any]) -> _InertHook:
        return _INERT

    def __reduce__(self) -> tuple[Any, ...]:
        return (inert_hook, ())


def hook_keys(modules: Iterable[nn.Module]) -> dict[int, set[tuple[str, int]]]:
    """``{id(module): {(dict name, handle id)}}`` of every forward/backward hook now."""
    out: dict[int, set[tuple[str, int]]] = {}
    for m in modules:
        out[id(m)] = {(name, key) for name in _HOOK_DICTS for key in getattr(m, name, {})}
    return out


def wrap_new_hooks(modules: Iterable[nn.Module], before: dict[int, set[tuple[str, int]]]) -> None:
    """Wrap in :class:`BoundHook` every hook of ``modules`` not listed in ``before`` (a
    :func:`hook_keys` result taken before attaching). Handles keep working: the wrapper
    replaces the value under the same key."""
    for m in modules:
        old = before.get(id(m), set())
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if not hooks:
                continue
            for key, fn in list(hooks.items()):
                if (name, key) not in old and not isinstance(fn, BoundHook):
                    hooks[key] = BoundHook(m, fn)


_CLASS_ATTRIBUTE = object()


class CopySafePatch:
    """A callable set as ``owner.<name>`` by moescope; copies get the original back.

    ``original`` is what ``owner.__dict__[name]`` held before the patch (absent: the class
    attribute applies). A deep copy of the owner or an unpickled owner gets that original
    (bound to the copy when it is the class's method), never this wrapper.
    """

    def __init__(self, owner: Any, name: str, fn: Callable[..., Any]) -> None:
        self.owner = owner
        self.name = name
        self.fn = fn
        self.original = owner.__dict__.get(name, _CLASS_ATTRIBUTE)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def install(self) -> Callable[[], None]:
        """Set the patch; returns the function that restores the original."""
        setattr(self.owner, self.name, self)

        def restore() -> None:
            if self.owner.__dict__.get(self.name) is self:
                if self.original is _CLASS_ATTRIBUTE:
                    delattr(self.owner, self.name)
                else:
                    setattr(self.owner, self.name, self.original)

        return restore

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if self.original is _CLASS_ATTRIBUTE:
            new_owner = memo.get(id(self.owner), self.owner)
            return getattr(type(new_owner), self.name).__get__(new_owner)
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> tuple[Any, ...]:
        if self.original is _CLASS_ATTRIBUTE:
            # Unpickling sets the owner's state after this value is built: getattr then
            # finds the class's method, bound to the new owner.
            return (getattr, (self.owner, self.name))
        return (_identity, (self.original,))


def _identity(x: Any) -> Any:
    return x
