"""Parameter counting: reference models to the parameter, hand counts, conventions, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moescope
from conftest import REFERENCE_MODELS
from moescope.cost import (
    BREAKDOWN_KEYS,
    CostConfigError,
    NoMoEError,
    ParamReport,
    count_parameters,
)
from moescope.nn import GroupedExperts, MoELayer, TopKRouter

transformers = pytest.importorskip("transformers")

MODELS_DIR = REFERENCE_MODELS
REF_FILES = sorted(MODELS_DIR.glob("*.json"))
assert len(REF_FILES) == 6, f"reference configs missing from {MODELS_DIR}"
CONVENTIONS = ("both", "head", "none")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _check_sums(r: ParamReport) -> None:
    assert set(r.breakdown) == set(BREAKDOWN_KEYS)
    assert sum(r.breakdown.values()) == r.total_params
    assert sum(r.active_breakdown.values()) == r.active_params
    assert r.activation_ratio == pytest.approx(r.active_params / r.total_params)


# ------------------------------------------------------------------ reference models


@pytest.mark.parametrize("path", REF_FILES, ids=[p.stem for p in REF_FILES])
def test_reference_models_exact(path: Path) -> None:
    ref = _load(path)
    exact = ref["exact"]
    for conv in CONVENTIONS:
        r = count_parameters(path, embeddings=conv)
        assert r.embeddings == conv
        assert r.total_params == exact["total_params"], conv
        assert r.active_params == exact["active_params"][conv], conv
        assert r.num_moe_layers == exact["moe_layers"]
        assert r.num_experts == exact["routed_experts_per_moe_layer"]
        assert r.top_k == exact["top_k"]
        assert r.routed_expert_params_per_expert == exact["params_per_routed_expert"]
        _check_sums(r)


@pytest.mark.parametrize("path", REF_FILES[:2], ids=[p.stem for p in REF_FILES[:2]])
def test_config_object_dict_and_plain_config_json_agree(path: Path, tmp_path: Path) -> None:
    ref = _load(path)
    cfg_dict = ref["config"]
    plain = tmp_path / "config.json"
    plain.write_text(json.dumps(cfg_dict))
    expected = ref["exact"]["active_params"]["head"]
    cfg = transformers.AutoConfig.for_model(**cfg_dict)
    for source in (cfg, cfg_dict, plain, str(plain), tmp_path):
        r = count_parameters(source, "head")
        assert r.active_params == expected, type(source)


def _mixtral_hand_count(c: dict[str, Any]) -> tuple[int, int]:
    """Mixtral's total / active ("both") from the config fields alone."""
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    e, k, v = c["num_local_experts"], c["num_experts_per_tok"], c["vocab_size"]
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    expert = 3 * h * i
    per_layer_fixed = attn + e * h + 2 * h  # attention, router, two RMSNorms
    total = layers * (per_layer_fixed + e * expert) + h + 2 * v * h
    active = layers * (per_layer_fixed + k * expert) + h + 2 * v * h
    return total, active


def test_mixtral_matches_hand_formula() -> None:
    path = MODELS_DIR / "mixtral-8x7b-v0.1.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    total, active = _mixtral_hand_count(_load(path)["config"])
    r = count_parameters(path, "both")
    assert (r.total_params, r.active_params) == (total, active)


def test_deepseek_v3_meta_build_is_fast() -> None:
    path = MODELS_DIR / "deepseek-v3.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    count_parameters(MODELS_DIR / REF_FILES[0].name)  # warm the imports
    t0 = time.perf_counter()
    r = count_parameters(path)
    elapsed = time.perf_counter() - t0
    assert r.total_params > 6.7e11
    # 671B on the meta device: no storage, no init work (about 0.2 s on 2 cores).
    assert elapsed < 20, f"meta-device build of DeepSeek-V3 took {elapsed:.1f} s"


def test_deepseek_breakdown_categories() -> None:
    path = MODELS_DIR / "deepseek-v3.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    c = _load(path)["config"]
    r = count_parameters(path)
    h, v = c["hidden_size"], c["vocab_size"]
    n_moe = c["num_hidden_layers"] - c["first_k_dense_replace"]
    assert r.breakdown["embeddings"] == v * h
    assert r.breakdown["head"] == v * h
    assert r.breakdown["dense_ffn"] == c["first_k_dense_replace"] * 3 * h * c["intermediate_size"]
    assert r.breakdown["shared_experts"] == n_moe * 3 * h * c["moe_intermediate_size"]
    assert r.breakdown["router"] == n_moe * c["n_routed_experts"] * h
    assert r.breakdown["other"] == 0
    layer = r.moe_layers[0]
    assert layer.name == f"model.layers.{c['first_k_dense_replace']}.mlp"
    assert layer.params_per_expert == 3 * h * c["moe_intermediate_size"]


# ------------------------------------------------------------------ tied embeddings


def _tiny_mixtral(**kw: Any) -> Any:
    base: dict[str, Any] = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return transformers.MixtralConfig(**base)


def test_tied_matrix_counts_once() -> None:
    untied = {c: count_parameters(_tiny_mixtral(), c) for c in CONVENTIONS}
    tied = {c: count_parameters(_tiny_mixtral(tie_word_embeddings=True), c) for c in CONVENTIONS}
    vh = 64 * 16
    assert tied["both"].tied_embeddings and not untied["both"].tied_embeddings
    assert tied["both"].total_params == untied["both"].total_params - vh
    # One shared matrix: counted under both and head (it is the head), not under none.
    assert tied["both"].active_params == untied["both"].active_params - vh
    assert tied["head"].active_params == untied["head"].active_params
    assert tied["none"].active_params == untied["none"].active_params
    assert untied["both"].active_params - untied["head"].active_params == vh
    assert untied["head"].active_params - untied["none"].active_params == vh


# ------------------------------------------------------------------ moescope.nn models


def _tiny_lm_hand_count(
    v: int,
    h: int,
    layers: int,
    i: int,
    e: int,
    k: int,
    moe_every: int,
    shared: int,
    dense: int,
    tied: bool,
) -> dict[str, int]:
    n_moe = sum(1 for li in range(layers) if (li + 1) % moe_every == 0)
    n_dense = layers - n_moe
    attn = layers * 4 * h * h
    router = n_moe * e * h
    expert = 3 * h * i
    shared_p = n_moe * 3 * h * (shared * i)
    dense_p = n_dense * 3 * h * dense
    norms = layers * 2 * h + h
    emb = v * h
    head = 0 if tied else v * h
    total = attn + router + n_moe * e * expert + shared_p + dense_p + norms + emb + head
    active_both = total - n_moe * (e - k) * expert
    return {
        "total": total,
        "both": active_both,
        "head": active_both - (0 if tied else emb),
        "none": active_both - emb - head,
        "n_moe": n_moe,
    }


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_moe_lm_hand_count(tied: bool) -> None:
    model_mod = pytest.importorskip("moescope.nn.model")
    cfg = model_mod.TinyMoEConfig(
        vocab_size=64,
        hidden_size=16,
        num_layers=3,
        num_heads=2,
        intermediate_size=8,
        num_experts=4,
        top_k=2,
        moe_every=2,
        num_shared_experts=1,
        tie_embeddings=tied,
    )
    model = model_mod.TinyMoELM(cfg)
    want = _tiny_lm_hand_count(64, 16, 3, 8, 4, 2, 2, 1, cfg.dense_size, tied)
    assert sum(p.numel() for p in model.parameters()) == want["total"]
    for conv in CONVENTIONS:
        r = count_parameters(model, conv)
        assert r.total_params == want["total"]
        assert r.active_params == want[conv], conv
        assert r.num_moe_layers == want["n_moe"]
        assert (r.num_experts, r.top_k) == (4, 2)
        _check_sums(r)
    # The config alone gives the same figures (built on the meta device).
    assert count_parameters(cfg, "none").active_params == want["none"]


class _TwoBlockNet(nn.Module):
    """A custom model (no config): embedding, two MoE blocks with different E/K, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.blocks = nn.ModuleList(
            [
                MoELayer(TopKRouter(12, 6, 2), GroupedExperts(6, 12, 5)),
                MoELayer(
                    TopKRouter(12, 4, 1),
                    GroupedExperts(4, 12, 7, gated=False),
                    shared_experts=nn.Linear(12, 12),
                ),
            ]
        )
        self.norm = nn.LayerNorm(12)
        self.lm_head = nn.Linear(12, 50, bias=False)


def test_custom_module_from_moescope_blocks() -> None:
    net = _TwoBlockNet()
    r = count_parameters(net, "both")
    e1 = 3 * 12 * 5  # gated: gate_up [2I, H] + down [H, I]
    e2 = 2 * 12 * 7  # non-gated: up [I, H] + down [H, I]
    total = 50 * 12 + (6 * 12 + 6 * e1) + (4 * 12 + 4 * e2 + 12 * 12 + 12) + 2 * 12 + 50 * 12
    assert r.total_params == total == sum(p.numel() for p in net.parameters())
    assert r.active_params == total - (6 - 2) * e1 - (4 - 1) * e2
    assert [(m.num_experts, m.top_k, m.params_per_expert) for m in r.moe_layers] == [
        (6, 2, e1),
        (4, 1, e2),
    ]
    assert r.num_experts is None and r.top_k is None  # they differ between blocks
    assert r.breakdown["shared_experts"] == 12 * 12 + 12
    assert r.breakdown["norms"] == 24
    assert count_parameters(net, "head").active_params == r.active_params - 50 * 12
    assert count_parameters(net, "both", top_k=1).active_params == total - 5 * e1 - 3 * e2


class _ListExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 8)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(8, 3, bias=False)
        self.mlp.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8)) for _ in range(3)
        )
        self.mlp.top_k = 2


def test_module_list_experts() -> None:
    """A block no built-in adapter captures is not counted either (one detector for the
    monitor and the counts); the user's adapter for it makes both work."""
    from moescope.capture import SimpleAdapter
    from moescope.capture.registry import register_adapter, unregister_adapter
    from moescope.cost import NoMoEError

    with pytest.raises(NoMoEError, match="register an adapter"):
        count_parameters(_ListExperts(), "none")
    adapter = SimpleAdapter(
        match=lambda path, m: path == "mlp",
        extract=lambda mod, args, out: {"topk_index": out.topk(2, dim=-1).indices},
        num_experts=3,
        top_k=lambda m: m.top_k,
        target="gate",
    )
    register_adapter(adapter)
    try:
        r = count_parameters(_ListExperts(), "none")
    finally:
        unregister_adapter(adapter)
    per = 8 * 4 + 4 + 4 * 8 + 8
    assert r.routed_expert_params_per_expert == per
    assert r.total_params == 80 + 24 + 3 * per
    assert r.active_params == 24 + 2 * per
    assert r.breakdown["router"] == 24


def test_switch_transformers_seq2seq_top1() -> None:
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64,
        d_model=16,
        d_ff=32,
        d_kv=4,
        num_heads=2,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_experts=4,
    )
    r = count_parameters(cfg, "both")
    model = transformers.AutoModelForSeq2SeqLM.from_config(cfg)
    assert r.total_params == sum(p.numel() for p in model.parameters())
    assert (r.num_moe_layers, r.num_experts, r.top_k) == (2, 4, 1)
    per = 2 * 16 * 32  # wi + wo, no bias
    assert r.active_params == r.total_params - 2 * 3 * per


# ------------------------------------------------------------------ API surface / errors


def test_lazy_top_level_export_and_to_dict() -> None:
    assert moescope.count_parameters is count_parameters
    r = count_parameters(_tiny_mixtral(), "head")
    d = r.to_dict()
    json.dumps(d)
    assert d["total_params"] == r.total_params and d["active_params"] == r.active_params
    assert d["moe_layers"][0]["num_experts"] == 4


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CostConfigError, match="no such file"):
        count_parameters(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CostConfigError, match="invalid JSON"):
        count_parameters(bad)
    with pytest.raises(CostConfigError, match="unknown model_type 'not_a_model'"):
        count_parameters({"model_type": "not_a_model"})
    with pytest.raises(CostConfigError, match="no 'model_type'"):
        count_parameters({"hidden_size": 8})
    dense = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(NoMoEError, match="no Mixture-of-Experts layer"):
        count_parameters(dense)
    r = count_parameters(dense, "none", require_moe=False)
    assert r.num_moe_layers == 0 and r.active_params == r.total_params - 2 * 32 * 8
    with pytest.raises(ValueError, match="embeddings must be one of"):
        count_parameters(_tiny_mixtral(), "input")  # type: ignore[arg-type]


def test_meta_build_allocates_nothing() -> None:
    from moescope.cost import build_meta_model

    model = build_meta_model(_tiny_mixtral(hidden_size=4096, intermediate_size=14336))
    assert all(p.device == torch.device("meta") for p in model.parameters())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_vl_moe", "switch_transformers"])
def test_every_class_the_architectures_field_names(family: str) -> None:
    """A checkpoint's ``architectures`` picks the class counted: every class transformers
    ships for the family (causal LM, sequence classification, conditional generation, the
    bare model, ...) gives exactly that class's parameters."""
    import hf_sweep

    cfg = hf_sweep.tiny_config(family)
    classes = sorted(
        name
        for name in dir(transformers)
        if name.endswith(
            (
                "Model",
                "ForCausalLM",
                "ForConditionalGeneration",
                "ForSequenceClassification",
                "ForTokenClassification",
                "ForQuestionAnswering",
            )
        )
        and isinstance(cls := getattr(transformers, name, None), type)
        and issubclass(cls, transformers.PreTrainedModel)
        and getattr(cls, "config_class", None) is type(cfg)
    )
    assert len(classes) >= 2, classes
    for name in classes:
        cfg.architectures = [name]
        with torch.device("meta"):
            model = getattr(transformers, name)._from_config(cfg)
        expected = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        try:
            report = count_parameters(cfg)
        except NoMoEError:
            continue  # a head without the MoE decoder (none today; kept honest)
        assert report.total_params == expected, name


def test_architectures_naming_another_family_is_an_error() -> None:
    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        architectures=["Qwen3MoeForCausalLM"],
    )
    with pytest.raises(CostConfigError, match="Qwen3MoeConfig"):
        count_parameters(cfg)


def test_multimodal_total_counts_every_tower_and_active_only_the_text_path() -> None:
    """Qwen3-VL-MoE: the vision tower is in the total and in ``towers``; a text token's
    active count leaves it out and says so."""
    import hf_sweep

    model = hf_sweep.build_family("qwen3_vl_moe").model
    r = count_parameters(model)
    visual = sum(p.numel() for p in model.model.visual.parameters())
    assert r.active_path == "text token"
    assert r.towers["vision"] == visual > 0
    assert r.towers["text"] == r.total_params - visual
    text_only = count_parameters(model.model.language_model)
    lm_head = model.lm_head.weight.numel()
    assert r.active_params == text_only.active_params + (0 if r.tied_embeddings else lm_head)
