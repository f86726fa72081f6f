"""Every MoE family of the installed transformers, as tiny random models (no download).

Used by tests/test_families_sweep.py. Three parts:

- :func:`moe_families` enumerates the model types whose modeling module defines an MoE
  block, by inspecting the installed package (not a hand-written list);
- :func:`build_family` builds a tiny random model of one family from its config class,
  every size field shrunk and every layer made sparse;
- :func:`ground_truth_hooks` installs plain forward pre-hooks on the experts modules that
  record the expert index each one RECEIVED (independent of moescope's adapters).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 128
HIDDEN = 32
EXPERTS = 8
TOP_K = 2
LAYERS = 2
BATCH, SEQ = 3, 6

# ----------------------------------------------------------------------------- enumeration

#: Config fields holding the number of ROUTED experts (any one marks an MoE config).
EXPERT_COUNT_FIELDS: tuple[str, ...] = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
)

# ``self.experts = ...`` / ``self.experts: T = ...`` inside a modeling module.
_EXPERTS_ASSIGN = re.compile(r"^\s+self\.experts\s*(?::[^=\n]*)?=", re.MULTILINE)


def _config_class(model_type: str) -> type | None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name = CONFIG_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def _config_fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "attribute_map", {}))
    return set(getattr(cls, "attribute_map", {}))


@functools.cache
def moe_families() -> tuple[str, ...]:
    """Model types of the installed transformers with an MoE block, sorted.

    Criterion (both read off the package, nothing hand-listed): a folder of
    ``transformers/models`` with a ``modeling_*.py`` module that

    1. assigns ``self.experts`` in a module's ``__init__`` (the experts container of an
       MoE block: a fused experts module, a ModuleList/ModuleDict of experts, or
       mixture-of-attention experts), or
    2. whose own config class declares a routed-expert count field
       (:data:`EXPERT_COUNT_FIELDS`); this catches blocks that keep their experts under
       another name (doge: product-key experts held in ``nn.Embedding`` tables).

    Config-only aliases (a config folder without a modeling module, e.g. a model type
    mapped onto another family's classes) are not separate architectures and are left
    out; so are composite models whose config only nests another family's MoE text
    config.
    """
    import transformers

    root = pathlib.Path(transformers.models.__file__).parent
    out = []
    for folder in sorted(root.iterdir()):
        modeling = sorted(folder.glob("modeling_*.py"))
        if not modeling:
            continue
        if any(_EXPERTS_ASSIGN.search(m.read_text(encoding="utf-8")) for m in modeling):
            out.append(folder.name)
            continue
        text = "".join(p.read_text(encoding="utf-8") for p in folder.glob("configuration_*.py"))
        if not any(f in text for f in EXPERT_COUNT_FIELDS):
            continue
        cls = _config_class(folder.name)
        if cls is not None and _config_fields(cls) & set(EXPERT_COUNT_FIELDS):
            out.append(folder.name)
    return tuple(out)


def model_types_of(folder: str) -> list[str]:
    """Every model type whose code lives in ``transformers/models/<folder>``."""
    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING_NAMES,
        model_type_to_module_name,
    )

    return [t for t in CONFIG_MAPPING_NAMES if model_type_to_module_name(t) == folder]


# ----------------------------------------------------------------------------- building

# Auto mappings tried in order for the class to build: the head a user would load.
_HEAD_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES",
)

# Every config field below that a config class (or one of its sub-configs) declares is set
# to this value: tiny sizes, every layer sparse, E = 8 routed experts, K = 2.
SHRINK: dict[str, Any] = {
    # sizes
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "d_ff": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_hidden_layers": LAYERS,
    "num_layers": LAYERS,
    "n_layers": LAYERS,
    "n_heads": 4,
    "max_seq_len": 128,
    "ffn_hidden_size": 32,
    "num_decoder_layers": LAYERS,
    "encoder_layers": LAYERS,
    "decoder_layers": LAYERS,
    "depth": 1,
    "num_attention_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 4,  # = heads: MLA and several validators require it
    "head_dim": 8,
    "d_kv": 8,
    "embed_dim": HIDDEN,
    "out_hidden_size": HIDDEN,
    "projection_dim": HIDDEN,
    "max_position_embeddings": 128,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    "unpadded_vocab_size": VOCAB,
    "projector_hidden_size": HIDDEN,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    # experts
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "moe_topk": TOP_K,
    "moe_k": TOP_K,
    "moe_top_k": TOP_K,
    "top_k_experts": TOP_K,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "expert_intermediate_size": 32,
    "moe_hidden_size": HIDDEN,
    "n_shared_experts": 1,
    "zero_expert_num": 4,
    "n_group": 1,
    "topk_group": 1,
    # every layer sparse
    "enable_moe_block": True,
    "is_moe": True,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_layer_start_index": 0,
    "moe_layer_interval": 1,
    "moe_layer_freq": 1,
    "expert_layer_period": 1,
    "expert_layer_offset": 0,
    "num_sparse_encoder_layers": LAYERS,
    "num_sparse_decoder_layers": LAYERS,
    "sparse_step": 1,
    "encoder_sparse_step": 1,
    # multi-head latent attention
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 8,
    # Mamba / linear attention
    "mamba_d_state": 4,
    "mamba_d_conv": 2,
    "mamba_expand": 2,
    "mamba_dt_rank": 4,
    "mamba_n_heads": 4,
    "mamba_head_dim": 16,
    "mamba_n_groups": 1,
    "ssm_state_size": 4,
    "conv_kernel": 2,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 2,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    # vision towers (built, not run: the batch is text only)
    "image_size": 32,
    "patch_size": 8,
}

#: Per family: config overrides on top of SHRINK (keys ``"text_config.x"`` reach a
#: sub-config), with the reason in a comment.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Sliding-window layers take their (full-size) MLA sizes from swa_* keys.
    "dots3_note": {
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "swa_q_lora_rank": 16,
        "swa_kv_lora_rank": 16,
        "swa_head_dim": 16,
        "swa_qk_nope_head_dim": 8,
        "swa_v_head_dim": 8,
        "index_n_heads": 2,
        "index_head_dim": 16,
    },
    # Block diffusion: a 4-token canvas (default 256).
    "diffusion_gemma": {"canvas_length": 4},
    # Task experts each output part_features of the hidden size (default 256 > 32).
    "vitpose_backbone": {"part_features": 8},
    # Product keys: E must be a square (sqrt(E) keys per half).
    "doge": {"num_experts": 16},
    # DbrxAttention reads rope_theta, which the attention sub-config only has when given.
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    # Multimodal RoPE sections live in the modeling code's defaults (not the config):
    # give sections that fit the tiny rotary dim.
    "glm4v_moe": {
        "text_config.rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [1, 1, 0],
        }
    },
    "ernie4_5_vl_moe": {
        "text_config.rope_parameters": {
            "rope_type": "default",
            "rope_theta": 500000.0,
            "mrope_section": [1, 1, 2],
        }
    },
    # Hybrids: one attention layer besides the Mamba one (the cache needs one), MoE on each.
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Sliding-window layers double the KV heads: keep them <= the query heads.
    "mimo_v2_flash": {"num_key_value_heads": 2},
    # The audio tower validates one (patch, width, depth) entry per stage: keep its 4 stages.
    "muse_spark": {
        "audio_config.num_hidden_layers": 4,
        "audio_config.hidden_sizes": [8, 8, 8, 8],
        "audio_config.depths": [1, 1, 1, 1],
    },
    # The thinker's multimodal RoPE index reads this id (a field of the composite config).
    "qwen3_omni_moe": {"vision_start_token_id": VOCAB - 1},
    # Indexed (sparse) attention layers need their indexer sizes.
    "qwen4_exp": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    # The model always builds a sliding-window mask.
    "step3p7": {"text_config.sliding_window": 8},
    # The config validator accepts top-1 routing only.
    "zaya": {"num_experts_per_tok": 1},
    # nemotron_h: one block kind per layer; two MoE layers between Mamba and attention.
    "nemotron_h": {
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "moe", "full_attention", "moe"],
    },
}


#: Families moescope declares out of scope: MoEMonitor must raise UnsupportedModelError
#: whose message contains the given phrase (checked by :func:`check_family`).
OUT_OF_SCOPE: dict[str, tuple[str, str]] = {
    "vitpose_backbone": (
        "task-indexed",
        "experts picked by the caller's dataset_index (one expert per dataset), no router: "
        "nothing is routed, so there is no routing to monitor",
    ),
}


@dataclass
class Built:
    """A tiny model of one family, its batch, and which tokens of a block call are real."""

    family: str
    model: nn.Module
    config: Any
    inputs: dict[str, torch.Tensor]
    #: block path -> [T] bool, True for real tokens (the decoder's mask for blocks under a
    #: ``decoder`` module, else the prompt's)
    valid_for: Callable[[str], torch.Tensor]


def _transformers() -> Any:
    import transformers

    return transformers


def _get(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)`` that also swallows config access errors
    (heterogeneous configs raise on ambiguous per-layer attributes)."""
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _default_instance(cls: type) -> Any:
    try:
        return cls()
    except Exception:
        return None


def shrink_kwargs(cls: type, depth: int = 0) -> dict[str, Any]:
    """Config kwargs that shrink ``cls`` and its sub-configs (as dicts)."""
    fields = _config_fields(cls)
    kw: dict[str, Any] = {k: v for k, v in SHRINK.items() if k in fields}
    default = _default_instance(cls)
    for k, v in list(kw.items()):
        # Per-modality lists (ernie4_5_vl_moe: [text, vision] experts) keep their length.
        dv = _get(default, k)
        if dv == 0 and isinstance(dv, int) and not isinstance(dv, bool):
            del kw[k]  # a size the family sets to 0 (NoPE attention, no shared expert)
        elif isinstance(dv, (list, tuple)) and dv and not isinstance(v, list):
            kw[k] = [v] * len(dv)
    from transformers import PreTrainedConfig

    specs = getattr(cls, "sub_configs_defaults", {}) or {}
    # Sub-configs: the declared ones, and config-valued fields (dbrx's attn/ffn configs).
    for key in [*specs, *(f for f in sorted(fields) if f not in specs)]:
        sub = _get(default, key)
        if not isinstance(sub, PreTrainedConfig):
            continue
        sub_kw = shrink_kwargs(type(sub), depth + 1)
        if key in specs:
            sub_kw["model_type"] = type(sub).model_type
        kw[key] = sub_kw
    if default is not None:
        _fix_layer_lists(cls, default, kw)
        _fix_mrope(default, kw)
    return kw


def _rotary_dim(cfg: Any) -> int | None:
    for name in ("qk_rope_head_dim", "head_dim"):
        v = _get(cfg, name)
        if isinstance(v, int) and v > 0:
            return v
    h, n = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    return h // n if isinstance(h, int) and isinstance(n, int) and n else None


def _fix_mrope(default: Any, kw: dict[str, Any]) -> None:
    """Multimodal RoPE sections sum to a fixed share of the rotary dim: rescale them."""
    rope = _get(default, "rope_parameters")
    if not isinstance(rope, dict) or not isinstance(rope.get("mrope_section"), list):
        return
    sec = rope["mrope_section"]
    old, new = _rotary_dim(default), _rotary_dim({**kw})
    if not old or not new:
        return
    total = max(1, round(sum(sec) * new / old))
    raw = [s * total / sum(sec) for s in sec]
    ints = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: ints[i] - raw[i])[: total - sum(ints)]:
        ints[i] += 1
    kw["rope_parameters"] = {**rope, "mrope_section": ints}


def _fix_layer_lists(cls: type, default: Any, kw: dict[str, Any]) -> None:
    """Per-layer lists (``layer_types``, ``mlp_layer_types``...) of length LAYERS: every
    MLP sparse; attention kinds of the default pattern kept (first and last kind)."""
    fields = _config_fields(cls)
    for name in fields:
        if not name.endswith("layer_types") or name not in fields:
            continue
        val = _get(default, name)
        if val is None and name == "mlp_layer_types":
            kw[name] = ["sparse"] * LAYERS  # left None by the config, read by the model
            continue
        if (
            not isinstance(val, (list, tuple))
            or not val
            or not all(isinstance(v, str) for v in val)
        ):
            continue
        kinds = list(dict.fromkeys(val))
        if name.startswith("mlp") or name.endswith("mlp_layer_types"):
            sparse = [k for k in kinds if k.lower() not in ("dense", "mlp")] or kinds
            kw[name] = (sparse * LAYERS)[:LAYERS]  # two sparse kinds (hash_moe, sparse) kept
        else:
            kw[name] = [kinds[0], kinds[-1]][:LAYERS] if len(kinds) > 1 else [kinds[0]] * LAYERS


def _set_dotted(kw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    d = kw
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def model_class(family: str) -> type:
    """The class to build: the family's causal-LM / seq2seq / image-text-to-text head from
    the auto mappings, else its base model, else a ``*ForConditionalGeneration`` /
    ``*ForCausalLM`` / ``*Model`` class of the modeling module."""
    tr = _transformers()
    from transformers.models.auto import modeling_auto

    types = model_types_of(family)
    for mapping in _HEAD_MAPPINGS:
        names = getattr(modeling_auto, mapping)
        for t in types:
            name = names.get(t)
            if isinstance(name, (list, tuple)):
                name = name[0]
            if name and hasattr(tr, name):
                return getattr(tr, name)
    mod = importlib.import_module(f"transformers.models.{family}")
    for suffix in ("ForConditionalGeneration", "ForCausalLM", "Model"):
        for name in getattr(mod, "__all__", dir(mod)):
            if name.endswith(suffix) and not name.endswith("PreTrainedModel"):
                return getattr(mod, name)
    raise LookupError(f"no model class for {family}")


def tiny_config(family: str) -> Any:
    cls = model_class(family).config_class
    kw = shrink_kwargs(cls)
    for key, value in OVERRIDES.get(family, {}).items():
        _set_dotted(kw, key, value)
    return cls(**kw)


def randomize_(model: nn.Module, seed: int) -> None:
    """Routers and all-zero matrices get random values (transformers zero-inits some
    routers: every score would tie)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            routerish = any(s in name for s in ("gate.weight", "router.weight", "router.proj"))
            if routerish or (p.dim() >= 2 and p.abs().sum() == 0):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], attention_mask [B, S]): right padding on every row but the first."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for b in range(1, BATCH):
        mask[b, SEQ - min(2 * b, SEQ - 1) :] = 0
    return ids.masked_fill(mask == 0, 0), mask


def build_family(family: str, seed: int = 0) -> Built:
    """The tiny model of ``family`` and its right-padded batch.

    Decoder-only and multimodal models get ``input_ids`` / ``attention_mask`` (text only).
    Models whose forward takes ``decoder_input_ids`` also get a decoder batch:
    encoder-decoder models the same right-padded ids and ``decoder_attention_mask``;
    block-diffusion models (a ``canvas_length`` in the config: diffusion_gemma) a canvas
    of random ids, every canvas token real, with ``decoder_attention_mask`` covering the
    prompt's cache (the prompt's padding) and the canvas. ``Built.valid_for(path)`` is the
    decoder's mask for blocks under a ``decoder`` module, else the prompt's.
    """
    cls = model_class(family)
    cfg = tiny_config(family)
    torch.manual_seed(seed)
    model = cls(cfg)
    randomize_(model, seed)
    model.eval()
    ids, mask = padded_batch()
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    enc_valid = dec_valid = mask.reshape(-1).bool()
    if "decoder_input_ids" in _param_names(model.forward):
        canvas = _get(cfg, "canvas_length")
        if isinstance(canvas, int) and canvas > 0:
            gen = torch.Generator().manual_seed(seed + 1)
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, canvas), generator=gen)
            inputs["decoder_attention_mask"] = torch.cat(
                [mask, torch.ones(BATCH, canvas, dtype=mask.dtype)], dim=1
            )
            dec_valid = torch.ones(BATCH * canvas, dtype=torch.bool)
        else:
            inputs["decoder_input_ids"] = ids
            inputs["decoder_attention_mask"] = mask

    def valid_for(path: str) -> torch.Tensor:
        return dec_valid if "decoder" in path.split(".") else enc_valid

    return Built(family, model, cfg, inputs, valid_for)


# ----------------------------------------------------------------------------- ground truth


@dataclass
class Dispatch:
    """One MoE block call as its experts received it: row r of the call went to expert
    ``experts[r]`` for token ``tokens[r]`` (a row of the flattened [T] tokens)."""

    num_tokens: int
    tokens: torch.Tensor
    experts: torch.Tensor


@dataclass
class GroundTruth:
    """Plain hooks (no moescope code) recording every block call's dispatch."""

    #: block path -> how its dispatch is read (see :func:`ground_truth_hooks`)
    kinds: dict[str, str] = field(default_factory=dict)
    calls: dict[str, list[Dispatch]] = field(default_factory=dict)
    #: block path -> per call: is the router's first output a distribution (rows >= 0
    #: summing to 1)? Then moescope must report it as ``score_fn="probs"``.
    slot0_is_probs: dict[str, list[bool]] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _slots(index: torch.Tensor) -> Dispatch:
    """[T, K] (or [..., K]) expert index -> one row per (token, slot)."""
    idx = index.detach().reshape(-1, index.shape[-1])
    t, k = idx.shape
    return Dispatch(t, torch.arange(t).repeat_interleave(k), idx.reshape(-1).long().cpu())


def _nonzero(mask: torch.Tensor) -> Dispatch:
    """[T, E] (or [T, 1, E]) non-zero entries -> rows (token, expert)."""
    m = mask.detach().reshape(mask.shape[0], -1)
    tok, exp = torch.nonzero(m != 0, as_tuple=True)
    return Dispatch(m.shape[0], tok.cpu(), exp.cpu())


def _param_names(fn: Callable[..., Any]) -> list[str]:
    import inspect

    try:
        return [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str], i: int) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(names[i]) if len(names) > i else None


def ground_truth_hooks(model: nn.Module) -> GroundTruth:
    """Hook every MoE block of ``model`` with plain forward (pre-)hooks.

    How a block's dispatch is read, by what its experts module receives:

    - ``index``: ``experts(hidden, index [T, K], weights)`` (the common fused experts,
      dbrx, gpt_oss' ``router_indices``; ids >= E are zero-compute experts): the index.
    - ``onehot``: switch_transformers' ``experts(hidden, selected_experts [T, 1, E] one-hot
      with over-capacity tokens zeroed, weights)``: the non-zero entries.
    - ``combine``: nllb_moe's ``experts(hidden, top1_mask, combine_weights [T, E])``: the
      non-zero combine weights (top-1 and top-2 slots the model keeps).
    - ``dense_scaled``: llama4's ``experts(x.repeat(E) * scores)`` runs every expert on
      every token, scaled by the token's gate: rows that are not all zero.
    - ``split_sizes``: jetmoe's ``ParallelExperts(x[batch_index], expert_size)`` splits its
      rows by ``expert_size``; ``batch_index`` (the router's output) names their tokens.
    - ``embedding``: doge's product-key experts are rows of ``down_embed`` /
      ``up_embed``; the ids ``down_embed`` receives are the dispatch.
    """
    gt = GroundTruth()

    def add(path: str, kind: str, hook_on: nn.Module, fn: Callable[..., Any], pre: bool) -> None:
        gt.kinds[path] = kind
        gt.calls.setdefault(path, [])
        if pre:
            h = hook_on.register_forward_pre_hook(fn, with_kwargs=True)
        else:
            h = hook_on.register_forward_hook(fn)
        gt.handles.append(h)

    for path, mod in model.named_modules():
        rec = functools.partial(lambda p, d: gt.calls[p].append(d), path)
        router = getattr(mod, "router", None)
        experts = getattr(mod, "experts", None)
        # jetmoe: a block with a router and ParallelExperts input/output projections.
        if isinstance(getattr(mod, "input_linear", None), nn.Module) and isinstance(
            router, nn.Module
        ):

            def split_hook(m: nn.Module, args: Any, out: Any, rec: Any = rec) -> None:
                _, batch_index, _, expert_size, _ = out
                sizes = torch.as_tensor(expert_size)
                exp = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
                rec(Dispatch(out[4].shape[0], batch_index.detach().cpu(), exp))

            add(path, "split_sizes", router, split_hook, pre=False)
            continue
        # doge: product-key experts stored as embedding rows.
        if isinstance(getattr(mod, "down_embed", None), nn.Embedding) and isinstance(
            getattr(mod, "up_embed", None), nn.Embedding
        ):

            def emb_hook(m: nn.Module, args: Any, kwargs: Any, rec: Any = rec) -> None:
                rec(_slots(args[0]))

            add(path, "embedding", mod.down_embed, emb_hook, pre=True)
            continue
        if not isinstance(experts, nn.Module) or isinstance(
            getattr(experts, "input_linear", None), nn.Module
        ):
            continue
        names = _param_names(experts.forward)
        second = names[1] if len(names) > 1 else ""
        if "index" in second or "indices" in second:

            def index_hook(
                m: nn.Module, args: Any, kwargs: Any, rec: Any = rec, names: list[str] = names
            ) -> None:
                rec(_slots(_arg(args, kwargs, names, 1)))

            add(path, "index", experts, index_hook, pre=True)
            router = next(
                (
                    c
                    for n in ("gate", "router")
                    if isinstance(c := getattr(mod, n, None), nn.Module)
                ),
                None,
            )
            if router is not None:

                def probs_hook(m: nn.Module, args: Any, out: Any, path: str = path) -> None:
                    s0 = out[0] if isinstance(out, (tuple, list)) and out else None
                    if isinstance(s0, torch.Tensor) and s0.is_floating_point() and s0.dim() >= 2:
                        x = s0.detach().double()
                        is_dist = bool((x >= 0).all()) and bool(
                            torch.allclose(x.sum(-1), torch.ones(()).double(), atol=1e-4)
                        )
                        gt.slot0_is_probs.setdefault(path, []).append(is_dist)

                gt.handles.append(router.register_forward_hook(probs_hook))
        elif second == "selected_experts":

            def onehot_hook(
                m: nn.Module, args: Any, kwargs: Any, rec: Any = rec, names: list[str] = names
            ) -> None:
                rec(_nonzero(_arg(args, kwargs, names, 1)))

            add(path, "onehot", experts, onehot_hook, pre=True)
        elif second == "router_mask":

            def combine_hook(
                m: nn.Module, args: Any, kwargs: Any, rec: Any = rec, names: list[str] = names
            ) -> None:
                rec(_nonzero(_arg(args, kwargs, names, 2)))

            add(path, "combine", experts, combine_hook, pre=True)
        elif len(names) == 1 and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            num = experts.gate_up_proj.shape[0]

            def dense_hook(
                m: nn.Module, args: Any, kwargs: Any, rec: Any = rec, num: int = num
            ) -> None:
                x = args[0].detach().reshape(num, -1, args[0].shape[-1])  # [E, T, H]
                d = _nonzero((x != 0).any(-1).T)  # [T, E]
                rec(d)

            add(path, "dense_scaled", experts, dense_hook, pre=True)
    return gt


# ----------------------------------------------------------------------------- checks


def routed_experts(config: Any) -> int | None:
    """E: the routed-expert count of ``config`` or of its first sub-config that has one."""
    seen: set[int] = set()
    stack = [config]
    while stack:
        cfg = stack.pop(0)
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        for name in EXPERT_COUNT_FIELDS:
            v = _get(cfg, name)
            if isinstance(v, (list, tuple)) and v:
                v = v[0]
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        for key in getattr(type(cfg), "sub_configs_defaults", {}) or {}:
            sub = _get(cfg, key)
            if sub is not None:
                stack.append(sub)
        for key in ("ffn_config",):
            sub = _get(cfg, key)
            if sub is not None:
                stack.append(sub)
    return None


def hook_state(model: nn.Module) -> list[tuple[str, int, int, int, int, int, frozenset[str]]]:
    """Per module: its hook counts and instance attribute names (a patched forward or an
    instance attribute left behind shows up here)."""
    out = []
    for name, m in model.named_modules():
        out.append(
            (
                name,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
                len(m._forward_hooks_with_kwargs) + len(m._forward_pre_hooks_with_kwargs),
                frozenset(m.__dict__),
            )
        )
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for _, v in out.items() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _same_outputs(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        for x, y in zip(ta, tb, strict=True)
    )


@dataclass
class FamilyResult:
    family: str
    model_class: str = ""
    problems: list[str] = field(default_factory=list)
    layers: int = 0
    kinds: set[str] = field(default_factory=set)
    adapters: set[str] = field(default_factory=set)
    neurons: str = ""
    seconds: float = 0.0
    #: blocks the batch never called (their expert group serves another modality)
    idle: list[str] = field(default_factory=list)


def check_family(family: str, neurons: bool = True) -> FamilyResult:
    """Build ``family`` tiny, run the padded batch without and with a monitor, compare."""
    import time

    from moescope import MoEMonitor
    from moescope.errors import UnsupportedModelError

    t0 = time.perf_counter()
    res = FamilyResult(family)
    b = build_family(family)
    model = b.model
    res.model_class = type(model).__name__
    if family in OUT_OF_SCOPE:
        phrase = OUT_OF_SCOPE[family][0]
        try:
            MoEMonitor(model)
            res.problems.append("out of scope, but MoEMonitor attached without an error")
        except UnsupportedModelError as e:
            if phrase not in str(e):
                res.problems.append(f"unclear error (no {phrase!r}): {e}")
            res.neurons = "out of scope"
        res.seconds = time.perf_counter() - t0
        return res
    e_true = routed_experts(b.config)
    with torch.no_grad():
        ref = model(**b.inputs)
    # After one plain forward: some modules set attributes of their own when first called.
    before = hook_state(model)

    gt = ground_truth_hooks(model)
    if not gt.kinds:
        res.problems.append("test: no MoE block with a known dispatch (no ground truth)")
    try:
        mon = MoEMonitor(model)
    except UnsupportedModelError as e:
        gt.remove()
        res.problems.append(f"not found: {str(e)[:160]}")
        res.seconds = time.perf_counter() - t0
        return res
    try:
        with torch.no_grad():
            out = model(**b.inputs)
        snap = mon.snapshot()
    finally:
        mon.detach()
        gt.remove()
    res.layers = len(mon.layers)
    res.kinds = set(gt.kinds.values())
    res.adapters = {i.adapter for i in mon.layers}

    # 1. found: every block with a dispatch, nothing else.
    found = {i.path: i for i in mon.layers}
    if set(found) != set(gt.kinds):
        res.problems.append(
            f"found {sorted(set(found) - set(gt.kinds))} extra, "
            f"{sorted(set(gt.kinds) - set(found))} missed"
        )
    # 2. counted exactly, padding excluded.
    expected: dict[str, int] = {}  # path -> kept rows on real experts (neuron rows)
    for path, calls in gt.calls.items():
        info = found.get(path)
        if info is None:
            continue
        if e_true is not None and info.num_experts != e_true:
            res.problems.append(f"{path}: E = {info.num_experts}, config has {e_true} routed")
        e = e_true or info.num_experts
        valid = b.valid_for(path)
        want = torch.zeros(e, dtype=torch.long)
        extra = n_tok = 0
        for d in calls:
            if valid.numel() != d.num_tokens:
                res.problems.append(f"{path}: test has no mask for {d.num_tokens} tokens")
                break
            ex = d.experts[valid[d.tokens]]
            want += torch.bincount(ex[ex < e], minlength=e)[:e]
            extra += int((ex >= e).sum())
            n_tok += int(valid.sum())
        # A block the text batch never reaches (a vision-token expert group) counts nothing.
        st = snap.layers[path]
        got = [int(x) for x in st.usage_counts]
        if got != want.tolist():
            res.problems.append(f"{path}: counts {got} != experts received {want.tolist()}")
        if int(st.extra_slots) != extra:
            res.problems.append(f"{path}: extra_slots {st.extra_slots} != {extra}")
        if int(st.num_tokens) != n_tok:
            res.problems.append(f"{path}: {st.num_tokens} tokens counted, {n_tok} real")
        if not calls:
            res.idle.append(path)
        expected[path] = int(want.sum())
    # 2b. a router whose first output is already a distribution is reported as such.
    for path, flags in gt.slot0_is_probs.items():
        info = found.get(path)
        # The generic adapter reads score_fn off the router; dedicated ones hard-code theirs.
        generic = info is not None and info.adapter == "transformers.generic"
        fn = info.score_fn if generic and info is not None else None
        if fn is not None and flags and all(flags) != (fn == "probs"):
            res.problems.append(
                f"{path}: router output 0 {'is' if all(flags) else 'is not'} a distribution, "
                f"score_fn={fn!r}"
            )
    # 3. outputs bit-identical.
    if not _same_outputs(ref, out):
        res.problems.append("outputs differ with the monitor attached")
    # 4. nothing left after detach.
    if hook_state(model) != before:
        res.problems.append("hooks or attributes left after detach")
    # 5. neurons finite, or unsupported with a clear message.
    if neurons:
        res.neurons = _check_neurons(model, b, res, expected)
    res.seconds = time.perf_counter() - t0
    return res


def _check_neurons(model: nn.Module, b: Built, res: FamilyResult, expected: dict[str, int]) -> str:
    """``MoEMonitor(model, neurons=True)``: every layer either has finite neuron statistics
    over exactly the kept rows of real tokens, or is named as unsupported (a warning, or
    an UnsupportedModelError telling to use ``neurons=False`` when no layer is)."""
    import math
    import warnings

    from moescope import MoEMonitor
    from moescope.errors import UnsupportedModelError

    before = hook_state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mon = MoEMonitor(model, neurons=True)
        except UnsupportedModelError as e:
            if "neurons=False" not in str(e):
                res.problems.append(f"neurons: unclear error {e}")
            return "unsupported"
        try:
            with torch.no_grad():
                model(**b.inputs)
            snap = mon.snapshot()
        finally:
            mon.detach()
    messages = " ".join(str(w.message) for w in caught)
    status = []
    for path, st in snap.layers.items():
        if st.intermediate_size is None:
            if f"{path} (" not in messages:
                res.problems.append(f"neurons: {path} has no neuron stats and no warning")
            status.append("unsupported")
            continue
        want_rows = expected.get(path, 0)
        if st.neuron_rows != want_rows:
            res.problems.append(f"neurons: {path} counted {st.neuron_rows} rows, {want_rows} real")
        vals = [st.activated_neurons_mean, st.neuron_sparsity]
        if want_rows and not all(v is not None and math.isfinite(v) for v in vals):
            res.problems.append(f"neurons: {path} not finite: {vals}")
        status.append("finite")
    if hook_state(model) != before:
        res.problems.append("neurons: hooks or attributes left after detach")
    return "/".join(sorted(set(status)))


# ----------------------------------------------------------------------------- active params


class _ReadParams(torch.overrides.TorchFunctionMode):
    """Records which parameters any torch function received (read during the forward)."""

    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids = ids
        self.read: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        stack: list[Any] = [args, kwargs]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                if id(x) in self.ids:
                    self.read.add(id(x))
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
            elif isinstance(x, dict):
                stack.extend(x.values())
        return func(*args, **kwargs)


def _expert_rows(name: str, p: torch.Tensor) -> int | None:
    """Rows of an expert tensor (one per expert), None for a tensor every token uses.

    By name and shape only: a 3-D [E, out, in] tensor; a tensor under an ``experts``
    module (not shared experts) or
    an expert embedding (doge's ``down_embed`` / ``up_embed``) with E leading rows, one
    row per expert for a 3-D store with more rows (zero-compute experts), or E stacked
    groups of rows (dbrx's [E * I, H]).
    """
    parts = name.split(".")
    if any("shared" in q for q in parts) or p.dim() < 2:
        return None
    if p.dim() == 3 and p.shape[0] == EXPERTS:
        return EXPERTS  # [E, out, in]: an expert store whatever its name (jetmoe's mlp)
    if not (
        any(q.endswith("experts") for q in parts[:-1])
        or parts[-1] in ("down_embed", "up_embed")
        or (len(parts) > 1 and parts[-2] in ("down_embed", "up_embed"))
    ):
        return None
    d = p.shape[0]
    if parts[-1] in ("down_embed", "up_embed") or parts[-2] in ("down_embed", "up_embed"):
        return d  # one embedding row per expert
    if d == EXPERTS or (p.dim() >= 3 and d > EXPERTS):
        return d
    if d % EXPERTS == 0:
        return EXPERTS
    return None


def touched_parameters(built: Built) -> tuple[int, list[str]]:
    """Parameters ONE text token uses, measured on the model, independent of moescope.

    The first token of the batch alone (and one decoder token for seq2seq models) runs
    forward and backward. A routed expert is used when its rows (or, for a ModuleList of
    experts, any of its tensors) got a non-zero gradient; any other parameter when a
    torch function read it during the forward; the input embedding and the output head
    count whole (the "both" convention). Returns (count, names of unread parameters).
    """
    model = built.model
    model.zero_grad(set_to_none=True)
    inputs = {k: v[:1, :1] if v.dim() >= 2 else v for k, v in built.inputs.items()}
    named = {id(p): (n, p) for n, p in model.named_parameters()}
    mode = _ReadParams(set(named))
    with mode:
        out = model(**inputs)
    y = next(v for v in _float_leaves(out) if v.requires_grad)
    (y * torch.randn_like(y)).sum().backward()

    whole = {id(p) for p in model.get_input_embeddings().parameters()}
    head = model.get_output_embeddings()
    whole |= {id(p) for p in head.parameters()} if head is not None else set()
    members: dict[int, bool] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and mname.endswith("experts"):
            for expert in mod.values() if isinstance(mod, nn.ModuleDict) else mod:
                ps = list(expert.parameters())
                hit = any(q.grad is not None and bool(q.grad.any()) for q in ps)
                members.update((id(q), hit) for q in ps)
    total, unread = 0, []
    for pid, (name, p) in named.items():
        if pid in whole:
            total += p.numel()
        elif pid in members:
            total += p.numel() if members[pid] else 0
        elif (rows := _expert_rows(name, p)) is not None:
            g = p.grad
            used = 0 if g is None else int(g.reshape(rows, -1).ne(0).any(1).sum())
            total += used * (p.numel() // rows)
        elif pid in mode.read:
            total += p.numel()
        else:
            unread.append(name)
    return total, unread


def _float_leaves(out: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [out]
    while stack:
        x = stack.pop(0)
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                found.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "values"):
            stack.extend(x.values())
    return found
