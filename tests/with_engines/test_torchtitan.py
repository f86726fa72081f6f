"""moescope on torchtitan's own MoE model (deepseek_v3 ``debugmodel``), trained on CPU.

Every scenario runs in forked gloo ranks (tests/dist_ranks.py; one rank for the
single-process run) and drives torchtitan's own parts in the order of
``Trainer.train_step``: its model registry's model, its ``parallelize_fn`` (FSDP, EP, TP),
its ``OptimizersContainer`` with the model spec's ``post_optimizer_build_fn`` (the
aux-loss-free bias update, which reads and zeroes ``tokens_per_expert_E`` before every
optimizer step) and its ``MetricsProcessor`` with TensorBoard, called as the Trainer calls
it (``should_log(step)`` -> ``log(step, loss, max_loss, grad_norm, extra_metrics=...)``).
``Trainer`` itself cannot be built on a CPU-only machine (docs/torchtitan.md says why).

References: torchtitan's own ``tokens_per_expert_E`` counter (read before each optimizer
step, summed over the ranks torchtitan sums it over), the single-process run on the same
global batch, and the TensorBoard event file read back.

torchtitan is imported at the top, once (tests/with_engines/conftest.py collects this file
only where it is installed): the forked ranks inherit it instead of importing it again.
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import default_adamw
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.deepseek_v3 import model_registry

from dist_ranks import run_ranks
from moescope.capture.torchtitan import fqn, local_tensor
from moescope.integrations.torchtitan import (
    MoETorchtitanCallback,
    moescope_process_group,
)

SEQ = 32
GLOBAL = 4  # sequences per step, split over the data-parallel ranks
STEPS = 4
LOG_FREQ = 2  # torchtitan logs steps 1, 2, 4: windows {1}, {2}, {3, 4}
LOG_STEPS = (1, 2, 4)
EVAL_AT = 2  # a validation after step 2: its forwards must stay out of window {3, 4}
MOE = ("layers.1.moe", "layers.2.moe")
BACKEND = "partial_dtensor"


def _cpu_device_module() -> SimpleNamespace:
    """What torchtitan's DeviceMemoryMonitor asks of ``torch.cuda``, for the CPU."""
    return SimpleNamespace(
        get_device_name=lambda *_: "cpu",
        current_device=lambda: 0,
        get_device_properties=lambda *_: SimpleNamespace(total_memory=1 << 30),
        reset_peak_memory_stats=lambda *_: None,
        empty_cache=lambda: None,
        memory_stats=lambda *_: {},
    )


def _torchtitan_on_cpu() -> None:
    # torchtitan picks "cuda" whenever no accelerator is found (tools/utils.py): point its
    # module-level device globals at the CPU, and pick the SPMD backend the way
    # Trainer.__init__ does (dist_utils.set_spmd_backend).
    cpu = _cpu_device_module()
    for name in (
        "torchtitan.tools.utils",
        "torchtitan.distributed.parallel_dims",
        "torchtitan.distributed.utils",
        "torchtitan.components.metrics",
        "torchtitan.models.common.token_dispatcher",
    ):
        mod = importlib.import_module(name)
        if hasattr(mod, "device_type"):
            mod.device_type = "cpu"
        if hasattr(mod, "device_module"):
            mod.device_module = cpu
    importlib.import_module("torchtitan.distributed.utils").set_spmd_backend(BACKEND)


def _spec() -> Any:
    """deepseek_v3 ``debugmodel`` cut to 3 blocks (1 dense + 2 MoE, 8 experts, top-3):
    block 1 keeps its softmax router; block 2 gets a sigmoid router with node-limited
    routing (4 groups, 2 kept) and route_norm. Attention runs SDPA (FlexAttention has no
    backward on CPU)."""
    spec = model_registry("debugmodel")
    cfg = spec.model
    cfg.layers = cfg.layers[:3]
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    router = cfg.layers[2].moe.router
    router.score_func = "sigmoid"
    router.num_expert_groups = 4
    router.num_limited_groups = 2
    router.route_norm = True
    return spec


def _initial_state() -> dict[str, torch.Tensor]:
    # One deterministic initialisation every layout starts from (DTensor random init on a
    # CPU mesh differs from the single-process one).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = _spec().model.build()
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 2048, (GLOBAL, SEQ + 1), generator=g) for _ in range(STEPS)]


def _count_shape_inference(schedule: Any, moes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What torchtitan's counter adds during the pipeline's one shape-inference forward
    per stage (at the first step), by layer: filled when it runs."""
    added: dict[str, torch.Tensor] = {}
    if schedule is None:
        return added
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    for stage in stages:
        infer = stage._forward_metadata_inference

        def measured(*args: Any, _infer: Any = infer, **kwargs: Any) -> Any:
            before = {p: local_tensor(m.tokens_per_expert_E).double() for p, m in moes.items()}
            try:
                return _infer(*args, **kwargs)
            finally:
                for p, m in moes.items():
                    added[p] = local_tensor(m.tokens_per_expert_E).double() - before[p]

        stage._forward_metadata_inference = measured
    return added


def _train(
    rank: int, world: int, layout: dict[str, Any], out: str, state: dict[str, torch.Tensor]
) -> None:
    """One rank of one layout: build, parallelize, train STEPS steps, log at torchtitan's
    log steps; rank 0 writes what the test compares to ``out``."""
    _torchtitan_on_cpu()
    dp_rep, dp_shard = layout["dp_replicate"], layout["dp_shard"]
    tp, ep, pp = layout.get("tp", 1), layout.get("ep", 1), layout.get("pp", 1)
    pd = ParallelDims(
        dp_replicate=dp_rep,
        dp_shard=dp_shard,
        cp=1,
        tp=tp,
        pp=pp,
        ep=ep,
        world_size=world,
        spmd_backend=BACKEND,
    )
    pd.build_mesh()
    spec = _spec()
    parallelism = ParallelismConfig(
        data_parallel_replicate_degree=dp_rep,
        data_parallel_shard_degree=dp_shard,
        tensor_parallel_degree=tp,
        expert_parallel_degree=ep,
        pipeline_parallel_degree=pp,
        # Pipeline stages: embeddings + the dense block + MoE block 1 | MoE block 2 + head;
        # 2 micro-batches of 2 sequences (1F1B).
        pipeline_parallel_microbatch_size=2,
        module_fqns_per_model_part=(
            [["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "norm", "lm_head"]]
            if pp > 1
            else None
        ),
        spmd_backend=BACKEND,
    )
    training = TrainingConfig(
        # FSDP all-gathers bf16 weights by default: float32 keeps step 1 identical to the
        # single-process run, down to near-tied router scores.
        local_batch_size=GLOBAL // (dp_rep * dp_shard),
        seq_len=SEQ,
        mixed_precision_param="float32",
    )
    # What Trainer.__init__ does before building: the sharding config (TP, EP) of each module.
    spec.model.update_from_config(config=SimpleNamespace(parallelism=parallelism))
    with torch.device("meta"):
        model = spec.model.build()
    schedule, first, last = None, True, True
    build = {
        "parallel_dims": pd,
        "training": training,
        "parallelism": parallelism,
        "compile_config": CompileConfig(),
        "ac_config": None,
        "dump_folder": out,
    }
    if pp > 1:
        schedule, parts, first, last = spec.pipelining_fn(
            model,
            device=torch.device("cpu"),
            model_config=spec.model,
            parallelize_fn=spec.parallelize_fn,
            loss_fn=CrossEntropyLoss.Config().build(),
            **build,
        )
    else:
        parts = [spec.parallelize_fn(model, **build) if world > 1 else model]
    for part in parts:
        for m in part.modules():
            # torchtitan sets gradient_divide_factor=1.0, which FSDP sends as
            # PREMUL_SUM(1.0); gloo has only SUM (same result: no division).
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
        if layout.get("full_ac"):
            FullAC.Config().build(dump_folder=out).apply(part)
        part.to_empty(device="cpu")
        with torch.no_grad():
            part.init_weights(buffer_device=None)
        # A pipeline stage loads the entries of its own modules.
        set_model_state_dict(
            part, state, options=StateDictOptions(full_state_dict=True, strict=pp == 1)
        )
        part.train()
    model = parts[0]

    optimizers = default_adamw(lr=8e-4).build(model_parts=parts)
    spec.post_optimizer_build_fn(optimizers, parts, pd)
    processor = MetricsProcessor.Config(log_freq=LOG_FREQ, enable_tensorboard=True).build(
        parallel_dims=pd, dump_folder=out
    )
    processor.num_flops_per_token = spec.model.get_nparams_and_flops(model, SEQ)[1]

    # The three attributes attach_to_trainer reads off a torchtitan Trainer (which cannot
    # be built on a CPU-only machine: docs/torchtitan.md).
    trainer = SimpleNamespace(
        model_parts=parts,
        metrics_processor=processor,
        parallel_dims=pd,
        pp_schedule=schedule,
        config=SimpleNamespace(dump_folder=out),
    )
    # This rank's MoE blocks (a pipeline stage holds some of them).
    moes = {fqn(n): m for part in parts for n, m in part.named_modules() if fqn(n) in MOE}
    inferred = _count_shape_inference(schedule, moes)
    cb = None
    if not layout.get("bare"):
        cb = MoETorchtitanCallback.attach_to_trainer(
            trainer,
            save_detailed_logs=True,
            log_to_console=False,
            log_heatmap_every=None,
            alert_threshold_imbalance=1.0,  # max/mean > 1 always holds: one alert per window
        )
    layers = [] if cb is None else cb.monitor.layers
    # The live buffer itself (its local storage under tensor parallelism).
    live_bias = {
        i.path: i.expert_bias.data_ptr() == local_tensor(moes[i.path].expert_bias_E).data_ptr()
        for i in layers
    }

    # Data-parallel rank (rank // tp) % dp (mesh order pp, dp, tp) reads its share of the
    # global batch; the TP ranks and pipeline stages of one replica read the same share.
    per_rank = GLOBAL // (dp_rep * dp_shard)
    dp_index = (rank // tp) % (dp_rep * dp_shard)
    lo, hi = dp_index * per_rank, (dp_index + 1) * per_rank
    counter = {p: torch.zeros(8, dtype=torch.float64) for p in MOE}
    windows: list[dict[str, Any]] = []
    losses: list[float] = []
    for step, batch in enumerate(_batches(), start=1):
        tokens, labels = batch[lo:hi, :-1], batch[lo:hi, 1:]
        # What Trainer.batch_generator records for the processor.
        processor.ntokens_since_last_log += tokens.numel()
        processor.data_loading_times.append(0.0)
        optimizers.zero_grad()
        if schedule is not None:
            stage_losses: list[torch.Tensor] | None = [] if last else None
            schedule.step(
                *((tokens,) if first else ()),
                target=labels if last else None,
                losses=stage_losses,
                return_outputs=False,
            )
            losses.append(float(sum(stage_losses).detach()) if stage_losses else 0.0)
        else:
            pred = model(tokens)
            if isinstance(pred, DTensor):
                pred = pred.full_tensor()  # TP leaves the logits sharded over the vocabulary
            loss = torch.nn.functional.cross_entropy(
                pred.flatten(0, 1).float(), labels.flatten(), reduction="sum"
            ) / (GLOBAL * SEQ)
            loss.backward()
            losses.append(float(loss.detach()))
        for p, moe in moes.items():
            # torchtitan's own counter, before its pre-step hook sums and zeroes it.
            # Under full activation checkpointing it counts the recomputed forward again;
            # torchtitan's bias update halves it (optimizer.py), and so does this reference.
            # It also counts a pipeline stage's shape-inference forward: taken out.
            counter[p] += (
                local_tensor(moe.tokens_per_expert_E).to(torch.float64) - inferred.pop(p, 0)
            ) / (2 if layout.get("full_ac") else 1)
        optimizers.step()
        if processor.should_log(step):
            ref = torch.stack([counter[p] for p in MOE])
            bias = torch.stack(
                [
                    local_tensor(moes[p].expert_bias_E).to(torch.float64)
                    if p in moes
                    else torch.zeros(8, dtype=torch.float64)
                    for p in MOE
                ]
            )
            if pp > 1:
                # Each stage holds its own blocks: the model's counter and bias are the sum.
                pp_group = pd.get_mesh("pp").get_group()
                dist.all_reduce(ref, group=pp_group)
                dist.all_reduce(bias, group=pp_group)
            # Summed as torchtitan's bias update sums it (optimizer.py: the loss mesh, and
            # TP too when EP shards tokens over it).
            if ep > 1 and tp > 1:
                dist.all_reduce(ref, group=pd.get_mesh("tp").get_group())
            loss_mesh = pd.get_optional_mesh("loss")
            if loss_mesh is not None:
                dist.all_reduce(ref, group=loss_mesh.get_group())
            processor.log(step, losses[-1], losses[-1], 0.0)
            window: dict[str, Any] = {
                "step": step,
                "counter": ref.tolist(),
                "bias_after": bias.tolist(),
            }
            if cb is not None:
                snap = cb.monitor.last_snapshot
                assert snap is not None and snap.step == step
                window["usage"] = [snap.layers[p].usage_counts.tolist() for p in MOE]
                window["snapshot_bias"] = [snap.layers[p].expert_bias.tolist() for p in MOE]
            windows.append(window)
            counter = {p: torch.zeros(8, dtype=torch.float64) for p in MOE}
        if step == EVAL_AT and schedule is None:
            # What torchtitan's Validator does: eval mode, forwards, log_validation.
            model.eval()
            with torch.no_grad():
                model(_batches()[0][lo:hi, :-1].flip(0))
            model.train()
            processor.log_validation(loss=0.0, step=step)
    if cb is not None:
        cb.close()
    restored = "log" not in processor.__dict__
    processor.close()
    Path(out, f"usage_rank{rank}.json").write_text(json.dumps([w.get("usage") for w in windows]))
    if rank == 0:
        Path(out, "result.json").write_text(
            json.dumps(
                {
                    "windows": windows,
                    "group_is_false": moescope_process_group(pd) is False,
                    "live_bias": live_bias,
                    "restored": restored,
                    "layers": [(i.path, i.adapter, i.score_fn, i.top_k) for i in layers],
                    "losses": losses,
                    "wrapped": [p for p, _ in model.named_modules() if p.endswith(".moe")],
                    "gathered": sorted(cb.monitor.last_snapshot.layers) if cb else [],
                }
            )
        )


def _worker(
    rank: int,
    world: int,
    port: int,
    layout: dict[str, Any],
    out: str,
    state: dict[str, torch.Tensor],
    failures: Any,
) -> None:
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
        )
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        _train(rank, world, layout, out, state)
        dist.destroy_process_group()
    except BaseException:
        failures.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _run(
    tmp_path: Path,
    name: str,
    world: int,
    dp_replicate: int,
    dp_shard: int,
    state: dict[str, torch.Tensor],
    full_ac: bool = False,
    bare: bool = False,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
) -> dict:
    out = tmp_path / name
    out.mkdir()
    layout = {
        "dp_replicate": dp_replicate,
        "dp_shard": dp_shard,
        "full_ac": full_ac,
        "bare": bare,
        "tp": tp,
        "ep": ep,
        "pp": pp,
    }
    run_ranks(_worker, world, layout, str(out), state, timeout=300)
    result = json.loads((out / "result.json").read_text())
    result["usage_by_rank"] = [
        json.loads((out / f"usage_rank{r}.json").read_text()) for r in range(world)
    ]
    result["dir"] = out
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("torchtitan")
    state = _initial_state()
    return {
        "single": _run(tmp, "single", 1, 1, 1, state),
        "single_ac": _run(tmp, "single_ac", 1, 1, 1, state, full_ac=True),
        "single_bare": _run(tmp, "single_bare", 1, 1, 1, state, bare=True),
        "fsdp2": _run(tmp, "fsdp2", 2, 1, 2, state),
        # 4 ranks: FSDP 2 x TP 2, with EP 2 (MoE shards tokens over the TP axis, so the
        # counts are summed over TP as well: moescope_process_group's flattened group).
        "tpep4": _run(tmp, "tpep4", 4, 1, 2, state, tp=2, ep=2),
        "ep2": _run(tmp, "ep2", 2, 1, 2, state, ep=2),
        "tp2": _run(tmp, "tp2", 2, 1, 1, state, tp=2),
        "pp2": _run(tmp, "pp2", 2, 1, 1, state, pp=2),
    }


def test_finds_every_moe_layer_with_its_router(runs: dict[str, dict]) -> None:
    for name, r in runs.items():
        if name in ("single_bare", "pp2"):
            continue
        assert r["layers"] == [
            ["layers.1.moe", "torchtitan", "softmax", 3],
            ["layers.2.moe", "torchtitan", "sigmoid", 3],
        ]
        assert r["live_bias"] == {p: True for p in MOE}
        assert r["restored"]


@pytest.mark.parametrize("name", ["single", "single_ac", "fsdp2", "tpep4", "ep2", "tp2", "pp2"])
def test_counts_equal_torchtitans_counter(runs: dict[str, dict], name: str) -> None:
    windows = runs[name]["windows"]
    assert [w["step"] for w in windows] == list(LOG_STEPS)
    for w in windows:
        tokens = GLOBAL * SEQ * (1 if w["step"] < 4 else 2)
        for usage, counter in zip(w["usage"], w["counter"], strict=True):
            assert usage == [int(c) for c in counter]
            assert sum(usage) == tokens * 3  # every token to K=3 experts, nothing dropped


@pytest.mark.parametrize("name", ["fsdp2", "tpep4", "ep2", "tp2", "pp2"])
def test_ranks_equal_single_process(runs: dict[str, dict], name: str) -> None:
    # Step 1 runs the same weights on the same global batch in every layout.
    single, multi = runs["single"]["windows"][0], runs[name]["windows"][0]
    assert multi["usage"] == single["usage"]
    if name != "pp2":
        # Under pipeline parallelism torchtitan's counter also holds the stages' one
        # shape-inference forward (stage 1's on uninitialised activations), which its first
        # bias update then follows: the bias differs from the single process there.
        assert multi["bias_after"] == single["bias_after"]
    assert runs[name]["group_is_false"] is (name in ("tp2", "pp2"))
    assert runs["single"]["group_is_false"] is True
    # Every rank holds the same, reduced, snapshot.
    by_rank = runs[name]["usage_by_rank"]
    assert all(u == by_rank[0] for u in by_rank)


def test_monitor_changes_nothing(runs: dict[str, dict]) -> None:
    # Same losses and the same expert-bias trajectory with and without moescope.
    bare, watched = runs["single_bare"], runs["single"]
    assert watched["losses"] == bare["losses"]
    assert [w["bias_after"] for w in watched["windows"]] == [
        w["bias_after"] for w in bare["windows"]
    ]


def test_tensor_parallel_replicas_count_once(runs: dict[str, dict]) -> None:
    # Both TP ranks route the same 4 sequences: no reduction, so each reports them once,
    # in every window (step 1 also equals the single process: test_ranks_equal_single_process).
    r = runs["tp2"]
    assert r["group_is_false"] is True
    assert r["usage_by_rank"][0] == r["usage_by_rank"][1]
    assert [sum(u[0]) for u in r["usage_by_rank"][0]] == [GLOBAL * SEQ * 3 * n for n in (1, 1, 2)]


def test_pipeline_stages_report_every_layer(runs: dict[str, dict]) -> None:
    # Stage 0 holds block 1, stage 1 block 2: each rank's snapshot gathers both (the
    # counts, checked above, equal torchtitan's counters of the two stages).
    r = runs["pp2"]
    assert [x[0] for x in r["layers"]] == ["layers.1.moe"]
    assert r["gathered"] == list(MOE)
    assert r["live_bias"] == {"layers.1.moe": True}


def test_activation_checkpointing_counts_each_forward_once(runs: dict[str, dict]) -> None:
    r = runs["single_ac"]
    assert r["wrapped"] == [
        "layers.1._checkpoint_wrapped_module.moe",
        "layers.2._checkpoint_wrapped_module.moe",
    ]
    assert [w["usage"] for w in r["windows"]] == [w["usage"] for w in runs["single"]["windows"]]


@pytest.mark.parametrize("name", ["single", "fsdp2", "tpep4", "ep2", "tp2", "pp2"])
def test_snapshot_reports_the_live_expert_bias(runs: dict[str, dict], name: str) -> None:
    # Read at the log step, after torchtitan's pre-step hook updated it in place.
    for w in runs[name]["windows"]:
        np.testing.assert_array_equal(w["snapshot_bias"], w["bias_after"])
        assert np.any(np.asarray(w["snapshot_bias"]) != 0)


def test_expert_bias_moves_after_a_step(runs: dict[str, dict]) -> None:
    # The aux-loss-free update is sign(mean - count) * coeff, centred: its sign pattern
    # follows the counts moescope reported.
    w = runs["single"]["windows"][0]
    for usage, bias in zip(w["usage"], w["bias_after"], strict=True):
        u = np.asarray(usage, dtype=np.float64)
        delta = 1e-3 * np.sign(u.mean() - u)
        np.testing.assert_allclose(bias, delta - delta.mean(), atol=1e-7)


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in (folder / "tb").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("name", ["single", "fsdp2"])
def test_metrics_in_torchtitans_tensorboard(runs: dict[str, dict], name: str) -> None:
    r = runs[name]
    scalars = _tensorboard_scalars(r["dir"])
    assert set(scalars["loss_metrics/global_avg_loss"]) == set(LOG_STEPS)
    for w in r["windows"]:
        step = w["step"]
        for path, counter in zip(MOE, w["counter"], strict=True):
            c = np.asarray(counter, dtype=np.float64)
            cv = c.std() / c.mean()
            assert scalars[f"moe/{path}/cv"][step] == pytest.approx(cv, rel=1e-5)
            assert scalars[f"moe/{path}/max_over_mean"][step] == pytest.approx(
                c.max() / c.mean(), rel=1e-5
            )
        assert scalars["moe/avg_expert_cv"][step] == pytest.approx(
            np.mean([np.std(c) / np.mean(c) for c in w["counter"]]), rel=1e-5
        )
    # The validation's window, under moe/eval/ (torchtitan's counter skips eval forwards).
    for path in MOE:
        assert scalars[f"moe/eval/{path}/num_tokens"] == {EVAL_AT: GLOBAL * SEQ}


def test_detailed_log_and_alerts(runs: dict[str, dict]) -> None:
    # attach_to_trainer's default log_dir: <dump_folder>/moe_logs.
    lines = (runs["fsdp2"]["dir"] / "moe_logs" / "moe_detailed.jsonl").read_text().splitlines()
    events = [e for e in map(json.loads, lines) if e["kind"] == "snapshot"]
    assert [e["step"] for e in events] == list(LOG_STEPS)
    assert all(e["alerts"] for e in events)


def test_unreadable_router_output_switches_the_layer_off() -> None:
    # A router whose output the adapter cannot read (here: a list, not torchtitan's tuple)
    # switches that layer off with one warning; the model runs on and the other is counted.
    from moescope import MoEMonitor

    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = _spec().model.build()
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=None)
    router = model.get_submodule("layers.1.moe.router")
    forward = router.forward
    router.forward = lambda *a, **k: list(forward(*a, **k))
    mon = MoEMonitor(model)
    tokens = _batches()[0][:2, :-1]
    with pytest.warns(RuntimeWarning, match="switched off monitoring of layer layers.1.moe"):
        model(tokens)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        model(tokens)
    assert not [w for w in again if "switched off" in str(w.message)]  # warned once
    snap = mon.snapshot(reset=False)
    assert snap.layers["layers.1.moe"].num_tokens == 0
    counter = model.get_submodule("layers.2.moe").tokens_per_expert_E
    assert snap.layers["layers.2.moe"].usage_counts.tolist() == [int(c) for c in counter]
    mon.detach()
