"""Neuron-level capture: hand each expert call's intermediate activations to a sink.

Hooks only capture; the counting lives in :mod:`moescope.stats.neurons`. For every MoE
layer call the sink receives ``sink(layer, h [N, I], expert_ids [N], row_valid [N] | None)``
with ``h = act(gate(x)) * up(x)`` (or ``act(W1 x)``) exactly as the model computed it,
detached, one row per kept (token, slot); ``row_valid`` is False for rows of padding
tokens. Nothing is stored: the sink consumes the tensors before the model goes on.

Per layer kind (:func:`neuron_tap` tells which applies):

- transformers fused experts (``@use_experts_implementation``: mixtral, qwen*_moe, olmoe,
  deepseek_v2/v3, gpt_oss, ...). The ``grouped_mm`` backend (transformers' default) and
  ``batched_mm`` call ``experts._apply_gate(gate_up)`` (or ``experts.act_fn`` when
  ``has_gate=False``): an instance attribute wrapping the model's own ``_apply_gate``
  passes its output on and returns it untouched, so outputs are bit-identical. Row order:
  ``grouped_mm`` sorts the flattened ``top_k_index`` with ``torch.sort`` and gathers
  ``hidden[perm // K]``; a pre-hook on ``experts`` repeats that very sort on the same
  tensor to know each row's expert and token (``batched_mm`` keeps the flattened order).
  Any other backend (``eager`` computes act(gate) * up inline, nothing to hook) is
  switched to ``grouped_mm`` for the duration of each experts call (``notify`` is told
  once) and restored right after; outputs then differ by the backends' documented
  < 1e-5. ``detach`` removes the hooks and the instance attribute.
- ``ModuleDict`` experts (switch_transformers, nllb_moe): a forward pre-hook on each
  expert's down projection (``wo`` / ``fc2``) reads its input; rows are the tokens the
  experts module dispatched to it in ``torch.where`` order, mapped back to tokens from
  the dispatch mask the experts module received.
- ``moescope.nn`` ``GroupedExperts``: its ``neuron_observer`` (token = slot // K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, Detach, LayerInfo
from moescope.capture.hf_structure import block_token_mask
from moescope.capture.hf_switch import stack_token_mask
from moescope.capture.hooks import CopySafePatch

if TYPE_CHECKING:
    from moescope.nn.experts import NeuronObserver

__all__ = ["NeuronSink", "NeuronTap", "attach_neurons", "neuron_tap"]

NeuronSink = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]

_READABLE_BACKENDS = ("grouped_mm", "batched_mm")


@dataclass
class NeuronTap:
    """How the neurons of one MoE layer are captured.

    ``kind``: ``"fused"`` (transformers ``@use_experts_implementation`` experts),
    ``"moduledict"`` (switch_transformers / nllb_moe) or ``"nn"`` (moescope.nn);
    ``intermediate_size``: I; ``experts``: the experts module.
    """

    layer: str
    kind: str
    intermediate_size: int
    experts: nn.Module


def _has_class(module: object, class_name: str) -> bool:
    return any(c.__name__ == class_name for c in type(module).__mro__)


def _fused_intermediate(experts: nn.Module) -> int | None:
    if not hasattr(experts, "has_gate") or not hasattr(experts, "_apply_gate"):
        return None  # not a @use_experts_implementation module (dbrx, llama4, custom)
    transposed = bool(getattr(experts, "is_transposed", False))
    if experts.has_gate:
        w = getattr(experts, "gate_up_proj", None)
        div = 2
    else:
        w = getattr(experts, "up_proj", None)
        div = 1
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        return None
    return int(w.shape[2] if transposed else w.shape[1]) // div


def neuron_tap(info: LayerInfo) -> NeuronTap | None:
    """The neuron capture of ``info``'s layer, or None when moescope cannot see its
    intermediate activations (dbrx, llama4, custom adapters)."""
    module = info.module
    experts = info.experts if info.experts is not None else getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    if info.adapter == "moescope.nn":
        size = getattr(experts, "intermediate_size", None)
        if hasattr(experts, "neuron_observer") and size is not None:
            return NeuronTap(info.path, "nn", int(size), experts)
        return None
    if isinstance(experts, nn.ModuleDict):
        first = next(iter(experts.values()), None)
        proj = _down_proj_of(first) if first is not None else None
        if proj is None or not isinstance(proj, nn.Linear):
            return None
        return NeuronTap(info.path, "moduledict", int(proj.in_features), experts)
    size = _fused_intermediate(experts)
    # The backend is read (and, for eager, switched) through experts.config.
    if size is None or not hasattr(getattr(experts, "config", None), "_experts_implementation"):
        return None
    return NeuronTap(info.path, "fused", size, experts)


def _down_proj_of(expert: nn.Module) -> nn.Module | None:
    for name in ("wo", "fc2"):
        m = getattr(expert, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def attach_neurons(
    info: LayerInfo,
    tap: NeuronTap,
    sink: NeuronSink,
    ctx: CaptureContext,
    notify: Callable[[str], None] | None = None,
) -> Detach:
    """Install the neuron hooks of one layer; returns a function that removes them.

    ``sink`` is called once per expert call (fused, nn) or once per expert
    (ModuleDict) while ``ctx.counting``; ``notify(message)`` is called when moescope must
    switch the layer's experts backend to see the activations.
    """
    if tap.kind == "fused":
        return _attach_fused(info, tap, sink, ctx, notify)
    if tap.kind == "moduledict":
        return _attach_moduledict(info, tap, sink, ctx)
    if tap.kind == "nn":
        return _attach_nn(info, tap, sink, ctx)
    raise ValueError(f"unknown neuron tap kind {tap.kind!r}")


# --------------------------------------------------------------------- transformers fused


def _attach_fused(
    info: LayerInfo,
    tap: NeuronTap,
    sink: NeuronSink,
    ctx: CaptureContext,
    notify: Callable[[str], None] | None,
) -> Detach:
    experts = tap.experts
    path = info.path
    # The model's PretrainedConfig (a plain attribute, which torch types Tensor | Module).
    config: Any = experts.config
    index_arg = info.index_arg
    # Routing of the call in flight: (sorted expert ids [N], row validity [N] | None).
    pending: dict[str, Any] = {}
    switched: dict[str, Any] = {}

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pending.clear()
        impl = getattr(config, "_experts_implementation", None)
        if impl not in _READABLE_BACKENDS:
            # Switch also while not counting (checkpoint recomputation) so a recomputed
            # forward runs the same backend as the forward it replays.
            switched["impl"] = impl
            config._experts_implementation_internal = "grouped_mm"
            if notify is not None:
                notify(
                    f"moescope: neuron capture runs the experts of {path} with the "
                    f"'grouped_mm' backend instead of {impl!r} ('eager' computes act(gate)*up "
                    "inline, with nothing to hook); outputs differ by < 1e-5. Call "
                    "model.set_experts_implementation('grouped_mm') to avoid the switch."
                )
            impl = "grouped_mm"
        if not ctx.counting:
            return
        idx = args[1] if len(args) > 1 else kwargs.get(index_arg)
        if not isinstance(idx, torch.Tensor):
            return
        with torch.no_grad():
            k = idx.shape[-1]
            flat = idx.reshape(-1)
            mask = block_token_mask(ctx, path, flat.shape[0] // k)
            if impl == "grouped_mm":
                # The very call grouped_mm_experts_forward makes on the same tensor, so
                # the permutation (ties included) is the model's.
                ids, perm = torch.sort(flat)
                valid = None if mask is None else mask[torch.div(perm, k, rounding_mode="floor")]
            else:  # batched_mm: rows in flattened (token, slot) order
                ids = flat
                valid = None if mask is None else mask.repeat_interleave(k)
        pending["ids"] = ids
        pending["valid"] = valid

    def post_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        pending.clear()
        if "impl" in switched:
            config._experts_implementation_internal = switched.pop("impl")

    def observe(h: torch.Tensor) -> None:
        ids = pending.get("ids")
        if ids is None or not ctx.counting or h.dim() != 2 or h.shape[0] != ids.shape[0]:
            return
        sink(path, h.detach(), ids, pending.get("valid"))

    handles = [
        experts.register_forward_pre_hook(pre_hook, with_kwargs=True),
        experts.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]
    restore: Callable[[], None]
    if experts.has_gate:
        # A bound method (or a previous instance wrapper); torch types it Tensor | Module.
        original = cast("Callable[[torch.Tensor], torch.Tensor]", experts._apply_gate)

        def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
            h = original(gate_up)
            observe(h)
            return h

        restore = CopySafePatch(experts, "_apply_gate", apply_gate).install()

    else:
        # A module or a plain function; torch types every module attribute Tensor | Module.
        act = cast("Callable[[torch.Tensor], torch.Tensor]", experts.act_fn)
        if isinstance(act, nn.Module):
            handles.append(act.register_forward_hook(lambda m, a, out: observe(out)))

            def restore() -> None:
                return None

        else:

            def act_fn(x: torch.Tensor) -> torch.Tensor:
                h = act(x)
                observe(h)
                return h

            restore = CopySafePatch(experts, "act_fn", act_fn).install()

    def detach() -> None:
        for hd in handles:
            hd.remove()
        restore()
        pending.clear()
        if "impl" in switched:
            config._experts_implementation_internal = switched.pop("impl")

    return detach


# ------------------------------------------------------------------- ModuleDict experts


def _rows_valid(sel: torch.Tensor, valid: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows] bool: validity of the rows ``torch.where(sel)`` selects, in its order.

    ``sel`` [C, T] bool (row-major nonzeros = dispatch order), ``valid`` [T] bool. A
    cumulative sum ranks the selected positions; a scatter writes each one's token
    validity at its rank (no host sync: unselected positions land in a dropped slot).
    """
    c = sel.shape[0]
    flat = sel.reshape(-1)
    rank = flat.long().cumsum(0) - 1
    target = torch.where(flat, rank, n_rows).clamp_(max=n_rows)
    out = torch.zeros(n_rows + 1, dtype=torch.bool, device=sel.device)
    out.scatter_(0, target, valid.to(sel.device).bool().repeat(c))
    return out[:n_rows]


def _attach_moduledict(
    info: LayerInfo, tap: NeuronTap, sink: NeuronSink, ctx: CaptureContext
) -> Detach:
    experts = tap.experts
    path = info.path
    nllb = _has_class(experts, "NllbMoeExperts") or info.adapter == "hf_nllb_moe"
    pending: dict[str, Any] = {}

    def experts_pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pending.clear()
        if not ctx.counting:
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        disp = (
            args[1] if len(args) > 1 else kwargs.get("router_mask" if nllb else "selected_experts")
        )
        if not isinstance(hidden, torch.Tensor) or not isinstance(disp, torch.Tensor):
            return
        t = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        pending["disp"] = disp
        pending["mask"] = stack_token_mask(ctx, path, t)
        pending["t"] = t

    def experts_post(
        mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        pending.clear()

    def make_hook(e: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def proj_pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if "disp" not in pending or not ctx.counting or not args:
                return
            h = args[0]
            h = h.reshape(-1, h.shape[-1])
            n = h.shape[0]
            mask = pending["mask"]
            valid = None
            if mask is not None:
                with torch.no_grad():
                    disp = pending["disp"]
                    t = pending["t"]
                    if nllb:
                        # NllbMoeExperts one-hot encodes its [T, E] mask: "expert_e" gets
                        # the (column, token) pairs whose mask value is e, column-major.
                        sel = (disp.reshape(t, -1) == e).t()
                    else:
                        # SwitchTransformersExperts: [T, 1, E] one-hot dispatch.
                        sel = (disp.reshape(t, -1, disp.shape[-1])[..., e] != 0).t()
                    valid = _rows_valid(sel, mask, n)
            ids = torch.full((n,), e, dtype=torch.long, device=h.device)
            sink(path, h.detach(), ids, valid)

        return proj_pre

    handles = [
        experts.register_forward_pre_hook(experts_pre, with_kwargs=True),
        experts.register_forward_hook(experts_post, with_kwargs=True, always_call=True),
    ]
    assert isinstance(experts, nn.ModuleDict)  # neuron_tap's "moduledict" kind
    for name, expert in experts.items():
        proj = _down_proj_of(expert)
        if proj is None or not name.startswith("expert_"):
            continue
        handles.append(proj.register_forward_pre_hook(make_hook(int(name.split("_")[-1]))))

    def detach() -> None:
        for hd in handles:
            hd.remove()
        pending.clear()

    return detach


# ------------------------------------------------------------------------- moescope.nn


def _attach_nn(info: LayerInfo, tap: NeuronTap, sink: NeuronSink, ctx: CaptureContext) -> Detach:
    experts = tap.experts
    layer = info.module
    path = info.path
    pending: dict[str, Any] = {}
    own: dict[str, torch.Tensor | None] = {"mask": None}
    # GroupedExperts.neuron_observer (neuron_tap's "nn" kind); torch types it Tensor | Module.
    previous = cast("NeuronObserver | None", experts.neuron_observer)

    def layer_pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("token_mask", args[1] if len(args) > 1 else None)
        own["mask"] = mask.reshape(-1) if isinstance(mask, torch.Tensor) else None

    def experts_pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pending.clear()
        if not ctx.counting:
            return
        idx = args[1] if len(args) > 1 else kwargs.get("topk_index")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            return
        t, k = idx.shape
        mask = ctx.token_mask(t)
        if mask is None:
            m = own["mask"]
            mask = m.bool() if m is not None and m.numel() == t else None
        pending["k"] = k
        pending["mask"] = mask

    def observer(h: torch.Tensor, expert_ids: torch.Tensor, slot_ids: torch.Tensor) -> None:
        if previous is not None:
            previous(h, expert_ids, slot_ids)
        if "k" not in pending or not ctx.counting:
            return
        mask = pending["mask"]
        valid = None
        if mask is not None:
            valid = mask[torch.div(slot_ids, pending["k"], rounding_mode="floor")]
        sink(path, h, expert_ids, valid)

    handles = [
        layer.register_forward_pre_hook(layer_pre, with_kwargs=True),
        experts.register_forward_pre_hook(experts_pre, with_kwargs=True),
    ]
    restore = CopySafePatch(experts, "neuron_observer", observer).install()

    def detach() -> None:
        for hd in handles:
            hd.remove()
        restore()
        pending.clear()
        own["mask"] = None

    return detach
