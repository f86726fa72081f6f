"""``moescope.prune``: saliency, surgery, reload and refusals on five families.

Families: mixtral, qwen3_moe, olmoe (transformers' fused experts, softmax routers),
deepseek_v3 (sigmoid, correction bias, group-limited: n_group=2, topk_group=1) and
moescope.nn (TinyMoEForCausalLM with a group-limited router and with the top-k router).

The central check: experts that no token of the data was routed to are removed, and the
pruned model, saved and reloaded with ``from_pretrained``, computes the same logits on
that data. Exactly what "the same" can mean depends on the router, and is asserted as such:

- sigmoid routers (deepseek_v3, moescope.nn's GroupLimitedRouter) score each expert on
  its own: the logits are bit-identical;
- softmax routers that renormalise the top-k (mixtral, qwen3_moe with
  ``norm_topk_prob=True`` as Qwen3-30B-A3B ships, moescope.nn's TopKRouter) give the kept
  experts the same weights in exact arithmetic, but the softmax denominator is summed over
  fewer terms, so float rounding differs. Their routers take the softmax in float32 even
  in a float64 model, so the logits of a float64 run agree to 1e-6 (measured: 4e-9 to
  9e-9), not bit for bit;
- softmax without renormalisation (OLMoE) hands the removed experts' probability mass to
  no one: the kept weights are softmax over the kept experts. The reference is the
  original model with its router's weights recomputed that way (a forward hook, float64
  softmax in the test): equal to 1e-6 (measured 2e-8), while the unhooked original differs
  by 1.8e-3.

References are independent of moescope: received expert ids by plain pre-hooks,
parameter counts by ``numel``, REAP recomputed in float64 from the expert weights.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import build_tiny
from moescope.cost.params import count_parameters
from moescope.nn.model import TinyMoEConfig
from moescope.prune import (
    LayerSaliency,
    PruneError,
    check_prunable,
    keep_count,
    keep_experts,
    measure_saliency,
    prune_model,
    reap_saliency,
)
from moescope.prune.run import unused_keep_count
from moescope.prune.surgery import moe_layers

FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "nn_group", "nn_topk"]
# How the pruned model's logits relate to the original's on the calibration data.
EXACT = {"deepseek_v3", "nn_group"}
RENORMALISED = {"mixtral", "qwen3_moe", "nn_topk"}
UNNORMALISED = {"olmoe"}

DATA = torch.tensor([[5, 17, 33, 2, 90, 61]])  # short: several experts stay unused


def _nn_model(router: str, seed: int = 0) -> torch.nn.Module:
    from moescope.nn.hf import TinyMoEForCausalLM, TinyMoEHFConfig

    kwargs = {"n_group": 2, "topk_group": 1} if router == "group_limited" else {}
    cfg = TinyMoEConfig(
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        num_experts=8,
        top_k=2,
        router=router,
        router_kwargs=kwargs,
        max_seq_len=64,
    )
    torch.manual_seed(seed)
    model = TinyMoEForCausalLM(TinyMoEHFConfig.from_tiny_config(cfg))
    with torch.no_grad():  # far-from-uniform routing
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(30.0)
    return model.eval()


def build(family: str) -> torch.nn.Module:
    if family == "nn_group":
        return _nn_model("group_limited")
    if family == "nn_topk":
        return _nn_model("topk")
    overrides = {"norm_topk_prob": True} if family == "qwen3_moe" else {}
    model, _ = build_tiny(family, **overrides)
    return model


def received_ids(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Expert ids each experts module RECEIVED, per layer (plain pre-hooks)."""
    got: list[torch.Tensor] = []
    handles = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.experts"):

            def hook(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                idx = args[1] if len(args) > 1 else next(iter(kwargs.values()))
                got.append(idx.reshape(-1, idx.shape[-1]).clone())

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _renormalising_hook(kept: list[int]) -> Callable[..., Any]:
    """Forward hook on an OLMoE router: weights = softmax over the KEPT experts' logits
    (float64, written here), gathered at the chosen ids."""

    def hook(module: Any, args: Any, out: Any) -> Any:
        logits, _, idx = out
        masked = torch.full_like(logits, float("-inf"))
        masked[:, kept] = logits[:, kept]
        probs = torch.softmax(masked.double(), dim=-1).to(logits.dtype)
        return logits, probs.gather(1, idx), idx

    return hook


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_never_routed_experts(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import moescope.nn.hf  # noqa: F401  registers moescope_tiny_moe for from_pretrained

    model = build(family)
    # Two tokens for group-limited routers: six would reach every group's experts.
    data = DATA[:, :2] if family in EXACT else DATA
    sal = measure_saliency(model, [data])
    n = unused_keep_count(sal)
    e = sal[0].num_experts
    assert n < e, f"{family}: the data left no expert unused in every layer"
    keep = {s.layer: keep_experts(s, n, "frequency").tolist() for s in sal}
    for s in sal:  # only experts no token chose are removed
        removed = sorted(set(range(e)) - set(keep[s.layer]))
        assert (s.frequency[removed] == 0).all()
        assert s.frequency.sum() == data.numel() * s.top_k
    pruned, summary = prune_model(model, keep)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    # The checkpoint reloads exactly, and its config counts what it holds.
    mine, theirs = pruned.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    held = sum(p.numel() for p in loaded.parameters())
    assert count_parameters(loaded.config).total_params == held == summary.params_after
    before = count_parameters(model)
    per_layer = before.moe_layers[0]
    router_per_expert = per_layer.router_params // e
    assert summary.params_before - held == len(sal) * (e - n) * (
        per_layer.params_per_expert + router_per_expert
    )

    # Routing: the reloaded model sends every token to the same experts (renumbered).
    ids_orig = received_ids(model, data)
    ids_new = received_ids(loaded, data)
    for s, a, b in zip(sal, ids_orig, ids_new, strict=True):
        assert int(b.max()) < n
        mapped = torch.tensor(keep[s.layer])[b]
        assert torch.equal(mapped.sort(-1).values, a.sort(-1).values)

    # Logits, by what the router allows (module docstring).
    if family in EXACT:
        assert torch.equal(_logits(loaded, data), _logits(model, data))
        return
    model64, loaded64 = model.double(), loaded.double()
    if not family.startswith("nn_"):  # grouped_mm has no float64 kernel
        model64.set_experts_implementation("eager")
        loaded64.set_experts_implementation("eager")
    if family in RENORMALISED:
        diff = (_logits(loaded64, data) - _logits(model64, data)).abs().max()
        assert diff < 1e-6
        return
    assert family in UNNORMALISED
    handles = [
        info.router.register_forward_hook(_renormalising_hook(keep[info.path]))
        for info in moe_layers(model64)
    ]
    try:
        ref = _logits(model64, data)
    finally:
        for h in handles:
            h.remove()
    assert (_logits(loaded64, data) - ref).abs().max() < 1e-6
    # ...and the removed experts' probability mass did move the logits (1.8e-3 here).
    assert (_logits(loaded64, data) - _logits(model64, data)).abs().max() > 1e-4


def test_reap_matches_float64_recomputation() -> None:
    # REAP of one Mixtral layer from its own weights: mean over routed slots of
    # w * || down(silu(gate x) * up x) ||, every expert output computed here in float64.
    model = build("mixtral")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs: dict[str, torch.Tensor] = {}
    experts = model.model.layers[1].mlp.experts

    def grab(m: Any, args: tuple[Any, ...]) -> None:
        inputs["x"], inputs["idx"], inputs["w"] = (a.detach().clone() for a in args[:3])

    h = experts.register_forward_pre_hook(grab)
    try:
        sal = measure_saliency(model, [ids])
    finally:
        h.remove()
    x, idx, w = inputs["x"].double(), inputs["idx"], inputs["w"].double()
    gate_up, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    sums = np.zeros(8)
    counts = np.zeros(8)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            g, u = (gate_up[e] @ x[t]).chunk(2)
            out = down[e] @ (torch.nn.functional.silu(g) * u)
            sums[e] += float(w[t, k]) * float(out.norm())
            counts[e] += 1
    expected = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    got = sal[1].reap
    assert got is not None
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(sal[1].frequency, counts.astype(np.int64))


def test_reap_pass_counts_neurons_once() -> None:
    # The REAP hook re-runs the experts per slot with the monitor's counting paused: the
    # neuron statistics equal those of a plain monitor over the same forward.
    from moescope import MoEMonitor

    model = build("qwen3_moe")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    sal = measure_saliency(model, [ids], neurons=True)
    mon = MoEMonitor(model, neurons=True)
    with torch.no_grad():
        model(input_ids=ids)
    snap = mon.snapshot(reset=True)
    mon.detach()
    for s in sal:
        st = snap.layers[s.layer]
        assert st.expert_rows is not None and int(st.expert_rows.sum()) == ids.numel() * 2
        np.testing.assert_array_equal(s.activated_neurons, st.expert_activated_mean)
        np.testing.assert_array_equal(s.dead_neurons, st.expert_dead_neurons)


def test_plain_tiny_moe_lm_prunes_and_runs() -> None:
    from conftest import routed_tiny_lm

    lm = routed_tiny_lm(seed=3, experts=8, top_k=2)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    sal = measure_saliency(lm, [ids])
    keep = {s.layer: keep_experts(s, 5, "saliency").tolist() for s in sal}
    pruned, summary = prune_model(lm, keep)
    assert pruned.config.num_experts == 5 and lm.config.num_experts == 8
    layer = pruned.model.layers[0].mlp
    assert layer.num_experts == 5 and layer.router.num_experts == 5
    assert summary.params_after == sum(p.numel() for p in pruned.parameters())
    assert count_parameters(pruned.config).total_params == summary.params_after
    out = pruned(ids)
    assert out.logits.shape == (2, 9, 64) and int(out.router_outputs[0].topk_index.max()) < 5


def _sal(freq: list[int], reap: list[float], groups: int = 1) -> LayerSaliency:
    f = np.asarray(freq)
    return LayerSaliency(
        layer="l",
        num_experts=len(freq),
        top_k=2,
        tokens=int(f.sum()) // 2,
        frequency=f,
        weight_mass=f * 0.5,
        reap=np.asarray(reap, dtype=np.float64),
        num_groups=groups,
    )


def test_keep_experts_orderings_and_groups() -> None:
    s = _sal([9, 0, 4, 4, 1, 7, 0, 2], [0.1, 0.0, 0.9, 0.3, 0.8, 0.2, 0.0, 0.5])
    assert keep_experts(s, 3, "saliency").tolist() == [2, 4, 7]
    assert keep_experts(s, 3, "frequency").tolist() == [0, 2, 5]  # ties: 2 and 3 by mass, id
    assert keep_experts(s, 3, "reverse").tolist() == [0, 1, 6]  # the least salient
    # Two groups of four: each group keeps its own best two.
    g = _sal([9, 0, 4, 4, 1, 7, 0, 2], [0.1, 0.0, 0.9, 0.3, 0.8, 0.2, 0.0, 0.5], groups=2)
    assert keep_experts(g, 4, "saliency").tolist() == [2, 3, 4, 7]
    with pytest.raises(ValueError, match="unequal"):
        keep_experts(g, 3, "saliency")
    np.testing.assert_array_equal(
        reap_saliency(np.array([3.0, 0.0, 1.0]), np.array([2, 0, 4])), [1.5, 0.0, 0.25]
    )


def test_keep_count_refusals() -> None:
    assert keep_count(16, 2, fraction=0.5) == 8
    assert keep_count(8, 2, fraction=0.3, num_groups=2) == 2
    with pytest.raises(ValueError, match="fewer than the 2"):
        keep_count(8, 2, keep=1)
    with pytest.raises(ValueError, match="unequal"):
        keep_count(8, 2, keep=5, num_groups=2)
    with pytest.raises(ValueError, match="not both"):
        keep_count(8, 2, keep=4, fraction=0.5)


def test_refusals_name_the_routing_contract() -> None:
    ds = build("deepseek_v3")
    with pytest.raises(PruneError, match="fewer than the 2"):
        check_prunable(ds, 1)
    with pytest.raises(PruneError, match="groups unequal"):
        check_prunable(ds, 5)
    with pytest.raises(PruneError, match="top-2 experts; keep at least 2 per group"):
        check_prunable(ds, 2)
    check_prunable(ds, 4)  # two per group: allowed
    # moescope.nn's group-limited router scores a group by min(2, size) experts, but a
    # token using one group of one expert could not fill its top-2.
    nn_group = _nn_model("group_limited")
    with pytest.raises(PruneError, match="may use 1 of 2 groups"):
        check_prunable(nn_group, 2)
    check_prunable(nn_group, 4)


def test_refuses_expert_choice_and_zero_experts() -> None:
    from moescope.nn.model import TinyMoELM

    cfg = TinyMoEConfig(
        vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=8,
        num_experts=4, top_k=2, router="expert_choice",
    )  # fmt: skip
    with pytest.raises(PruneError, match="capacity"):
        check_prunable(TinyMoELM(cfg), 2)
    mixtral = build("mixtral")
    mixtral.config.zero_expert_num = 2  # what longcat_flash's config says
    with pytest.raises(PruneError, match="identity experts"):
        check_prunable(mixtral, 4)


def test_keep_ids_are_validated() -> None:
    model = build("mixtral")
    paths = [i.path for i in moe_layers(model)]
    with pytest.raises(PruneError, match="same number"):
        prune_model(model, {paths[0]: [0, 1, 2], paths[1]: [0, 1]})
    with pytest.raises(PruneError, match="distinct"):
        prune_model(model, {p: [0, 0, 1] for p in paths})
    with pytest.raises(PruneError, match="every MoE layer"):
        prune_model(model, {paths[0]: [0, 1, 2]})


def test_structural_copy_shares_untouched_tensors() -> None:
    model = build("qwen3_moe")
    keep = {i.path: [0, 3, 5, 6] for i in moe_layers(model)}
    pruned, summary = prune_model(model, keep)
    assert pruned.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert model.config.num_experts == 8  # the original is untouched
    assert pruned.config.num_experts == 4 and summary.config_fields == ["num_experts"]
    ref = model.model.layers[0].mlp.experts.down_proj[[0, 3, 5, 6]]
    assert torch.equal(pruned.model.layers[0].mlp.experts.down_proj, ref)
    assert torch.equal(
        pruned.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight[[0, 3, 5, 6]]
    )


def test_module_list_experts_are_renumbered() -> None:
    # A ModuleDict of experts (switch_transformers' layout) keeps its chosen experts,
    # renumbered, in the same container object.
    from torch import nn

    from moescope.prune.surgery import _prune_container

    d = nn.ModuleDict({f"expert_{i}": nn.Linear(2, 2) for i in range(4)})
    d["token_dropout"] = nn.Dropout(0.1)  # nllb_moe keeps one beside its experts
    w3 = d["expert_3"].weight
    _prune_container(d, [1, 3])
    assert list(d.keys()) == ["expert_0", "expert_1", "token_dropout"]
    assert d["expert_1"].weight is w3
    lst = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
    w2 = lst[2].weight
    _prune_container(lst, [0, 2])
    assert len(lst) == 2 and lst[1].weight is w2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
