"""Measured cost: what a token actually touched, from the routing a monitor observed.

The theoretical figures (:func:`moescope.count_parameters`, :func:`moescope.flops_per_token`)
assume every token uses exactly K routed experts per MoE layer. Real routing differs:

- dropped slots (capacity limits) use no expert;
- ids >= E (identity / zero experts, e.g. LongCat-Flash) cost no expert parameters;
- a neuron whose activation is below the threshold contributes nothing to the down
  projection, so a neuron-sparse kernel could skip its column: H multiply-adds per
  inactive neuron per (token, slot) (the seeds' "computation ratio").

Per MoE layer l, with ``a_l`` = kept routed assignments per valid token
(``usage_counts.sum() / num_tokens``; K when nothing is dropped)::

    measured_active = theoretical_active - sum_l (K_l - a_l) * params_per_expert_l
    measured_matmul_flops = theoretical_matmul - sum_l 2 * (K_l - a_l) * matmul_params_per_expert_l
    skippable_down_flops = sum_l 2 * a_l * H * (I_l - activated_neurons_mean_l)
    computation_ratio = (measured_matmul_flops - skippable_down_flops) / theoretical_matmul

Layers the snapshot did not see (no tokens) keep their theoretical cost. Everything here
is pure host arithmetic over a Snapshot and the theoretical reports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

import numpy as np

from moescope.cost.flops import FlopReport, flops_per_token
from moescope.cost.params import EmbeddingConvention, ParamReport, count_parameters
from moescope.stats.snapshot import Snapshot


@dataclass
class MeasuredLayerCost:
    """Measured cost of one MoE layer over a snapshot's window.

    ``assignments_per_token``: kept routed (token, slot) pairs per valid token (K minus
    dropped and identity/zero slots). ``active_routed_params``: routed-expert parameters
    per token actually used (``assignments_per_token x params_per_expert``).
    ``skippable_down_flops``: per token, the down-projection FLOPs of inactive neurons
    (None without neuron statistics).
    """

    layer: str
    num_tokens: int
    top_k: int
    assignments_per_token: float
    dropped_per_token: float
    extra_slots_per_token: float
    active_routed_params: float
    theoretical_routed_params: int
    routed_matmul_flops: float
    theoretical_routed_matmul_flops: int
    skippable_down_flops: float | None = None
    neuron_sparsity: float | None = None


@dataclass
class MeasuredCost:
    """Model-level measured parameters and FLOPs per token (see the module docstring)."""

    embeddings: str
    total_params: int
    theoretical_active_params: int
    measured_active_params: float
    measured_activation_ratio: float
    theoretical_matmul_flops: int | None
    measured_matmul_flops: float | None
    skippable_down_flops: float | None
    computation_ratio: float | None
    layers: list[MeasuredLayerCost] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (layers as a list of dicts)."""
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d


def _finite(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x)


def measured_cost_from_reports(
    snapshot: Snapshot,
    params: ParamReport,
    flops: FlopReport | None = None,
    hidden_size: int | None = None,
) -> MeasuredCost:
    """Combine a Snapshot with theoretical reports of the same model.

    Snapshot layers are matched to ``params.moe_layers`` by module path. ``hidden_size``
    (H) is needed only for the neuron term (one down-projection column per neuron holds H
    weights); without it, or without neuron statistics, that term is None.
    """
    by_name = {layer.name: layer for layer in params.moe_layers}
    unknown = sorted(set(snapshot.layers) - set(by_name))
    if unknown:
        raise ValueError(
            f"snapshot layers {unknown[:3]} are not MoE blocks of the counted model "
            f"(known: {sorted(by_name)[:3]}...): pass the model the monitor watched"
        )
    active = float(params.active_params)
    matmul = float(flops.matmul_flops) if flops is not None else None
    skippable_total = 0.0
    any_neurons = False
    layers: list[MeasuredLayerCost] = []
    for name, lp in by_name.items():
        stats = snapshot.layers.get(name)
        if stats is None or not stats.num_tokens:
            continue
        t = float(stats.num_tokens)
        kept = float(np.asarray(stats.usage_counts, dtype=np.float64).sum()) / t
        dropped = float(np.asarray(stats.dropped_counts, dtype=np.float64).sum()) / t
        extra = float(stats.extra_slots) / t
        routed_p = kept * lp.params_per_expert
        routed_f = 2.0 * kept * lp.matmul_params_per_expert
        active += routed_p - lp.top_k * lp.params_per_expert
        if matmul is not None:
            matmul += routed_f - 2.0 * lp.top_k * lp.matmul_params_per_expert
        skippable = None
        mean_act = getattr(stats, "activated_neurons_mean", None)
        inter = getattr(stats, "intermediate_size", None)
        if hidden_size and _finite(mean_act) and inter:
            skippable = 2.0 * kept * hidden_size * (float(inter) - float(mean_act))
            skippable_total += skippable
            any_neurons = True
        layers.append(
            MeasuredLayerCost(
                layer=name,
                num_tokens=int(stats.num_tokens),
                top_k=lp.top_k,
                assignments_per_token=kept,
                dropped_per_token=dropped,
                extra_slots_per_token=extra,
                active_routed_params=routed_p,
                theoretical_routed_params=lp.top_k * lp.params_per_expert,
                routed_matmul_flops=routed_f,
                theoretical_routed_matmul_flops=2 * lp.top_k * lp.matmul_params_per_expert,
                skippable_down_flops=skippable,
                neuron_sparsity=getattr(stats, "neuron_sparsity", None),
            )
        )
    skippable_out = skippable_total if any_neurons else None
    ratio = None
    if matmul is not None and flops is not None and flops.matmul_flops:
        ratio = (matmul - (skippable_out or 0.0)) / flops.matmul_flops
    return MeasuredCost(
        embeddings=params.embeddings,
        total_params=params.total_params,
        theoretical_active_params=params.active_params,
        measured_active_params=active,
        measured_activation_ratio=active / params.total_params if params.total_params else 0.0,
        theoretical_matmul_flops=flops.matmul_flops if flops is not None else None,
        measured_matmul_flops=matmul,
        skippable_down_flops=skippable_out,
        computation_ratio=ratio,
        layers=layers,
    )


def _hidden_size(model_or_config: Any) -> int | None:
    cfg = getattr(model_or_config, "config", model_or_config)
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        cfg = get()
    for key in ("hidden_size", "d_model", "n_embd"):
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def measured_cost(
    snapshot: Snapshot,
    config_or_model: Any,
    embeddings: EmbeddingConvention = "both",
    seq_len: int = 2048,
) -> MeasuredCost:
    """Measured parameters and FLOPs per token of ``config_or_model`` under ``snapshot``.

    ``config_or_model`` is what :func:`moescope.count_parameters` accepts; pass the model
    the monitor watched (or its config) so the layer paths match.
    """
    params = count_parameters(config_or_model, embeddings=embeddings)
    flops = flops_per_token(config_or_model, seq_len=seq_len, embeddings=embeddings)
    return measured_cost_from_reports(snapshot, params, flops, _hidden_size(config_or_model))
