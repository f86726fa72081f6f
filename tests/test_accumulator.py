"""LayerAccumulator + layer_stats_from_state against an independent float64 reference.

The reference below walks records token by token in plain Python (math module, no
moescope function) and computes every metric of DESIGN.md from its definition.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moescope.capture.record import RoutingRecord
from moescope.stats import (
    REDUCE_OPS,
    LayerAccumulator,
    layer_stats_from_state,
    merge_states,
    states_to_numpy,
)

# --------------------------------------------------------------------------- records


def make_record(
    seed: int,
    t: int = 48,
    e: int = 8,
    k: int = 2,
    score_fn: str = "softmax",
    mask: bool = True,
    dropped: bool = True,
    extra: bool = True,
    nan_rows: bool = True,
    weights: bool = True,
    logits: bool = True,
) -> RoutingRecord:
    """A random routing record with every complication switched on by default."""
    gen = torch.Generator().manual_seed(seed)
    lg = torch.randn(t, e, generator=gen) * 2
    idx = torch.topk(lg, k, dim=-1).indices
    if extra:  # ~10 % of slots go to identity/zero experts E, E+1 (longcat_flash style)
        sel = torch.rand(t, k, generator=gen) < 0.1
        idx = torch.where(sel, e + torch.randint(0, 2, (t, k), generator=gen), idx)
    w = torch.softmax(torch.gather(lg, 1, idx.clamp_max(e - 1)), -1) if weights else None
    if nan_rows:
        lg[3] = float("nan")
        lg[t - 5, 1] = float("inf")
        if w is not None:
            w[3] = float("nan")
    if score_fn == "probs":
        lg = torch.softmax(lg, -1)
    return RoutingRecord(
        layer="model.layers.0.mlp",
        num_experts=e,
        topk_index=idx,
        logits=lg if logits else None,
        score_fn=score_fn,  # type: ignore[arg-type]
        topk_weight=w,
        token_mask=(torch.rand(t, generator=gen) > 0.25) if mask else None,
        dropped=(torch.rand(t, k, generator=gen) < 0.15) if dropped else None,
    )


# ------------------------------------------------------------------------- reference


@dataclass
class Ref:
    e: int
    k: int
    counts: list[int] = field(default_factory=list)
    dropped_counts: list[int] = field(default_factory=list)
    aux_counts: list[int] = field(default_factory=list)
    prob_sum: list[float] = field(default_factory=list)
    weight_sums: list[float] = field(default_factory=list)
    coact: list[list[int]] = field(default_factory=list)
    n_tokens: int = 0
    n_slots: int = 0
    n_dropped: int = 0
    extra: int = 0
    nonfinite: int = 0
    n_logit: int = 0
    n_z: int = 0
    entropy: float = 0.0
    z: float = 0.0
    top1: float = 0.0
    margin: float = 0.0
    uniques: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        e = self.e
        self.counts, self.dropped_counts, self.aux_counts = [0] * e, [0] * e, [0] * e
        self.prob_sum, self.weight_sums = [0.0] * e, [0.0] * e
        self.coact = [[0] * e for _ in range(e)]


def _finite(row: list[float]) -> bool:
    return all(math.isfinite(x) for x in row)


def ref_add(ref: Ref, rec: RoutingRecord) -> None:
    e = ref.e
    idx = rec.topk_index.tolist()
    lg = rec.logits.double().tolist() if rec.logits is not None else None
    w = rec.topk_weight.double().tolist() if rec.topk_weight is not None else None
    mask = rec.token_mask.tolist() if rec.token_mask is not None else None
    drop = rec.dropped.tolist() if rec.dropped is not None else None
    touched: set[int] = set()
    for i, row in enumerate(idx):
        if mask is not None and not mask[i]:
            continue
        if (lg is not None and not _finite(lg[i])) or (w is not None and not _finite(w[i])):
            ref.nonfinite += 1
            continue
        ref.n_tokens += 1
        ref.n_slots += len(row)
        chosen: set[int] = set()
        for j, x in enumerate(row):
            if drop is not None and drop[i][j]:
                ref.n_dropped += 1
                if x < e:
                    ref.dropped_counts[x] += 1
                continue
            if x < e:
                ref.counts[x] += 1
                chosen.add(x)
                if w is not None:
                    ref.weight_sums[x] += w[i][j]
            else:
                ref.extra += 1
        touched |= chosen
        for a in chosen:
            for b in chosen:
                ref.coact[a][b] += 1
        if lg is not None:
            r = lg[i]
            if rec.score_fn == "softmax":
                m = max(r)
                ex = [math.exp(v - m) for v in r]
                p = [v / sum(ex) for v in ex]
            elif rec.score_fn == "sigmoid":
                sg = [1 / (1 + math.exp(-v)) for v in r]
                p = [v / sum(sg) for v in sg]
            else:
                p = list(r)
            ref.n_logit += 1
            ref.entropy += -sum(v * math.log(v) for v in p if v > 0)
            srt = sorted(p, reverse=True)
            ref.top1 += srt[0]
            ref.margin += srt[0] - srt[1]
            for x in range(e):
                ref.prob_sum[x] += p[x]
            for x in row:  # aux loss counts every chosen slot, dropped or not
                if x < e:
                    ref.aux_counts[x] += 1
            if rec.score_fn != "probs":
                m = max(r)
                ref.z += (m + math.log(sum(math.exp(v - m) for v in r))) ** 2
                ref.n_z += 1
    ref.uniques.append(len(touched))


def ref_metrics(ref: Ref) -> dict[str, float]:
    e, c = ref.e, ref.counts
    tot = sum(c)
    mean = tot / e
    frac = [x / tot for x in c]
    n = ref.n_logit
    return {
        "cv": statistics.pstdev(c) / mean,
        "max_over_mean": max(c) / mean,
        "unused_experts": sum(1 for x in c if x == 0),
        "active_experts": sum(1 for x in c if x > 0),
        "utilization_rate": sum(1 for x in c if x > 0) / e,
        "routing_entropy": ref.entropy / n,
        "routing_entropy_norm": ref.entropy / n / math.log(e),
        "load_entropy_norm": -sum(f * math.log(f) for f in frac if f > 0) / math.log(e),
        "aux_loss": e * sum((ref.aux_counts[x] / n) * (ref.prob_sum[x] / n) for x in range(e)),
        "z_loss": ref.z / ref.n_z if ref.n_z else math.nan,
        "top1_prob": ref.top1 / n,
        "top1_margin": ref.margin / n,
        "dropped_fraction": ref.n_dropped / ref.n_slots,
        "unique_experts_per_batch": sum(ref.uniques) / len(ref.uniques),
        "unique_experts_max": max(ref.uniques),
        "num_tokens": ref.n_tokens,
        "nonfinite_tokens": ref.nonfinite,
        "extra_slots": ref.extra,
    }


def run_acc(records: list[RoutingRecord], e: int, k: int) -> LayerAccumulator:
    acc = LayerAccumulator(e, k)
    for r in records:
        acc.update(r)
    return acc


def stats_of(acc: LayerAccumulator):
    st = states_to_numpy({"l": acc.state()})["l"]
    return layer_stats_from_state(st, acc.num_experts, acc.top_k)


# ----------------------------------------------------------------------------- tests


CASES = [
    dict(score_fn="softmax"),
    dict(score_fn="sigmoid"),
    dict(score_fn="probs"),
    dict(score_fn="softmax", k=1, e=5),
    dict(score_fn="sigmoid", k=4, e=16, t=64),
    dict(score_fn="softmax", mask=False, dropped=False, extra=False, nan_rows=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_metric_matches_float64_reference(case: dict) -> None:
    e, k = case.get("e", 8), case.get("k", 2)
    records = [make_record(seed, **case) for seed in (10, 11, 12)]
    acc = run_acc(records, e, k)
    ref = Ref(e, k)
    for r in records:
        ref_add(ref, r)
    s = stats_of(acc)

    assert s.usage_counts.tolist() == ref.counts
    assert s.dropped_counts is not None and s.dropped_counts.tolist() == ref.dropped_counts
    assert s.coactivation is not None and s.coactivation.tolist() == ref.coact
    np.testing.assert_allclose(
        s.usage_fraction, [x / sum(ref.counts) for x in ref.counts], rtol=1e-12
    )
    np.testing.assert_allclose(s.weight_sums, ref.weight_sums, rtol=1e-5, atol=1e-6)
    assert s.num_slots == ref.n_slots
    assert s.num_updates == 3
    for name, want in ref_metrics(ref).items():
        got = getattr(s, name)
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), name
        else:
            assert got == pytest.approx(want, rel=2e-6, abs=1e-6), name
    # The cases really exercise what they claim to.
    if case.get("nan_rows", True):
        assert ref.nonfinite > 0
    if case.get("extra", True):
        assert ref.extra > 0
    if case.get("dropped", True):
        assert ref.n_dropped > 0


def test_records_without_logits_or_weights_give_nan_for_those_metrics() -> None:
    rec = make_record(3, logits=False, weights=False, nan_rows=False)
    s = stats_of(run_acc([rec], 8, 2))
    ref = Ref(8, 2)
    ref_add(ref, rec)
    assert s.usage_counts.tolist() == ref.counts
    for name in ("routing_entropy", "aux_loss", "z_loss", "top1_prob", "top1_margin"):
        assert math.isnan(getattr(s, name)), name
    assert np.isnan(s.weight_sums).all()
    assert s.cv == pytest.approx(statistics.pstdev(ref.counts) / (sum(ref.counts) / 8), rel=1e-12)


def test_low_precision_logits_and_int32_ids() -> None:
    rec = make_record(4, nan_rows=False)
    ref = Ref(8, 2)
    ref_add(ref, rec)
    rec.logits = rec.logits.to(torch.bfloat16)  # type: ignore[union-attr]
    rec.topk_index = rec.topk_index.to(torch.int32)
    s = stats_of(run_acc([rec], 8, 2))
    assert s.usage_counts.tolist() == ref.counts
    assert s.routing_entropy == pytest.approx(ref_metrics(ref)["routing_entropy"], rel=2e-2)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_equals_transformers_load_balancing_loss(k: int, masked: bool) -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    gen = torch.Generator().manual_seed(20 + k)
    b, s_len, e = 4, 13, 8
    logits = torch.randn(b * s_len, e, generator=gen) * 1.5
    attn = torch.ones(b, s_len, dtype=torch.long)
    if masked:
        attn[0, :5] = 0  # left padding
        attn[3, 9:] = 0  # right padding
    idx = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices
    want = mixtral.load_balancing_loss_func((logits,), e, k, attn if masked else None)
    acc = LayerAccumulator(e, k)
    acc.update(
        RoutingRecord(
            layer="l",
            num_experts=e,
            topk_index=idx,
            logits=logits,
            token_mask=attn.reshape(-1).bool() if masked else None,
        )
    )
    assert stats_of(acc).aux_loss == pytest.approx(float(want), abs=1e-6)


def test_two_updates_equal_one_update_over_concatenation() -> None:
    r1, r2 = make_record(30, t=40), make_record(31, t=24)
    cat = RoutingRecord(
        layer="l",
        num_experts=8,
        topk_index=torch.cat([r1.topk_index, r2.topk_index]),
        logits=torch.cat([r1.logits, r2.logits]),  # type: ignore[list-item]
        topk_weight=torch.cat([r1.topk_weight, r2.topk_weight]),  # type: ignore[list-item]
        token_mask=torch.cat([r1.token_mask, r2.token_mask]),  # type: ignore[list-item]
        dropped=torch.cat([r1.dropped, r2.dropped]),  # type: ignore[list-item]
    )
    two = run_acc([r1, r2], 8, 2).state()
    one = run_acc([cat], 8, 2).state()
    per_update = {"n_updates", "unique_sum", "unique_max"}
    assert set(two) == set(one) == set(REDUCE_OPS)
    for key in set(two) - per_update:
        if two[key].dtype.is_floating_point:
            # Each call reduces its tokens in float32 before the float64 window sum.
            torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(two[key], one[key]), key
    assert int(two["n_updates"]) == 2 and int(one["n_updates"]) == 1
    # merge_states of two single-update accumulators equals the two-update one.
    merged = merge_states(run_acc([r1], 8, 2).state(), run_acc([r2], 8, 2).state())
    for key in two:
        torch.testing.assert_close(merged[key], two[key], rtol=1e-12, atol=0)
    assert int(merged["unique_max"]) == max(
        int(run_acc([r], 8, 2).state()["unique_max"]) for r in (r1, r2)
    )


def test_reset_zeroes_every_sum_and_keeps_working() -> None:
    acc = run_acc([make_record(40), make_record(41)], 8, 2)
    assert int(acc.state()["n_tokens"]) > 0
    acc.reset()
    for key, v in acc.state().items():
        assert not v.any(), key
    rec = make_record(42)
    acc.update(rec)
    fresh = run_acc([rec], 8, 2).state()
    for key, v in acc.state().items():
        assert torch.equal(v, fresh[key]), key


def test_state_is_a_copy() -> None:
    acc = run_acc([make_record(43)], 8, 2)
    st = acc.state()
    st["counts"].mul_(0)
    assert acc.state()["counts"].sum() > 0


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


# Ops that copy device data to the host or produce data-dependent shapes (which sync).
_SYNCING_OPS = {
    "_local_scalar_dense",  # .item(), .tolist(), bool(tensor), int(tensor)
    "nonzero",  # boolean-mask indexing, torch.where(cond)
    "masked_select",
    "bincount",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "equal",
    "is_nonzero",
    "repeat_interleave",
}


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "probs"])
def test_update_performs_no_host_sync(score_fn: str) -> None:
    acc = LayerAccumulator(8, 2)
    rec = make_record(50, score_fn=score_fn)
    with _OpRecorder() as rec_ops:
        acc.update(rec)
    assert len(rec_ops.ops) > 10  # the recorder really saw the update's ops
    assert "index_add_" in rec_ops.ops  # counting is done on device by a scatter
    bad = sorted(set(rec_ops.ops) & _SYNCING_OPS)
    assert not bad, f"update() uses host-syncing ops: {bad}"


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "probs"])
def test_update_runs_on_meta_device(score_fn: str) -> None:
    # Meta tensors have shapes but no data: any host read (.item(), .tolist(), .cpu())
    # or data-dependent shape (boolean-mask indexing, nonzero) raises. An update that
    # completes here therefore cannot sync, on any accelerator.
    rec = make_record(51, score_fn=score_fn)
    fields = ("topk_index", "logits", "topk_weight", "token_mask", "dropped")
    meta = dataclasses.replace(rec, **{f: getattr(rec, f).to("meta") for f in fields})
    acc = LayerAccumulator(8, 2, device="meta")
    acc.update(meta)
    acc.update(meta)
    st = acc.state()
    assert st["counts"].device.type == "meta" and st["coactivation"].shape == (8, 8)
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta.topk_index.sum().item()  # positive control: meta does refuse host reads
    with pytest.raises((RuntimeError, NotImplementedError)):
        _ = meta.topk_index[meta.token_mask]


def test_op_recorder_detects_item_and_mask_indexing() -> None:
    # Positive control: the recorder does catch the ops the test forbids.
    x = torch.arange(5.0)
    with _OpRecorder() as rec_ops:
        x.sum().item()
        _ = x[x > 2]
    assert "_local_scalar_dense" in rec_ops.ops
    assert "nonzero" in rec_ops.ops or "index" in rec_ops.ops


def test_memory_is_independent_of_number_of_updates() -> None:
    acc = LayerAccumulator(16, 4)
    rec = make_record(60, e=16, k=4, t=32)
    acc.update(rec)
    nbytes = acc.state_nbytes()
    attrs = set(vars(acc))
    shapes = {k: tuple(v.shape) for k, v in acc.state().items()}
    for _ in range(200):
        acc.update(rec)
    assert acc.state_nbytes() == nbytes
    assert set(vars(acc)) == attrs
    assert {k: tuple(v.shape) for k, v in acc.state().items()} == shapes
    assert int(acc.state()["n_updates"]) == 201
    # O(E^2) at most: the co-activation matrix ((E + 2)^2 bins) dominates.
    assert nbytes <= 8 * ((16 + 2) ** 2 + 8 * 16 + 32)
    assert LayerAccumulator(16, 4, coactivation=False).state_nbytes() <= 8 * (8 * 16 + 32)


def test_reduce_ops_cover_state_keys() -> None:
    acc = LayerAccumulator(4, 2)
    assert set(acc.state()) == set(REDUCE_OPS)
    assert acc.reduce_ops()["unique_max"] == "max"
    assert {v for k, v in REDUCE_OPS.items() if k != "unique_max"} == {"sum"}
    no_coact = LayerAccumulator(4, 2, coactivation=False).state()
    assert "coactivation" not in no_coact
    assert (
        layer_stats_from_state({k: v.numpy() for k, v in no_coact.items()}, 4, 2).coactivation
        is None
    )


def test_states_to_numpy_keeps_values_shapes_and_dtypes() -> None:
    a = run_acc([make_record(70)], 8, 2).state()
    b = run_acc([make_record(71, e=4, k=1)], 4, 1).state()
    host = states_to_numpy({"a": a, "b": b})
    for name, st in (("a", a), ("b", b)):
        for key, v in st.items():
            h = host[name][key]
            assert h.shape == tuple(v.shape), key
            assert h.dtype == v.numpy().dtype, key
            np.testing.assert_array_equal(h, v.numpy())


def test_zero_token_window_gives_nan_metrics() -> None:
    rec = make_record(80)
    rec.token_mask = torch.zeros(rec.num_tokens, dtype=torch.bool)
    s = stats_of(run_acc([rec], 8, 2))
    assert s.num_tokens == 0
    assert s.usage_counts.tolist() == [0] * 8
    for name in (
        "cv",
        "max_over_mean",
        "unused_experts",
        "routing_entropy",
        "aux_loss",
        "dropped_fraction",
        "load_entropy_norm",
    ):
        assert math.isnan(getattr(s, name)), name


def test_all_nan_logits_are_counted_not_crashing() -> None:
    rec = make_record(81, mask=False, weights=False)
    rec.logits = torch.full_like(rec.logits, float("nan"))  # type: ignore[arg-type]
    s = stats_of(run_acc([rec], 8, 2))
    assert s.nonfinite_tokens == rec.num_tokens
    assert s.num_tokens == 0 and math.isnan(s.routing_entropy)


def test_bad_records_raise_clear_errors() -> None:
    acc = LayerAccumulator(8, 2)
    rec = make_record(90)
    with pytest.raises(ValueError, match="num_experts"):
        LayerAccumulator(16, 2).update(rec)
    with pytest.raises(ValueError, match="top_k"):
        LayerAccumulator(8, 3).update(rec)
    bad = make_record(90)
    bad.token_mask = torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match="token_mask"):
        acc.update(bad)
    bad = make_record(90)
    bad.logits = torch.randn(bad.num_tokens, 4)
    with pytest.raises(ValueError, match="logits"):
        acc.update(bad)
    with pytest.raises(ValueError, match="num_experts >= 1"):
        LayerAccumulator(0, 2)


def test_router_scoring_extra_experts_uses_first_e_columns_for_aux() -> None:
    # longcat_flash-style: the router scores E routed + Z zero experts.
    gen = torch.Generator().manual_seed(95)
    t, e, z, k = 30, 6, 2, 2
    logits = torch.randn(t, e + z, generator=gen)
    idx = torch.topk(logits, k, -1).indices
    acc = LayerAccumulator(e, k)
    acc.update(RoutingRecord(layer="l", num_experts=e, topk_index=idx, logits=logits))
    s = stats_of(acc)
    p = torch.softmax(logits.double(), -1)
    cnt = [sum(int(x == i) for x in idx.reshape(-1).tolist()) for i in range(e)]
    want = e * sum((cnt[i] / t) * float(p[:, i].sum() / t) for i in range(e))
    assert s.aux_loss == pytest.approx(want, rel=1e-6)
    assert s.extra_slots == sum(int(x >= e) for x in idx.reshape(-1).tolist())
    ent = float(-(p * p.log()).sum(-1).mean())
    assert s.routing_entropy == pytest.approx(ent, rel=1e-6)


def test_long_window_sums_keep_float64_precision() -> None:
    # 2000 calls of the same record: a float32 running sum would drift by ~1e-5 relative;
    # the float64 window sums stay exact to ~1e-12 of N x (one call's sum).
    rec = make_record(99, t=8, e=4, k=1, nan_rows=False, mask=False, dropped=False, extra=False)
    one = run_acc([rec], 4, 1).state()
    acc = LayerAccumulator(4, 1, coactivation=False)
    n = 2_000
    for _ in range(n):
        acc.update(rec)
    st = acc.state()
    assert st["prob_sum"].dtype == torch.float64
    for key in ("prob_sum", "entropy_sum", "z_sum", "top1_sum", "weight_sums"):
        torch.testing.assert_close(st[key], one[key] * n, rtol=1e-12, atol=0)
    assert torch.equal(st["counts"], one["counts"] * n)


def test_empty_call_and_top1_vector_index() -> None:
    acc = LayerAccumulator(4, 2)
    acc.update(
        RoutingRecord(
            layer="l",
            num_experts=4,
            topk_index=torch.zeros(0, 2, dtype=torch.long),
            logits=torch.zeros(0, 4),
            topk_weight=torch.zeros(0, 2),
        )
    )
    s = stats_of(acc)
    assert s.num_tokens == 0 and s.num_updates == 1 and s.unique_experts_per_batch == 0.0
    top1 = LayerAccumulator(4, 1)
    top1.update(
        RoutingRecord(
            layer="l",
            num_experts=4,
            topk_index=torch.tensor([0, 1, 1, 9]),
            logits=torch.randn(2, 2, 4),
        )
    )  # [T] ids, [B, S, E] logits
    s = stats_of(top1)
    assert s.usage_counts.tolist() == [1, 2, 0, 0] and s.extra_slots == 1
