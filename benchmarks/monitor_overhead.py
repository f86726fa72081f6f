"""Cost of watching an MoE model train: moescope vs the PyPI ``moewatch`` vs a naive monitor.

Question (issue 3): does ``moescope.MoEMonitor`` with every expert-level metric on
(co-activation included, a snapshot + alert check + flat ``to_dict()`` every
``--log-every`` steps, the snapshot cost inside the measured steps) cost at most 1.03x a
training step without a monitor, and does its memory stay flat over 10k steps?

Part 1, overhead. Models (transformers 5.x, random init, float32, ``grouped_mm`` experts,
vocab 1024 so that the LM head does not hide the MoE layers, no aux loss in the
objective):

- ``mixtral``: MixtralForCausalLM, H=256, I=512, E=8, K=2, 4 layers;
- ``olmoe``: OlmoeForCausalLM, H=256, I=128 (OLMoE's I/H = 1024/2048), E=64, K=8, 4 layers.

One training step = ``zero_grad``, forward with ``labels`` (batch 8 x 256 tokens, all
real), backward, AdamW step. Variants, each on its own deep copy of the same initial
model with its own optimizer, all fed the same batches (``torch.manual_seed``):

- ``none``: no monitor;
- ``moescope``: ``MoEMonitor(model, coactivation=True, history=1000,
  alert_rules=AlertRules())``; every ``log_every`` steps ``snapshot(step=...)`` and
  ``to_dict()`` (what a logger sink consumes);
- ``moewatch``: ``MoEWatch(model, WatchConfig(sample_every=1, log_every=N,
  output="silent", router_modules=<the routers>))`` started once, ``watcher.step(step)``
  after every step (it analyses on multiples of ``log_every``). The routers are named
  explicitly because moewatch 0.1.0's auto-detection picks OLMoE's whole
  ``OlmoeSparseMoeBlock`` (which returns hidden states, read as "logits" over H);
- ``naive``: ``benchmarks/naive_monitor.py`` (the seeds' sketch: Python loop over experts
  with ``.item()``, lists that are never trimmed), ``snapshot()`` every N steps.

Timing method: the variants run round-robin within each round (one step each, the order
rotated every round) so that the load of a shared machine hits them alike; ``--warmup``
rounds are discarded. Per variant: median training-step time (hooks included), IQR, the
median cost of a log step (snapshot) and the amortised step = median step + mean
post-step cost over all measured steps (= snapshot cost / N). Ratio = amortised step /
median step of ``none``, with a 95 % bootstrap interval (resampling steps); "paired" is
the median of per-round ratios (robust to slow drifts of the load) plus the amortised log
cost. The same amortised ratio is also given on process CPU time (all threads), which
other processes on a shared machine disturb far less than wall time. Losses of all
variants are compared: a monitor must not change training.

Part 2, memory (``--memory-steps``, default 10000): each variant in its own process
(clean RSS; ``--memory-threads``, default 1, because tiny ops gain nothing from threads)
runs that many cheap no-grad forwards of a tiny Mixtral (H=32, E=8, K=2, 2 layers,
2 x 32 tokens), logging every ``--memory-log-every`` (100) steps, and reports at steps
100, 1k, 5k, 10k the monitor's state bytes (moescope: accumulator tensors + history
arrays, the accumulators also alone; moewatch: its ring buffers' tensors; naive: its
lists, ``sys.getsizeof``) and the process RSS. ``moescope_h50`` is moescope with
``history=50`` rows per layer, which reaches its cap within 10k steps.

Part 3 (``--profile``): cProfile of monitored steps, then ``LayerAccumulator.update``
alone on records captured from the model, with a torch.profiler table of its ops.

Run (full):  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/monitor_overhead.py
Quick check: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/monitor_overhead.py --quick
Profile:     ... monitor_overhead.py --profile --models olmoe --steps 0 --memory-steps 0
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moescope.alerts import AlertRules
from moescope.monitor import MoEMonitor
from naive_monitor import NaiveMonitor, find_routers

VARIANTS: tuple[str, ...] = ("none", "moescope", "moewatch", "naive")
MEMORY_CHECKPOINTS: tuple[int, ...] = (100, 1000, 5000, 10000)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A small transformers MoE causal LM and the batch it trains on."""

    family: str  # "mixtral" | "olmoe"
    hidden: int = 256
    intermediate: int = 512
    num_experts: int = 8
    top_k: int = 2
    layers: int = 4
    heads: int = 4
    vocab: int = 1024
    batch: int = 8
    seq: int = 256

    def describe(self) -> str:
        return (
            f"{self.family}: H={self.hidden}, I={self.intermediate}, E={self.num_experts}, "
            f"K={self.top_k}, {self.layers} layers, vocab {self.vocab}, "
            f"batch {self.batch} x {self.seq} tokens"
        )


SPECS: dict[str, ModelSpec] = {
    "mixtral": ModelSpec("mixtral", intermediate=512, num_experts=8, top_k=2),
    "olmoe": ModelSpec("olmoe", intermediate=128, num_experts=64, top_k=8),
}

_FAMILIES: dict[str, tuple[str, str, str]] = {
    # family: (config class, model class, config field holding E)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "num_local_experts"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "num_experts"),
}


def build_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A randomly initialised ``*ForCausalLM`` of ``spec`` in train mode (float32, CPU)."""
    import transformers

    if spec.family not in _FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}; choose one of {sorted(_FAMILIES)}")
    cfg_name, model_name, experts_field = _FAMILIES[spec.family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=max(spec.seq, 64),
        num_experts_per_tok=spec.top_k,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **{experts_field: spec.num_experts},
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).train()


def make_batches(spec: ModelSpec, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of ``(input_ids [B, S], attention_mask [B, S])``, the same for all variants."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, spec.vocab, (spec.batch, spec.seq), generator=gen)
        out.append((ids, torch.ones_like(ids)))
    return out


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """zero_grad, forward with labels, backward, optimizer step. Returns the detached loss."""
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


# --------------------------------------------------------------------------- variants


def _history_nbytes(mon: MoEMonitor) -> int:
    hist = mon.history
    if hist is None:
        return 0
    total = 0
    for layer in hist.layers:
        steps, counts = hist.as_array(layer)
        total += steps.nbytes + counts.nbytes
        for metric in hist.scalar_metrics:
            total += hist.series(layer, metric)[1].nbytes
    return total


class Variant:
    """A monitor attached to one model: ``after_step`` runs after every training step."""

    name = "none"

    def __init__(self, model: nn.Module, log_every: int) -> None:
        self.model = model
        self.log_every = log_every

    def is_log_step(self, step: int) -> bool:
        return (step + 1) % self.log_every == 0

    def after_step(self, step: int) -> None:
        """Called after training step ``step`` (0-based); logs on every ``log_every``-th."""

    def state_nbytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class MoescopeVariant(Variant):
    """``MoEMonitor`` with co-activation, history and alert rules; snapshot + ``to_dict()``
    on every log step."""

    name = "moescope"
    history = 1000  # MoEMonitor's default: rows kept per layer

    def __init__(self, model: nn.Module, log_every: int) -> None:
        super().__init__(model, log_every)
        self.monitor = MoEMonitor(
            model, coactivation=True, history=self.history, alert_rules=AlertRules()
        )
        self.last: dict[str, float] = {}

    def after_step(self, step: int) -> None:
        if self.is_log_step(step):
            self.last = self.monitor.snapshot(step=step + 1).to_dict()

    def accumulator_nbytes(self) -> int:
        return self.monitor.state_nbytes()

    def state_nbytes(self) -> int:
        return self.accumulator_nbytes() + _history_nbytes(self.monitor)

    def close(self) -> None:
        self.monitor.detach()


class MoescopeSmallHistoryVariant(MoescopeVariant):
    """moescope with ``history=50``: shows the history's decimation cap within 10k steps."""

    name = "moescope_h50"
    history = 50


class MoewatchVariant(Variant):
    """PyPI ``moewatch`` 0.1.0 in live mode, every forward sampled, analysis every log step."""

    name = "moewatch"

    def __init__(self, model: nn.Module, log_every: int) -> None:
        super().__init__(model, log_every)
        import moewatch

        with warnings.catch_warnings():
            # "sample_every=1 captures every forward pass": exactly what is measured.
            warnings.simplefilter("ignore", UserWarning)
            cfg = moewatch.WatchConfig(
                sample_every=1,
                log_every=log_every,
                output="silent",
                router_modules=list(find_routers(model)),
            )
        self.watcher = moewatch.MoEWatch(model, config=cfg).start()
        self.alerts = 0

    def after_step(self, step: int) -> None:
        # MoEWatch.step analyses only when its argument is a multiple of log_every.
        self.alerts += len(self.watcher.step(step + 1))

    def state_nbytes(self) -> int:
        collector = self.watcher._collector  # moewatch exposes no size accessor
        total = 0
        if collector is None:
            return 0
        for acc in collector._accumulators.values():
            if acc.running_counts is not None:
                total += acc.running_counts.nbytes
            for ev in acc.ring_buffer.snapshot():
                total += ev.expert_counts.nbytes
                if ev.raw_logits is not None:
                    total += ev.raw_logits.nbytes
        return total

    def close(self) -> None:
        self.watcher.stop()


class NaiveVariant(Variant):
    """The seeds' per-expert ``.item()`` loop (``naive_monitor.NaiveMonitor``)."""

    name = "naive"

    def __init__(self, model: nn.Module, log_every: int) -> None:
        super().__init__(model, log_every)
        self.monitor = NaiveMonitor(model)
        self.last: dict[str, float] = {}

    def after_step(self, step: int) -> None:
        if self.is_log_step(step):
            self.last = self.monitor.snapshot(step=step + 1)

    def state_nbytes(self) -> int:
        return self.monitor.state_nbytes()

    def close(self) -> None:
        self.monitor.detach()


VARIANT_CLASSES: dict[str, type[Variant]] = {
    "none": Variant,
    "moescope": MoescopeVariant,
    "moewatch": MoewatchVariant,
    "naive": NaiveVariant,
    "moescope_h50": MoescopeSmallHistoryVariant,
}
#: Variants of the memory test (the small-history one shows the cap on the history).
MEMORY_VARIANTS: tuple[str, ...] = ("none", "moescope", "moescope_h50", "moewatch", "naive")


def available_variants(names: Sequence[str]) -> list[str]:
    """``names`` minus ``moewatch`` when the package is missing (with a note on stderr)."""
    out = []
    for n in names:
        if n not in VARIANT_CLASSES:
            raise ValueError(f"unknown variant {n!r}; choose from {list(VARIANT_CLASSES)}")
        if n == "moewatch":
            try:
                import moewatch  # noqa: F401
            except ImportError:
                print(
                    "moewatch is not installed (pip install moewatch==0.1.0, or the 'bench' "
                    "extra): skipping that variant",
                    file=sys.stderr,
                )
                continue
        out.append(n)
    return out


# --------------------------------------------------------------------------- part 1: time


@dataclass
class VariantTiming:
    """Per-step timings of one variant (seconds)."""

    name: str
    train: list[float] = field(default_factory=list)  # training step, hooks included
    post: list[float] = field(default_factory=list)  # after_step: snapshot on log steps
    log: list[float] = field(default_factory=list)  # post of the log steps only
    # Process CPU time (all threads) of the same intervals: much less sensitive than wall
    # time to other processes taking the cores of a shared machine.
    cpu_train: list[float] = field(default_factory=list)
    cpu_post: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass
class ModelTiming:
    """Everything :func:`time_model` measured on one model."""

    spec: ModelSpec
    log_every: int
    steps: int
    warmup: int
    variants: dict[str, VariantTiming]
    state_nbytes: dict[str, int]


def time_model(
    spec: ModelSpec,
    variants: Sequence[str] = VARIANTS,
    steps: int = 20,
    warmup: int = 2,
    log_every: int = 10,
    seed: int = 0,
    lr: float = 1e-3,
    progress: bool = False,
) -> ModelTiming:
    """Round-robin training steps of every variant on copies of one model (see module doc)."""
    if steps < 1 or warmup < 0 or log_every < 1:
        raise ValueError("need steps >= 1, warmup >= 0, log_every >= 1")
    variants = list(variants)
    base = build_model(spec, seed)
    batches = make_batches(spec, min(warmup + steps, 16), seed)
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, Variant]] = {}
    for name in variants:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        runs[name] = (model, opt, VARIANT_CLASSES[name](model, log_every))
    del base
    timing = {name: VariantTiming(name) for name in variants}
    start = time.perf_counter()
    try:
        for r in range(warmup + steps):
            shift = r % len(variants)
            ids, mask = batches[r % len(batches)]
            for name in variants[shift:] + variants[:shift]:
                model, opt, var = runs[name]
                c0, t0 = time.process_time(), time.perf_counter()
                loss = train_step(model, opt, ids, mask)
                c1, t1 = time.process_time(), time.perf_counter()
                var.after_step(r)
                c2, t2 = time.process_time(), time.perf_counter()
                if r >= warmup:
                    vt = timing[name]
                    vt.train.append(t1 - t0)
                    vt.post.append(t2 - t1)
                    vt.cpu_train.append(c1 - c0)
                    vt.cpu_post.append(c2 - c1)
                    if var.is_log_step(r):
                        vt.log.append(t2 - t1)
                    vt.losses.append(float(loss))
            if progress:
                print(
                    f"[{spec.family}] round {r + 1}/{warmup + steps} done, "
                    f"{time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        nbytes = {name: runs[name][2].state_nbytes() for name in variants}
    finally:
        for _, _, var in runs.values():
            var.close()
    return ModelTiming(spec, log_every, steps, warmup, timing, nbytes)


def _amortised(train: np.ndarray, post: np.ndarray) -> float:
    return float(np.median(train) + np.mean(post))


def _ratio_ci(
    rng: np.random.Generator,
    v: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    boot: int,
) -> tuple[float, float]:
    # Bootstrap over steps: amortised(variant) / amortised(none), 95 % percentile interval.
    n = len(v[0])
    vi = rng.integers(0, n, size=(boot, n))
    bi = rng.integers(0, len(b[0]), size=(boot, len(b[0])))
    num = np.median(v[0][vi], axis=1) + v[1][vi].mean(axis=1)
    den = np.median(b[0][bi], axis=1) + b[1][bi].mean(axis=1)
    lo, hi = np.percentile(num / den, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(mt: ModelTiming, boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per variant: medians, IQR, log cost, amortised step, ratios vs ``none``.

    Wall-clock ratios (``ratio``, ``ci_lo``/``ci_hi``, ``paired``) and the same amortised
    ratio on process CPU time (``cpu_ratio``, ``cpu_lo``/``cpu_hi``).
    """
    rng = np.random.default_rng(seed)
    base = mt.variants.get("none")
    rows = []
    for name, vt in mt.variants.items():
        wall = (np.asarray(vt.train), np.asarray(vt.post))
        cpu = (np.asarray(vt.cpu_train), np.asarray(vt.cpu_post))
        amort = _amortised(*wall)
        row: dict[str, Any] = {
            "variant": name,
            "median_ms": 1e3 * float(np.median(wall[0])),
            "iqr_ms": 1e3 * float(np.percentile(wall[0], 75) - np.percentile(wall[0], 25)),
            "log_ms": 1e3 * float(np.median(vt.log)) if vt.log else float("nan"),
            "amortised_ms": 1e3 * amort,
        }
        nan = float("nan")
        row.update(
            ratio=nan,
            ci_lo=nan,
            ci_hi=nan,
            paired=nan,
            max_loss_diff=nan,
            cpu_ratio=nan,
            cpu_lo=nan,
            cpu_hi=nan,
        )
        if base is not None:
            bwall = (np.asarray(base.train), np.asarray(base.post))
            bcpu = (np.asarray(base.cpu_train), np.asarray(base.cpu_post))
            row["ratio"] = amort / _amortised(*bwall)
            row["ci_lo"], row["ci_hi"] = _ratio_ci(rng, wall, bwall, boot)
            row["cpu_ratio"] = _amortised(*cpu) / _amortised(*bcpu)
            row["cpu_lo"], row["cpu_hi"] = _ratio_ci(rng, cpu, bcpu, boot)
            # Per-round ratios cancel slow drifts of the machine's load; the log cost is
            # added amortised (it falls on one step in log_every).
            row["paired"] = float(
                np.median(wall[0] / bwall[0])
                + (wall[1].mean() - bwall[1].mean()) / float(np.median(bwall[0]))
            )
            row["max_loss_diff"] = float(
                np.max(np.abs(np.asarray(vt.losses) - np.asarray(base.losses)))
            )
        rows.append(row)
    return rows


def timing_table(mt: ModelTiming, rows: list[dict[str, Any]]) -> str:
    """The markdown table of one model."""
    lines = [
        f"**{mt.spec.describe()}** — {mt.steps} measured rounds after {mt.warmup} warm-up, "
        f"log (snapshot) every {mt.log_every} steps",
        "",
        "| variant | median step (ms) | IQR (ms) | log step cost (ms) | amortised step (ms) "
        "| ratio vs none | 95% bootstrap | paired ratio | CPU-time ratio | CPU 95% bootstrap "
        "| max loss diff | state bytes |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['log_ms']:.2f} "
            f"| {r['amortised_ms']:.1f} | {r['ratio']:.3f}x | "
            f"{r['ci_lo']:.3f}–{r['ci_hi']:.3f} | {r['paired']:.3f}x | {r['cpu_ratio']:.3f}x | "
            f"{r['cpu_lo']:.3f}–{r['cpu_hi']:.3f} | "
            f"{r['max_loss_diff']:.1e} | {mt.state_nbytes[r['variant']]:,} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 2: memory

TINY_MEMORY_SPEC = ModelSpec(
    "mixtral",
    hidden=32,
    intermediate=64,
    num_experts=8,
    top_k=2,
    layers=2,
    vocab=128,
    batch=2,
    seq=32,
)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def run_memory(
    variant: str,
    steps: int = 10_000,
    log_every: int = 100,
    checkpoints: Sequence[int] = MEMORY_CHECKPOINTS,
    spec: ModelSpec = TINY_MEMORY_SPEC,
    seed: int = 0,
) -> list[dict[str, int]]:
    """``steps`` monitored no-grad forwards of a tiny model; a row at each checkpoint step.

    Returns rows ``{"step", "state_bytes", "rss_bytes", "accumulator_bytes"}`` for the
    checkpoints <= steps (and ``steps`` itself); ``accumulator_bytes`` is the moescope
    accumulators' part of ``state_bytes`` (-1 for the other variants).
    """
    marks = sorted({c for c in checkpoints if c <= steps} | {steps})
    model = build_model(spec, seed).eval()
    ids, mask = make_batches(spec, 1, seed)[0]
    var = VARIANT_CLASSES[variant](model, log_every)
    rows = []
    try:
        with torch.no_grad():
            for step in range(steps):
                model(input_ids=ids, attention_mask=mask)
                var.after_step(step)
                if step + 1 in marks:
                    acc = var.accumulator_nbytes() if isinstance(var, MoescopeVariant) else None
                    rows.append(
                        {
                            "step": step + 1,
                            "state_bytes": var.state_nbytes(),
                            "rss_bytes": rss_bytes(),
                            "accumulator_bytes": acc if acc is not None else -1,
                        }
                    )
    finally:
        var.close()
    return rows


def run_memory_subprocess(
    variant: str, steps: int, log_every: int, threads: int
) -> list[dict[str, int]]:
    """:func:`run_memory` in a fresh interpreter, so that RSS belongs to one variant only."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-worker",
        variant,
        "--models",
        "",
        "--memory-steps",
        str(steps),
        "--memory-log-every",
        str(log_every),
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(results: dict[str, list[dict[str, int]]], log_every: int) -> str:
    """Markdown: state bytes and RSS (MiB) per variant at each checkpoint step."""
    steps = sorted({r["step"] for rows in results.values() for r in rows})
    head = (
        "| variant | "
        + " | ".join(f"state @ {s:,}" for s in steps)
        + " | "
        + " | ".join(f"RSS MiB @ {s:,}" for s in steps)
        + " |"
    )
    sep = "|---|" + "---:|" * (2 * len(steps))
    lines = [
        f"Tiny Mixtral ({TINY_MEMORY_SPEC.describe()}), no-grad forwards, log every "
        f"{log_every} steps; state in bytes, each variant in its own process",
        "",
        head,
        sep,
    ]
    for name, rows in results.items():
        by = {r["step"]: r for r in rows}
        state = " | ".join(f"{by[s]['state_bytes']:,}" if s in by else "" for s in steps)
        rss = " | ".join(f"{by[s]['rss_bytes'] / 2**20:.1f}" if s in by else "" for s in steps)
        lines.append(f"| {name} | {state} | {rss} |")
        if all(by[s].get("accumulator_bytes", -1) >= 0 for s in steps if s in by):
            acc = " | ".join(f"{by[s]['accumulator_bytes']:,}" if s in by else "" for s in steps)
            lines.append(f"| {name}: accumulators only | {acc} |{' |' * len(steps)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- profiling


def profile_moescope(spec: ModelSpec, steps: int = 3, seed: int = 0, top: int = 15) -> str:
    """Where the monitor's time goes: cProfile of monitored steps, then torch.profiler of
    ``LayerAccumulator.update`` alone on records captured from the real model."""
    from moescope.stats.accumulator import LayerAccumulator

    model = build_model(spec, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask = make_batches(spec, 1, seed)[0]
    mon = MoEMonitor(model, coactivation=True, history=1000, alert_rules=AlertRules())
    train_step(model, opt, ids, mask)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        train_step(model, opt, ids, mask)
    mon.snapshot()
    prof.disable()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    out.write(f"## cProfile, {steps} monitored steps + 1 snapshot ({spec.describe()})\n")
    st.print_stats(r"moescope|train_step|backward|forward \(|step\)", top * 2)

    # Capture one record per layer (the emit path), then time the update alone.
    records = []
    mon.detach()
    rec_mon = MoEMonitor(model, coactivation=True, history=None, attach=False)
    rec_mon._emit = records.append  # type: ignore[method-assign]
    rec_mon.attach()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    rec_mon.detach()
    acc = LayerAccumulator(spec.num_experts, spec.top_k, coactivation=True)
    for rec in records:
        acc.update(rec)
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        for rec in records:
            acc.update(rec)
    per_update = (time.perf_counter() - t0) / (n * len(records))
    out.write(
        f"\nLayerAccumulator.update alone: {1e3 * per_update:.3f} ms per layer call "
        f"(T={records[0].topk_index.shape[0]}, E={spec.num_experts}, K={spec.top_k}), "
        f"{1e3 * per_update * len(records):.2f} ms per forward of {len(records)} layers\n"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        for _ in range(n):
            for rec in records:
                acc.update(rec)
    out.write("\n## torch.profiler, LayerAccumulator.update only (self CPU time)\n")
    out.write(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return out.getvalue()


# --------------------------------------------------------------------------- main


def _conditions(threads: int) -> str:
    load = "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"torch.set_num_threads({threads}), load average (1/5/15 min) {load}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny batches and few steps: checks that the script runs",
    )
    p.add_argument("--steps", type=int, default=None, help="measured rounds (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="discarded rounds (default 2)")
    p.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="snapshot every N training steps (default 10; 2 with --quick)",
    )
    p.add_argument("--models", default="mixtral,olmoe", help="comma list of: mixtral, olmoe")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants")
    p.add_argument(
        "--memory-steps",
        type=int,
        default=None,
        help="monitor updates of the memory test (default 10000; 0 = skip)",
    )
    p.add_argument("--memory-log-every", type=int, default=100)
    p.add_argument(
        "--memory-threads",
        type=int,
        default=1,
        help="torch threads of the memory workers (tiny forwards: 1 is fastest)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profile moescope on each model")
    p.add_argument("--markdown-out", default=None, help="also write the tables to this file")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 4 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.log_every is None:
        args.log_every = 2 if args.quick else 10
    if args.memory_steps is None:
        args.memory_steps = 300 if args.quick else 10_000
    return args


def main(argv: Sequence[str] | None = None, emit: Callable[[str], None] = print) -> str:
    """Run the benchmark; returns (and emits) the markdown report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        rows = run_memory(args.memory_worker, args.memory_steps, args.memory_log_every)
        print(json.dumps(rows))
        return ""
    variants = available_variants([v for v in args.variants.split(",") if v])
    parts = [f"Conditions: {_conditions(args.threads)}"]
    emit(parts[0])
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in SPECS:
            raise SystemExit(f"unknown model {m!r}; choose from {list(SPECS)}")
        spec = SPECS[m]
        if args.quick:
            spec = ModelSpec(**{**spec.__dict__, "batch": 1, "seq": 32})
        if args.steps > 0:
            mt = time_model(
                spec,
                variants,
                args.steps,
                args.warmup,
                args.log_every,
                args.seed,
                progress=True,
            )
            table = timing_table(mt, summarize(mt, seed=args.seed))
            table += f"\n\nFinished: {_conditions(args.threads)}"
            parts.append(table)
            emit("\n" + table)
        if args.profile:
            report = profile_moescope(spec, seed=args.seed)
            parts.append("```\n" + report + "\n```")
            emit(report)
    if args.memory_steps > 0:
        mem_variants = [
            v
            for v in MEMORY_VARIANTS
            if v in variants or (v == "moescope_h50" and "moescope" in variants)
        ]
        results = {
            v: run_memory_subprocess(
                v, args.memory_steps, args.memory_log_every, args.memory_threads
            )
            for v in mem_variants
        }
        table = memory_table(results, args.memory_log_every)
        parts.append(table)
        emit("\n" + table)
    text = "\n\n".join(parts) + "\n"
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
