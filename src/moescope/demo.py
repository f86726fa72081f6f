"""``python -m moescope.demo --out demo-output``: watch a tiny MoE collapse without its
load-balancing loss.

What it does
------------
:func:`main` trains :class:`~moescope.nn.hf.TinyMoEForCausalLM` (the transformers face of
:class:`~moescope.nn.model.TinyMoELM`) twice with the transformers ``Trainer`` on byte-level
blocks of the Python standard library's own ``.py`` sources (:mod:`moescope.data`, no
download), with moescope's Trainer callback
(:func:`~moescope.integrations.transformers.create_moe_callback_for_transformers`) on:

- ``<out>/balanced``: the Switch load-balancing loss (Fedus et al. 2021) at
  ``aux_loss_coef=0.01``;
- ``<out>/no_balance``: the very same seed, data order, model and optimiser with
  ``aux_loss_coef=0``.

Both keep the router z-loss (Zoph et al. 2022) at the same weight, so the load-balancing
loss is the only difference. Each run writes the callback's console table and alert lines,
TensorBoard event files (Trainer scalars ``train/loss``, ``eval/loss``; moescope scalars
``moe/...`` and ``moe/eval/...``, per-layer usage histograms, the usage heatmaps as images
and the alerts as text), the detailed JSONL log, heatmap PNGs and a ``save_pretrained``
(safetensors) checkpoint. :func:`summarise` then prints a comparison and writes
``<out>/summary.json``. The structure is ``main`` -> :func:`train_run` (twice) ->
:func:`summarise` -> :func:`analyze_run` (``moescope analyze`` of the balanced checkpoint,
``<out>/analysis/``) -> :func:`compare_runs` (``moescope compare`` of the two training
logs, collapsed vs balanced, ``<out>/compare/report.html``) -> :func:`prune_run`
(``moescope prune --drop-unused`` of the collapsed run, ``<out>/pruned/``: the experts
its analysis data never reached are removed, the loss on that data is unchanged) ->
:func:`agree_run` (``moescope agree`` of the balanced checkpoint in float32 against the
same checkpoint in bfloat16 on the same tokens, ``<out>/agree/``: how many tokens change
experts with the dtype alone).

Why this setup collapses (measured, not forced)
-----------------------------------------------
Without a balancing term nothing stops the rich-get-richer loop of top-k routing: an
expert that wins a few more tokens is trained more, becomes more useful, and the router
sends it still more (Shazeer et al. 2017; Fedus et al. 2021). The one deliberate choice
is the model's shape, 16 experts with top-2 routing (and small experts, I=64, to keep the
active compute of a CPU demo small): with 8 experts and top-2 the max/mean ratio cannot
exceed 4 (no expert can take more than 1/K of the slots), so the imbalance alert (> 4)
could never fire. Nothing else is tuned for collapse: both runs share the seed, initial
weights, data order, learning rate (3e-3, cosine), router initialisation (N(0, 0.02),
the model's default) and z-loss weight; the router learning-rate multiplier
(``--router-lr-mult``, a separate AdamW group passed to the Trainer with
``optimizers=(opt, None)``) stays at 1.

Measured with the defaults (seed 0, 300 steps): the no-balance run is already imbalanced
in its first 25-step window (max/mean 7.3 of at most 8) and ends with 23 of 64 experts
unused, average CV 1.76 and 75 firings of the per-window rules (108 with the trend rules,
cold experts and falling entropy; the console groups them into 14 alert lines); the
balanced run ends with every expert in use, average CV 0.42 and one alert (max/mean 4.02
at step 50, during warm-up). With seed 1: 14/64 unused, CV 1.85 and 73 per-window
firings against 0/64, CV 0.38 and no alert. The collapse
does not cost loss in a run this short (eval LM loss 2.257 against 2.270 nats/byte): it
leaves a quarter to a third of the experts idle, which is why it takes a routing monitor,
not a loss curve, to see it.

The alerts counted are the callback's, at its default thresholds (max/mean > 4, >= 25% of
a layer's experts unused, routing entropy < 0.1 nats). Both runs together take about
70 s of CPU time (user + sys) with one torch thread; on a two-core machine shared with
other jobs (load average 8) the wall time was 2 min 40 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from moescope._json import json_safe
from moescope.alerts import Alert
from moescope.analysis import run_analyze
from moescope.analysis.compare import compare_sources, write_comparison
from moescope.data import ByteDataset, stdlib_bytes, stdlib_dir
from moescope.nn.layer import MoELayer
from moescope.nn.model import TinyMoEConfig, causal_lm_loss

if TYPE_CHECKING:
    from moescope.nn.hf import TinyMoEForCausalLM

#: A map-style dataset of ``{"input_ids": [S]}`` byte blocks that knows its length.
Blocks = ByteDataset | Subset[dict[str, torch.Tensor]]

#: Names of the two runs (sub-folders of ``--out``) and their load-balancing weight.
RUNS: tuple[tuple[str, float], ...] = (("balanced", 0.01), ("no_balance", 0.0))


@dataclass(frozen=True)
class DemoSettings:
    """Everything a run depends on besides its load-balancing weight.

    Attributes:
        steps: optimizer steps per run.
        seed: seed of the model init and of the Trainer's data order.
        batch_size: blocks per step.
        seq_len: S, bytes per block.
        lr: peak AdamW learning rate (cosine schedule, linear warm-up).
        router_lr_mult: the router weights' learning rate is ``lr * router_lr_mult``.
        z_loss_coef: router z-loss weight, the same in both runs.
        hidden_size, num_layers, num_heads, intermediate_size, num_experts, top_k: model.
        max_bytes: stdlib bytes read.
        eval_blocks: held-out blocks per evaluation.
        log_every: moescope train window (optimizer steps).
        eval_every: evaluation interval (steps); the last step is always evaluated.
        heatmap_every: usage heatmaps every this many steps.
        threads: torch intra-op threads.
        console: print the callback's per-window table and the Trainer's log lines.
    """

    steps: int = 300
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    router_lr_mult: float = 1.0
    z_loss_coef: float = 0.001
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 64
    num_experts: int = 16
    top_k: int = 2
    max_bytes: int = 2_000_000
    eval_blocks: int = 64
    log_every: int = 25
    eval_every: int = 100
    heatmap_every: int = 100
    threads: int = 1
    console: bool = True

    def model_config(self, aux_loss_coef: float) -> TinyMoEConfig:
        """The demo model (MoE in every layer) with load-balancing weight ``aux_loss_coef``."""
        return TinyMoEConfig(
            vocab_size=256,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            num_experts=self.num_experts,
            top_k=self.top_k,
            moe_every=1,
            max_seq_len=max(self.seq_len, 256),
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
        )


@dataclass
class RunResult:
    """What :func:`train_run` measured and wrote for one run (JSON-able via ``asdict``).

    Losses are nats per byte. ``final_train_loss`` / ``final_eval_loss`` are the Trainer's
    (the model's full loss: LM + router terms); ``eval_lm_loss`` is the LM part alone
    over the same eval blocks. Routing figures come from the callback's train windows
    (``state.log_history``): ``final_*`` is the last window, ``mean_avg_cv`` the mean of
    ``moe/avg_expert_cv`` over windows, ``max_max_over_mean`` the worst layer in any
    window, unused experts are summed over layers (of ``total_experts``). Alerts are
    those the callback raised (its ``on_alert``); ``history`` holds the logged rows.
    """

    name: str
    aux_loss_coef: float
    z_loss_coef: float
    steps: int
    final_train_loss: float
    final_eval_loss: float
    eval_lm_loss: float
    final_avg_cv: float
    mean_avg_cv: float
    max_max_over_mean: float
    final_unused_experts: int
    max_unused_experts: int
    total_experts: int
    final_avg_entropy: float
    num_alerts: int
    alerts_by_rule: dict[str, int]
    first_alert_step: int | None
    windows: int
    eval_windows: int
    train_seconds: float
    run_dir: str
    jsonl: str
    tensorboard_dir: str
    heatmaps: list[str]
    checkpoint: str
    history: list[dict[str, float]] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = DemoSettings()
    p = argparse.ArgumentParser(
        prog="python -m moescope.demo",
        description="Train a tiny MoE byte-level LM on the Python standard library twice, "
        "with and without the load-balancing loss, under the transformers Trainer with "
        "moescope's callback, and compare the routing.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps per run (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument(
        "--router-lr-mult",
        type=float,
        default=d.router_lr_mult,
        help="router learning rate = lr x this (both runs)",
    )
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps per moescope window")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="stdlib bytes to read")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch intra-op threads (default 1: on a shared 2-core machine a second "
        "thread made steps several times slower; pass 2 on an idle machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-window tables")
    p.add_argument(
        "--analyze-tokens",
        type=int,
        default=30_000,
        help="tokens per data file for the final `moescope analyze` step (0 skips it)",
    )
    p.add_argument(
        "--prune-tokens",
        type=int,
        default=4096,
        help="tokens per data file for the final `moescope prune` step (0 skips it)",
    )
    p.add_argument(
        "--agree-tokens",
        type=int,
        default=1024,
        help="tokens for the final `moescope agree` step, float32 vs bfloat16 (0 skips it)",
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "log_every", "max_bytes", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        p.error("--seq-len must be >= 2")
    return args


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """:class:`DemoSettings` for the parsed command line (intervals scaled to ``--steps``)."""
    steps = args.steps
    return DemoSettings(
        steps=steps,
        seed=args.seed,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        router_lr_mult=args.router_lr_mult,
        max_bytes=args.max_bytes,
        log_every=args.log_every,
        # Three evaluations and three heatmaps per run, whatever --steps is.
        eval_every=max(1, math.ceil(steps / 3)),
        heatmap_every=max(1, math.ceil(steps / 3)),
        threads=args.threads,
        console=not args.quiet,
    )


def load_data(settings: DemoSettings) -> tuple[Blocks, Blocks]:
    """(train, eval) datasets of ``seq_len`` byte blocks; eval is the first
    ``eval_blocks`` blocks of the held-out tail of the stream."""
    data = stdlib_bytes(settings.max_bytes)
    train = ByteDataset(data, settings.seq_len, "train")
    held_out = ByteDataset(data, settings.seq_len, "eval")
    return train, Subset(held_out, range(min(settings.eval_blocks, len(held_out))))


def router_param_groups(
    model: nn.Module, lr: float, router_lr: float, weight_decay: float = 0.1
) -> list[dict[str, Any]]:
    """AdamW parameter groups: router weights at ``router_lr`` without weight decay
    (decay would pull the logits toward uniform, i.e. act as a hidden balancing term),
    matrices at ``lr`` with decay, vectors (norms) at ``lr`` without."""
    router_ids = {
        id(p) for m in model.modules() if isinstance(m, MoELayer) for p in m.router.parameters()
    }
    routers, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in router_ids:
            routers.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    if not routers:
        raise ValueError("the model has no MoE router parameters (no moescope MoELayer found)")
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": routers, "lr": router_lr, "weight_decay": 0.0},
    ]


@torch.no_grad()
def eval_lm_loss(model: nn.Module, eval_ds: Blocks, batch_size: int) -> float:
    """Mean next-byte cross entropy (nats/byte) of ``model`` over every block of
    ``eval_ds``, without the router terms the Trainer's ``eval_loss`` includes, so runs
    with different ``aux_loss_coef`` compare on language modelling alone."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for start in range(0, len(eval_ds), batch_size):
        ids = torch.stack(
            [eval_ds[i]["input_ids"] for i in range(start, min(len(eval_ds), start + batch_size))]
        )
        n = ids.shape[0] * (ids.shape[1] - 1)  # predicted positions in this batch
        total += causal_lm_loss(model(input_ids=ids).logits, ids).double() * n
        count += n
    model.train(was_training)
    return float(total / max(count, 1))


def _history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    keep = (
        "step",
        "loss",
        "eval_loss",
        "moe/avg_expert_cv",
        "moe/max_max_over_mean",
        "moe/total_unused_experts",
        "moe/avg_routing_entropy",
        "moe/eval/avg_expert_cv",
    )
    rows = []
    for entry in log_history:
        row = {k: float(entry[k]) for k in keep if k in entry}
        if len(row) > 1:
            rows.append(row)
    return rows


def build_model(settings: DemoSettings, aux_loss_coef: float) -> TinyMoEForCausalLM:
    """A freshly initialised ``TinyMoEForCausalLM`` seeded with ``settings.seed``: the
    same initial weights whatever ``aux_loss_coef`` (only the loss differs)."""
    from transformers import set_seed

    # why: moescope.nn.hf imports transformers (optional extra), like the line above
    from moescope.nn.hf import TinyMoEForCausalLM, TinyMoEHFConfig

    set_seed(settings.seed)
    config = TinyMoEHFConfig.from_tiny_config(settings.model_config(aux_loss_coef))
    return TinyMoEForCausalLM(config)


def train_run(
    name: str,
    run_dir: Path,
    settings: DemoSettings,
    aux_loss_coef: float,
    train_ds: Blocks,
    eval_ds: Blocks,
) -> RunResult:
    """Train one model under the transformers Trainer with the moescope callback.

    Writes under ``run_dir``: ``tensorboard/`` (one event file: Trainer and moescope),
    ``moe_logs/moe_detailed.jsonl``, ``moe_logs/heatmaps/*.png`` and ``checkpoint/``
    (``save_pretrained``, safetensors; loads with ``AutoModelForCausalLM`` once
    ``moescope.nn.hf`` is imported). Returns the measured :class:`RunResult`.
    """
    from torch.utils.tensorboard import SummaryWriter
    from transformers import Trainer, TrainingArguments
    from transformers.integrations import TensorBoardCallback

    # why: imports transformers (optional extra) at its top level, like the lines above
    from moescope.integrations.transformers import create_moe_callback_for_transformers

    torch.set_num_threads(settings.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    tb_dir = run_dir / "tensorboard"
    log_dir = run_dir / "moe_logs"
    ckpt_dir = run_dir / "checkpoint"
    # A fresh run in a reused --out: the JSONL sink appends and every SummaryWriter adds
    # its own event file, so leftovers of an earlier demo would mix with this one.
    stale = [
        log_dir / "moe_detailed.jsonl",
        *tb_dir.glob("events.out.tfevents.*"),
        *(log_dir / "heatmaps").glob("*.png"),
    ]
    for path in stale:
        path.unlink(missing_ok=True)

    model = build_model(settings, aux_loss_coef)
    opt = torch.optim.AdamW(
        router_param_groups(model, settings.lr, settings.lr * settings.router_lr_mult),
        betas=(0.9, 0.95),
    )

    alerts: list[Alert] = []
    # One SummaryWriter shared by the Trainer's TensorBoard callback (train/loss,
    # eval/loss, learning rate) and moescope (moe/... scalars without the Trainer's
    # "train/" renaming, usage histograms, heatmap images, alert text): one event file.
    writer = SummaryWriter(log_dir=os.fspath(tb_dir))
    moe_cb = create_moe_callback_for_transformers(
        log_every_n_steps=settings.log_every,
        logger=writer,
        log_to_console=settings.console,
        log_heatmap_every=settings.heatmap_every,
        save_detailed_logs=True,
        log_dir=log_dir,
        on_alert=alerts.append,
    )
    args = TrainingArguments(
        output_dir=os.fspath(run_dir),  # save_strategy="no": the Trainer writes nothing here
        use_cpu=True,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, min(30, settings.steps // 10)),
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        logging_steps=settings.log_every,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        optimizers=(opt, None),
        callbacks=[TensorBoardCallback(tb_writer=writer), moe_cb],
    )
    if not settings.console:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    writer.close()  # TensorBoardCallback closed it already; idempotent
    # The Trainer copies TrainingArguments.use_cache (False by default) into the config;
    # the checkpoint must generate with its KV cache (training never uses it anyway).
    model.config.use_cache = True
    model.save_pretrained(ckpt_dir)
    # After train(): the callback has detached, so these forwards are not monitored.
    lm_eval = eval_lm_loss(model, eval_ds, settings.batch_size)

    hist = trainer.state.log_history
    train_rows = [h for h in hist if "moe/avg_expert_cv" in h]
    eval_rows = [h for h in hist if "moe/eval/avg_expert_cv" in h]
    losses = [h["loss"] for h in hist if "loss" in h]
    eval_losses = [h["eval_loss"] for h in hist if "eval_loss" in h]
    if not train_rows or not eval_losses:
        raise RuntimeError(
            f"run {name!r} logged no MoE window or no evaluation; steps={settings.steps} "
            f"is too short for log_every={settings.log_every}"
        )
    by_rule: dict[str, int] = {}
    for a in alerts:
        by_rule[a.rule] = by_rule.get(a.rule, 0) + 1
    heatmaps = sorted(str(p) for p in (log_dir / "heatmaps").glob("*.png"))
    return RunResult(
        name=name,
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=settings.z_loss_coef,
        steps=trainer.state.global_step,
        final_train_loss=float(losses[-1]) if losses else math.nan,
        final_eval_loss=float(eval_losses[-1]),
        eval_lm_loss=lm_eval,
        final_avg_cv=float(train_rows[-1]["moe/avg_expert_cv"]),
        mean_avg_cv=sum(h["moe/avg_expert_cv"] for h in train_rows) / len(train_rows),
        max_max_over_mean=max(h.get("moe/max_max_over_mean", math.nan) for h in train_rows),
        final_unused_experts=int(train_rows[-1]["moe/total_unused_experts"]),
        max_unused_experts=int(max(h["moe/total_unused_experts"] for h in train_rows)),
        total_experts=int(train_rows[-1]["moe/total_experts"]),
        final_avg_entropy=float(train_rows[-1]["moe/avg_routing_entropy"]),
        num_alerts=len(alerts),
        alerts_by_rule=by_rule,
        first_alert_step=min((a.step for a in alerts if a.step is not None), default=None),
        windows=len(train_rows),
        eval_windows=len(eval_rows),
        train_seconds=train_seconds,
        run_dir=str(run_dir),
        jsonl=str(log_dir / "moe_detailed.jsonl"),
        tensorboard_dir=str(tb_dir),
        heatmaps=heatmaps,
        checkpoint=str(ckpt_dir),
        history=_history_rows(hist),
    )


def summarise(
    results: Sequence[RunResult],
    out: Path,
    settings: DemoSettings,
    wall_seconds: float | None = None,
    cpu_seconds: float | None = None,
) -> dict[str, Any]:
    """Print the side-by-side comparison and write ``<out>/summary.json``; returns it."""
    cols = [r.name for r in results]
    width = max(14, *(len(c) + 2 for c in cols))

    def row(label: str, values: Sequence[str]) -> str:
        return f"  {label:<38}" + "".join(f"{v:>{width}}" for v in values)

    def f(x: float, d: int = 3) -> str:
        return f"{x:.{d}f}" if math.isfinite(x) else "-"

    lines = [
        "",
        "=" * 72,
        f"moescope demo: {settings.steps} steps per run, {settings.num_layers} MoE layers x "
        f"{settings.num_experts} experts, top-{settings.top_k}, router lr x"
        f"{settings.router_lr_mult:g}",
        "  same seed, initial weights, data order and optimiser; only aux_loss_coef differs",
        f"  (top-{settings.top_k} of {settings.num_experts}: max/mean can reach "
        f"{settings.num_experts / settings.top_k:g}; "
        "alerts at the callback's defaults: max/mean > 4, >= 25% unused, entropy < 0.1)",
        row("", cols),
        row("aux_loss_coef (load balancing)", [f"{r.aux_loss_coef:g}" for r in results]),
        row("final train loss (with router terms)", [f(r.final_train_loss) for r in results]),
        row("final eval loss (with router terms)", [f(r.final_eval_loss) for r in results]),
        row("eval LM loss (nats/byte)", [f(r.eval_lm_loss) for r in results]),
        row("avg cv, last window", [f(r.final_avg_cv) for r in results]),
        row("avg cv, mean over windows", [f(r.mean_avg_cv) for r in results]),
        row("max max/mean (any layer, window)", [f(r.max_max_over_mean, 2) for r in results]),
        row(
            "unused experts, last window",
            [f"{r.final_unused_experts}/{r.total_experts}" for r in results],
        ),
        row(
            "unused experts, worst window",
            [f"{r.max_unused_experts}/{r.total_experts}" for r in results],
        ),
        row("avg routing entropy, last (nats)", [f(r.final_avg_entropy) for r in results]),
        row("alerts", [str(r.num_alerts) for r in results]),
        row(
            "first alert at step",
            [str(r.first_alert_step) if r.first_alert_step is not None else "-" for r in results],
        ),
        row("train seconds", [f"{r.train_seconds:.1f}" for r in results]),
    ]
    for r in results:
        rules = ", ".join(f"{k} x{v}" for k, v in sorted(r.alerts_by_rule.items())) or "none"
        lines += [
            f"  [{r.name}] alerts: {rules}",
            f"    JSONL        {r.jsonl}",
            f"    TensorBoard  {r.tensorboard_dir}  (tensorboard --logdir {out})",
            f"    heatmaps     {len(r.heatmaps)} PNGs in {Path(r.jsonl).parent / 'heatmaps'}",
            f"    checkpoint   {r.checkpoint}",
        ]
    timing = ""
    if wall_seconds is not None:
        timing = f"total {wall_seconds:.1f}s wall"
        if cpu_seconds is not None:
            timing += f", {cpu_seconds:.1f}s CPU (user+sys)"
        lines.append(f"  {timing}")
    lines.append(f"  summary: {out / 'summary.json'}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)

    summary = {
        "settings": asdict(settings),
        "runs": {r.name: asdict(r) for r in results},
        "wall_seconds": wall_seconds,
        "cpu_seconds": cpu_seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    torch.set_num_threads(settings.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars clutter the log
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    train_ds, eval_ds = load_data(settings)
    print(
        f"moescope demo: {len(train_ds)} train / {len(eval_ds)} eval blocks of "
        f"{settings.seq_len} stdlib bytes; runs {[n for n, _ in RUNS]} -> {args.out}",
        flush=True,
    )
    results = []
    for name, coef in RUNS:
        print(f"\n--- run {name!r}: aux_loss_coef={coef:g} ---", flush=True)
        results.append(train_run(name, args.out / name, settings, coef, train_ds, eval_ds))
    summarise(results, args.out, settings, time.perf_counter() - t0, time.process_time() - cpu0)
    if args.analyze_tokens > 0:
        report = analyze_run(results, args.out, args.analyze_tokens, settings.seq_len)
        print(f"\nreport: {report}", flush=True)
    compared = compare_runs(results, args.out)
    print(f"\ncomparison: {compared}", flush=True)
    if args.prune_tokens > 0:
        pruned = prune_run(results, args.out, args.prune_tokens, settings.seq_len)
        print(f"\npruning report: {pruned}", flush=True)
    if args.agree_tokens > 0:
        agreed = agree_run(results, args.out, args.agree_tokens, settings.seq_len)
        print(f"\nagreement report: {agreed}", flush=True)
    return 0


def analysis_sources() -> list[Path]:
    """Two domains that ship with Python: code (``argparse.py``) and prose (its licence)."""
    root = stdlib_dir()
    return [p for p in (root / "argparse.py", root / "LICENSE.txt") if p.is_file()]


def analyze_run(results: Sequence[RunResult], out: Path, max_tokens: int, seq_len: int) -> Path:
    """``moescope analyze`` on the balanced run's checkpoint, neurons on, with the
    no-balance checkpoint as ``--compare`` (router agreement between the two runs, which
    started from the same weights). Returns the path of ``<out>/analysis/report.html``."""
    by_name = {r.name: r for r in results}
    main_run = by_name.get("balanced", results[0])
    other = next((r for r in results if r is not main_run), None)
    print(f"\n--- moescope analyze {main_run.checkpoint} (neurons on) ---", flush=True)
    return run_analyze(
        model=main_run.checkpoint,
        data=[str(p) for p in analysis_sources()],
        out=str(out / "analysis"),
        neurons=True,
        max_tokens=max_tokens,
        seq_len=seq_len,
        compare=other.checkpoint if other is not None else None,
        overwrite=True,
    )


def compare_runs(results: Sequence[RunResult], out: Path) -> Path:
    """``moescope compare`` of the two training logs (collapsed vs balanced): usage side
    by side, divergence, alerts and metrics over steps in ``<out>/compare/report.html``."""
    by_name = {r.name: r for r in results}
    a, b = by_name.get("no_balance", results[0]), by_name.get("balanced", results[-1])
    print(f"\n--- moescope compare {a.name} {b.name} ---", flush=True)
    cmp = compare_sources(a.jsonl, b.jsonl, labels=[a.name, b.name])
    return write_comparison(cmp, out / "compare", overwrite=True)


def agree_run(results: Sequence[RunResult], out: Path, tokens: int, seq_len: int) -> Path:
    """``moescope agree`` of the balanced checkpoint in float32 against itself in
    bfloat16, both replaying the same blocks of ``seq_len`` bytes (the first ``tokens``
    bytes of the first :func:`analysis_sources` file) into ``<out>/agree/`` (returns its
    ``report.html``); prints the verdict line."""
    # why: the agreement stack is only needed by this step
    from moescope.analysis.agree import agree, write_agreement

    by_name = {r.name: r for r in results}
    run = by_name.get("balanced", results[0])
    data = np.frombuffer(analysis_sources()[0].read_bytes()[:tokens], dtype=np.uint8)
    n = max(1, data.shape[0] // seq_len)
    blocks = [data[i * seq_len : (i + 1) * seq_len].astype(np.int64) for i in range(n)]
    print(f"\n--- moescope agree {run.checkpoint} float32 vs bfloat16 ---", flush=True)
    result = agree(
        run.checkpoint,
        run.checkpoint,
        tokens=[b for b in blocks if b.size],
        dtype_a="float32",
        dtype_b="bfloat16",
        labels=["float32", "bfloat16"],
    )
    print(f"  {result.verdict}", flush=True)
    return write_agreement(result, out / "agree", overwrite=True)


# --------------------------------------------------------------------------- prune step


def prune_run(results: Sequence[RunResult], out: Path, max_tokens: int, seq_len: int) -> Path:
    """``moescope prune --drop-unused`` of the collapsed (no-balance) run's checkpoint into
    ``<out>/pruned``: the experts no token of :func:`analysis_sources` was routed to are
    removed (as many per layer as the layer with the fewest unused has: the config holds
    one count), and the loss on those same tokens is measured before and after, with the
    keep-vs-loss curve at other levels in ``<out>/pruned/moescope-prune/report.html``
    (returned). Prints what was removed, the loss and the bytes saved."""
    # why: moescope.prune imports the analysis stack, only this step needs it
    from moescope.prune.run import REPORT_DIR, PruneOptions, prune

    by_name = {r.name: r for r in results}
    run = by_name.get("no_balance", results[-1])
    data = [str(p) for p in analysis_sources()]
    print(f"\n--- moescope prune --drop-unused {run.checkpoint} ---", flush=True)
    result = prune(
        PruneOptions(
            model=run.checkpoint,
            data=data,
            eval_data=data,  # the loss on the very tokens that never reached those experts
            out=str(out / "pruned"),
            drop_unused=True,
            max_tokens=max_tokens,
            eval_tokens=max_tokens,
            seq_len=seq_len,
            levels=[0.75, 0.5, 0.25],
            overwrite=True,
        )
    )
    unused = [int(s.unused.size) for s in result.saliency]
    base = next(p for p in result.curve if p.ordering == "none")
    after = next(
        (p for p in result.curve if p.ordering == "frequency" and p.kept == result.kept), base
    )
    before_b, after_b = result.checkpoint_bytes_before, result.checkpoint_bytes_after
    saved = before_b - after_b if before_b is not None and after_b is not None else None
    print(
        f"  unused experts on {result.calibration_tokens:,} tokens: {sum(unused)}/"
        f"{result.num_experts * len(unused)} (per layer {unused}); kept "
        f"{result.kept}/{result.num_experts} per layer\n"
        f"  loss on those tokens: {base.loss:.6f} -> {after.loss:.6f} nats/byte "
        f"({after.loss - base.loss:+.2e})\n"
        f"  parameters {result.params_before:,} -> {result.params_after:,}; removed tensors "
        f"{result.removed_bytes:,} bytes; checkpoint weights {before_b} -> {after_b} bytes"
        + (f" ({saved:,} smaller)" if saved is not None else ""),
        flush=True,
    )
    return Path(result.out) / REPORT_DIR / "report.html"


if __name__ == "__main__":
    raise SystemExit(main())
