"""Token-level routing capture for the analyses papers publish (:mod:`moescope.stats.routing`).

The monitor (``moescope.monitor``) keeps O(E) sums per layer; the analyses of the Mixtral
paper (Jiang et al. 2024, §5: per-domain expert assignment, coloured text, consecutive
token repetition) and of OLMoE (Muennighoff et al. 2024, router saturation between
checkpoints) need *which token went where*. :class:`RoutingRecorder` captures that, with
bounded memory, and returns one :class:`TokenRouting` per data source. It hooks nothing
itself: it is a consumer of a monitor's capture pipeline (``monitor.add_consumer``; see
docs/capture.md), either a cheap monitor it builds or the one passed as ``monitor=``, so
a model watched by both a ``MoEMonitor`` and a recorder has every layer hooked once.

Usage::

    rec = RoutingRecorder(model, max_tokens=20000)
    with rec, torch.no_grad():
        for name, batches in domains.items():
            with rec.source(name):                   # one TokenRouting per source
                for ids, mask in batches:
                    if rec.full:                     # this source has max_tokens tokens
                        break
                    model(input_ids=ids, attention_mask=mask)
    code = rec.result("code")                        # TokenRouting

or, for one source, ``record_routing(model, batches, max_tokens=...)``. With a monitor
already watching the model, ``RoutingRecorder(model, monitor=mon)`` shares its hooks.

What is recorded per forward of the model passed in (the top-level module):

- the ``input_ids`` and ``attention_mask`` the top-level forward received (the
  monitor's forward pre-hook hands them to ``forward_start``; keyword or positional), or
  those given to :meth:`RoutingRecorder.begin_batch` for the next forward when the
  model's forward names them differently;
- for every selected MoE layer, the ``topk_index`` [T, K] its experts received (the
  adapter's record, as the pipeline delivers it at ``forward_end``; never re-derived;
  slots ordered by descending combine weight) and, when the adapter reports one,
  ``dropped``.

Only forwards of the top-level model are recorded (a direct call of a sub-module is
not). Padding (attention mask 0) is excluded; valid tokens are kept in row-major [B, S] order.
All layers' tensors of one forward move to the host in ONE copy (analysis, not the
training hot path). A source stops recording once it holds ``max_tokens`` tokens (the
first ones, in order): afterwards ``update`` returns at once, so memory is bounded by
``max_tokens x (24 + sum_l 4 K_l (+ K_l with drops))`` bytes per source, plus one
forward's [B x S x sum_l K_l] int64 host buffer while it is filtered.

Sequences: every row of a forward is a new sequence (``seq_id``), except with a KV cache
(attention mask longer than the new positions): a forward with the same batch size
continues the previous forward's sequences, so generation step by step keeps
consecutive-token statistics meaningful. ``position`` is the column in the attention
mask (past + new position).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from moescope.capture.adapter import (
    CaptureContext,
    MoEAdapter,
    argument_position,
    forward_argument,
)
from moescope.capture.record import RoutingBatch, RoutingRecord

if TYPE_CHECKING:
    from moescope.monitor import MoEMonitor

__all__ = ["RoutingRecorder", "TokenRouting", "record_domains", "record_routing"]

DEFAULT_SOURCE = "default"


@dataclass
class TokenRouting:
    """Routing of the valid tokens of one data source, on the host.

    N recorded tokens (padding excluded, row-major order of the batches), L layers.

    - ``layers``: MoE layer paths in model order (``model.layers.3.mlp``).
    - ``num_experts``: ``{layer: E}`` routed experts.
    - ``token_ids`` [N] int64: the input token ids (-1 when the forward got no
      ``input_ids``, e.g. ``inputs_embeds``).
    - ``seq_id`` [N] int64: sequence number within the source (sequence boundaries).
    - ``position`` [N] int64: position in the sequence (attention-mask column).
    - ``topk`` ``{layer: [N, K] int32}``: the experts each token was sent to, slots sorted
      by descending combine weight when the adapter reports weights (slot 0 = the first
      choice, also for routers returning an unsorted top-k such as DeepSeek-V3), else in
      the router's order; -1 when that layer did not run in the token's forward; ids >= E
      are identity/zero experts.
    - ``dropped`` ``{layer: [N, K] bool}``: slots dropped by a capacity limit (only
      layers whose adapter reports drops).
    - ``truncated``: True when ``max_tokens`` cut the source short.
    - ``weights`` ``{layer: [N, K] float32}``: the combine weights of the slots of
      ``topk`` (same order), only with ``RoutingRecorder(weights=True)`` and for layers
      whose adapter reports weights (NaN where the layer did not run).
    """

    layers: list[str]
    num_experts: dict[str, int]
    token_ids: np.ndarray
    seq_id: np.ndarray
    position: np.ndarray
    topk: dict[str, np.ndarray]
    dropped: dict[str, np.ndarray] = field(default_factory=dict)
    truncated: bool = False
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.token_ids.shape[0])

    def top_k(self, layer: str) -> int:
        """K of ``layer``."""
        return int(self.topk[self.check_layer(layer)].shape[1])

    def check_layer(self, layer: str) -> str:
        """``layer`` itself, or a ValueError naming the recorded layers."""
        if layer not in self.topk:
            raise ValueError(f"layer {layer!r} was not recorded; recorded layers: {self.layers}")
        return layer

    def top1(self, layer: str) -> np.ndarray:
        """[N] int: the first-choice expert (slot 0) of every token at ``layer``."""
        return self.topk[self.check_layer(layer)][:, 0]

    def sequences(self) -> np.ndarray:
        """Distinct ``seq_id`` values in order of first appearance."""
        _, first = np.unique(self.seq_id, return_index=True)
        return self.seq_id[np.sort(first)]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to one ``.npz`` file (e.g. to compare with a checkpoint loaded later)."""
        arrays: dict[str, np.ndarray] = {
            "token_ids": self.token_ids,
            "seq_id": self.seq_id,
            "position": self.position,
            "meta": np.array(
                json.dumps(
                    {
                        "layers": self.layers,
                        "num_experts": self.num_experts,
                        "dropped": list(self.dropped),
                        "weights": list(self.weights),
                        "truncated": self.truncated,
                    }
                )
            ),
        }
        for i, layer in enumerate(self.layers):
            arrays[f"topk_{i}"] = self.topk[layer]
            if layer in self.dropped:
                arrays[f"dropped_{i}"] = self.dropped[layer]
            if layer in self.weights:
                arrays[f"weights_{i}"] = self.weights[layer]
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("wb") as f:
            # No object arrays here; load() reads with allow_pickle=False too. Passing it
            # also tells the type checker that no key of ``arrays`` is that keyword.
            np.savez_compressed(f, allow_pickle=False, **arrays)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenRouting:
        """Read a file written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            layers = list(meta["layers"])
            return cls(
                layers=layers,
                num_experts={k: int(v) for k, v in meta["num_experts"].items()},
                token_ids=z["token_ids"],
                seq_id=z["seq_id"],
                position=z["position"],
                topk={layer: z[f"topk_{i}"] for i, layer in enumerate(layers)},
                dropped={
                    layer: z[f"dropped_{i}"]
                    for i, layer in enumerate(layers)
                    if layer in meta["dropped"]
                },
                truncated=bool(meta["truncated"]),
                weights={
                    layer: z[f"weights_{i}"]
                    for i, layer in enumerate(layers)
                    if layer in meta.get("weights", [])
                },
            )


@dataclass
class _SourceBuffer:
    chunks: list[dict[str, np.ndarray]] = field(default_factory=list)
    n: int = 0
    truncated: bool = False
    next_seq: int = 0
    last_base: int = 0
    last_batch: int = -1


class RoutingRecorder:
    """Records per-token top-k routing of every MoE layer of ``model`` (see module doc).

    A consumer of one :class:`~moescope.monitor.MoEMonitor`'s capture pipeline: the
    monitor owns every hook (adapters, top-level pre/post hooks); the recorder gets the
    top-level forward's arguments through ``forward_start(args, kwargs)``, flushes the
    pipeline in ``forward_end()`` and receives that forward's layer calls in
    ``update(batch)``.

    Args:
        model: the top-level module that is called (its forward's ``input_ids`` /
            ``attention_mask`` are read, keyword or positional).
        max_tokens: valid tokens kept per source at most (the first ones); later
            forwards of a full source are not recorded (``full`` tells when to stop).
        layers: MoE layer paths to record (default: all, in model order; for an
            encoder-decoder model (``config.is_encoder_decoder``) the encoder's only, since
            decoder layers route decoder tokens). Layers that route a number of tokens
            other than the input's are skipped with a warning.
        adapters: adapters to try (default: ``moescope.capture.default_adapters()``);
            only when the recorder builds its own monitor.
        monitor: a ``MoEMonitor`` of ``model`` to record through (its hooks serve both:
            no layer is hooked twice). Default: the recorder builds a cheap one
            (``history=None, coactivation=False``), attached and detached with the
            recorder. A given monitor is left attached by :meth:`detach`, unless it was
            not attached when the recorder attached it.
        weights: also keep each slot's combine weight (``TokenRouting.weights``, 4 more
            bytes per slot; for routing agreement, :mod:`moescope.trace`). Layers whose
            adapter reports no weight have none.

    Raises:
        UnsupportedModelError: no MoE layer found.
        ValueError: ``layers`` names a path that is not an MoE layer, ``max_tokens < 1``,
            ``monitor`` watches another model, or both ``monitor`` and ``adapters`` given.
    """

    def __init__(
        self,
        model: nn.Module,
        max_tokens: int = 20000,
        layers: Sequence[str] | None = None,
        adapters: Sequence[MoEAdapter] | None = None,
        monitor: MoEMonitor | None = None,
        weights: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RoutingRecorder needs a torch.nn.Module, got {type(model).__name__}")
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if monitor is None:
            # why: the monitor is the layer above the consumers; the recorder builds a
            # private one only on this convenience path (import graph: the one allowed
            # upward edge, tests/test_import_graph.py).
            from moescope.monitor import MoEMonitor

            monitor = MoEMonitor(
                model,
                adapters=None if adapters is None else list(adapters),
                history=None,
                coactivation=False,
                attach=False,
            )
            self._owns_monitor = True
        else:
            if monitor.model is not model:
                raise ValueError(
                    f"monitor watches {type(monitor.model).__name__}, not the recorded model "
                    f"{type(model).__name__}; pass a MoEMonitor of the same top-level module"
                )
            if adapters is not None:
                raise ValueError("pass adapters to the MoEMonitor, not with monitor=")
            if monitor.pipeline.counts_only:
                warnings.warn(
                    "moescope RoutingRecorder: the monitor is counts_only (combine weights "
                    "are not staged), so recorded slots keep the router's order",
                    stacklevel=2,
                )
            self._owns_monitor = False
        self.monitor = monitor
        infos = list(monitor.layers)
        paths = [info.path for info in infos]
        chosen = infos
        if layers is None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # The decoder routes decoder tokens, not the input_ids: default to the encoder.
            enc = [i for i in infos if "encoder" in i.path.split(".")]
            chosen = enc or infos
        if layers is not None:
            unknown = [p for p in layers if p not in paths]
            if unknown:
                raise ValueError(
                    f"layers {unknown} are not MoE layers of the model; choose from {paths}"
                )
            keep = set(layers)
            chosen = [i for i in infos if i.path in keep]
        self.model = model
        self.max_tokens = int(max_tokens)
        self.keep_weights = bool(weights)
        self.layers: list[str] = [i.path for i in chosen]
        self.num_experts: dict[str, int] = {i.path: int(i.num_experts) for i in chosen}
        # Monitored layer index (``batch.layers``) -> path, for the recorded layers only.
        keep_paths = set(self.layers)
        self._path_of: dict[int, str] = {
            j: info.path for j, info in enumerate(infos) if info.path in keep_paths
        }
        self._mask_pos = argument_position(model, "attention_mask")
        self._ids_pos = argument_position(model, "input_ids")
        self._attached = False
        self._attached_monitor = False
        self._sources: dict[str, _SourceBuffer] = {}
        self._current = DEFAULT_SOURCE
        self._explicit: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # Per top-level forward (forward_start .. forward_end):
        self._active = False
        self._input_ids: torch.Tensor | None = None
        self._mask = CaptureContext()  # the forward's attention mask -> [T] token mask
        self._calls: dict[str, RoutingRecord] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ sources

    @property
    def current_source(self) -> str:
        return self._current

    def set_source(self, name: str) -> None:
        """Record the following forwards under ``name`` (a domain, a data file)."""
        self._current = str(name)
        self._sources.setdefault(self._current, _SourceBuffer())

    @contextmanager
    def source(self, name: str) -> Iterator[RoutingRecorder]:
        """``with rec.source("code"): ...`` records under ``name``, then restores."""
        prev = self._current
        self.set_source(name)
        try:
            yield self
        finally:
            self._current = prev

    @property
    def sources(self) -> list[str]:
        """Sources that recorded at least one token, in order of creation."""
        return [k for k, b in self._sources.items() if b.n > 0]

    @property
    def full(self) -> bool:
        """True once the current source holds ``max_tokens`` tokens."""
        buf = self._sources.get(self._current)
        return buf is not None and buf.n >= self.max_tokens

    def num_recorded(self, source: str | None = None) -> int:
        """Tokens recorded so far for ``source`` (default: the current one)."""
        buf = self._sources.get(self._current if source is None else source)
        return 0 if buf is None else buf.n

    def reset(self, source: str | None = None) -> None:
        """Forget what ``source`` (default: every source) recorded."""
        if source is None:
            self._sources.clear()
        else:
            self._sources.pop(source, None)

    # ------------------------------------------------------------------ consumer

    def begin_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> None:
        """Declare the token ids [B, S] and mask [B, S] (1 = real) of the NEXT forward.

        Only needed when the model's forward does not take ``input_ids`` /
        ``attention_mask`` under those names; what is given here wins over what the
        top-level forward received, for one forward.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0]
        ):
            raise ValueError(
                "attention_mask must be [batch, past + seq] like input_ids [batch, seq]; got "
                f"{tuple(attention_mask.shape)} and {tuple(input_ids.shape)}"
            )
        self._explicit = (input_ids, attention_mask)

    def forward_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Called by the monitor's top-level forward pre-hook (not during backward)."""
        pipeline = self.monitor.pipeline
        if pipeline.pending:
            # Calls staged before this forward (e.g. a direct call of a sub-module) are
            # delivered now, while inactive: they are not this forward's.
            pipeline.flush()
        self._calls = {}
        self._active = True
        if self._explicit is not None:
            ids, mask = self._explicit
            self._explicit = None
        else:
            ids = forward_argument(args, kwargs, "input_ids", self._ids_pos)
            mask = forward_argument(args, kwargs, "attention_mask", self._mask_pos)
        ok_ids = isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()
        self._input_ids = ids if ok_ids else None
        self._mask.attention_mask = mask if isinstance(mask, torch.Tensor) else None

    def update(self, batch: RoutingBatch) -> None:
        """Keep references to this forward's calls of the recorded layers (no device op)."""
        if not self._active:
            return  # calls outside a top-level forward of the model are not recorded
        buf = self._sources.get(self._current)
        if buf is not None and buf.n >= self.max_tokens:
            buf.truncated = True  # a forward of a full source: its tokens are not kept
            return
        for j, layer in enumerate(batch.layers):
            path = self._path_of.get(layer)
            # A block called twice in one forward (weight sharing): its first call is
            # kept (first delivered; calls of one shape are delivered in call order).
            if path is None or path in self._calls:
                continue
            self._calls[path] = RoutingRecord(
                layer=path,
                num_experts=batch.num_experts,
                topk_index=batch.topk_index[j],
                topk_weight=None if batch.topk_weight is None else batch.topk_weight[j],
                token_mask=None if batch.token_mask is None else batch.token_mask[j],
                dropped=None if batch.dropped is None else batch.dropped[j],
            )

    def forward_end(self, output: Any) -> None:
        """Called by the monitor's top-level forward post-hook (also when the forward
        raised, with ``output`` None): receives the forward's layer calls and records
        them; a partial forward is not recorded."""
        if not self._active:
            return
        try:
            self.monitor.pipeline.flush()
            if self._calls and output is not None:
                self._flush()
        finally:
            self._calls = {}
            self._active = False
            self._input_ids = None
            self._mask.attention_mask = None

    def state(self) -> dict[str, torch.Tensor]:
        """Consumer protocol: nothing to reduce across ranks (tokens stay on the host)."""
        return {}

    def reduce_ops(self) -> dict[str, str]:
        """Consumer protocol: no state."""
        return {}

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> RoutingRecorder:
        """Start recording (idempotent): register with the monitor, attaching it when it
        is not. Returns self."""
        if self._attached:
            return self
        if not self.monitor.attached:
            self.monitor.attach()  # a failed attach leaves no hook (attach_all)
            self._attached_monitor = True
        self.monitor.add_consumer(self)
        self._attached = True
        return self

    def detach(self) -> None:
        """Stop recording (idempotent); recorded data is kept. Detaches the monitor only
        when this recorder attached it."""
        if self._attached:
            self._attached = False
            self._active = False  # what the pipeline still delivers is not recorded
            self.monitor.remove_consumer(self)
        if self._attached_monitor:
            self._attached_monitor = False
            self.monitor.detach()
        self._calls = {}
        self._active = False
        self._input_ids = None
        self._mask.attention_mask = None

    def __enter__(self) -> RoutingRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ flush

    def _flush(self) -> None:
        buf = self._sources.setdefault(self._current, _SourceBuffer())
        remaining = self.max_tokens - buf.n
        if remaining <= 0:
            return
        recs = [(p, self._calls[p]) for p in self.layers if p in self._calls]
        ids = self._input_ids
        mask = self._mask.attention_mask
        if ids is not None:
            t = ids.shape[0] * ids.shape[1]
        elif mask is not None and mask.dim() == 2:
            counts = [r.topk_index.shape[0] for _, r in recs]
            t = next((c for c in counts if c % mask.shape[0] == 0), counts[0])
        else:
            t = recs[0][1].topk_index.shape[0]
        # Layers that routed other tokens than the input's (the decoder stack of an
        # encoder-decoder model) cannot be aligned with the token ids: skipped.
        skipped = [p for p, r in recs if r.topk_index.shape[0] != t]
        if skipped:
            new = [p for p in skipped if p not in self._warned]
            if new:
                self._warned.update(new)
                warnings.warn(
                    f"moescope RoutingRecorder: layers {new} routed a number of tokens other "
                    f"than the {t} input tokens (e.g. a decoder stack); they are not recorded",
                    stacklevel=3,
                )
            recs = [(p, r) for p, r in recs if r.topk_index.shape[0] == t]
            if not recs:
                return
        if ids is not None:
            b = ids.shape[0]
        elif mask is not None and mask.dim() == 2:
            b = mask.shape[0]
        else:
            b = 1
        if b < 1 or t % b != 0:
            raise ValueError(
                f"the MoE layers routed T={t} tokens, not a multiple of the batch size {b}; "
                "pass input_ids [B, S] matching the routed tokens (begin_batch)"
            )
        s = t // b
        valid = self._mask.token_mask(t)
        if valid is None:
            valid = recs[0][1].token_mask
        past = 0
        if mask is not None and mask.dim() == 2 and mask.shape[1] >= s:
            past = mask.shape[1] - s
        dev = recs[0][1].topk_index.device
        # One device buffer, one host copy per forward.
        parts: list[torch.Tensor] = []
        drops: list[torch.Tensor] = []
        dropped_layers: list[str] = []
        wparts: list[torch.Tensor] = []
        weight_layers: list[str] = []
        for p, r in recs:
            idx, dropped, w = _by_weight(r, t)
            parts.append(idx.to(dev, torch.int64).reshape(-1))
            if dropped is not None:
                dropped_layers.append(p)
                drops.append(dropped.to(dev, torch.int64).reshape(-1))
            if self.keep_weights and w is not None:
                weight_layers.append(p)
                # float32 bits carried in the int64 buffer: still one host copy.
                wparts.append(
                    w.to(dev, torch.float32).reshape(-1).view(torch.int32).to(torch.int64)
                )
        parts += drops
        parts += wparts
        parts.append(
            torch.ones(t, dtype=torch.int64, device=dev)
            if valid is None
            else valid.detach().reshape(-1).to(dev, torch.int64)
        )
        if ids is not None:
            parts.append(ids[:, -s:].detach().reshape(-1).to(dev, torch.int64))
        host = torch.cat(parts).cpu().numpy()
        pos = 0
        topk_host: dict[str, np.ndarray] = {}
        for p, r in recs:
            k = r.topk_index.reshape(t, -1).shape[1]
            topk_host[p] = host[pos : pos + t * k].reshape(t, k)
            pos += t * k
        drop_host: dict[str, np.ndarray] = {}
        for p in dropped_layers:
            k = topk_host[p].shape[1]
            drop_host[p] = host[pos : pos + t * k].reshape(t, k).astype(bool)
            pos += t * k
        weight_host: dict[str, np.ndarray] = {}
        for p in weight_layers:
            k = topk_host[p].shape[1]
            bits = host[pos : pos + t * k].astype(np.int32)
            weight_host[p] = bits.view(np.float32).reshape(t, k)
            pos += t * k
        valid_host = host[pos : pos + t].astype(bool)
        pos += t
        tok = host[pos : pos + t] if ids is not None else np.full(t, -1, dtype=np.int64)

        sel = np.flatnonzero(valid_host)
        if sel.size > remaining:
            sel = sel[:remaining]
            buf.truncated = True
        if past > 0 and buf.last_batch == b:
            base = buf.last_base  # a KV-cache step continues the previous sequences
        else:
            base = buf.next_seq
            buf.next_seq += b
        buf.last_base, buf.last_batch = base, b
        rows, cols = np.divmod(sel, s)
        chunk: dict[str, np.ndarray] = {
            "token_ids": tok[sel].astype(np.int64),
            "seq_id": (base + rows).astype(np.int64),
            "position": (past + cols).astype(np.int64),
        }
        for p in self.layers:
            if p in topk_host:
                chunk["topk/" + p] = topk_host[p][sel].astype(np.int32)
            if p in drop_host:
                chunk["dropped/" + p] = drop_host[p][sel]
            if p in weight_host:
                chunk["weights/" + p] = weight_host[p][sel]
        buf.chunks.append(chunk)
        buf.n += int(sel.size)

    # ------------------------------------------------------------------ result

    def result(self, source: str | None = None) -> TokenRouting:
        """The :class:`TokenRouting` of ``source`` (default: the current source).

        Raises ValueError when that source recorded nothing.
        """
        name = self._current if source is None else source
        buf = self._sources.get(name)
        if buf is None or buf.n == 0:
            raise ValueError(
                f"source {name!r} recorded no token (recorded: {self.sources}); run forwards "
                "of the model inside `with recorder:` (and `with recorder.source(name):`)"
            )
        n = buf.n
        chunks = buf.chunks

        def cat(key: str) -> np.ndarray:
            return np.concatenate([c[key] for c in chunks])

        topk: dict[str, np.ndarray] = {}
        dropped: dict[str, np.ndarray] = {}
        weights: dict[str, np.ndarray] = {}
        for p in self.layers:
            k_vals = {c["topk/" + p].shape[1] for c in chunks if "topk/" + p in c}
            if not k_vals:
                continue
            if len(k_vals) > 1:
                raise ValueError(f"{p}: K changed between forwards ({sorted(k_vals)})")
            k = k_vals.pop()
            out = np.full((n, k), -1, dtype=np.int32)
            dr = np.zeros((n, k), dtype=bool)
            wt = np.full((n, k), np.nan, dtype=np.float32)
            has_drop = has_w = False
            pos = 0
            for c in chunks:
                m = c["token_ids"].shape[0]
                if "topk/" + p in c:
                    out[pos : pos + m] = c["topk/" + p]
                if "dropped/" + p in c:
                    dr[pos : pos + m] = c["dropped/" + p]
                    has_drop = True
                if "weights/" + p in c:
                    wt[pos : pos + m] = c["weights/" + p]
                    has_w = True
                pos += m
            topk[p] = out
            if has_drop:
                dropped[p] = dr
            if has_w:
                weights[p] = wt
        layers = [p for p in self.layers if p in topk]
        return TokenRouting(
            layers=layers,
            num_experts={p: self.num_experts[p] for p in layers},
            token_ids=cat("token_ids"),
            seq_id=cat("seq_id"),
            position=cat("position"),
            topk=topk,
            dropped=dropped,
            truncated=buf.truncated,
            weights=weights,
        )

    def results(self) -> dict[str, TokenRouting]:
        """``{source: TokenRouting}`` of every source that recorded tokens."""
        return {s: self.result(s) for s in self.sources}

    def __repr__(self) -> str:
        return (
            f"RoutingRecorder({type(self.model).__name__}, layers={len(self.layers)}, "
            f"max_tokens={self.max_tokens}, sources={self.sources})"
        )


def _by_weight(
    r: RoutingRecord, t: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``topk_index`` [T, K] (and ``dropped``, and the weights [T, K] or None) with slots
    sorted by descending combine weight when the record has weights (stable: ties keep
    the router's order).

    Why: slot 0 must be the first choice for the top-1 analyses, and some routers return
    their top-k unsorted (DeepSeek-V3 / GLM-4 MoE: ``topk(sorted=False)``).
    """
    idx = r.topk_index.detach().reshape(t, -1)
    dropped = r.dropped.detach().reshape(t, -1) if r.dropped is not None else None
    w = r.topk_weight
    if w is None or w.numel() != idx.numel():
        return idx, dropped, None
    w = w.detach().reshape(t, -1).float()
    key = torch.where(torch.isnan(w), torch.full_like(w, -float("inf")), w)
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    idx = idx.gather(1, order.to(idx.device))
    if dropped is not None:
        dropped = dropped.gather(1, order.to(dropped.device))
    return idx, dropped, w.gather(1, order.to(w.device))


def _as_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a batch mapping needs an 'input_ids' key, got keys {list(batch)}")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        return batch[0], batch[1] if len(batch) == 2 else None
    raise TypeError(
        "each batch must be input_ids [B, S], (input_ids, attention_mask) or a mapping with "
        f"'input_ids' (and 'attention_mask'); got {type(batch).__name__}"
    )


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def record_domains(
    model: nn.Module,
    domains: Mapping[str, Iterable[Any]],
    *,
    max_tokens: int = 20000,
    layers: Sequence[str] | None = None,
    adapters: Sequence[MoEAdapter] | None = None,
    device: torch.device | str | None = None,
    monitor: MoEMonitor | None = None,
    weights: bool = False,
) -> dict[str, TokenRouting]:
    """``{domain: TokenRouting}``: run ``model(input_ids=..., attention_mask=...)`` under
    ``torch.no_grad()`` over each domain's batches until ``max_tokens`` valid tokens of
    that domain are recorded (one attach for all domains).

    Batches: input_ids [B, S], ``(input_ids, attention_mask)`` or mappings with those keys.
    ``device``: where each batch goes (default: the device of the model's first parameter).
    ``monitor``: a ``MoEMonitor`` of ``model`` to record through; ``weights``: keep the
    combine weights too (see :class:`RoutingRecorder`). Raises ValueError when a domain yields no valid token.
    """
    dev = _model_device(model) if device is None else torch.device(device)
    rec = RoutingRecorder(
        model,
        max_tokens=max_tokens,
        layers=layers,
        adapters=adapters,
        monitor=monitor,
        weights=weights,
    )
    with rec, torch.no_grad():
        for name, batches in domains.items():
            with rec.source(name):
                for batch in batches:
                    if rec.full:
                        break
                    ids, mask = _as_batch(batch)
                    kwargs: dict[str, Any] = {"input_ids": ids.to(dev)}
                    if mask is not None:
                        kwargs["attention_mask"] = mask.to(dev)
                    model(**kwargs)
    return {name: rec.result(name) for name in domains}


def record_routing(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_tokens: int = 20000,
    layers: Sequence[str] | None = None,
    adapters: Sequence[MoEAdapter] | None = None,
    device: torch.device | str | None = None,
    monitor: MoEMonitor | None = None,
    weights: bool = False,
) -> TokenRouting:
    """The :class:`TokenRouting` of one data source: :func:`record_domains` with one
    domain."""
    return record_domains(
        model,
        {DEFAULT_SOURCE: batches},
        max_tokens=max_tokens,
        layers=layers,
        adapters=adapters,
        device=device,
        monitor=monitor,
        weights=weights,
    )[DEFAULT_SOURCE]
