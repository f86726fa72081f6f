"""Routing analyses (moescope.report.routing_analysis / routing_record): token-level
capture on padded batches, per-domain distributions and Jensen-Shannon divergence,
consecutive-token expert repetition, router agreement, expert top tokens, the coloured
token view and the figures, each against an independent plain recomputation."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser
from itertools import pairwise

import numpy as np
import pytest
import torch
from torch import nn

from conftest import padded_batch, routed_tiny_lm
from moescope import MoEMonitor
from moescope.analysis.decode import decode_bytes, make_decoder
from moescope.nn.model import TinyMoEConfig, TinyMoELM
from moescope.nn.router_output import RouterOutput
from moescope.plots import save_png
from moescope.report import routing_analysis as RA
from moescope.report.routing_analysis import colored_tokens_html
from moescope.stats import routing as SR
from moescope.stats.routing import (
    domain_divergence,
    expert_distribution,
    router_agreement,
    same_expert_rate,
)
from moescope.stats.token_recorder import (
    RoutingRecorder,
    TokenRouting,
    record_domains,
    record_routing,
)

E, K = 8, 2


def _experts_spy(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[dict, list]:
    """Independent capture: the topk index each experts module RECEIVED, per call."""
    got: dict[str, list[torch.Tensor]] = {p: [] for p in modules}
    handles = []
    for path, mod in modules.items():

        def hook(m: nn.Module, args: tuple, path: str = path) -> None:
            got[path].append(args[1].detach().reshape(-1, args[1].shape[-1]).clone())

        handles.append(mod.register_forward_pre_hook(hook))
    return got, handles


def _recorded(seed_count: int = 3) -> TokenRouting:
    model = routed_tiny_lm()
    return record_routing(model, [padded_batch(s) for s in range(seed_count)])


# ---------------------------------------------------------------------------- capture


def test_recorded_topk_is_what_tinylm_experts_received_valid_tokens_only() -> None:
    model = routed_tiny_lm()
    mods = {n[: -len(".experts")]: m for n, m in model.named_modules() if n.endswith("mlp.experts")}
    got, handles = _experts_spy(model, mods)
    batches = [padded_batch(1), padded_batch(2)]
    rec = RoutingRecorder(model, max_tokens=10_000)
    with rec, torch.no_grad():
        model(batches[0][0], batches[0][1])  # positional arguments
        model(input_ids=batches[1][0], attention_mask=batches[1][1])
    for h in handles:
        h.remove()
    tr = rec.result()
    masks = [m.reshape(-1).bool() for _, m in batches]
    assert tr.layers == list(mods) and tr.num_tokens == sum(int(m.sum()) for m in masks)
    for path in mods:
        want = torch.cat([idx[m] for idx, m in zip(got[path], masks, strict=True)])
        np.testing.assert_array_equal(tr.topk[path], want.numpy())
    want_ids = torch.cat([i.reshape(-1)[m] for (i, _), m in zip(batches, masks, strict=True)])
    np.testing.assert_array_equal(tr.token_ids, want_ids.numpy())
    # Sequences: one per row; positions are mask columns (left padding starts at 4).
    rows = np.concatenate(
        [
            np.repeat(np.arange(3) + 3 * k, m.reshape(3, -1).sum(1).numpy())
            for k, m in enumerate(masks)
        ]
    )
    np.testing.assert_array_equal(tr.seq_id, rows)
    assert tr.position[tr.seq_id == 2].tolist() == list(range(4, 12))
    assert tr.position[tr.seq_id == 1].tolist() == list(range(9))
    assert not tr.truncated and tr.num_experts == dict.fromkeys(mods, E)


def test_recorded_topk_mixtral_padded_and_kv_cache_step() -> None:
    pytest.importorskip("transformers")
    from hf_tiny import build_tiny, experts_modules, padded_batch

    model, _ = build_tiny("mixtral")
    mods = experts_modules(model)
    got, handles = _experts_spy(model, mods)
    ids, mask = padded_batch(batch=3, seq=9, seed=3, left=True)
    nxt = torch.tensor([[5], [6], [7]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    rec = RoutingRecorder(model)
    with rec, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        model(
            input_ids=nxt, attention_mask=mask2, past_key_values=out.past_key_values, use_cache=True
        )
    for h in handles:
        h.remove()
    tr = rec.result()
    valid = mask.reshape(-1).bool()
    n0 = int(valid.sum())
    assert tr.num_tokens == n0 + 3
    for path in mods:
        want = torch.cat([got[path][0][valid], got[path][1]])
        np.testing.assert_array_equal(tr.topk[path], want.numpy())
    np.testing.assert_array_equal(tr.token_ids, np.r_[ids.reshape(-1)[valid].numpy(), 5, 6, 7])
    # The cached step continues the 3 sequences at position 9.
    assert tr.seq_id[n0:].tolist() == [0, 1, 2] and tr.position[n0:].tolist() == [9, 9, 9]


def test_unsorted_router_output_is_ordered_by_combine_weight() -> None:
    """Routers such as DeepSeek-V3 return their top-k unsorted: slot 0 must still be
    the first choice (largest combine weight)."""
    model = routed_tiny_lm()
    flips = []
    for layer in model.model.layers:

        def reverse(m: nn.Module, a: tuple, out: RouterOutput) -> RouterOutput:
            return dataclasses.replace(
                out, topk_index=out.topk_index.flip(-1), topk_weight=out.topk_weight.flip(-1)
            )

        flips.append(layer.mlp.router.register_forward_hook(reverse))
    mods = {n[: -len(".experts")]: m for n, m in model.named_modules() if n.endswith("mlp.experts")}
    got: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in mods}
    for path, mod in mods.items():

        def spy(m: nn.Module, a: tuple, path: str = path) -> None:
            got[path].append((a[1].clone(), a[2].clone()))

        flips.append(mod.register_forward_pre_hook(spy))
    ids, mask = padded_batch(7)
    tr = record_routing(model, [(ids, mask)])
    for h in flips:
        h.remove()
    valid = mask.reshape(-1).bool()
    for path in mods:
        idx, w = got[path][0]
        idx, w = idx[valid], w[valid]
        assert (w[:, 0] < w[:, 1]).all()  # the experts really received ascending weights
        want = idx.gather(1, w.argsort(dim=1, descending=True))
        np.testing.assert_array_equal(tr.topk[path], want.numpy())
        np.testing.assert_array_equal(tr.top1(path), idx[:, 1].numpy())


def test_encoder_decoder_records_the_encoder_layers() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        num_experts=4,
        expert_capacity=2,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    ids, mask = padded_batch(2, hi=64, s=9)
    dec = torch.randint(1, 64, (3, 9))  # same length as the encoder input on purpose
    mon = MoEMonitor(model)
    rec = RoutingRecorder(model)
    assert rec.layers == ["encoder.block.0.layer.1.mlp", "encoder.block.1.layer.1.mlp"]
    with rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    snap = mon.snapshot()
    mon.detach()
    tr = rec.result()
    np.testing.assert_array_equal(tr.token_ids, ids[mask.bool()].numpy())
    for path, frac in expert_distribution(tr).items():
        assert tr.dropped[path].any()  # capacity 2 per expert: slots dropped
        np.testing.assert_allclose(frac, snap.layers[path].usage_fraction, rtol=0, atol=1e-12)


def test_begin_batch_for_a_forward_with_other_argument_names() -> None:
    inner = routed_tiny_lm()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = inner

        def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            return self.lm(tokens, keep).logits

    model = Wrapped().eval()
    ids, mask = padded_batch(4)
    rec = RoutingRecorder(model)
    with rec, torch.no_grad():
        rec.begin_batch(ids, mask)
        model(ids, mask)
    tr = rec.result()
    np.testing.assert_array_equal(tr.token_ids, ids[mask.bool()].numpy())
    direct = record_routing(inner, [(ids, mask)])
    assert tr.layers == ["lm." + p for p in direct.layers]
    for path in direct.layers:
        np.testing.assert_array_equal(tr.topk["lm." + path], direct.topk[path])


def test_max_tokens_bound_and_one_host_copy_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = routed_tiny_lm()
    ids, mask = padded_batch(5)  # 29 valid tokens per batch
    calls: list[tuple[int, ...]] = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        calls.append(tuple(self.shape))
        return real_cpu(self, *a, **k)

    rec = RoutingRecorder(model, max_tokens=40)
    with rec, torch.no_grad():
        monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
        model(ids, mask)
        assert len(calls) == 1 and not rec.full
        model(ids, mask)
        assert len(calls) == 2 and rec.full
        model(ids, mask)  # a full source: hooks return at once, no copy, nothing kept
        assert len(calls) == 2
        monkeypatch.undo()
    tr = rec.result()
    assert tr.num_tokens == 40 and tr.truncated
    flat = ids[mask.bool()].numpy()
    np.testing.assert_array_equal(tr.token_ids, np.r_[flat, flat[:11]])
    assert sum(c["token_ids"].shape[0] for c in rec._sources["default"].chunks) == 40
    for path in tr.layers:
        assert tr.topk[path].shape == (40, K)


def test_a_forward_that_raises_records_nothing() -> None:
    model = routed_tiny_lm()
    ids, mask = padded_batch(0)

    def boom(m: nn.Module, a: tuple, out: object) -> None:
        raise RuntimeError("boom")

    rec = RoutingRecorder(model)
    with rec, torch.no_grad():
        h = model.model.layers[1].register_forward_hook(boom)  # after both routers ran
        with pytest.raises(RuntimeError, match="boom"):
            model(ids, mask)
        h.remove()
        assert rec.num_recorded() == 0
        model(ids, mask)
    assert rec.result().num_tokens == int(mask.sum())


def test_sources_errors_and_detach() -> None:
    model = routed_tiny_lm()
    with pytest.raises(ValueError, match="not MoE layers"):
        RoutingRecorder(model, layers=["model.layers.0.self_attn"])
    rec = RoutingRecorder(model, layers=["model.layers.1.mlp"])
    with pytest.raises(ValueError, match="recorded no token"):
        rec.result("code")
    with rec, torch.no_grad():
        with rec.source("code"):
            model(*padded_batch(1, lo=0, hi=20))
        with rec.source("prose"):
            model(*padded_batch(2, lo=40, hi=64))
    assert rec.sources == ["code", "prose"] and rec.result("code").layers == ["model.layers.1.mlp"]
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert n_hooks == 0
    with torch.no_grad():
        model(*padded_batch(3))
    assert rec.num_recorded("code") == 29 and set(rec.results()) == {"code", "prose"}


def test_make_decoder_restores_word_start_spaces() -> None:
    class Tok:
        def __init__(self) -> None:
            self.pieces = {0: "▁the", 1: "cat", 2: "Ġdog"}

        def decode(self, ids: list[int], **kw: object) -> str:
            return self.pieces[ids[0]].lstrip("▁Ġ")

        def convert_ids_to_tokens(self, i: int) -> str:
            return self.pieces[i]

    dec = make_decoder(Tok())
    assert dec is not None and [dec(i) for i in range(3)] == [" the", "cat", " dog"]
    assert make_decoder(None) is None


def test_make_decoder_with_a_real_byte_level_bpe_tokenizer() -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def f(x):\n    return x + 1", "the cat sat on the mat <b>"] * 20
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=300,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    dec = make_decoder(hf)
    assert dec is not None
    for s in text[:2]:
        ids = hf(s)["input_ids"]
        assert "".join(dec(i) for i in ids) == s  # a passage reads back as the text


# ---------------------------------------------------------------------------- token view


class _Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.titles: list[str] = []
        self._in = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "span" and a.get("class") == "moe-tok":
            self._in = True
            self.texts.append("")
            self.titles.append(a.get("title") or "")
        elif tag == "script":
            raise AssertionError("unescaped <script> element")

    def handle_endtag(self, tag: str) -> None:
        self._in = False

    def handle_data(self, data: str) -> None:
        if self._in:
            self.texts[-1] += data


def test_colored_tokens_html_escapes_and_one_span_per_token() -> None:
    toks = ["<script>alert(1)</script>", " a  b", "\n", "&amp;", '"q"']
    experts = [0, 1, 2, 9, 1]
    out = colored_tokens_html(toks, experts, E, title="layer <0>")
    assert "<script>" not in out and "&lt;script&gt;" in out and "layer &lt;0&gt;" in out
    assert out.count('class="moe-tok"') == len(toks)
    assert "white-space:pre-wrap" in out
    p = _Spans()
    p.feed(out)
    assert p.texts == toks  # text round-trips exactly, whitespace and newlines included
    assert p.titles == ["expert 0", "expert 1", "expert 2", "no routed expert", "expert 1"]
    pal = RA.expert_palette(E)
    assert f"background:{pal[1]}" in out and len(set(pal)) == E
    assert out.count('class="moe-legend-item"') == 3  # experts 0, 1, 2 occur
    assert len(set(RA.expert_palette(128))) == 128
    with pytest.raises(ValueError, match="one expert id per token"):
        colored_tokens_html(["a"], [0, 1], E)
    tr = _recorded(1)
    words, ex = SR.token_passage(tr, tr.layers[1], sequence=2, decode=decode_bytes)
    rows = tr.seq_id == 2
    assert words == [decode_bytes(t) for t in tr.token_ids[rows]]
    assert ex == tr.topk[tr.layers[1]][rows, 0].tolist()


# ---------------------------------------------------------------------------- figures


def test_figures_save_as_png(tmp_path: object) -> None:
    pytest.importorskip("matplotlib")
    model = routed_tiny_lm()
    rec = RoutingRecorder(model)
    with rec, torch.no_grad():
        for name, lo, hi in (("code", 0, 20), ("prose", 30, 64)):
            with rec.source(name):
                model(*padded_batch(1, lo=lo, hi=hi))
    trs = rec.results()
    dists = {d: expert_distribution(tr) for d, tr in trs.items()}
    fig = RA.domain_distribution_figure(dists)
    assert len(fig.axes) == 2
    for ax in fig.axes:  # grouped bars: one per (domain, expert)
        assert len(ax.patches) == 2 * E
    heights = sorted(round(p.get_height(), 12) for p in fig.axes[0].patches)
    want = sorted(round(float(v), 12) for d in dists for v in dists[d]["model.layers.0.mlp"])
    assert heights == want
    rates = {d: {lay: same_expert_rate(tr, lay) for lay in tr.layers} for d, tr in trs.items()}
    agree = router_agreement(trs["code"], trs["code"])
    figs = {
        "dist": fig,
        "div": RA.divergence_figure(domain_divergence(dists)),
        "agree": RA.agreement_figure(agree, chance=SR.agreement_chance(K, E)),
        "agree_multi": RA.agreement_figure({"step 100": agree, "step 200": agree}),
        "same": RA.same_expert_figure(rates),
        "same_one": RA.same_expert_figure(rates["code"]),
    }
    for name, f in figs.items():
        path = save_png(f, tmp_path / f"{name}.png")  # type: ignore[operator]
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_recorded_sequences_have_consecutive_positions() -> None:
    tr = _recorded(1)
    for s in np.unique(tr.seq_id):
        pos = tr.position[tr.seq_id == s].tolist()
        assert all(b == a + 1 for a, b in pairwise(pos))


def test_token_routing_save_load_round_trip(tmp_path: object) -> None:
    cfg = TinyMoEConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        num_experts=E,
        router="switch",
        router_kwargs={"capacity_factor": 0.5},
    )
    model = TinyMoELM(cfg).eval()
    trs = record_domains(
        model, {"a": [padded_batch(0)], "b": [padded_batch(1), padded_batch(2)]}, max_tokens=40
    )
    assert trs["a"].num_tokens == 29 and trs["b"].num_tokens == 40 and trs["b"].truncated
    tr = trs["b"]
    back = TokenRouting.load(tr.save(tmp_path / "sub" / "b.npz"))  # type: ignore[operator]
    assert back.layers == tr.layers and back.num_experts == tr.num_experts
    assert back.truncated and set(back.dropped) == set(tr.dropped)
    for name in ("token_ids", "seq_id", "position"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tr, name))
    for layer in tr.layers:
        np.testing.assert_array_equal(back.topk[layer], tr.topk[layer])
        np.testing.assert_array_equal(back.dropped[layer], tr.dropped[layer])


def _lab(hex_colour: str) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB hex colour, written out from the standard formulas."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = (
        np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
        @ lin
        / np.array([0.95047, 1.0, 1.08883])
    )
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


@pytest.mark.parametrize("e", [8, 12, 16, 20])
def test_expert_palette_colours_are_told_apart(e: int) -> None:
    pal = RA.expert_palette(e)
    assert len(pal) == len(set(pal)) == e
    labs = [_lab(c) for c in pal]
    # CIE76 distance (~2.3 = just noticeable). tab20, used before for 11-20 experts, has
    # a closest pair at 16.6 (light blue / light purple) from 12 experts on.
    closest = min(np.linalg.norm(a - b) for i, a in enumerate(labs) for b in labs[i + 1 :])
    assert closest > (20 if e <= 16 else 15), (e, closest)
