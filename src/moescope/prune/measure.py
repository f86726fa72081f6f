"""One calibration pass: expert frequency, router-weight mass and REAP saliency per layer.

:func:`measure_saliency` streams batches through a model with a
:class:`~moescope.monitor.MoEMonitor` attached (frequency = ``usage_counts``, router-weight
mass = ``weight_sums``, neuron statistics when asked) and a :class:`ReapCapture`, which
needs what the monitor does not keep: the norm of every chosen expert's output.

How REAP reads expert outputs: a forward pre-hook on the experts module receives the
tokens x [T, H], the chosen ids [T, K] and the combine weights [T, K]; it runs the
module's own ``forward`` once per slot k with that slot's ids and a weight of 1, which
returns f_{i_k}(x) [T, H] computed by the family's own code (fused layouts, biases,
activations and experts backends included). That repeats the experts' compute once (K
calls of one slot), in the calibration pass only. Calling ``forward`` (not the module)
fires no hook, and the monitor's ``ctx.counting`` is switched off meanwhile, so neuron
statistics count each slot once. Accumulation stays on the device (``scatter_add_``, no
host sync, a loop over the K slots only).

Supported experts modules: those called ``experts(hidden, top_k_index, top_k_weights)``
(transformers' fused experts, found by the generic adapter) and
:class:`moescope.nn.GroupedExperts` (``dropped`` slots excluded). Other layers get no
REAP score (``LayerSaliency.reap`` None) and are ordered by frequency or weight mass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from moescope.capture.adapter import CaptureContext, LayerInfo
from moescope.capture.hf_structure import block_token_mask, int_attr
from moescope.monitor import MoEMonitor
from moescope.nn.experts import GroupedExperts
from moescope.prune.saliency import LayerSaliency, reap_saliency
from moescope.stats.neurons import NeuronOptions

__all__ = [
    "ReapCapture",
    "default_forward",
    "measure_saliency",
    "reap_supported",
    "router_groups",
]

_GROUP_ATTRS = ("n_group", "num_group", "n_groups", "num_groups", "num_expert_group")


def router_groups(info: LayerInfo) -> int:
    """G, the router's expert groups (DeepSeek-V3 ``n_group``; 1 = ungrouped), read off
    the router, then the block's or the model's config."""
    router = info.router
    g = int_attr(router, _GROUP_ATTRS) if router is not None else None
    if g is None:
        cfg = getattr(info.module, "config", None)
        g = int_attr(cfg, _GROUP_ATTRS) if cfg is not None else None
    return int(g or 1)


def _experts_of(info: LayerInfo) -> nn.Module | None:
    mod: Any = (
        info.expert_modules[0]
        if len(info.expert_modules) == 1
        else getattr(info.module, "experts", None)
    )
    if not isinstance(mod, nn.Module) or isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
        return None
    return mod


def reap_supported(info: LayerInfo) -> bool:
    """Whether :class:`ReapCapture` can read this layer's expert outputs (an experts
    module called with ``(hidden, index, weights)``: the generic transformers adapter's
    fused experts, or moescope.nn's GroupedExperts)."""
    return _experts_of(info) is not None and info.adapter in (
        "transformers.generic",
        "moescope.nn",
    )


def _arg_names(fn: Any) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self"]


class ReapCapture:
    """Per-layer sums of g_e(x) * ||f_e(x)|| and slot counts [E], on the model's device.

    ``layers``: the monitor's :class:`LayerInfo` list; layers whose experts module does
    not take ``(hidden, index, weights)`` are skipped (:attr:`supported`). ``ctx``: the
    monitor's capture context (padding mask, and ``counting`` paused around the extra
    expert calls), or None (every token counts).
    """

    def __init__(self, layers: Iterable[LayerInfo], ctx: CaptureContext | None = None):
        self.ctx = ctx
        self._targets: dict[str, tuple[LayerInfo, nn.Module]] = {}
        for info in layers:
            experts = _experts_of(info)
            if experts is not None and reap_supported(info):
                self._targets[info.path] = (info, experts)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    @property
    def supported(self) -> list[str]:
        """Paths of the layers whose REAP saliency is measured."""
        return list(self._targets)

    def attach(self) -> ReapCapture:
        for path, (info, experts) in self._targets.items():
            self._handles.append(
                experts.register_forward_pre_hook(self._hook(path, info, experts), with_kwargs=True)
            )
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ReapCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _hook(
        self, path: str, info: LayerInfo, experts: nn.Module
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        names = _arg_names(experts.forward)
        names += ["hidden_states", "top_k_index", "top_k_weights", "dropped"][len(names) :]
        grouped = isinstance(experts, GroupedExperts)
        e = info.num_experts

        def arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> Any:
            return args[i] if len(args) > i else kwargs.get(names[i])

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ctx = self.ctx
            if ctx is not None and not ctx.counting:
                return
            x, idx, w = arg(args, kwargs, 0), arg(args, kwargs, 1), arg(args, kwargs, 2)
            if not all(isinstance(t, torch.Tensor) for t in (x, idx, w)):
                return
            k = idx.shape[-1]
            idx = idx.reshape(-1, k)
            t = idx.shape[0]
            x = x.reshape(t, -1)
            w = w.reshape(t, k)
            dropped = arg(args, kwargs, 3) if grouped else None
            valid = idx < e
            if isinstance(dropped, torch.Tensor):
                valid = valid & ~dropped.reshape(t, k)
            mask = block_token_mask(ctx, path, t) if ctx is not None else None
            if mask is not None:
                valid = valid & mask.to(valid.device).unsqueeze(-1)
            norms = torch.empty(t, k, dtype=torch.float32, device=x.device)
            ones = torch.ones(t, 1, dtype=w.dtype, device=w.device)
            safe = torch.where(valid, idx, 0)
            if ctx is not None:
                ctx.counting = False  # the calls below must not count for the monitor
            try:
                for slot in range(k):  # K calls, never a loop over experts
                    one = safe[:, slot : slot + 1]
                    out = (
                        module.forward(x, one, ones, None)
                        if grouped
                        else module.forward(x, one, ones)
                    )
                    norms[:, slot] = out.reshape(t, -1).float().norm(dim=-1)
            finally:
                if ctx is not None:
                    ctx.counting = True
            gated = (w.float() * norms).masked_fill(~valid, 0.0)
            slot_id = torch.where(valid, idx, e).reshape(-1).long()
            sums = self._sums.get(path)
            if sums is None:
                sums = self._sums[path] = torch.zeros(e + 1, dtype=torch.float64, device=x.device)
                self._counts[path] = torch.zeros(e + 1, dtype=torch.float64, device=x.device)
            sums.scatter_add_(0, slot_id, gated.reshape(-1).double())
            self._counts[path].scatter_add_(0, slot_id, valid.reshape(-1).double())

        return pre_hook

    def result(self) -> dict[str, np.ndarray]:
        """``{layer: REAP saliency [E]}`` (one host copy per layer; zeros for a layer that
        saw no token)."""
        out = {}
        for path, (info, _) in self._targets.items():
            s = self._sums.get(path)
            if s is None:
                out[path] = np.zeros(info.num_experts)
                continue
            host = s.cpu().numpy()[: info.num_experts]
            cnt = self._counts[path].cpu().numpy()[: info.num_experts]
            out[path] = reap_saliency(host, cnt)
        return out


def default_forward(model: nn.Module, ids: torch.Tensor) -> Any:
    """One no-grad forward of ``ids`` [B, S] (no padding, no KV cache)."""
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids)}
    try:
        if "use_cache" in inspect.signature(model.forward).parameters:
            kwargs["use_cache"] = False
    except (TypeError, ValueError):
        pass
    return model(input_ids=ids, **kwargs)


def measure_saliency(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    neurons: bool | NeuronOptions = False,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    device: torch.device | str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[LayerSaliency]:
    """Frequency, router-weight mass and REAP saliency of every MoE layer of ``model``
    over ``batches`` ([B, S] int64 token ids each), in one pass.

    ``neurons``: also track neuron statistics (``MoEMonitor(neurons=...)``); they land in
    ``LayerSaliency.activated_neurons`` / ``dead_neurons``. ``forward(model, ids)``: how
    to run one batch (default :func:`default_forward`). ``device``: where ids go (default:
    the first parameter's). ``should_stop``: polled between batches.

    Raises:
        UnsupportedModelError: no MoE layer found.
    """
    fwd = forward or default_forward
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    monitor = MoEMonitor(model, history=0, coactivation=False, neurons=neurons)
    reap = ReapCapture(monitor.layers, monitor.ctx)
    try:
        with reap, torch.no_grad():
            for ids in batches:
                if should_stop is not None and should_stop():
                    break
                fwd(model, ids.to(device))
        snap = monitor.snapshot(reset=True)
    finally:
        monitor.detach()
    scores = reap.result()
    out = []
    for info in monitor.layers:
        st = snap.layers[info.path]
        out.append(
            LayerSaliency(
                layer=info.path,
                num_experts=info.num_experts,
                top_k=info.top_k,
                tokens=int(st.num_tokens),
                frequency=np.asarray(st.usage_counts, dtype=np.int64),
                weight_mass=np.asarray(st.weight_sums, dtype=np.float64),
                reap=scores.get(info.path),
                num_groups=router_groups(info),
                activated_neurons=st.expert_activated_mean,
                dead_neurons=st.expert_dead_neurons,
            )
        )
    return out
