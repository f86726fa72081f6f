"""Token-level routing metrics (moescope.stats.routing): per-domain distributions and
Jensen-Shannon divergence, consecutive-token expert repetition, router agreement, expert
top tokens and the readable passage, each against an independent plain recomputation
(float64 loops, collections.Counter, scipy, the monitor's own counts)."""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import padded_batch, routed_tiny_lm
from moescope import MoEMonitor
from moescope.analysis.decode import decode_bytes
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.stats import routing as RA
from moescope.stats.routing import (
    domain_divergence,
    expert_distribution,
    expert_top_tokens,
    router_agreement,
    same_expert_rate,
)
from moescope.stats.token_recorder import RoutingRecorder, TokenRouting, record_routing

E, K = 8, 2


# ---------------------------------------------------------------------------- distributions


def test_expert_distribution_equals_monitor_usage_fraction() -> None:
    model = routed_tiny_lm()
    mon = MoEMonitor(model)
    rec = RoutingRecorder(model)
    with rec, torch.no_grad():
        for seed in range(3):
            model(*padded_batch(seed))
    snap = mon.snapshot()
    mon.detach()
    dist = expert_distribution(rec.result())
    assert list(dist) == list(snap.layers)
    for path, frac in dist.items():
        np.testing.assert_allclose(frac, snap.layers[path].usage_fraction, rtol=0, atol=1e-12)
        assert abs(frac.sum() - 1.0) < 1e-12


@pytest.mark.parametrize(
    ("router", "kwargs"), [("switch", {"capacity_factor": 0.5}), ("expert_choice", {})]
)
def test_dropped_slots_excluded_like_the_monitor(router: str, kwargs: dict) -> None:
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        num_experts=E,
        top_k=K,
        router=router,
        router_kwargs=kwargs,
    )
    torch.manual_seed(0)
    model = TinyMoELM(cfg).eval()
    mon = MoEMonitor(model)
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(*padded_batch(0))
        model(*padded_batch(1))
    snap = mon.snapshot()
    mon.detach()
    tr = rec.result()
    for path, frac in expert_distribution(tr).items():
        assert tr.dropped[path].any()  # the capacity limit dropped slots
        np.testing.assert_allclose(frac, snap.layers[path].usage_fraction, rtol=0, atol=1e-12)
        counts = RA.expert_counts(tr)[path]
        np.testing.assert_array_equal(counts, snap.layers[path].usage_counts)


def _js_ref(p: np.ndarray, q: np.ndarray) -> float:
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    total = 0.0
    for a in (p, q):
        for i in range(len(p)):
            m = (p[i] + q[i]) / 2
            if a[i] > 0:
                total += 0.5 * a[i] * math.log(a[i] / m)
    return total


def test_domain_divergence_against_float64_loop() -> None:
    model = routed_tiny_lm()
    rec = RoutingRecorder(model)
    with rec, torch.no_grad():
        for name, lo, hi in (("code", 0, 16), ("prose", 24, 40), ("other", 48, 64)):
            with rec.source(name):
                for seed in range(2):
                    model(*padded_batch(seed, lo=lo, hi=hi))
    dists = {d: expert_distribution(tr) for d, tr in rec.results().items()}
    dists["code again"] = dists["code"]
    div = domain_divergence(dists)
    assert div.domains == ["code", "prose", "other", "code again"]
    for layer in div.layers:
        m = div.matrix[layer]
        for i, a in enumerate(div.domains):
            for j, b in enumerate(div.domains):
                assert m[i, j] == pytest.approx(
                    _js_ref(dists[a][layer], dists[b][layer]), abs=1e-12
                )
        np.testing.assert_array_equal(m, m.T)
        assert m[0, 3] == 0.0 and np.all(np.diag(m) == 0) and m.max() <= math.log(2)
        assert m[0, 1] > 0
        iu = np.triu_indices(4, 1)
        assert div.mean[layer] == pytest.approx(m[iu].mean()) and div.max[layer] == m[iu].max()
    # Disjoint supports reach the bound ln 2.
    assert RA.js_divergence(np.array([1.0, 0, 0]), np.array([0, 0.5, 0.5])) == pytest.approx(
        math.log(2), abs=1e-15
    )


# ---------------------------------------------------------------------------- consecutive


def _recorded(seed_count: int = 3) -> TokenRouting:
    model = routed_tiny_lm()
    return record_routing(model, [padded_batch(s) for s in range(seed_count)])


def test_same_expert_rate_against_plain_loops() -> None:
    tr = _recorded()
    n = tr.num_tokens
    for layer in tr.layers:
        idx = tr.topk[layer].tolist()
        pairs = [
            (i, i + 1)
            for i in range(n - 1)
            if tr.seq_id[i] == tr.seq_id[i + 1] and tr.position[i + 1] == tr.position[i] + 1
        ]
        # 6 sequences of lengths 12, 9, 8 per batch x 3 batches.
        assert len(pairs) == 3 * (11 + 8 + 7)
        r1 = same_expert_rate(tr, layer)
        assert r1.pairs == len(pairs)
        assert r1.rate == pytest.approx(sum(idx[i][0] == idx[j][0] for i, j in pairs) / len(pairs))
        chance1 = sum(idx[i][0] == idx[j][0] for i in range(n) for j in range(n)) / n**2
        assert r1.chance == pytest.approx(chance1, abs=1e-12) and r1.uniform == 1 / E
        rk = same_expert_rate(tr, layer, mode="topk")
        assert rk.rate == pytest.approx(
            sum(bool(set(idx[i]) & set(idx[j])) for i, j in pairs) / len(pairs)
        )
        chancek = sum(bool(set(idx[i]) & set(idx[j])) for i in range(n) for j in range(n)) / n**2
        assert rk.chance == pytest.approx(chancek, abs=1e-12)
        assert rk.uniform == pytest.approx(1 - 15 / 28)  # Mixtral's 46 % for E = 8, K = 2


def test_set_overlap_chance_exact_multiword_and_monte_carlo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 160 ids: the bit sets span 3 uint64 words; a few hot ids make overlaps frequent.
    rng = np.random.default_rng(1)
    p = np.r_[[0.2, 0.1], np.full(157, 0.6 / 157), [0.1]]
    idx = np.stack([rng.choice(160, 3, replace=False, p=p) for _ in range(150)])
    n = len(idx)
    rows = [set(r) for r in idx.tolist()]
    loop = sum(bool(a & b) for a in rows for b in rows) / n**2
    exact = RA._set_overlap_chance(idx)
    assert exact == pytest.approx(loop, abs=1e-12)
    monkeypatch.setattr(RA, "_EXACT_SETS", 1)
    assert RA._set_overlap_chance(idx) == pytest.approx(exact, abs=5e-3)


# ---------------------------------------------------------------------------- agreement


def test_router_agreement_same_perturbed_and_loop() -> None:
    batches = [padded_batch(s) for s in range(2)]
    model = routed_tiny_lm()
    a = record_routing(model, batches)
    same = router_agreement(a, record_routing(model, batches))
    assert same == dict.fromkeys(a.layers, 1.0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        w = other.model.layers[1].mlp.router.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std())
    b = record_routing(other, batches)
    agree = router_agreement(a, b)
    top1 = router_agreement(a, b, top1=True)
    assert agree["model.layers.0.mlp"] == 1.0  # upstream of the perturbed router
    assert agree["model.layers.1.mlp"] < 1.0
    for layer in a.layers:
        ia, ib = a.topk[layer].tolist(), b.topk[layer].tolist()
        ref = sum(len(set(x) & set(y)) / K for x, y in zip(ia, ib, strict=True)) / len(ia)
        assert agree[layer] == pytest.approx(ref, abs=1e-12)
        ref1 = sum(x[0] == y[0] for x, y in zip(ia, ib, strict=True)) / len(ia)
        assert top1[layer] == pytest.approx(ref1, abs=1e-12)
    with pytest.raises(ValueError, match="same tokens"):
        router_agreement(a, record_routing(model, batches[:1]))
    assert RA.agreement_chance(K, E) == 0.25


# ---------------------------------------------------------------------------- specialisation


def test_expert_top_tokens_against_counter() -> None:
    tr = _recorded()
    for layer in tr.layers:
        tops = expert_top_tokens(tr, layer, top_n=4, decode=decode_bytes)
        assert sorted(tops) == list(range(E))
        occ = Counter(tr.token_ids.tolist())
        for e in range(E):
            c = Counter(
                t
                for t, row in zip(tr.token_ids.tolist(), tr.topk[layer].tolist(), strict=True)
                if e in row
            )
            want = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
            assert [(t.token_id, t.count) for t in tops[e]] == want
            assert [t.token for t in tops[e]] == [decode_bytes(t) for t, _ in want]
            assert [t.share for t in tops[e]] == [n / occ[t] for t, n in want]
    no_ids = copy.copy(tr)
    no_ids.token_ids = np.full_like(tr.token_ids, -1)
    with pytest.raises(ValueError, match="no token ids"):
        expert_top_tokens(no_ids, tr.layers[0])


# ---------------------------------------------------------------------------- passage


def _routing(texts: list[str]) -> TokenRouting:
    """A byte-level recording of consecutive rows of ``"".join(texts)`` (one per row)."""
    ids, seq, pos = [], [], []
    for r, t in enumerate(texts):
        b = list(t.encode())
        ids += b
        seq += [r] * len(b)
        pos += list(range(len(b)))
    n = len(ids)
    top = np.stack([np.arange(n) % 4, (np.arange(n) + 1) % 4], axis=1)
    return TokenRouting(
        layers=["l0"],
        num_experts={"l0": 4},
        token_ids=np.array(ids),
        seq_id=np.array(seq),
        position=np.array(pos),
        topk={"l0": top},
        dropped={},
        truncated=False,
    )


def test_token_passage_runs_across_rows_and_ends_at_a_line_end() -> None:
    text = "def f(x):\n    return x + 1\n\nclass Thing:\n    pass\n"
    tr = _routing([text[:13], text[13:30], text[30:]])  # rows cut mid-word
    words, experts = RA.token_passage(tr, "l0", max_tokens=40, decode=decode_bytes)
    got = "".join(words)
    # The first 40 bytes end inside "class Thing:"; the passage stops at the line before.
    assert got == text[: text.rindex("\n", 0, 40) + 1] == "def f(x):\n    return x + 1\n\n"
    assert experts == [i % 4 for i in range(len(got))]
    whole, _ = RA.token_passage(tr, "l0", max_tokens=1000, decode=decode_bytes)
    assert "".join(whole) == text
    # Not at the start of the recording: begins after its first newline.
    later, _ = RA.token_passage(tr, "l0", sequence=1, max_tokens=1000, decode=decode_bytes)
    assert "".join(later) == text[text.index("\n", 13) + 1 :]
    # No newline at all: cut after the last space, never inside a word.
    assert RA.passage_end(["ab", " cd", " ef", "gh"]) == 3
    assert RA.passage_end(["abc", "def"]) == 2
    raw, _ = RA.token_passage(tr, "l0", max_tokens=40, decode=decode_bytes, whole_lines=False)
    assert "".join(raw) == text[:40]


def test_js_divergence_equals_scipy() -> None:
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    for _ in range(20):
        p, q = rng.dirichlet(np.ones(16) * 0.3), rng.dirichlet(np.ones(16) * 0.3)
        p[rng.integers(0, 16)] = 0.0  # zeros: 0 log 0 = 0
        # scipy returns the square root of the divergence (natural log by default).
        assert RA.js_divergence(p, q) == pytest.approx(jensenshannon(p, q) ** 2, abs=1e-12)
