"""Routing agreement between two traces of the same tokens: every number of ``moescope agree``.

Pure functions over numpy arrays (no torch, no file): :func:`align_traces` pairs two
:class:`~moescope.trace.RoutingTrace` objects sequence by sequence (by ``seq_id``, then
checks that the token ids are equal: a trace off by one token is refused, never measured),
and :func:`measure_agreement` computes, per MoE layer (matched by ordinal), over the tokens
both sides routed:

- ``exact``: fraction of tokens whose top-k *set* is the same on both sides;
- ``jaccard``: mean |A ∩ B| / |A ∪ B| of the two sets;
- ``top1``: fraction of tokens with the same first choice (the slot of largest combine
  weight where a side has weights, else slot 0: the order of selection);
- ``weighted_overlap`` (where weights exist): with both sides' weights, each renormalised
  to sum 1 over the token's slots, ``sum_e min(wA_e, wB_e)`` (1 = same experts with the
  same mixing, 0 = disjoint); with one side's weights only, the share of that side's
  weight mass on experts the other side also chose (``weights_kind`` says which);
- by position in the sequence: ``exact`` and ``jaccard`` in buckets 0, 1, 2-3, 4-7, ...;
- per expert: how often a side chose it and the other did not (``lost``: A chose it, B did
  not; ``gained``: B chose it, A did not) and ``flip_rate`` = (lost + gained) / (times A
  chose it + times B chose it);
- the token ids and token positions that disagree most (over all layers).

Chance levels for independent uniform routing (``chance``): exact 1 / C(E, K), top-1
1 / E, Jaccard E[i / (2K - i)] with i hypergeometric(E, K, K). Everything is vectorised
over layers x tokens x slots (the [L, T, K, K] slot comparison; K is small).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope._json import json_safe
from moescope.analysis.errors import AnalyzeError
from moescope.trace import RoutingTrace, TraceSequence

__all__ = [
    "AgreementResult",
    "AlignedTraces",
    "LayerAgreement",
    "TraceAlignmentError",
    "align_traces",
    "chance_levels",
    "measure_agreement",
    "position_buckets",
    "set_agreement",
]

#: Tokens per slot comparison in :func:`measure_agreement` (bounds its memory).
CHUNK_TOKENS = 1 << 18

#: Verdict bands of the mean exact top-k set match (healthy / warning / critical).
IDENTICAL = 0.999
CLOSE = 0.99
ACCEPTABLE = 0.9


class TraceAlignmentError(AnalyzeError):
    """The two traces are not of the same token sequences (or shapes); one line says
    where they differ and what to do."""


@dataclass
class AlignedTraces:
    """Two traces' common sequences, concatenated in A's order.

    T tokens, L layers, K slots: ``ids_a`` / ``ids_b`` int32 [L, T, K]; ``w_a`` / ``w_b``
    float32 [L, T, K] or None (None unless every aligned sequence of that side has
    weights); ``token_ids``, ``seq_index`` (into ``seq_ids``), ``position`` [T].
    """

    seq_ids: list[str]
    token_ids: np.ndarray
    seq_index: np.ndarray
    position: np.ndarray
    ids_a: np.ndarray
    ids_b: np.ndarray
    w_a: np.ndarray | None
    w_b: np.ndarray | None
    layers_a: list[str]
    layers_b: list[str]
    num_experts: int
    top_k: int
    only_a: int = 0
    only_b: int = 0
    trimmed: int = 0


def _first_diff(x: np.ndarray, y: np.ndarray) -> int:
    n = min(x.shape[0], y.shape[0])
    d = np.flatnonzero(x[:n] != y[:n])
    return int(d[0]) if d.size else n


def _shift_hint(x: np.ndarray, y: np.ndarray) -> str:
    for s in (1, 2):
        if x.shape[0] > s and y.shape[0] > s:
            if np.array_equal(x[s:], y[: x.shape[0] - s]) or np.array_equal(
                y[s:], x[: y.shape[0] - s]
            ):
                return f"; B looks shifted by {s} token{'s' if s > 1 else ''} against A"
    return ""


def align_traces(a: RoutingTrace, b: RoutingTrace, *, prefix: bool = False) -> AlignedTraces:
    """Pair the sequences of ``a`` and ``b`` by ``seq_id`` (A's order) and check that
    their token ids are equal.

    ``prefix=True`` also accepts a sequence whose token ids on one side are a prefix of
    the other side's (e.g. a serving engine that never routed the last sampled token):
    the common prefix is compared, ``trimmed`` counts the tokens left out. A shifted or
    otherwise different sequence is refused either way.

    Raises:
        TraceAlignmentError: different numbers of MoE layers, experts or K, no common
            seq_id, or a sequence whose token ids differ (the message names the first
            differing position and spots a shift by one or two tokens).
    """
    if a.num_layers != b.num_layers:
        raise TraceAlignmentError(
            f"A has {a.num_layers} MoE layers, B has {b.num_layers}; layers are matched by "
            "ordinal, so compare traces of the same architecture"
        )
    if a.num_experts != b.num_experts:
        raise TraceAlignmentError(
            f"A routes over {a.num_experts} experts, B over {b.num_experts}; compare traces "
            "of the same model"
        )
    if a.top_k != b.top_k:
        raise TraceAlignmentError(
            f"A has top-{a.top_k} routing, B top-{b.top_k}; compare traces of the same model"
        )
    common = [s for s in a.seq_ids if s in b]
    if not common:
        raise TraceAlignmentError(
            f"A and B share no seq_id (A: {a.seq_ids[:3]}..., B: {b.seq_ids[:3]}...); "
            "record both on the same sequences with the same ids, or replay A's tokens "
            "through B's model (moescope agree TRACE MODEL)"
        )
    tok, ia, ib, wa, wb, lens = [], [], [], [], [], []
    trimmed = 0
    for sid in common:
        sa, sb = a[sid], b[sid]
        n_a, n_b = sa.token_ids.shape[0], sb.token_ids.shape[0]
        n = min(n_a, n_b)
        if prefix and n_a != n_b and np.array_equal(sa.token_ids[:n], sb.token_ids[:n]):
            trimmed += max(n_a, n_b) - n
            sa = TraceSequence(
                sid,
                sa.token_ids[:n],
                sa.topk_ids[:, :n],
                None if sa.topk_weights is None else sa.topk_weights[:, :n],
            )
            sb = TraceSequence(
                sid,
                sb.token_ids[:n],
                sb.topk_ids[:, :n],
                None if sb.topk_weights is None else sb.topk_weights[:, :n],
            )
        if not np.array_equal(sa.token_ids, sb.token_ids):
            p = _first_diff(sa.token_ids, sb.token_ids)
            at = (
                f"first difference at position {p}: A {_tok(sa.token_ids, p)}, "
                f"B {_tok(sb.token_ids, p)}"
            )
            raise TraceAlignmentError(
                f"sequence {sid!r}: token ids differ (A {sa.token_ids.shape[0]} tokens, B "
                f"{sb.token_ids.shape[0]}; {at}){_shift_hint(sa.token_ids, sb.token_ids)}; "
                "both traces must route the same tokens in the same order"
                + ("" if prefix or n_a == n_b else " (--prefix compares a common prefix)")
            )
        tok.append(sa.token_ids)
        ia.append(sa.topk_ids)
        ib.append(sb.topk_ids)
        wa.append(sa.topk_weights)
        wb.append(sb.topk_weights)
        lens.append(sa.token_ids.shape[0])
    n = np.asarray(lens, dtype=np.int64)
    starts = np.repeat(np.cumsum(n) - n, n)
    total = int(n.sum())

    def cat_w(ws: list[np.ndarray | None]) -> np.ndarray | None:
        if any(w is None for w in ws):
            return None
        return np.concatenate([w for w in ws if w is not None], axis=1)

    return AlignedTraces(
        seq_ids=common,
        token_ids=np.concatenate(tok) if total else np.zeros(0, dtype=np.int64),
        seq_index=np.repeat(np.arange(len(common)), n),
        position=np.arange(total, dtype=np.int64) - starts,
        ids_a=np.concatenate(ia, axis=1),
        ids_b=np.concatenate(ib, axis=1),
        w_a=cat_w(wa),
        w_b=cat_w(wb),
        layers_a=list(a.layers),
        layers_b=list(b.layers),
        num_experts=a.num_experts,
        top_k=a.top_k,
        only_a=len(a) - len(common),
        only_b=len(b) - len(common),
        trimmed=trimmed,
    )


def _tok(t: np.ndarray, p: int) -> str:
    return str(int(t[p])) if p < t.shape[0] else "(end)"


# --------------------------------------------------------------------------- metrics


def _first_choice(ids: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    if w is None:
        return ids[..., 0]
    key = np.where(ids >= 0, np.nan_to_num(w, nan=-np.inf), -np.inf)
    return np.take_along_axis(ids, key.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def _normalised(w: np.ndarray, valid: np.ndarray) -> np.ndarray:
    x = np.where(valid, np.abs(np.nan_to_num(w.astype(np.float64))), 0.0)
    s = x.sum(axis=-1, keepdims=True)
    return np.divide(x, s, out=np.zeros_like(x), where=s > 0)


def set_agreement(
    ids_a: np.ndarray,
    ids_b: np.ndarray,
    w_a: np.ndarray | None = None,
    w_b: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-token agreement of two top-k selections (any leading shape [..., K]).

    Returns ``valid`` (both sides routed the token), ``exact``, ``jaccard``, ``top1``
    (bool / float64 [...]), ``hit_a`` / ``hit_b`` ([..., K]: the slot's expert is also in
    the other side's set), and ``weighted`` ([...], NaN without weights; see the module
    doc for the one-sided case). Slots with id -1 are absent; an id repeated within one
    token's slots is counted once.
    """
    va, vb = ids_a >= 0, ids_b >= 0
    eq = (ids_a[..., :, None] == ids_b[..., None, :]) & va[..., :, None] & vb[..., None, :]
    hit_a, hit_b = eq.any(axis=-1), eq.any(axis=-2)
    inter = hit_a.sum(axis=-1)
    na, nb = va.sum(axis=-1), vb.sum(axis=-1)
    valid = (na > 0) & (nb > 0)
    union = na + nb - inter
    jacc = np.divide(inter, union, out=np.zeros(inter.shape, dtype=np.float64), where=union > 0)
    exact = valid & (inter == na) & (inter == nb)
    top1 = valid & (_first_choice(ids_a, w_a) == _first_choice(ids_b, w_b))
    weighted = np.full(inter.shape, np.nan)
    if w_a is not None and w_b is not None:
        pa, pb = _normalised(w_a, va), _normalised(w_b, vb)
        pb_at_a = (eq * pb[..., None, :]).sum(axis=-1)  # B's weight on A's slot's expert
        weighted = np.minimum(pa, pb_at_a).sum(axis=-1)
    elif w_a is not None:
        weighted = (_normalised(w_a, va) * hit_a).sum(axis=-1)
    elif w_b is not None:
        weighted = (_normalised(w_b, vb) * hit_b).sum(axis=-1)
    return {
        "valid": valid,
        "exact": exact,
        "jaccard": jacc,
        "top1": top1,
        "hit_a": hit_a,
        "hit_b": hit_b,
        "weighted": weighted,
    }


def position_buckets(position: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Bucket index of each position (0, 1, 2-3, 4-7, ...) and the buckets' labels."""
    pos = np.asarray(position, dtype=np.int64)
    idx = np.zeros(pos.shape, dtype=np.int64)
    pos_ok = pos > 0
    idx[pos_ok] = np.floor(np.log2(pos[pos_ok])).astype(np.int64) + 1
    nb = int(idx.max()) + 1 if idx.size else 1
    labels = ["0"]
    for j in range(1, nb):
        lo, hi = 1 << (j - 1), (1 << j) - 1
        labels.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return idx, labels


def chance_levels(num_experts: int, top_k: int) -> dict[str, float]:
    """Agreement of two independent uniform top-k routings: exact, jaccard, top1."""
    e, k = int(num_experts), int(top_k)
    if k > e or e < 1:
        return {"exact": float("nan"), "jaccard": float("nan"), "top1": float("nan")}
    total = math.comb(e, k)
    jac = 0.0
    for i in range(0, k + 1):
        p = math.comb(k, i) * math.comb(e - k, k - i) / total
        jac += p * (i / (2 * k - i))
    return {"exact": 1.0 / total, "jaccard": jac, "top1": 1.0 / e}


@dataclass
class LayerAgreement:
    """Agreement at one MoE layer (ordinal ``index``); rates over ``tokens`` tokens both
    sides routed. ``position_*`` are per bucket of :attr:`AgreementResult.position_labels`
    (NaN where a bucket has no token); ``expert_*`` are [E] (ids >= E not shown)."""

    index: int
    layer_a: str
    layer_b: str
    tokens: int
    exact: float
    jaccard: float
    top1: float
    weighted_overlap: float
    position_tokens: np.ndarray
    position_exact: np.ndarray
    position_jaccard: np.ndarray
    expert_chosen_a: np.ndarray
    expert_chosen_b: np.ndarray
    expert_lost: np.ndarray
    expert_gained: np.ndarray

    @property
    def expert_flip_rate(self) -> np.ndarray:
        """[E] (lost + gained) / (chosen by A + chosen by B); NaN for an expert neither chose."""
        den = (self.expert_chosen_a + self.expert_chosen_b).astype(np.float64)
        num = (self.expert_lost + self.expert_gained).astype(np.float64)
        return np.divide(num, den, out=np.full(den.shape, np.nan), where=den > 0)

    def worst_experts(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` experts with the most flips (lost + gained), most first."""
        flips = self.expert_lost + self.expert_gained
        order = np.argsort(-flips, kind="stable")[:n]
        rate = self.expert_flip_rate
        return [
            {
                "expert": int(e),
                "flips": int(flips[e]),
                "lost": int(self.expert_lost[e]),
                "gained": int(self.expert_gained[e]),
                "flip_rate": float(rate[e]),
            }
            for e in order
            if flips[e] > 0
        ]

    def to_json(self) -> dict[str, Any]:
        return json_safe(
            {
                "index": self.index,
                "layer_a": self.layer_a,
                "layer_b": self.layer_b,
                "tokens": self.tokens,
                "exact": self.exact,
                "jaccard": self.jaccard,
                "top1": self.top1,
                "weighted_overlap": self.weighted_overlap,
                "position_tokens": self.position_tokens,
                "position_exact": self.position_exact,
                "position_jaccard": self.position_jaccard,
                "expert_chosen_a": self.expert_chosen_a,
                "expert_chosen_b": self.expert_chosen_b,
                "expert_lost": self.expert_lost,
                "expert_gained": self.expert_gained,
                "worst_experts": self.worst_experts(),
            }
        )


@dataclass
class AgreementResult:
    """What ``moescope agree`` measured (module doc); ``verdict`` is the one-line verdict,
    ``status`` ``"healthy"`` / ``"warning"`` / ``"critical"``."""

    label_a: str
    label_b: str
    source_a: dict[str, Any]
    source_b: dict[str, Any]
    num_sequences: int
    num_tokens: int
    num_experts: int
    top_k: int
    layers: list[LayerAgreement]
    position_labels: list[str]
    chance: dict[str, float]
    weights_kind: str | None
    worst_tokens: list[dict[str, Any]]
    worst_positions: list[dict[str, Any]]
    only_a: int = 0
    only_b: int = 0
    notes: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def _mean(self, attr: str) -> float:
        vals = [getattr(x, attr) for x in self.layers if x.tokens > 0]
        vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def exact(self) -> float:
        """Mean over layers of the exact top-k set match rate."""
        return self._mean("exact")

    @property
    def jaccard(self) -> float:
        """Mean over layers of the mean Jaccard."""
        return self._mean("jaccard")

    @property
    def top1(self) -> float:
        """Mean over layers of the top-1 agreement."""
        return self._mean("top1")

    @property
    def weighted_overlap(self) -> float:
        """Mean over layers of the weight-weighted overlap (NaN without weights)."""
        return self._mean("weighted_overlap")

    def worst_layer(self) -> LayerAgreement | None:
        """The layer with the lowest exact match (None without tokens)."""
        ok = [x for x in self.layers if x.tokens > 0]
        return min(ok, key=lambda x: (x.exact, x.jaccard)) if ok else None

    @property
    def status(self) -> str:
        e = self.exact
        if not math.isfinite(e) or e >= CLOSE:
            return "healthy" if math.isfinite(e) else "warning"
        return "warning" if e >= ACCEPTABLE else "critical"

    @property
    def verdict(self) -> str:
        """One line: how much B agrees with A, and where least."""
        if self.num_tokens == 0 or not math.isfinite(self.exact):
            return f"{self.label_a} and {self.label_b} have no token routed by both: nothing to compare."
        e = self.exact
        if e >= IDENTICAL:
            what = "routing agrees"
        elif e >= CLOSE:
            what = "routing agrees closely"
        elif e >= ACCEPTABLE:
            what = "routing mismatch"
        else:
            what = "routing differs substantially"
        worst = self.worst_layer()
        where = ""
        if worst is not None and worst.exact < 1.0 and len(self.layers) > 1:
            where = f"; least at {worst.layer_a} ({worst.exact:.1%})"
        return (
            f"{what}: {self.label_b} picks the same top-{self.top_k} experts as "
            f"{self.label_a} for {e:.1%} of tokens (top-1 {self.top1:.1%}, Jaccard "
            f"{self.jaccard:.3f}) over {self.num_tokens:,} tokens x {len(self.layers)} "
            f"layers{where}."
        )

    def to_json(self) -> dict[str, Any]:
        """``summary.json`` of ``moescope agree`` (format ``moescope.agree/1``)."""
        return json_safe(
            {
                "format": "moescope.agree/1",
                "verdict": self.verdict,
                "status": self.status,
                "a": {"label": self.label_a, "source": self.source_a},
                "b": {"label": self.label_b, "source": self.source_b},
                "sequences": self.num_sequences,
                "sequences_only_in_a": self.only_a,
                "sequences_only_in_b": self.only_b,
                "tokens": self.num_tokens,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "exact": self.exact,
                "jaccard": self.jaccard,
                "top1": self.top1,
                "weighted_overlap": self.weighted_overlap,
                "weights": self.weights_kind,
                "chance": self.chance,
                "position_buckets": self.position_labels,
                "layers": [x.to_json() for x in self.layers],
                "worst_tokens": self.worst_tokens,
                "worst_positions": self.worst_positions,
                "notes": self.notes,
                "created": self.created,
            }
        )

    def jsonl_records(self) -> list[dict[str, Any]]:
        """Flat lines for dashboards: one ``agree_layer`` line per layer, then one
        ``agree_summary`` line (scalars only)."""
        base = {"a": self.label_a, "b": self.label_b, "time": self.created}
        out: list[dict[str, Any]] = []
        for x in self.layers:
            out.append(
                {
                    "kind": "agree_layer",
                    **base,
                    "layer": x.layer_a,
                    "layer_b": x.layer_b,
                    "ordinal": x.index,
                    "tokens": x.tokens,
                    "exact": x.exact,
                    "jaccard": x.jaccard,
                    "top1": x.top1,
                    "weighted_overlap": x.weighted_overlap,
                }
            )
        out.append(
            {
                "kind": "agree_summary",
                **base,
                "status": self.status,
                "tokens": self.num_tokens,
                "sequences": self.num_sequences,
                "exact": self.exact,
                "jaccard": self.jaccard,
                "top1": self.top1,
                "weighted_overlap": self.weighted_overlap,
                "verdict": self.verdict,
            }
        )
        return [json_safe(r) for r in out]


def measure_agreement(
    al: AlignedTraces,
    *,
    label_a: str = "A",
    label_b: str = "B",
    source_a: dict[str, Any] | None = None,
    source_b: dict[str, Any] | None = None,
    top_n: int = 10,
    min_count: int = 2,
) -> AgreementResult:
    """Every number of the module doc from aligned traces.

    ``top_n``: how many worst token ids / positions to keep; ``min_count``: a token id
    must occur this often to be listed among the worst (falls back to 1 when none does).
    """
    bucket, labels = position_buckets(al.position)
    nb = len(labels)
    e = al.num_experts
    t_all = int(al.token_ids.shape[0])
    # Per token instance, summed over layers both routed: for the worst tokens/positions.
    n_valid = np.zeros(t_all, dtype=np.int64)
    mismatched = np.zeros(t_all, dtype=np.int64)
    sum_1mj = np.zeros(t_all, dtype=np.float64)
    layers: list[LayerAgreement] = []

    def count(ids: np.ndarray, sel: np.ndarray) -> np.ndarray:
        x = ids[sel & (ids >= 0) & (ids < e)]
        return np.bincount(x, minlength=e)[:e].astype(np.int64)

    # Layer by layer and in token chunks: the slot comparison is [chunk, K, K], so memory
    # stays bounded whatever the trace's length (61 layers x 1M tokens x K = 8 would be
    # 4 GB at once).
    for i in range(al.ids_a.shape[0]):  # over layers, never over experts
        sums = np.zeros(4)  # exact, jaccard, top1, weighted
        weighted_ok = True
        cnt = np.zeros(nb)
        pe = np.zeros(nb)
        pj = np.zeros(nb)
        chosen_a = np.zeros(e, dtype=np.int64)
        chosen_b = np.zeros(e, dtype=np.int64)
        lost = np.zeros(e, dtype=np.int64)
        gained = np.zeros(e, dtype=np.int64)
        n = 0
        for lo in range(0, max(t_all, 1), CHUNK_TOKENS):
            sl = slice(lo, min(lo + CHUNK_TOKENS, t_all))
            m = set_agreement(
                al.ids_a[i, sl],
                al.ids_b[i, sl],
                None if al.w_a is None else al.w_a[i, sl],
                None if al.w_b is None else al.w_b[i, sl],
            )
            v = m["valid"]
            ex, jc = m["exact"], m["jaccard"]
            n += int(v.sum())
            w = m["weighted"][v]
            weighted_ok &= bool(np.isfinite(w).all())
            sums += [ex[v].sum(), jc[v].sum(), m["top1"][v].sum(), np.nan_to_num(w).sum()]
            b = bucket[sl][v]
            cnt += np.bincount(b, minlength=nb)
            pe += np.bincount(b, weights=ex[v], minlength=nb)
            pj += np.bincount(b, weights=jc[v], minlength=nb)
            ia, ib = al.ids_a[i, sl][v], al.ids_b[i, sl][v]
            ha, hb = m["hit_a"][v], m["hit_b"][v]
            chosen_a += count(ia, np.ones(ia.shape, dtype=bool))
            chosen_b += count(ib, np.ones(ib.shape, dtype=bool))
            lost += count(ia, ~ha)
            gained += count(ib, ~hb)
            n_valid[sl] += v
            mismatched[sl] += v & ~ex
            sum_1mj[sl] += np.where(v, 1.0 - jc, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / n if n else np.full(4, np.nan)
            pe, pj = pe / cnt, pj / cnt
        layers.append(
            LayerAgreement(
                index=i,
                layer_a=al.layers_a[i],
                layer_b=al.layers_b[i],
                tokens=n,
                exact=float(means[0]),
                jaccard=float(means[1]),
                top1=float(means[2]),
                weighted_overlap=float(means[3]) if weighted_ok else float("nan"),
                position_tokens=cnt.astype(np.int64),
                position_exact=pe,
                position_jaccard=pj,
                expert_chosen_a=chosen_a,
                expert_chosen_b=chosen_b,
                expert_lost=lost,
                expert_gained=gained,
            )
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        dis = np.where(n_valid > 0, mismatched / n_valid, np.nan)
        one_minus_j = np.where(n_valid > 0, sum_1mj / n_valid, np.nan)
    worst_tokens = _worst_tokens(al.token_ids, dis, top_n, min_count)
    order = np.lexsort((-np.nan_to_num(one_minus_j), -mismatched))
    worst_positions = [
        {
            "seq_id": al.seq_ids[int(al.seq_index[t])],
            "position": int(al.position[t]),
            "token_id": int(al.token_ids[t]),
            "layers_disagreeing": int(mismatched[t]),
            "mean_jaccard": float(1.0 - one_minus_j[t]),
        }
        for t in order[:top_n]
        if mismatched[t] > 0
    ]
    kind = None
    if al.w_a is not None and al.w_b is not None:
        kind = "both"
    elif al.w_a is not None:
        kind = "a"
    elif al.w_b is not None:
        kind = "b"
    return AgreementResult(
        label_a=label_a,
        label_b=label_b,
        source_a=dict(source_a or {}),
        source_b=dict(source_b or {}),
        num_sequences=len(al.seq_ids),
        num_tokens=int(al.token_ids.shape[0]),
        num_experts=e,
        top_k=al.top_k,
        layers=layers,
        position_labels=labels,
        chance=chance_levels(e, al.top_k),
        weights_kind=kind,
        worst_tokens=worst_tokens,
        worst_positions=worst_positions,
        only_a=al.only_a,
        only_b=al.only_b,
    )


def _worst_tokens(
    token_ids: np.ndarray, dis: np.ndarray, top_n: int, min_count: int
) -> list[dict[str, Any]]:
    ok = np.isfinite(dis)
    if not ok.any():
        return []
    uniq, inv = np.unique(token_ids[ok], return_inverse=True)
    cnt = np.bincount(inv)
    rate = np.bincount(inv, weights=dis[ok]) / cnt
    cand = np.flatnonzero((cnt >= min_count) & (rate > 0))
    if not cand.size:  # every disagreeing token id occurs once: list those
        cand = np.flatnonzero(rate > 0)
    order = cand[np.lexsort((-cnt[cand], -rate[cand]))][:top_n]
    return [
        {"token_id": int(uniq[j]), "count": int(cnt[j]), "disagreement": float(rate[j])}
        for j in order
    ]
