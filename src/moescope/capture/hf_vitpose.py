"""Task-indexed experts (vitpose_backbone): out of scope, with a clear error.

ViTPose++ (Xu et al. 2022, arXiv:2212.04246) gives its backbone MLP one expert per
training dataset: ``VitPoseBackboneMoeMLP`` runs ``experts[i]`` on the tokens of images
whose ``dataset_index`` is ``i``, an index the CALLER passes in. There is no router and
no routing decision to monitor (expert usage is the dataset mix of the batch), so
moescope does not monitor such blocks: :class:`TaskIndexedExpertsAdapter` recognises
them and raises :class:`~moescope.errors.UnsupportedModelError` naming the block, instead
of a generic "no MoE layer found". A user adapter registered with a higher priority
(``register_adapter``, the default priority) still wins over this one.

Recognised by structure: a block with an ``experts`` ModuleList / ModuleDict, no router
child (``hf_structure.ROUTER_NAMES``), whose forward takes the expert ``indices``.
"""

from __future__ import annotations

import inspect

from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, Emit, LayerInfo
from moescope.capture.hf_structure import find_router
from moescope.errors import UnsupportedModelError

__all__ = ["ADAPTERS", "TaskIndexedExpertsAdapter"]

_INDEX_ARGS = ("indices", "dataset_index", "task_index", "expert_index")


def _takes_index(fn: object) -> bool:
    try:
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(p in params for p in _INDEX_ARGS)


class TaskIndexedExpertsAdapter:
    """Raises UnsupportedModelError for blocks whose expert is chosen by the caller."""

    name = "hf_task_indexed_experts"

    def match(self, path: str, module: nn.Module) -> LayerInfo | None:
        experts = getattr(module, "experts", None)
        if not isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
            return None
        if find_router(module, exclude=experts) is not None:
            return None
        if not (_takes_index(module.forward) or _takes_index(experts.forward)):
            return None
        raise UnsupportedModelError(
            f"{path or type(module).__name__} ({type(module).__name__}) is not monitored: its "
            f"{len(experts)} experts are picked by an index the caller passes in (one expert "
            "per task or dataset, e.g. VitPose's dataset_index), not by a router, so there "
            "is no routing to measure; expert usage is the task mix of the batch. "
            "moescope declares such task-indexed experts out of scope. To count them "
            "anyway, register your own adapter for this block (docs/custom_adapter.md); "
            "it takes precedence over this check."
        )

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach:
        raise UnsupportedModelError(f"{info.path}: task-indexed experts are not monitored")


# Picked up by moescope.capture.registry (priority PRIORITY_DEDICATED).
ADAPTERS: list[TaskIndexedExpertsAdapter] = [TaskIndexedExpertsAdapter()]
