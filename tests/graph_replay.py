"""A CPU emulation of CUDA-graph capture and replay, for testing graph safety without a GPU.

A CUDA graph records the kernels one run launched, with their memory addresses, and a
replay launches the same kernels on the same memory with no Python at all: the only way
new data gets in is by being copied into the static input tensors first, and the only way
results get out is through memory the kernels write.

:class:`GraphRecording` does the same with aten ops. While recording, every aten op is
recorded (a ``TorchDispatchMode``) with its inputs and outputs. A moescope custom op is
not recorded as one opaque call: its implementation runs under the recorder, so the aten
ops it issues are recorded instead (a real CUDA graph also captures the kernels, not the
Python that launched them). :meth:`GraphRecording.replay` then runs the recorded ops as
dataflow: a tensor produced by a recorded op is replaced by the replay's fresh output of
that op; any other tensor (static inputs, parameters, persistent buffers) is the same
object as during recording, so in-place ops on it mutate it, as kernels write the same
addresses. No Python of moescope (no hook, no pipeline, no consumer) runs during a
replay.

Host syncs (``aten._local_scalar_dense``: ``.item()``, ``.tolist()``, data-dependent
shapes) are listed in :attr:`GraphRecording.host_syncs`: inside a real CUDA graph they
fail (or freeze a value), so graph-safe code must have none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["GraphRecording"]


class GraphRecording(TorchDispatchMode):
    """Record the aten ops run inside ``with rec:``; :meth:`replay` runs them again."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, Any, Any, Any]] = []
        self.host_syncs: list[str] = []
        self.custom_ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace == "moescope":
            self.custom_ops.append(str(func))
            impl = OPDEFS[func._schema.name]._init_fn
            with self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_syncs.append(str(func))
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        """Run every recorded op once more as dataflow (see the module docstring)."""
        env: dict[int, Any] = {}

        def sub(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return env.get(id(x), x)
            return x

        for func, args, kwargs, out in self.ops:
            new = func(*tree_map(sub, args), **tree_map(sub, kwargs))
            recorded, _ = tree_flatten(out)
            fresh, _ = tree_flatten(new)
            for r, f in zip(recorded, fresh, strict=True):
                if isinstance(r, torch.Tensor):
                    env[id(r)] = f
