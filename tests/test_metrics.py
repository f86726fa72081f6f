"""Pure metric functions against plain-Python float64 references (loops over tokens)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from moescope.stats import metrics as M


def _rand_index(t: int, e: int, k: int, gen: torch.Generator, extra: int = 0) -> torch.Tensor:
    scores = torch.rand(t, e + extra, generator=gen)
    return torch.topk(scores, k, dim=-1).indices


def _py_softmax(row: list[float]) -> list[float]:
    m = max(row)
    ex = [math.exp(x - m) for x in row]
    s = sum(ex)
    return [x / s for x in ex]


def _py_sigmoid_norm(row: list[float]) -> list[float]:
    s = [1.0 / (1.0 + math.exp(-x)) for x in row]
    tot = sum(s)
    return [x / tot for x in s]


def test_expert_bins_maps_out_of_range_ids_to_extra_bin() -> None:
    idx = torch.tensor([[0, 3], [4, 7], [-1, 2]])
    bins = M.expert_bins(idx, 4)
    assert bins.tolist() == [[0, 3], [4, 4], [4, 2]]
    assert bins.dtype == torch.int64


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_dropped", [False, True])
def test_usage_counts_matches_loop(with_mask: bool, with_dropped: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    t, e, k = 53, 6, 3
    idx = _rand_index(t, e, k, gen, extra=2)  # ids 6, 7 are identity experts
    mask = torch.rand(t, generator=gen) > 0.3 if with_mask else None
    dropped = torch.rand(t, k, generator=gen) > 0.8 if with_dropped else None
    got = M.usage_counts(idx, e, token_mask=mask, dropped=dropped)

    ref = [0] * e
    extra = 0
    for i in range(t):
        if mask is not None and not bool(mask[i]):
            continue
        for j in range(k):
            if dropped is not None and bool(dropped[i, j]):
                continue
            x = int(idx[i, j])
            if x < e:
                ref[x] += 1
            else:
                extra += 1
    assert got.tolist() == ref
    assert extra > 0  # the case really exercises ids >= E


def test_slot_counts_sums_float_weights_per_bin() -> None:
    bins = torch.tensor([[0, 2], [2, 3], [1, 3]])
    w = torch.tensor([[0.5, 1.0], [2.0, 4.0], [8.0, 16.0]], dtype=torch.float64)
    out = M.slot_counts(bins, w, 3)
    assert out.tolist() == [0.5, 8.0, 3.0, 20.0]


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "probs"])
def test_router_probs_entropy_top1_margin(score_fn: str) -> None:
    gen = torch.Generator().manual_seed(2)
    t, e = 17, 7
    logits = torch.randn(t, e, generator=gen, dtype=torch.float64) * 3
    if score_fn == "probs":
        logits = torch.softmax(logits, -1)
    probs = M.router_probs(logits, score_fn)  # type: ignore[arg-type]
    ent = M.token_entropy(probs)
    top1, margin = M.top1_and_margin(probs)
    for i in range(t):
        row = [float(x) for x in logits[i]]
        if score_fn == "softmax":
            p = _py_softmax(row)
        elif score_fn == "sigmoid":
            p = _py_sigmoid_norm(row)
        else:
            p = row
        assert probs[i].tolist() == pytest.approx(p, rel=1e-12, abs=1e-14)
        h = -sum(x * math.log(x) for x in p if x > 0)
        assert float(ent[i]) == pytest.approx(h, rel=1e-12)
        srt = sorted(p, reverse=True)
        assert float(top1[i]) == pytest.approx(srt[0], rel=1e-12)
        assert float(margin[i]) == pytest.approx(srt[0] - srt[1], rel=1e-9, abs=1e-14)


def test_router_probs_upcasts_low_precision_and_rejects_unknown_fn() -> None:
    x = torch.randn(4, 5).to(torch.bfloat16)
    assert M.router_probs(x, "softmax").dtype == torch.float32
    with pytest.raises(ValueError, match="score_fn"):
        M.router_probs(x, "relu")  # type: ignore[arg-type]


def test_token_entropy_zero_probabilities_and_single_expert() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert M.token_entropy(p).tolist() == pytest.approx([0.0, math.log(2), 0.0])
    top1, margin = M.top1_and_margin(torch.tensor([[1.0], [0.7]]))
    assert top1.tolist() == pytest.approx([1.0, 0.7])
    assert margin.tolist() == pytest.approx([1.0, 0.7])


def test_z_values_matches_logsumexp_squared() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 5, generator=gen, dtype=torch.float64) * 10
    z = M.z_values(logits)
    for i in range(9):
        row = [float(x) for x in logits[i]]
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        assert float(z[i]) == pytest.approx(lse**2, rel=1e-12)


@pytest.mark.parametrize(
    "counts",
    [[5, 0, 3, 12, 7, 7, 0, 1], [4, 4, 4, 4], [100, 0, 0, 0, 0], [1, 2]],
)
def test_window_metrics_match_statistics_module(counts: list[int]) -> None:
    c = torch.tensor(counts)
    n = len(counts)
    mean = sum(counts) / n
    assert float(M.cv(c)) == pytest.approx(statistics.pstdev(counts) / mean, rel=1e-12, abs=1e-15)
    assert float(M.max_over_mean(c)) == pytest.approx(max(counts) / mean, rel=1e-12)
    assert int(M.unused_experts(c)) == sum(1 for x in counts if x == 0)
    assert int(M.unique_experts(c)) == sum(1 for x in counts if x > 0)
    frac = [x / sum(counts) for x in counts]
    assert M.usage_fraction(c).tolist() == pytest.approx(frac, rel=1e-12)
    h = -sum(f * math.log(f) for f in frac if f > 0)
    assert float(M.load_entropy_norm(c)) == pytest.approx(h / math.log(n), rel=1e-12, abs=1e-15)


def test_window_metrics_of_empty_counts_are_nan() -> None:
    c = torch.zeros(4, dtype=torch.long)
    assert math.isnan(float(M.cv(c)))
    assert math.isnan(float(M.max_over_mean(c)))
    assert math.isnan(float(M.load_entropy_norm(c)))
    assert math.isnan(float(M.routing_entropy_norm(0.3, 1)))
    assert float(M.routing_entropy_norm(math.log(4), 4)) == pytest.approx(1.0)


def test_aux_loss_from_sums_definition() -> None:
    count = [3, 1, 0, 2]
    prob = [1.5, 0.5, 0.25, 0.75]
    n = 3
    ref = 4 * sum((count[i] / n) * (prob[i] / n) for i in range(4))
    got = M.aux_loss_from_sums(torch.tensor(count), torch.tensor(prob, dtype=torch.float64), n, 4)
    assert float(got) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_equals_transformers(masked: bool) -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    gen = torch.Generator().manual_seed(6)
    b, s, e, k = 3, 11, 8, 2
    logits = torch.randn(b * s, e, generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    if masked:
        mask[0, :4] = 0
        mask[2, 7:] = 0
    idx = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices
    ref = mixtral.load_balancing_loss_func((logits,), e, k, mask if masked else None)
    got = M.aux_loss(logits, idx, e, token_mask=mask.reshape(-1).bool() if masked else None)
    assert float(got) == pytest.approx(float(ref), abs=1e-6)
