"""MoEMonitor: the front end of the monitor core for a model in this process.

Data flow (docs/capture.md): the monitor owns every hook of the model. Adapter hooks emit
one RoutingRecord per MoE layer call into the core's
:class:`~moescope.capture.pipeline.CapturePipeline`, which stages it by reference (no
device op) and reduces staged calls in batches, or, graph-safe, adds each call at once
into persistent buffers; neuron taps feed the window's
:class:`~moescope.stats.neurons.NeuronStats` through the same pipeline. The core
(:class:`~moescope.core.MonitorCore`, shared with the vLLM worker's monitor) holds the
windows ("train", "eval", ...: named sets of sums inside one monitor) and reads them with
ONE host transfer; ``snapshot()`` adds the ``UsageHistory`` row and the alert rules, and
never resets unless asked.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from moescope.capture.adapter import (
    Detach,
    ForwardOnlyContext,
    LayerInfo,
    MoEAdapter,
    argument_position,
    attach_all,
    forward_argument,
    in_backward,
    top_level_hooks,
)
from moescope.capture.compiled import ensure_hook_guards
from moescope.capture.hooks import hook_keys, wrap_new_hooks
from moescope.capture.neurons import NeuronTap, attach_neurons, neuron_tap
from moescope.capture.pipeline import DEFAULT_BUDGET_BYTES, CapturePipeline
from moescope.capture.record import RoutingRecord
from moescope.capture.registry import default_adapters, find_moe_layers
from moescope.core import CoreLayer, MonitorCore
from moescope.errors import UnsupportedModelError
from moescope.stats.history import UsageHistory
from moescope.stats.neurons import (
    NeuronCalibrator,
    NeuronOptions,
    NeuronThreshold,
    as_threshold,
    tau_for_sparsity,
)
from moescope.stats.snapshot import Snapshot

__all__ = ["MoEMonitor", "find_moe_layers"]


def _unknown_arguments(unknown: dict[str, Any]) -> TypeError:
    known = [p for p in inspect.signature(MoEMonitor.__init__).parameters if p != "self"]
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(
        f"MoEMonitor got unexpected keyword argument(s) {', '.join(parts)}; it takes "
        f"{', '.join(known)}"
    )


class MoEMonitor:
    """Watches every MoE layer of ``model`` and reports routing statistics per window.

    Args:
        model: any ``nn.Module`` containing MoE blocks (transformers MoE families,
            ``moescope.nn.MoELayer``, or custom blocks with a registered adapter).
        adapters: adapters to try, highest priority first; None = the registry's
            default list (``moescope.capture.default_adapters()``).
        history: rows kept per layer in ``self.history`` (a ``UsageHistory``), or a
            ready ``UsageHistory``, or 0/None for no history.
        coactivation: keep the [E, E] co-activation matrix per layer.
        alert_rules: an ``AlertRules`` checked at every snapshot (fired alerts are in
            ``self.last_alerts``).
        attach: install the hooks now (else call ``attach()`` or use ``with monitor:``).
        process_group: the torch.distributed group to reduce over at snapshot time
            (default: the world, when initialised with more than one rank): ranks that
            see different tokens through the SAME layers (data/expert parallel).
        stage_group: the group of pipeline stages (ranks holding DIFFERENT layers, one
            per stage): each snapshot gathers the other stages' layers over it, so every
            rank reports every layer. A stage without any MoE layer is accepted then (it
            must take part in the gather). None: each rank reports its own layers.
        neurons: also count the activated neurons inside every chosen expert (see
            ``moescope.stats.neurons``): h = act(gate(x)) * up(x) of every kept
            (token, slot), counted as it passes and never stored. ``True`` uses the
            default :class:`~moescope.stats.neurons.NeuronOptions` (threshold
            ``magnitude(0.1)``, 32 histogram bins, per-neuron firing counts, 8 hot
            neurons); a ``NeuronOptions(...)`` chooses them. False: routing only.
        counts_only: stage only the chosen experts (serving): usage counts, balance,
            dropped and unique experts per forward; no router-probability metrics
            (entropy, aux/z loss, top-1 are NaN). Fewer ops and bytes per layer call.
        split_by_mode: count each layer call in the window ``"train"`` or ``"eval"``
            after the MoE block's ``training`` flag (what the training integrations
            use), unless :meth:`use_window` forces one.
        budget_bytes: staged router tensors (held by reference until reduced) that
            trigger a flush; see ``moescope.capture.pipeline``.
        graph_safe: add every layer call at once into persistent on-device buffers
            (in-place device ops, no Python needed at replay), so that CUDA graphs
            (``torch.compile(mode="reduce-overhead")``, static-cache generation) count
            at every replay. Costs the per-call reduction (tens of device ops per layer
            call, inside the graph); the default staged path is cheaper where no graph
            is replayed. Under a replay, calls count in the window that was current when
            the graph was captured.

    Raises:
        UnsupportedModelError: no adapter recognised any module of ``model`` (and no
            ``stage_group`` says it is one pipeline stage of a larger model).

    Windows: all counts go to the current window (``"default"`` unless ``split_by_mode``
    or :meth:`use_window` says otherwise); ``snapshot(window=...)`` / ``reset(window=...)``
    read or clear one window.

    Counting rules: a token counts when the top-level forward's ``attention_mask`` (its
    last S columns under a KV cache; else the layer's own mask) marks it real; a forward
    recomputed by gradient checkpointing during backward is not counted again; records
    with NaN/inf router rows are excluded and counted in ``nonfinite_tokens``.

    Aux-loss convention: ``LayerStats.aux_loss`` is the Switch/transformers
    load-balancing loss of ONE layer, ``E * sum_e f_e P_e`` with ``f_e`` = top-k
    assignments to e per valid token (sums to K) and ``P_e`` = mean router probability,
    over the window. transformers' ``outputs.aux_loss / router_aux_loss_coef`` instead
    averages f and P over layers first, ``E * sum_e mean_l(f_le) * mean_l(P_le)``, which
    is not the mean of the per-layer losses (tests/test_capture_hf.py checks both).
    ``Snapshot.avg_aux_loss`` is the mean of the per-layer values.

    The monitor never changes the model's computation: outputs, gradients and the RNG
    state are identical with or without it, and ``detach()`` removes every hook.
    One exception, with ``neurons=True`` only: transformers experts running the ``eager``
    backend (nothing to hook there) are run with ``grouped_mm`` while attached (a warning
    says so once; outputs differ by < 1e-5, the backends' documented difference).

    Neuron thresholds can be calibrated to a target sparsity (CATS / TEAL)::

        mon = MoEMonitor(model, neurons=True)
        with mon.calibration():          # forwards here only fill |h| histograms
            model(calibration_batch)
        mon.set_neuron_threshold(calibrated=0.5)   # per-layer tau: 50 % of |h| below it
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Sequence[MoEAdapter] | None = None,
        history: int | UsageHistory | None = 1000,
        coactivation: bool = True,
        alert_rules: Any | None = None,
        attach: bool = True,
        process_group: Any | None = None,
        stage_group: Any | None = None,
        neurons: bool | NeuronOptions = False,
        counts_only: bool = False,
        split_by_mode: bool = False,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        graph_safe: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise _unknown_arguments(unknown)
        if not isinstance(model, nn.Module):
            raise TypeError(f"MoEMonitor needs a torch.nn.Module, got {type(model).__name__}")
        if adapters is None:
            adapters = default_adapters()
        self.model = model
        self.adapters: list[MoEAdapter] = list(adapters)
        found = find_moe_layers(model, self.adapters)
        # A pipeline stage of dense layers only still joins its stages' gather.
        if not found and stage_group is None:
            names = ", ".join(a.name for a in self.adapters) or "none"
            raise UnsupportedModelError(
                f"No MoE layer found in {type(model).__name__}: none of the adapters "
                f"[{names}] matched any of its modules. If the model has MoE layers, "
                "write an adapter implementing the protocol "
                "moescope.capture.adapter.MoEAdapter (match(path, module) -> LayerInfo | "
                "None; attach(info, emit, ctx) -> detach), e.g. with "
                "moescope.capture.SimpleAdapter, and register it with "
                "moescope.register_adapter(...) or pass adapters=[...]. "
                "See docs/custom_adapter.md."
            )
        self._pairs = found
        self.layers: list[LayerInfo] = [info for _, info in found]
        for info in self.layers:
            if not info.path:
                info.path = type(model).__name__
        self._by_path = {info.path: info for info in self.layers}
        self._meta_check()
        self.coactivation = coactivation
        self.alert_rules = alert_rules
        self.process_group = process_group
        if isinstance(history, UsageHistory):
            self.history: UsageHistory | None = history
        else:
            self.history = UsageHistory(maxlen=int(history)) if history else None
        self.last_alerts: list[Any] = []
        self.last_snapshot: Snapshot | None = None
        self.ctx = ForwardOnlyContext()
        self._detaches: list[Detach] = []
        self._num_snapshots = 0
        self._mask_pos = argument_position(model, "attention_mask")
        self.split_by_mode = bool(split_by_mode)
        self._forced_window: str | None = None
        if isinstance(neurons, NeuronOptions):
            options: NeuronOptions | None = neurons
        elif isinstance(neurons, bool):
            options = NeuronOptions() if neurons else None
        else:
            raise TypeError(
                "neurons must be True, False or a moescope.NeuronOptions(threshold=..., "
                f"hist_bins=..., per_neuron=..., hot_neurons=...), got {neurons!r}"
            )
        self.neurons = options is not None
        #: The neuron settings (None without neuron monitoring).
        self.neuron_options = options
        # The rule in force; set_neuron_threshold replaces it (e.g. after calibration).
        self.neuron_threshold = as_threshold(None if options is None else options.threshold)
        self._taps: dict[str, NeuronTap] = {}
        self._calibrators: dict[str, NeuronCalibrator] = {}
        self._calibrating = False
        self._switch_warned = False
        if self.neurons:
            self._setup_taps()
        #: The monitor core: pipeline, windows, reduction, host copy (moescope.core).
        self.core = MonitorCore(
            [
                CoreLayer(
                    info.path,
                    info.num_experts,
                    info.top_k,
                    self._default_device(info),
                    self._taps[info.path].intermediate_size if info.path in self._taps else None,
                    info.expert_bias,
                )
                for info in self.layers
            ],
            coactivation=coactivation,
            counts_only=counts_only,
            graph_safe=graph_safe,
            budget_bytes=budget_bytes,
            neurons=options,
            threshold=lambda path: self.neuron_threshold.for_layer(path),
            process_group=process_group,
            stage_group=stage_group,
            windows=("train", "eval") if self.split_by_mode else (),
        )
        self.pipeline: CapturePipeline = self.core.pipeline
        # Forwards may run in one thread while a timer thread snapshots (serving): one lock
        # with the pipeline makes staging, flushes (also those a forward triggers) and the
        # flush-copy-reset of snapshot() atomic to each other.
        self._lock = self.pipeline.lock
        if attach:
            self.attach()

    # ------------------------------------------------------------------ windows

    @property
    def window(self) -> str:
        """The window layer calls are counted in now (when not split by mode)."""
        return self.pipeline.window

    @property
    def forced_window(self) -> str | None:
        """The window :meth:`set_window` forced, or None (default choice)."""
        return self._forced_window

    @property
    def windows(self) -> list[str]:
        """Names of the windows that exist."""
        return self.core.windows

    def set_window(self, name: str) -> None:
        """Count the following layer calls in window ``name`` (overrides
        ``split_by_mode`` until :meth:`clear_window`). Staged calls are reduced into the
        window they were made in first."""
        with self._lock:
            self.pipeline.flush()
            self.core.declare(str(name))
            self._forced_window = str(name)
            self.pipeline.window = str(name)

    def clear_window(self) -> None:
        """Back to the default window choice (``split_by_mode`` or ``"default"``)."""
        with self._lock:
            self.pipeline.flush()
            self._forced_window = None
            self.pipeline.window = "default"

    @contextmanager
    def use_window(self, name: str) -> Iterator[MoEMonitor]:
        """Count the forwards inside the block in window ``name``."""
        previous = self._forced_window
        self.set_window(name)
        try:
            yield self
        finally:
            if previous is None:
                self.clear_window()
            else:
                self.set_window(previous)

    def _window_of(self, info: LayerInfo) -> str | None:
        if self._forced_window is None and self.split_by_mode:
            return "train" if info.module.training else "eval"
        return None  # the pipeline's current window

    # ------------------------------------------------------------------ hooks

    def _top_pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if in_backward():
            return  # a checkpointed top level re-running: keep the mask of the forward
        mask = forward_argument(args, kwargs, "attention_mask", self._mask_pos)
        self.ctx.attention_mask = mask if isinstance(mask, torch.Tensor) else None
        dec_mask = kwargs.get("decoder_attention_mask")
        self.ctx.decoder_attention_mask = dec_mask if isinstance(dec_mask, torch.Tensor) else None
        for listener in self.pipeline.listeners:
            start = getattr(listener, "forward_start", None)
            if start is not None:
                start(args, kwargs)

    def _top_post_hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not in_backward():
            # A later direct call of a sub-module must not inherit this forward's mask.
            self.ctx.attention_mask = None
            self.ctx.decoder_attention_mask = None
            for listener in self.pipeline.listeners:
                end = getattr(listener, "forward_end", None)
                if end is not None:
                    end(out)

    def add_consumer(self, consumer: Any) -> None:
        """Also send every routing batch (all windows) to ``consumer`` (``update(batch)``;
        see ``moescope.capture.pipeline.Consumer``). If it defines ``forward_start(args,
        kwargs)`` / ``forward_end(output)``, they are called around each top-level forward
        (``output`` is None when the forward raised; ``forward_end`` may call
        ``monitor.pipeline.flush()`` to receive that forward's layer calls at once). The monitor's hooks serve it: nothing is hooked twice."""
        with self._lock:
            self.pipeline.flush()
            if consumer not in self.pipeline.listeners:
                self.pipeline.listeners.append(consumer)

    def remove_consumer(self, consumer: Any) -> None:
        """Stop sending batches to ``consumer`` (staged calls are delivered first)."""
        with self._lock:
            self.pipeline.flush()
            if consumer in self.pipeline.listeners:
                self.pipeline.listeners.remove(consumer)

    @property
    def attached(self) -> bool:
        return bool(self._detaches)

    def _meta_check(self) -> None:
        for info in self.layers:
            for p in itertools.chain(info.module.parameters(), info.module.buffers()):
                if p.is_meta:
                    raise ValueError(
                        f"{info.path} has weights on the meta device (a model built without "
                        "memory): nothing can be counted. Load real weights first, e.g. "
                        "from_pretrained(...) or model.to_empty(device='cpu') followed by "
                        "load_state_dict(...)."
                    )
                break

    def attach(self) -> MoEMonitor:
        """Install the hooks (idempotent). Returns self.

        Also turns on Dynamo's guards on module hooks, so that a model compiled before or
        after this call is (re)traced with the hooks (see ``moescope.capture.compiled``).
        """
        if self._detaches:
            return self
        self._meta_check()
        ensure_hook_guards()
        modules = list(self.model.modules())
        before = hook_keys(modules)
        steps = top_level_hooks(self.model, self._top_pre_hook, self._top_post_hook)
        steps += [partial(a.attach, info, self._emit, self.ctx) for a, info in self._pairs]
        steps += [
            partial(
                attach_neurons,
                info,
                self._taps[info.path],
                self._emit_neurons,
                self.ctx,
                self._notify,
            )
            for info in self.layers
            if info.path in self._taps
        ]
        self._detaches = attach_all(steps)
        # Every hook just added (ours and any third-party adapter's) runs for its own
        # module only and is inert in a deep copy or an unpickled model.
        wrap_new_hooks(modules, before)
        return self

    def detach(self) -> None:
        """Remove every hook and restore anything an adapter patched (idempotent).

        Accumulated sums are kept: ``snapshot()`` still works afterwards.
        """
        detaches, self._detaches = self._detaches, []
        for d in reversed(detaches):
            d()
        self.pipeline.flush()  # what was counted before detaching is kept
        self.ctx.attention_mask = None
        self.ctx.decoder_attention_mask = None

    def __enter__(self) -> MoEMonitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ accumulation

    def _emit(self, record: RoutingRecord) -> None:
        if self._calibrating:
            return  # calibration forwards feed only the neuron histograms
        info = self._by_path.get(record.layer)
        self.pipeline.emit(record, None if info is None else self._window_of(info))

    # ------------------------------------------------------------------ neurons

    def _setup_taps(self) -> None:
        unsupported = []
        for info in self.layers:
            tap = neuron_tap(info)
            if tap is None:
                unsupported.append(f"{info.path} ({info.adapter})")
            else:
                self._taps[info.path] = tap
        if not self._taps:
            raise UnsupportedModelError(
                "neurons=True, but moescope cannot see the intermediate activations of any "
                f"MoE layer of {type(self.model).__name__}: {', '.join(unsupported)}. Neuron "
                "capture supports transformers experts built with @use_experts_implementation, "
                "switch_transformers / nllb_moe and moescope.nn.GroupedExperts; use "
                "neurons=False for routing statistics only."
            )
        if unsupported:
            warnings.warn(
                "moescope: no neuron statistics for " + ", ".join(unsupported) + " (their "
                "experts expose no intermediate activations); routing is still monitored.",
                stacklevel=3,
            )

    def _neuron_opts(self) -> NeuronOptions:
        # Only reached with neuron taps, which exist only when neurons were asked for.
        assert self.neuron_options is not None
        return self.neuron_options

    def _notify(self, message: str) -> None:
        if not self._switch_warned:
            self._switch_warned = True
            warnings.warn(message, stacklevel=2)

    def _emit_neurons(
        self,
        layer: str,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        row_valid: torch.Tensor | None,
    ) -> None:
        if self._calibrating:
            cal = self._calibrators.get(layer)
            if cal is None:
                cal = self._calibrators[layer] = NeuronCalibrator(h.device)
            cal.update(h, row_valid)
            return
        info = self._by_path[layer]
        self.pipeline.emit_neurons(layer, h, expert_ids, row_valid, self._window_of(info))

    @contextmanager
    def calibration(self) -> Iterator[MoEMonitor]:
        """Forwards inside the block fill per-layer |h| histograms (log-spaced bins, on
        the device) instead of the statistics; routing is not counted either.

        Each entry starts fresh histograms. Then ``set_neuron_threshold(calibrated=s)``
        (or ``calibrate_neurons(s)``) derives one tau per layer.
        """
        if not self.neurons:
            raise RuntimeError("calibration() needs MoEMonitor(..., neurons=True)")
        self._calibrators.clear()
        self._calibrating = True
        try:
            yield self
        finally:
            self._calibrating = False

    def calibrate_neurons(self, target_sparsity: float) -> NeuronThreshold:
        """Per-layer tau putting ``target_sparsity`` of the calibration |h| at or below
        it (CATS, Lee et al. 2024; TEAL, Liu et al. 2024). One host transfer.

        Returns a ``NeuronThreshold.calibrated`` (not applied: see
        ``set_neuron_threshold``). Resolution: one histogram bin (2.3 % of tau).
        """
        if not 0.0 <= target_sparsity <= 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1], got {target_sparsity}")
        cals = {k: c for k, c in self._calibrators.items() if k in self._taps}
        if not cals:
            raise RuntimeError(
                "no calibration data: run forwards inside `with monitor.calibration():` first"
            )
        names = list(cals)
        dev = cals[names[0]].device
        host = torch.stack([cals[n].hist.to(dev) for n in names]).cpu().numpy()
        taus: dict[str, float] = {}
        for n, hist in zip(names, host, strict=True):
            c = cals[n]
            tau = tau_for_sparsity(hist, target_sparsity, c.log10_min, c.log10_max)
            if np.isfinite(tau):
                taus[n] = tau
        missing = [p for p in self._taps if p not in taus]
        if missing:
            raise RuntimeError(
                f"calibration saw no token in layers {missing}; run a calibration batch "
                "that reaches every MoE layer"
            )
        return NeuronThreshold.calibrated(taus, target_sparsity)

    def set_neuron_threshold(
        self,
        threshold: float | NeuronThreshold | None = None,
        *,
        calibrated: float | None = None,
    ) -> NeuronThreshold:
        """Change the activation rule; resets the neuron sums (a window must not mix
        thresholds). ``calibrated=s`` uses ``calibrate_neurons(s)``. Returns the rule.
        """
        if calibrated is not None:
            if threshold is not None:
                raise ValueError("pass either a threshold or calibrated=..., not both")
            new = self.calibrate_neurons(calibrated)
        else:
            new = as_threshold(threshold)
        self.neuron_threshold = new
        with self._lock:
            self.pipeline.flush()
            for name in self.core.windows:
                neurons = self.core.window(name).neurons
                if neurons is not None:
                    neurons.set_threshold()
        return new

    @staticmethod
    def _default_device(info: LayerInfo) -> torch.device:
        for p in info.module.parameters():
            return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ snapshot

    def snapshot(
        self,
        reset: bool = False,
        step: int | None = None,
        window: str | None = None,
        record: bool = True,
    ) -> Snapshot:
        """Statistics of every layer since the last reset, as a ``Snapshot``.

        Reduces what was staged, then ONE host transfer for all layers (after an
        all-reduce across ranks when torch.distributed is initialised with world size > 1:
        SUM, MAX for max-keys). Reading never resets unless ``reset=True`` (or call
        :meth:`reset`), as everywhere in moescope. Appends to ``self.history`` and runs
        ``alert_rules``. ``step`` defaults to the number of snapshots taken before.
        ``window``: which window (default: the current one, ``"default"`` unless
        :meth:`set_window` chose another); an unknown name raises
        :class:`~moescope.core.UnknownWindowError` (a ``KeyError``) with the closest names.
        ``record=False`` leaves no trace: no history row, no alert check,
        ``last_snapshot``/``last_alerts`` and the snapshot counter unchanged (e.g. an eval
        window read beside the train history).
        """
        name = window or self.pipeline.window
        labels = {path: self._threshold_label(path) for path in self._taps}
        snap = self.core.snapshot(name, reset=reset, labels=labels)
        snap.step = step if step is not None else self._num_snapshots
        if not record:
            return snap
        self._num_snapshots += 1
        if self.history is not None:
            self.history.append(snap)
        self.last_snapshot = snap
        if self.alert_rules is not None:
            self.last_alerts = list(self.alert_rules.check(snap))
        return snap

    def state_nbytes(self) -> int:
        """Bytes of every window's sums (routing and neurons), excluding staged records
        (bounded by ``budget_bytes``) and the history."""
        return self.core.nbytes()

    def _threshold_label(self, path: str) -> str:
        t = self.neuron_threshold
        if t.mode == "calibrated":
            return (
                f"calibrated(target_sparsity={t.value:g}, tau={t.taus.get(path, float('nan')):.6g})"
            )
        return t.describe()

    def reset(self, window: str | None = None) -> None:
        """Zero every layer's sums of ``window`` (default: the current one), including
        layer calls staged and not yet reduced. Graph-safe buffers are zeroed in place."""
        self.core.reset(window or self.pipeline.window)

    def __repr__(self) -> str:
        return (
            f"MoEMonitor({type(self.model).__name__}, layers={len(self.layers)}, "
            f"attached={self.attached})"
        )
