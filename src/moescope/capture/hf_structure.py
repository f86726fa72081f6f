"""The one structure detector for transformers MoE blocks: names, keys and readings.

Every adapter in ``capture/`` that needs to know what a router is called, where K (experts
per token) lives, how many experts are routed or what the router's scores are reads it
here, so there is one list of each. Parameter accounting (``cost/``) finds MoE blocks
through the same adapters (their :class:`~moescope.capture.adapter.LayerInfo`), so what is
monitored and what is counted agree.

- :data:`ROUTER_NAMES`: child names a block's router goes by, most common first.
- :data:`TOP_K_KEYS`: attribute names holding K, on a router, a block or a config, in the
  order tried. The bare ``top_k`` / ``topk`` come last: older configs used ``top_k`` for
  generation sampling.
- :func:`find_top_k`: K of a block (router, then block, then config).
- :func:`routed_experts`: E of a fused experts module = the smallest leading dimension of
  its 3-D weights. Zero-compute experts (longcat_flash: ``gate_up_proj`` has E + Z rows,
  ``down_proj`` E) are not routed experts: ids >= E are counted as ``extra_slots``.
- :func:`router_score_fn`: what the router's first output is (``softmax`` / ``sigmoid``
  logits, or ``probs``), from a ``scoring_func``-like attribute when there is one, else
  from the router's forward source.
- :func:`block_token_mask`: the [T] padding mask of a block call, decoder stacks of
  encoder-decoder models reading the decoder's mask.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any

import torch
from torch import nn

from moescope.capture.adapter import CaptureContext
from moescope.capture.record import RecordScoreFn

__all__ = [
    "ROUTER_NAMES",
    "SCORE_FN_ATTRS",
    "TOP_K_KEYS",
    "block_token_mask",
    "find_router",
    "find_top_k",
    "int_attr",
    "is_decoder_path",
    "layer_index",
    "routed_experts",
    "router_score_fn",
]

ROUTER_NAMES: tuple[str, ...] = ("gate", "router", "gating", "router_gate", "switch")

TOP_K_KEYS: tuple[str, ...] = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "experts_per_token",
    "top_k_experts",
    "moe_topk",
    "moe_top_k",
    "moe_k",
    "num_selected_experts",
    "router_topk",
    "top_k",
    "topk",
)

SCORE_FN_ATTRS: tuple[str, ...] = (
    "scoring_func",
    "score_func",
    "score_function",
    "scoring_function",
    "score_fn",
    "expert_selection_fn",
)


def int_attr(obj: Any, names: tuple[str, ...], layer_idx: int | None = None) -> int | None:
    """The first positive int among ``obj.<name>`` (a per-layer list is indexed by
    ``layer_idx``); None when none is set. Config access errors count as unset."""
    for n in names:
        try:
            v = getattr(obj, n, None)
        except Exception:  # heterogeneous configs raise on ambiguous per-layer fields
            v = None
        if isinstance(v, (list, tuple)) and v and layer_idx is not None and layer_idx < len(v):
            v = v[layer_idx]
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def layer_index(path: str) -> int | None:
    """The last numeric segment of a module path (``model.layers.3.mlp`` -> 3)."""
    for part in reversed(path.split(".")):
        if part.isdigit():
            return int(part)
    return None


def find_router(block: nn.Module, exclude: nn.Module | None = None) -> tuple[str, nn.Module] | None:
    """(name, module) of ``block``'s router child, the first of :data:`ROUTER_NAMES`."""
    for name in ROUTER_NAMES:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module) and child is not exclude:
            return name, child
    return None


def find_top_k(
    block: nn.Module, router: nn.Module | None, config: Any, layer_idx: int | None = None
) -> int | None:
    """K: the router's attribute, else the block's, else the config's (:data:`TOP_K_KEYS`)."""
    for obj in (router, block, config):
        if obj is not None:
            k = int_attr(obj, TOP_K_KEYS, layer_idx)
            if k is not None:
                return k
    return None


def routed_experts(experts: nn.Module) -> int | None:
    """E of a fused experts module: the smallest leading dimension among its 3-D
    ``gate_up_proj`` / ``down_proj`` / ``up_proj`` weights (zero-compute experts may add
    rows to some of them, never to all); None when it has none."""
    dims = [
        int(p.shape[0])
        for name in ("gate_up_proj", "down_proj", "up_proj")
        if isinstance(p := getattr(experts, name, None), torch.Tensor) and p.dim() == 3
    ]
    return min(dims) if dims else None


def router_score_fn(router: nn.Module, config: Any) -> RecordScoreFn:
    """What the router's first output is, for entropy and the other score statistics.

    1. A :data:`SCORE_FN_ATTRS` attribute (router, then config) saying ``softmax`` or
       ``sigmoid``: a string (``scoring_func="sigmoid"``, cohere2_moe's
       ``expert_selection_fn``) or an activation module (``score_fn = nn.Sigmoid()``).
    2. The router's forward source (transformers 5.x): when the first value it returns is
       assigned from a ``softmax`` call, the output is a distribution already (``probs``:
       gemma4, diffusion_gemma); else ``sigmoid`` when the source applies a sigmoid and no
       softmax (DeepSeek-V3 style), ``softmax`` when it applies a softmax and no sigmoid
       (longcat_flash: softmax although it keeps an ``e_score_correction_bias``).
    3. Without readable source: ``sigmoid`` when the router keeps an
       ``e_score_correction_bias`` tensor, else ``softmax``.
    """
    for obj in (router, config):
        for attr in SCORE_FN_ATTRS:
            try:
                v = getattr(obj, attr, None)
            except Exception:
                v = None
            if isinstance(v, str) and v.lower() in ("sigmoid", "softmax"):
                return v.lower()  # type: ignore[return-value]
            if isinstance(v, nn.Sigmoid) or v is torch.sigmoid:
                return "sigmoid"
            if isinstance(v, nn.Softmax) or v is torch.softmax:
                return "softmax"
    # Typed as a plain ``type``: mypy does not see ``type(router)`` (``type[Module]``) as
    # Hashable, the cache's argument type, although every class is.
    router_cls: type = type(router)
    from_source = _score_fn_from_source(router_cls)
    if from_source is not None:
        return from_source
    if isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor):
        return "sigmoid"
    return "softmax"


def _calls(node: ast.AST) -> set[str]:
    """Names of the functions / methods called anywhere in ``node``."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Attribute):
                out.add(f.attr)
            elif isinstance(f, ast.Name):
                out.add(f.id)
    return out


@functools.cache
def _score_fn_from_source(cls: type) -> RecordScoreFn | None:
    forward = getattr(cls, "forward", None)
    if forward is None or forward is nn.Module.forward:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    func = tree.body[0] if tree.body else None
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    # Which names are assigned from a softmax call.
    softmaxed: set[str] = set()
    for n in ast.walk(func):
        if isinstance(n, ast.Assign) and "softmax" in _calls(n.value):
            softmaxed |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    for n in ast.walk(func):
        if isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple) and n.value.elts:
            first = n.value.elts[0]
            if (isinstance(first, ast.Name) and first.id in softmaxed) or (
                isinstance(first, ast.Call) and "softmax" in _calls(first)
            ):
                return "probs"
    called = _calls(func)
    if "sigmoid" in called and "softmax" not in called:
        return "sigmoid"
    if "softmax" in called and "sigmoid" not in called:
        return "softmax"
    return None


def is_decoder_path(path: str) -> bool:
    """True when a path segment is ``decoder`` (the decoder stack of an encoder-decoder
    model: switch_transformers, nllb_moe, diffusion_gemma's canvas)."""
    return "decoder" in path.split(".")


def block_token_mask(ctx: CaptureContext, path: str, num_tokens: int) -> torch.Tensor | None:
    """[T] bool token mask of a block call (None = all tokens count).

    Blocks outside a ``decoder`` stack use ``ctx.token_mask`` (the top-level
    ``attention_mask``). Blocks inside one use ``ctx.decoder_attention_mask`` (the
    top-level ``decoder_attention_mask``) with the same last-S-columns rule (a canvas mask
    that also covers the prompt's cache keeps the canvas columns), and count every token
    when there is none: the encoder's mask has the encoder's length and says nothing about
    decoder tokens.
    """
    if not is_decoder_path(path):
        return ctx.token_mask(num_tokens)
    dec_mask = ctx.decoder_attention_mask
    if dec_mask is None:
        return None
    # Reuse CaptureContext's own slicing rule so encoder and decoder masks agree on caches.
    tmp = CaptureContext()
    tmp.attention_mask = dec_mask
    return tmp.token_mask(num_tokens)
