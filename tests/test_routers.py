"""Routers against plain float64 Python-loop references, transformers' DeepSeek-V3 router,
hand-computed capacity cases and Hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moescope.nn import (
    ExpertChoiceRouter,
    GroupLimitedRouter,
    NoisyTopKRouter,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    expert_counts,
)

# --------------------------------------------------------------------------- references
# Slow but obviously correct: one token / one expert at a time, in float64.


def ref_logits(x: torch.Tensor, w: torch.Tensor) -> list[list[float]]:
    xs, ws = x.double().tolist(), w.double().tolist()
    return [[sum(a * b for a, b in zip(row, wr, strict=True)) for wr in ws] for row in xs]


def ref_softmax(row: list[float]) -> list[float]:
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def ref_sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def ref_order(row: list[float]) -> list[int]:
    """Experts from best to worst, ties to the lower id."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))


def ref_topk(probs: list[list[float]], k: int, normalize: bool):
    idx, wts = [], []
    for p in probs:
        chosen = ref_order(p)[:k]
        w = [p[e] for e in chosen]
        if normalize:
            s = sum(w)
            w = [v / s for v in w]
        idx.append(chosen)
        wts.append(w)
    return idx, wts


def ref_switch(probs: list[list[float]], valid: list[bool], cf: float, overflow: str):
    """Returns (expert used, weight, dropped) per token."""
    n_exp = len(probs[0])
    t_valid = sum(valid)
    cap = math.ceil(cf * t_valid / n_exp)
    prefs = [ref_order(p) for p in probs]
    chosen = [pr[0] for pr in prefs]
    placed = [False] * len(probs)
    load = [0] * n_exp
    rounds = 1 if overflow == "drop" else n_exp
    for r in range(rounds):
        for t in range(len(probs)):  # sequence order within a round
            if not valid[t] or placed[t]:
                continue
            e = prefs[t][r]
            if load[e] < cap:
                load[e] += 1
                placed[t] = True
                chosen[t] = e
    weights = [probs[t][chosen[t]] for t in range(len(probs))]
    return chosen, weights, [not p for p in placed], cap


def ref_expert_choice(probs: list[list[float]], valid: list[bool], cf: float, tpe: int | None):
    n_exp = len(probs[0])
    t_valid = sum(valid)
    cap = tpe if tpe is not None else math.ceil(t_valid * cf / n_exp)
    cap = min(cap, t_valid)
    picked = [[False] * n_exp for _ in probs]
    for e in range(n_exp):
        cands = sorted((t for t in range(len(probs)) if valid[t]), key=lambda t: -probs[t][e])
        for t in cands[:cap]:
            picked[t][e] = True
    return picked, cap


def ref_group_limited(
    logits: list[list[float]],
    bias: list[float],
    k: int,
    n_group: int,
    topk_group: int,
    rsf: float,
    norm: bool,
):
    out_idx, out_w = [], []
    n_exp = len(bias)
    per = n_exp // n_group
    for row in logits:
        s = [ref_sigmoid(v) for v in row]
        c = [s[e] + bias[e] for e in range(n_exp)]
        gscore = []
        for g in range(n_group):
            members = sorted((c[e] for e in range(g * per, (g + 1) * per)), reverse=True)
            gscore.append(sum(members[:2]))
        groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        allowed = [e for e in range(n_exp) if e // per in groups]
        chosen = sorted(allowed, key=lambda e: -c[e])[:k]
        w = [s[e] for e in chosen]
        if norm:
            tot = sum(w) + 1e-20
            w = [v / tot for v in w]
        w = [v * rsf for v in w]
        out_idx.append(chosen)
        out_w.append(w)
    return out_idx, out_w


def by_index(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's slots by expert id (for routers whose slot order is unspecified)."""
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


def rand_mask(t: int, n_pad: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.ones(t, dtype=torch.bool)
    mask[torch.randperm(t, generator=gen)[:n_pad]] = False
    return mask


# --------------------------------------------------------------------------- TopKRouter


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_router_matches_reference(normalize: bool) -> None:
    torch.manual_seed(0)
    r = TopKRouter(8, 6, 2, normalize=normalize)
    x = torch.randn(15, 8)
    out = r(x)
    probs = [ref_softmax(row) for row in ref_logits(x, r.weight)]
    idx, w = ref_topk(probs, 2, normalize)
    assert out.topk_index.tolist() == idx
    torch.testing.assert_close(
        out.topk_weight.double(), torch.tensor(w, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert out.dropped is None


def test_topk_router_aux_loss_equals_transformers_with_padding() -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(1)
    r = TopKRouter(8, 4, 2)
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    out = r(torch.randn(10, 8), attn.reshape(-1).bool())
    theirs = mixtral.load_balancing_loss_func((out.logits,), 4, 2, attn)
    assert abs(out.losses["aux_loss"].item() - theirs.item()) < 1e-6


def test_bad_input_messages() -> None:
    r = TopKRouter(8, 4, 2)
    with pytest.raises(ValueError, match="flatten batch and sequence"):
        r(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="bool"):
        r(torch.randn(3, 8), torch.ones(3))
    with pytest.raises(ValueError, match="token_mask must be"):
        r(torch.randn(3, 8), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="overflow"):
        SwitchRouter(8, 4, overflow="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of n_group"):
        GroupLimitedRouter(8, 6, 2, n_group=4, topk_group=2)


# --------------------------------------------------------------------------- SwitchRouter


@pytest.mark.parametrize("overflow", ["drop", "next"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("n_pad", [0, 5])
def test_switch_router_matches_reference(overflow: str, cf: float, n_pad: int) -> None:
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    r = SwitchRouter(8, 4, capacity_factor=cf, overflow=overflow)  # type: ignore[arg-type]
    # A skewed router so that capacity matters.
    with torch.no_grad():
        r.weight[0] += 0.5
    x = torch.randn(24, 8, generator=gen) + 0.5
    mask = rand_mask(24, n_pad, gen)
    out = r(x, mask if n_pad else None)
    probs = [ref_softmax(row) for row in ref_logits(x, r.weight)]
    chosen, w, dropped, cap = ref_switch(probs, mask.tolist(), cf, overflow)
    assert out.topk_index.squeeze(-1).tolist() == chosen
    assert out.dropped is not None and out.dropped.squeeze(-1).tolist() == dropped
    torch.testing.assert_close(
        out.topk_weight.squeeze(-1).double(),
        torch.tensor(w, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    assert r.capacity(int(mask.sum())).item() == cap
    assert any(dropped[t] for t in range(24) if mask[t]) or overflow == "next"


def _one_preference_router(n_tokens: int) -> tuple[SwitchRouter, torch.Tensor]:
    """E=4 router on which every token prefers expert 0, then 1, then 2, then 3."""
    r = SwitchRouter(4, 4)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    x = torch.tensor([3.0, 2.0, 1.0, 0.0]).expand(n_tokens, 4).clone()
    return r, x


def test_switch_hand_computed_drop() -> None:
    r, x = _one_preference_router(10)
    r.capacity_factor = 1.0  # capacity = ceil(1.0 * 10 / 4) = 3
    out = r(x)
    assert out.dropped is not None
    assert int(out.dropped.sum()) == 7
    assert out.dropped.squeeze(-1).tolist() == [False] * 3 + [True] * 7  # earliest keep slots
    assert out.topk_index.squeeze(-1).tolist() == [0] * 10
    # With 2 padding tokens at the front: T_valid = 8, capacity ceil(8/4) = 2, padding
    # takes no slot and is never dispatched.
    mask = torch.tensor([False, False] + [True] * 8)
    out = r(x, mask)
    assert out.dropped is not None
    assert out.dropped.squeeze(-1).tolist() == [True, True, False, False] + [True] * 6


def test_switch_hand_computed_next() -> None:
    r, x = _one_preference_router(10)
    r.overflow = "next"
    r.capacity_factor = 1.0  # capacity 3: 3 + 3 + 3 + 1 tokens, nothing dropped
    out = r(x)
    assert out.dropped is not None and int(out.dropped.sum()) == 0
    assert out.topk_index.squeeze(-1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    p = torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), -1)
    torch.testing.assert_close(out.topk_weight.squeeze(-1), p[out.topk_index.squeeze(-1)])
    r.capacity_factor = 0.5  # capacity ceil(5/4) = 2: 8 slots for 10 tokens, 2 dropped
    out = r(x)
    assert out.dropped is not None and int(out.dropped.sum()) == 2
    assert out.dropped.squeeze(-1).tolist() == [False] * 8 + [True] * 2
    assert out.topk_index.squeeze(-1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]


def test_switch_next_max_rounds() -> None:
    r, x = _one_preference_router(10)
    r.overflow, r.capacity_factor = "next", 1.0
    r.max_rounds = 1  # one round = the "drop" policy
    out = r(x)
    assert out.dropped is not None and int(out.dropped.sum()) == 7
    r.max_rounds = 2  # experts 0 and 1 take 3 each; 4 dropped
    out = r(x)
    assert out.topk_index.squeeze(-1).tolist()[:6] == [0, 0, 0, 1, 1, 1]
    assert out.dropped is not None and out.dropped.squeeze(-1).tolist() == [False] * 6 + [True] * 4


def test_switch_next_first_choices_beat_earlier_second_choices() -> None:
    # E = 2, capacity = ceil(4/2) = 2. Tokens 0-2 prefer expert 0, token 3 prefers 1.
    # Round 0: expert 0 takes tokens 0, 1; expert 1 takes token 3. Round 1: token 2 -> 1.
    r = SwitchRouter(2, 2, capacity_factor=1.0, overflow="next")
    with torch.no_grad():
        r.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = r(x)
    assert out.topk_index.squeeze(-1).tolist() == [0, 0, 1, 1]
    assert out.dropped is not None and not out.dropped.any()


def test_switch_losses() -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(3)
    r = SwitchRouter(8, 4, capacity_factor=0.5)
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = r(torch.randn(12, 8), attn.reshape(-1).bool())
    # aux_loss uses the first choices before capacity, exactly the Switch/HF f_i.
    theirs = mixtral.load_balancing_loss_func((out.logits,), 4, 1, attn)
    assert abs(out.losses["aux_loss"].item() - theirs.item()) < 1e-6
    assert out.losses["z_loss"].item() > 0


def test_switch_jitter_only_in_training() -> None:
    torch.manual_seed(4)
    r = SwitchRouter(8, 4, jitter_eps=0.1)
    x = torch.randn(16, 8)
    r.eval()
    assert torch.equal(r(x).logits, r(x).logits)
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 40),
    e=st.integers(1, 8),
    cf=st.floats(0.1, 3.0),
    overflow=st.sampled_from(["drop", "next"]),
    n_pad=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
def test_switch_properties(t: int, e: int, cf: float, overflow: str, n_pad: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    r = SwitchRouter(6, e, capacity_factor=cf, overflow=overflow)  # type: ignore[arg-type]
    x = torch.randn(t, 6, generator=gen) * 2
    mask = rand_mask(t, min(n_pad, t), gen)
    out = r(x, mask)
    assert out.dropped is not None
    t_valid = int(mask.sum())
    cap = math.ceil(cf * t_valid / e)
    kept = ~out.dropped
    counts = expert_counts(out.topk_index, e, mask, kept)
    n_dropped_valid = int((out.dropped.squeeze(-1) & mask).sum())
    assert counts.sum().item() == t_valid - n_dropped_valid  # T_valid * K minus dropped
    assert (counts <= cap).all()  # capacity never exceeded
    assert out.dropped[~mask].all()  # padding is never dispatched
    assert torch.isfinite(out.topk_weight).all()
    torch.testing.assert_close(out.topk_weight, out.probs.gather(1, out.topk_index))
    # Exactly the reference decision, run on the router's own probabilities.
    chosen, _, dropped, _ = ref_switch(out.probs.double().tolist(), mask.tolist(), cf, overflow)
    assert out.topk_index.squeeze(-1).tolist() == chosen
    assert out.dropped.squeeze(-1).tolist() == dropped
    first = out.probs.argmax(-1)
    if overflow == "drop":
        # Dropped slots are exactly those beyond capacity in sequence order.
        first_counts = torch.bincount(first[mask], minlength=e)
        assert counts.tolist() == torch.clamp(first_counts, max=cap).float().tolist()
        assert n_dropped_valid == int((first_counts - cap).clamp_min(0).sum())
    elif n_dropped_valid > 0:
        # A token is dropped only when no expert has room left.
        assert (counts == cap).all()
        assert n_dropped_valid == t_valid - e * cap


# --------------------------------------------------------------------------- ExpertChoiceRouter


@pytest.mark.parametrize(("cf", "tpe"), [(1.0, None), (2.0, None), (0.5, None), (1.0, 3)])
@pytest.mark.parametrize("n_pad", [0, 6])
def test_expert_choice_matches_reference(cf: float, tpe: int | None, n_pad: int) -> None:
    gen = torch.Generator().manual_seed(20)
    torch.manual_seed(20)
    r = ExpertChoiceRouter(8, 4, capacity_factor=cf, tokens_per_expert=tpe)
    x = torch.randn(18, 8, generator=gen)
    mask = rand_mask(18, n_pad, gen)
    out = r(x, mask if n_pad else None)
    probs = [ref_softmax(row) for row in ref_logits(x, r.weight)]
    picked, cap = ref_expert_choice(probs, mask.tolist(), cf, tpe)
    assert out.topk_index.tolist() == [list(range(4))] * 18
    assert out.dropped is not None
    assert (~out.dropped).tolist() == picked
    w = [[probs[t][e] if picked[t][e] else 0.0 for e in range(4)] for t in range(18)]
    torch.testing.assert_close(
        out.topk_weight.double(), torch.tensor(w, dtype=torch.float64), atol=1e-6, rtol=0
    )
    unrouted = [bool(mask[t]) and not any(picked[t]) for t in range(18)]
    assert out.unrouted is not None and out.unrouted.tolist() == unrouted
    assert r.capacity(int(mask.sum())).item() == cap


def test_expert_choice_more_capacity_than_tokens() -> None:
    r = ExpertChoiceRouter(4, 2, tokens_per_expert=10)
    mask = torch.tensor([True, False, True])
    out = r(torch.randn(3, 4), mask)
    assert out.dropped is not None
    # Each expert takes every valid token, never the padding one.
    assert (~out.dropped).tolist() == [[True, True], [False, False], [True, True]]
    assert out.unrouted is not None and not out.unrouted.any()


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 40),
    e=st.integers(1, 8),
    cf=st.floats(0.1, 4.0),
    n_pad=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
def test_expert_choice_properties(t: int, e: int, cf: float, n_pad: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    r = ExpertChoiceRouter(6, e, capacity_factor=cf)
    x = torch.randn(t, 6, generator=gen)
    mask = rand_mask(t, min(n_pad, t), gen)
    out = r(x, mask)
    assert out.dropped is not None and out.unrouted is not None
    picked = ~out.dropped
    t_valid = int(mask.sum())
    cap = min(math.ceil(t_valid * cf / e), t_valid)
    # Every expert takes exactly its capacity (cap <= T_valid by construction).
    assert picked.sum(0).tolist() == [cap] * e
    assert not picked[~mask].any()
    # Counts over (token, slot) assignments: T_valid * K minus dropped.
    counts = expert_counts(out.topk_index, e, mask, picked)
    assert counts.sum().item() == t_valid * e - int(out.dropped[mask].sum())
    assert torch.isfinite(out.topk_weight).all()
    # Each expert's picks are its highest-probability valid tokens.
    for j in range(e):
        taken = out.probs[picked[:, j], j]
        left = out.probs[mask & ~picked[:, j], j]
        if taken.numel() and left.numel():
            assert taken.min() >= left.max()
    assert out.unrouted.tolist() == (mask & ~picked.any(-1)).tolist()


# --------------------------------------------------------------------------- NoisyTopKRouter


def ref_noisy(
    x: torch.Tensor,
    r: NoisyTopKRouter,
    noise: torch.Tensor | None,
    mask: torch.Tensor,
):
    clean = ref_logits(x, r.weight)
    raw = ref_logits(x, r.noise_weight)
    t_n, e_n, k = len(clean), r.num_experts, r.top_k
    h = [row[:] for row in clean]
    std = [[0.0] * e_n for _ in range(t_n)]
    if noise is not None:
        for t in range(t_n):
            for e in range(e_n):
                std[t][e] = math.log1p(math.exp(raw[t][e])) + r.noise_epsilon
                h[t][e] = clean[t][e] + float(noise[t, e]) * std[t][e]
    idx, wts, gates = [], [], []
    for t in range(t_n):
        chosen = ref_order(h[t])[:k]
        w = ref_softmax([h[t][e] for e in chosen])
        g = [0.0] * e_n
        for e, v in zip(chosen, w, strict=True):
            g[e] = v
        idx.append(chosen)
        wts.append(w)
        gates.append(g)
    valid = mask.tolist()
    importance = [sum(gates[t][e] for t in range(t_n) if valid[t]) for e in range(e_n)]
    if noise is not None and k < e_n:
        load = [0.0] * e_n
        for t in range(t_n):
            if not valid[t]:
                continue
            for e in range(e_n):
                thr = sorted((h[t][m] for m in range(e_n) if m != e), reverse=True)[k - 1]
                z = (clean[t][e] - thr) / std[t][e]
                load[e] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    else:
        load = [sum(1.0 for t in range(t_n) if valid[t] and e in idx[t]) for e in range(e_n)]
    return idx, wts, importance, load


def _cv2(v: list[float]) -> float:
    m = sum(v) / len(v)
    return sum((a - m) ** 2 for a in v) / len(v) / (m * m + 1e-10)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_noisy_topk_matches_reference(train: bool, top_k: int) -> None:
    gen = torch.Generator().manual_seed(30)
    torch.manual_seed(30)
    r = NoisyTopKRouter(8, 6, top_k)
    with torch.no_grad():
        r.noise_weight.normal_(0, 0.3, generator=gen)
    r.train(train)
    x = torch.randn(14, 8, generator=gen)
    mask = rand_mask(14, 3, gen)
    noise = torch.randn(14, 6, generator=gen)
    out = r(x, mask, noise=noise)
    idx, w, importance, load = ref_noisy(x, r, noise if train else None, mask)
    assert out.topk_index.tolist() == idx
    torch.testing.assert_close(
        out.topk_weight.double(), torch.tensor(w, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert out.losses["importance_loss"].item() == pytest.approx(
        _cv2(importance), rel=1e-4, abs=1e-7
    )
    assert out.losses["load_loss"].item() == pytest.approx(_cv2(load), rel=1e-4, abs=1e-7)
    clean_probs = [ref_softmax(row) for row in ref_logits(x, r.weight)]
    torch.testing.assert_close(
        out.probs.double(), torch.tensor(clean_probs, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_noisy_topk_eval_deterministic_train_noisy() -> None:
    torch.manual_seed(31)
    r = NoisyTopKRouter(8, 8, 2)
    x = torch.randn(64, 8)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.topk_index, b.topk_index) and torch.equal(a.topk_weight, b.topk_weight)
    # Eval is plain softmax-over-kept-top-k of the clean logits (= TopKRouter, normalised).
    ref = TopKRouter(8, 8, 2, normalize=True)
    ref.weight = r.weight
    c = ref(x)
    assert torch.equal(a.topk_index, c.topk_index)
    torch.testing.assert_close(a.topk_weight, c.topk_weight)
    r.train()
    d, f = r(x), r(x)
    assert not torch.equal(d.topk_weight, f.topk_weight)
    assert not torch.equal(d.topk_index, a.topk_index)


def test_noisy_topk_gradients_reach_noise_weights() -> None:
    torch.manual_seed(32)
    r = NoisyTopKRouter(8, 6, 2).train()
    x = torch.randn(32, 8)
    out = r(x)
    # Through the combine weights (noise moves the kept logits) ...
    (out.topk_weight * torch.randn_like(out.topk_weight)).sum().backward()
    assert r.noise_weight.grad is not None and r.noise_weight.grad.abs().sum() > 0
    # ... and through the smooth load estimator.
    r.zero_grad()
    out = r(x)
    out.losses["load_loss"].backward()
    assert r.noise_weight.grad is not None and r.noise_weight.grad.abs().sum() > 0
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- GroupLimitedRouter


@pytest.mark.parametrize(
    ("n_group", "topk_group", "top_k", "norm", "rsf"),
    [(4, 2, 3, True, 2.5), (4, 1, 2, False, 1.0), (1, 1, 4, True, 1.0), (8, 3, 4, True, 1.5)],
)
def test_group_limited_matches_reference(
    n_group: int, topk_group: int, top_k: int, norm: bool, rsf: float
) -> None:
    gen = torch.Generator().manual_seed(40)
    torch.manual_seed(40)
    r = GroupLimitedRouter(8, 16, top_k, n_group, topk_group, rsf, norm)
    with torch.no_grad():
        r.e_score_correction_bias.normal_(0, 0.2, generator=gen)
    x = torch.randn(20, 8, generator=gen)
    out = r(x)
    idx, w = ref_group_limited(
        ref_logits(x, r.weight),
        r.e_score_correction_bias.double().tolist(),
        top_k,
        n_group,
        topk_group,
        rsf,
        norm,
    )
    got_i, got_w = by_index(out.topk_index, out.topk_weight)
    want_i, want_w = by_index(torch.tensor(idx), torch.tensor(w, dtype=torch.float64))
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w.double(), want_w, atol=1e-6, rtol=0)
    assert out.score_fn == "sigmoid"


@pytest.mark.parametrize("norm", [True, False])
def test_group_limited_equals_transformers_deepseek_v3(norm: bool) -> None:
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        hidden_size=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
        num_hidden_layers=1,
    )
    torch.manual_seed(41)
    hf = ds.DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        hf.weight.normal_(0, 0.5)
        hf.e_score_correction_bias.normal_(0, 0.1)
    ours = GroupLimitedRouter(16, 16, 4, 4, 2, 2.5, norm)
    with torch.no_grad():
        ours.weight.copy_(hf.weight)
        ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(64, 16)
    h_logits, h_w, h_i = hf(x)
    out = ours(x)
    assert torch.equal(out.logits, h_logits)
    a_i, a_w = by_index(out.topk_index, out.topk_weight)
    b_i, b_w = by_index(h_i, h_w)
    assert torch.equal(a_i, b_i)
    assert torch.equal(a_w, b_w)  # bit-exact


def test_group_limited_bias_changes_selection_not_weights() -> None:
    torch.manual_seed(42)
    r = GroupLimitedRouter(8, 8, 2, n_group=2, topk_group=1, routed_scaling_factor=2.0)
    x = torch.randn(30, 8)
    base = r(x)
    with torch.no_grad():
        r.e_score_correction_bias[5] = 10.0  # expert 5 is now always chosen
    biased = r(x)
    assert (biased.topk_index == 5).any(-1).all()
    assert not torch.equal(base.topk_index, biased.topk_index)
    # Weights are still the UNBIASED sigmoid scores of the chosen experts, renormalised.
    s = torch.sigmoid(biased.logits)
    chosen = s.gather(1, biased.topk_index)
    torch.testing.assert_close(biased.topk_weight, 2.0 * chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(biased.probs, s)
    # A different bias with the same selection gives exactly the same weights.
    with torch.no_grad():
        r.e_score_correction_bias[5] = 20.0
    again = r(x)
    assert torch.equal(again.topk_index, biased.topk_index)
    assert torch.equal(again.topk_weight, biased.topk_weight)


def test_group_limited_update_bias() -> None:
    r = GroupLimitedRouter(8, 4, 1, bias_update_rate=0.01)
    r.update_bias(torch.tensor([10.0, 0.0, 5.0, 6.0]))  # mean 5.25
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, -0.01]))
    with pytest.raises(ValueError, match="load must be"):
        r.update_bias(torch.ones(3))


def test_group_limited_update_bias_balances_a_skewed_router() -> None:
    torch.manual_seed(43)
    e = 8
    r = GroupLimitedRouter(16, e, 2, n_group=4, topk_group=2, bias_update_rate=0.02)
    with torch.no_grad():
        r.weight[0] += 0.8  # expert 0 overloaded
    x = torch.randn(256, 16) + 0.3

    def imbalance() -> float:
        c = expert_counts(r(x).topk_index, e)
        return float(c.max() / c.mean())

    start = imbalance()
    for _ in range(150):
        r.update_bias(expert_counts(r(x).topk_index, e))
    assert start > 2.0
    assert imbalance() < 0.6 * start
    assert r.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down


def test_group_limited_seq_aux_loss() -> None:
    from moescope.nn.losses import sequence_aux_loss

    torch.manual_seed(44)
    r = GroupLimitedRouter(8, 8, 2, n_group=2, topk_group=2)
    x = torch.randn(12, 8)
    mask = torch.tensor([True] * 10 + [False] * 2)
    out = r(x, mask, seq_len=4)
    want = sequence_aux_loss(torch.sigmoid(out.logits), out.topk_index, 3, 4, mask)
    torch.testing.assert_close(out.losses["seq_aux_loss"], want)
    with pytest.raises(ValueError, match="must divide"):
        r(x, seq_len=5)


# --------------------------------------------------------------------------- bfloat16


def _routers() -> list[torch.nn.Module]:
    return [
        TopKRouter(8, 8, 2),
        SwitchRouter(8, 8, 1.0, "drop"),
        SwitchRouter(8, 8, 1.0, "next"),
        ExpertChoiceRouter(8, 8, 1.0),
        NoisyTopKRouter(8, 8, 2).eval(),
        GroupLimitedRouter(8, 8, 2, n_group=4, topk_group=2),
    ]


@pytest.mark.parametrize("i", range(6))
@pytest.mark.parametrize("cast_module", [False, True])
def test_bfloat16_input(i: int, cast_module: bool) -> None:
    torch.manual_seed(50 + i)
    r = _routers()[i]
    x = torch.randn(32, 8).bfloat16()
    mask = torch.rand(32) > 0.2
    ref_out: RouterOutput = r(x.float(), mask)  # same routing from the same values in fp32
    if cast_module:
        r = r.to(torch.bfloat16)
    out: RouterOutput = r(x, mask)
    assert out.topk_weight.dtype == torch.bfloat16
    assert out.logits.dtype == torch.float32 and out.probs.dtype == torch.float32
    assert torch.isfinite(out.topk_weight.float()).all()
    if not cast_module:
        # The router runs in float32 on the bf16 values: identical decisions.
        assert torch.equal(out.topk_index, ref_out.topk_index)
        torch.testing.assert_close(out.topk_weight, ref_out.topk_weight.bfloat16())
        if ref_out.dropped is not None:
            assert out.dropped is not None and torch.equal(out.dropped, ref_out.dropped)
    for v in out.losses.values():
        assert torch.isfinite(v)


# --------------------------------------------------------------------------- top-k family properties


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 30),
    n_group=st.integers(1, 4),
    per_group=st.integers(1, 4),
    data=st.data(),
    n_pad=st.integers(0, 8),
    seed=st.integers(0, 2**16),
)
def test_topk_family_properties(
    t: int, n_group: int, per_group: int, data: st.DataObject, n_pad: int, seed: int
) -> None:
    e = n_group * per_group
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * per_group))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(t, 6, generator=gen)
    mask = rand_mask(t, min(n_pad, t), gen)
    t_valid = int(mask.sum())
    noisy = NoisyTopKRouter(6, e, k).train()
    group = GroupLimitedRouter(6, e, k, n_group, topk_group, routed_scaling_factor=1.5)
    with torch.no_grad():
        group.e_score_correction_bias.normal_(0, 0.3, generator=gen)
    for r in (TopKRouter(6, e, k), noisy, group):
        out = r(x, mask)
        idx = out.topk_index
        assert idx.shape == (t, k)
        # K distinct experts per token; counts sum to T_valid * K (nothing dropped).
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
        assert expert_counts(idx, e, mask).sum().item() == t_valid * k
        assert torch.isfinite(out.topk_weight).all()
        assert all(torch.isfinite(v) for v in out.losses.values())
        target = 1.5 if r is group else 1.0
        torch.testing.assert_close(out.topk_weight.sum(-1), torch.full((t,), target))
    # Group limit: every token's experts lie in at most topk_group groups.
    groups_used = torch.zeros(t, n_group, dtype=torch.bool)
    groups_used.scatter_(1, group(x, mask).topk_index // per_group, True)
    assert (groups_used.sum(-1) <= topk_group).all()


@pytest.mark.parametrize("i", range(6))
def test_empty_batch_gives_empty_routing_and_zero_losses(i: int) -> None:
    r = _routers()[i]
    out = r(torch.randn(0, 8), torch.zeros(0, dtype=torch.bool))
    assert out.topk_index.shape[0] == 0 and out.topk_weight.shape[0] == 0
    for name, v in out.losses.items():
        assert v.item() == 0.0, name
