"""The package surface a new user touches: ``dir(moescope)`` lists the API, every name
resolves and is documented, every moescope type the API takes or returns is exported, and
``import moescope`` stays light (torch and numpy only)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import moescope

SRC = str(Path(moescope.__file__).parents[1])


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def _public() -> list[str]:
    return [n for n in moescope.__all__ if not n.startswith("__")]


def test_dir_lists_the_api_and_every_name_resolves() -> None:
    assert sorted(moescope.__all__) == sorted(["__version__", *moescope._LAZY])
    names = dir(moescope)
    for n in (
        "MoEMonitor",
        "Snapshot",
        "LayerStats",
        "AlertRules",
        "PrometheusExporter",
        "analyze",
        "AnalyzeOptions",
        "RoutingRecorder",
        "plan_expert_placement",
        "LayerInfo",
        "MoETrainerCallback",
        "MoEPyTorchCallback",
        "MoELightningCallback",
        "create_moe_callback_for_transformers",
        "create_moe_callback_for_pytorch",
        "cost",
        "analysis",
    ):
        assert n in names, n
    for n in _public():
        obj = getattr(moescope, n)
        assert (inspect.getdoc(obj) or "").strip(), f"moescope.{n} has no docstring"
        assert obj.__name__ == n


def _moescope_classes(t: Any, out: set[type]) -> None:
    if isinstance(t, type) and t.__module__.startswith("moescope."):
        if not t.__name__.startswith("_"):
            out.add(t)
    for a in typing.get_args(t):
        _moescope_classes(a, out)


def test_every_type_the_api_takes_or_returns_is_exported() -> None:
    # Annotations name TYPE_CHECKING-only imports: resolve them against the package.
    ns = {n: getattr(moescope, n) for n in _public()}
    missing: dict[str, set[str]] = {}
    for n in _public():
        obj = getattr(moescope, n)
        targets = [obj]
        if inspect.isclass(obj):
            targets += [
                m
                for name, m in inspect.getmembers(obj)
                if callable(m) and (name == "__init__" or not name.startswith("_"))
            ]
        for t in targets:
            mod = sys.modules.get(getattr(t, "__module__", ""), None)
            try:
                hints = typing.get_type_hints(t, globalns={**vars(mod), **ns} if mod else ns)
            except NameError as err:  # a TYPE_CHECKING-only moescope type not exported
                missing.setdefault(str(err.name), set()).add(f"{n}.{t.__name__}")
                continue
            found: set[type] = set()
            for h in hints.values():
                _moescope_classes(h, found)
            for cls in found:
                if getattr(moescope, cls.__name__, None) is not cls:
                    missing.setdefault(f"{cls.__module__}.{cls.__name__}", set()).add(n)
    assert not missing, missing


def test_import_is_light_and_submodules_resolve_lazily() -> None:
    # The README's `moescope.cost.measured_cost(snap, model)` after a bare import.
    proc = _python(
        "import sys, moescope\n"
        "heavy = [m for m in ('transformers', 'matplotlib', 'moescope.monitor') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(moescope.cost.measured_cost.__module__)\n"
        "print(moescope.analysis.analyze is moescope.analyze)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["moescope.cost.measured", "True"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        moescope.MoEMonitr  # noqa: B018
    except AttributeError as err:
        assert "MoEMonitr" in str(err)
    else:
        raise AssertionError("no AttributeError")
