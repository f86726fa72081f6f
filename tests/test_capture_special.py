"""Capture adapters for switch_transformers, nllb_moe, llama4 and dbrx against the models.

Each test builds a tiny random model from its transformers config class, runs a padded
batch, and compares the adapter's RoutingRecords with an independent reference taken in
the test: rows the expert modules actually received (matched back to token positions by
exact equality), the model's own ``router_logits`` (``output_router_logits=True``), a
plain float64 recomputation of the routing rule, and the model's outputs without hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from moescope.capture.adapter import CaptureContext, LayerInfo, MoEAdapter
from moescope.capture.hf_dbrx import DbrxAdapter
from moescope.capture.hf_llama4 import Llama4Adapter
from moescope.capture.hf_switch import NllbMoeAdapter, SwitchTransformersAdapter
from moescope.capture.record import RoutingRecord

E = 4
B, S_ENC, S_DEC = 2, 7, 5


# ----------------------------------------------------------------------------- helpers


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._forward_hooks_with_kwargs)
        + len(m._forward_pre_hooks_with_kwargs)
        for m in model.modules()
    )


class Attached:
    """Adapters attached to every block they match, records collected in a list."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, ctx: CaptureContext) -> None:
        self.records: list[RoutingRecord] = []
        self.infos: list[LayerInfo] = []
        for path, module in model.named_modules():
            info = adapter.match(path, module)
            if info is not None:
                self.infos.append(info)
        self.detaches = [adapter.attach(i, self.records.append, ctx) for i in self.infos]

    def detach(self) -> None:
        for d in self.detaches:
            d()

    def by_layer(self) -> dict[str, RoutingRecord]:
        out = {r.layer: r for r in self.records}
        assert len(out) == len(self.records), "one record per block call expected"
        return out


def _rows_to_tokens(received: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token positions [n] of rows [n, H] that are exact copies of rows of tokens [T, H]."""
    eq = (received[:, None, :] == tokens[None, :, :]).all(dim=-1)
    assert bool((eq.sum(dim=1) == 1).all()), "reference needs distinct token rows"
    return eq.int().argmax(dim=1)


@contextmanager
def _hooks(pairs: list[tuple[nn.Module, Callable[..., Any], bool]]) -> Iterator[None]:
    """Register (module, hook, pre) reference hooks for the duration of the block."""
    handles = [
        m.register_forward_pre_hook(h) if pre else m.register_forward_hook(h) for m, h, pre in pairs
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _padded_ids(vocab: int, batch: int, seq: int, pad_cols: int, left: bool) -> tuple:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left:
        mask[1, :pad_cols] = 0
    else:
        mask[1, seq - pad_cols :] = 0
    return ids, mask


def _check_generic(
    model: nn.Module,
    adapter: MoEAdapter,
    inputs: dict[str, torch.Tensor],
    set_ctx: Callable[[CaptureContext], None],
    expected_layers: list[str],
) -> None:
    """Bit-identical outputs, every block found, detach restores hooks, counting=False."""
    with torch.no_grad():
        base = model(**inputs).logits
    before = _hook_count(model)
    ctx = CaptureContext()
    set_ctx(ctx)
    att = Attached(model, adapter, ctx)
    assert [i.path for i in att.infos] == expected_layers
    assert _hook_count(model) > before
    with torch.no_grad():
        hooked = model(**inputs).logits
    assert torch.equal(base, hooked)
    assert sorted(att.by_layer()) == sorted(expected_layers)
    ctx.counting = False
    n = len(att.records)
    with torch.no_grad():
        model(**inputs)
    assert len(att.records) == n, "no record while ctx.counting is False"
    att.detach()
    assert _hook_count(model) == before
    with torch.no_grad():
        model(**inputs)
    assert len(att.records) == n, "no record after detach"


# ----------------------------------------------------------------------------- switch


@pytest.fixture(scope="module")
def switch_model() -> nn.Module:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        num_experts=E,
        expert_capacity=1,  # 7 tokens per sequence into 4 x 1 slots: drops guaranteed
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(cfg).eval()


def _switch_inputs(vocab: int) -> dict[str, torch.Tensor]:
    ids, am = _padded_ids(vocab, B, S_ENC, 2, left=False)
    dec, dam = _padded_ids(vocab, B, S_DEC, 1, left=False)
    return {
        "input_ids": ids,
        "attention_mask": am,
        "decoder_input_ids": dec,
        "decoder_attention_mask": dam,
    }


SWITCH_LAYERS = [
    "encoder.block.0.layer.1.mlp",
    "encoder.block.1.layer.1.mlp",
    "decoder.block.0.layer.2.mlp",
    "decoder.block.1.layer.2.mlp",
]


def test_switch_records_match_expert_rows_and_router_logits(switch_model: nn.Module) -> None:
    model = switch_model
    inputs = _switch_inputs(model.config.vocab_size)
    blocks = {p: model.get_submodule(p) for p in SWITCH_LAYERS}
    block_in: dict[str, torch.Tensor] = {}
    received: dict[str, list[tuple[int, torch.Tensor]]] = {p: [] for p in SWITCH_LAYERS}
    pairs: list[tuple[nn.Module, Callable[..., Any], bool]] = []
    for p, blk in blocks.items():

        def pre(_m: nn.Module, args: tuple, p: str = p) -> None:
            block_in[p] = args[0].reshape(-1, args[0].shape[-1]).clone()

        pairs.append((blk, pre, True))
        for e in range(E):

            def got(_m: nn.Module, args: tuple, _o: Any, p: str = p, e: int = e) -> None:
                received[p].append((e, args[0].clone()))

            pairs.append((blk.experts[f"expert_{e}"], got, False))

    ctx = CaptureContext()
    ctx.attention_mask = inputs["attention_mask"]
    ctx.decoder_attention_mask = inputs["decoder_attention_mask"]  # type: ignore[attr-defined]
    att = Attached(model, SwitchTransformersAdapter(), ctx)
    try:
        with _hooks(pairs), torch.no_grad():
            out = model(**inputs, output_router_logits=True)
    finally:
        att.detach()
    recs = att.by_layer()
    model_logits = dict(
        zip(SWITCH_LAYERS, [*out.encoder_router_logits, *out.decoder_router_logits], strict=True)
    )

    for p in SWITCH_LAYERS:
        r = recs[p]
        is_dec = p.startswith("decoder")
        valid = (inputs["decoder_attention_mask"] if is_dec else inputs["attention_mask"]).bool()
        t = valid.numel()
        assert r.num_experts == E and r.topk_index.shape == (t, 1) and r.dropped is not None
        assert torch.equal(r.token_mask, valid.reshape(-1))
        assert torch.equal(r.logits, model_logits[p].reshape(t, E))

        # Which expert each token position really went through (-1: none, i.e. dropped).
        assigned = torch.full((t,), -1)
        for e, rows in received[p]:
            pos = _rows_to_tokens(rows, block_in[p])
            assert bool((assigned[pos] == -1).all()), "top-1: one expert per token"
            assigned[pos] = e
        ref_dropped = assigned == -1
        assert bool(ref_dropped.any()), "capacity 1 must drop tokens"
        assert torch.equal(r.dropped[:, 0], ref_dropped)
        kept = ~ref_dropped
        assert torch.equal(r.topk_index[kept, 0], assigned[kept])

        # Dropped tokens name the expert the router picked (float64 argmax), weight 0.
        lg64 = model_logits[p].reshape(t, E).double()
        assert torch.equal(r.topk_index[:, 0], lg64.argmax(dim=-1))
        p_max = torch.softmax(lg64, dim=-1).amax(dim=-1)
        torch.testing.assert_close(r.topk_weight[:, 0].double(), p_max * kept, rtol=1e-6, atol=1e-7)

        # Counts over valid tokens equal the rows each expert received from valid tokens.
        vm = r.token_mask & ~r.dropped[:, 0]
        counts = torch.bincount(r.topk_index[vm, 0], minlength=E)
        ref = torch.bincount(assigned[kept & valid.reshape(-1)], minlength=E)
        assert torch.equal(counts, ref)
        # Padding tokens were routed by the model, yet excluded by the mask.
        assert bool((~valid).any())


def test_switch_generic_contract(switch_model: nn.Module) -> None:
    inputs = _switch_inputs(switch_model.config.vocab_size)

    def set_ctx(ctx: CaptureContext) -> None:
        ctx.attention_mask = inputs["attention_mask"]

    _check_generic(switch_model, SwitchTransformersAdapter(), inputs, set_ctx, SWITCH_LAYERS)


def test_switch_decoder_never_uses_encoder_mask(switch_model: nn.Module) -> None:
    inputs = _switch_inputs(switch_model.config.vocab_size)
    ctx = CaptureContext()
    ctx.attention_mask = inputs["attention_mask"]  # no decoder mask given to the context
    att = Attached(switch_model, SwitchTransformersAdapter(), ctx)
    with torch.no_grad():
        switch_model(**inputs)
    att.detach()
    recs = att.by_layer()
    assert recs["decoder.block.0.layer.2.mlp"].token_mask is None
    assert recs["encoder.block.0.layer.1.mlp"].token_mask is not None


def test_switch_adapter_ignores_other_modules(switch_model: nn.Module) -> None:
    adapter = SwitchTransformersAdapter()
    for other in (NllbMoeAdapter(), Llama4Adapter(), DbrxAdapter()):
        assert all(other.match(p, m) is None for p, m in switch_model.named_modules())
    dense = switch_model.get_submodule("encoder.block.0.layer.0")
    assert adapter.match("encoder.block.0.layer.0", dense) is None


# ----------------------------------------------------------------------------- nllb


@pytest.fixture(scope="module")
def nllb_model() -> nn.Module:
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    cfg = NllbMoeConfig(
        vocab_size=64,
        d_model=32,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_experts=E,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        max_position_embeddings=64,
        moe_eval_capacity_token_fraction=0.25,  # capacity ceil(T / 4): top-2 must drop
        moe_token_dropout=0.0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return NllbMoeForConditionalGeneration(cfg).eval()


NLLB_LAYERS = [
    "model.encoder.layers.0.ffn",
    "model.encoder.layers.1.ffn",
    "model.decoder.layers.0.ffn",
    "model.decoder.layers.1.ffn",
]


def _nllb_inputs(vocab: int) -> dict[str, torch.Tensor]:
    ids, am = _padded_ids(vocab, B, S_ENC, 2, left=False)
    dec, _ = _padded_ids(vocab, B, S_DEC, 0, left=False)
    return {"input_ids": ids, "attention_mask": am, "decoder_input_ids": dec}


def _nllb_reference(
    logits: torch.Tensor, valid: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-loop GShard/NLLB top-2 routing (no batch priority, policy "all") in float64.

    Returns index [T, 2], kept [T, 2] bool, combine weight [T, 2].
    """
    lg = logits.double()
    probs = torch.softmax(lg, dim=-1)
    t = lg.shape[0]
    index = torch.zeros(t, 2, dtype=torch.long)
    kept = torch.zeros(t, 2, dtype=torch.bool)
    load = [0] * E
    for i in range(t):
        first = int(lg[i].argmax())
        second = int(lg[i].masked_fill(torch.arange(E) == first, -math.inf).argmax())
        index[i] = torch.tensor([first, second])
    for slot in range(2):  # every top-1 slot is placed before any top-2 slot
        for i in range(t):
            e = int(index[i, slot])
            if bool(valid[i]):
                kept[i, slot] = load[e] < capacity
                load[e] += 1
    p = probs.gather(1, index) * kept
    weight = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    return index, kept, weight


def test_nllb_records_match_reference_routing(nllb_model: nn.Module) -> None:
    model = nllb_model
    inputs = _nllb_inputs(model.config.vocab_size)
    ctx = CaptureContext()
    ctx.attention_mask = inputs["attention_mask"]
    att = Attached(model, NllbMoeAdapter(), ctx)
    try:
        with torch.no_grad():
            out = model(**inputs, output_router_logits=True)
    finally:
        att.detach()
    recs = att.by_layer()
    model_logits = dict(
        zip(NLLB_LAYERS, [*out.encoder_router_logits, *out.decoder_router_logits], strict=True)
    )
    frac = model.config.moe_eval_capacity_token_fraction
    for p in NLLB_LAYERS:
        r = recs[p]
        is_dec = ".decoder." in p
        t = B * (S_DEC if is_dec else S_ENC)
        valid = torch.ones(t, dtype=torch.bool) if is_dec else inputs["attention_mask"].bool()
        valid = valid.reshape(-1)
        assert r.topk_index.shape == (t, 2) and r.num_experts == E
        assert torch.equal(r.logits, model_logits[p])
        assert (r.token_mask is None) if is_dec else torch.equal(r.token_mask, valid)
        index, kept, weight = _nllb_reference(model_logits[p], valid, math.ceil(frac * t))
        assert bool((~kept[valid]).any()), "the capacity must drop slots"
        assert torch.equal(r.topk_index, index)
        assert torch.equal(r.dropped, ~kept)
        torch.testing.assert_close(r.topk_weight.double(), weight, rtol=1e-5, atol=1e-7)
        # Counts over valid tokens, and what the dispatch would feed each expert.
        keep = kept & valid[:, None]
        rec_keep = ~r.dropped & (valid if r.token_mask is None else r.token_mask)[:, None]
        assert torch.equal(
            torch.bincount(r.topk_index[rec_keep], minlength=E),
            torch.bincount(index[keep], minlength=E),
        )


def test_nllb_expert_dispatch_is_known(nllb_model: nn.Module) -> None:
    """transformers 5.23 dispatches NLLB rows by mask value; if fixed, rows must match.

    This pins the caveat in NllbMoeAdapter's docstring: when it fails, transformers changed
    NllbMoeExperts and the docstring (and this test) must follow.
    """
    model = nllb_model
    inputs = _nllb_inputs(model.config.vocab_size)
    p = NLLB_LAYERS[0]
    blk = model.get_submodule(p)
    rows = torch.zeros(E, dtype=torch.long)
    pairs: list[tuple[nn.Module, Callable[..., Any], bool]] = []
    for e in range(E):

        def got(_m: nn.Module, args: tuple, _o: Any, e: int = e) -> None:
            rows[e] += args[0].shape[0]

        pairs.append((blk.experts[f"expert_{e}"], got, False))
    ctx = CaptureContext()
    att = Attached(model, NllbMoeAdapter(), ctx)
    with _hooks(pairs), torch.no_grad():
        model(**inputs)
    att.detach()
    r = att.by_layer()[p]
    kept_counts = torch.bincount(r.topk_index[~r.dropped], minlength=E)
    t = r.num_tokens
    known_bug = torch.tensor(
        [t * E - int((~r.dropped[:, 0]).sum()), int((~r.dropped[:, 0]).sum()), 0, 0]
    )
    assert torch.equal(rows, kept_counts) or torch.equal(rows, known_bug)


def test_nllb_generic_contract(nllb_model: nn.Module) -> None:
    inputs = _nllb_inputs(nllb_model.config.vocab_size)

    def set_ctx(ctx: CaptureContext) -> None:
        ctx.attention_mask = inputs["attention_mask"]

    _check_generic(nllb_model, NllbMoeAdapter(), inputs, set_ctx, NLLB_LAYERS)


# ----------------------------------------------------------------------------- llama4


@pytest.fixture(scope="module")
def llama4_model() -> nn.Module:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=E,
        num_experts_per_tok=2,
        interleave_moe_layer_step=1,
        max_position_embeddings=64,
        attention_chunk_size=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Llama4ForCausalLM(cfg).eval()


LLAMA4_LAYERS = ["model.layers.0.feed_forward", "model.layers.1.feed_forward"]


def test_llama4_records_match_expert_inputs_and_router(llama4_model: nn.Module) -> None:
    model = llama4_model
    ids, am = _padded_ids(model.config.vocab_size, B, S_ENC, 2, left=True)
    t = B * S_ENC
    selected: dict[str, torch.Tensor] = {}
    scale: dict[str, torch.Tensor] = {}
    block_in: dict[str, torch.Tensor] = {}
    pairs: list[tuple[nn.Module, Callable[..., Any], bool]] = []
    for p in LLAMA4_LAYERS:
        blk = model.get_submodule(p)

        def pre_blk(_m: nn.Module, args: tuple, p: str = p) -> None:
            block_in[p] = args[0].reshape(t, -1).clone()

        def pre_exp(_m: nn.Module, args: tuple, p: str = p) -> None:
            routed_in = args[0].reshape(E, t, -1)  # expert e sees x * score_e
            selected[p] = (routed_in != 0).any(dim=-1).T  # [T, E]
            x = block_in[p]
            # The scale each expert's input got: x * s = routed_in, solved per row.
            scale[p] = (routed_in * x[None]).sum(-1).T / (x * x).sum(-1)[:, None]

        pairs += [(blk, pre_blk, True), (blk.experts, pre_exp, True)]
    ctx = CaptureContext()
    ctx.attention_mask = am
    att = Attached(model, Llama4Adapter(), ctx)
    try:
        with _hooks(pairs), torch.no_grad():
            out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
    finally:
        att.detach()
    recs = att.by_layer()
    valid = am.bool().reshape(-1)
    for p, model_logits in zip(LLAMA4_LAYERS, out.router_logits, strict=True):
        r = recs[p]
        assert r.score_fn == "sigmoid" and r.dropped is None
        assert r.topk_index.shape == (t, 2)
        assert torch.equal(r.logits, model_logits)
        assert torch.equal(r.token_mask, valid)
        chosen = torch.zeros(t, E, dtype=torch.bool).scatter_(1, r.topk_index, True)
        assert torch.equal(chosen, selected[p]), "chosen set = experts with non-zero input"
        torch.testing.assert_close(
            r.topk_weight, scale[p].gather(1, r.topk_index), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            r.topk_weight.double(),
            torch.sigmoid(model_logits.double()).gather(1, r.topk_index),
            rtol=1e-6,
            atol=1e-7,
        )
        counts = torch.bincount(r.topk_index[r.token_mask].reshape(-1), minlength=E)
        assert torch.equal(counts, selected[p][valid].sum(dim=0))
        assert int(counts.sum()) == int(valid.sum()) * 2 < t * 2


def test_llama4_generic_contract(llama4_model: nn.Module) -> None:
    ids, am = _padded_ids(llama4_model.config.vocab_size, B, S_ENC, 2, left=True)

    def set_ctx(ctx: CaptureContext) -> None:
        ctx.attention_mask = am

    inputs = {"input_ids": ids, "attention_mask": am}
    _check_generic(llama4_model, Llama4Adapter(), inputs, set_ctx, LLAMA4_LAYERS)


# ----------------------------------------------------------------------------- dbrx


@pytest.fixture(scope="module")
def dbrx_model() -> nn.Module:
    from transformers import DbrxConfig, DbrxForCausalLM

    cfg = DbrxConfig(
        vocab_size=64,
        d_model=32,
        n_heads=2,
        n_layers=2,
        max_seq_len=64,
        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": E, "moe_top_k": 2},
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return DbrxForCausalLM(cfg).eval()


DBRX_LAYERS = ["transformer.blocks.0.ffn", "transformer.blocks.1.ffn"]


def test_dbrx_records_match_expert_rows_and_router(dbrx_model: nn.Module) -> None:
    model = dbrx_model
    ids, am = _padded_ids(model.config.vocab_size, B, S_ENC, 3, left=True)
    t = B * S_ENC
    block_in: dict[str, torch.Tensor] = {}
    hits: dict[str, torch.Tensor] = {p: torch.zeros(t, E, dtype=torch.long) for p in DBRX_LAYERS}
    pairs: list[tuple[nn.Module, Callable[..., Any], bool]] = []
    for p in DBRX_LAYERS:
        blk = model.get_submodule(p)
        glu = blk.experts.mlp

        def pre_blk(_m: nn.Module, args: tuple, p: str = p) -> None:
            block_in[p] = args[0].reshape(t, -1).clone()

        def glu_call(m: nn.Module, args: tuple, _o: Any, p: str = p) -> None:
            x, w1 = args[0], args[1]
            # Which expert's slice of the stacked w1 this call used.
            e = (w1.data_ptr() - m.w1.data_ptr()) // (w1.numel() * w1.element_size())
            hits[p][_rows_to_tokens(x, block_in[p]), e] += 1

        pairs += [(blk, pre_blk, True), (glu, glu_call, False)]
    ctx = CaptureContext()
    ctx.attention_mask = am
    att = Attached(model, DbrxAdapter(), ctx)
    try:
        with _hooks(pairs), torch.no_grad():
            out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
    finally:
        att.detach()
    recs = att.by_layer()
    valid = am.bool().reshape(-1)
    for p, model_logits in zip(DBRX_LAYERS, out.router_logits, strict=True):
        r = recs[p]
        assert r.topk_index.shape == (t, 2) and r.dropped is None and r.score_fn == "softmax"
        assert torch.equal(r.logits, model_logits)
        assert torch.equal(r.token_mask, valid)
        chosen = torch.zeros(t, E, dtype=torch.long).scatter_(1, r.topk_index, 1)
        assert torch.equal(chosen, hits[p]), "each (token, expert) computed exactly once"
        # float64 reference: softmax, top-2, L1 renormalisation (moe_normalize_expert_weights=1).
        probs = torch.softmax(model_logits.double(), dim=-1)
        ref_w = probs.gather(1, r.topk_index)
        ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(r.topk_weight.double(), ref_w, rtol=1e-6, atol=1e-7)
        assert torch.equal(
            torch.sort(r.topk_index, dim=-1).values,
            torch.sort(probs.topk(2, dim=-1).indices, dim=-1).values,
        )
        counts = torch.bincount(r.topk_index[r.token_mask].reshape(-1), minlength=E)
        assert torch.equal(counts, hits[p][valid].sum(dim=0))


def test_dbrx_generic_contract(dbrx_model: nn.Module) -> None:
    ids, am = _padded_ids(dbrx_model.config.vocab_size, B, S_ENC, 3, left=True)

    def set_ctx(ctx: CaptureContext) -> None:
        ctx.attention_mask = am

    inputs = {"input_ids": ids, "attention_mask": am}
    _check_generic(dbrx_model, DbrxAdapter(), inputs, set_ctx, DBRX_LAYERS)


def test_adapters_match_only_their_family(
    llama4_model: nn.Module, dbrx_model: nn.Module, nllb_model: nn.Module
) -> None:
    adapters: list[MoEAdapter] = [
        SwitchTransformersAdapter(),
        NllbMoeAdapter(),
        Llama4Adapter(),
        DbrxAdapter(),
    ]
    for a in adapters:
        assert isinstance(a, MoEAdapter)
    for model, own in ((llama4_model, 2), (dbrx_model, 3), (nllb_model, 1)):
        for i, a in enumerate(adapters):
            found = [p for p, m in model.named_modules() if a.match(p, m) is not None]
            assert bool(found) == (i == own), (type(a).__name__, found)


def test_switch_training_step_unchanged(switch_model: nn.Module) -> None:
    """Train mode (router jitter + dropout draw from the RNG): same loss, same gradients."""
    model = switch_model
    inputs = _switch_inputs(model.config.vocab_size)
    labels = inputs["decoder_input_ids"]

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss = model(**inputs, labels=labels, output_router_logits=True).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    try:
        base_loss, base_grads = step()
        ctx = CaptureContext()
        ctx.attention_mask = inputs["attention_mask"]
        att = Attached(model, SwitchTransformersAdapter(), ctx)
        try:
            loss, grads = step()
        finally:
            att.detach()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert torch.equal(base_loss, loss)
    assert len(grads) == len(base_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(base_grads, grads, strict=True))
    assert len(att.records) == len(SWITCH_LAYERS)
    assert all(not r.logits.requires_grad and r.logits.grad_fn is None for r in att.records)


def test_registry_prefers_dedicated_adapters(
    switch_model: nn.Module, nllb_model: nn.Module, llama4_model: nn.Module, dbrx_model: nn.Module
) -> None:
    """The first registered adapter matching each MoE block is this family's own."""
    registry = pytest.importorskip("moescope.capture.registry")
    adapters = registry.default_adapters()
    cases = (
        (switch_model, SWITCH_LAYERS, SwitchTransformersAdapter),
        (nllb_model, NLLB_LAYERS, NllbMoeAdapter),
        (llama4_model, LLAMA4_LAYERS, Llama4Adapter),
        (dbrx_model, DBRX_LAYERS, DbrxAdapter),
    )
    for model, layers, cls in cases:
        for p in layers:
            module = model.get_submodule(p)
            first = next(a for a in adapters if a.match(p, module) is not None)
            assert isinstance(first, cls), (p, first)
