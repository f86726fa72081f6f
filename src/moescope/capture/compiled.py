"""Capture under ``torch.compile``: hook guards and the ``moescope::stage`` custom op.

Attach order. Dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph traced without
moescope's hooks (the model compiled before the monitor attached, or another instance of
the same class compiled earlier in the process) was silently reused with the hooks
ignored: zero counts. Attaching a monitor turns hook guards on, process-wide; from then on
adding or removing hooks makes Dynamo retrace, so every attach order counts. Graphs
compiled *before* the guards were on carry no hook guard: the first attach then drops
Dynamo's caches (``torch._dynamo.reset()``, with a warning) so those graphs are retraced
with the hooks.

The op. Inside a compiled region the hook calls ``moescope::stage``, a
``torch.library.custom_op``: opaque to Dynamo (no graph break; ``fullgraph=True`` works
where the model itself compiles fullgraph), run every time the compiled graph runs, and
kept by the compiler because it declares a mutation. It copies its inputs (a compiled
graph may reuse their memory afterwards) and stages them like an eager hook.

CUDA graphs (``mode="reduce-overhead"``): a replay skips Python, so the op would run at
capture only and every replayed forward would be missing; the op raises during capture
instead, with what to do. Counting inside CUDA graphs would need the state written by
device ops into persistent buffers, which moescope does not do.
"""

from __future__ import annotations

import warnings

import torch

from moescope.capture.adapter import in_backward
from moescope.capture.pipeline import PIPELINES
from moescope.capture.record import RoutingRecord

__all__ = ["ensure_hook_guards", "stage_op"]

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


@torch.library.custom_op("moescope::stage", mutates_args=("ticket",))
def stage_op(
    ticket: torch.Tensor,
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
    """Stage a copy of one layer call into the pipeline with id ``pipeline``."""
    p = PIPELINES.get(pipeline)
    if p is None:
        return  # the monitor is gone; a graph traced while it was attached runs on
    if topk_index.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "moescope cannot count routing inside a CUDA graph (torch.compile "
            "mode='reduce-overhead' or a captured graph): replays skip Python, so every "
            "replayed forward would be missing. Compile with mode='default' or "
            "'max-autotune-no-cudagraphs' while monitoring."
        )
    if in_backward():
        return  # a checkpointed region recomputed during backward

    def own(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().clone()

    p.stage(
        RoutingRecord(
            layer=p.paths[layer],
            num_experts=num_experts,
            topk_index=own(topk_index),  # type: ignore[arg-type]
            logits=own(logits),
            score_fn=score_fn,  # type: ignore[arg-type]
            topk_weight=own(topk_weight),
            token_mask=own(token_mask),
            dropped=own(dropped),
        ),
        window or None,
    )


@stage_op.register_fake
def _stage_fake(*args: object) -> None:
    return None
