"""moescope.serve.PrometheusExporter: scraped over HTTP on 127.0.0.1 while another thread
runs ``generate()``; counts checked against an independent hook on the experts modules."""

from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("prometheus_client")
transformers = pytest.importorskip("transformers")

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hf_tiny import EXPERTS, TOP_K, VOCAB, build_tiny, experts_modules  # noqa: E402
from moescope import MoEMonitor  # noqa: E402
from moescope.serve import (  # noqa: E402
    DEFAULT_BALANCEDNESS_BUCKETS,
    DEFAULT_LOAD_QUANTILES,
    PrometheusExporter,
)

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]

#: family name (as the parser reports it) -> label names of its samples.
EXPECTED_FAMILIES: dict[str, tuple[str, ...]] = {
    "moescope_expert_tokens": ("layer", "expert"),
    "moescope_expert_load_fraction": ("layer", "expert"),
    "moescope_layer_balancedness": ("layer",),
    "moescope_layer_max_over_mean": ("layer",),
    "moescope_layer_balancedness_window": ("layer",),
    "moescope_layer_routing_entropy": ("layer",),
    "moescope_layer_unique_experts": ("layer",),
    "moescope_layer_unique_experts_max": ("layer",),
    "moescope_layer_window_tokens": ("layer",),
    "moescope_tokens": ("layer",),
    "moescope_layer_forwards": ("layer",),
    "moescope_nonfinite_router_rows": ("layer",),
    "moescope_snapshots": (),
    "moescope_refresh_errors": (),
    "moescope_snapshot_timestamp_seconds": (),
}
FAMILY_TYPES = {
    "moescope_expert_tokens": "counter",
    "moescope_expert_load_fraction": "gauge",
    "moescope_layer_balancedness_window": "histogram",
    "moescope_tokens": "counter",
    "moescope_layer_neuron_sparsity": "gauge",
}


def _parse(text: str) -> tuple[Samples, dict[str, Any]]:
    samples: Samples = {}
    families: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = fam
        for s in fam.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples, families


def _scrape(url: str) -> tuple[Samples, dict[str, Any]]:
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return _parse(resp.read().decode("utf-8"))


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def _expert_count_hooks(model: torch.nn.Module) -> tuple[dict[str, np.ndarray], Callable[[], None]]:
    """Independent reference: per block path, the expert ids the fused experts module
    received (``experts(hidden, top_k_index, top_k_weights)``), counted in the test."""
    counts = {path: np.zeros(EXPERTS, dtype=np.int64) for path in experts_modules(model)}
    handles = []
    for path, mod in experts_modules(model).items():

        def hook(m: torch.nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            idx = args[1].reshape(-1).numpy()
            counts[path] += np.bincount(idx, minlength=EXPERTS)

        handles.append(mod.register_forward_pre_hook(hook))
    return counts, lambda: [h.remove() for h in handles]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def mixtral() -> torch.nn.Module:
    model, _ = build_tiny("mixtral")
    return model


def test_scrape_while_generate_runs_in_another_thread(mixtral: torch.nn.Module) -> None:
    model = mixtral
    ref_counts, remove_ref = _expert_count_hooks(model)
    mon = MoEMonitor(model)
    layers = [info.path for info in mon.layers]
    assert sorted(layers) == sorted(ref_counts)
    hooks_before = _hook_count(model)
    # Every window the exporter closes, recorded on the test side.
    windows: list[Any] = []
    snapshot = mon.snapshot

    def recording_snapshot(*args: Any, **kwargs: Any) -> Any:
        snap = snapshot(*args, **kwargs)
        windows.append(snap)
        return snap

    mon.snapshot = recording_snapshot  # type: ignore[method-assign]

    exporter = PrometheusExporter(mon, port=0, interval=0.2, per_expert=True)
    assert exporter.host == "127.0.0.1"
    errors: list[BaseException] = []
    done = threading.Event()
    n_generates = [0]

    def generate_loop() -> None:
        # Bounded by both an iteration count and a wall-clock budget; stops by itself.
        gen = torch.Generator().manual_seed(1)
        deadline = time.monotonic() + 3.0
        try:
            for _ in range(200):
                if time.monotonic() > deadline:
                    break
                ids = torch.randint(3, VOCAB, (2, 5), generator=gen)
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                    min_new_tokens=6, do_sample=False, pad_token_id=0,
                )  # fmt: skip
                n_generates[0] += 1
        except BaseException as err:  # surfaced in the main thread
            errors.append(err)
        finally:
            done.set()

    scrapes: list[Samples] = []
    with exporter:
        assert exporter.running
        assert exporter.port > 0
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        assert _hook_count(model) > hooks_before  # the forward lock is installed
        worker = threading.Thread(target=generate_loop, daemon=True)
        worker.start()
        for _ in range(40):
            if done.is_set():
                break
            time.sleep(0.25)
            scrapes.append(_scrape(exporter.url)[0])
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert not errors, errors
        during = len(scrapes)  # scraped while generate() ran
        exporter.refresh()  # close the last window
        last_http, families = _scrape(exporter.url)
        scrapes.append(last_http)
        port = exporter.port
    # Read after stop(): no timer refresh can be half-way between the monitor's snapshot
    # and the exporter's counters (a scrape may see that, it only lags by one window).
    final, _ = _parse(generate_latest(exporter.registry).decode())

    # stop() freed the port, removed the forward-lock hooks and the server answers no more.
    assert not exporter.running
    assert _port_is_free(port)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert _hook_count(model) == hooks_before
    remove_ref()
    mon.detach()

    assert n_generates[0] >= 3
    assert len(scrapes) >= 4

    # Every family, with the right type and labels, for every MoE layer (and expert).
    for name, labels in EXPECTED_FAMILIES.items():
        assert name in families, name
        fam = families[name]
        if name in FAMILY_TYPES:
            assert fam.type == FAMILY_TYPES[name]
        seen = {frozenset(s.labels) - {"le"} for s in fam.samples}
        assert seen == {frozenset(labels)}, (name, seen)
        if "layer" in labels:
            assert {s.labels["layer"] for s in fam.samples} == set(layers), name
        if "expert" in labels:
            for layer in layers:
                got = {s.labels["expert"] for s in fam.samples if s.labels["layer"] == layer}
                assert got == {str(e) for e in range(EXPERTS)}
    # Neurons off: the family is declared but holds no sample.
    assert families["moescope_layer_neuron_sparsity"].samples == []

    # Counters equal the independent per-expert count of what the experts received.
    for layer in layers:
        got = np.array(
            [_get(final, "moescope_expert_tokens_total", layer=layer, expert=str(e))
             for e in range(EXPERTS)]
        )  # fmt: skip
        np.testing.assert_array_equal(got, ref_counts[layer])
        tokens = _get(final, "moescope_tokens_total", layer=layer)
        assert got.sum() == TOP_K * tokens == ref_counts[layer].sum()
        # Prefill (2 x 5) + 5 decode steps of 2 rows per generate.
        assert tokens == n_generates[0] * (2 * 5 + 2 * 5)
        assert _get(final, "moescope_layer_forwards_total", layer=layer) == 6 * n_generates[0]
        assert _get(final, "moescope_nonfinite_router_rows_total", layer=layer) == 0

    # Counters never go down; values change between scrapes while generation runs.
    series = [*scrapes, final]
    assert len(series) >= 5
    for layer in layers:
        toks = [_get(s, "moescope_tokens_total", layer=layer) for s in series]
        assert all(b >= a for a, b in itertools.pairwise(toks))
        assert len(set(toks[:during])) >= 2, toks
    stamps = [_get(s, "moescope_snapshot_timestamp_seconds") for s in series]
    assert all(b >= a for a, b in itertools.pairwise(stamps))
    assert len(set(stamps)) >= 2
    fractions_seen = {
        tuple(_get(s, "moescope_expert_load_fraction", layer=layers[0], expert=str(e))
              for e in range(EXPERTS))
        for s in series[:during]
    }  # fmt: skip
    assert len(fractions_seen) >= 2

    # Load fractions sum to 1 per layer in every scrape that has seen tokens.
    for s in series:
        for layer in layers:
            fr = [_get(s, "moescope_expert_load_fraction", layer=layer, expert=str(e))
                  for e in range(EXPERTS)]  # fmt: skip
            if _get(s, "moescope_tokens_total", layer=layer) > 0:
                assert math.fsum(fr) == pytest.approx(1.0, abs=1e-12)
            else:
                assert all(math.isnan(f) for f in fr)

    # Gauges and the histogram against a float64 recomputation from the windows' counts.
    for layer in layers:
        nonempty = [w.layers[layer] for w in windows if w.layers[layer].num_tokens > 0]
        assert nonempty
        last = nonempty[-1]
        c = last.usage_counts.astype(np.float64)
        bal = c.mean() / c.max()
        assert _get(final, "moescope_layer_balancedness", layer=layer) == pytest.approx(
            bal, rel=1e-12
        )
        assert 1 / EXPERTS <= bal <= 1
        np.testing.assert_allclose(
            [_get(final, "moescope_expert_load_fraction", layer=layer, expert=str(e))
             for e in range(EXPERTS)],
            c / c.sum(), rtol=1e-12,
        )  # fmt: skip
        uniq = _get(final, "moescope_layer_unique_experts", layer=layer)
        assert 1 <= uniq <= _get(final, "moescope_layer_unique_experts_max", layer=layer) <= EXPERTS
        assert 0 < _get(final, "moescope_layer_routing_entropy", layer=layer) <= math.log(EXPERTS)
        # Histogram: one observation per non-empty window, cumulative buckets.
        bals = np.array([w.usage_counts.mean() / w.usage_counts.max() for w in nonempty])
        for b in DEFAULT_BALANCEDNESS_BUCKETS:
            got = _get(final, "moescope_layer_balancedness_window_bucket", layer=layer, le=repr(b))
            assert got == int((bals <= b).sum()), b
        assert _get(final, "moescope_layer_balancedness_window_count", layer=layer) == len(bals)
        assert _get(final, "moescope_layer_balancedness_window_sum", layer=layer) == pytest.approx(
            bals.sum(), rel=1e-12
        )
    assert _get(final, "moescope_snapshots_total") == len(windows)
    assert _get(final, "moescope_refresh_errors_total") == 0


def test_snapshot_waits_for_a_running_forward_and_loses_no_count(
    mixtral: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unguarded, a layer call landing between the snapshot's copy of the sums and its
    # reset() is zeroed unreported. Hold the snapshot inside its host transfer and run
    # a forward in a third thread: it must wait, and its tokens land in the next window.
    model = mixtral
    mon = MoEMonitor(model)
    exporter = PrometheusExporter(mon, port=0, interval=None)
    entered, release = threading.Event(), threading.Event()
    import moescope.core

    to_host = moescope.core.host_copy

    def slow_to_host(states: Any) -> Any:
        entered.set()
        assert release.wait(10)
        return to_host(states)

    monkeypatch.setattr(moescope.core, "host_copy", slow_to_host)
    ids = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    with exporter:
        snapper = threading.Thread(target=exporter.refresh, daemon=True)
        snapper.start()
        assert entered.wait(10)
        forward = threading.Thread(target=lambda: model(ids), daemon=True)
        forward.start()
        forward.join(0.3)
        assert forward.is_alive(), "the forward ran while a snapshot held the window open"
        release.set()
        snapper.join(10)
        forward.join(10)
        assert not snapper.is_alive() and not forward.is_alive()
        second = exporter.refresh()
        samples, _ = _parse(generate_latest(exporter.registry).decode())
    mon.detach()
    for path, st in second.layers.items():
        assert st.num_tokens == 12
        assert _get(samples, "moescope_tokens_total", layer=path) == 12
        assert _get(samples, "moescope_layer_window_tokens", layer=path) == 12


def test_idle_window_keeps_gauges_and_counters(mixtral: torch.nn.Module) -> None:
    mon = MoEMonitor(mixtral)
    exporter = PrometheusExporter(mon, port=0, interval=None)
    before, _ = _parse(generate_latest(exporter.registry).decode())
    layer = mon.layers[0].path
    assert math.isnan(_get(before, "moescope_layer_balancedness", layer=layer))
    assert _get(before, "moescope_tokens_total", layer=layer) == 0
    assert _get(before, "moescope_snapshot_timestamp_seconds") == 0
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mixtral(ids)
    exporter.refresh()
    busy, _ = _parse(generate_latest(exporter.registry).decode())
    exporter.refresh()  # nothing ran: an empty window
    idle, _ = _parse(generate_latest(exporter.registry).decode())
    mon.detach()
    assert _get(busy, "moescope_layer_window_tokens", layer=layer) == 12
    assert _get(idle, "moescope_layer_window_tokens", layer=layer) == 0
    for name in ("moescope_layer_balancedness", "moescope_layer_routing_entropy",
                 "moescope_tokens_total", "moescope_layer_balancedness_window_count"):  # fmt: skip
        assert _get(idle, name, layer=layer) == _get(busy, name, layer=layer), name
    assert _get(idle, "moescope_snapshots_total") == 2


def test_neuron_sparsity_is_exported_when_the_monitor_counts_neurons(
    mixtral: torch.nn.Module,
) -> None:
    mon = MoEMonitor(mixtral, neurons=True)
    exporter = PrometheusExporter(mon, port=0, interval=None)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    mixtral(ids)
    snap = exporter.refresh()
    mon.detach()
    samples, families = _parse(generate_latest(exporter.registry).decode())
    assert families["moescope_layer_neuron_sparsity"].type == "gauge"
    for path, st in snap.layers.items():
        got = _get(samples, "moescope_layer_neuron_sparsity", layer=path)
        # Independent of the exporter: 1 - mean activated / I from the snapshot's fields.
        expected = 1 - st.activated_neurons_mean / st.intermediate_size
        assert got == pytest.approx(expected, rel=1e-9)
        assert 0 <= got <= 1


def test_timer_refresh_errors_are_counted_and_the_endpoint_survives(
    mixtral: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mon = MoEMonitor(mixtral)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(mon, "snapshot", broken)
    with caplog.at_level(logging.ERROR, logger="moescope.serve"):
        with PrometheusExporter(mon, port=0, interval=0.05) as exporter:
            for _ in range(100):
                time.sleep(0.05)
                samples, _ = _scrape(exporter.url)
                if _get(samples, "moescope_refresh_errors_total") >= 2:
                    break
    mon.detach()
    assert _get(samples, "moescope_refresh_errors_total") >= 2
    assert "refresh failed" in caplog.text


def test_exporters_coexist_and_bad_arguments_say_what_to_do(mixtral: torch.nn.Module) -> None:
    mon = MoEMonitor(mixtral)
    with pytest.raises(ValueError, match="port"):
        PrometheusExporter(mon, port=70000)
    with pytest.raises(ValueError, match="interval"):
        PrometheusExporter(mon, port=0, interval=0)
    with pytest.raises(ValueError, match="increasing"):
        PrometheusExporter(mon, port=0, balancedness_buckets=[0.5, 0.2])
    with pytest.raises(TypeError, match="MoEMonitor"):
        PrometheusExporter(mixtral, port=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_experts"):
        PrometheusExporter(mon, port=0, top_experts=-1)
    with pytest.raises(ValueError, match="load_quantiles"):
        PrometheusExporter(mon, port=0, load_quantiles=[0.5, 1.5])
    a = PrometheusExporter(mon, port=0, interval=None)
    b = PrometheusExporter(mon, port=0, interval=None)
    assert a.registry is not b.registry
    with a, b:
        assert a.port != b.port
        with pytest.raises(RuntimeError, match="already serving"):
            a.start()
        taken = PrometheusExporter(mon, port=a.port, interval=None)
        with pytest.raises(OSError):
            taken.start()
        assert not taken.running
        for exp in (a, b):
            samples, _ = _scrape(exp.url)
            assert _get(samples, "moescope_snapshots_total") == 0
    a.stop()  # idempotent
    mon.detach()
    assert "stopped" in repr(a)


def test_default_export_is_bounded_quantiles_and_top_bottom_experts(
    mixtral: torch.nn.Module,
) -> None:
    """Without per_expert, no (layer, expert) series is exported: per layer the load
    quantiles and the top / bottom experts of the window, equal to a float64
    recomputation from what the experts modules received (scraped over HTTP)."""
    ref_counts, remove_ref = _expert_count_hooks(mixtral)
    mon = MoEMonitor(mixtral)
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(5))
    with PrometheusExporter(mon, port=0, interval=None, top_experts=2) as exporter:
        mixtral(ids)
        exporter.refresh()
        samples, families = _scrape(exporter.url)
    remove_ref()
    mon.detach()
    assert "moescope_expert_tokens" not in families
    assert "moescope_expert_load_fraction" not in families
    n_layers = len(ref_counts)
    per_layer = {name: len(fam.samples) / n_layers for name, fam in families.items()
                 if fam.samples and "layer" in fam.samples[0].labels}  # fmt: skip
    assert per_layer["moescope_layer_expert_load_quantile"] == len(DEFAULT_LOAD_QUANTILES)
    assert per_layer["moescope_layer_top_expert_load_fraction"] == 2
    assert per_layer["moescope_layer_bottom_expert_load_fraction"] == 2
    for layer, counts in ref_counts.items():
        frac = counts / counts.sum()
        for q in DEFAULT_LOAD_QUANTILES:
            got = _get(
                samples, "moescope_layer_expert_load_quantile", layer=layer, quantile=repr(q)
            )
            assert got == pytest.approx(float(np.quantile(frac, q)), rel=1e-12), q
        order = sorted(range(EXPERTS), key=lambda e: (-counts[e], e))
        for rank, e in enumerate(order[:2], 1):
            got = _get(samples, "moescope_layer_top_expert_load_fraction",
                       layer=layer, rank=str(rank), expert=str(e))  # fmt: skip
            assert got == pytest.approx(frac[e], rel=1e-12)
        order = sorted(range(EXPERTS), key=lambda e: (counts[e], e))
        for rank, e in enumerate(order[:2], 1):
            got = _get(samples, "moescope_layer_bottom_expert_load_fraction",
                       layer=layer, rank=str(rank), expert=str(e))  # fmt: skip
            assert got == pytest.approx(frac[e], rel=1e-12)
