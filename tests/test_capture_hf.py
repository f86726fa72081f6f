"""The structural transformers adapter against 16 real transformers MoE families.

Every family is a tiny random model (tests/hf_tiny.py) run once on a padded batch. The
references are independent of moescope: the indices the ``experts`` module received
(captured by the test's own pre-hook), the model's own ``router_logits`` recomputed in
float64, and transformers' ``load_balancing_loss_func`` / ``outputs.aux_loss``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import (
    FAMILIES,
    SIGMOID_FAMILIES,
    build_tiny,
    experts_modules,
    padded_batch,
)
from moescope import MoEMonitor

# Families whose forward computes outputs.aux_loss with load_balancing_loss_func.
AUX_FAMILIES = {
    f
    for f in FAMILIES
    if hasattr(
        importlib.import_module(f"transformers.models.{f}.modeling_{f}"), "load_balancing_loss_func"
    )
}

_CACHE: dict[str, dict[str, Any]] = {}


def _run(family: str) -> dict[str, Any]:
    """One forward of the family's tiny model with the monitor and the test's own hooks."""
    if family in _CACHE:
        return _CACHE[family]
    model, cfg = build_tiny(family)
    ids, mask = padded_batch(batch=3, seq=6, seed=1)
    received: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, experts in experts_modules(model).items():

        def grab(mod: torch.nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            received.setdefault(path, []).append(args[1].detach().clone())

        handles.append(experts.register_forward_pre_hook(grab, with_kwargs=True))
    mon = MoEMonitor(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    snap = mon.snapshot()
    mon.detach()
    for h in handles:
        h.remove()
    res = dict(
        model=model, cfg=cfg, ids=ids, mask=mask, out=out, snap=snap, mon=mon, received=received
    )
    _CACHE[family] = res
    return res


def _probs64(logits: torch.Tensor, family: str) -> torch.Tensor:
    x = logits.double()
    if family in SIGMOID_FAMILIES:
        s = torch.sigmoid(x)
        return s / s.sum(-1, keepdim=True)
    return torch.softmax(x, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_found_by_structure(family: str) -> None:
    r = _run(family)
    expected = experts_modules(r["model"])
    assert [i.path for i in r["mon"].layers] == list(expected)
    for info in r["mon"].layers:
        assert info.adapter == "transformers.generic"
        assert (info.num_experts, info.top_k) == (8, 2)
        want = "sigmoid" if family in SIGMOID_FAMILIES else "softmax"
        assert info.score_fn == want


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_equal_experts_input_over_real_tokens(family: str) -> None:
    r = _run(family)
    valid = r["mask"].reshape(-1).bool()
    assert valid.sum() < valid.numel()  # the batch really is padded
    for path, calls in r["received"].items():
        assert len(calls) == 1
        idx = calls[0]
        want = torch.bincount(idx[valid].reshape(-1), minlength=8).numpy()
        st = r["snap"].layers[path]
        assert st.usage_counts.tolist() == want.tolist(), path
        assert st.num_tokens == int(valid.sum())
        assert st.usage_counts.sum() == int(valid.sum()) * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_entropy_z_and_aux_equal_float64_recomputation(family: str) -> None:
    r = _run(family)
    valid = r["mask"].reshape(-1).bool()
    logits_all = r["out"].router_logits
    paths = list(r["received"])
    assert len(logits_all) == len(paths)
    for path, logits in zip(paths, logits_all, strict=True):
        lg = logits.detach()[valid].double()
        p = _probs64(logits.detach()[valid], family)
        st = r["snap"].layers[path]
        entropy = (-(p * torch.log(p)).sum(-1)).mean().item()
        z = (torch.logsumexp(lg, -1) ** 2).mean().item()
        idx = r["received"][path][0][valid]
        f = torch.bincount(idx.reshape(-1), minlength=8).double() / valid.sum()
        aux = 8 * (f * p.mean(0)).sum().item()
        top = p.topk(2, -1).values
        assert st.routing_entropy == pytest.approx(entropy, rel=1e-6, abs=1e-9)
        assert st.routing_entropy_norm == pytest.approx(entropy / math.log(8), rel=1e-6)
        assert st.z_loss == pytest.approx(z, rel=1e-6)
        assert st.aux_loss == pytest.approx(aux, rel=1e-6)
        assert st.top1_prob == pytest.approx(top[:, 0].mean().item(), rel=1e-6)
        assert st.top1_margin == pytest.approx((top[:, 0] - top[:, 1]).mean().item(), rel=1e-5)


@pytest.mark.parametrize("family", sorted(AUX_FAMILIES))
def test_aux_loss_matches_transformers(family: str) -> None:
    """Per layer: transformers' own function on that layer alone. Model level: the
    relation of ``outputs.aux_loss`` to moescope's per-layer f and P."""
    r = _run(family)
    lbl = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    lbl = lbl.load_balancing_loss_func
    mask = r["mask"]
    valid = mask.reshape(-1).bool()
    fs, ps, per_layer = [], [], []
    for path, logits in zip(r["received"], r["out"].router_logits, strict=True):
        st = r["snap"].layers[path]
        hf_layer = lbl((logits.detach(),), 8, 2, mask).item()
        assert st.aux_loss == pytest.approx(hf_layer, rel=1e-6, abs=1e-6), path
        fs.append(torch.as_tensor(st.usage_counts, dtype=torch.float64) / st.num_tokens)
        ps.append(torch.softmax(logits.detach()[valid].double(), -1).mean(0))
        per_layer.append(st.aux_loss)
    # transformers averages f and P over layers BEFORE the product (not per-layer losses).
    model_level = 8 * (torch.stack(fs).mean(0) * torch.stack(ps).mean(0)).sum().item()
    assert r["out"].aux_loss.item() == pytest.approx(model_level, rel=1e-5)
    assert r["out"].aux_loss.item() != pytest.approx(sum(per_layer) / len(per_layer), rel=1e-9)


def test_aux_loss_enters_loss_times_coefficient() -> None:
    """``outputs.aux_loss`` is unscaled; ``loss`` adds ``router_aux_loss_coef * aux_loss``."""
    model, cfg = build_tiny("mixtral", router_aux_loss_coef=0.5)
    ids, mask = padded_batch(batch=2, seq=6, seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=labels)
        with_aux = model(
            input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True
        )
    assert ((with_aux.loss - plain.loss) / cfg.router_aux_loss_coef).item() == pytest.approx(
        with_aux.aux_loss.item(), rel=1e-5
    )


def test_generate_with_kv_cache_counts_each_real_position_once() -> None:
    model, _ = build_tiny("mixtral")
    ids, mask = padded_batch(batch=3, seq=6, seed=3, left=True)
    calls: list[int] = []
    experts = next(iter(experts_modules(model).values()))
    h = experts.register_forward_pre_hook(lambda m, a: calls.append(a[1].shape[0]))
    new = 4
    with MoEMonitor(model) as mon:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    h.remove()
    assert out.shape[1] == ids.shape[1] + new
    # Prefill over all B x S positions, then one position per row per decode step.
    assert calls == [3 * 6] + [3] * (new - 1)
    snap = mon.snapshot()
    expected = int(mask.sum()) + 3 * (new - 1)
    for st in snap.layers.values():
        assert st.num_tokens == expected
        assert int(st.usage_counts.sum()) == 2 * expected


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_each_forward_once(reentrant: bool) -> None:
    ids, mask = padded_batch(batch=2, seq=6, seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for ckpt in (False, True):
        model, _ = build_tiny("mixtral")
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        experts = next(iter(experts_modules(model).values()))
        calls: list[int] = []
        h = experts.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        mon = MoEMonitor(model)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        h.remove()
        mon.detach()
        results.append((len(calls), mon.snapshot()))
    (calls_plain, plain), (calls_ckpt, ckpt) = results
    assert calls_plain == 1 and calls_ckpt == 2  # the layer really was recomputed
    for path, st in plain.layers.items():
        assert ckpt.layers[path].usage_counts.tolist() == st.usage_counts.tolist()
        assert ckpt.layers[path].num_tokens == st.num_tokens == int(mask.sum())
        assert ckpt.layers[path].num_updates == st.num_updates == 1


def test_eager_experts_backend_gives_the_same_counts() -> None:
    """The hook sits on the experts module's inputs, so the backend does not matter."""
    r = _run("qwen3_moe")
    model, _ = build_tiny("qwen3_moe")
    model.set_experts_implementation("eager")
    with MoEMonitor(model) as mon, torch.no_grad():
        model(input_ids=r["ids"], attention_mask=r["mask"])
    snap = mon.snapshot()
    for path, st in r["snap"].layers.items():
        assert snap.layers[path].usage_counts.tolist() == st.usage_counts.tolist()
