"""The ``make demo`` job (``moescope.demo``) with a handful of steps and a tiny model.

Checks what the demo promises to leave behind, against independent readers: strict JSON
lines (``json.loads`` refusing NaN), TensorBoard event files read back with
TensorBoard's own ``EventAccumulator``, PNG files decoded by matplotlib, and the checkpoint
reloaded through ``AutoModelForCausalLM``. The logged CV is recomputed in float64 from the
JSONL usage counts, and the reloaded model's loss on the eval blocks must equal the
Trainer's last ``eval_loss``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from moescope import demo
from moescope.demo import DemoSettings, RunResult

TINY = DemoSettings(
    steps=6,
    seed=0,
    batch_size=4,
    seq_len=32,
    lr=3e-3,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=16,
    num_experts=4,
    top_k=2,
    max_bytes=60_000,
    eval_blocks=4,  # = batch_size: one eval batch, so eval_loss is a plain mean
    log_every=2,
    eval_every=3,
    heatmap_every=3,
    threads=1,
    console=False,
)


def _strict_json(line: str) -> dict:
    def no_constant(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(line, parse_constant=no_constant)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RunResult], dict]:
    out = tmp_path_factory.mktemp("demo")
    train_ds, eval_ds = demo.load_data(TINY)
    results = [
        demo.train_run(name, out / name, TINY, coef, train_ds, eval_ds) for name, coef in demo.RUNS
    ]
    summary = demo.summarise(results, out, TINY, wall_seconds=1.0, cpu_seconds=0.5)
    return out, results, summary


def test_run_layout_and_summary(runs: tuple[Path, list[RunResult], dict]) -> None:
    out, results, summary = runs
    assert [r.name for r in results] == ["balanced", "no_balance"]
    assert [r.aux_loss_coef for r in results] == [0.01, 0.0]
    on_disk = _strict_json((out / "summary.json").read_text())
    assert on_disk["cpu_seconds"] == summary["cpu_seconds"] == 0.5
    assert set(on_disk["runs"]) == {"balanced", "no_balance"}
    assert on_disk["settings"]["steps"] == TINY.steps
    for r in results:
        assert r.steps == TINY.steps
        assert r.windows == TINY.steps // TINY.log_every  # windows end at 2, 4, 6
        assert r.eval_windows == TINY.steps // TINY.eval_every  # evaluations at 3, 6
        assert r.total_experts == TINY.num_layers * TINY.num_experts
        assert math.isfinite(r.final_train_loss) and math.isfinite(r.final_eval_loss)
        assert Path(r.run_dir) == out / r.name
        row = on_disk["runs"][r.name]
        assert row["num_alerts"] == r.num_alerts
        assert row["checkpoint"] == r.checkpoint


def test_jsonl_lines_parse_and_match_the_run(runs: tuple[Path, list[RunResult], dict]) -> None:
    _, results, _ = runs
    for r in results:
        lines = Path(r.jsonl).read_text().splitlines()
        objs = [_strict_json(x) for x in lines]
        snaps = [o for o in objs if o["kind"] == "snapshot"]
        assert [o["step"] for o in snaps] == [2, 4, 6]
        # Alerts embedded in the JSONL are the ones the on_alert collector counted.
        n_alerts = sum(
            len(o.get("alerts", [])) for o in objs if o["kind"] in ("snapshot", "alerts")
        )
        assert n_alerts == r.num_alerts
        # Last window's average CV, recomputed in float64 from the raw usage counts.
        layers = snaps[-1]["snapshot"]["layers"]
        assert len(layers) == TINY.num_layers
        cvs = []
        for stats in layers.values():
            c = np.asarray(stats["usage_counts"], dtype=np.float64)
            assert c.sum() == TINY.batch_size * TINY.seq_len * TINY.log_every * TINY.top_k
            cvs.append(c.std() / c.mean())
        assert r.final_avg_cv == pytest.approx(float(np.mean(cvs)), rel=1e-6, abs=1e-9)
        unused = sum(int((np.asarray(s["usage_counts"]) == 0).sum()) for s in layers.values())
        assert r.final_unused_experts == unused


def test_tensorboard_has_moe_scalars_images_and_trainer_loss(
    runs: tuple[Path, list[RunResult], dict],
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, results, _ = runs
    for r in results:
        events = list(Path(r.tensorboard_dir).glob("events.out.tfevents.*"))
        assert len(events) == 1, "Trainer and moescope should share one event file"
        acc = EventAccumulator(str(r.tensorboard_dir), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        tags = acc.Tags()
        scalars = set(tags["scalars"])
        for tag in (
            "moe/avg_expert_cv",
            "moe/total_unused_experts",
            "moe/model.layers.0.mlp/max_over_mean",
            "moe/eval/avg_expert_cv",
            "train/loss",
            "eval/loss",
        ):
            assert tag in scalars, f"{tag} missing from {sorted(scalars)[:20]}..."
        cv = acc.Scalars("moe/avg_expert_cv")
        assert [e.step for e in cv] == [2, 4, 6]
        # TensorBoard stores float32.
        assert cv[-1].value == pytest.approx(r.final_avg_cv, rel=1e-6)
        assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]
        assert acc.Scalars("eval/loss")[-1].value == pytest.approx(r.final_eval_loss, rel=1e-6)
        images = set(tags["images"])
        assert "moe/usage_heatmap" in images
        assert "moe/model.layers.1.mlp/usage_heatmap" in images
        assert [e.step for e in acc.Images("moe/usage_heatmap")] == [4, 6]


def test_heatmap_pngs_decode(runs: tuple[Path, list[RunResult], dict]) -> None:
    from matplotlib.image import imread

    _, results, _ = runs
    for r in results:
        # Heatmaps at the first windows ending at or after steps 3 and 6: steps 4 and 6,
        # one all-layers image plus one per layer each time.
        assert len(r.heatmaps) == 2 * (1 + TINY.num_layers)
        names = {Path(p).name for p in r.heatmaps}
        assert {"all_layers_step4.png", "all_layers_step6.png"} <= names
        for p in r.heatmaps:
            assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            img = imread(p)
            assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_checkpoint_reloads_and_reproduces_eval_loss(
    runs: tuple[Path, list[RunResult], dict],
) -> None:
    from transformers import AutoModelForCausalLM

    import moescope.nn.hf  # noqa: F401  (registers the model type)

    _, results, _ = runs
    _, eval_ds = demo.load_data(TINY)
    batch = {k: torch.stack([eval_ds[i][k] for i in range(len(eval_ds))]) for k in eval_ds[0]}
    for r in results:
        ckpt = Path(r.checkpoint)
        assert (ckpt / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        assert type(model).__name__ == "TinyMoEForCausalLM"
        assert model.config.aux_loss_coef == r.aux_loss_coef
        assert model.config.num_experts == TINY.num_experts
        # The saved model generates with its KV cache, and that equals no cache.
        assert model.config.use_cache and model.generation_config.use_cache
        prompt = batch["input_ids"][:2, :8]
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
        plain = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, plain)
        with torch.no_grad():
            loss = model(**batch).loss
        # The Trainer's eval_loss is the model's full loss (LM + router terms) on the
        # same blocks: equal only if the checkpoint holds the trained weights.
        assert float(loss) == pytest.approx(r.final_eval_loss, rel=1e-5)
        # eval_lm_loss: the LM part alone, against a float64 next-byte cross entropy.
        ids = batch["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        assert r.eval_lm_loss == pytest.approx(float(ce), rel=1e-5)
        assert r.eval_lm_loss < r.final_eval_loss  # router terms are positive


def test_same_initial_weights_in_both_runs(tmp_path: Path) -> None:
    # The comparison is fair only if train_run's seeded construction gives both runs the
    # same starting weights whatever their load-balancing coefficient.
    torch.manual_seed(123)  # build_model must reseed, not rely on the global state
    a = demo.build_model(TINY, 0.01)
    torch.rand(7)  # move the global generator between the two builds
    b = demo.build_model(TINY, 0.0)
    assert (a.config.aux_loss_coef, b.config.aux_loss_coef) == (0.01, 0.0)
    sd = [a.state_dict(), b.state_dict()]
    assert sd[0].keys() == sd[1].keys()
    for k in sd[0]:
        torch.testing.assert_close(sd[0][k], sd[1][k], rtol=0, atol=0)


def test_router_param_groups_partition_the_parameters() -> None:
    from moescope.nn.hf import TinyMoEForCausalLM, TinyMoEHFConfig

    m = TinyMoEForCausalLM(TinyMoEHFConfig.from_tiny_config(TINY.model_config(0.0)))
    groups = demo.router_param_groups(m, lr=1e-3, router_lr=5e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    router = {id(p) for n, p in m.named_parameters() if ".mlp.router." in n}
    assert router and {id(p) for p in groups[2]["params"]} == router
    assert groups[2]["lr"] == 5e-3 and groups[2]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="no MoE router"):
        demo.router_param_groups(torch.nn.Linear(2, 2), 1e-3, 1e-3)


def test_cli_flags(tmp_path: Path) -> None:
    args = demo.parse_args(
        ["--out", str(tmp_path), "--steps", "9", "--seed", "3", "--threads", "2"]
    )
    s = demo.settings_from_args(args)
    assert (s.steps, s.seed, s.threads) == (9, 3, 2)
    assert s.eval_every == 3 and s.heatmap_every == 3
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])


def test_main_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The `make demo` entry point at its real model size, cut to two steps per run.
    rc = demo.main(
        [
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--log-every",
            "1",
            "--max-bytes",
            "100000",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--quiet",
            "--analyze-tokens",
            "96",
            "--prune-tokens",
            "96",
            "--agree-tokens",
            "96",
        ]
    )
    assert rc == 0
    summary = _strict_json((tmp_path / "summary.json").read_text())
    assert list(summary["runs"]) == ["balanced", "no_balance"]
    assert summary["cpu_seconds"] > 0 and summary["wall_seconds"] > 0
    for name, run in summary["runs"].items():
        assert run["steps"] == 2 and run["windows"] == 2
        assert (tmp_path / name / "checkpoint" / "model.safetensors").is_file()
        assert Path(run["jsonl"]).is_file()
    printed = capsys.readouterr().out
    assert "eval LM loss (nats/byte)" in printed and "no_balance" in printed
    assert str(tmp_path / "summary.json") in printed
    # The last step: `moescope analyze` on the balanced checkpoint, neurons on, two domains.
    report = tmp_path / "analysis" / "report.html"
    assert f"report: {report}" in printed and report.is_file()
    analysis = _strict_json((tmp_path / "analysis" / "summary.json").read_text())
    assert analysis["total_tokens"] == 96 * len(demo.analysis_sources()) == 192
    agreement = analysis["routing_analysis"]["router_agreement"]  # balanced vs no_balance
    assert set(agreement) == set(analysis["layers"]) and len(agreement) == 4
    assert all(0.0 <= v <= 1.0 for v in agreement.values())
    # Then `moescope compare` of the two training logs: collapsed (no_balance) vs balanced.
    cmp_report = tmp_path / "compare" / "report.html"
    assert f"comparison: {cmp_report}" in printed and cmp_report.is_file()
    comparison = _strict_json((tmp_path / "compare" / "comparison.json").read_text())
    assert (comparison["a"]["label"], comparison["b"]["label"]) == ("no_balance", "balanced")
    assert comparison["a"]["kind"] == "training" and comparison["a"]["steps"] == [1, 2]
    for side, run in (("a", "no_balance"), ("b", "balanced")):
        lines = [
            _strict_json(x) for x in Path(summary["runs"][run]["jsonl"]).read_text().splitlines()
        ]
        last = [x for x in lines if x["kind"] == "snapshot"][-1]["snapshot"]["layers"]
        for layer in comparison["layers"]:
            counts = np.asarray(last[layer["layer"]]["usage_counts"], dtype=np.float64)
            np.testing.assert_allclose(layer[f"usage_{side}"], counts / counts.sum(), atol=1e-12)
    # Last, `moescope prune --drop-unused` of the collapsed run on the analysis tokens.
    pruned = tmp_path / "pruned" / "moescope-prune" / "report.html"
    assert f"pruning report: {pruned}" in printed and pruned.is_file()
    result = _strict_json((tmp_path / "pruned" / "moescope-prune" / "summary.json").read_text())
    assert result["calibration_tokens"] == result["eval_tokens"] == 192
    unused = [sum(f == 0 for f in s["frequency"]) for s in result["saliency"]]
    assert result["kept"] == max(result["top_k"], 16 - min(unused))
    base = next(c for c in result["curve"] if c["ordering"] == "none")
    assert base["kept"] == 16 and "loss on those tokens" in printed
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["num_experts"] == result["kept"]
    # And `moescope agree`: the balanced checkpoint in float32 vs bfloat16, same 96 bytes.
    agreed = tmp_path / "agree" / "report.html"
    assert f"agreement report: {agreed}" in printed and agreed.is_file()
    agree_summary = _strict_json((tmp_path / "agree" / "summary.json").read_text())
    assert agree_summary["tokens"] == 96 and len(agree_summary["layers"]) == 4
    assert agree_summary["verdict"] in printed and 0.0 < agree_summary["exact"] <= 1.0


def test_rerun_into_same_folder_replaces_the_old_outputs(tmp_path: Path) -> None:
    settings = DemoSettings(
        **{**TINY.__dict__, "steps": 2, "log_every": 1, "eval_every": 2, "heatmap_every": 2}
    )
    train_ds, eval_ds = demo.load_data(settings)
    for _ in range(2):
        r = demo.train_run("no_balance", tmp_path / "run", settings, 0.0, train_ds, eval_ds)
    assert len(list(Path(r.tensorboard_dir).glob("events.out.tfevents.*"))) == 1
    objs = [_strict_json(x) for x in Path(r.jsonl).read_text().splitlines()]
    steps = [o["step"] for o in objs if o["kind"] == "snapshot"]
    assert steps == [1, 2]
