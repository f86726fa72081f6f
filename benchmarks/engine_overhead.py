"""Training step time of a training engine with and without moescope (goal <= 1.02x).

One process trains the engine's own MoE model; every repetition times a block of
``--steps`` training steps with the monitor attached and a block with it detached (the
same model and optimizer; the order alternates between repetitions so slow drifts of the
machine hit both alike). A monitored block includes the integration's per-step call
(``on_step_end``), so the snapshots it takes at the log interval (flush, reduction, one
host copy, metrics, sinks) are inside the timing: keep ``--steps`` a multiple of
``--log-interval``. Each block is timed twice: wall clock, and the CPU time of this
process (``time.process_time``, all its threads; with ``--threads 1`` on a shared CPU it
is what the step costs whatever else runs on the machine, where wall time is not). The
table reports, for both, the median per step of each, the ratio of the medians
(monitored / plain) and the median of the ratios within each repetition.

Engines (``--engine``), each in the training-engines venv (``make test-engines``)::

    .venv-engines/bin/python benchmarks/engine_overhead.py --engine megatron --reps 10

- ``megatron``: megatron-core's ``GPTModel`` with MoE (local spec, no TransformerEngine):
  ``--layers`` x (attention + ``MoELayer`` with E = ``--experts``, K = ``--top-k``, the
  alltoall dispatcher), hidden ``--hidden``, ``--batch`` x ``--seq`` tokens per step,
  forward + backward + SGD, :class:`moescope.integrations.megatron.MoEMegatronCallback`
  logging every ``--log-interval`` steps (no writer: the cost of a sink is the sink's).
  On a CPU-only torch it needs the test suite's CUDA shims
  (``tests/with_engines/_megatron_cpu.py``; nothing there touches routing); on a GPU
  none is installed and the model runs on the GPU.
- ``torchtitan``: torchtitan's own deepseek_v3 ``debugmodel`` (dim 256, 2 shared experts,
  softmax router with the aux-loss-free bias), its first ``--layers`` blocks (the first
  is dense), E = ``--experts``, K = ``--top-k`` (``--hidden`` is the model's: 256), SDPA
  attention; forward + cross-entropy + backward + torchtitan's AdamW
  ``OptimizersContainer`` with its bias-update pre-hook, on the CPU (one process, no
  mesh); :class:`moescope.integrations.torchtitan.MoETorchtitanCallback` ending a window
  every ``--log-interval`` steps (``on_log_step``, what torchtitan's
  ``MetricsProcessor.log`` triggers; no sink).
- ``deepspeed``: ``--layers`` residual ``deepspeed.moe.layer.MoE`` layers (expert
  Linear(H, 2H)-GELU-Linear(2H, H), E = ``--experts``, K = ``--top-k``, capacity factor
  1.25, so tokens are dropped) between an input projection and a linear head, float32,
  through ``deepspeed.initialize`` (one process, CPU accelerator on a CPU-only torch, gloo,
  torch AdamW); :func:`moescope.integrations.deepspeed.attach` with ``steps_per_print`` =
  ``--log-interval`` (no DeepSpeed monitor configured: the cost of a writer is the
  writer's). Monitored steps go through moescope's ``engine.step`` wrapper, plain ones
  call DeepSpeed's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _megatron(args: argparse.Namespace) -> tuple[Callable[[bool], None], Any]:
    """A training step of a Megatron GPT-MoE and its MoEMegatronCallback (detached)."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "tests" / "with_engines"))
    import _megatron_cpu

    _megatron_cpu.install()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moescope.integrations.megatron import MoEMegatronCallback

    ps.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    if cuda:
        model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=max(1, args.hidden // 64),
        num_moe_experts=args.experts,
        moe_router_topk=args.top_k,
        moe_token_dispatcher_type="alltoall",
        ffn_hidden_size=args.hidden * 2,
        moe_ffn_hidden_size=args.hidden,
        use_cpu_initialization=not cuda,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
    )
    device = torch.device("cuda" if cuda else "cpu")
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(num_experts=args.experts),
        vocab_size=1024,
        max_sequence_length=args.seq,
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (args.batch, args.seq + 1), generator=g).to(device)
    pos = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device=device), 1)
    mask = mask[None, None]
    moe = MoEMegatronCallback(model, log_interval=args.log_interval, writer=None, wandb_writer=None)
    moe.monitor.detach()
    state = {"iteration": 0}

    def step(monitored: bool) -> None:
        loss = model(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if monitored:
            state["iteration"] += 1
            moe.on_step_end(state["iteration"])
        if cuda:
            torch.cuda.synchronize()

    return step, moe  # type: ignore[return-value]


def _torchtitan(args: argparse.Namespace) -> tuple[Callable[[bool], None], Any]:
    """A training step of torchtitan's deepseek_v3 debugmodel and its
    MoETorchtitanCallback (detached)."""
    from types import SimpleNamespace

    import torch
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import model_registry

    from moescope.integrations.torchtitan import MoETorchtitanCallback

    spec = model_registry("debugmodel")
    cfg = spec.model
    cfg.layers = cfg.layers[: max(2, args.layers)]
    for layer in cfg.layers:
        # FlexAttention has no backward on CPU.
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        moe = layer.moe
        if moe is not None:
            moe.num_experts = moe.router.num_experts = args.experts
            moe.routed_experts.inner_experts.num_experts = args.experts
            moe.routed_experts.token_dispatcher.num_experts = args.experts
            moe.router.top_k = moe.routed_experts.token_dispatcher.top_k = args.top_k
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    opt = default_adamw(lr=8e-4).build(model_parts=[model])
    # One process: the bias-update hook reads only these ParallelDims fields.
    dims = SimpleNamespace(ep_enabled=False, tp=1, get_optional_mesh=lambda *_a, **_k: None)
    spec.post_optimizer_build_fn(opt, [model], dims)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2048, (args.batch, args.seq + 1), generator=g)
    cb = MoETorchtitanCallback(
        [model], log_to_console=False, log_heatmap_every=None, save_detailed_logs=False
    )
    cb.monitor.detach()
    state = {"step": 0}

    def step(monitored: bool) -> None:
        opt.zero_grad()
        pred = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            pred.flatten(0, 1).float(), tokens[:, 1:].flatten()
        )
        loss.backward()
        opt.step()
        if monitored:
            state["step"] += 1
            if state["step"] % args.log_interval == 0:
                cb.on_log_step(state["step"])

    return step, cb


def _deepspeed(args: argparse.Namespace) -> tuple[Callable[[bool], None], Any]:
    """A DeepSpeed MoE training step and its :func:`moescope.integrations.deepspeed.attach`
    handle (monitor detached). A monitored step goes through moescope's ``engine.step``
    wrapper (the snapshot every ``--log-interval`` = ``steps_per_print`` steps); a plain
    one calls DeepSpeed's own ``engine.step``, so it takes no snapshot."""
    import torch
    from torch import nn

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29562")):
        os.environ.setdefault(key, value)
    for key in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(key, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed
    import deepspeed.ops
    from deepspeed.moe.layer import MoE

    from moescope.integrations import deepspeed as ds_int

    # No shared-memory collective op build (about 90 s the first time; one process has no
    # collectives to speed up).
    deepspeed.ops.__compatible_ops__ = {}
    hidden = args.hidden

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(hidden, hidden)
            expert = nn.Sequential(
                nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
            )
            self.moes = nn.ModuleList(
                MoE(hidden, expert, num_experts=args.experts, k=args.top_k, capacity_factor=1.25)
                for _ in range(args.layers)
            )
            self.head = nn.Linear(hidden, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            aux = h.new_zeros(())
            for moe in self.moes:
                out, l_aux, _ = moe(h)
                h = h + out
                aux = aux + l_aux
            return self.head(h).pow(2).mean() + 0.01 * aux

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": args.log_interval}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    x = torch.randn(args.batch, args.seq, hidden, generator=torch.Generator().manual_seed(1))
    moe = ds_int.attach(
        engine, log_to_console=False, log_heatmap_every=None, alert_threshold_imbalance=None
    )
    moe.monitor.detach()
    plain_step = moe._orig_step

    def step(monitored: bool) -> None:
        loss = engine(x)
        engine.backward(loss)
        (engine.step if monitored else plain_step)()

    return step, moe


ENGINES: dict[str, Callable[[argparse.Namespace], tuple[Callable[[bool], None], Any]]] = {
    "megatron": _megatron,
    "torchtitan": _torchtitan,
    "deepspeed": _deepspeed,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=sorted(ENGINES), required=True)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    step, handle = ENGINES[args.engine](args)
    mon = handle.monitor

    def block(monitored: bool) -> tuple[float, float]:
        if monitored:
            mon.attach()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            step(monitored)
        dw, dc = time.perf_counter() - w0, time.process_time() - c0
        if monitored:
            mon.detach()
        return dw, dc

    for i in range(args.warmup):
        block(i % 2 == 0)
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    for rep in range(args.reps):
        order = (True, False) if rep % 2 == 0 else (False, True)
        for monitored in order:
            (on if monitored else off).append(block(monitored))
        print(f"rep {rep}: on {on[-1]} off {off[-1]}", file=sys.stderr, flush=True)
    per_step = 1e3 / args.steps
    print(
        f"engine={args.engine} layers={args.layers} hidden={args.hidden} E={args.experts} "
        f"K={args.top_k} tokens/step={args.batch * args.seq} steps/block={args.steps} "
        f"reps={args.reps} log_interval={args.log_interval}"
    )
    print("| clock | plain ms/step | monitored ms/step | ratio of medians | median of ratios |")
    print("|---|---|---|---|---|")
    for i, clock in enumerate(("wall", "process CPU")):
        a = [x[i] for x in on]
        b = [x[i] for x in off]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(
            f"| {clock} | {statistics.median(b) * per_step:.1f} "
            f"| {statistics.median(a) * per_step:.1f} "
            f"| {statistics.median(a) / statistics.median(b):.3f} "
            f"| {statistics.median(ratios):.3f} |"
        )
    handle.close()


if __name__ == "__main__":
    main()
