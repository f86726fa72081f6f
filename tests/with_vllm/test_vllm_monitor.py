"""moescope inside real vLLM (CPU build): counts equal transformers' for the same tokens.

Each engine runs in its own process (tests/with_vllm/run_vllm.py) on a tiny random checkpoint
saved from transformers' config classes with a locally trained tokenizer (tiny_ckpt.py).
Ground truth: the same token sequences (prompt + what vLLM generated, minus the last
token, which vLLM never feeds back) through transformers with moescope's HF adapter
(``MoEMonitor``) and through transformers' own ``output_router_logits`` (top-k taken
here), in float32.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moescope.sinks.jsonl import read_jsonl
from moescope.stats.snapshot import Snapshot

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tiny_ckpt import build_checkpoint, corpus_text  # noqa: E402

MAX_TOKENS = 6


def _prompts() -> list[str]:
    lines = [ln.strip() for ln in corpus_text().splitlines() if len(ln.strip()) > 20]
    return [lines[3], lines[10], lines[25]]


def _repeat_prompt() -> str:
    # Long enough to fill several KV blocks, so the second request hits the prefix cache.
    return " ".join(corpus_text().split()[:120])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("MOESCOPE_VLLM", None)
    return env


def run_scenario(tmp: Path, spec: dict[str, Any]) -> dict[str, Any]:
    path = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_vllm.py"), str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


def hf_counts(model_dir: Path, sequences: list[list[int]]) -> Snapshot:
    """moescope's HF adapter on transformers, one forward per sequence."""
    import transformers

    from moescope import MoEMonitor

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    mon = MoEMonitor(model)
    with torch.no_grad():
        for seq in sequences:
            model(torch.tensor([seq]))
    snap = mon.snapshot(reset=False)
    mon.detach()
    return snap


def hf_topk(model_dir: Path, seq: list[int], start: int) -> list[np.ndarray]:
    """Per layer [E] counts of transformers' own router logits (top-k) over seq[start:]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    counts = []
    for logits in out.router_logits:
        ids = torch.topk(logits[start:], k, dim=-1).indices
        counts.append(np.bincount(ids.reshape(-1).numpy(), minlength=logits.shape[-1]))
    return counts


def fed_tokens(req: dict[str, Any]) -> list[int]:
    return req["prompt_ids"] + req["output_ids"][:-1]


def vllm_layers(snap: Snapshot) -> list[tuple[str, Any]]:
    def layer_no(name: str) -> int:
        return int(re.search(r"layers\.(\d+)\.", name).group(1))  # type: ignore[union-attr]

    return sorted(snap.layers.items(), key=lambda kv: layer_no(kv[0]))


@pytest.fixture(scope="module")
def qwen(qwen_engine: tuple[Path, dict[str, Any], Path]) -> tuple[Path, dict[str, Any], Path]:
    """The shared engine (conftest.py ``qwen_engine``): checkpoint, results, JSONL log."""
    model, res, tmp = qwen_engine
    return model, res, tmp / "routing.jsonl"


def test_warmup_and_profiling_runs_are_not_counted(qwen: Any) -> None:
    _, res, _ = qwen
    snap = Snapshot.from_json(res["warmup"]["snapshot"])
    assert snap.total_tokens == 0
    assert all(int(s.usage_counts.sum()) == 0 for s in snap.layers.values())
    assert res["warmup"]["tokens"] == {
        "scheduled_tokens": 0,
        "prefix_cached_tokens": 0,
        "forwards": 0,
    }


def test_counts_equal_transformers_with_moescope_hf_adapter(qwen: Any) -> None:
    model, res, _ = qwen
    reqs = res["distinct"]["requests"]
    assert all(r["cached"] == 0 for r in reqs)
    got = Snapshot.from_json(res["distinct"]["snapshot"])
    ref = hf_counts(model, [fed_tokens(r) for r in reqs])
    n_fed = sum(len(fed_tokens(r)) for r in reqs)
    assert len(got.layers) == len(ref.layers) == 2
    for (name, g), (_, r) in zip(vllm_layers(got), ref.layers.items(), strict=True):
        assert g.num_tokens == r.num_tokens == n_fed, name
        np.testing.assert_array_equal(g.usage_counts, r.usage_counts, err_msg=name)
        assert int(g.usage_counts.sum()) == n_fed * 2
        # Router-probability metrics from vLLM's own logits: equal up to float32 noise.
        assert g.routing_entropy == pytest.approx(r.routing_entropy, rel=1e-4)
        assert g.top1_prob == pytest.approx(r.top1_prob, rel=1e-4)
        assert g.aux_loss == pytest.approx(r.aux_loss, rel=1e-4)
        np.testing.assert_array_equal(g.coactivation, r.coactivation)
    tokens = res["distinct"]["tokens"]
    assert tokens["scheduled_tokens"] == n_fed
    assert tokens["prefix_cached_tokens"] == 0


def test_prefix_cache_hits_are_served_not_routed(qwen: Any) -> None:
    model, res, _ = qwen
    first, second = res["repeat"]["requests"]
    assert first["cached"] == 0 and second["cached"] > 0
    assert first["prompt_ids"] == second["prompt_ids"]
    got = Snapshot.from_json(res["repeat"]["snapshot"])
    tokens = res["repeat"]["tokens"]
    routed = len(fed_tokens(first)) + len(fed_tokens(second)) - second["cached"]
    assert got.total_tokens == tokens["scheduled_tokens"] == routed
    assert tokens["prefix_cached_tokens"] == second["cached"]
    # Exact per-layer counts: the first request's every token, the second's uncached tail.
    ref_a = hf_topk(model, fed_tokens(first), 0)
    ref_b = hf_topk(model, fed_tokens(second), second["cached"])
    for (name, g), a, b in zip(vllm_layers(got), ref_a, ref_b, strict=True):
        np.testing.assert_array_equal(g.usage_counts, a + b, err_msg=name)


def test_jsonl_windows_add_up_to_the_totals(qwen: Any) -> None:
    _, res, jsonl = qwen
    lines = read_jsonl(jsonl)
    snaps = [ln for ln in lines if ln["kind"] == "snapshot"]
    metrics = [ln for ln in lines if ln["kind"] == "metrics"]
    assert snaps and len(metrics) == len(snaps)
    total: dict[str, np.ndarray] = {}
    for ln in snaps:
        for name, layer in ln["snapshot"]["layers"].items():
            total[name] = total.get(name, 0) + np.asarray(layer["usage_counts"])
    expect: dict[str, np.ndarray] = {}
    for part in ("distinct", "repeat"):
        for name, s in Snapshot.from_json(res[part]["snapshot"]).layers.items():
            expect[name] = expect.get(name, 0) + s.usage_counts
    assert set(total) == set(expect)
    for name in expect:
        np.testing.assert_array_equal(total[name], expect[name], err_msg=name)
    cached = sum(m["metrics"]["vllm/prefix_cached_tokens"] for m in metrics)
    assert cached == res["repeat"]["tokens"]["prefix_cached_tokens"]


def hf_router_reference(
    model_dir: Path, parts: list[tuple[list[int], int]], top_k: int
) -> list[dict[str, Any]]:
    """Per layer, float64 metrics of transformers' own router logits over the rows
    ``seq[start:]`` of every part (softmax router): counts, entropy, top-1, aux loss."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows: list[list[np.ndarray]] = []
    with torch.no_grad():
        for seq, start in parts:
            out = model(torch.tensor([seq]), output_router_logits=True)
            for i, logits in enumerate(out.router_logits):
                if len(rows) <= i:
                    rows.append([])
                rows[i].append(logits[start:].double().numpy())
    refs = []
    for chunks in rows:
        x = np.concatenate(chunks)
        n, e = x.shape
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ids = np.argsort(-x, axis=-1, kind="stable")[:, :top_k]
        counts = np.bincount(ids.reshape(-1), minlength=e)
        refs.append(
            {
                "counts": counts,
                "entropy": float(np.mean(-(p * np.log(p)).sum(-1))),
                "top1": float(np.mean(p.max(-1))),
                "aux": float(e * np.sum(counts / n * p.mean(0))),
                "tokens": n,
            }
        )
    return refs


def test_data_parallel_merge_of_real_worker_payloads(qwen: Any) -> None:
    """The RPC payloads of two real vLLM windows of disjoint tokens, merged as two
    data-parallel replicas by mv.parse_rpc, give the metrics of all their tokens together
    (float64 recomputation from transformers' router logits over the same rows)."""
    import moescope.integrations.vllm as mv

    model, res, _ = qwen
    a = [{**p, "dp_rank": 0} for p in res["distinct"]["payloads"]]
    b = [{**p, "dp_rank": 1} for p in res["repeat"]["payloads"]]
    merged = mv.parse_rpc(a + b)
    first, second = res["repeat"]["requests"]
    parts = [(fed_tokens(r), 0) for r in res["distinct"]["requests"]]
    parts += [(fed_tokens(first), 0), (fed_tokens(second), second["cached"])]
    refs = hf_router_reference(model, parts, top_k=2)
    for k in ("scheduled_tokens", "prefix_cached_tokens", "forwards"):
        assert merged.tokens[k] == res["distinct"]["tokens"][k] + res["repeat"]["tokens"][k]
    for (name, g), ref in zip(vllm_layers(merged.snapshot), refs, strict=True):
        assert g.num_tokens == ref["tokens"], name
        np.testing.assert_array_equal(g.usage_counts, ref["counts"], err_msg=name)
        assert g.routing_entropy == pytest.approx(ref["entropy"], rel=1e-4), name
        assert g.top1_prob == pytest.approx(ref["top1"], rel=1e-4), name
        assert g.aux_loss == pytest.approx(ref["aux"], rel=1e-4), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, data: bytes | None = None) -> bytes:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def _wait_healthy(proc: subprocess.Popen, api: int, log_path: Path) -> None:
    """Until the server at port ``api`` answers /health (fails with its log if it died)."""
    deadline = time.time() + 600
    while True:
        assert proc.poll() is None, log_path.read_text()[-5000:]
        try:
            _get(f"http://127.0.0.1:{api}/health")
            return
        except OSError:
            assert time.time() < deadline, "vllm serve did not become healthy"
            time.sleep(2)


def _complete(api: int, model: Path, prompt: str) -> int:
    """One greedy completion; returns the tokens the model was fed (prompt + generated - 1)."""
    body = json.dumps(
        {"model": str(model), "prompt": prompt, "max_tokens": MAX_TOKENS,
         "temperature": 0.0, "ignore_eos": True}
    ).encode()  # fmt: skip
    usage = json.loads(_get(f"http://127.0.0.1:{api}/v1/completions", body))["usage"]
    return int(usage["prompt_tokens"] + usage["completion_tokens"] - 1)


def _metric(text: str, name: str) -> dict[str, float]:
    out = {}
    for ln in text.splitlines():
        if ln.startswith(name):
            key, val = ln.rsplit(" ", 1)
            out[key] = float(val)
    return out


def test_vllm_serve_exports_prometheus_metrics(tmp_path: Path) -> None:
    model = build_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    api, prom = _free_port(), _free_port()
    env = _env()
    env.update(
        MOESCOPE_VLLM="1",
        MOESCOPE_VLLM_PROMETHEUS_PORT=str(prom),
        MOESCOPE_VLLM_INTERVAL="0.5",
    )
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--port", str(api), "--host", "127.0.0.1", "--max-model-len", "512",
        "--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching",
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, api, tmp_path / "server.log")
        fed = _complete(api, model, _prompts()[0])
        time.sleep(2.0)  # a window closes every 0.5 s
        text = _get(f"http://127.0.0.1:{prom}/metrics").decode()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    tokens = _metric(text, "moescope_tokens_total{")
    assert len(tokens) == 2
    assert all(v == fed for v in tokens.values()), (tokens, fed)
    # Bounded by default: no (layer, expert) series; per layer 5 load quantiles and the
    # 3 most / least loaded experts, consistent with each other (quantile 1 = the most
    # loaded expert's share, quantile 0 = the least loaded one's).
    assert "moescope_expert_tokens_total" not in text
    assert "moescope_expert_load_fraction" not in text
    quant = _metric(text, "moescope_layer_expert_load_quantile{")
    top = _metric(text, "moescope_layer_top_expert_load_fraction{")
    bottom = _metric(text, "moescope_layer_bottom_expert_load_fraction{")
    assert (len(quant), len(top), len(bottom)) == (2 * 5, 2 * 3, 2 * 3)
    for layer in {re.search(r'layer="([^"]+)"', k).group(1) for k in quant}:  # type: ignore[union-attr]
        q = {re.search(r'quantile="([^"]+)"', k).group(1): v  # type: ignore[union-attr]
             for k, v in quant.items() if f'layer="{layer}"' in k}  # fmt: skip
        first = [v for k, v in top.items() if f'layer="{layer}"' in k and 'rank="1"' in k]
        last = [v for k, v in bottom.items() if f'layer="{layer}"' in k and 'rank="1"' in k]
        assert first == [q["1.0"]] and last == [q["0.0"]]
        assert 1 / 8 <= q["1.0"] <= 1 and q["0.0"] <= 1 / 8
    sched = _metric(text, "moescope_vllm_scheduled_tokens_total")
    assert list(sched.values()) == [fed]


SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
         "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
         "--no-enable-prefix-caching"]  # fmt: skip


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("served") / "ckpt", "qwen3_moe")


def test_bad_setting_stops_the_server_before_weights_load(served_model: Path) -> None:
    """A real server start with a bad variable ends with one line naming it, before any
    engine process starts (the plugin checks the environment in the API server)."""
    env = _env()
    env.update(MOESCOPE_VLLM="1", MOESCOPE_VLLM_PROMETHEUS_PORT="abc")
    proc = subprocess.run(
        [*SERVE, "--model", str(served_model), "--port", str(_free_port())],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last == (
        "moescope.integrations.vllm.settings.VllmSettingsError: MOESCOPE_VLLM_PROMETHEUS_PORT='abc' "
        "is not a port number: set an integer in 0..65535 (0 = any free port) or unset it"
    ), log[-3000:]
    assert "Loading weights" not in log and "EngineCore" not in log


CHECK_SETTINGS = """
import json, os, sys
from vllm.engine.arg_utils import EngineArgs
import moescope.integrations.vllm as mv
out = {}
for case, env in json.loads(sys.argv[2]).items():
    for k in [k for k in os.environ if k.startswith("MOESCOPE_VLLM")]:
        del os.environ[k]
    os.environ.update(env)
    try:
        mv.plugin()  # what vLLM's plugin loader runs first in every process
        EngineArgs(model=sys.argv[1], max_model_len=512, dtype="float32").create_engine_config()
        out[case] = "started"
    except mv.VllmSettingsError as err:
        out[case] = str(err)
print("RESULT " + json.dumps(out))
"""


def test_bad_settings_fail_when_vllm_builds_the_engine_config(
    served_model: Path, tmp_path: Path
) -> None:
    """Every bad setting fails in the front end, where vLLM builds the engine config
    (before any engine process or weight load), in one line naming the setting."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    cases = {
        "port_busy": {"MOESCOPE_VLLM": "1", "MOESCOPE_VLLM_PROMETHEUS_PORT": str(port)},
        "jsonl_unwritable": {
            "MOESCOPE_VLLM": "yes",
            "MOESCOPE_VLLM_JSONL": str(blocker / "routing.jsonl"),
        },
        "bool_typo": {"MOESCOPE_VLLM": "1", "MOESCOPE_VLLM_COUNTS_ONLY": "enable"},
        "json_option": {"MOESCOPE_VLLM": '{"interval": -1}'},
        "fine": {"MOESCOPE_VLLM": "ON", "MOESCOPE_VLLM_COUNTS_ONLY": "off"},
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHECK_SETTINGS, str(served_model), json.dumps(cases)],
            env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        busy.close()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["port_busy"] == (
        f"moescope: cannot serve Prometheus metrics on 127.0.0.1:{port} set by "
        "MOESCOPE_VLLM_PROMETHEUS_PORT (Address already in use); pick a free port, or 0 "
        "for any free port"
    )
    assert got["jsonl_unwritable"].startswith(
        f"moescope: cannot write the JSONL log {blocker / 'routing.jsonl'} set by "
        "MOESCOPE_VLLM_JSONL ("
    )
    assert got["bool_typo"] == (
        "MOESCOPE_VLLM_COUNTS_ONLY='enable' is not a boolean: set 1/0, true/false, yes/no or on/off"
    )
    assert got["json_option"].startswith("MOESCOPE_VLLM: interval must be a positive number")
    assert got["fine"] == "started"


def test_clean_shutdown_writes_the_open_window(served_model: Path, tmp_path: Path) -> None:
    """SIGINT to the API server: the one open window (interval 600 s) reaches the JSONL
    log, as a 'serve' line, with every routed token; COUNTS_ONLY=on is honoured. The
    request reaches the token trace stream and the request summaries too (written when
    the worker learns it finished, or at the shutdown flush)."""
    import signal

    from moescope.trace import RoutingTrace

    jsonl = tmp_path / "routing.jsonl"
    trace_path = tmp_path / "trace.jsonl"
    api = _free_port()
    env = _env()
    env.update(
        MOESCOPE_VLLM="1",
        MOESCOPE_VLLM_JSONL=str(jsonl),
        MOESCOPE_VLLM_INTERVAL="600",
        MOESCOPE_VLLM_COUNTS_ONLY="on",
        MOESCOPE_VLLM_TRACE=str(trace_path),
        MOESCOPE_VLLM_REQUEST_SUMMARIES="5",
    )
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [*SERVE, "--model", str(served_model), "--port", str(api)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_healthy(proc, api, tmp_path / "server.log")
        fed = _complete(api, served_model, _prompts()[1])
        # The window is still open: no window line yet (a request summary may be there).
        assert not jsonl.exists() or all(ln["kind"] == "request" for ln in read_jsonl(jsonl))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    lines = read_jsonl(jsonl)
    assert [ln["kind"] for ln in lines] == ["request", "metrics", "snapshot"], lines
    assert {ln["mode"] for ln in lines} == {"serve"}
    assert lines[0]["tokens"] == fed
    lines = lines[1:]
    assert lines[0]["metrics"]["vllm/routed_tokens"] == fed
    assert lines[0]["metrics"]["vllm/requests_finished"] == 1
    trace = RoutingTrace.load(trace_path)
    assert len(trace) == 1 and trace.seq_ids[0].startswith("cmpl-")
    routed = (trace[0].topk_ids >= 0).all(-1)
    assert routed.shape == (2, fed + 1) and routed.sum() == 2 * fed
    layers = lines[1]["snapshot"]["layers"]
    assert len(layers) == 2
    for layer in layers.values():
        assert layer["num_tokens"] == fed
        assert sum(layer["usage_counts"]) == 2 * fed
        assert layer["routing_entropy"] is None  # counts only
