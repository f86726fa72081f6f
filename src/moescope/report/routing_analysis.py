"""Routing analyses the MoE papers publish, on token-level routing (numpy + matplotlib).

Capture is in :mod:`moescope.report.routing_record` (re-exported here):
:class:`RoutingRecorder` (context manager, ``source(name)``, ``begin_batch``, ``full``,
``result(source)``, ``results()``), :func:`record_domains` ``(model, {domain: batches})
-> {domain: TokenRouting}`` and :func:`record_routing` ``(model, batches) ->
TokenRouting``. A :class:`TokenRouting` (``layers``, ``num_experts``, ``token_ids`` [N],
``seq_id`` [N], ``position`` [N], ``topk`` {layer: [N, K]}, ``dropped``, ``truncated``)
can be written with ``save(path)`` and read with ``TokenRouting.load(path)`` (.npz).
Everything below is host-side numpy on a ``TokenRouting``.

Per-domain routing (Mixtral, Jiang et al. 2024, §5 Fig. 7)
    :func:`expert_distribution` ``{layer: [E]}`` fraction of kept assignments per expert
    (valid tokens, all K slots, dropped slots and ids >= E excluded: the monitor's
    ``usage_fraction``); :func:`domain_divergence` pairwise Jensen-Shannon divergence
    between domains per layer, in NATS (natural log; 0 <= JS <= ln 2 ~ 0.693), with the
    mean and max over domain pairs; figures :func:`domain_distribution_figure` (grouped
    bars per expert, one colour per domain, dashed 1/E line) and
    :func:`divergence_figure` (mean / max JS per layer).

Token-level view (Mixtral §5 Fig. 8, Table 5)
    :func:`token_passage` picks one recorded sequence (token strings + top-1 experts);
    :func:`colored_tokens_html` renders it as HTML spans coloured by expert, with a legend;
    :func:`same_expert_rate` the rate at which consecutive tokens of a sequence share the
    first-choice expert (``mode="top1"``) or share any expert of their top-k sets
    (``mode="topk"``: Mixtral's "first or second choice"), against chance;
    :func:`same_expert_figure`.

Router agreement between checkpoints (OLMoE, Muennighoff et al. 2024, §5 "router
saturation")
    :func:`router_agreement` ``{layer: mean |topk_a ∩ topk_b| / K}`` over the same tokens;
    chance for independent random routers is ``K / E`` (:func:`agreement_chance`);
    :func:`agreement_figure`.

Expert specialisation
    :func:`expert_top_tokens` the tokens each expert receives most often, decoded through
    :func:`make_decoder` (a transformers tokenizer) or :func:`decode_bytes` (byte-level
    models such as the moescope demo).

Typical use (what ``moescope analyze`` wires)::

    rec = RoutingRecorder(model, max_tokens=20000)
    with rec, torch.no_grad():
        for name, batches in domains.items():
            with rec.source(name):
                for ids, mask in batches:
                    if rec.full:
                        break
                    model(input_ids=ids, attention_mask=mask)
    trs = rec.results()                                   # {domain: TokenRouting}
    dists = {d: expert_distribution(tr) for d, tr in trs.items()}
    div = domain_divergence(dists)                        # DomainDivergence
    fig = domain_distribution_figure(dists)               # save_png(fig, path)
    rates = {d: {l: same_expert_rate(tr, l) for l in tr.layers} for d, tr in trs.items()}
    words, experts = token_passage(trs["code"], layer, decode=make_decoder(tokenizer))
    html = colored_tokens_html(words, experts, tr.num_experts[layer])
    agree = router_agreement(tr_this, tr_other)           # same batches, other checkpoint
    tops = expert_top_tokens(tr, layer, decode=make_decoder(tokenizer))
"""

from __future__ import annotations

import colorsys
import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from moescope.report.routing_record import (
    RoutingRecorder,
    TokenRouting,
    record_domains,
    record_routing,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DomainDivergence",
    "RoutingRecorder",
    "SameExpertRate",
    "TokenRouting",
    "TopToken",
    "agreement_chance",
    "agreement_figure",
    "colored_tokens_html",
    "decode_bytes",
    "divergence_figure",
    "domain_distribution_figure",
    "domain_divergence",
    "expert_counts",
    "expert_distribution",
    "expert_palette",
    "expert_top_tokens",
    "js_divergence",
    "make_decoder",
    "record_domains",
    "record_routing",
    "router_agreement",
    "same_expert_figure",
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
    ran = (idx >= 0).all(axis=1)  # rows where the layer ran
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


def router_agreement(
    a: TokenRouting, b: TokenRouting, *, top1: bool = False
) -> dict[str, float]:
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


class TopToken(NamedTuple):
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


def make_decoder(tokenizer: Any | None) -> Decoder | None:
    """Token id -> display string through a transformers tokenizer (None -> None).

    Uses ``tokenizer.decode([id])``; SentencePiece / byte-level BPE word-start markers
    (``▁``, ``Ġ``), which ``decode`` of a lone token may strip, are turned back into a
    leading space so that a passage reads as text. Results are cached per id.
    """
    if tokenizer is None:
        return None
    cache: dict[int, str] = {}
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)

    def decode(token_id: int) -> str:
        s = cache.get(token_id)
        if s is None:
            s = tokenizer.decode([token_id], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
            piece = convert(token_id) if convert is not None else None
            if isinstance(piece, str) and piece[:1] in ("▁", "Ġ") and not s.startswith(" "):
                s = " " + s
            cache[token_id] = s
        return s

    return decode


def decode_bytes(token_id: int) -> str:
    """Token id -> string for byte-level models (vocab = 256 raw bytes, moescope's demo):
    printable ASCII and whitespace as themselves, other bytes as ``\\xNN``."""
    if 0 <= token_id < 128:
        c = chr(token_id)
        if c.isprintable() or c in "\n\t ":
            return c
    return f"\\x{token_id:02x}" if 0 <= token_id < 256 else f"<{token_id}>"


# ---------------------------------------------------------------------------- token view

_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_TAB20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728",
          "#ff9896", "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2",
          "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5"]
_NO_EXPERT = "#eeeeee"


def expert_palette(num_experts: int) -> list[str]:
    """E qualitative colours (hex): matplotlib's tab10 / tab20 up to 20 experts, beyond
    that golden-angle hues over three lightness levels (neighbouring ids far apart)."""
    if num_experts <= 10:
        return _TAB10[:num_experts]
    if num_experts <= 20:
        return _TAB20[:num_experts]
    out = []
    for e in range(num_experts):
        hue = (e * 0.618033988749895) % 1.0
        light = (0.45, 0.62, 0.78)[e % 3]
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.65)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def _text_colour(bg: str) -> str:
    r, g, b = (int(bg[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#ffffff"


def token_passage(
    tr: TokenRouting,
    layer: str,
    *,
    sequence: int = 0,
    max_tokens: int = 400,
    decode: Decoder | None = None,
) -> tuple[list[str], list[int]]:
    """``(token strings, top-1 experts)`` of the ``sequence``-th recorded sequence (in
    recording order), its first ``max_tokens`` tokens, for :func:`colored_tokens_html`."""
    tr.check_layer(layer)
    seqs = tr.sequences()
    if not 0 <= sequence < seqs.size:
        raise ValueError(f"sequence must be in [0, {seqs.size}), got {sequence}")
    rows = np.flatnonzero(tr.seq_id == seqs[sequence])[:max_tokens]
    dec = decode if decode is not None else str
    return [dec(int(t)) for t in tr.token_ids[rows]], [int(x) for x in tr.top1(layer)[rows]]


def colored_tokens_html(
    token_strings: Sequence[str],
    expert_ids: Sequence[int],
    num_experts: int,
    *,
    title: str | None = None,
    legend: bool = True,
) -> str:
    """An HTML fragment: each token a ``<span class="moe-tok">`` whose background is its
    expert's colour (:func:`expert_palette`), as in Mixtral's Fig. 8.

    Text is HTML-escaped; spaces and newlines are preserved (``white-space: pre-wrap``,
    monospace). Each span has a ``title`` tooltip ``expert e``; ids outside [0, E) are
    grey. The legend (``class="moe-legend"``) lists the experts that occur.
    """
    if len(token_strings) != len(expert_ids):
        raise ValueError(
            f"one expert id per token needed: {len(token_strings)} tokens, "
            f"{len(expert_ids)} expert ids"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    pal = expert_palette(num_experts)
    parts: list[str] = ['<div class="moe-token-view">']
    if title:
        parts.append(f'<div class="moe-token-title"><b>{html.escape(title)}</b></div>')
    parts.append(
        '<div class="moe-tokens" style="white-space:pre-wrap;font-family:monospace;'
        'line-height:1.6;">'
    )
    for s, e in zip(token_strings, expert_ids, strict=True):
        e = int(e)
        bg = pal[e] if 0 <= e < num_experts else _NO_EXPERT
        label = f"expert {e}" if 0 <= e < num_experts else "no routed expert"
        parts.append(
            f'<span class="moe-tok" style="background:{bg};color:{_text_colour(bg)}" '
            f'title="{label}">{html.escape(str(s), quote=True)}</span>'
        )
    parts.append("</div>")
    if legend:
        used = sorted({int(e) for e in expert_ids if 0 <= int(e) < num_experts})
        items = "".join(
            f'<span class="moe-legend-item" style="background:{pal[e]};'
            f'color:{_text_colour(pal[e])};padding:0 0.4em;margin-right:0.3em">e{e}</span>'
            for e in used
        )
        parts.append(f'<div class="moe-legend" style="margin-top:0.4em">experts: {items}</div>')
    parts.append("</div>")
    return "".join(parts)


# ---------------------------------------------------------------------------- figures


def _pick_layers(layers: Sequence[str], chosen: str | Sequence[str] | None, n: int) -> list[str]:
    if isinstance(chosen, str):
        chosen = [chosen]
    if chosen is not None:
        missing = [c for c in chosen if c not in layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the data; available: {list(layers)}")
        return list(chosen)
    if len(layers) <= n:
        return list(layers)
    pick = np.unique(np.round(np.linspace(0, len(layers) - 1, n)).astype(int))
    return [layers[i] for i in pick]


def domain_distribution_figure(
    dists: Mapping[str, Mapping[str, np.ndarray]],
    layers: str | Sequence[str] | None = None,
    *,
    max_layers: int = 4,
    title: str | None = None,
    dpi: int = 100,
    max_size: tuple[float, float] = (16.0, 14.0),
) -> Figure:
    """Grouped bars: per expert, one bar per domain (one colour each), one panel per
    layer, dashed line at the uniform 1 / E (Mixtral, Jiang et al. 2024, Fig. 7).

    Args:
        dists: ``{domain: {layer: [E] fraction}}`` (:func:`expert_distribution`).
        layers: one layer or several; default up to ``max_layers`` evenly spaced layers
            (first and last included).
    """
    from moescope.report.plots import _clip, _new_figure, _short_names

    domains = list(dists)
    if not domains:
        raise ValueError("no domain to plot")
    common = [layer for layer in dists[domains[0]] if all(layer in dists[d] for d in domains)]
    chosen = _pick_layers(common, layers, max_layers)
    if not chosen:
        raise ValueError("the domains share no layer; nothing to plot")
    e_max = max(np.asarray(dists[d][layer]).shape[0] for d in domains for layer in chosen)
    w = _clip(3.0 + 0.12 * e_max * max(1, len(domains)) / 2, 7.0, max_size[0])
    h = _clip(0.8 + 2.2 * len(chosen), 3.0, max_size[1])
    fig = _new_figure(w, h, dpi)
    axes = fig.subplots(len(chosen), 1, squeeze=False, sharex=True)[:, 0]
    colours = _TAB10 if len(domains) <= 10 else expert_palette(len(domains))
    short, pattern = _short_names(list(common))
    names = dict(zip(common, short, strict=True))
    width = 0.8 / len(domains)
    for ax, layer in zip(axes, chosen, strict=True):
        for j, d in enumerate(domains):
            p = np.asarray(dists[d][layer], dtype=np.float64)
            x = np.arange(p.shape[0]) - 0.4 + width * (j + 0.5)
            ax.bar(x, p, width=width, color=colours[j], label=d)
        e = np.asarray(dists[domains[0]][layer]).shape[0]
        ax.axhline(1.0 / e, color="0.4", linestyle="--", linewidth=1)
        ax.set_ylabel("fraction")
        ax.set_title(f"layer {names[layer]}" + (f" ({pattern})" if pattern else ""),
                     fontsize="medium")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                   fontsize="small", title="domain")
    axes[-1].set_xlabel("expert")
    from moescope.report.plots import _tick_positions

    ticks = _tick_positions(e_max, 32)
    axes[-1].set_xticks(ticks, [str(t) for t in ticks])
    fig.suptitle(title if title is not None else "Expert assignment per domain")
    return fig


def divergence_figure(
    div: DomainDivergence, *, title: str | None = None, dpi: int = 100
) -> Figure:
    """Mean and max pairwise Jensen-Shannon divergence (nats) between domains per layer;
    the dotted line is the bound ln 2."""
    from moescope.report.plots import _clip, _new_figure, _short_names

    short, pattern = _short_names(div.layers)
    x = np.arange(len(div.layers))
    fig = _new_figure(_clip(4.0 + 0.15 * len(x), 7.0, 16.0), 4.0, dpi)
    ax = fig.add_subplot()
    ax.plot(x, [div.mean[lay] for lay in div.layers], marker="o", label="mean over pairs")
    if len(div.domains) > 2:
        ax.plot(x, [div.max[lay] for lay in div.layers], marker="^", label="max over pairs")
    ax.axhline(math.log(2), color="0.5", linestyle=":", linewidth=1, label="ln 2 (bound)")
    from moescope.report.plots import _set_ticks

    _set_ticks(ax, "x", len(x), short, 30)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    ax.set_ylabel("Jensen-Shannon divergence (nats)")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize="small")
    ax.set_title(title if title is not None else
                 "Routing divergence between domains: " + ", ".join(div.domains))
    return fig


def _series(data: Mapping[str, Any], leaf: type | tuple[type, ...]) -> dict[str, Mapping[str, Any]]:
    """``{label: {layer: value}}`` from either that or a single ``{layer: value}``."""
    if not data:
        raise ValueError("nothing to plot")
    first = next(iter(data.values()))
    if isinstance(first, leaf):
        return {"": data}
    return dict(data)


def agreement_figure(
    agreement: Mapping[str, float] | Mapping[str, Mapping[str, float]],
    *,
    chance: float | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Router agreement per layer: bars for one comparison ``{layer: value}``, lines for
    several ``{label: {layer: value}}`` (e.g. each checkpoint vs the final one, OLMoE
    Fig. "router saturation"). ``chance``: a dashed reference (:func:`agreement_chance`)."""
    from moescope.report.plots import _clip, _new_figure, _set_ticks, _short_names

    series = _series(agreement, (float, int, np.floating))
    layers: list[str] = []
    for s in series.values():
        layers += [lay for lay in s if lay not in layers]
    short, pattern = _short_names(layers)
    x = np.arange(len(layers))
    fig = _new_figure(_clip(4.0 + 0.15 * len(x), 7.0, 16.0), 4.0, dpi)
    ax = fig.add_subplot()
    if list(series) == [""]:
        s = series[""]
        ax.bar(x, [s.get(lay, np.nan) for lay in layers], color=_TAB10[0])
    else:
        for label, s in series.items():
            ax.plot(x, [s.get(lay, np.nan) for lay in layers], marker="o", label=label)
    if chance is not None:
        ax.axhline(chance, color="0.4", linestyle="--", linewidth=1, label="chance (K/E)")
    if chance is not None or list(series) != [""]:
        ax.legend(frameon=False, fontsize="small")
    _set_ticks(ax, "x", len(x), short, 30)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    ax.set_ylabel("top-k overlap |A ∩ B| / K")
    ax.set_title(title if title is not None else "Router agreement between checkpoints")
    return fig


def same_expert_figure(
    rates: Mapping[str, SameExpertRate] | Mapping[str, Mapping[str, SameExpertRate]],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Consecutive-token same-expert rate per layer (solid) against chance (dashed, same
    colour) and the uniform router (grey dotted), for one ``{layer: SameExpertRate}`` or
    several ``{label (domain): {layer: SameExpertRate}}`` (Mixtral Table 5)."""
    from moescope.report.plots import _clip, _new_figure, _set_ticks, _short_names

    series = _series(rates, SameExpertRate)
    layers: list[str] = []
    for s in series.values():
        layers += [lay for lay in s if lay not in layers]
    short, pattern = _short_names(layers)
    x = np.arange(len(layers))
    fig = _new_figure(_clip(4.0 + 0.15 * len(x), 7.0, 16.0), 4.0, dpi)
    ax = fig.add_subplot()
    modes = set()
    for j, (label, s) in enumerate(series.items()):
        c = _TAB10[j % 10]
        name = label or "observed"
        ax.plot(x, [s[lay].rate if lay in s else np.nan for lay in layers], marker="o",
                color=c, label=name)
        ax.plot(x, [s[lay].chance if lay in s else np.nan for lay in layers], linestyle="--",
                color=c, label=f"{label} chance" if label else "chance")
        modes |= {r.mode for r in s.values()}
    first = next(iter(series.values()))
    ax.plot(x, [first[lay].uniform if lay in first else np.nan for lay in layers],
            linestyle=":", color="0.5", label="uniform router")
    _set_ticks(ax, "x", len(x), short, 30)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"layer ({pattern})" if pattern else "layer")
    what = "same first-choice expert" if modes == {"top1"} else "shared expert"
    ax.set_ylabel(f"consecutive tokens, {what}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    ax.set_title(title if title is not None else "Expert repetition between consecutive tokens")
    return fig
