"""Capture under ``torch.compile`` and CUDA graphs: hook guards and the one capture op.

Attach order. Dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph traced without
moescope's hooks (the model compiled before the monitor attached, or another instance of
the same class compiled earlier in the process) was silently reused with the hooks
ignored: zero counts. Attaching a monitor turns hook guards on, process-wide; from then on
adding or removing hooks makes Dynamo retrace, so every attach order counts. Graphs
compiled *before* the guards were on carry no hook guard: the first attach then drops
Dynamo's caches (``torch._dynamo.reset()``, with a warning) so those graphs are retraced
with the hooks.

The op. Every compiled front end (a monitored model's hooks, the vLLM router wrapper)
calls ``moescope::capture``, a ``torch.library.custom_op``: opaque to Dynamo (no graph
break; ``fullgraph=True`` works where the model itself compiles fullgraph), run every time
the compiled graph runs, and kept by the compiler because it declares a mutation of its
``state`` list. What the op does is the pipeline's business
(:meth:`~moescope.capture.pipeline.CapturePipeline.receive`):

- staged pipelines copy the inputs (a compiled graph may reuse their memory) and stage
  them like an eager hook; ``state`` is only the pipeline's ticket;
- graph-safe pipelines add the call into persistent per-layer buffers with in-place
  device ops. Those buffers are not the op's arguments, on purpose: a declared mutation
  is functionalized by AOTAutograd (the op receives copies), and a backend that cannot
  write the copies back (``aot_eager`` with buffers lifted as constants) silently loses
  them; writing the real buffers as a side effect, as the staged path stages into Python,
  is right in every backend. The ticket is declared mutated so the compiler keeps the
  call. Under CUDA graphs (``mode="reduce-overhead"``, vLLM's default on GPUs) the op's Python runs once,
  while the graph is captured; the kernels it launched then run at every replay, into the
  same buffers, with no Python. Warm-up forwards and padding rows are excluded by device
  tensors the kernels read at replay (the pipeline's gate and valid-token limit).
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moescope.capture.pipeline import CapturePipeline

__all__ = ["PIPELINES", "capture_op", "ensure_hook_guards"]

#: Live pipelines by id: the op finds its pipeline here (an int crosses the op boundary).
PIPELINES: weakref.WeakValueDictionary[int, CapturePipeline] = weakref.WeakValueDictionary()

_state = {"guarded": False}


def ensure_hook_guards() -> None:
    """Make Dynamo guard on module hooks (once per process; see the module docstring)."""
    if _state["guarded"]:
        return
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    was_skipping = getattr(dynamo.config, "skip_nnmodule_hook_guards", False)
    dynamo.config.skip_nnmodule_hook_guards = False
    _state["guarded"] = True
    if was_skipping and counters["stats"]["unique_graphs"] > 0:
        warnings.warn(
            "moescope: torch.compile already compiled graphs without guards on module "
            "hooks; dropping Dynamo's caches (torch._dynamo.reset()) so that compiled "
            "models are retraced with the monitor's hooks. Attach monitors before "
            "compiling (or import moescope first) to avoid the recompilation.",
            stacklevel=3,
        )
        dynamo.reset()


@torch.library.custom_op("moescope::capture", mutates_args=("state",))
def capture_op(
    state: list[torch.Tensor],
    pipeline: int,
    layer: int,
    num_experts: int,
    topk_index: torch.Tensor,
    logits: torch.Tensor | None,
    topk_weight: torch.Tensor | None,
    token_mask: torch.Tensor | None,
    dropped: torch.Tensor | None,
    score_fn: str,
    window: str,
) -> None:
    """Hand one layer call to the pipeline with id ``pipeline``.

    Args:
        state: ``[ticket]``, the pipeline's 1-element tensor, declared mutated so that
            compilers keep the call (never written).
        pipeline: :attr:`CapturePipeline.id`.
        layer: the layer's index in the pipeline's ``paths``.
        num_experts: E.
        topk_index: [T, K] int expert ids; ``logits`` [T, E'] or None; ``topk_weight``
            [T, K] or None; ``token_mask`` [T] bool or None; ``dropped`` [T, K] or None.
        score_fn: ``softmax`` / ``sigmoid`` / ``probs``.
        window: the window name, or ``""`` for the pipeline's current one.
    """
    p = PIPELINES.get(pipeline)
    if p is None:
        return  # the monitor is gone; a graph traced while it was attached runs on
    p.receive(
        layer,
        num_experts,
        topk_index,
        logits,
        topk_weight,
        token_mask,
        dropped,
        score_fn,
        window or None,
    )


@capture_op.register_fake
def _capture_fake(*args: object) -> None:
    return None
