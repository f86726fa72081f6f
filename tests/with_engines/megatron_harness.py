"""A tiny Megatron-core GPT model with MoE trained for a few steps on CPU (gloo), with
moescope attached and Megatron's own token counter hooked independently.

One worker (:func:`worker`) runs in every forked rank (``tests/dist_ranks.py``), also
for the single-process reference (world = 1), so Megatron's global parallel state
never leaks into the pytest process. Every run starts from the SAME full weights (built
once by the world-1 run and saved), sliced for the rank's pipeline stage, expert-parallel
rank and tensor-parallel shard, and trains on the same global batches; gradients are
synchronised as Megatron's ``finalize_model_grads`` would (data-parallel mean, expert
data-parallel mean, sequence-parallel sums over tensor-parallel ranks) before a plain
SGD step. Megatron's optimizer is not used: it allocates on ``device='cuda'``.

The reference counter: a forward pre-hook on each ``mlp.experts`` module reads the
``tokens_per_expert`` argument the dispatcher hands to the local experts (rows each local
expert processes, received from every expert-parallel rank), placed at the layer's
``local_expert_indices``; under expert tensor parallelism every expert-TP rank receives
the same rows, so only expert-TP rank 0 adds them.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from moescope.integrations.megatron import MoEMegatronCallback

SEQ = 16
VOCAB = 128
EXPERTS = 8


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm whose parameters carry Megatron's ``sequence_parallel`` flag.

    Megatron's CPU fallback norm (``WrappedTorchNorm``, used without Apex/TE) refuses
    sequence parallelism only because its parameters lack that flag, which tells the
    gradient sync to sum their gradients over tensor-parallel ranks (the harness does);
    the per-token math is the same LayerNorm.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


def _spec(config: Any) -> Any:
    layer = get_gpt_layer_local_spec(num_experts=EXPERTS)
    if not config.sequence_parallel:
        return layer
    layer.submodules.input_layernorm = SequenceParallelLayerNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    per_stage = config.num_layers // config.pipeline_model_parallel_size
    return TransformerBlockSubmodules(
        layer_specs=[layer] * per_stage, layer_norm=SequenceParallelLayerNorm
    )


def _config(par: dict[str, int], over: dict[str, Any]) -> Any:
    kw: dict[str, Any] = dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        ffn_hidden_size=64,
        moe_ffn_hidden_size=64,
        use_cpu_initialization=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        tensor_model_parallel_size=par.get("tp", 1),
        pipeline_model_parallel_size=par.get("pp", 1),
        virtual_pipeline_model_parallel_size=par.get("vp"),
        expert_model_parallel_size=par.get("ep", 1),
        sequence_parallel=par.get("tp", 1) > 1 and not par.get("eval", False),
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
    )
    kw.update(over)
    return TransformerConfig(**kw)


def _global_name(name: str, model: Any) -> str:
    """Map a rank's parameter name to the unsplit model's (pipeline offset, expert ids)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        local = int(parts[2])
        layer = model.decoder.layers[local]
        parts[2] = str(layer.layer_number - 1)
        if "local_experts" in parts:
            k = parts.index("local_experts") + 1
            parts[k] = str(layer.mlp.local_expert_indices[int(parts[k])])
    return ".".join(parts)


def _load_full(model: Any, full: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full[_global_name(name, model)]
            if getattr(p, "tensor_model_parallel", False) and src.shape != p.shape:
                expert = not getattr(p, "allreduce", True)
                size = (
                    ps.get_expert_tensor_parallel_world_size()
                    if expert
                    else ps.get_tensor_model_parallel_world_size()
                )
                rank = (
                    ps.get_expert_tensor_parallel_rank()
                    if expert
                    else ps.get_tensor_model_parallel_rank()
                )
                src = src.chunk(size, dim=p.partition_dim)[rank]
            p.copy_(src)


def _sync_grads(model: Any, config: Any) -> None:
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if config.sequence_parallel and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        expert = not getattr(p, "allreduce", True)
        group = (
            ps.get_expert_data_parallel_group()
            if expert
            else ps.get_data_parallel_group(with_context_parallel=True)
        )
        n = dist.get_world_size(group)
        if n > 1:
            dist.all_reduce(p.grad, group=group)
            p.grad /= n


def _hook_counts(model: Any, counts: dict[str, torch.Tensor]) -> None:
    adds = ps.get_expert_tensor_parallel_rank() == 0
    for layer in model.decoder.layers:
        moe = layer.mlp
        if not hasattr(moe, "token_dispatcher"):
            continue
        key = f"decoder.layers.{layer.layer_number - 1}.mlp"
        counts[key] = torch.zeros(EXPERTS, dtype=torch.long)
        idx = torch.tensor(moe.local_expert_indices)

        def pre(mod: Any, args: tuple[Any, ...], key: str = key, idx: torch.Tensor = idx) -> None:
            if adds:
                counts[key].index_add_(0, idx, args[1].to(torch.long).reshape(-1))

        moe.experts.register_forward_pre_hook(pre)


def _plain(snap: Any) -> dict[str, dict[str, Any]]:
    """A snapshot's per-layer numbers as picklable tensors and floats."""
    return {
        name: {
            "usage": torch.as_tensor(s.usage_counts),
            "dropped_counts": None
            if s.dropped_counts is None
            else torch.as_tensor(s.dropped_counts),
            "dropped_fraction": s.dropped_fraction,
            "num_tokens": s.num_tokens,
            "entropy": s.routing_entropy,
            "aux": s.aux_loss,
            "coactivation": None if s.coactivation is None else torch.as_tensor(s.coactivation),
            "bias": None
            if getattr(s, "expert_bias", None) is None
            else torch.as_tensor(s.expert_bias),
        }
        for name, s in snap.layers.items()
    }


def _batches(steps: int, gbs: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (gbs, SEQ + 1), generator=g) for _ in range(steps)]


def worker(
    rank: int,
    world: int,
    port: int,
    par: dict[str, int],
    over: dict[str, Any],
    steps: int,
    tmp: str,
    failures: Any,
) -> None:
    try:
        _worker(rank, world, port, par, over, steps, tmp)
    except BaseException as e:
        import traceback

        failures.put(f"rank {rank}: {traceback.format_exc()}")
        raise SystemExit(1) from e


def _worker(
    rank: int,
    world: int,
    port: int,
    par: dict[str, int],
    over: dict[str, Any],
    steps: int,
    tmp: str,
) -> None:
    import _megatron_cpu

    _megatron_cpu.install()
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.get("tp", 1),
        pipeline_model_parallel_size=par.get("pp", 1),
        expert_model_parallel_size=par.get("ep", 1),
        virtual_pipeline_model_parallel_size=par.get("vp"),
    )
    torch.manual_seed(1234)
    config = _config(par, over)
    vp = par.get("vp")
    # One model chunk per virtual pipeline stage (one chunk without virtual stages).
    chunks = [
        GPTModel(
            config,
            _spec(config),
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=v),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=vp is None, vp_stage=v),
            share_embeddings_and_output_weights=False,
            vp_stage=v,
        )
        for v in (range(vp) if vp else [None])
    ]
    model = torch.nn.ModuleList(chunks)  # every chunk's parameters, for the updates
    layers = [layer for c in chunks for layer in c.decoder.layers]
    full_path = os.path.join(tmp, "full.pt")
    if world == 1 and not os.path.exists(full_path):
        torch.save(chunks[0].state_dict(), full_path)
    full = torch.load(full_path)
    counts: dict[str, torch.Tensor] = {}
    for c in chunks:
        _load_full(c, full)
        _hook_counts(c, counts)

    writer = None
    if rank == world - 1:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(tmp, f"tb_w{world}"))
    mm = (
        None
        if par.get("unmonitored")
        else MoEMegatronCallback(
            chunks if vp else chunks[0],
            log_interval=1,
            writer=writer,
            wandb_writer=None,
            save_detailed_logs=rank == world - 1,
            log_dir=os.path.join(tmp, f"logs_w{world}"),
            # fires on every window of this small model: the alert path is exercised
            alert_threshold_imbalance=1.2,
        )
    )

    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    pp = par.get("pp", 1)
    gbs = 4
    micro = pp  # microbatches per step (the pipeline schedule runs with pp > 1)
    mbs = gbs // dp // micro
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    pos = torch.arange(SEQ)

    def fstep(it: Any, m: Any) -> Any:
        b = next(it)
        kw: dict[str, Any] = {}
        if pad:  # the last ``pad`` positions of every sequence are padding (True)
            padding = torch.zeros(b.shape[0], SEQ, dtype=torch.bool)
            padding[:, SEQ - pad :] = True
            kw["padding_mask"] = padding
        out = m(b[:, :-1], pos.expand(b.shape[0], SEQ), mask, labels=b[:, 1:], **kw)

        def loss_fn(o: torch.Tensor) -> Any:
            loss = o.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_fn

    pad = int(par.get("pad", 0))
    # The router module's own output, for padding runs: the map's non-padding rows.
    routed: dict[str, torch.Tensor] = {}

    def router_hook(mod: Any, args: tuple[Any, ...], out: Any, key: str) -> None:
        padding = args[1] if len(args) > 1 else None
        rows = out[1] if padding is None else out[1][~padding.reshape(-1)]
        routed[key] = routed.get(key, 0) + rows.sum(0).long()

    if pad:
        for layer in layers:
            key = f"decoder.layers.{layer.layer_number - 1}.mlp"
            layer.mlp.router.register_forward_hook(partial(router_hook, key=key))

    def batches(mine: torch.Tensor) -> Any:
        its = [iter(list(mine.split(mbs))) for _ in chunks]
        return its if vp else its[0]

    fb = get_forward_backward_func()
    windows: list[dict[str, dict[str, Any]]] = []
    losses: list[float] = []
    megatron_aux: list[torch.Tensor | None] = []
    evaluating = bool(par.get("eval", False))
    if evaluating:
        model.eval()
    for step, batch in enumerate(_batches(steps, gbs, seed=7)):
        mine = batch[dp_rank * gbs // dp : (dp_rank + 1) * gbs // dp]
        model.zero_grad(set_to_none=True)
        if evaluating:
            with torch.no_grad():
                fb(
                    forward_step_func=fstep,
                    data_iterator=batches(mine),
                    model=chunks,
                    num_microbatches=micro,
                    seq_length=SEQ,
                    micro_batch_size=mbs,
                    forward_only=True,
                )
            snap = mm.monitor.snapshot(window="eval", reset=True, record=False)
            windows.append(_plain(snap))
            continue
        res = fb(
            forward_step_func=fstep,
            data_iterator=batches(mine),
            model=chunks,
            num_microbatches=micro,
            seq_length=SEQ,
            micro_batch_size=mbs,
            forward_only=False,
        )
        losses.extend(float(d["lm loss"]) for d in res or [])
        # Megatron's own per-layer load-balancing loss of this step (aux / coefficient)
        tracked = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        megatron_aux.append(None if tracked is None else tracked["values"].clone())
        clear_aux_losses_tracker()
        _sync_grads(model, config)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
        if config.moe_router_enable_expert_bias:
            # Megatron's own update (what finalize_model_grads runs after each step).
            _update_router_expert_bias(chunks, config)
        if mm is None:
            continue
        assert mm.on_step_end(step + 1) is not None
        snap = mm.monitor.last_snapshot
        assert snap is not None
        windows.append(_plain(snap))
    out = {
        "counts": counts,
        "windows": windows,
        "live_bias": {
            f"decoder.layers.{layer.layer_number - 1}.mlp": (
                None
                if getattr(layer.mlp.router, "expert_bias", None) is None
                else layer.mlp.router.expert_bias.clone()
            )
            for layer in layers
        },
        "metrics": {} if mm is None else dict(mm.last_metrics),
        "losses": losses,
        "megatron_aux": megatron_aux,
        "routed": routed,
        "weights": {k: v.clone() for k, v in model.state_dict().items() if "router" in k},
    }
    if mm is not None:
        mm.close()
    if writer is not None:
        writer.close()
    torch.save(out, os.path.join(tmp, f"out_w{world}_r{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
