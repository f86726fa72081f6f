"""The adapter protocol: how moescope finds MoE layers and captures their routing.

An adapter recognises MoE blocks in a model by structure and, once attached, emits one
RoutingRecord per block call. Adapters only capture: no metric math here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from moescope.capture.record import RecordScoreFn, RoutingRecord

Emit = Callable[[RoutingRecord], None]
Detach = Callable[[], None]


@dataclass
class LayerInfo:
    """One MoE block a monitor found.

    ``path`` is the module path (``model.layers.3.mlp``), ``adapter`` the adapter's name,
    ``num_experts`` E (routed), ``top_k`` K, ``module`` the block itself.

    What adapters, neuron capture and cost accounting read from each other is a typed
    field (set what applies, leave the rest at its default):

    - ``experts``: the one fused module the routed experts run in (transformers'
      ``experts`` child called as ``experts(hidden, index, weights)``), None when the
      block has none; neuron capture hooks it.
    - ``index_arg`` / ``weight_arg``: the names of ``experts.forward``'s routing index
      [T, K] and weight [T, K] parameters (positions 1 and 2).
    - ``score_fn``: how the router's logits become a distribution (``softmax``,
      ``sigmoid``, ``probs``), as in :class:`~moescope.capture.record.RoutingRecord`.
    - ``hooked``: the module the adapter hooks when it is not ``module`` (a
      :class:`~moescope.capture.custom.SimpleAdapter` target, doge's ``down_embed``).
    - ``extra``: private to the adapter that built the info (its own remembered
      state); nothing else in moescope reads it.

    Parameter accounting (:mod:`moescope.cost`) reads the same object, so what is
    monitored and what is counted are one detection:

    - ``expert_modules``: the modules holding the routed experts' weights (a fused
      ``experts`` module with [E, ...] tensors, a ``ModuleList``/``ModuleDict`` of E
      experts, or several modules whose tensors all carry E first, e.g. doge's
      ``down_embed``/``up_embed``). Empty: the block's ``experts`` child.
    - ``router``: the router module (its parameters are the router's), None when the
      adapter has none to name.
    - ``active_top_k``: experts a token uses on average when it differs from the capture
      slots ``top_k`` (expert-choice routing records E slots per token); None = ``top_k``.
    - ``expert_bias``: the router's live [E] selection bias (DeepSeek-V3's aux-loss-free
      balancing: Megatron's ``expert_bias``, torchtitan's ``expert_bias``), a reference
      to the model's own tensor that the trainer updates in place; snapshots copy it into
      ``LayerStats.expert_bias``. None when the router has none.
    """

    path: str
    adapter: str
    num_experts: int
    top_k: int
    module: nn.Module
    expert_modules: tuple[nn.Module, ...] = ()
    router: nn.Module | None = None
    active_top_k: int | None = None
    expert_bias: torch.Tensor | None = None
    experts: nn.Module | None = None
    index_arg: str = "top_k_index"
    weight_arg: str = "top_k_weights"
    score_fn: RecordScoreFn = "softmax"
    hooked: nn.Module | None = None
    extra: dict[str, object] = field(default_factory=dict)


class CaptureContext:
    """State shared by all adapters of one monitor during a forward.

    The monitor fills ``attention_mask`` from the top-level forward; adapters ask
    ``token_mask(T)`` for the [T] bool mask of the current layer call (None = all valid).
    ``decoder_attention_mask`` is the same for the decoder stack of encoder-decoder models.
    ``counting`` is False while a forward must not be counted (e.g. gradient-checkpoint
    recomputation during backward).
    """

    def __init__(self) -> None:
        self._attention_mask: torch.Tensor | None = None
        self._masks: dict[int, torch.Tensor | None] = {}
        self.decoder_attention_mask: torch.Tensor | None = None
        self.counting: bool = True

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._attention_mask

    @attention_mask.setter
    def attention_mask(self, mask: torch.Tensor | None) -> None:
        self._attention_mask = mask
        self._masks = {}

    def token_mask(self, num_tokens: int) -> torch.Tensor | None:
        """[T] bool for a layer that saw ``num_tokens`` = batch x new positions.

        With a KV cache, the layer sees only the last S positions, so the mask's last S
        columns are used. Returns None when no mask applies or shapes do not match.
        Computed once per forward and token count (every layer shares it).
        """
        if num_tokens not in self._masks:
            self._masks[num_tokens] = self._token_mask(num_tokens)
        return self._masks[num_tokens]

    def _token_mask(self, num_tokens: int) -> torch.Tensor | None:
        m = self._attention_mask
        if m is None or m.dim() != 2:
            return None
        b = m.shape[0]
        if b == 0 or num_tokens % b != 0:
            return None
        s = num_tokens // b
        if s > m.shape[1]:
            return None
        return m[:, -s:].reshape(-1).to(torch.bool)


def router_bias(*owners: object) -> torch.Tensor | None:
    """The live [E] selection-bias tensor of a DeepSeek-V3-style router, looked up on
    ``owners`` in order (``e_score_correction_bias`` in transformers and moescope.nn,
    ``expert_bias`` in Megatron-core and torchtitan); None when none has one."""
    for owner in owners:
        for name in ("e_score_correction_bias", "expert_bias"):
            t = getattr(owner, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                return t
    return None


def in_backward() -> bool:
    """True while autograd runs a backward pass.

    A forward that runs then is a gradient-checkpoint recomputation (reentrant:
    ``CheckpointFunction.backward``; non-reentrant: the unpack hook of a saved tensor);
    both run inside a graph task. Such a forward must not be counted twice. While Dynamo
    traces, False: the compiled path checks it when the graph runs (``moescope::stage``).
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def argument_position(module: nn.Module, name: str) -> int | None:
    """Position of ``module.forward``'s parameter ``name`` when it can be passed
    positionally (None when it cannot, or the signature is unreadable)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name == name and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None


def forward_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int | None
) -> Any:
    """A forward's argument ``name``: by keyword, else at ``position`` when passed
    positionally (None when absent)."""
    value = kwargs.get(name)
    if value is None and position is not None and len(args) > position:
        value = args[position]
    return value


def as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as [T, width] (a view); ``x`` itself when it already is (no op dispatched)."""
    if x.dim() == 2 and x.shape[1] == width:
        return x
    return x.reshape(-1, width)


class ForwardOnlyContext(CaptureContext):
    """CaptureContext whose ``counting`` is also False inside a backward pass
    (:func:`in_backward`); setting ``counting`` pauses or resumes it otherwise."""

    def __init__(self) -> None:
        self._enabled = True
        super().__init__()

    @property
    def counting(self) -> bool:
        return self._enabled and not in_backward()

    @counting.setter
    def counting(self, value: bool) -> None:
        self._enabled = bool(value)


def attach_all(steps: Iterable[Callable[[], Detach]]) -> list[Detach]:
    """Run attach steps in order and return their detach functions; if one raises, undo
    the ones already done (last first) and re-raise, so a failed attach leaves no hook."""
    done: list[Detach] = []
    try:
        for step in steps:
            done.append(step())
    except BaseException:
        for d in reversed(done):
            d()
        raise
    return done


def top_level_hooks(
    model: nn.Module,
    pre_hook: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None],
    post_hook: Callable[[nn.Module, tuple[Any, ...], Any], None],
) -> list[Callable[[], Detach]]:
    """Attach steps for the top-level forward's (kwargs-aware) pre-hook, which reads the
    attention mask, and its post-hook, which always runs (even when the forward raises)."""
    return [
        lambda: model.register_forward_pre_hook(pre_hook, with_kwargs=True).remove,
        lambda: model.register_forward_hook(post_hook, always_call=True).remove,
    ]


@runtime_checkable
class MoEAdapter(Protocol):
    """What an adapter implements (see docs/custom_adapter.md).

    ``match(path, module)`` returns a LayerInfo when ``module`` is an MoE block this
    adapter handles, else None. ``attach(info, emit, ctx)`` installs hooks that call
    ``emit(record)`` once per block call (skipping calls while ``ctx.counting`` is False)
    and returns a function that removes every hook and restores anything it patched.
    """

    name: str

    def match(self, path: str, module: nn.Module) -> LayerInfo | None: ...

    def attach(self, info: LayerInfo, emit: Emit, ctx: CaptureContext) -> Detach: ...
