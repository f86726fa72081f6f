"""Remove routed experts from a model: weights, router rows, counts in modules and config.

:func:`prune_model` takes ``{layer path: kept expert ids}`` (every MoE layer, the same
number N of ids each) and returns a model with N experts per layer whose routing among the
kept experts is the original's:

- **experts** (``LayerInfo.expert_modules``): a fused module keeps rows ``ids`` of every
  tensor whose leading dimension is E (``gate_up_proj``, ``down_proj``, their biases,
  per-expert scales); a ``ModuleList`` / ``ModuleDict`` keeps the chosen experts,
  renumbered 0..N-1 (``expert_7`` -> ``expert_2``), in the same container object;
- **router**: every tensor with an E-sized dimension keeps those rows (the gate's
  ``weight`` [E, H], its ``bias`` and DeepSeek-V3's ``e_score_correction_bias`` [E]);
  so do the block's own tensors with E first (a correction bias some families keep on
  the block: afmoe, lfm2_moe, minimax_m2, hy_v3);
- **counts**: instance attributes holding E on the block, router and experts
  (:data:`COUNT_ATTRS`) and the config's expert-count fields (:data:`CONFIG_FIELDS`, on
  the text config of a multimodal model; ``TinyMoEConfig.num_experts`` for moescope.nn)
  become N.

Ids are renumbered in ascending order, so kept experts keep their relative order (a
grouped router's groups stay contiguous). The result is checked against the model its
new config builds (on the meta device): every tensor must have the shape that
``from_pretrained`` will expect, else :class:`PruneError`.

:func:`check_prunable` refuses, in one line each, what would change the routing contract:
fewer kept experts than top-k; a group-limited router whose groups would be left unequal
(or with fewer than the two experts per group its group score reads, or fewer than top-k
in the groups a token may use); zero-compute or identity experts (ids >= E, longcat_flash);
capacity-per-expert routing (expert choice); experts sharded over ranks; layers with
different numbers of experts; layers that share their expert weights (diffusion_gemma's
encoder and decoder); layers no prunable structure was found for.

By default the result is a structural copy: modules are copied, every tensor that is
not pruned is shared with the original (no extra memory), pruned tensors are new.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import LayerInfo
from moescope.capture.hf_structure import int_attr
from moescope.capture.registry import find_moe_layers
from moescope.prune.measure import router_groups

__all__ = [
    "CONFIG_FIELDS",
    "COUNT_ATTRS",
    "PruneError",
    "PruneSummary",
    "check_prunable",
    "config_of",
    "moe_layers",
    "prune_model",
    "pruned_config_matches",
]

CONFIG_FIELDS: tuple[str, ...] = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "n_experts",
)
"""Config fields that hold the number of routed experts, whatever the family calls it."""

COUNT_ATTRS: tuple[str, ...] = CONFIG_FIELDS
"""Instance attributes of blocks, routers and experts modules holding E."""

_ZERO_EXPERT_FIELDS = ("zero_expert_num", "n_zero_experts", "num_zero_experts", "identity_experts")
_TOPK_GROUP_ATTRS = ("topk_group", "top_k_group", "num_limited_groups")


class PruneError(ValueError):
    """Pruning was refused or failed; the message is one line saying why and what to do."""


@dataclass
class PruneSummary:
    """What :func:`prune_model` changed.

    ``num_experts`` E before, ``kept`` N after; ``params_before`` / ``params_after``
    (unique parameters, a tied matrix once) and ``removed_params`` their difference;
    ``removed_bytes`` the bytes of the removed parameters and buffers in their dtypes;
    ``config_fields`` the config fields set to N; ``keep`` the kept ids per layer.
    """

    num_experts: int
    kept: int
    params_before: int
    params_after: int
    removed_bytes: int
    config_fields: list[str] = field(default_factory=list)
    keep: dict[str, list[int]] = field(default_factory=dict)

    @property
    def removed_params(self) -> int:
        return self.params_before - self.params_after


def moe_layers(model: nn.Module) -> list[LayerInfo]:
    """The MoE layers moescope finds in ``model`` (the monitor's detection)."""
    return [info for _, info in find_moe_layers(model)]


def config_of(model: nn.Module) -> Any:
    """The model's config object (transformers config or ``TinyMoEConfig``), or None."""
    return getattr(model, "config", None)


def _text_configs(cfg: Any) -> list[Any]:
    out = [cfg] if cfg is not None else []
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        text = get()
        if text is not None and text is not cfg:
            out.append(text)
    return out


def _experts_container(info: LayerInfo) -> list[nn.Module]:
    mods = list(info.expert_modules)
    if not mods:
        ex = getattr(info.module, "experts", None)
        if isinstance(ex, nn.Module):
            mods = [ex]
    return mods


def _tensors(mod: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) of every parameter and buffer under ``mod``."""
    out: list[tuple[nn.Module, str, torch.Tensor]] = []
    for owner in mod.modules():
        for name, p in owner.named_parameters(recurse=False):
            out.append((owner, name, p))
        for name, b in owner.named_buffers(recurse=False):
            if b is not None:
                out.append((owner, name, b))
    return out


def _router_kind(router: nn.Module | None) -> str:
    return type(router).__name__ if router is not None else ""


def check_prunable(
    model: nn.Module, n: int, layers: Sequence[LayerInfo] | None = None
) -> list[LayerInfo]:
    """The MoE layers of ``model`` if keeping ``n`` experts in each is allowed; raises
    :class:`PruneError` (module docstring: what is refused, and why) otherwise."""
    infos = list(layers) if layers is not None else moe_layers(model)
    if not infos:
        raise PruneError(
            f"{type(model).__name__} has no MoE layer moescope recognises; nothing to prune"
        )
    counts = {i.num_experts for i in infos}
    if len(counts) > 1:
        raise PruneError(
            f"the MoE layers have different numbers of experts ({sorted(counts)}); pruning "
            "keeps one count for the whole model and cannot prune this one"
        )
    e = infos[0].num_experts
    owner_of: dict[int, str] = {}
    for info in infos:
        for mod in _experts_container(info):
            for _, _, t in _tensors(mod):
                other = owner_of.setdefault(id(t), info.path)
                if other != info.path:
                    raise PruneError(
                        f"{other} and {info.path} share their expert weights (tied layers); "
                        "pruning them apart would break the tie; not supported"
                    )
    for cfg in _text_configs(config_of(model)):
        for name in _ZERO_EXPERT_FIELDS:
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                raise PruneError(
                    f"the model has zero-compute / identity experts ({name}={v}): their ids "
                    "follow the routed experts' and pruning would renumber them; not supported"
                )
    for info in infos:
        where = f"{info.path} ({info.adapter})"
        kind = _router_kind(info.router)
        if kind == "ExpertChoiceRouter" or type(info.module).__name__ == "ExpertParallelMoELayer":
            raise PruneError(
                f"{where}: "
                + (
                    "expert-choice routing gives each expert a capacity of T / E tokens; "
                    "fewer experts would change how many tokens each one takes"
                    if kind == "ExpertChoiceRouter"
                    else "experts are sharded over ranks; gather them into a MoELayer first"
                )
            )
        if n < info.top_k:
            raise PruneError(
                f"keeping {n} experts is fewer than the {info.top_k} each token is routed to "
                f"(top-k) in {info.path}; keep at least {info.top_k}"
            )
        if n > e:
            raise PruneError(f"cannot keep {n} experts: {info.path} has {e}")
        mods = _experts_container(info)
        if not mods:
            raise PruneError(f"{where}: no experts module found; moescope cannot prune it")
        for mod in mods:
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
                if len(_expert_keys(mod)) != e:
                    raise PruneError(
                        f"{where}: {len(_expert_keys(mod))} expert modules for {e} routed experts "
                        "(zero-compute or identity experts?); not supported"
                    )
                continue
            lead = [t.shape[0] for _, _, t in _tensors(mod) if t.dim() >= 1]
            if not any(d == e for d in lead):
                raise PruneError(
                    f"{where}: its experts module holds no tensor with the {e} experts first; "
                    "moescope cannot prune this layout"
                )
            if any(t.shape[0] != e for _, _, t in _tensors(mod) if t.dim() == 3):
                raise PruneError(
                    f"{where}: expert tensors have more rows than the {e} routed experts "
                    "(zero-compute or identity experts); pruning would renumber them"
                )
        router = info.router
        if router is not None:
            rw = getattr(router, "weight", None)
            if isinstance(rw, torch.Tensor) and rw.dim() == 2 and rw.shape[0] != e:
                raise PruneError(
                    f"{where}: the router has {rw.shape[0]} output rows for {e} routed experts "
                    "(zero-compute or identity experts, or product-key experts); not supported"
                )
            # A per-class vector a little longer than E: extra routing classes (zaya's
            # skip class, E + 1) whose ids follow the experts'.
            classes = [t.shape[0] for _, _, t in _tensors(router) if t.dim() == 1]
            if any(e < c < 2 * e for c in classes):
                raise PruneError(
                    f"{where}: the router has {max(c for c in classes if e < c < 2 * e)} "
                    f"routing classes for {e} experts (skip or identity classes); not supported"
                )
        g = router_groups(info)
        if g > 1:
            if e % g or n % g:
                raise PruneError(
                    f"keeping {n} experts in {info.path} would leave its router's {g} expert "
                    f"groups unequal; keep a multiple of {g}"
                )
            per = n // g
            needs_two = kind != "GroupLimitedRouter"  # transformers' routers sum a group's top-2
            if needs_two and per < 2:
                raise PruneError(
                    f"{info.path}: its router scores each of its {g} groups by the sum of the "
                    f"group's top-2 experts; keep at least 2 per group ({2 * g} in all)"
                )
            tg = int_attr(router, _TOPK_GROUP_ATTRS) or int_attr(
                getattr(info.module, "config", None), _TOPK_GROUP_ATTRS
            )
            if tg is not None and tg * per < info.top_k:
                raise PruneError(
                    f"{info.path}: a token may use {tg} of {g} groups; with {per} experts per "
                    f"group that is fewer than its top-{info.top_k}; keep at least "
                    f"{-(-info.top_k // tg) * g}"
                )
    return infos


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _slice_dim(t: torch.Tensor, e: int) -> int | None:
    if t.dim() >= 1 and t.shape[0] == e:
        return 0
    dims = [d for d in range(t.dim()) if t.shape[d] == e]
    return dims[0] if len(dims) == 1 else None


def _set_tensor(owner: nn.Module, name: str, new: torch.Tensor) -> None:
    if name in owner._parameters:
        owner._parameters[name] = new  # type: ignore[assignment]
    else:
        owner._buffers[name] = new


def _slice_into(
    owner: nn.Module,
    name: str,
    t: torch.Tensor,
    d: int,
    ids: torch.Tensor,
    done: dict[int, torch.Tensor],
) -> int:
    """Replace ``owner.<name>`` by ``t`` sliced to ``ids`` along ``d``; a tensor shared
    by several modules (tied weights, e.g. diffusion_gemma's encoder and decoder) is
    sliced once and stays shared. Returns the bytes removed (0 for a repeat)."""
    new = done.get(id(t))
    if new is not None:
        _set_tensor(owner, name, new)
        return 0
    with torch.no_grad():
        sliced = t.detach().index_select(d, ids.to(t.device)).contiguous()
    new = (
        nn.Parameter(sliced, requires_grad=t.requires_grad)
        if isinstance(t, nn.Parameter)
        else sliced
    )
    done[id(t)] = new
    _set_tensor(owner, name, new)
    return (t.numel() - sliced.numel()) * t.element_size()


def _prune_tensors(
    mod: nn.Module, ids: torch.Tensor, e: int, leading_only: bool, done: dict[int, torch.Tensor]
) -> int:
    """Slice every E-sized tensor of ``mod`` to ``ids``; returns the bytes removed."""
    removed = 0
    for owner, name, t in _tensors(mod):
        if leading_only:
            d = 0 if t.dim() >= 1 and t.shape[0] == e else None
        else:
            d = _slice_dim(t, e)
        if d is not None:
            removed += _slice_into(owner, name, t, d, ids, done)
    return removed


def _prune_own_tensors(
    block: nn.Module, ids: torch.Tensor, e: int, done: dict[int, torch.Tensor]
) -> int:
    """Slice the block's own (not its children's) tensors whose leading dimension is E."""
    removed = 0
    own: list[tuple[str, torch.Tensor]] = list(block.named_parameters(recurse=False))
    own += [(n, b) for n, b in block.named_buffers(recurse=False) if b is not None]
    for name, t in own:
        if t.dim() >= 1 and t.shape[0] == e:
            removed += _slice_into(block, name, t, 0, ids, done)
    return removed


_INDEX = re.compile(r"^(.*?)(\d+)$")


def _expert_keys(mod: nn.Module) -> list[str]:
    """Keys of the experts in a ModuleList (all) or ModuleDict (those ending in a number,
    e.g. ``expert_3``; nllb_moe keeps a ``token_dropout`` beside them), by number."""
    if isinstance(mod, nn.ModuleList):
        return [str(i) for i in range(len(mod))]
    keys = [k for k in mod._modules if _INDEX.match(k)]
    return sorted(keys, key=lambda k: int(_INDEX.match(k)[2]))  # type: ignore[index]


def _prune_container(mod: nn.Module, ids: list[int]) -> int:
    """Keep experts ``ids`` of a ModuleList / ModuleDict in place, renumbered 0..N-1;
    returns the bytes removed."""

    def nbytes(m: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for _, _, t in _tensors(m))

    keep = set(ids)
    if isinstance(mod, nn.ModuleList):
        experts = list(mod)
        removed = sum(nbytes(m) for i, m in enumerate(experts) if i not in keep)
        for _ in range(len(mod)):
            del mod[0]
        mod.extend([experts[i] for i in ids])
        return removed
    assert isinstance(mod, nn.ModuleDict)
    keys = _expert_keys(mod)
    items = [(k, mod[k]) for k in keys]
    removed = sum(nbytes(m) for i, (_, m) in enumerate(items) if i not in keep)
    others = [(k, m) for k, m in mod.items() if k not in set(keys)]
    for k in list(mod.keys()):
        del mod[k]
    for j, i in enumerate(ids):
        key, m = items[i]
        match = _INDEX.match(key)
        assert match is not None  # _expert_keys kept numbered keys only
        mod[f"{match[1]}{j}"] = m
    for k, m in others:
        mod[k] = m
    return removed


def _set_counts(objs: Sequence[Any], e: int, n: int, names: Sequence[str]) -> list[str]:
    changed = []
    for obj in objs:
        d = getattr(obj, "__dict__", {})
        for name in names:
            v = d.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v == e:
                setattr(obj, name, n)
                changed.append(name)
    return changed


def _set_config(cfg: Any, e: int, n: int) -> list[str]:
    changed = []
    for c in _text_configs(cfg):
        for name in CONFIG_FIELDS:
            try:
                v = getattr(c, name, None)
            except Exception:  # some configs raise on ambiguous per-layer fields
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v == e:
                setattr(c, name, n)
                changed.append(name)
    return changed


def prune_model(
    model: nn.Module,
    keep: Mapping[str, Sequence[int]],
    *,
    inplace: bool = False,
    verify: bool = True,
) -> tuple[nn.Module, PruneSummary]:
    """``(pruned model, summary)`` keeping experts ``keep[path]`` in every MoE layer.

    Args:
        model: a transformers MoE model or a moescope.nn model (TinyMoELM,
            TinyMoEForCausalLM, any module with MoELayer blocks).
        keep: ``{layer path: expert ids}`` for every MoE layer (paths as the monitor
            names them), the same number N of distinct ids in [0, E) each.
        inplace: edit ``model`` itself instead of a structural copy.
        verify: check that the new config builds a model with exactly these tensor
            shapes (:func:`pruned_config_matches`).

    Raises:
        PruneError: a refusal of :func:`check_prunable`, ids that are out of range,
            repeated, unequal in number or for unknown layers, or a pruned model that its
            config would not rebuild.
    """
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1:
        raise PruneError(
            f"every layer must keep the same number of experts, got {sorted(sizes)} "
            "(the config holds one count)"
        )
    n = sizes.pop()
    infos = check_prunable(model, n)
    paths = [i.path for i in infos]
    if set(keep) != set(paths):
        missing = sorted(set(paths) - set(keep))
        extra = sorted(set(keep) - set(paths))
        raise PruneError(
            f"kept experts must be given for every MoE layer: missing {missing[:3]}, "
            f"unknown {extra[:3]}"
        )
    e = infos[0].num_experts
    ids_of: dict[str, list[int]] = {}
    for path in paths:
        ids = sorted(int(i) for i in keep[path])
        if len(set(ids)) != len(ids) or ids[0] < 0 or ids[-1] >= e:
            raise PruneError(f"{path}: kept ids must be distinct and in [0, {e}), got {ids}")
        ids_of[path] = ids
    before = _unique_params(model)
    if not inplace:
        memo: dict[int, Any] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            memo[id(t)] = t
        model = copy.deepcopy(model, memo)
        infos = [i for i in moe_layers(model)]
    removed = 0
    done: dict[int, torch.Tensor] = {}  # id(original tensor) -> its pruned replacement
    containers: set[int] = set()
    for info in infos:
        ids = ids_of[info.path]
        idx = torch.tensor(ids, dtype=torch.long)
        objs: list[Any] = [info.module]
        for mod in _experts_container(info):
            objs.append(mod)
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
                if id(mod) not in containers:
                    containers.add(id(mod))
                    removed += _prune_container(mod, ids)
            else:
                removed += _prune_tensors(mod, idx, e, leading_only=True, done=done)
        if info.router is not None:
            objs.append(info.router)
            removed += _prune_tensors(info.router, idx, e, leading_only=False, done=done)
        # Per-expert vectors kept on the block itself (afmoe's / lfm2_moe's expert_bias,
        # minimax_m2's and hy_v3's e_score_correction_bias).
        removed += _prune_own_tensors(info.module, idx, e, done)
        _set_counts(objs, e, n, COUNT_ATTRS)
    cfg = config_of(model)
    fields = _set_config(cfg, e, n)
    # moescope.nn's transformers model also holds the plain TinyMoEConfig on its stack.
    seen = {id(cfg)}
    for m in model.modules():
        sub = getattr(m, "config", None)
        if sub is not None and id(sub) not in seen:
            seen.add(id(sub))
            fields += _set_config(sub, e, n)
    summary = PruneSummary(
        num_experts=e,
        kept=n,
        params_before=before,
        params_after=_unique_params(model),
        removed_bytes=removed,
        config_fields=sorted(set(fields)),
        keep=ids_of,
    )
    if verify:
        if not fields:
            raise PruneError(
                f"no field of the {type(cfg).__name__} holds the number of experts ({e}); "
                f"moescope knows {', '.join(CONFIG_FIELDS)}"
            )
        problem = pruned_config_matches(model)
        if problem:
            raise PruneError(f"the pruned model would not reload from its config: {problem}")
    return model, summary


def pruned_config_matches(model: nn.Module) -> str | None:
    """None when the model that ``model.config`` describes (built on the meta device) has
    exactly ``model``'s tensor names and shapes; else the first difference, in words."""
    from moescope.cost.params import build_meta_model

    cfg = config_of(model)
    if cfg is None:
        return "the model has no config"
    try:
        ref = build_meta_model(cfg)
    except Exception as err:
        return f"its config does not build ({err})"
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for k, shape in theirs.items():
        if k in mine and mine[k] != shape:
            return f"{k} has shape {mine[k]}, the config builds {shape}"
    missing = sorted(set(theirs) - set(mine))
    if missing:
        return f"{missing[0]} is missing"
    return None
