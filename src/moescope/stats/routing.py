"""Token-level routing metrics the MoE papers publish: pure numpy on a recorded
:class:`~moescope.stats.token_recorder.TokenRouting` (duck-typed: ``layers``,
``num_experts`` {layer: E}, ``token_ids`` [N], ``seq_id`` [N], ``position`` [N], ``topk``
{layer: [N, K] int}, ``dropped`` {layer: [N, K] bool}).

- Per-domain routing (Mixtral, Jiang et al. 2024, Fig. 7): :func:`expert_counts`,
  :func:`expert_distribution` ``{layer: [E]}``, :func:`js_divergence` (nats, <= ln 2),
  :func:`domain_divergence` (pairwise JS per layer, mean and max over pairs).
- Consecutive tokens (Mixtral Table 5): :func:`same_expert_rate` against chance.
- Router agreement between checkpoints (OLMoE, router saturation): :func:`router_agreement`,
  :func:`agreement_chance`.
- Expert specialisation: :func:`expert_top_tokens`; a readable passage:
  :func:`token_passage`.

No plotting and no HTML here: :mod:`moescope.report.routing_analysis` draws these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from moescope.stats.token_recorder import TokenRouting

__all__ = [
    "DomainDivergence",
    "SameExpertRate",
    "TopToken",
    "agreement_chance",
    "domain_divergence",
    "expert_counts",
    "expert_distribution",
    "expert_top_tokens",
    "js_divergence",
    "passage_end",
    "router_agreement",
    "same_expert_rate",
    "token_passage",
]

Decoder = Callable[[int], str]


# ---------------------------------------------------------------------------- distributions


def _num_experts(tr: TokenRouting, layer: str, num_experts: int | None) -> int:
    e = tr.num_experts.get(layer) if num_experts is None else int(num_experts)
    if e is None or e < 1:
        raise ValueError(f"{layer}: unknown number of experts; pass num_experts")
    return int(e)


def _kept(tr: TokenRouting, layer: str, e: int) -> np.ndarray:
    """[N, K] bool: slots that reached a routed expert (in range, not dropped)."""
    idx = tr.topk[layer]
    keep = (idx >= 0) & (idx < e)
    d = tr.dropped.get(layer)
    if d is not None:
        keep &= ~d
    return keep


def expert_counts(
    tr: TokenRouting, num_experts: int | Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """``{layer: [E] int64}`` kept assignments per expert (see :func:`expert_distribution`)."""
    out: dict[str, np.ndarray] = {}
    for layer in tr.layers:
        n = num_experts.get(layer) if isinstance(num_experts, Mapping) else num_experts
        e = _num_experts(tr, layer, n)
        idx = tr.topk[layer]
        out[layer] = np.bincount(idx[_kept(tr, layer, e)], minlength=e).astype(np.int64)
    return out


def expert_distribution(
    tr: TokenRouting, num_experts: int | Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """``{layer: [E] float64}`` fraction of assignments per expert (sums to 1).

    Counts every kept (token, slot) assignment of the recorded valid tokens: all K slots,
    slots dropped by a capacity limit and identity/zero experts (ids >= E) excluded;
    equal to ``MoEMonitor``'s ``usage_fraction`` on the same data. A layer without any
    assignment gives NaNs. ``num_experts`` defaults to the recorded E of each layer.
    (Mixtral, Jiang et al. 2024, Fig. 7: proportion of tokens assigned to each expert.)
    """
    out: dict[str, np.ndarray] = {}
    for layer, c in expert_counts(tr, num_experts).items():
        total = c.sum()
        out[layer] = c / total if total > 0 else np.full(c.shape, np.nan)
    return out


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions [E], in nats (0 <= JS <= ln 2).

    JS = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2 and 0 log 0 = 0. Inputs
    are normalised to sum 1 first; a NaN or all-zero input gives NaN.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"distributions must be 1-D of equal length, got {p.shape} and {q.shape}")
    sp, sq = p.sum(), q.sum()
    if not (np.isfinite(sp) and np.isfinite(sq)) or sp <= 0 or sq <= 0:
        return float("nan")
    p, q = p / sp, q / sq
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


@dataclass
class DomainDivergence:
    """Pairwise Jensen-Shannon divergence between domains, per layer (nats).

    - ``domains``: D domain names (row / column order of the matrices).
    - ``layers``: the layers present in every domain, in model order.
    - ``matrix``: ``{layer: [D, D] float64}`` symmetric, zero diagonal, <= ln 2.
    - ``mean`` / ``max``: ``{layer: float}`` mean / max over the D (D - 1) / 2 pairs
      (NaN with a single domain).
    """

    domains: list[str]
    layers: list[str]
    matrix: dict[str, np.ndarray]
    mean: dict[str, float]
    max: dict[str, float]

    def pair(self, a: str, b: str) -> dict[str, float]:
        """``{layer: JS(a, b)}``."""
        i, j = self.domains.index(a), self.domains.index(b)
        return {layer: float(m[i, j]) for layer, m in self.matrix.items()}


def domain_divergence(dists: Mapping[str, Mapping[str, np.ndarray]]) -> DomainDivergence:
    """Per layer, the Jensen-Shannon divergence (nats) between every pair of domains.

    Args:
        dists: ``{domain: {layer: [E] distribution}}`` (e.g. :func:`expert_distribution`
            of each domain's :class:`TokenRouting`).

    Raises:
        ValueError: no domain, no layer common to every domain, or E differing between
            domains for a layer.
    """
    domains = list(dists)
    if not domains:
        raise ValueError("domain_divergence needs at least one domain")
    first = list(dists[domains[0]])
    layers = [layer for layer in first if all(layer in dists[d] for d in domains)]
    if not layers:
        raise ValueError(
            "the domains share no layer; record every domain with the same model "
            f"(layers per domain: { {d: list(v) for d, v in dists.items()} })"
        )
    nd = len(domains)
    matrix: dict[str, np.ndarray] = {}
    mean: dict[str, float] = {}
    mx: dict[str, float] = {}
    iu = np.triu_indices(nd, 1)
    for layer in layers:
        ps = [np.asarray(dists[d][layer], dtype=np.float64) for d in domains]
        if len({p.shape for p in ps}) != 1:
            raise ValueError(
                f"{layer}: expert counts differ between domains "
                f"({ {d: p.shape[0] for d, p in zip(domains, ps, strict=True)} })"
            )
        m = np.zeros((nd, nd))
        for i in range(nd):
            for j in range(i + 1, nd):
                m[i, j] = m[j, i] = js_divergence(ps[i], ps[j])
        matrix[layer] = m
        vals = m[iu]
        mean[layer] = float(vals.mean()) if vals.size else float("nan")
        mx[layer] = float(vals.max()) if vals.size else float("nan")
    return DomainDivergence(domains, layers, matrix, mean, mx)


# ---------------------------------------------------------------------------- consecutive tokens


@dataclass(frozen=True)
class SameExpertRate:
    """How often consecutive tokens share an expert at one layer (Mixtral Table 5).

    - ``rate``: fraction of consecutive pairs (t, t + 1) of a sequence that share the
      first-choice expert (``mode="top1"``) or any expert of their top-k sets
      (``mode="topk"``).
    - ``chance``: the same for two tokens drawn independently (with replacement) from
      the recorded tokens: ``sum_e p_e^2`` of the top-1 marginal p for ``top1``;
      ``P(S ∩ S' != ∅)`` over independent pairs of recorded top-k sets for ``topk``.
    - ``uniform``: the same for a uniform random router, ``1 / E`` or
      ``1 - C(E - K, K) / C(E, K)`` (Mixtral's 12.5 % and 46 % for E = 8, K = 2).
    - ``pairs``: consecutive pairs counted; ``mode``.
    """

    rate: float
    chance: float
    uniform: float
    pairs: int
    mode: str


# Beyond this many distinct top-k sets the set-overlap chance is a Monte-Carlo estimate
# over _MC_PAIRS random pairs (standard error <= 0.5 / sqrt(_MC_PAIRS) ~ 8e-4).
_EXACT_SETS = 4096
_MC_PAIRS = 400_000


def _bitmasks(idx: np.ndarray) -> np.ndarray:
    """[N, W] uint64: row i's ids (>= 0) as a bit set over W = ceil((max id + 1) / 64)."""
    n, k = idx.shape
    words = int(idx.max()) // 64 + 1 if idx.size else 1
    out = np.zeros((n, words), dtype=np.uint64)
    bits = np.left_shift(np.uint64(1), (idx % 64).astype(np.uint64))
    rows = np.repeat(np.arange(n), k)
    np.bitwise_or.at(out, (rows, (idx // 64).reshape(-1)), bits.reshape(-1))
    return out


def _set_overlap_chance(idx: np.ndarray, seed: int = 0) -> float:
    """P(two independently drawn rows of ``idx`` [N, K] (ids >= 0) share an id), exact
    over distinct sets up to ``_EXACT_SETS`` of them, else Monte Carlo (fixed seed)."""
    n = idx.shape[0]
    if n == 0:
        return float("nan")
    masks = _bitmasks(idx)
    sets, counts = np.unique(masks, axis=0, return_counts=True)
    if sets.shape[0] <= _EXACT_SETS:
        w = counts.astype(np.float64)
        total = 0.0
        for lo in range(0, sets.shape[0], 256):
            blk = sets[lo : lo + 256]
            hit = ((blk[:, None, :] & sets[None, :, :]) != 0).any(axis=2)  # [c, U]
            total += float(w[lo : lo + 256] @ hit.astype(np.float64) @ w)
        return total / float(n) ** 2
    rng = np.random.default_rng(seed)
    a = masks[rng.integers(0, n, _MC_PAIRS)]
    b = masks[rng.integers(0, n, _MC_PAIRS)]
    return float(((a & b) != 0).any(axis=1).mean())


def _consecutive_pairs(tr: TokenRouting) -> np.ndarray:
    """Indices i such that tokens i and i + 1 are consecutive positions of one sequence."""
    if tr.num_tokens < 2:
        return np.zeros(0, dtype=np.int64)
    same = (tr.seq_id[1:] == tr.seq_id[:-1]) & (tr.position[1:] == tr.position[:-1] + 1)
    return np.flatnonzero(same)


def same_expert_rate(
    tr: TokenRouting, layer: str, mode: Literal["top1", "topk"] = "top1"
) -> SameExpertRate:
    """Rate at which consecutive tokens keep the same expert at ``layer``, with chance.

    Follows Mixtral (Jiang et al. 2024, §5, Table 5): "first choice" = ``top1``, "first or
    second choice" = ``topk`` (the two tokens' top-k sets intersect). Pairs are
    consecutive positions within one recorded sequence; routing choices are the router's
    (slots dropped by capacity still count as chosen). See :class:`SameExpertRate`.
    """
    tr.check_layer(layer)
    if mode not in ("top1", "topk"):
        raise ValueError(f"mode must be 'top1' or 'topk', got {mode!r}")
    idx = tr.topk[layer]
    e = tr.num_experts.get(layer, int(idx.max()) + 1 if idx.size else 1)
    k = idx.shape[1]
    ran = np.all(idx >= 0, axis=1)  # [N] rows where the layer ran
    i = _consecutive_pairs(tr)
    i = i[ran[i] & ran[i + 1]]
    if mode == "top1":
        t1 = idx[:, 0]
        rate = float((t1[i] == t1[i + 1]).mean()) if i.size else float("nan")
        vals = t1[ran]
        if vals.size:
            p = np.bincount(vals).astype(np.float64) / vals.size
            chance = float(np.sum(p * p))
        else:
            chance = float("nan")
        uniform = 1.0 / e
    else:
        a, b = idx[i], idx[i + 1]
        share = (a[:, :, None] == b[:, None, :]).any(axis=(1, 2))
        rate = float(share.mean()) if i.size else float("nan")
        chance = _set_overlap_chance(idx[ran])
        uniform = 1.0 - math.comb(e - k, k) / math.comb(e, k) if k <= e else 1.0
    return SameExpertRate(rate=rate, chance=chance, uniform=uniform, pairs=int(i.size), mode=mode)


# ---------------------------------------------------------------------------- agreement


def agreement_chance(top_k: int, num_experts: int) -> float:
    """Expected :func:`router_agreement` of two independent uniform random routers: K / E."""
    return top_k / num_experts


def router_agreement(a: TokenRouting, b: TokenRouting, *, top1: bool = False) -> dict[str, float]:
    """Per layer, mean over tokens of ``|topk_a ∩ topk_b| / K``: how many of checkpoint
    a's chosen experts checkpoint b also chooses for the same token (OLMoE, Muennighoff
    et al. 2024, router saturation; 1 = identical routing, K / E = independent random).

    ``top1=True`` instead gives the fraction of tokens with the same first choice.
    Tokens where either layer did not run are skipped.

    Raises:
        ValueError: the two recordings are not of the same tokens (record both
            checkpoints on the same batches, in the same order, with the same
            ``max_tokens``), no layer in common, or K differing for a layer.
    """
    if a.num_tokens != b.num_tokens or not np.array_equal(a.token_ids, b.token_ids):
        raise ValueError(
            f"the two recordings are not of the same tokens ({a.num_tokens} vs {b.num_tokens} "
            "tokens, or different token ids); record both checkpoints on the same batches in "
            "the same order with the same max_tokens (and the same tokenizer)"
        )
    layers = [layer for layer in a.layers if layer in b.topk]
    if not layers:
        raise ValueError(
            f"the two recordings share no MoE layer (a: {a.layers}, b: {b.layers}); compare "
            "checkpoints of the same architecture"
        )
    out: dict[str, float] = {}
    for layer in layers:
        ia, ib = a.topk[layer], b.topk[layer]
        if ia.shape[1] != ib.shape[1]:
            raise ValueError(f"{layer}: K differs ({ia.shape[1]} vs {ib.shape[1]})")
        ok = (ia >= 0).all(axis=1) & (ib >= 0).all(axis=1)
        ia, ib = ia[ok], ib[ok]
        if ia.shape[0] == 0:
            out[layer] = float("nan")
        elif top1:
            out[layer] = float((ia[:, 0] == ib[:, 0]).mean())
        else:
            hit = (ia[:, :, None] == ib[:, None, :]).any(axis=2)  # [N, K]: a's slot in b's set
            out[layer] = float(hit.sum(axis=1).mean() / ia.shape[1])
    return out


# ---------------------------------------------------------------------------- specialisation


@dataclass(frozen=True)
class TopToken:
    """One of an expert's most frequent tokens: ``token`` (decoded string), ``count``
    (assignments of this token to the expert), ``token_id``, ``share`` (count / all
    recorded occurrences of the token: how specific the expert is to it)."""

    token: str
    count: int
    token_id: int
    share: float


def expert_top_tokens(
    tr: TokenRouting,
    layer: str,
    num_experts: int | None = None,
    top_n: int = 10,
    decode: Decoder | None = None,
) -> dict[int, list[TopToken]]:
    """``{expert: [TopToken, ...]}`` the ``top_n`` token ids each expert receives most
    often at ``layer`` (kept assignments, any slot), most frequent first; ties broken by
    smaller token id. Every expert 0..E-1 is a key (an unused one maps to []).

    ``decode``: token id -> string (:func:`make_decoder`, :func:`decode_bytes`); default
    ``str(id)``.

    Raises:
        ValueError: the recording has no token ids (the model was fed ``inputs_embeds``).
    """
    tr.check_layer(layer)
    e = _num_experts(tr, layer, num_experts)
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    tok = tr.token_ids
    if tok.size and tok.min() < 0:
        raise ValueError(
            "the recording has no token ids (the forward got no input_ids); call "
            "RoutingRecorder.begin_batch(input_ids, attention_mask) before each forward"
        )
    idx = tr.topk[layer]
    keep = _kept(tr, layer, e)
    experts = idx[keep].astype(np.int64)
    tokens = np.broadcast_to(tok[:, None], idx.shape)[keep]
    vocab = int(tok.max()) + 1 if tok.size else 1
    keys, counts = np.unique(experts * vocab + tokens, return_counts=True)
    occ = np.bincount(tok, minlength=vocab)
    ke, kt = np.divmod(keys, vocab)
    # Sort by expert, then count descending, then token id.
    order = np.lexsort((kt, -counts, ke))
    ke, kt, counts = ke[order], kt[order], counts[order]
    starts = np.searchsorted(ke, np.arange(e + 1))
    dec = decode if decode is not None else str
    out: dict[int, list[TopToken]] = {}
    for ex in range(e):
        lo, hi = starts[ex], min(starts[ex + 1], starts[ex] + top_n)
        out[ex] = [
            TopToken(dec(int(t)), int(c), int(t), float(c) / float(occ[t]))
            for t, c in zip(kt[lo:hi], counts[lo:hi], strict=True)
        ]
    return out


def token_passage(
    tr: TokenRouting,
    layer: str,
    *,
    sequence: int = 0,
    max_tokens: int = 600,
    decode: Decoder | None = None,
    whole_lines: bool = True,
) -> tuple[list[str], list[int]]:
    """``(token strings, top-1 experts)`` of a readable passage at ``layer``.

    The passage starts at the ``sequence``-th recorded sequence (recording order) and
    runs on through the following recorded tokens (rows of a stream are consecutive
    text), at most ``max_tokens`` tokens. ``whole_lines``: it ends after the last token
    holding a newline (else after the last token holding a space) so no line or word is
    cut; a passage that does not start at the beginning of the recording starts after
    its first newline.
    """
    tr.check_layer(layer)
    seqs = tr.sequences()
    if not 0 <= sequence < seqs.size:
        raise ValueError(f"sequence must be in [0, {seqs.size}), got {sequence}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    start = int(np.flatnonzero(tr.seq_id == seqs[sequence])[0])
    rows = np.arange(start, min(start + max_tokens, tr.num_tokens))
    dec = decode if decode is not None else str
    words = [dec(int(t)) for t in tr.token_ids[rows]]
    experts = [int(x) for x in tr.top1(layer)[rows]]
    if whole_lines and words:
        lo = 0
        if start > 0:
            lo = next((i + 1 for i, w in enumerate(words) if "\n" in w), 0)
        hi = passage_end(words[lo:]) + lo
        words, experts = words[lo:hi], experts[lo:hi]
    return words, experts


def passage_end(words: list[str]) -> int:
    """How many leading ``words`` (decoded tokens) to keep so the text ends at a line
    end: after the last token holding a newline, else the last holding a space, else
    all of them."""
    for mark in ("\n", " "):
        for i in range(len(words) - 1, -1, -1):
            if mark in words[i]:
                # A token "x\n  y" ends its line inside; keep it whole (only rare BPE merges).
                return i + 1
    return len(words)
