"""Router losses against transformers' own function and plain float64 loop references."""

from __future__ import annotations

import math

import pytest
import torch

from moescope.nn.losses import (
    cv_squared,
    expert_counts,
    importance_loss,
    load_balancing_loss,
    noisy_topk_load,
    router_z_loss,
    sequence_aux_loss,
)

mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")


def _padded_mask(batch: int, seq: int, lengths: list[int]) -> torch.Tensor:
    """[B, S] attention mask (1 = token) with right padding."""
    m = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    return m


# --------------------------------------------------------------------------- references


def ref_cv2(values: list[float], eps: float = 1e-10) -> float:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return var / (mean**2 + eps)


def ref_softmax_rows(logits: torch.Tensor) -> list[list[float]]:
    out = []
    for row in logits.double().tolist():
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        out.append([v / s for v in ex])
    return out


def ref_sequence_aux(
    probs: torch.Tensor, topk: torch.Tensor, batch: int, seq: int, mask: torch.Tensor | None
) -> float:
    p = probs.double().tolist()
    idx = topk.tolist()
    n_exp = len(p[0])
    k = len(idx[0])
    valid = [True] * (batch * seq) if mask is None else [bool(v) for v in mask.tolist()]
    losses = []
    for b in range(batch):
        rows = [b * seq + s for s in range(seq) if valid[b * seq + s]]
        if not rows:
            continue
        t_b = len(rows)
        total = 0.0
        for i in range(n_exp):
            count = sum(1 for t in rows for j in idx[t] if j == i)
            f_i = n_exp / (k * t_b) * count
            p_i = sum(p[t][i] / sum(p[t]) for t in rows) / t_b
            total += f_i * p_i
        losses.append(total)
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_equals_transformers_without_mask(top_k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2 * 7, 6)
    probs = torch.softmax(logits, dim=-1)
    topk = probs.topk(top_k, dim=-1).indices
    ours = load_balancing_loss(probs, topk)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=6, top_k=top_k)
    assert abs(ours.item() - theirs.item()) < 1e-6


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_equals_transformers_with_padding(top_k: int) -> None:
    torch.manual_seed(1)
    batch, seq, n_exp = 3, 5, 4
    attn = _padded_mask(batch, seq, [5, 2, 3])
    logits = torch.randn(batch * seq, n_exp) * 2
    probs = torch.softmax(logits, dim=-1)
    topk = probs.topk(top_k, dim=-1).indices
    ours = load_balancing_loss(probs, topk, attn.reshape(-1).bool())
    theirs = mixtral.load_balancing_loss_func(
        (logits,), num_experts=n_exp, top_k=top_k, attention_mask=attn
    )
    assert abs(ours.item() - theirs.item()) < 1e-6
    # Padding really is excluded: the unmasked value differs.
    assert abs(load_balancing_loss(probs, topk).item() - theirs.item()) > 1e-4


def test_expert_counts_matches_loop() -> None:
    torch.manual_seed(2)
    topk = torch.randint(0, 7, (20, 3))  # id 6 >= E=5 is an identity expert: ignored
    mask = torch.rand(20) > 0.3
    kept = torch.rand(20, 3) > 0.2
    got = expert_counts(topk, 5, mask, kept)
    want = [0.0] * 5
    for t in range(20):
        for j in range(3):
            e = int(topk[t, j])
            if mask[t] and kept[t, j] and e < 5:
                want[e] += 1
    assert got.tolist() == want


def test_router_z_loss_matches_loop() -> None:
    torch.manual_seed(3)
    logits = torch.randn(9, 4) * 3
    mask = torch.tensor([True, True, False, True, True, True, False, True, True])
    vals = [
        math.log(sum(math.exp(v) for v in row)) ** 2
        for row, m in zip(logits.double().tolist(), mask.tolist(), strict=True)
        if m
    ]
    assert router_z_loss(logits, mask).item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_cv_squared_hand_values() -> None:
    assert cv_squared(torch.tensor([4.0, 4.0, 4.0])).item() == 0.0
    # mean 2, population variance 1 -> 1/4
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25, rel=1e-6)


def test_importance_loss_matches_loop() -> None:
    torch.manual_seed(4)
    gates = torch.softmax(torch.randn(12, 5), dim=-1)
    mask = torch.rand(12) > 0.4
    imp = [sum(gates[t, e].item() for t in range(12) if mask[t]) for e in range(5)]
    assert importance_loss(gates, mask).item() == pytest.approx(ref_cv2(imp), rel=1e-5)
    imp_all = [sum(gates[t, e].item() for t in range(12)) for e in range(5)]
    assert importance_loss(gates).item() == pytest.approx(ref_cv2(imp_all), rel=1e-5)


def test_importance_loss_zero_when_balanced_and_grad_flows() -> None:
    gates = torch.full((8, 4), 0.25, requires_grad=True)
    assert importance_loss(gates).item() == pytest.approx(0.0, abs=1e-12)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8, requires_grad=True)
    loss = importance_loss(skewed)
    loss.backward()
    assert loss.item() > 0
    assert skewed.grad is not None and skewed.grad[:, 0].gt(0).all()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_noisy_topk_load_matches_loop(top_k: int) -> None:
    torch.manual_seed(5)
    t, e = 10, 5
    clean = torch.randn(t, e)
    std = torch.rand(t, e) + 0.1
    noisy = clean + torch.randn(t, e) * std
    mask = torch.rand(t) > 0.3
    got = noisy_topk_load(clean, noisy, std, top_k, mask)
    want = [0.0] * e
    for i in range(t):
        if not mask[i]:
            continue
        row = noisy[i].double().tolist()
        for j in range(e):
            others = sorted((row[m] for m in range(e) if m != j), reverse=True)
            thr = others[top_k - 1]  # k-th highest noisy logit excluding j
            z = (clean[i, j].item() - thr) / std[i, j].item()
            want[j] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    torch.testing.assert_close(
        got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )


def test_noisy_topk_load_rejects_k_equal_e() -> None:
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="top_k < E"):
        noisy_topk_load(x, x, x + 1, 4)


@pytest.mark.parametrize("use_mask", [False, True])
def test_sequence_aux_loss_matches_loop(use_mask: bool) -> None:
    torch.manual_seed(6)
    batch, seq, n_exp, k = 3, 6, 8, 2
    scores = torch.sigmoid(torch.randn(batch * seq, n_exp))  # DeepSeek-V3 affinities
    topk = scores.topk(k, dim=-1).indices
    mask = _padded_mask(batch, seq, [6, 0, 4]).reshape(-1).bool() if use_mask else None
    got = sequence_aux_loss(scores, topk, batch, seq, mask)
    want = ref_sequence_aux(scores, topk, batch, seq, mask)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert sequence_aux_loss(scores, topk, batch, seq, mask, alpha=0.01).item() == pytest.approx(
        0.01 * want, rel=1e-5
    )


def test_sequence_aux_loss_balanced_is_one_and_single_sequence_is_switch_over_k() -> None:
    # Perfect balance: 4 tokens, 4 experts, each token picks a different expert with
    # uniform scores -> f_i = 1, P_i = 1/4 -> loss 1.
    probs = torch.full((4, 4), 0.25)
    topk = torch.arange(4).unsqueeze(-1)
    assert sequence_aux_loss(probs, topk, 1, 4).item() == pytest.approx(1.0, rel=1e-6)
    # One sequence with softmax probabilities: the Switch/transformers loss divided by K.
    torch.manual_seed(7)
    logits = torch.randn(10, 6)
    probs = torch.softmax(logits, -1)
    topk = probs.topk(2, -1).indices
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    assert sequence_aux_loss(probs, topk, 1, 10).item() == pytest.approx(
        theirs.item() / 2, rel=1e-5
    )


def test_sequence_aux_loss_bad_shape_message() -> None:
    with pytest.raises(ValueError, match="batch_size \\* seq_len"):
        sequence_aux_loss(torch.rand(10, 4), torch.zeros(10, 1, dtype=torch.long), 3, 4)
