"""Print a pip constraints file pinning every ``>=`` lower bound in pyproject.toml.

``make test-lowest`` installs with it so the suite runs on the oldest versions the ranges
admit: a bound in pyproject.toml is then a version the suite passed on. torch is left out
(it is installed first, pinned, by the Makefile).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lower_bounds(pyproject: Path) -> dict[str, str]:
    """{distribution name: lower bound} of every ``name>=X`` requirement."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    bounds: dict[str, str] = {}
    for req in reqs:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*([^;]*)", req)
        if not m:
            continue
        name, spec = m.group(1).lower(), m.group(2)
        low = re.search(r">=\s*([0-9][^,\s]*)", spec)
        if low and name != "torch":
            bounds[name] = low.group(1)
    return bounds


def main() -> int:
    for name, version in sorted(lower_bounds(ROOT / "pyproject.toml").items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
