"""Forward + backward throughput of moescope's MoELayer against transformers and a naive loop.

Question: is ``moescope.nn.MoELayer`` (top-k router + GroupedExperts) at least as fast on CPU
as transformers' own ``MixtralSparseMoeBlock`` with its default ``grouped_mm`` experts
backend, and several times faster than the per-expert boolean-mask loop of MoE tutorials?

Implementations (same router and expert weights copied into each, same tokens):

- ``moescope``: ``MoELayer(TopKRouter(normalize=True), GroupedExperts(backend="auto"))``;
- ``hf_grouped_mm`` / ``hf_eager``: transformers 5.x ``MixtralSparseMoeBlock`` with
  ``config._experts_implementation`` set to ``"grouped_mm"`` / ``"eager"`` (the attribute
  the ``@use_experts_implementation`` decorator reads on every call);
- ``naive``: the tutorial pattern: a ModuleList of per-expert ``nn.Linear`` SwiGLU MLPs,
  one boolean mask + ``torch.where`` per expert, ``index_add_`` to combine.

Each timed step is forward + backward of ``(y * g).sum()`` for a fixed random ``g``.
Implementations run round-robin within every repetition (rotating the order) so that the
load of a shared machine affects them alike; the table reports the median per
implementation and ratios of medians measured in the same run.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layer_throughput.py
      [--quick] [--tokens T] [--threads N] [--reps R] [--warmup W] [--grid 8x2,64x8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from moescope.nn.experts import GroupedExperts
from moescope.nn.layer import MoELayer
from moescope.nn.routers import TopKRouter


class NaiveExpert(nn.Module):
    """One SwiGLU expert as three Linear layers (the pre-5.x Mixtral / tutorial layout)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class NaiveMoE(nn.Module):
    """The tutorial MoE: loop over experts, boolean mask per expert."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(NaiveExpert(hidden, inter) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(flat.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            out = out.index_add(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.reshape(x.shape)


def build_all(
    num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype
) -> dict[str, nn.Module]:
    """All implementations with identical weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoELayer(
        TopKRouter(hidden, num_experts, top_k, normalize=True),
        GroupedExperts(num_experts, hidden, inter, activation="silu"),
    )
    impls: dict[str, nn.Module] = {"moescope": ours}
    for backend in ("grouped_mm", "eager"):
        config = MixtralConfig(
            hidden_size=hidden,
            intermediate_size=inter,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            router_jitter_noise=0.0,
        )
        config._experts_implementation = backend
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            block.experts.down_proj.copy_(ours.experts.down_proj)
        impls[f"hf_{backend}"] = block
    naive = NaiveMoE(hidden, inter, num_experts, top_k)
    with torch.no_grad():
        naive.gate.weight.copy_(ours.router.weight)
        for e, expert in enumerate(naive.experts):
            gate_up = ours.experts.gate_up_proj[e]
            expert.w1.weight.copy_(gate_up[:inter])
            expert.w3.weight.copy_(gate_up[inter:])
            expert.w2.weight.copy_(ours.experts.down_proj[e])
    impls["naive"] = naive
    return {name: m.to(dtype).train() for name, m in impls.items()}


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        return y.detach()

    return step


def run_config(
    num_experts: int,
    top_k: int,
    tokens: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    warmup: int,
    reps: int,
) -> dict[str, float]:
    """Median seconds per forward+backward step for every implementation."""
    impls = build_all(num_experts, top_k, hidden, inter, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, hidden, generator=g).to(dtype)
    grad = torch.randn(1, tokens, hidden, generator=g).to(dtype)
    steps = {name: step_fn(m, x, grad) for name, m in impls.items()}
    outs = {name: s() for name, s in steps.items()}  # also the first warm-up step
    ref = outs["hf_eager"].float()
    for name, y in outs.items():
        err = ((y.float() - ref).norm() / ref.norm()).item()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if err > tol:
            raise AssertionError(f"{name} disagrees with hf_eager: relative error {err:.2e}")
    for _ in range(warmup - 1):
        for s in steps.values():
            s()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: T=256, E x K in {8x2, 64x2}, 1 warm-up, 2 reps",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tokens", type=int, default=None, help="T (default 4096; 256 quick)")
    parser.add_argument("--reps", type=int, default=None, help="timed reps (default 5; 2 quick)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default 2; 1 quick)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--grid", default=None, help="comma-separated ExK configs (default 8x2,8x8,64x2,64x8)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hidden, inter = 512, 1024
    tokens = args.tokens or (256 if args.quick else 4096)
    warmup = args.warmup or (1 if args.quick else 2)
    reps = args.reps or (2 if args.quick else 5)
    grid_arg = args.grid or ("8x2,64x2" if args.quick else "8x2,8x8,64x2,64x8")
    grid = [tuple(int(v) for v in item.split("x")) for item in grid_arg.split(",")]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
        f"T={tokens}, H={hidden}, I={inter}, warmup {warmup}, reps {reps} (median)\n"
    )
    print(
        "| E | K | moescope tok/s | hf grouped_mm tok/s | hf eager tok/s | naive tok/s "
        "| moescope / hf grouped_mm | moescope / hf eager | moescope / naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e, k in grid:
        med = run_config(e, k, tokens, hidden, inter, dtype, warmup, reps)
        tps = {n: tokens / s for n, s in med.items()}
        print(
            f"| {e} | {k} | {tps['moescope']:,.0f} | {tps['hf_grouped_mm']:,.0f} "
            f"| {tps['hf_eager']:,.0f} | {tps['naive']:,.0f} "
            f"| {med['hf_grouped_mm'] / med['moescope']:.2f}x "
            f"| {med['hf_eager'] / med['moescope']:.2f}x "
            f"| {med['naive'] / med['moescope']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
