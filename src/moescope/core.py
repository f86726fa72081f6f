"""The one monitor core every front end feeds: pipeline, windows, reduction, host copy.

A front end (:class:`~moescope.monitor.MoEMonitor` for a model in this process, the vLLM
worker's monitor, a training engine) knows its MoE layers and how to reach their routing;
it hands each layer call to :attr:`MonitorCore.pipeline` (adapter hooks, the capture op)
and reads statistics with :meth:`MonitorCore.snapshot`. Everything between is here, once:

- windows: named sets of sums (``"default"``, ``"train"``/``"eval"``, any name), each
  with its consumers: :class:`~moescope.stats.accumulator.RoutingStats` and, when
  neurons are tracked, :class:`~moescope.stats.neurons.NeuronStats`;
- reading: flush what is staged, all-reduce across ranks (SUM, MAX where a key says so),
  ONE device-to-host copy for every consumer and layer, then the pure host math
  (``layer_stats_from_state``, ``neuron_stats_from_state``) into a
  :class:`~moescope.stats.snapshot.Snapshot`;
- ``snapshot()`` reads and never resets unless asked (``reset=True``); ``reset()``
  resets (torchmetrics' ``compute()`` / ``reset()``).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from moescope.capture.pipeline import DEFAULT_BUDGET_BYTES, CapturePipeline
from moescope.stats.accumulator import RoutingStats, host_copy
from moescope.stats.neurons import NeuronOptions, NeuronStats, ThresholdMode, as_threshold
from moescope.stats.snapshot import LayerStats, Snapshot, layer_stats_from_state

__all__ = ["CoreLayer", "MonitorCore", "UnknownWindowError", "merge_stages"]


class UnknownWindowError(KeyError):
    """A window name that no forward was counted in and nobody declared."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown window"


@dataclass(frozen=True)
class CoreLayer:
    """One monitored MoE layer as the core sees it.

    Attributes:
        path: module path (the snapshot's layer key).
        num_experts: E routed experts.
        top_k: K slots per token.
        device: where its routing tensors live (state is allocated there up front).
        intermediate_size: I of its experts when neurons are tracked for it, else None.
        expert_bias: the router's live [E] selection bias (``LayerInfo.expert_bias``),
            copied into ``LayerStats.expert_bias`` at every read; None when it has none.
    """

    path: str
    num_experts: int
    top_k: int
    device: torch.device
    intermediate_size: int | None = None
    expert_bias: torch.Tensor | None = field(default=None, compare=False)


class _Window:
    def __init__(self, routing: RoutingStats, neurons: NeuronStats | None) -> None:
        self.routing = routing
        self.neurons = neurons

    @property
    def consumers(self) -> list[Any]:
        return [self.routing] if self.neurons is None else [self.routing, self.neurons]

    def reset(self) -> None:
        for c in self.consumers:
            c.reset()


class MonitorCore:
    """Windows of routing (and neuron) sums of a fixed list of MoE layers.

    Args:
        layers: the monitored layers (their order is the pipeline's layer index).
        coactivation: keep [E, E] co-activation counts per layer.
        counts_only: keep expert ids only (no router-probability metrics).
        graph_safe: accumulate every call at once into persistent buffers (CUDA-graph
            replay counts; see ``moescope.capture.pipeline``).
        budget_bytes: staged bytes that trigger a flush (staged path).
        neurons: neuron settings (layers with an ``intermediate_size`` get a
            :class:`NeuronStats` consumer), or None.
        threshold: ``layer path -> (mode, value)``: the neuron rule in force.
        process_group: torch.distributed group to reduce over when reading (default:
            the world when initialised with more than one rank); ``False``: never reduce.
            The ranks of this group hold the SAME layers (data-, expert-parallel
            replicas): their sums are added.
        stage_group: torch.distributed group of ranks that hold DIFFERENT layers
            (pipeline stages, one rank per stage): after the reduction over
            ``process_group``, each read gathers the other stages' layers over this
            group, so every rank's snapshot has every layer, in stage order. Layer paths
            must be unique across stages (the engine adapters name layers by their
            global number). None: no gather.
        windows: window names that exist from the start besides ``"default"``.
    """

    def __init__(
        self,
        layers: Sequence[CoreLayer],
        *,
        coactivation: bool = True,
        counts_only: bool = False,
        graph_safe: bool = False,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        neurons: NeuronOptions | None = None,
        threshold: Callable[[str], tuple[ThresholdMode, float]] | None = None,
        process_group: Any | None = None,
        stage_group: Any | None = None,
        windows: Sequence[str] = (),
    ) -> None:
        self.layers = list(layers)
        self.stage_group = stage_group
        self.coactivation = bool(coactivation)
        self.neuron_options = neurons
        self._threshold = threshold
        self.process_group = process_group
        self._windows: dict[str, _Window] = {}
        self._declared: set[str] = {"default", *windows}
        self.pipeline = CapturePipeline(
            [info.path for info in self.layers],
            lambda name: self.window(name).consumers,
            budget_bytes=budget_bytes,
            counts_only=counts_only,
            graph_safe=graph_safe,
            devices=[info.device for info in self.layers],
        )
        for name in sorted(self._declared):
            self.pipeline.consumers(name)
        #: Forwards in one thread, snapshots in a timer thread: one lock with the pipeline.
        self.lock = self.pipeline.lock

    # ------------------------------------------------------------------ windows

    def window(self, name: str) -> _Window:
        """The sums of window ``name`` (created, with a row per layer, on first use)."""
        win = self._windows.get(name)
        if win is None:
            routing = RoutingStats(len(self.layers), self.coactivation)
            # Every layer gets its row now: graph-safe buffers exist before any capture,
            # and every rank reduces the same tensors.
            for i, info in enumerate(self.layers):
                routing.ensure(i, info.num_experts, info.top_k, info.device)
            neurons = None
            if self.neuron_options is not None:
                tapped = {
                    i: (info.num_experts, info.intermediate_size, info.device)
                    for i, info in enumerate(self.layers)
                    if info.intermediate_size
                }
                if tapped:
                    neurons = NeuronStats(
                        tapped,
                        self.neuron_options,
                        lambda i: self._layer_threshold(i),
                    )
            win = self._windows[name] = _Window(routing, neurons)
            self._declared.add(name)
        return win

    def _layer_threshold(self, i: int) -> tuple[ThresholdMode, float]:
        path = self.layers[i].path
        return (
            as_threshold(None).for_layer(path) if self._threshold is None else self._threshold(path)
        )

    @property
    def windows(self) -> list[str]:
        """Names of the windows that exist."""
        return list(self._windows)

    def declare(self, name: str) -> None:
        """Make ``name`` a known window (its sums are created now)."""
        with self.lock:
            self.pipeline.consumers(name)

    def check_window(self, name: str) -> str:
        """``name`` if it is a known window; else :class:`UnknownWindowError` with the
        closest names."""
        if name in self._declared or name in self._windows:
            return name
        known = sorted(self._declared | set(self._windows))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        extra = ""
        if name in ("train", "eval"):
            extra = " (train/eval windows exist with MoEMonitor(..., split_by_mode=True))"
        raise UnknownWindowError(
            f"no window {name!r}: known windows are {known}{hint}{extra}. Count forwards "
            "in a new window with monitor.use_window(name)."
        )

    # ------------------------------------------------------------------ reading

    def _reduce(
        self, states: dict[str, torch.Tensor], ops: Mapping[str, str]
    ) -> dict[str, torch.Tensor]:
        # Reduced into new tensors: the sums themselves stay this rank's own, so reading
        # twice without a reset never adds the other ranks twice.
        import torch.distributed as dist

        if self.process_group is False or not (dist.is_available() and dist.is_initialized()):
            return states
        if dist.get_world_size(self.process_group) <= 1:
            return states
        groups: dict[tuple[torch.dtype, str], list[str]] = {}
        for key, v in states.items():
            groups.setdefault((v.dtype, ops.get(key, "sum")), []).append(key)
        out: dict[str, torch.Tensor] = {}
        for (_, op), keys in groups.items():
            buf = torch.cat([states[k].reshape(-1) for k in keys])
            rop = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
            dist.all_reduce(buf, op=rop, group=self.process_group)
            pos = 0
            for k in keys:
                n = states[k].numel()
                out[k] = buf[pos : pos + n].view_as(states[k])
                pos += n
        return {k: out[k] for k in states}

    def read(
        self, window: str = "default", reset: bool = False
    ) -> dict[str, dict[str, np.ndarray]]:
        """Host copies of the window's consumer states: ``{"routing": ..., "neurons": ...}``
        (flush, all-reduce across ranks, ONE host copy). ``reset`` zeroes the sums after."""
        self.check_window(window)
        with self.lock, torch.inference_mode(False), torch.no_grad():
            self.pipeline.flush()
            win = self.window(window)
            parts = {"routing": win.routing}
            if win.neurons is not None:
                parts["neurons"] = win.neurons  # type: ignore[assignment]
            states: dict[str, torch.Tensor] = {}
            ops: dict[str, str] = {}
            for name, consumer in parts.items():
                for key, v in consumer.state().items():
                    states[f"{name}:{key}"] = v
                for key, op in consumer.reduce_ops().items():
                    ops[f"{name}:{key}"] = op
            states = self._reduce(states, ops)
            # Biases are replicated on every rank, never summed; they ride the same copy.
            for i, info in enumerate(self.layers):
                if info.expert_bias is not None:
                    states[f"bias:{i}"] = info.expert_bias.detach().reshape(-1)
            host = host_copy(states)
            if reset:
                win.reset()
        out: dict[str, dict[str, np.ndarray]] = {name: {} for name in parts}
        for key, arr in host.items():
            name, sub = key.split(":", 1)
            out.setdefault(name, {})[sub] = arr
        return out

    def stats(
        self,
        host: Mapping[str, Mapping[str, np.ndarray]],
        window: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> dict[str, LayerStats]:
        """``{layer path: LayerStats}`` from :meth:`read`'s host states (pure host math).
        ``labels``: the neuron threshold description per layer path."""
        win = self.window(window)
        per_layer = win.routing.layer_states(host["routing"])
        out: dict[str, LayerStats] = {}
        for i, info in enumerate(self.layers):
            top_k = win.routing.top_k(i) or info.top_k
            stats = layer_stats_from_state(per_layer[i], info.num_experts, top_k)
            if win.neurons is not None and i in win.neurons.layers and "neurons" in host:
                fields = win.neurons.layer_fields(host["neurons"], i)
                label = (labels or {}).get(info.path)
                stats = replace(stats, **fields, neuron_threshold=label)
            bias = host.get("bias", {}).get(str(i))
            if bias is not None:
                stats = replace(stats, expert_bias=np.asarray(bias, dtype=np.float64))
            out[info.path] = stats
        return self._gather_stages(out)

    def _gather_stages(self, layers: dict[str, LayerStats]) -> dict[str, LayerStats]:
        # Pipeline stages hold different layers: every rank gets all of them (host
        # objects, once per read, never on the forward path).
        import torch.distributed as dist

        group = self.stage_group
        if group is None or not (dist.is_available() and dist.is_initialized()):
            return layers
        n = dist.get_world_size(group)
        if n <= 1:
            return layers
        parts: list[Any] = [None] * n
        dist.all_gather_object(parts, layers, group=group)
        return merge_stages(parts)

    def snapshot(
        self,
        window: str = "default",
        reset: bool = False,
        step: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Snapshot:
        """Statistics of every layer in ``window`` since its last reset (reading does not
        reset unless ``reset=True``)."""
        host = self.read(window, reset=reset)
        return Snapshot(step=step, layers=self.stats(host, window, labels), time=time.time())

    def reset(self, window: str = "default") -> None:
        """Zero the window's sums in place (staged calls included)."""
        self.check_window(window)
        with self.lock:
            self.pipeline.flush()
            self.window(window).reset()

    def nbytes(self) -> int:
        """Bytes of every window's sums (constant in the number of calls)."""
        total = 0
        for win in self._windows.values():
            total += sum(s.nbytes() for s in win.routing.groups.values())
            if win.neurons is not None:
                total += win.neurons.nbytes()
        return total


def merge_stages(parts: Sequence[Mapping[str, LayerStats]]) -> dict[str, LayerStats]:
    """One ``{path: LayerStats}`` from the layers of each pipeline stage, in stage order.

    Raises:
        ValueError: a layer path appears on two stages.
    """
    merged: dict[str, LayerStats] = {}
    for stage, part in enumerate(parts):
        for path, stats in part.items():
            if path in merged:
                raise ValueError(
                    f"layer {path!r} is reported by two pipeline stages (stage {stage} "
                    "and an earlier one): stage_group must hold one rank per stage, and "
                    "layer paths must be unique across stages (name layers by their "
                    "global number in the adapter)"
                )
            merged[path] = stats
    return merged
