"""Expert-parallel placement plans from measured expert loads (``moescope plan-ep``).

Given the load of every expert of every MoE layer (tokens routed to it, from a
:class:`~moescope.stats.snapshot.Snapshot`, a ``summary.json`` of ``moescope analyze`` or a
JSONL log of :class:`~moescope.sinks.jsonl.JsonlSink`), :func:`plan_expert_placement`
places the E logical experts, plus R redundant replicas of the busiest ones, on the
P = E + R physical expert slots of G GPUs in N nodes so that the busiest GPU carries as
little as possible. It is the hierarchical expert-parallel load balancer DeepSeek
published (EPLB) and vLLM ships as its default policy, written anew here:

1. **Groups to nodes.** The E experts form ``num_groups`` groups of consecutive ids (the
   groups of group-limited routing, DeepSeek-V3's ``n_group``). Whole groups are packed
   onto nodes, ``num_groups / N`` per node, balancing the nodes' loads: a token then
   crosses the slower inter-node network no more than group-limited routing allows.
2. **Replicas within a node.** Each node gets P / N slots for its E / N experts; the extra
   slots go one at a time to the expert whose per-replica load (load / replicas) is the
   largest, which minimises the largest per-replica load.
3. **Slots to GPUs.** The node's physical experts (each carrying load / replicas) are
   packed onto its G / N GPUs, P / G slots per GPU, balancing the GPUs' loads.

When ``num_groups`` is not a multiple of N (e.g. one group on several nodes) the plan is
*global*: the same three steps with one group and one node, i.e. replicas anywhere.

Both packings are the greedy "heaviest item first, into the lightest pack that still has
room" rule. Ties are broken by the lowest index (a stable sort; the lightest pack with the
lowest id), so a plan is deterministic. On loads without ties the plan is vLLM's
``DefaultEplbPolicy.rebalance_experts`` map slot for slot; where loads tie, vLLM's
``np.argsort`` may take equal items in another order, which can change the slot map but
(in every case ``tests/with_vllm/test_eplb_vs_vllm.py`` runs) not the load of any GPU.

Conventions:

- A replicated expert's load is split evenly between its replicas (what vLLM's dispatch
  aims for); the load of a GPU is the sum of its slots' loads.
- **Before** is the contiguous placement without replicas that expert parallelism starts
  from: expert e on GPU ``floor(e * G / E)`` (``e // (E / G)`` when G divides E).
- ``max/mean`` of a layer is its busiest GPU's load over the mean GPU load: 1.0 is a
  perfect balance; an MoE layer's step time under expert parallelism follows the busiest
  GPU, so ``1 / (max/mean)`` is the fraction of the GPUs' expert time spent computing
  rather than waiting. NaN for a layer without load.
- Physical slot p lives on GPU ``p // (P / G)`` and node ``p // (P / N)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LoadSource",
    "Placement",
    "PlacementError",
    "add_plan_ep_parser",
    "balanced_packing",
    "contiguous_gpu_loads",
    "load_expert_loads",
    "loads_from_jsonl",
    "loads_from_snapshot",
    "loads_from_summary",
    "max_over_mean",
    "plan_expert_placement",
    "replicate_experts",
    "run_plan_ep",
]

PLACEMENT_FORMAT = "moescope.placement/1"


class PlacementError(ValueError):
    """Impossible placement settings or unreadable loads (the message says what to do)."""


# --------------------------------------------------------------------------- pure steps


def balanced_packing(weights: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy balanced packing of n items into ``num_packs`` packs of exactly n / num_packs
    items each: heaviest item first, into the currently lightest pack that has room
    (ties: the lowest item index first, then the lowest pack id).

    Args:
        weights: [n] item weights (float64, finite, >= 0).
        num_packs: number of packs; must divide n.

    Returns:
        ``(pack, rank)``: [n] int64 pack of each item and [n] int64 position of the item
        inside its pack (0 = the first item the pack received).
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    per_pack = n // num_packs
    if per_pack * num_packs != n:
        raise PlacementError(f"cannot pack {n} items into {num_packs} equal packs")
    if per_pack == 1:
        # One item per pack: nothing to balance, keep the order.
        return np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    pack = np.empty(n, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    pack_load = np.zeros(num_packs, dtype=np.float64)
    pack_size = np.zeros(num_packs, dtype=np.int64)
    for item in np.argsort(-w, kind="stable"):
        # Full packs become infinitely heavy, so argmin only sees packs with room.
        j = int(np.argmin(np.where(pack_size < per_pack, pack_load, np.inf)))
        pack[item] = j
        rank[item] = pack_size[j]
        pack_load[j] += w[item]
        pack_size[j] += 1
    return pack, rank


def replicate_experts(weights: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``num_slots`` physical slots to n logical experts, at least one each, so that
    the largest per-replica load ``weights[e] / count[e]`` is as small as possible.

    Extra slots go one at a time to the expert with the largest current per-replica load
    (ties: the lowest id); this greedy choice is optimal for the min-max objective.

    Args:
        weights: [n] loads (float64, finite, >= 0).
        num_slots: total slots, >= n.

    Returns:
        ``(slot_expert, count)``: [num_slots] int64 expert of each slot (slot i < n holds
        expert i, the rest the replicas in the order they were added) and [n] int64
        replicas per expert (sums to ``num_slots``).
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    if num_slots < n:
        raise PlacementError(f"{num_slots} slots cannot hold {n} experts")
    slot_expert = np.empty(num_slots, dtype=np.int64)
    slot_expert[:n] = np.arange(n)
    count = np.ones(n, dtype=np.int64)
    for s in range(n, num_slots):
        e = int(np.argmax(w / count))
        slot_expert[s] = e
        count[e] += 1
    return slot_expert, count


def contiguous_gpu_loads(loads: np.ndarray, num_gpus: int) -> np.ndarray:
    """Per-GPU load of the contiguous placement without replicas (expert e on GPU
    ``floor(e * G / E)``).

    Args:
        loads: [L, E] expert loads.
        num_gpus: G.

    Returns:
        [L, G] float64 per-GPU loads.
    """
    x = np.asarray(loads, dtype=np.float64)
    e = x.shape[-1]
    gpu = (np.arange(e) * num_gpus) // e
    out = np.zeros((*x.shape[:-1], num_gpus), dtype=np.float64)
    # Along the last axis, through transposed views (out.T is a view of out): the same
    # additions in the same order as indexing with (..., gpu), which numpy's stubs reject.
    np.add.at(out.T, gpu, x.T)
    return out


def max_over_mean(gpu_loads: np.ndarray) -> np.ndarray:
    """Busiest GPU over the mean GPU, per row.

    Args:
        gpu_loads: [..., G] per-GPU loads.

    Returns:
        [...] float64; NaN where the row's total load is 0.
    """
    x = np.asarray(gpu_loads, dtype=np.float64)
    mean = x.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, x.max(axis=-1) / np.where(mean > 0, mean, 1.0), np.nan)


# --------------------------------------------------------------------------- the plan


@dataclass
class Placement:
    """A placement of E logical experts on P physical slots of G GPUs in N nodes, per layer.

    Shapes: L layers, E logical experts, P physical slots (``num_physical``), G GPUs,
    N nodes, X = ``replica_count.max()``.

    Attributes:
        layers: [L] layer names (module paths, or ``"0"``, ``"1"``, ... when unnamed).
        loads: [L, E] float64 the loads the plan was made from.
        num_gpus, num_nodes, num_groups: G, N and the expert groups asked for.
        policy: ``"hierarchical"`` (groups packed to nodes, replicas within nodes) or
            ``"global"`` (``num_groups`` not a multiple of N: replicas anywhere).
        physical_to_logical: [L, P] int64 logical expert held by each physical slot.
        logical_to_physical: [L, E, X] int64 the slots holding each logical expert, in
            increasing slot order, padded with -1.
        replica_count: [L, E] int64 slots per logical expert (>= 1, sums to P).
        gpu_load_before: [L, G] float64 per-GPU load of the contiguous placement.
        gpu_load_after: [L, G] float64 per-GPU load of this plan (a replica carries
            load / replica_count).
    """

    layers: list[str]
    loads: np.ndarray
    num_gpus: int
    num_nodes: int
    num_groups: int
    policy: str
    physical_to_logical: np.ndarray
    logical_to_physical: np.ndarray
    replica_count: np.ndarray
    gpu_load_before: np.ndarray
    gpu_load_after: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_logical(self) -> int:
        """E."""
        return int(self.loads.shape[1])

    @property
    def num_physical(self) -> int:
        """P = E + R."""
        return int(self.physical_to_logical.shape[1])

    @property
    def num_redundant(self) -> int:
        """R = P - E."""
        return self.num_physical - self.num_logical

    @property
    def slots_per_gpu(self) -> int:
        """P / G."""
        return self.num_physical // self.num_gpus

    @property
    def slot_gpu(self) -> np.ndarray:
        """[P] int64 GPU of each physical slot."""
        return np.arange(self.num_physical) // self.slots_per_gpu

    @property
    def balance_before(self) -> np.ndarray:
        """[L] max/mean per-GPU load of the contiguous placement (NaN without load)."""
        return max_over_mean(self.gpu_load_before)

    @property
    def balance_after(self) -> np.ndarray:
        """[L] max/mean per-GPU load of this plan (NaN without load)."""
        return max_over_mean(self.gpu_load_after)

    @property
    def colocated_replicas(self) -> np.ndarray:
        """[L] int64 replicas sharing a GPU with another replica of the same expert (a
        replica on the same GPU splits no work across GPUs; the greedy packing does not
        rule it out)."""
        gpu = self.slot_gpu
        out = np.zeros(len(self.layers), dtype=np.int64)
        for i in range(len(self.layers)):
            pairs = self.physical_to_logical[i] * self.num_gpus + gpu
            out[i] = self.num_physical - np.unique(pairs).size
        return out

    def to_dict(self, maps: bool = True) -> dict[str, Any]:
        """JSON-able plan (strict JSON: NaN as None). ``maps=False`` leaves out the three
        per-layer maps (summary only)."""
        layers: dict[str, Any] = {}
        before, after = self.balance_before, self.balance_after
        coloc = self.colocated_replicas
        for i, name in enumerate(self.layers):
            d: dict[str, Any] = {
                "total_load": _num(self.loads[i].sum()),
                "max_over_mean_before": _num(before[i]),
                "max_over_mean_after": _num(after[i]),
                "gpu_load_before": [_num(v) for v in self.gpu_load_before[i]],
                "gpu_load_after": [_num(v) for v in self.gpu_load_after[i]],
                "colocated_replicas": int(coloc[i]),
            }
            if maps:
                d["physical_to_logical"] = self.physical_to_logical[i].tolist()
                d["logical_to_physical"] = self.logical_to_physical[i].tolist()
                d["replica_count"] = self.replica_count[i].tolist()
            layers[name] = d
        return {
            "format": PLACEMENT_FORMAT,
            "num_logical_experts": self.num_logical,
            "num_physical_experts": self.num_physical,
            "num_redundant": self.num_redundant,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "num_groups": self.num_groups,
            "policy": self.policy,
            "slot_to_gpu": "slot p is on GPU p // (num_physical_experts / num_gpus)",
            "before": "contiguous, no replicas: expert e on GPU floor(e * num_gpus / E)",
            **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float))},
            "mean_max_over_mean_before": _num(_nanmean(before)),
            "mean_max_over_mean_after": _num(_nanmean(after)),
            "layers": layers,
        }


def _num(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _validate(
    loads: Any, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    try:
        x = np.asarray(loads, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PlacementError(f"loads must be a numeric [layers, experts] array ({err})") from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise PlacementError(
            f"loads must be a non-empty [layers, experts] array, got shape {tuple(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise PlacementError("loads contain NaN or inf; pass finite token counts per expert")
    if (x < 0).any():
        raise PlacementError("loads contain negative values; pass token counts (>= 0) per expert")
    e = x.shape[1]
    for name, v in (("number of GPUs", num_gpus), ("number of nodes", num_nodes),
                    ("number of expert groups", num_groups),
                    ("number of physical experts", num_physical)):  # fmt: skip
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise PlacementError(f"the {name} must be a positive integer, got {v!r}")
    if num_gpus % num_nodes:
        raise PlacementError(
            f"{num_gpus} GPUs cannot be split evenly over {num_nodes} nodes; "
            "use a GPU count that is a multiple of the node count"
        )
    if num_physical < e:
        raise PlacementError(
            f"{num_physical} physical expert slots cannot hold {e} experts; "
            f"use at least {e} slots (redundant replicas >= 0)"
        )
    if num_physical % num_gpus:
        r_up = -(-num_physical // num_gpus) * num_gpus - e
        raise PlacementError(
            f"{num_physical} physical expert slots ({e} experts + {num_physical - e} redundant) "
            f"do not split evenly over {num_gpus} GPUs; make experts + redundant a multiple "
            f"of {num_gpus} (e.g. {r_up} redundant)"
        )
    if e % num_groups:
        raise PlacementError(
            f"{e} experts cannot form {num_groups} equal expert groups; "
            f"use a number of groups that divides {e}"
        )
    return x


def plan_expert_placement(
    loads: Any,
    num_physical: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_gpus: int = 1,
    layers: Sequence[str] | None = None,
) -> Placement:
    """Place E experts plus replicas on ``num_physical`` slots of G GPUs in N nodes.

    The hierarchical EPLB algorithm (module docstring); the global variant when
    ``num_groups`` is not a multiple of ``num_nodes``.

    Args:
        loads: [L, E] (or [E] for one layer) load of every expert, e.g. tokens routed to
            it over a window; finite and >= 0.
        num_physical: P = E + R, the physical expert slots (a multiple of ``num_gpus``,
            >= E).
        num_groups: expert groups of consecutive ids (must divide E); 1 for models
            without group-limited routing.
        num_nodes: N, nodes (``num_gpus`` must be a multiple of it).
        num_gpus: G, GPUs in all.
        layers: [L] layer names (default ``"0"``, ``"1"``, ...).

    Returns:
        The :class:`Placement` (maps, replica counts, per-GPU loads before and after).

    Raises:
        PlacementError: impossible settings or bad loads (the message says what to do).
    """
    x = _validate(loads, num_physical, num_groups, num_nodes, num_gpus)
    n_layers, e = x.shape
    names = [str(i) for i in range(n_layers)] if layers is None else [str(s) for s in layers]
    if len(names) != n_layers:
        raise PlacementError(f"{len(names)} layer names for {n_layers} rows of loads")
    hierarchical = num_groups % num_nodes == 0
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    group_size = e // groups
    groups_per_node = groups // nodes
    experts_per_node = e // nodes
    slots_per_node = num_physical // nodes
    gpus_per_node = num_gpus // nodes
    slots_per_gpu = num_physical // num_gpus

    phys = np.empty((n_layers, num_physical), dtype=np.int64)
    for li in range(n_layers):
        w = x[li]
        # Step 1: whole groups onto nodes.
        group_load = w.reshape(groups, group_size).sum(axis=1)
        node_of_group, rank_in_node = balanced_packing(group_load, nodes)
        for node in range(nodes):
            # The node's experts: its groups in the order it received them, each group's
            # experts in id order.
            mine = np.flatnonzero(node_of_group == node)
            mine = mine[np.argsort(rank_in_node[mine], kind="stable")]
            experts = (mine[:, None] * group_size + np.arange(group_size)).reshape(-1)
            assert experts.size == experts_per_node == groups_per_node * group_size
            # Step 2: replicas within the node.
            slot_local, count = replicate_experts(w[experts], slots_per_node)
            # Step 3: the node's physical experts onto its GPUs.
            per_slot = w[experts][slot_local] / count[slot_local]
            gpu, rank = balanced_packing(per_slot, gpus_per_node)
            dest = node * slots_per_node + gpu * slots_per_gpu + rank
            phys[li, dest] = experts[slot_local]

    count = np.zeros((n_layers, e), dtype=np.int64)
    np.add.at(count, (np.repeat(np.arange(n_layers), num_physical), phys.reshape(-1)), 1)
    max_rep = int(count.max())
    log2phys = np.full((n_layers, e, max_rep), -1, dtype=np.int64)
    for li in range(n_layers):
        order = np.argsort(phys[li], kind="stable")  # slots grouped by expert, ascending
        expert_sorted = phys[li][order]
        first = np.searchsorted(expert_sorted, np.arange(e))
        k = np.arange(num_physical) - first[expert_sorted]
        log2phys[li, expert_sorted, k] = order

    slot_load = np.take_along_axis(x, phys, axis=1) / np.take_along_axis(count, phys, axis=1)
    # A GPU's slots are consecutive, so its load is the sum of one [P / G] block.
    after = slot_load.reshape(n_layers, num_gpus, slots_per_gpu).sum(axis=2)
    return Placement(
        layers=names,
        loads=x,
        num_gpus=int(num_gpus),
        num_nodes=int(num_nodes),
        num_groups=int(num_groups),
        policy="hierarchical" if hierarchical else "global",
        physical_to_logical=phys,
        logical_to_physical=log2phys,
        replica_count=count,
        gpu_load_before=contiguous_gpu_loads(x, num_gpus),
        gpu_load_after=after,
    )


# --------------------------------------------------------------------------- loaders


@dataclass
class LoadSource:
    """Expert loads read from a file, per layer.

    Attributes:
        rows: ``{layer name: [E_l] float64 usage counts}`` in model order (E_l may differ
            between layers; :meth:`stack` needs equal counts).
        kind: ``"summary"``, ``"jsonl"``, ``"snapshot"`` or ``"array"``.
        description: one line saying what was read (e.g. which JSONL lines).
        num_groups: the model config's ``n_group`` when the file points to a readable
            config, else None.
    """

    rows: dict[str, np.ndarray]
    kind: str
    description: str
    num_groups: int | None = None

    @property
    def layers(self) -> list[str]:
        """[L] layer names in model order."""
        return list(self.rows)

    def stack(self, layers: Sequence[str] | None = None) -> np.ndarray:
        """[L, E] float64 loads of ``layers`` (default: all), which must share E."""
        names = self.layers if layers is None else list(layers)
        rows = [self.rows[n] for n in names]
        if len({r.size for r in rows}) > 1:
            detail = ", ".join(f"{n}: {r.size}" for n, r in zip(names, rows, strict=True))
            raise PlacementError(
                f"layers have different expert counts ({detail}); "
                "pick layers with the same count with --layer"
            )
        return np.stack(rows)

    @property
    def loads(self) -> np.ndarray:
        """[L, E] float64 loads of every layer."""
        return self.stack()


def _rows(layers: Any, what: str) -> dict[str, np.ndarray]:
    """``{layer: usage_counts}`` of a snapshot-shaped ``layers`` object (JSON nulls: NaN,
    which the planner rejects)."""
    if not isinstance(layers, dict):
        raise PlacementError(f"{what}: 'layers' is not an object of per-layer statistics")
    out: dict[str, np.ndarray] = {}
    for name, d in layers.items():
        counts = d.get("usage_counts") if isinstance(d, dict) else None
        if not isinstance(counts, list):
            raise PlacementError(f"{what}: layer {name!r} has no 'usage_counts' list")
        try:
            out[str(name)] = np.array(
                [math.nan if c is None else c for c in counts], dtype=np.float64
            )
        except (TypeError, ValueError):
            raise PlacementError(f"{what}: layer {name!r} has non-numeric usage_counts") from None
    if not out:
        raise PlacementError(f"{what} has no MoE layer with usage counts")
    return out


def loads_from_snapshot(snapshot: Any) -> tuple[list[str], np.ndarray]:
    """Per-layer usage counts of a :class:`~moescope.stats.snapshot.Snapshot`.

    Returns:
        ``(layers, loads)``: [L] names and [L, E] float64 counts (layers must share E).
    """
    src = LoadSource(
        {k: np.asarray(s.usage_counts, dtype=np.float64) for k, s in snapshot.layers.items()},
        "snapshot",
        "snapshot",
    )
    if not src.rows:
        raise PlacementError("the snapshot has no MoE layer")
    return src.layers, src.loads


def _config_groups(source: Any, base: Path) -> int | None:
    """``n_group`` of the model config a summary.json names, when it can be read."""
    if not isinstance(source, str) or not source:
        return None
    p = Path(source)
    if not p.is_absolute():
        # The source is relative to where analyze ran: try there (the current directory),
        # beside the summary, and beside its --out directory.
        p = next((q for q in (p, base / p, base.parent / p) if q.exists()), p)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(cfg, dict) and isinstance(cfg.get("config"), dict):
        cfg = cfg["config"]  # a moescope reference file
    g = cfg.get("n_group") if isinstance(cfg, dict) else None
    return int(g) if isinstance(g, int) and g > 0 else None


def loads_from_summary(
    summary: Mapping[str, Any], path: str | os.PathLike[str] = "summary.json"
) -> LoadSource:
    """Loads of a ``summary.json`` written by ``moescope analyze``: each layer's
    ``usage_counts`` over the whole analysed text (every data file together)."""
    rows = _rows(summary.get("layers"), str(path))
    model = summary.get("model") or {}
    return LoadSource(
        rows,
        "summary",
        f"summary.json of moescope analyze ({summary.get('total_tokens')} tokens, "
        f"model {model.get('model_type')})",
        _config_groups(model.get("source"), Path(path).parent),
    )


def loads_from_jsonl(
    records: Sequence[Mapping[str, Any]], last: int = 1, path: str = "JSONL log"
) -> LoadSource:
    """Loads of a JsonlSink log: the usage counts of its last ``last`` non-empty snapshot
    lines summed (``last=0``: every non-empty line). Empty windows (no routed token: a
    server between requests) are skipped; the description says which lines were used.

    Each snapshot line of moescope's training integrations and of vLLM serving counts one
    window (they read with ``snapshot(reset=True)``), so the sum over lines is the load
    over those windows; the default (the last line) is the most recent window, i.e. the
    routing the model does now. A log written from plain ``snapshot()`` reads (which never
    reset) holds running totals: use its last line only.
    """
    if last < 0:
        raise PlacementError(f"--records must be >= 0 (0 = all), got {last}")
    snaps = [
        r["snapshot"]
        for r in records
        if isinstance(r, Mapping)
        and r.get("kind") == "snapshot"
        and isinstance(r.get("snapshot"), Mapping)
    ]
    if not snaps:
        raise PlacementError(f"{path}: no 'snapshot' line; pass a JSONL log written by JsonlSink")
    rows = [_rows(s.get("layers"), path) for s in snaps]
    # An idle window (a server between requests, the window open at shutdown) has no
    # load to place: only windows with routed tokens count.
    busy = [i for i, r in enumerate(rows) if any(np.nansum(v) > 0 for v in r.values())]
    if not busy:
        raise PlacementError(
            f"{path}: all {len(snaps)} snapshot lines are empty windows (no routed tokens); "
            "pass a log written while the model served or trained"
        )
    chosen = busy if last == 0 or last >= len(busy) else busy[-last:]
    total: dict[str, np.ndarray] = {}
    for i in chosen:
        for n, row in rows[i].items():
            if n in total and total[n].shape != row.shape:
                raise PlacementError(
                    f"{path}: layer {n!r} changes its expert count between snapshot lines; "
                    "use --records 1"
                )
            total[n] = total[n] + row if n in total else row
    steps = [snaps[i].get("step") for i in chosen]
    if len(chosen) == 1:
        which = f"last non-empty snapshot line (step {steps[0]})"
    elif len(chosen) <= 8:
        which = (
            f"sum of {len(chosen)} non-empty snapshot lines (steps {', '.join(map(str, steps))})"
        )
    else:
        which = f"sum of {len(chosen)} non-empty snapshot lines (steps {steps[0]}..{steps[-1]})"
    skipped = len(snaps) - len(busy)
    empty = f", {skipped} empty window{'s' if skipped != 1 else ''} skipped" if skipped else ""
    return LoadSource(total, "jsonl", f"JSONL log: {which} of {len(snaps)}{empty}")


def load_expert_loads(path: str | os.PathLike[str], records: int = 1) -> LoadSource:
    """Expert loads from a file, recognised by its content:

    - ``summary.json`` of ``moescope analyze`` (``"format": "moescope.analysis/1"``);
    - a JSONL log of :class:`~moescope.sinks.jsonl.JsonlSink` (``records``: see
      :func:`loads_from_jsonl`);
    - a ``Snapshot.to_json()`` file (``"format": "moescope.snapshot/1"``);
    - a JSON array of per-layer load arrays (``[[...], [...]]``, layers named 0, 1, ...).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or err
        raise PlacementError(
            f"cannot read {p} ({why}); pass a summary.json, a moescope JSONL log or a snapshot JSON"
        ) from None
    try:
        obj: Any = json.loads(text)
    except ValueError:
        obj = None  # several lines: a JSONL log
    if isinstance(obj, list):
        try:
            arr = np.asarray(obj, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.ndim not in (1, 2) or arr.size == 0:
            raise PlacementError(f"{p}: a JSON array must be [layers][experts] numbers")
        arr = arr.reshape(-1, arr.shape[-1])
        return LoadSource(
            {str(i): r for i, r in enumerate(arr)}, "array", f"JSON array of {arr.shape[0]} layers"
        )
    if isinstance(obj, dict) and obj.get("kind") != "snapshot":
        if obj.get("format") == "moescope.analysis/1" or "aggregates" in obj:
            return loads_from_summary(obj, p)
        if "layers" in obj:
            return LoadSource(
                _rows(obj["layers"], str(p)), "snapshot", f"snapshot (step {obj.get('step')})"
            )
        raise PlacementError(f"{p}: not a moescope summary.json, snapshot or JSONL log")
    # why: sinks imports torch; plan-ep on summaries and snapshots runs without it
    from moescope.sinks.jsonl import read_jsonl

    return loads_from_jsonl(read_jsonl(p), last=records, path=str(p))


# --------------------------------------------------------------------------- CLI


def add_plan_ep_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``moescope plan-ep``."""
    p = sub.add_parser(
        "plan-ep",
        help="expert-parallel placement (EPLB) from measured expert loads",
        description=(
            "Place E experts plus R redundant replicas on G GPUs in N nodes from measured "
            "per-layer expert loads (a summary.json of moescope analyze, a JsonlSink log, "
            "or a snapshot JSON), with the hierarchical expert-parallel load balancer of "
            "DeepSeek's EPLB / vLLM. Prints per layer the busiest GPU's load over the mean "
            "before (contiguous placement, no replicas) and after; --out writes the "
            "logical-to-physical map."
        ),
    )
    p.add_argument("input", help="summary.json, JSONL log or snapshot JSON with usage counts")
    p.add_argument("--gpus", type=int, required=True, metavar="G", help="GPUs in all")
    p.add_argument(
        "--nodes", type=int, default=1, metavar="N", help="nodes; G must be a multiple (default 1)"
    )
    p.add_argument(
        "--redundant",
        type=int,
        default=0,
        metavar="R",
        help="extra expert replicas per layer: P = E + R slots, a multiple of G (default 0)",
    )
    p.add_argument(
        "--groups",
        type=int,
        default=None,
        metavar="K",
        help="expert groups (DeepSeek n_group; must divide E). Default: the "
        "model config's n_group when the summary.json names a readable config, "
        "else 1. Groups not a multiple of N use the global policy",
    )
    p.add_argument(
        "--layer",
        action="append",
        default=None,
        metavar="LAYER",
        help="only this layer (index or module path); repeat for several",
    )
    p.add_argument(
        "--records",
        type=int,
        default=1,
        metavar="K",
        help="JSONL log only: sum the last K non-empty snapshot lines (0 = all; default 1, "
        "the most recent window with routed tokens; empty windows are skipped)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (per-layer balance and GPU loads) instead of a table",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="write the plan with per-layer physical_to_logical, "
        "logical_to_physical and replica_count maps as JSON",
    )
    return p


def _select_layers(src: LoadSource, wanted: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    names = src.layers
    if not wanted:
        return names, src.stack()
    chosen: list[str] = []
    for w in wanted:
        if w in src.rows:
            chosen.append(w)
            continue
        try:
            i = int(w)
        except ValueError:
            i = None
        if i is None or not -len(names) <= i < len(names):
            raise PlacementError(
                f"--layer {w!r} is neither a layer index (0..{len(names) - 1}) nor a "
                f"layer name (e.g. {names[0]!r})"
            )
        chosen.append(names[i])
    return chosen, src.stack(chosen)


def _fmt(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "n/a"


def _replicated(plan: Placement, i: int, limit: int = 4) -> str:
    cnt = plan.replica_count[i]
    extra = np.flatnonzero(cnt > 1)
    if extra.size == 0:
        return "-"
    extra = extra[np.argsort(-cnt[extra], kind="stable")]
    txt = " ".join(f"e{int(e)}x{int(cnt[e])}" for e in extra[:limit])
    return txt + (f" +{extra.size - limit}" if extra.size > limit else "")


def format_plan_table(plan: Placement, src_line: str = "") -> str:
    """The ``moescope plan-ep`` table: one row per layer, then the mean over layers."""
    lines = []
    groups_from = plan.meta.get("groups_from")
    groups_from = f" ({groups_from})" if groups_from else ""
    if src_line:
        lines.append(src_line)
    lines.append(
        f"E={plan.num_logical} experts + R={plan.num_redundant} replicas = "
        f"P={plan.num_physical} slots on G={plan.num_gpus} GPUs "
        f"({plan.slots_per_gpu} per GPU) in N={plan.num_nodes} nodes; "
        f"groups={plan.num_groups}{groups_from}, policy {plan.policy}"
    )
    lines.append("max/mean = busiest GPU's load / mean GPU load (1.000 = perfect balance)")
    lines.append("")
    w = max([len("layer"), *(len(n) for n in plan.layers)])
    lines.append(f"{'layer':<{w}}  {'load':>10}  {'before':>8}  {'after':>8}  replicated")
    before, after = plan.balance_before, plan.balance_after
    for i, name in enumerate(plan.layers):
        lines.append(
            f"{name:<{w}}  {plan.loads[i].sum():>10.0f}  {_fmt(before[i]):>8}  "
            f"{_fmt(after[i]):>8}  {_replicated(plan, i)}"
        )
    lines.append(
        f"{'mean':<{w}}  {'':>10}  {_fmt(_nanmean(before)):>8}  {_fmt(_nanmean(after)):>8}"
    )
    return "\n".join(lines)


def run_plan_ep(args: argparse.Namespace) -> int:
    """Run ``moescope plan-ep``; one-line error on stderr and status 2 on bad input."""
    try:
        if args.records < 0:
            raise PlacementError(f"--records must be >= 0 (0 = all), got {args.records}")
        src = load_expert_loads(args.input, records=args.records)
        names, loads = _select_layers(src, args.layer)
        if args.redundant < 0:
            raise PlacementError(f"--redundant must be >= 0, got {args.redundant}")
        if args.groups is not None:
            groups, groups_from = args.groups, "--groups"
        elif src.num_groups is not None:
            groups, groups_from = src.num_groups, "n_group of the model config"
        else:
            groups, groups_from = 1, "default"
        plan = plan_expert_placement(
            loads,
            num_physical=loads.shape[1] + args.redundant,
            num_groups=groups,
            num_nodes=args.nodes,
            num_gpus=args.gpus,
            layers=names,
        )
        plan.meta.update(source=str(args.input), loads=src.description, groups_from=groups_from)
        if args.out:
            out = Path(args.out)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(plan.to_dict(), indent=1, allow_nan=False))
            except OSError as err:
                raise PlacementError(
                    f"cannot write --out {out} ({err.strerror or err}); choose a writable path"
                ) from None
    except PlacementError as err:
        msg = " ".join(str(err).split())
        print(f"moescope plan-ep: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(maps=False), indent=1, allow_nan=False))
    else:
        print(format_plan_table(plan, f"loads: {args.input}: {src.description}"))
        if args.out:
            print(f"plan: {args.out}")
    return 0
