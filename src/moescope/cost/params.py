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
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moescope.capture.hf_structure import (
    ROUTER_NAMES,
    TOP_K_KEYS,
    find_router,
    find_top_k,
    routed_experts,
)

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

# The names of routers and of the K attributes are the capture's (one list, in
# moescope.capture.hf_structure), so what the monitor finds and what is counted agree.
TOP_K_CONFIG_KEYS: tuple[str, ...] = TOP_K_KEYS

_SHARED_PREFIXES = ("shared_expert", "shared_mlp")
_ATTENTION_NAMES = frozenset(
    {"self_attn", "attn", "attention", "self_attention", "cross_attn", "encoder_attn", "linear_attn"}
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
    """

    name: str
    num_experts: int
    top_k: int
    params_per_expert: int
    matmul_params_per_expert: int
    routed_params: int
    shared_params: int
    router_params: int

    @property
    def inactive_params(self) -> int:
        """Routed-expert parameters a token does not use: (E - K) x per expert."""
        return (self.num_experts - self.top_k) * self.params_per_expert


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``moe_layers`` as a list of dicts)."""
        d = asdict(self)
        d["moe_layers"] = [asdict(layer) for layer in self.moe_layers]
        return d


# --------------------------------------------------------------------------- loading


def _transformers() -> Any:
    from moescope._optional import require

    return require("transformers", "hf")


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
            "(it names the architecture, e.g. \"model_type\": \"mixtral\")"
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
    entry when transformers has it, else the first auto class that maps the config:
    causal LM, image-text-to-text, seq2seq, then the bare ``AutoModel``.

    Meta tensors have no storage, so weight initialisation is a no-op on them: DeepSeek-V3
    (671B) builds in about 0.1 s after imports, and nothing needs to be switched off.
    """
    if isinstance(source, nn.Module):
        return source
    config = load_config_source(source)
    tiny = _tiny_config_class()
    if tiny is not None and isinstance(config, tiny):
        from moescope.nn.model import TinyMoELM

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


def _tiny_config_class() -> type | None:
    try:
        from moescope.nn.model import TinyMoEConfig
    except ImportError:  # pragma: no cover - model.py is part of the package
        return None
    return TinyMoEConfig


def _model_class(config: Any) -> Any:
    transformers = _transformers()
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and getattr(cls, "config_class", None) is type(config):
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


def _find_top_k(block: nn.Module, config: Any, override: int | None) -> int | None:
    """K of one block: the override, the block's router, the block, the config, then a
    ``Top<k>`` router class name.

    The modules' own attributes come first because they are what the forward uses (set
    from the config by the model's constructor); the config is the fallback for blocks
    that do not store K.
    """
    if override is not None:
        return override
    router = find_router(block)
    k = find_top_k(block, None if router is None else router[1], _text_config(config))
    k = k or find_top_k(block, None, config)
    if k is not None:
        return k
    # Capacity-limited routers name K in their class (switch_transformers' Top1Router,
    # nllb_moe's Top2Router) and store it nowhere else.
    for child in block.children():
        match = re.search(r"top(\d+)", type(child).__name__.lower())
        if match:
            return int(match.group(1))
    return None


def _expert_container(experts: nn.Module) -> tuple[int, list[nn.Module] | None] | None:
    """(E, per-expert modules or None for a fused tensor store) or None if not experts."""
    if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        members = list(experts.values() if isinstance(experts, nn.ModuleDict) else experts)
        # Parameter-free entries are not experts (nllb_moe's ModuleDict also holds its
        # token dropout).
        members = [m for m in members if any(True for _ in m.parameters())]
        return (len(members), members) if members else None
    direct = list(experts.parameters(recurse=False))
    num = getattr(experts, "num_experts", None)
    if not direct and isinstance(num, int) and num >= 1:
        # One child holding every expert stacked as [E * I, H] matrices (dbrx's mlp).
        stacked = list(experts.parameters())
        if stacked and all(p.dim() >= 2 and p.shape[0] % num == 0 for p in stacked):
            return num, None
    if not direct:
        # A plain container of expert modules (expert_0, expert_1, ...).
        kids = [m for m in experts.children() if any(True for _ in m.parameters())]
        return (len(kids), kids) if len(kids) >= 2 else None
    leading = {p.shape[0] if p.dim() >= 1 else -1 for p in direct}
    if len(leading) == 1 and all(p.dim() >= 2 for p in direct):
        return next(iter(leading)), None
    routed = routed_experts(experts)  # fused store with zero-compute rows (longcat_flash)
    if routed is not None:
        return routed, None
    if isinstance(num, int) and any(p.dim() >= 2 and p.shape[0] == num for p in direct):
        return num, None
    return None


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


def analyze_model(
    model: nn.Module, *, top_k: int | None = None, require_moe: bool = True
) -> _Anatomy:
    """Classify every parameter of ``model`` (see the module docstring for the rules)."""
    config = _config_of(model)
    model_type = str(getattr(config, "model_type", "") or type(model).__name__)

    inp_mod, head_mod = _embedding_modules(model)
    inp_ids = {id(p) for p in inp_mod.parameters()} if inp_mod is not None else set()
    head_ids = {id(p) for p in head_mod.parameters()} if head_mod is not None else set()
    tied = bool(inp_ids & head_ids)

    # Module roles: explicit roles for MoE sub-trees, inherited down the tree.
    role: dict[str, str | None] = {}
    moe_of_module: dict[str, int] = {}
    moe_blocks: list[tuple[str, nn.Module, int, list[nn.Module] | None]] = []
    claimed: list[str] = []
    named = list(model.named_modules())
    for name, mod in named:
        if any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        experts = getattr(mod, "experts", None)
        if not isinstance(experts, nn.Module) or experts is mod:
            continue
        found = _expert_container(experts)
        if found is None:
            continue
        num_experts, members = found
        moe_blocks.append((name, mod, num_experts, members))
        claimed.append(name)

    block_children: dict[str, str] = {}
    for idx, (bname, block, _, _) in enumerate(moe_blocks):
        prefix = f"{bname}." if bname else ""
        for child_name, child in block.named_children():
            path = prefix + child_name
            if child_name == "experts":
                block_children[path] = "routed_experts"
            elif child_name.startswith(_SHARED_PREFIXES):
                block_children[path] = "shared_experts"
            elif child_name in ROUTER_NAMES or any(
                s in type(child).__name__.lower() for s in ("router", "gate")
            ):
                block_children[path] = "router"
            else:
                block_children[path] = "moe_other"
            moe_of_module[path] = idx
        role[bname] = "moe_block"
        moe_of_module[bname] = idx

    moe_roles = ("routed_experts", "shared_experts", "router", "moe_other", "moe_block")
    for name, mod in named:
        if name in role:
            continue
        if name in block_children:
            role[name] = block_children[name]
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        inherited = role.get(parent) if name else None
        if inherited in moe_roles:
            # Everything under a routed/shared/router child shares its role and layer.
            role[name] = "moe_other" if inherited == "moe_block" else inherited
            moe_of_module[name] = moe_of_module[parent]
            continue
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

    modules = dict(named)
    params: list[_ParamInfo] = []
    per_expert: list[int] = [0] * len(moe_blocks)
    matmul_per_expert: list[int] = [0] * len(moe_blocks)
    routed: list[int] = [0] * len(moe_blocks)
    shared: list[int] = [0] * len(moe_blocks)
    router: list[int] = [0] * len(moe_blocks)
    member_sizes: list[set[int]] = [set() for _ in moe_blocks]
    for pname, p in model.named_parameters():
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        module = modules.get(owner, model)
        matmul = _is_matmul(pname, p, module)
        n = p.numel()
        if id(p) in inp_ids:
            params.append(_ParamInfo(pname, n, "embeddings", False))
            continue
        if id(p) in head_ids:
            params.append(_ParamInfo(pname, n, "head", matmul))
            continue
        r = role.get(owner)
        idx = moe_of_module.get(owner)
        if r == "routed_experts" and idx is not None:
            e = moe_blocks[idx][2]
            members = moe_blocks[idx][3]
            carries = members is not None or (p.dim() >= 1 and p.shape[0] == e)
            routed[idx] += n
            if carries:
                per_expert[idx] += n
                if matmul:
                    matmul_per_expert[idx] += n
            params.append(_ParamInfo(pname, n, "routed_experts", matmul, idx, carries))
            continue
        if r == "shared_experts" and idx is not None:
            shared[idx] += n
        elif r == "router" and idx is not None:
            router[idx] += n
        category = r if r in BREAKDOWN_KEYS else "other"
        params.append(_ParamInfo(pname, n, category, matmul))

    moe_layers: list[MoELayerParams] = []
    for idx, (bname, block, e, members) in enumerate(moe_blocks):
        k = _find_top_k(block, config, top_k)
        if k is None:
            raise CostConfigError(
                f"cannot find the number of experts per token for {bname!r} (no "
                f"num_experts_per_tok / top_k on its router or in the config); pass top_k="
            )
        if not 1 <= k <= e:
            raise CostConfigError(f"{bname}: top_k={k} is outside [1, E={e}]")
        if members is not None:
            for member in members:
                member_sizes[idx].add(sum(q.numel() for q in member.parameters()))
            if len(member_sizes[idx]) > 1:
                raise CostConfigError(
                    f"{bname}: experts have different sizes {sorted(member_sizes[idx])}; "
                    f"active parameters per token are not defined by E and K alone"
                )
            # A ModuleList's members sum to the routed total; per expert = one member.
            pe, mpe = per_expert[idx] // e, matmul_per_expert[idx] // e
        else:
            if per_expert[idx] % e or matmul_per_expert[idx] % e:
                raise CostConfigError(f"{bname}: expert tensors are not divisible by E={e}")
            pe, mpe = per_expert[idx] // e, matmul_per_expert[idx] // e
        moe_layers.append(
            MoELayerParams(
                name=bname,
                num_experts=e,
                top_k=k,
                params_per_expert=pe,
                matmul_params_per_expert=mpe,
                routed_params=routed[idx],
                shared_params=shared[idx],
                router_params=router[idx],
            )
        )
    if require_moe and not moe_layers:
        raise NoMoEError(
            f"no Mixture-of-Experts layer found in {model_type} (no block with an 'experts' "
            f"child holding E expert weights); pass an MoE model or config"
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
    for info in anatomy.params:
        breakdown[info.category] += info.numel
    total = sum(breakdown.values())

    active = dict(breakdown)
    active["routed_experts"] -= sum(layer.inactive_params for layer in anatomy.moe_layers)
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
