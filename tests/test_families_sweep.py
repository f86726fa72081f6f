"""Every MoE family of the INSTALLED transformers, checked end to end (tests/hf_sweep.py).

Enumeration (``hf_sweep.moe_families``, read off the package, no hand-written list): a
folder of ``transformers/models`` with a ``modeling_*.py`` module that assigns
``self.experts`` (the experts container of an MoE block: fused experts, a
ModuleList/ModuleDict of experts, mixture-of-attention experts), or whose config class
declares a routed-expert count (``num_experts``, ``num_local_experts``,
``n_routed_experts``, ``moe_num_experts``: doge keeps its experts in embeddings).
Config-only aliases (no modeling module) are not separate architectures.

Each family: a tiny random model built from its config class (every size field shrunk,
every layer sparse, E = 8 routed experts, K = 2; the class a user would load: causal LM,
seq2seq, image-text-to-text head, else the base model), a right-padded batch, and:

1. found: the monitor's layers are exactly the blocks whose experts received a dispatch;
2. counted exactly: per layer, usage counts == the experts each experts module RECEIVED
   (a plain forward pre-hook; where the experts take no index, the family's own dispatch:
   see ``hf_sweep.ground_truth_hooks``) over real tokens only; ids >= E (zero-compute
   experts) in ``extra_slots``; E = the config's routed-expert count; a router whose
   first output is already a distribution is reported with ``score_fn="probs"``;
3. outputs bit-identical with and without the monitor;
4. no hook (and no instance attribute) left after ``detach``;
5. ``neurons=True``: finite statistics over exactly the kept rows of real tokens, or the
   layer named as unsupported (warning, or an error saying ``neurons=False``).

Families in ``hf_sweep.OUT_OF_SCOPE`` must instead make ``MoEMonitor`` raise a clear
``UnsupportedModelError``. ``EXEMPT`` below lists known problems outside the capture
adapters, each limited to the problems starting with its prefix, with the reason.

Fast enough to run unmarked: the whole sweep (76 families in transformers 5.24) takes
about 12 s in one process, 22 s with ``-n 2`` (worker start-up included), on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import hf_sweep
from moescope import MoEMonitor
from moescope.capture.adapter import CaptureContext
from moescope.capture.hf_structure import (
    block_token_mask,
    find_top_k,
    routed_experts,
    router_score_fn,
)

FAMILIES: tuple[str, ...] = hf_sweep.moe_families()

#: {family: (problem prefix, reason)}: problems of ``family`` starting with the prefix
#: are known and accepted; any other problem still fails.
EXEMPT: dict[str, tuple[str, str]] = {
    "nllb_moe": (
        "neurons:",
        "transformers' NllbMoeExperts one-hot encodes the already one-hot top1_mask, so it "
        "runs every token through expert_0 / expert_1 by mask VALUE (T x E rows); the "
        "neuron capture reports those rows as computed, the routing (checked) is the "
        "router's decision",
    ),
}


def _check(family: str) -> None:
    res = hf_sweep.check_family(family)
    prefix, reason = EXEMPT.get(family, ("\0", ""))
    problems = [p for p in res.problems if not p.startswith(prefix)]
    exempted = len(res.problems) - len(problems)
    print(
        f"{family}: {res.model_class}, {res.layers} layers {sorted(res.adapters)}, "
        f"dispatch {sorted(res.kinds)}, neurons {res.neurons}, {res.seconds:.1f} s"
        + (f", {exempted} exempt problems ({reason})" if exempted else "")
    )
    assert not problems, f"{family} fails:\n  " + "\n  ".join(problems)


def test_enumeration_reads_the_installed_package() -> None:
    import pathlib

    import transformers

    print(f"{len(FAMILIES)} MoE families in transformers {transformers.__version__}:")
    print(" ".join(FAMILIES))
    root = pathlib.Path(transformers.models.__file__).parent
    for family in ("mixtral", "qwen3_moe", "switch_transformers", "jetmoe", "doge", "dbrx"):
        if (root / family).is_dir():
            assert family in FAMILIES
    for dense in ("llama", "bert", "gpt2", "t5"):
        assert dense not in FAMILIES
    assert len(FAMILIES) == len(set(FAMILIES)) and list(FAMILIES) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family: str) -> None:
    _check(family)


def test_readme_lists_the_families_of_the_installed_transformers() -> None:
    """The README's list is the enumeration for the transformers version it names: equal
    on that version; on another one, every family found must be listed (a newer release's
    new family fails here, so the list and the adapters get looked at)."""
    import pathlib
    import re

    import transformers

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(
        r"<!-- families of transformers ([0-9.]+): begin -->(.*?)<!-- families: end -->",
        readme,
        re.S,
    )
    assert block, "README.md lost its family list markers"
    listed = {name.strip() for name in block.group(2).replace("\n", " ").split(",")}
    missing = sorted(set(FAMILIES) - listed)
    assert not missing, f"README does not list {missing} (transformers {transformers.__version__})"
    installed = ".".join(transformers.__version__.split(".")[:2])
    if installed == block.group(1):
        extra = sorted(listed - set(FAMILIES))
        assert not extra, f"README lists {extra}, which transformers {installed} does not have"


#: Families whose parameters ``count_parameters`` does not count, with the reason.
PARAMS_EXEMPT: dict[str, str] = {
    "vitpose_backbone": "task-indexed experts with no router: out of scope for capture too",
}

#: Families where what ONE token touches in a one-token forward is not what a token of a
#: real context uses, so the measured count differs from ``active_params`` in a known
#: direction: {family: ("<" measured below active, or ">" above, reason)}.
ACTIVE_EXEMPT: dict[str, tuple[str, str]] = {
    "deepseek_v4": (
        "<",
        "the attention's compressor runs only on contexts longer than its "
        "block, so a one-token context never reads it; a real context does",
    ),
    "qwen4_exp": (
        "<",
        "the sparse-attention indexer skips its key norm for a one-token "
        "context; a real context reads it",
    ),
    "inkling2_loop": (
        "<",
        "message_input.query is read for message inputs only, not for a text token",
    ),
    "jetmoe": (
        "<",
        "mixture-of-attention experts: with one token the attention output "
        "does not depend on the query, so the query experts get no gradient",
    ),
    "longcat_flash": (
        "<",
        "zero-compute experts: some of the K slots go to experts "
        "without weights; active_params counts K experts (measured_cost "
        "counts what tokens touched)",
    ),
    "diffusion_gemma": (
        ">",
        "block diffusion: the prompt token and the canvas token run "
        "through the same MoE layers, so one step touches up to 2K experts",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_counted_exactly_with_the_monitors_layers(family: str) -> None:
    """``count_parameters`` on the same tiny model: the total equals the model's own
    (tied matrices once), and it finds the MoE blocks the monitor finds."""
    from moescope import MoEMonitor, count_parameters

    built = hf_sweep.build_family(family)
    model = built.model
    if family in PARAMS_EXEMPT:
        with pytest.raises(ValueError):
            count_parameters(model)
        return
    report = count_parameters(model)
    unique = {id(p): p for p in model.parameters()}
    assert report.total_params == sum(p.numel() for p in unique.values())
    assert sum(report.breakdown.values()) == report.total_params
    assert sum(report.towers.values()) == report.total_params
    assert sum(report.active_breakdown.values()) == report.active_params
    assert report.num_moe_layers == len(MoEMonitor(model, attach=False).layers)
    # What `moescope params config.json` counts: the config's dict, built on meta as the
    # class its `architectures` names.
    data = {**built.config.to_dict(), "architectures": [type(model).__name__]}
    from_json = count_parameters(data)
    assert (from_json.total_params, from_json.active_params) == (
        report.total_params,
        report.active_params,
    )


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in PARAMS_EXEMPT])
def test_active_parameters_are_what_one_text_token_touches(family: str) -> None:
    """``active_params`` (embeddings "both") equals the parameters one text token used,
    measured on the model (``hf_sweep.touched_parameters``: expert rows by their
    gradients, every other tensor by whether the forward read it). Multimodal models:
    the towers a text token does not enter are not active, and the report says so."""
    from moescope import count_parameters

    built = hf_sweep.build_family(family)
    built.model.eval()
    report = count_parameters(built.model)
    measured, _ = hf_sweep.touched_parameters(built)
    towers = set(report.towers) - {"text"}
    assert report.active_path == ("text token" if towers else "token")
    if family in ACTIVE_EXEMPT:
        direction, reason = ACTIVE_EXEMPT[family]
        print(f"{family}: measured {measured}, active {report.active_params} ({reason})")
        assert (
            (measured < report.active_params)
            if direction == "<"
            else (measured > report.active_params)
        )
        return
    assert measured == report.active_params, (
        f"{family}: active_params {report.active_params}, one text token touched {measured}"
    )


# ----------------------------------------------------------------------------- details


def test_canvas_tokens_count_without_a_decoder_mask() -> None:
    """diffusion_gemma without ``decoder_attention_mask``: every canvas token counts
    (the prompt's padding mask is never applied to decoder blocks)."""
    if "diffusion_gemma" not in FAMILIES:
        pytest.skip("no diffusion_gemma in this transformers")
    b = hf_sweep.build_family("diffusion_gemma")
    inputs = {k: v for k, v in b.inputs.items() if k != "decoder_attention_mask"}
    canvas = inputs["decoder_input_ids"].numel()
    with MoEMonitor(b.model) as mon, torch.no_grad():
        b.model(**inputs)
    snap = mon.snapshot()
    dec = [p for p in snap.layers if ".decoder." in f".{p}."]
    enc = [p for p in snap.layers if ".encoder." in f".{p}."]
    assert dec and enc
    for p in dec:
        assert snap.layers[p].num_tokens == canvas
    for p in enc:
        assert snap.layers[p].num_tokens == int(b.inputs["attention_mask"].sum())


def test_zero_experts_are_extra_slots() -> None:
    """longcat_flash: E = routed experts only; identity (zero) experts land in
    ``extra_slots`` and every real token fills K slots."""
    if "longcat_flash" not in FAMILIES:
        pytest.skip("no longcat_flash in this transformers")
    b = hf_sweep.build_family("longcat_flash")
    with MoEMonitor(b.model) as mon, torch.no_grad():
        b.model(**b.inputs)
    snap = mon.snapshot()
    real = int(b.inputs["attention_mask"].sum())
    for info in mon.layers:
        st = snap.layers[info.path]
        assert info.num_experts == b.config.n_routed_experts
        assert len(st.usage_counts) == b.config.n_routed_experts
        assert int(st.usage_counts.sum()) + st.extra_slots == real * info.top_k
        assert st.extra_slots > 0  # 4 zero experts of 12 are picked by random routers


def test_structure_detector() -> None:
    from torch import nn

    class ProbsRouter(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            probs = torch.softmax(x, dim=-1)
            w, i = torch.topk(probs, 2)
            return probs, w, i

    class SigmoidRouter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e_score_correction_bias = torch.zeros(4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            s = x.sigmoid()
            w, i = torch.topk(s, 2)
            return x, w, i

    class SoftmaxBiasRouter(SigmoidRouter):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            s = x.softmax(dim=-1)
            w, i = torch.topk(s + self.e_score_correction_bias, 2)
            return x, w, i

    assert router_score_fn(ProbsRouter(), None) == "probs"
    assert router_score_fn(SigmoidRouter(), None) == "sigmoid"
    assert router_score_fn(SoftmaxBiasRouter(), None) == "softmax"

    class Cfg:
        scoring_func = "sigmoid"
        top_k_experts = 3

    assert router_score_fn(ProbsRouter(), Cfg()) == "sigmoid"
    assert find_top_k(nn.Module(), nn.Module(), Cfg()) == 3

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(12, 4, 2))  # E + Z rows
            self.down_proj = nn.Parameter(torch.zeros(8, 2, 2))  # E rows

    assert routed_experts(Experts()) == 8

    ctx = CaptureContext()
    ctx.attention_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert block_token_mask(ctx, "model.encoder.layers.0", 6).tolist() == [1, 1, 0, 1, 0, 0]
    assert block_token_mask(ctx, "model.decoder.layers.0", 4) is None
    ctx.decoder_attention_mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    assert block_token_mask(ctx, "model.decoder.layers.0", 4).tolist() == [True] * 4


def test_task_indexed_experts_raise_unless_a_user_adapter_takes_them() -> None:
    """vitpose_backbone: a clear UnsupportedModelError by default; an adapter the user
    registers (default priority) takes precedence over that check."""
    if "vitpose_backbone" not in FAMILIES:
        pytest.skip("no vitpose_backbone in this transformers")
    from moescope.capture import SimpleAdapter, register_adapter, unregister_adapter
    from moescope.errors import UnsupportedModelError

    b = hf_sweep.build_family("vitpose_backbone")
    with pytest.raises(UnsupportedModelError, match="task-indexed") as err:
        MoEMonitor(b.model)
    assert "encoder.layer.0.mlp" in str(err.value) and "register" in str(err.value)

    user = SimpleAdapter(
        match=lambda path, m: type(m).__name__ == "VitPoseBackboneMoeMLP",
        extract=lambda m, args, out: {"topk_index": args[1].reshape(-1, 1)},
        num_experts=lambda m: m.num_experts,
        top_k=1,
        target="experts",
        name="user_vitpose",
    )
    register_adapter(user)
    try:
        mon = MoEMonitor(b.model, attach=False)
    finally:
        unregister_adapter(user)
    assert {i.adapter for i in mon.layers} == {"user_vitpose"}
