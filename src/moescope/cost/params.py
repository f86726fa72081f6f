"""Total and active parameter counts of a Mixture-of-Experts model.

Counts are structural: the model is instantiated (on the meta device when only a config is
given, so no memory is allocated) and every parameter is counted once. Routed experts are
found by the module tree, not by names in the config:

- a block with an ``experts`` child that is ONE fused module whose parameters all carry
  the expert dimension first (transformers 5.x: ``gate_up_proj`` [E, 2I, H],
  ``down_proj`` [E, H, I], optional ``*_bias`` [E, ...]; moescope's ``GroupedExperts``), or
- a block with an ``experts`` child that is a ``ModuleList`` / ``ModuleDict`` of E experts
  (switch_transformers, nllb_moe, older custom code).

Siblings of ``experts`` in that block are the router (``gate``/``router``) and the shared
experts (``shared_expert``, ``shared_experts``, ``shared_expert_gate``), which run for every
token.

Active parameters per token (the definition in DESIGN.md, "Model level")::

    active = total - sum over MoE layers of (E - K) * params_per_expert
                   - embeddings excluded by the convention

Conventions for the embedding matrices, because vendors differ (an explicit argument,
never a hidden default):

- ``"both"``: input embedding and output head counted (DeepSeek-V3's 36.7B, Mixtral).
- ``"head"``: the output head counted, the input embedding (a table lookup) not
  (OpenAI's gpt-oss model card).
- ``"none"``: neither ("non-embedding" counts, Kaplan et al. 2020).

A tied embedding/head matrix is one tensor and counts once: under ``"both"`` and
``"head"`` it is counted (it is the head), under ``"none"`` it is not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moescope._optional import require
from moescope.capture.adapter import LayerInfo
from moescope.capture.hf_structure import find_router
from moescope.capture.registry import find_moe_layers
from moescope.nn.model import TinyMoEConfig, TinyMoELM

EmbeddingConvention = Literal["both", "head", "none"]
EMBEDDING_CONVENTIONS: tuple[str, ...] = ("both", "head", "none")

BREAKDOWN_KEYS: tuple[str, ...] = (
    "attention",
    "router",
    "routed_experts",
    "shared_experts",
    "dense_ffn",
    "norms",
    "embeddings",
    "head",
    "other",
)
"""Categories of :attr:`ParamReport.breakdown`; they partition the model's parameters."""

_SHARED_PREFIXES = ("shared_expert", "shared_mlp")
_ATTENTION_NAMES = frozenset(
    {
        "self_attn",
        "attn",
        "attention",
        "self_attention",
        "cross_attn",
        "encoder_attn",
        "linear_attn",
    }
)
_FFN_NAMES = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe", "dense_relu_dense"})


class CostConfigError(ValueError):
    """The input to a cost function cannot be turned into a model (the message says why)."""


class NoMoEError(CostConfigError):
    """The model has no Mixture-of-Experts layer, so "active parameters" is undefined."""


@dataclass(frozen=True)
class MoELayerParams:
    """Parameter accounting of one MoE block.

    Attributes:
        name: module path of the block (e.g. ``model.layers.3.mlp``).
        num_experts: E, read off the experts' parameter shapes.
        top_k: K experts per token.
        params_per_expert: parameters of one routed expert (weights and biases).
        matmul_params_per_expert: the part of ``params_per_expert`` used as matmul
            weights (biases excluded), for FLOP counting.
        routed_params: all routed experts' parameters in the block (E x per expert, plus
            any expert-independent tensor stored with them).
        shared_params: shared experts (and their gate), active for every token.
        router_params: the router.
        inactive_params: routed-expert parameters a token does not use: (E - K) x per
            expert, plus the rows of zero-compute experts a fused store keeps.
        tower: the model tower the block is in (``text`` unless a multimodal model has
            MoE blocks in another tower).
    """

    name: str
    num_experts: int
    top_k: int
    params_per_expert: int
    matmul_params_per_expert: int
    routed_params: int
    shared_params: int
    router_params: int
    inactive_params: int
    tower: str = "text"


@dataclass
class ParamReport:
    """Result of :func:`count_parameters`.

    Attributes:
        total_params: every parameter of the model, a tied matrix once.
        active_params: parameters one token uses under ``embeddings``.
        activation_ratio: ``active_params / total_params``.
        embeddings: the embedding convention of ``active_params`` ("both"/"head"/"none").
        breakdown: total parameters per category (keys :data:`BREAKDOWN_KEYS`); sums to
            ``total_params``. A tied embedding/head matrix is listed once, under
            ``embeddings`` (``head`` is then 0); ``tied_embeddings`` says so.
        active_breakdown: active parameters per category; sums to ``active_params``.
        num_moe_layers: number of MoE blocks.
        num_experts: E when every MoE block has the same E, else None (see ``moe_layers``).
        top_k: K when every MoE block has the same K, else None.
        routed_expert_params_per_expert: parameters of one routed expert when every MoE
            block agrees, else None.
        tied_embeddings: the head shares the input embedding's matrix.
        model_type: transformers ``model_type`` or the model's class name.
        moe_layers: per-block details.
        towers: total parameters per tower (``{"text": total}`` for a text-only model;
            a multimodal model adds ``vision`` / ``audio`` / ``connector`` ... ).
        active_path: whose path ``active_params`` counts: ``"token"``, or ``"text
            token"`` for a multimodal model (its non-text towers are not active for a
            text token; they are in ``total_params`` and ``towers``).
    """

    total_params: int
    active_params: int
    activation_ratio: float
    embeddings: str
    breakdown: dict[str, int]
    active_breakdown: dict[str, int]
    num_moe_layers: int
    num_experts: int | None
    top_k: int | None
    routed_expert_params_per_expert: int | None
    tied_embeddings: bool
    model_type: str
    moe_layers: list[MoELayerParams] = field(default_factory=list)
    towers: dict[str, int] = field(default_factory=dict)
    active_path: str = "token"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``moe_layers`` as a list of dicts)."""
        d = asdict(self)
        d["moe_layers"] = [asdict(layer) for layer in self.moe_layers]
        return d


# --------------------------------------------------------------------------- loading


def _transformers() -> Any:
    tr = require("transformers", "hf")
    # why: a saved TinyMoELM (model_type moescope_tiny_moe) is known to the Auto classes
    # only once moescope.nn.hf registered it; transformers itself is checked just above
    import moescope.nn.hf  # noqa: F401

    return tr


def load_config_source(source: Any) -> Any:
    """Turn a path / dict / config object into a config object (no model is built).

    Accepts a ``transformers.PretrainedConfig``, a moescope ``TinyMoEConfig``, a dict of
    config fields (``model_type`` required), or a path to a ``config.json`` or to a
    moescope reference file whose ``config`` key holds the config. Raises
    :class:`CostConfigError` with a one-line message for anything else.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _read_json(Path(source))
    if isinstance(source, Mapping):
        data = dict(source)
        if "model_type" not in data and isinstance(data.get("config"), Mapping):
            data = dict(data["config"])
        return _config_from_dict(data)
    return source


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CostConfigError(
            f"{path}: no such file; pass the path to a model's config.json "
            f"(or to a moescope reference file with a 'config' key)"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            path = path / "config.json"
        else:
            raise CostConfigError(f"{path} is a directory without config.json; pass a config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CostConfigError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            f"pass a valid config.json"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CostConfigError(f"{path}: cannot read the file ({err})") from None
    if not isinstance(data, dict):
        raise CostConfigError(
            f"{path}: expected a JSON object (a config.json), got {type(data).__name__}"
        )
    return data


def _config_from_dict(data: dict[str, Any]) -> Any:
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CostConfigError(
            "the config has no 'model_type' field; pass a transformers config.json "
            '(it names the architecture, e.g. "model_type": "mixtral")'
        )
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise CostConfigError(
            f"unknown model_type {model_type!r}: transformers {transformers.__version__} has no "
            f"such architecture; check the spelling or upgrade transformers"
        )
    fields = {k: v for k, v in data.items() if k != "model_type"}
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as err:
        raise CostConfigError(f"invalid {model_type} config: {err}") from None


def build_meta_model(source: Any) -> nn.Module:
    """Instantiate the model described by ``source`` on the meta device (no memory).

    ``source``: anything :func:`load_config_source` accepts, or an ``nn.Module`` (returned
    as is). For a transformers config the class is the config's first ``architectures``
    entry that transformers ships (any head: ``...ForCausalLM``,
    ``...ForConditionalGeneration``, ``...ForSequenceClassification``, the bare model),
    so the count is the checkpoint's own; without one, the first auto class that maps the
    config: causal LM, image-text-to-text, seq2seq, then the bare ``AutoModel``.

    Meta tensors have no storage, so weight initialisation is a no-op on them: DeepSeek-V3
    (671B) builds in about 0.1 s after imports, and nothing needs to be switched off.
    """
    if isinstance(source, nn.Module):
        return source
    config = load_config_source(source)
    if isinstance(config, TinyMoEConfig):
        with torch.device("meta"):
            return TinyMoELM(config)
    transformers = _transformers()
    if not isinstance(config, transformers.PretrainedConfig):
        raise CostConfigError(
            f"cannot count parameters of a {type(config).__name__}; pass a transformers "
            f"config (object, dict or config.json path), a TinyMoEConfig, or an nn.Module"
        )
    cls = _model_class(config)
    try:
        with torch.device("meta"):
            if hasattr(cls, "from_config"):
                return cls.from_config(config)
            return cls._from_config(config)
    except Exception as err:  # transformers raises many types for inconsistent configs
        raise CostConfigError(
            f"transformers could not build {getattr(config, 'model_type', '?')} from this "
            f"config ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"check the config's fields"
        ) from None


def _model_class(config: Any) -> Any:
    transformers = _transformers()
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            continue  # remote-code classes transformers does not ship: the auto classes
        wanted = getattr(cls, "config_class", None)
        if isinstance(wanted, type) and not isinstance(config, wanted):
            raise CostConfigError(
                f"architectures names {arch}, which takes a {wanted.__name__}, but the "
                f"config is a {type(config).__name__}; fix 'architectures' or 'model_type'"
            )
        return cls
    autos = (
        "AutoModelForCausalLM",
        "AutoModelForImageTextToText",
        "AutoModelForSeq2SeqLM",
        "AutoModel",
    )
    for auto_name in autos:
        auto = getattr(transformers, auto_name, None)
        if auto is not None and type(config) in auto._model_mapping:
            return auto
    raise CostConfigError(
        f"transformers has no model class for model_type "
        f"{getattr(config, 'model_type', '?')!r}; pass an instantiated nn.Module instead"
    )


# --------------------------------------------------------------------------- anatomy


@dataclass
class _ParamInfo:
    name: str
    numel: int
    category: str
    is_matmul: bool
    moe_layer: int | None = None  # index into _Anatomy.moe_layers for routed experts
    per_expert: bool = False  # carries the expert dimension first
    tower: str = "text"  # multimodal models: the tower the parameter belongs to


@dataclass
class _Anatomy:
    """Every parameter of a model, classified once; shared by params and FLOP counts."""

    params: list[_ParamInfo]
    moe_layers: list[MoELayerParams]
    tied_embeddings: bool
    model_type: str
    config: Any


def _config_of(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _text_config(config: Any) -> Any:
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except Exception:  # pragma: no cover - malformed composite configs
            return config
    return config


def _is_matmul(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    # A matmul weight has >= 2 dims and is not a bias or a lookup table: Linear weights,
    # routers' [E, H] weights used through F.linear, fused expert tensors [E, ., .].
    return not (param.dim() < 2 or name.endswith("bias") or isinstance(module, nn.Embedding))


def _is_norm(module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return "norm" in cls or isinstance(
        module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    )


def _embedding_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    inp: nn.Module | None = None
    out: nn.Module | None = None
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_in):
        try:
            inp = get_in()
        except (NotImplementedError, AttributeError):
            inp = None
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
    if inp is None:
        inp = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if out is None:
        out = getattr(model, "lm_head", None)
    return inp, out


# Words of a parameter's path that put it on a non-text path of a multimodal model:
# projectors and embedders outside the sub-models, and modality-specific experts inside
# the language model (ernie4_5_vl_moe's ``vision_moe``).
_TOWER_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vision", ("vision", "visual", "image", "video", "patch", "pixel", "view_sep")),
    ("audio", ("audio", "speech", "sound")),
    ("connector", ("projector", "multi_modal", "mm_", "merger", "resampler")),
)


def _word_tower(path: str) -> str | None:
    low = path.lower()
    return next((name for name, words in _TOWER_WORDS if any(w in low for w in words)), None)


def _towers(model: nn.Module, config: Any) -> dict[int, str]:
    """Tower of every parameter (by id): ``text`` or a non-text tower of a multimodal model.

    Towers are the sub-models built from the config's ``sub_configs`` (a module whose
    ``config`` is the ``vision_config`` is the ``vision`` tower, ...). Parameters outside
    every sub-model go by the words of their path (:data:`_TOWER_WORDS`), else ``text``;
    inside the text tower, a module named for another modality (``vision_moe``) belongs to
    that modality. A model without non-text sub-configs is all ``text``.
    """
    subs = getattr(config, "sub_configs", None) or {}
    tower_of_cls: list[tuple[type, str]] = []
    for key, cls in subs.items():
        if isinstance(cls, type):
            name = key.removesuffix("_config")
            tower_of_cls.append((cls, "text" if name in ("text", "language", "llm") else name))
    if all(t == "text" for _, t in tower_of_cls):
        return {}
    tower: dict[int, str] = {}
    for path, mod in model.named_modules():
        mcfg = getattr(mod, "config", None)
        if not path or mcfg is None or mcfg is config:
            continue
        for cls, name in tower_of_cls:
            if isinstance(mcfg, cls):
                for p in mod.parameters():
                    tower.setdefault(id(p), name)
                break
    for pname, p in model.named_parameters():
        if tower.get(id(p), "text") != "text":
            continue
        if id(p) not in tower:
            tower[id(p)] = _word_tower(pname) or "text"
            continue
        # Inside the text tower: only a module named for its modality, e.g. vision_moe.
        parts = pname.split(".")[:-1]
        hit = next(
            (
                t
                for part in parts
                if part.endswith(("_moe", "_experts", "_mlp"))
                and (t := _word_tower(part)) is not None
            ),
            None,
        )
        if hit is not None:
            tower[id(p)] = hit
    return tower


@dataclass
class _Block:
    """One MoE block as the monitor's adapter found it, with its parameters' roles."""

    info: LayerInfo
    experts: tuple[nn.Module, ...]
    roles: dict[int, str]  # id(param) -> routed_experts / router / shared_experts / moe_other


def _moe_blocks(model: nn.Module) -> list[_Block]:
    """The MoE blocks of ``model``, found by the monitor's own adapters."""
    blocks: list[_Block] = []
    for _, info in find_moe_layers(model):
        block = info.module
        experts = info.expert_modules
        child = getattr(block, "experts", None)
        if not experts and isinstance(child, nn.Module):
            experts = (child,)
        if not experts:
            raise CostConfigError(
                f"{info.path}: its adapter {info.adapter!r} names no expert modules, so its "
                f"parameters cannot be split; set LayerInfo.expert_modules in match()"
            )
        roles: dict[int, str] = {}
        for m in experts:
            for p in m.parameters():
                roles.setdefault(id(p), "routed_experts")
        # The adapter's router, else the capture's own lookup (a user adapter may not
        # name one).
        router = info.router
        if router is None:
            found = find_router(block)
            router = None if found is None else found[1]
        routers = [] if router is None else [router]
        for r in routers:
            for p in r.parameters():
                roles.setdefault(id(p), "router")
        for n, c in block.named_children():
            if n.startswith(_SHARED_PREFIXES):
                for p in c.parameters():
                    roles.setdefault(id(p), "shared_experts")
        for p in block.parameters():
            roles.setdefault(id(p), "moe_other")
        blocks.append(_Block(info, experts, roles))
    return blocks


def _expert_split(
    block: _Block, named: dict[int, tuple[str, torch.Tensor]]
) -> tuple[int, int, set[int]]:
    """(params per expert, matmul params per expert, ids of tensors carrying E first).

    A ``ModuleList`` / ``ModuleDict`` of experts: one member (members must agree; entries
    without parameters, such as nllb_moe's token dropout, are not experts). Fused stores:
    a tensor with E leading rows holds 1/E per expert; a 3-D tensor with more rows than
    E holds zero-compute experts' rows too (longcat_flash: E + Z), one row per expert; a
    2-D tensor of E x n rows holds experts stacked (dbrx's [E * I, H]). Any other tensor
    of the experts is used by every token.
    """
    e = block.info.num_experts
    path = block.info.path
    if len(block.experts) == 1 and isinstance(block.experts[0], (nn.ModuleList, nn.ModuleDict)):
        box = block.experts[0]
        members = list(box.values() if isinstance(box, nn.ModuleDict) else box)
        members = [m for m in members if any(True for _ in m.parameters())]
        sizes = {sum(q.numel() for q in m.parameters()) for m in members}
        if len(members) != e:
            raise CostConfigError(f"{path}: {len(members)} expert modules for E={e} experts")
        if len(sizes) > 1:
            raise CostConfigError(
                f"{path}: experts have different sizes {sorted(sizes)}; active parameters "
                f"per token are not defined by E and K alone"
            )
        first = members[0]
        mm = sum(
            q.numel()
            for n, q in first.named_parameters()
            if q.dim() >= 2 and not n.endswith("bias")
        )
        return next(iter(sizes)), mm, {id(q) for m in members for q in m.parameters()}
    pe = mpe = 0
    carrying: set[int] = set()
    for pid, role in block.roles.items():
        if role != "routed_experts":
            continue
        name, p = named[pid]
        d = p.shape[0] if p.dim() >= 1 else 0
        if d == e or (p.dim() >= 3 and d > e):
            piece, rows = p.numel() // d, d
        elif p.dim() == 2 and d > e and d % e == 0:
            piece, rows = p.numel() // e, e
        else:
            continue
        if piece * rows != p.numel():
            raise CostConfigError(f"{path}: {name} of shape {tuple(p.shape)} does not split by E")
        carrying.add(pid)
        pe += piece
        if p.dim() >= 2 and not name.endswith("bias"):
            mpe += piece
    if not carrying:
        raise CostConfigError(
            f"{path}: no expert tensor carries E={e} in its first dimension; cannot split "
            f"the routed experts' parameters"
        )
    return pe, mpe, carrying


def analyze_model(
    model: nn.Module, *, top_k: int | None = None, require_moe: bool = True
) -> _Anatomy:
    """Classify every parameter of ``model`` (see the module docstring for the rules).

    MoE blocks, E and K are what the monitor finds (:func:`moescope.capture.registry.
    find_moe_layers` and the adapters' :class:`~moescope.capture.adapter.LayerInfo`), so
    every family the monitor supports is counted; ``top_k`` overrides K everywhere.
    """
    config = _config_of(model)
    model_type = str(getattr(config, "model_type", "") or type(model).__name__)

    inp_mod, head_mod = _embedding_modules(model)
    inp_ids = {id(p) for p in inp_mod.parameters()} if inp_mod is not None else set()
    head_ids = {id(p) for p in head_mod.parameters()} if head_mod is not None else set()
    tied = bool(inp_ids & head_ids)
    tower = _towers(model, config)

    blocks = _moe_blocks(model)
    moe_role: dict[int, tuple[str, int]] = {}
    for idx, b in enumerate(blocks):
        for pid, r in b.roles.items():
            moe_role.setdefault(pid, (r, idx))

    # Roles of modules, inherited down the tree: what a parameter that is not a routed
    # expert, router or shared expert is (also inside an MoE block, which may be a whole
    # decoder layer: gemma4).
    role: dict[str, str | None] = {}
    named_modules = list(model.named_modules())
    for name, mod in named_modules:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        inherited = role.get(parent) if name else None
        short = name.rsplit(".", 1)[-1]
        if _is_norm(mod):
            role[name] = "norms"
        elif short in _ATTENTION_NAMES or "attention" in type(mod).__name__.lower():
            role[name] = "attention"
        elif inherited in ("attention", "dense_ffn", "norms"):
            role[name] = inherited
        elif short in _FFN_NAMES or any(
            s in type(mod).__name__ for s in ("MLP", "FeedForward", "DenseReluDense")
        ):
            role[name] = "dense_ffn"
        else:
            role[name] = inherited

    modules = dict(named_modules)
    named: dict[int, tuple[str, torch.Tensor]] = {}
    for pname, param in model.named_parameters():
        named.setdefault(id(param), (pname, param))

    splits = [_expert_split(b, named) for b in blocks]
    params: list[_ParamInfo] = []
    routed = [0] * len(blocks)
    shared = [0] * len(blocks)
    router = [0] * len(blocks)
    for pid, (pname, p) in named.items():
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        module = modules.get(owner, model)
        matmul = _is_matmul(pname, p, module)
        n = p.numel()
        t = tower.get(pid, "text")
        if pid in inp_ids:
            params.append(_ParamInfo(pname, n, "embeddings", False, tower=t))
            continue
        if pid in head_ids:
            params.append(_ParamInfo(pname, n, "head", matmul, tower=t))
            continue
        if pid in moe_role:
            r, idx = moe_role[pid]
            if r == "routed_experts":
                routed[idx] += n
                carries = pid in splits[idx][2]
                params.append(
                    _ParamInfo(
                        pname,
                        n,
                        r,
                        p.dim() >= 2 and not pname.endswith("bias"),
                        idx,
                        carries,
                        tower=t,
                    )
                )
                continue
            if r == "shared_experts":
                shared[idx] += n
            elif r == "router":
                router[idx] += n
            if r in BREAKDOWN_KEYS:
                params.append(_ParamInfo(pname, n, r, matmul, tower=t))
                continue
        r2 = role.get(owner)
        category = r2 if r2 in BREAKDOWN_KEYS else "other"
        params.append(_ParamInfo(pname, n, category, matmul, tower=t))

    moe_layers: list[MoELayerParams] = []
    for idx, b in enumerate(blocks):
        info = b.info
        e = info.num_experts
        k = top_k if top_k is not None else (info.active_top_k or info.top_k)
        if not 1 <= k <= e:
            raise CostConfigError(f"{info.path}: top_k={k} is outside [1, E={e}]")
        pe, mpe, carrying = splits[idx]
        carried = sum(named[pid][1].numel() for pid in carrying)
        block_tower = {tower.get(pid, "text") for pid in carrying}
        moe_layers.append(
            MoELayerParams(
                name=info.path,
                num_experts=e,
                top_k=k,
                params_per_expert=pe,
                matmul_params_per_expert=mpe,
                routed_params=routed[idx],
                shared_params=shared[idx],
                router_params=router[idx],
                inactive_params=carried - k * pe,
                tower=next(iter(block_tower)) if len(block_tower) == 1 else "text",
            )
        )
    if require_moe and not moe_layers:
        raise NoMoEError(
            f"no Mixture-of-Experts layer found in {model_type} (no block a moescope "
            f"adapter recognises); pass an MoE model or config, or register an adapter "
            f"(docs/custom_adapter.md)"
        )
    return _Anatomy(params, moe_layers, tied, model_type, config)


# --------------------------------------------------------------------------- counting


def _check_convention(embeddings: str) -> None:
    if embeddings not in EMBEDDING_CONVENTIONS:
        raise ValueError(
            f"embeddings must be one of {EMBEDDING_CONVENTIONS} (both: embedding and head "
            f"counted; head: head only; none: neither), got {embeddings!r}"
        )


def report_from_anatomy(anatomy: _Anatomy, embeddings: str = "both") -> ParamReport:
    """Build a :class:`ParamReport` from an analysed model (see :func:`count_parameters`)."""
    _check_convention(embeddings)
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    active = dict.fromkeys(BREAKDOWN_KEYS, 0)
    towers: dict[str, int] = {}
    for info in anatomy.params:
        breakdown[info.category] += info.numel
        towers[info.tower] = towers.get(info.tower, 0) + info.numel
        if info.tower == "text":
            active[info.category] += info.numel
    total = sum(breakdown.values())

    active["routed_experts"] -= sum(
        layer.inactive_params for layer in anatomy.moe_layers if layer.tower == "text"
    )
    # A tied matrix sits in "embeddings" (registered once); it is the head when counted.
    if embeddings in ("head", "none") and not anatomy.tied_embeddings:
        active["embeddings"] = 0
    if embeddings == "none":
        active["embeddings"] = 0
        active["head"] = 0
    active_total = sum(active.values())

    layers = anatomy.moe_layers
    es = {layer.num_experts for layer in layers}
    ks = {layer.top_k for layer in layers}
    pes = {layer.params_per_expert for layer in layers}
    return ParamReport(
        total_params=total,
        active_params=active_total,
        activation_ratio=active_total / total if total else 0.0,
        embeddings=embeddings,
        breakdown=breakdown,
        active_breakdown=active,
        num_moe_layers=len(layers),
        num_experts=next(iter(es)) if len(es) == 1 else None,
        top_k=next(iter(ks)) if len(ks) == 1 else None,
        routed_expert_params_per_expert=next(iter(pes)) if len(pes) == 1 else None,
        tied_embeddings=anatomy.tied_embeddings,
        model_type=anatomy.model_type,
        moe_layers=list(layers),
        towers=dict(sorted(towers.items(), key=lambda kv: (kv[0] != "text", kv[0]))),
        active_path="text token" if set(towers) - {"text"} else "token",
    )


def count_parameters(
    config_or_model: Any,
    embeddings: EmbeddingConvention = "both",
    *,
    top_k: int | None = None,
    require_moe: bool = True,
) -> ParamReport:
    """Total and per-token active parameters of an MoE model, counted exactly.

    Args:
        config_or_model: an ``nn.Module`` (a transformers model, a moescope ``TinyMoELM``
            or any module whose MoE blocks have an ``experts`` child), or a config: a
            ``transformers.PretrainedConfig``, a ``TinyMoEConfig``, a dict of config fields,
            or a path to a ``config.json`` / a reference file with a ``config`` key. A
            config is instantiated on the meta device (no memory, about 0.1 s for 671B).
        embeddings: which embedding matrices count as active: "both", "head" or "none"
            (see the module docstring; a tied matrix counts once).
        top_k: override K for every MoE block (default: the router's ``top_k`` or the
            config's ``num_experts_per_tok`` and its aliases).
        require_moe: raise :class:`NoMoEError` when the model has no MoE block (False:
            count a dense model, active = total minus the excluded embeddings).

    Returns:
        :class:`ParamReport`. ``active = total - sum_layers (E - K) * params_per_expert -
        excluded embeddings``, as in DESIGN.md "Model level" and the reference files.

    Raises:
        CostConfigError: unreadable input, unknown ``model_type``, no K.
        NoMoEError: no MoE block and ``require_moe``.
    """
    _check_convention(embeddings)
    model = build_meta_model(config_or_model)
    anatomy = analyze_model(model, top_k=top_k, require_moe=require_moe)
    return report_from_anatomy(anatomy, embeddings)
