"""Count the aten ops a piece of code dispatches (what the monitor adds per layer call).

On a GPU every non-view aten op is a kernel launch, and a decode step is launch-bound,
so the number of ops moescope adds per MoE layer call is its cost in serving. This counter
sees every op that reaches the dispatcher below autograd (views included, which are not
launches: the count is an upper bound), in eager mode; ops inside a compiled graph are not
seen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AtenOpCounter", "count_aten_ops"]


class AtenOpCounter(TorchDispatchMode):
    """``with AtenOpCounter() as c: ...`` then ``c.total`` / ``c.ops`` (a Counter by
    op name, e.g. ``"aten.index_add_.default"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_aten_ops(fn: Callable[[], Any]) -> tuple[int, Counter[str]]:
    """Run ``fn()`` once and return (total aten ops, ops by name)."""
    with AtenOpCounter() as counter:
        fn()
    return counter.total, counter.ops
