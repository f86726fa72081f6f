"""Test-only shims that let megatron-core 0.16.1 run a GPT model on a CPU-only torch.

Megatron-core assumes CUDA in a few places that have nothing to do with routing:

- ``torch.cuda.current_device()`` as the device of new buffers (the attention's global
  memory buffer, the router's ``expert_bias`` / ``local_tokens_per_expert`` buffers, the
  router moving its weight "back" to the GPU in ``gating``): here it answers ``cpu``;
- the tensor-parallel RNG tracker (``get_cuda_rng_tracker().fork()`` around dropout and
  weight initialisation swaps CUDA generator states): here ``fork`` is a no-op, so the
  default CPU generator is used (the tests run with dropout 0);
- ``moe_utils.te_general_gemm``: megatron-core 0.16.1 defines it only when
  TransformerEngine imports, yet ``RouterGatingLinearFunction`` tests it against None;
  without TE the name is missing (NameError). Here it is None, which selects Megatron's own
  torch matmul fallback, i.e. what the code means to do without TE;
- the pipeline schedules' token counter, created with ``device="cuda"``
  (``schedules.torch.zeros(..., device="cuda")``): the schedules module sees a ``torch``
  whose ``zeros`` puts such tensors on the CPU; ``torch.cuda.synchronize`` (pipeline
  send/receive) is a no-op;
- Megatron's ``@jit_fuser`` helpers (``torch.compile``; e.g. the router's expert-bias
  token counter) run eagerly: inductor compiles them for seconds in every forked rank,
  for the same values;
- the alltoall dispatcher's side stream for device-to-host copies
  (``torch.cuda.Stream``, ``torch.cuda.current_stream``, ``torch.cuda.stream``,
  ``stream.record_event().synchronize()``): here one inert CPU stream object, so the
  copies it guards are plain (synchronous) CPU copies; and its host copy of the
  all-to-all split sizes (``maybe_move_tensor_to_cpu(..., as_numpy=True)``) converts only
  CUDA tensors, so on the CPU the splits stayed tensors, which ``all_to_all_single``
  rejects: here a CPU tensor asked for as numpy becomes numpy, as a GPU one would.

Nothing here touches a routing decision, a token count or a collective: the router,
dispatchers and experts run Megatron's own code unchanged. The causal attention mask is
passed explicitly by the tests (Megatron builds its default one with ``device="cuda"``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class _CpuEvent:
    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None


class _CpuStream:
    """One inert stream: every ``torch.cuda`` stream call gets this object."""

    def wait_stream(self, other: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _CpuEvent:
        return _CpuEvent()

    def synchronize(self) -> None:
        return None


class _CpuTorch:
    """``torch`` for Megatron's schedules module: ``zeros(device="cuda")`` on the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


_STREAM = _CpuStream()
_installed = False


def install() -> None:
    """Apply the shims (idempotent; process-wide, for the test process only)."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    _installed = True
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _STREAM  # type: ignore[assignment]
    torch.cuda.Stream = lambda *a, **k: _STREAM  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch._dynamo.config.disable = True
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher

    to_host = token_dispatcher.maybe_move_tensor_to_cpu

    def host_copy(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = host_copy
    schedules.torch = _CpuTorch()  # type: ignore[attr-defined]

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    mrandom.initialize_rng_tracker()
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda name=None: contextlib.nullcontext()  # type: ignore[method-assign]
