"""Neuron capture on real models (MoEMonitor(neurons=True)) against float64 recomputes.

Each test takes the tokens routed to each expert from the model's own routing (a test
hook on the experts module / router, independent of moescope), recomputes
h = act(gate(x)) * up(x) (or act(W1 x)) in float64 from the expert weights with the
family's activation, counts the activated neurons, and compares with the monitor's
snapshot. Counts may differ only for neurons whose |h| lies within float32 rounding of
tau ("ambiguous"); typically there is none and the match is exact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from moescope import MoEMonitor
from moescope.nn import GroupedExperts, MoELayer, TopKRouter
from moescope.stats.neurons import NeuronOptions, NeuronThreshold

transformers = pytest.importorskip("transformers")

from hf_tiny import build_tiny, experts_modules, padded_batch  # noqa: E402

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe"]
_AMBIG = 1e-5  # relative band around tau where float32 and float64 may disagree


# ----------------------------------------------------------------------------- references


def _h64_fused(experts: nn.Module, x: torch.Tensor, e: int, family: str) -> torch.Tensor:
    """h of expert e for rows x [n, H], float64, written from the weights."""
    x = x.double()
    w = experts.gate_up_proj[e].detach().double()
    if family == "gpt_oss":
        # GptOssExperts: transposed [H, 2I] weights + bias, gate/up interleaved
        # (even/odd columns), clamped, gate * sigmoid(alpha gate) * (up + 1).
        gu = x @ w + experts.gate_up_proj_bias[e].detach().double()
        gate, up = gu[:, ::2], gu[:, 1::2]
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))
    gu = x @ w.t()  # [n, 2I]: gate rows first, then up rows
    i = gu.shape[1] // 2
    return torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]


def _reference(
    rows: list[tuple[int, torch.Tensor]], e: int, i: int, tau: float, bins: int = 32
) -> dict[str, np.ndarray]:
    """Window sums from float64 rows [(expert, h64 [n, I])] + the ambiguous neurons."""
    out = {
        "rows": np.zeros(e, np.int64), "s1": np.zeros(e, np.int64), "s2": np.zeros(e, np.int64),
        "hist": np.zeros(min(bins, i + 1), np.int64), "fire": np.zeros((e, i), np.int64),
        "ambig": np.zeros((e, i), np.int64),
    }  # fmt: skip
    nb = out["hist"].shape[0]
    for ex, h in rows:
        a = h.abs().numpy()
        act = a > tau
        cnt = act.sum(axis=1)
        out["rows"][ex] += a.shape[0]
        out["s1"][ex] += cnt.sum()
        out["s2"][ex] += (cnt * cnt).sum()
        np.add.at(out["hist"], np.minimum(cnt * nb // (i + 1), nb - 1), 1)
        out["fire"][ex] += act.sum(axis=0)
        out["ambig"][ex] += (np.abs(a - tau) <= _AMBIG * tau).sum(axis=0)
    return out


def _check_layer(st: Any, ref: dict[str, np.ndarray]) -> None:
    ambig_e = ref["ambig"].sum(axis=1)
    assert np.array_equal(st.expert_rows, ref["rows"])
    assert st.neuron_rows == ref["rows"].sum() > 0
    assert np.all(np.abs(st.firing_counts - ref["fire"]) <= ref["ambig"])
    s1 = st.expert_activated_mean * ref["rows"]
    ok = ref["rows"] > 0
    assert np.all(np.abs(np.round(s1[ok]) - ref["s1"][ok]) <= ambig_e[ok])
    if ref["ambig"].sum() == 0:
        assert np.array_equal(st.activated_hist, ref["hist"])
        mean = ref["s1"].sum() / ref["rows"].sum()
        std = math.sqrt(ref["s2"].sum() / ref["rows"].sum() - mean**2)
        assert math.isclose(st.activated_neurons_mean, mean, rel_tol=1e-12)
        assert math.isclose(st.activated_neurons_std, std, rel_tol=1e-9, abs_tol=1e-12)
        i = st.intermediate_size
        assert math.isclose(st.neuron_sparsity, 1 - mean / i, rel_tol=1e-12)
        dead = np.where(ref["rows"] > 0, (ref["fire"] == 0).sum(axis=1), np.nan)
        assert np.array_equal(st.expert_dead_neurons, dead, equal_nan=True)


def _collect_inputs(model: nn.Module) -> tuple[dict[str, list], Callable[[], None]]:
    """Test hooks recording (hidden [T, H], top_k_index [T, K]) of every experts call."""
    seen: dict[str, list] = {}
    handles = []
    for path, ex in experts_modules(model).items():

        def pre(mod: nn.Module, args: tuple, path: str = path) -> None:
            seen.setdefault(path, []).append((args[0].detach().clone(), args[1].clone()))

        handles.append(ex.register_forward_pre_hook(pre))
    return seen, lambda: [h.remove() for h in handles]


def _fused_rows(
    model: nn.Module, family: str, seen: dict[str, list], mask: torch.Tensor
) -> dict[str, list[tuple[int, torch.Tensor]]]:
    valid = mask.reshape(-1).bool()
    exps = experts_modules(model)
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for path, calls in seen.items():
        rows = out.setdefault(path, [])
        for x, idx in calls:
            ne = exps[path].gate_up_proj.shape[0]
            for e in range(ne):
                tok, _slot = torch.nonzero(idx == e, as_tuple=True)
                tok = tok[valid[tok]]
                if tok.numel():
                    rows.append((e, _h64_fused(exps[path], x[tok], e, family)))
    return out


def _model(family: str) -> nn.Module:
    model, _ = build_tiny(family)
    if family == "gpt_oss":
        # Large gate/up pre-activations so the clamp at `limit` really bites.
        with torch.no_grad():
            for ex in experts_modules(model).values():
                ex.gate_up_proj.mul_(60.0)
    return model


# ----------------------------------------------------------------------------- fused HF


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_counts_match_float64_recompute(family: str) -> None:
    model = _model(family)
    ids, mask = padded_batch(batch=3, seq=9, seed=2)
    seen, remove = _collect_inputs(model)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    remove()
    rows = _fused_rows(model, family, seen, mask)
    if family == "gpt_oss":
        # The clamp is exercised: some gate pre-activations exceed `limit`.
        exps = experts_modules(model)
        assert any(
            bool(
                (
                    (x.double() @ exps[p].gate_up_proj[0].detach().double())[:, ::2] > exps[p].limit
                ).any()
            )
            for p in seen
            for x, _ in seen[p]
        )
    all_h = torch.cat([h.abs().reshape(-1) for r in rows.values() for _, h in r])
    tau = float(all_h.median())
    mon = MoEMonitor(model, neurons=NeuronOptions(threshold=tau))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits, ref_logits)  # grouped_mm (default): bit-identical
    snap = mon.snapshot()
    mon.detach()
    i = next(iter(experts_modules(model).values())).down_proj.shape[
        -1 if family != "gpt_oss" else 1
    ]
    for path, r in rows.items():
        st = snap.layers[path]
        assert st.intermediate_size == i
        _check_layer(st, _reference(r, st.num_experts, i, tau))
        assert st.neuron_rows == st.usage_counts.sum()  # padding excluded, like routing
    # Median tau: about half of all (valid) activations are above it.
    assert 0.3 < snap.avg_neuron_sparsity < 0.7
    assert snap.to_dict()[f"moe/{path}/neuron_sparsity"] == st.neuron_sparsity


def test_relative_and_magnitude_thresholds_in_a_model() -> None:
    model = _model("mixtral")
    ids, mask = padded_batch(batch=2, seq=8, seed=4)
    seen, remove = _collect_inputs(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    remove()
    rows = _fused_rows(model, "mixtral", seen, mask)
    from moescope.stats.neurons import activated_mask

    for thr in (NeuronThreshold.relative(0.8), NeuronThreshold.magnitude(0.3)):
        mon = MoEMonitor(model, neurons=NeuronOptions(threshold=thr))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        snap = mon.snapshot()
        mon.detach()
        for path, r in rows.items():
            # float64 decisions of the same rule on the float64 rows.
            fire = np.zeros_like(snap.layers[path].firing_counts)
            for e, h in r:
                fire[e] += activated_mask(h, thr.mode, thr.value).numpy().sum(axis=0)
            diff = np.abs(snap.layers[path].firing_counts - fire).sum()
            assert diff <= 2, (thr, path, diff)  # float32 vs float64 ties only


def test_train_step_outputs_grads_rng_identical_and_counted_once() -> None:
    def step(neurons: bool, checkpoint: bool) -> tuple:
        model, _ = build_tiny("mixtral")
        model.train()
        if checkpoint:
            model.activation_checkpointing_enable({"use_reentrant": False})
        ids, mask = padded_batch(batch=2, seq=6, seed=5)
        labels = ids.masked_fill(mask == 0, -100)
        mon = MoEMonitor(model, neurons=True) if neurons else None
        calls = []
        experts_modules(model)["model.layers.0.mlp"].register_forward_pre_hook(
            lambda m, a: calls.append(1)
        )
        torch.manual_seed(0)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert len(calls) == (2 if checkpoint else 1)  # the recomputation really ran
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        snap = mon.snapshot() if mon is not None else None
        return out.logits.detach(), grads, torch.get_rng_state(), snap

    l0, g0, r0, _ = step(False, False)
    l1, g1, r1, snap = step(True, False)
    assert torch.equal(l0, l1) and torch.equal(r0, r1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, _, _, snap_ckpt = step(True, True)
    for path, st in snap.layers.items():
        # Recomputation during backward is not counted a second time.
        assert st.neuron_rows == snap_ckpt.layers[path].neuron_rows == st.usage_counts.sum()
        assert np.array_equal(st.firing_counts, snap_ckpt.layers[path].firing_counts)


def test_eager_backend_is_switched_once_and_restored() -> None:
    model, _ = build_tiny("qwen3_moe")
    ids, mask = padded_batch(batch=3, seq=9, seed=1)
    mon = MoEMonitor(model, neurons=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    snap_grouped = mon.snapshot(reset=True)
    mon.detach()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    mon.attach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
            model(input_ids=ids, attention_mask=mask)
    msgs = [str(w.message) for w in caught if "grouped_mm" in str(w.message)]
    assert len(msgs) == 1 and "eager" in msgs[0]
    assert model.config._experts_implementation == "eager"  # restored after each call
    assert (out - ref).abs().max() < 1e-5
    snap = mon.snapshot()
    for path, st in snap.layers.items():
        g = snap_grouped.layers[path]
        assert st.neuron_rows == 2 * g.neuron_rows
        assert np.array_equal(st.firing_counts, 2 * g.firing_counts)
    mon.detach()
    after = {n: dict(m.__dict__) for n, m in model.named_modules()}
    assert all("_apply_gate" not in d for d in after.values())
    assert after.keys() == before.keys()
    for n in before:
        assert {k for k in after[n] if not k.startswith("_forward")} == {
            k for k in before[n] if not k.startswith("_forward")
        }
        for hk in ("_forward_hooks", "_forward_pre_hooks"):
            assert len(after[n][hk]) == len(before[n][hk]), n


def test_calibration_flow_hits_target_sparsity() -> None:
    model, _ = build_tiny("mixtral")
    ids, mask = padded_batch(batch=4, seq=12, seed=3)
    mon = MoEMonitor(model, neurons=True)
    with pytest.raises(RuntimeError, match="calibration"):
        mon.calibrate_neurons(0.5)
    with mon.calibration(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    # Calibration forwards are not counted.
    assert all(st.num_tokens == 0 and st.neuron_rows == 0 for st in mon.snapshot().layers.values())
    thr = mon.set_neuron_threshold(calibrated=0.6)
    assert thr.mode == "calibrated" and set(thr.taus) == set(mon._taps)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    snap = mon.snapshot()
    for st in snap.layers.values():
        assert abs(st.neuron_sparsity - 0.6) < 0.01
        assert st.neuron_threshold.startswith("calibrated(target_sparsity=0.6")


# ----------------------------------------------------------------------------- switch


def _switch_model() -> nn.Module:
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=2, num_experts=4, expert_capacity=3, encoder_sparse_step=1,
        decoder_sparse_step=1, relative_attention_num_buckets=8, pad_token_id=0,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.SwitchTransformersForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("tau", [1e-6, 0.05])
def test_switch_transformers_counts_match_float64_recompute(tau: float) -> None:
    model = _switch_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (3, 9), generator=g)
    am = torch.ones(3, 9, dtype=torch.long)
    am[1, 6:] = 0
    am[2, 3:] = 0
    dec = torch.randint(3, 64, (3, 5), generator=g)
    dam = torch.ones(3, 5, dtype=torch.long)
    dam[2, 2:] = 0
    inputs = dict(
        input_ids=ids, attention_mask=am, decoder_input_ids=dec, decoder_attention_mask=dam
    )
    blocks = {
        n: m for n, m in model.named_modules() if type(m).__name__ == "SwitchTransformersSparseMLP"
    }
    seen: dict[str, Any] = {}
    handles = []
    for path, blk in blocks.items():
        handles.append(
            blk.register_forward_pre_hook(
                lambda m, a, p=path: seen.setdefault(p, {}).update(x=a[0].detach().clone())
            )
        )
        handles.append(
            blk.router.register_forward_hook(
                lambda m, a, o, p=path: seen.setdefault(p, {}).update(mask=o[0].detach().clone())
            )
        )
    with torch.no_grad():
        ref_out = model(**inputs).logits
    for h in handles:
        h.remove()
    mon = MoEMonitor(model, neurons=NeuronOptions(threshold=tau))
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref_out)
    snap = mon.snapshot()
    mon.detach()
    dropped_somewhere = False
    for path, blk in blocks.items():
        x = seen[path]["x"].reshape(-1, 32).double()
        disp = seen[path]["mask"].reshape(-1, 4)  # one-hot, zero rows = over capacity
        valid = (dam if ".decoder." in f".{path}." else am).reshape(-1).bool()
        dropped_somewhere |= bool((disp.sum(-1) == 0).any())
        rows = []
        for e in range(4):
            tok = torch.nonzero((disp[:, e] != 0) & valid).reshape(-1)
            if tok.numel():
                wi = blk.experts[f"expert_{e}"].wi.weight.detach().double()
                rows.append((e, torch.relu(x[tok] @ wi.t())))
        st = snap.layers[path]
        assert st.intermediate_size == 48
        _check_layer(st, _reference(rows, 4, 48, tau))
    assert dropped_somewhere  # capacity drops happened and were not counted


# ----------------------------------------------------------------------------- moescope.nn


def test_moescope_nn_layer_counts_match_float64_recompute() -> None:
    torch.manual_seed(0)
    e, h_, i, k = 6, 16, 24, 2
    layer = MoELayer(TopKRouter(h_, e, k), GroupedExperts(e, h_, i))
    model = nn.Sequential(layer)
    x = torch.randn(3, 10, h_)
    tmask = torch.ones(3, 10, dtype=torch.bool)
    tmask[1, 7:] = False
    tmask[2, 2:] = False
    seen: dict[str, torch.Tensor] = {}
    layer.experts.register_forward_pre_hook(
        lambda m, a: seen.update(x=a[0].detach().clone(), idx=a[1].clone())
    )
    mon = MoEMonitor(model, neurons=NeuronOptions(threshold=0.1))
    with torch.no_grad():
        out = layer(x, token_mask=tmask)
    snap = mon.snapshot()
    mon.detach()
    assert layer.experts.neuron_observer is None
    with torch.no_grad():
        assert torch.equal(layer(x, token_mask=tmask), out)
    valid = tmask.reshape(-1)
    w = layer.experts.gate_up_proj.detach().double()
    rows = []
    for ex in range(e):
        tok, _ = torch.nonzero(seen["idx"] == ex, as_tuple=True)
        tok = tok[valid[tok]]
        if tok.numel():
            gu = seen["x"][tok].double() @ w[ex].t()
            rows.append((ex, torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]))
    st = next(iter(snap.layers.values()))
    _check_layer(st, _reference(rows, e, i, 0.1))
    assert st.neuron_rows == 2 * int(valid.sum())


# ----------------------------------------------------------------------------- nllb, dbrx


def test_nllb_moe_counts_match_the_models_dispatch() -> None:
    cfg = transformers.NllbMoeConfig(
        vocab_size=64, d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4,
        encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=64,
        moe_token_dropout=0.0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.NllbMoeForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, 4:] = 0
    dec = torch.randint(3, 64, (2, 5), generator=g)
    inputs = dict(input_ids=ids, attention_mask=am, decoder_input_ids=dec)
    experts = {n: m for n, m in model.named_modules() if type(m).__name__ == "NllbMoeExperts"}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, ex in experts.items():
        ex.register_forward_pre_hook(
            lambda m, a, p=path: seen.update({p: (a[0].detach().clone(), a[1].clone())})
        )
    mon = MoEMonitor(model, neurons=NeuronOptions(threshold=1e-6))
    with torch.no_grad():
        model(**inputs)
    snap = mon.snapshot()
    mon.detach()
    for path, ex in experts.items():
        x, router_mask = seen[path]
        t = x.shape[0]
        # Decoder tokens count without a decoder mask; encoder tokens use attention_mask.
        valid = am.reshape(-1).bool() if ".encoder." in path else torch.ones(t, dtype=torch.bool)
        rows = []
        for v in range(4):
            # NllbMoeExperts (5.23) dispatches to expert_v the (column, token) pairs whose
            # mask value is v, column-major: torch.where(one_hot(mask)[..., v].T).
            _col, tok = torch.nonzero((router_mask == v).t(), as_tuple=True)
            tok = tok[valid[tok]]
            if tok.numel():
                fc1 = ex[f"expert_{v}"].fc1
                pre = (
                    x[tok].double() @ fc1.weight.detach().double().t() + fc1.bias.detach().double()
                )
                rows.append((v, torch.relu(pre)))
        st = snap.layers[path.rsplit(".experts", 1)[0]]
        _check_layer(st, _reference(rows, 4, 48, 1e-6))


def test_layers_without_visible_activations_are_reported() -> None:
    cfg = transformers.DbrxConfig(
        vocab_size=64, d_model=32, n_heads=2, n_layers=2, max_seq_len=64,
        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
    )  # fmt: skip
    model = transformers.DbrxForCausalLM(cfg).eval()
    from moescope import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="neurons=False"):
        MoEMonitor(model, neurons=True)
    mon = MoEMonitor(model)  # routing alone still works
    assert all(st.neuron_rows is None for st in mon.snapshot().layers.values())
    with pytest.raises(RuntimeError, match="neurons=True"):
        with mon.calibration():
            pass


# ----------------------------------------------------------------------------- distributed


def _tiny_lm() -> nn.Module:
    from moescope.nn.model import TinyMoEConfig, TinyMoELM

    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=32, num_experts=8, top_k=2)  # fmt: skip
    return TinyMoELM(cfg).eval()


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = padded_batch(batch=2 + rank, seq=6 - rank, seed=100 + rank)
    return ids % 64, mask


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        model = _tiny_lm()
        mon = MoEMonitor(model, neurons=True)
        ids, mask = _rank_batch(rank)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        snap = mon.snapshot(step=1)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            f.write(snap.to_json(firing=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_gloo_neuron_snapshot_equals_single_process() -> None:
    import os
    import tempfile

    import torch.multiprocessing as mp

    from moescope.stats.snapshot import Snapshot

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        with open(os.path.join(tmp, "rank0.json")) as f:
            dist_snap = Snapshot.from_json(f.read())
    torch.set_num_threads(1)
    model = _tiny_lm()
    mon = MoEMonitor(model, neurons=True)
    for rank in range(2):
        ids, mask = _rank_batch(rank)
        with torch.no_grad():
            model(ids, attention_mask=mask)
    ref = mon.snapshot(step=1)
    for path, st in ref.layers.items():
        d = dist_snap.layers[path]
        assert d.neuron_rows == st.neuron_rows > 0
        assert np.array_equal(d.firing_counts, st.firing_counts)
        assert np.array_equal(d.activated_hist, st.activated_hist)
        assert np.array_equal(d.expert_rows, st.expert_rows)
        assert d.activated_neurons_mean == st.activated_neurons_mean
