"""moescope on a Megatron-core GPT model with MoE, trained for a few steps on CPU (gloo).

Reference: Megatron's own ``tokens_per_expert``, the rows its dispatcher hands each local
expert (hooked on ``mlp.experts`` by the harness, independently of moescope). Parallel
runs start from the single-process run's weights and train on the same global batches;
every rank's snapshot must hold every layer, equal on every rank, equal to Megatron's
counter summed over ranks, and equal to the single-process run (exactly for the first
window; later windows: same totals, per-expert counts within 2, because data- and
expert-parallel gradient sums add in another order and a near-tied token may then
switch expert after an update).

What megatron-core 0.16.1 cannot run here (CPU, gloo, no TransformerEngine/Apex) is
listed in docs/megatron.md; the workarounds the harness needs are in ``_megatron_cpu``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import megatron_harness as h
import pytest
import torch

from dist_ranks import run_ranks
from moescope.capture.megatron import global_layer_path

STEPS = 3
TOKENS = 4 * h.SEQ  # global batch x sequence, per step
TOP_K = 2
LAYERS = [f"decoder.layers.{i}.mlp" for i in range(4)]


def _run(
    tmp: Path, world: int, par: dict[str, Any], over: dict[str, Any], name: str = ""
) -> list[dict[str, Any]]:
    """Run ``world`` ranks; ``name``: in their own folder under ``tmp``, from the weights
    of the single-process run in ``tmp``."""
    if name:
        (tmp / name).mkdir()
        shutil.copy(tmp / "full.pt", tmp / name / "full.pt")
        tmp = tmp / name
    run_ranks(h.worker, world, par, over, STEPS, str(tmp), timeout=180)
    return [torch.load(tmp / f"out_w{world}_r{r}.pt", weights_only=False) for r in range(world)]


_single: dict[str, tuple[Path, dict[str, Any]]] = {}


def _single_run(tmp_factory: Any, over: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The world-1 run of ``over`` (its folder holds the full weights parallel runs load)."""
    key = json.dumps(over, sort_keys=True)
    if key not in _single:
        tmp = tmp_factory.mktemp("megatron")
        _single[key] = (tmp, _run(tmp, 1, {}, over)[0])
    return _single[key]


def _megatron_counts(outs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for o in outs:
        for k, v in o["counts"].items():
            total[k] = total.get(k, 0) + v
    return total


def _monitor_total(out: dict[str, Any], layer: str) -> torch.Tensor:
    return sum(w[layer]["usage"] for w in out["windows"])  # type: ignore[return-value]


def _scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_global_layer_path() -> None:
    assert global_layer_path("decoder.layers.0.mlp", 3) == "decoder.layers.2.mlp"
    assert global_layer_path("module.module.decoder.layers.1.mlp", 7) == "decoder.layers.6.mlp"
    assert global_layer_path("0.decoder.layers.1.mlp", 5) == "decoder.layers.4.mlp"
    assert global_layer_path("mtp.layers.0.mlp", 5) == "mtp.layers.0.mlp"
    assert global_layer_path("decoder.layers.0.mlp", None) == "decoder.layers.0.mlp"


def test_single_process_counts_tensorboard_jsonl(tmp_path_factory: Any) -> None:
    tmp, out = _single_run(tmp_path_factory, {})
    ref = out["counts"]
    assert sorted(ref) == LAYERS
    for layer in LAYERS:
        assert torch.equal(_monitor_total(out, layer), ref[layer]), layer
        for w in out["windows"]:
            assert w[layer]["num_tokens"] == TOKENS
            assert int(w[layer]["usage"].sum()) == TOKENS * TOP_K
            assert w[layer]["dropped_fraction"] == 0.0
            assert w[layer]["bias"] is None  # no expert bias configured
    # TensorBoard: the writer Megatron would hand over got every window's scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp / "tb_w1"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "moe/avg_expert_cv" in tags
    assert "moe/decoder.layers.3.mlp/cv" in tags
    cv = acc.Scalars("moe/avg_expert_cv")
    assert [e.step for e in cv] == [1, 2, 3]
    assert cv[-1].value == pytest.approx(out["metrics"]["moe/avg_expert_cv"], rel=1e-6)
    # The JSONL log: one full record per window.
    lines = (tmp / "logs_w1" / "moe_detailed.jsonl").read_text().splitlines()
    assert len(lines) == STEPS
    last = json.loads(lines[-1])
    assert last["step"] == STEPS
    assert sorted(last["snapshot"]["layers"]) == LAYERS
    # an alert fires when a layer's busiest expert passes 1.2 x the mean
    fired = {a["layer"] for a in last["alerts"]}
    busy = {layer for layer, s in last["snapshot"]["layers"].items() if s["max_over_mean"] > 1.2}
    assert busy and fired == busy


LAYOUTS = [
    pytest.param(2, {"ep": 2}, {}, id="ep2-dp2-alltoall"),
    pytest.param(2, {"tp": 2}, {}, id="tp2-sp-alltoall"),
    pytest.param(2, {"pp": 2}, {}, id="pp2"),
    pytest.param(2, {"pp": 2, "vp": 2}, {}, id="pp2-vp2"),
    pytest.param(
        4, {"tp": 2, "ep": 2}, {"moe_token_dispatcher_type": "allgather"}, id="tp2-sp-ep2-allgather"
    ),
    pytest.param(4, {"pp": 2, "ep": 2}, {}, id="pp2-ep2-dp2"),
    pytest.param(4, {"tp": 2, "pp": 2}, {}, id="tp2-sp-pp2"),
]


@pytest.mark.parametrize(("world", "par", "over"), LAYOUTS)
def test_parallel_layout_equals_megatron_and_single_process(
    tmp_path_factory: Any, world: int, par: dict[str, int], over: dict[str, Any]
) -> None:
    tmp, single = _single_run(tmp_path_factory, over)
    name = "-".join(f"{k}{v}" for k, v in par.items())
    outs = _run(tmp, world, par, over, name)
    megatron = _megatron_counts(outs)
    assert sorted(megatron) == LAYERS
    for rank, out in enumerate(outs):
        for i, w in enumerate(out["windows"]):
            assert sorted(w) == LAYERS, f"rank {rank} window {i}: stages not gathered"
        for layer in LAYERS:
            mine = _monitor_total(out, layer)
            assert torch.equal(mine, megatron[layer]), (rank, layer, mine, megatron[layer])
            assert torch.equal(mine, _monitor_total(outs[0], layer))
            first, ref_first = out["windows"][0][layer], single["windows"][0][layer]
            assert torch.equal(first["usage"], ref_first["usage"]), (rank, layer)
            assert first["entropy"] == pytest.approx(ref_first["entropy"], rel=1e-4)
            assert first["aux"] == pytest.approx(ref_first["aux"], rel=1e-4)
            for w, ref in zip(out["windows"], single["windows"], strict=True):
                assert w[layer]["num_tokens"] == TOKENS
                assert int(w[layer]["usage"].sum()) == TOKENS * TOP_K
                assert (w[layer]["usage"] - ref[layer]["usage"]).abs().max() <= 2
    # The last rank (Megatron's writer rank) wrote every stage's layers to TensorBoard.
    tags = _scalar_tags(tmp / name / f"tb_w{world}")
    assert {f"moe/{layer}/cv" for layer in LAYERS} <= tags


def test_aux_loss_equals_megatron_load_balancing_loss(tmp_path_factory: Any) -> None:
    """Megatron tracks ``E * sum_e P_e * tokens_e / (K * T^2)`` per layer: moescope's
    per-layer aux loss (``E * sum_e f_e P_e``, f summing to K) divided by K."""
    over = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.01}
    _, out = _single_run(tmp_path_factory, over)
    assert len(out["megatron_aux"]) == STEPS
    for w, tracked in zip(out["windows"], out["megatron_aux"], strict=True):
        assert tracked is not None
        for i, layer in enumerate(LAYERS):
            assert w[layer]["aux"] / TOP_K == pytest.approx(float(tracked[i]), rel=1e-5)
        assert torch.equal(
            torch.stack([w[layer]["usage"] for layer in LAYERS]).sum(1),
            torch.full((len(LAYERS),), TOKENS * TOP_K),
        )


def test_padding_mask_excludes_padding(tmp_path_factory: Any) -> None:
    """``GPTModel.forward(padding_mask=...)``: padding tokens are routed and dispatched by
    Megatron but are not tokens; moescope counts the router's map on non-padding rows
    (read by a forward hook on the router module), not what the experts received."""
    tmp, _ = _single_run(tmp_path_factory, {})
    out = _run(tmp, 1, {"pad": 4}, {}, "pad4")[0]
    valid = TOKENS - 4 * 4
    for layer in LAYERS:
        assert torch.equal(_monitor_total(out, layer), out["routed"][layer]), layer
        for w in out["windows"]:
            assert w[layer]["num_tokens"] == valid
            assert int(w[layer]["usage"].sum()) == valid * TOP_K
        # the dispatcher still sent the padding tokens to the experts
        assert int(out["counts"][layer].sum()) == STEPS * TOKENS * TOP_K


def test_monitor_changes_nothing(tmp_path_factory: Any) -> None:
    """Same losses and router weights (expert bias included) with and without moescope."""
    over = {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True}
    tmp, out = _single_run(tmp_path_factory, over)
    plain = _run(tmp, 1, {"unmonitored": 1}, over, "unmonitored")[0]
    assert len(out["losses"]) == STEPS
    assert out["losses"] == plain["losses"]
    assert out["weights"].keys() == plain["weights"].keys()
    for k, v in out["weights"].items():
        assert torch.equal(v, plain["weights"][k]), k


def test_tensor_parallel_replicas_count_once(tmp_path_factory: Any) -> None:
    """TP = 2 without sequence parallelism (allowed by Megatron in eval only): both ranks
    route the same tokens; the snapshot counts them once (the data-parallel group)."""
    over: dict[str, Any] = {}
    tmp, _ = _single_run(tmp_path_factory, over)
    single = _run(tmp, 1, {"eval": 1}, over, "eval-single")[0]
    outs = _run(tmp, 2, {"tp": 2, "eval": 1}, over, "eval-tp2")
    for out in outs:
        for w, ref in zip(out["windows"], single["windows"], strict=True):
            for layer in LAYERS:
                assert w[layer]["num_tokens"] == TOKENS
                assert torch.equal(w[layer]["usage"], ref[layer]["usage"]), layer
    # Megatron's dispatcher gathers the (identical) tokens of both TP ranks, so its
    # experts get every routed row twice here; the routing decisions are counted once.
    for layer in LAYERS:
        assert torch.equal(outs[0]["counts"][layer], 2 * single["counts"][layer]), layer


def test_capacity_dropping(tmp_path_factory: Any) -> None:
    over = {"moe_expert_capacity_factor": 0.5}
    _, out = _single_run(tmp_path_factory, over)
    _, free = _single_run(tmp_path_factory, {})  # same weights, no capacity limit
    capacity = -(-TOKENS * TOP_K * 0.5 // h.EXPERTS)  # Megatron's get_capacity (ceil)
    for layer in LAYERS:
        # what the experts really received after dropping, per Megatron's own counter
        assert torch.equal(_monitor_total(out, layer), out["counts"][layer]), layer
        for w in out["windows"]:
            s = w[layer]
            assert int(s["usage"].max()) <= capacity
            dropped = int(s["dropped_counts"].sum())
            assert dropped > 0
            assert int(s["usage"].sum()) + dropped == TOKENS * TOP_K
            assert s["dropped_fraction"] == pytest.approx(dropped / (TOKENS * TOP_K))
    # The first MoE layer's input does not depend on any drop: before any update its
    # router chose as the unlimited run's did, so kept + dropped per expert (the dropped
    # slots keep the expert the router picked) is that run's selection.
    first = out["windows"][0][LAYERS[0]]
    chosen = free["windows"][0][LAYERS[0]]["usage"]
    assert torch.equal(first["usage"] + first["dropped_counts"], chosen)


def test_sigmoid_expert_bias_group_limited_shared_experts(tmp_path_factory: Any) -> None:
    over = {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_bias_update_rate": 0.01,
        "moe_router_num_groups": 4,
        "moe_router_group_topk": 1,
        "moe_router_topk_scaling_factor": 2.5,
        "moe_shared_expert_intermediate_size": 32,
    }
    _, out = _single_run(tmp_path_factory, over)
    groups = torch.arange(h.EXPERTS) // (h.EXPERTS // 4)
    other_group = groups[:, None] != groups[None, :]
    for layer in LAYERS:
        assert torch.equal(_monitor_total(out, layer), out["counts"][layer]), layer
        last = out["windows"][-1][layer]
        # routed experts only: the shared expert is not one of them
        assert last["usage"].shape == (h.EXPERTS,)
        assert int(last["usage"].sum()) == TOKENS * TOP_K
        # group-limited (one group per token): both slots of a token in the same group
        co = last["coactivation"]
        assert co is not None and int(co[other_group].sum()) == 0
        assert 0.0 < last["entropy"] < float(torch.log(torch.tensor(float(h.EXPERTS))))
        # the snapshot's expert bias is the router's live buffer, updated by Megatron
        live = out["live_bias"][layer]
        assert live is not None and bool(live.abs().sum() > 0)
        assert last["bias"] is not None
        assert torch.allclose(last["bias"].float(), live)
