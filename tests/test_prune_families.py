"""Every MoE family of the installed transformers, pruned to about half its experts.

The families and their tiny models come from ``tests/hf_sweep.py`` (read off the package,
not a hand-written list). Each one either prunes — the pruned model rebuilds from its own
config with exactly its tensor shapes (``prune_model(verify=True)``), its parameters equal
``count_parameters`` of that config, and a forward runs — or is refused with a
:class:`PruneError` because pruning would change its routing contract. The refused list is
pinned here, so a family that starts or stops being prunable shows up.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from hf_sweep import build_family, moe_families
from moescope.cost.params import count_parameters
from moescope.prune import PruneError, check_prunable, keep_experts, measure_saliency, prune_model
from moescope.prune.measure import router_groups
from moescope.prune.surgery import moe_layers

REFUSED = {
    "dbrx": "no tensor with the 8 experts first",  # experts stored [E * I, H]
    "diffusion_gemma": "share their expert weights",  # encoder and decoder tied
    "doge": "output rows",  # product-key experts
    "inkling": "output rows",  # the router scores an extra expert
    "longcat_flash": "zero-compute / identity experts",
    "zaya": "routing classes",  # a skip class after the experts
}
NOT_MONITORED = {"vitpose_backbone"}  # experts picked by a task index, not a router


@pytest.mark.slow
def test_every_family_prunes_or_is_refused() -> None:
    pruned_ok, refused = [], {}
    for family in moe_families():
        if family in NOT_MONITORED:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = build_family(family)
        model, inputs = built.model, dict(built.inputs)
        infos = moe_layers(model)
        e, k, g = infos[0].num_experts, infos[0].top_k, router_groups(infos[0])
        n = max(k, e // 2, 2 * g if g > 1 else 1)
        n = -(-n // g) * g
        try:
            check_prunable(model, n, infos)
        except PruneError as err:
            refused[family] = str(err)
            continue
        sal = measure_saliency(
            model, [inputs["input_ids"]], forward=lambda m, _, kw=inputs: m(**kw)
        )
        by = "saliency" if all(s.reap is not None for s in sal) else "frequency"
        keep = {s.layer: keep_experts(s, n, by).tolist() for s in sal}
        pruned, summary = prune_model(model, keep)
        assert count_parameters(pruned.config).total_params == summary.params_after, family
        assert sum(p.numel() for p in pruned.parameters()) == summary.params_after, family
        with torch.no_grad():
            pruned(**inputs)
        pruned_ok.append(family)
    assert set(refused) == set(REFUSED), refused
    for family, why in REFUSED.items():
        assert why in refused[family], (family, refused[family])
    assert len(pruned_ok) >= 60 and {"mixtral", "qwen3_moe", "olmoe", "deepseek_v3"} <= set(
        pruned_ok
    )
