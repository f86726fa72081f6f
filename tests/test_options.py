"""MoECallbackOptions: one frozen, validated options object behind every training
integration; the seed factories keep the seeds' exact signatures and map every argument
onto it."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from moescope import MoECallbackOptions, create_moe_callback_for_pytorch
from moescope.alerts import AlertRules
from moescope.integrations.core import TrainingSession
from moescope.integrations.options import factory_options
from moescope.nn.model import TinyMoEConfig, TinyMoELM

# The seed guide's (../shared/seeds/001) arguments: names, order and defaults, then the
# keyword-only extras moescope added. Pinned: a change here breaks users' calls.
SEED_TRANSFORMERS = [
    ("log_every_n_steps", 50), ("logger", None), ("log_to_console", True),
    ("log_heatmap_every", 500), ("alert_threshold_imbalance", 4.0),
    ("unused_expert_threshold", 0.25), ("entropy_threshold", 0.1),
    ("save_detailed_logs", False),
    ("log_dir", None), ("on_alert", None), ("stop_on_alert", False), ("track_eval", True),
    ("per_layer", "auto"), ("layer_metrics", None), ("report_to_trainer", None),
    ("alert_rules", None), ("monitor_kwargs", None),
]  # fmt: skip
SEED_PYTORCH = [
    ("model", inspect.Parameter.empty), ("log_every_n_steps", 100), ("logger", None),
    ("log_to_console", True), ("log_heatmap_every", 500),
    ("alert_threshold_imbalance", 4.0), ("unused_expert_threshold", 0.25),
    ("entropy_threshold", 0.1), ("save_detailed_logs", False),
    ("log_dir", "moe_logs"), ("on_alert", None), ("stop_on_alert", False),
    ("track_eval", True), ("per_layer", "auto"), ("layer_metrics", None),
    ("alert_rules", None), ("monitor_kwargs", None),
]  # fmt: skip
_POSITIONAL = 8  # the seed's eight arguments stay positional; the extras are keyword-only

FIELDS = [f.name for f in dataclasses.fields(MoECallbackOptions)]


def _signature(fn) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def _tiny() -> TinyMoELM:
    torch.manual_seed(0)
    return TinyMoELM(
        TinyMoEConfig(
            vocab_size=32,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            intermediate_size=8,
            num_experts=4,
            top_k=2,
            max_seq_len=16,
        )
    )


def test_factories_keep_the_seed_signatures() -> None:
    pytest.importorskip("transformers")
    from moescope import create_moe_callback_for_transformers

    assert _signature(create_moe_callback_for_transformers) == SEED_TRANSFORMERS
    assert _signature(create_moe_callback_for_pytorch) == SEED_PYTORCH
    for fn, first_kw in (
        (create_moe_callback_for_transformers, _POSITIONAL),
        (create_moe_callback_for_pytorch, _POSITIONAL + 1),
    ):
        kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
        assert set(kinds[:first_kw]) == {inspect.Parameter.POSITIONAL_OR_KEYWORD}
        assert set(kinds[first_kw:]) == {inspect.Parameter.KEYWORD_ONLY}
    # Every factory argument is an options field or one of the factory's own: none is
    # dropped silently by factory_options.
    own = {"model", "report_to_trainer"}
    for sig in (SEED_TRANSFORMERS, SEED_PYTORCH):
        assert {n for n, _ in sig} - own <= set(FIELDS)
    # The option defaults are the seeds' (the plain-loop factory's 100 steps and
    # "moe_logs" are its own documented defaults).
    defaults = MoECallbackOptions()
    for name, value in SEED_TRANSFORMERS:
        if name in FIELDS:
            want = {} if name == "monitor_kwargs" else value
            assert getattr(defaults, name) == want, name


def test_every_factory_argument_lands_in_the_options(tmp_path: Path) -> None:
    rules = AlertRules(imbalance_threshold=9.0)
    seen: list[object] = []
    given = dict(
        log_every_n_steps=7, logger=[], log_to_console=False, log_heatmap_every=0,
        alert_threshold_imbalance=3, unused_expert_threshold=0.5, entropy_threshold=0.2,
        save_detailed_logs=True, log_dir=str(tmp_path), on_alert=seen.append,
        stop_on_alert=True, track_eval=False, per_layer=False, layer_metrics=["cv"],
        alert_rules=rules, monitor_kwargs={"history": 5},
    )  # fmt: skip
    cb = create_moe_callback_for_pytorch(_tiny(), **given)
    opts = cb.session.options
    normalised = {"log_heatmap_every": None, "alert_threshold_imbalance": 3.0,
                  "layer_metrics": ("cv",)}  # fmt: skip
    for name, value in given.items():
        assert getattr(opts, name) == normalised.get(name, value), name
    assert opts.prefix == "moe"  # not a factory argument: the option's default
    # The session and its monitor use them.
    assert cb.session.log_every_n_steps == 7 and cb.monitor.history.maxlen == 5
    assert cb.session.alert_rules.imbalance_threshold == 9.0
    cb.cleanup()

    pytest.importorskip("transformers")
    from moescope import create_moe_callback_for_transformers

    tcb = create_moe_callback_for_transformers(
        None, log_to_console=False, report_to_trainer=True, layer_metrics=("cv", "aux_loss")
    )
    assert tcb.follow_trainer_logging and tcb.session.log_every_n_steps is None
    assert tcb.report_to_trainer and tcb.session.options.layer_metrics == ("cv", "aux_loss")
    assert factory_options({"model": None, "report_to_trainer": False, "prefix": "x"}) == (
        MoECallbackOptions(prefix="x")
    )


def test_validation_names_the_field_and_what_to_pass() -> None:
    cases = [
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps must be an int >= 1"),
        ({"log_every_n_steps": True}, ValueError, "log_every_n_steps"),
        ({"log_heatmap_every": -5}, ValueError, "log_heatmap_every"),
        ({"entropy_threshold": float("nan")}, ValueError, "entropy_threshold must be a finite"),
        ({"alert_threshold_imbalance": "4"}, ValueError, "alert_threshold_imbalance"),
        ({"layer_metrics": ["cv", "nope"]}, ValueError, r"unknown layer_metrics \['nope'\]"),
        ({"layer_metrics": "cv"}, TypeError, r"pass \['cv'\]"),
        ({"on_alert": 3}, TypeError, "on_alert must be callable"),
        ({"alert_rules": {"x": 1}}, TypeError, "AlertRules"),
        ({"prefix": None}, TypeError, "prefix"),
        ({"log_dir": 5}, TypeError, "log_dir"),
        ({"monitor_kwargs": [1]}, TypeError, "monitor_kwargs must be a dict"),
        ({"monitor_kwargs": {"attach": True}}, ValueError, r"may not set \['attach'\]"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            MoECallbackOptions(**kw)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['log_every'\]"):
        TrainingSession(log_every=3)
    with pytest.raises(TypeError, match="MoECallbackOptions"):
        TrainingSession(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plain loop"):
        create_moe_callback_for_pytorch(_tiny(), log_every_n_steps=None)  # type: ignore[arg-type]


def test_frozen_reusable_and_derived_with_replace() -> None:
    kw = {"history": 3}
    on_rules: list[object] = []
    rules = AlertRules(entropy_threshold=100.0, on_alert=on_rules.append)
    opts = MoECallbackOptions(
        log_every_n_steps=2,
        log_to_console=False,
        log_heatmap_every=None,
        monitor_kwargs=kw,
        alert_rules=rules,
    )
    kw["history"] = 99  # the options took a copy
    assert opts.monitor_kwargs == {"history": 3}
    with pytest.raises(TypeError):
        opts.monitor_kwargs["history"] = 4  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.log_every_n_steps = 3  # type: ignore[misc]
    other = opts.replace(per_layer=False)
    assert other.per_layer is False and opts.per_layer == "auto"
    assert other.monitor_kwargs == {"history": 3}
    with pytest.raises(ValueError, match="log_every_n_steps"):
        opts.replace(log_every_n_steps=-1)
    with pytest.raises(TypeError, match="unknown option"):
        opts.replace(nope=1)

    # One options object, two runs: the first session does not consume the AlertRules'
    # own callback (it moves it after the sinks on a copy).
    model = _tiny()
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(2):
        session = TrainingSession(opts, per_layer=False)
        assert session.options == opts.replace(per_layer=False)
        session.attach(model)
        model(ids)
        session.end_train_window(1)
        session.close()
    assert rules.on_alert is not None
    assert len(on_rules) == 2 * 2  # one entropy alert per layer, per run


def test_lightning_callback_takes_options_or_the_same_keywords() -> None:
    pytest.importorskip("lightning.pytorch")
    from moescope import MoELightningCallback

    opts = MoECallbackOptions(log_every_n_steps=3, log_to_console=False)
    a = MoELightningCallback(opts, module="model")
    b = MoELightningCallback(log_every_n_steps=3, log_to_console=False, module="model")
    assert a.session.options == b.session.options == opts
    assert MoELightningCallback(opts, per_layer=False).session.options == opts.replace(
        per_layer=False
    )
    with pytest.raises(TypeError, match="MoECallbackOptions"):
        MoELightningCallback(50)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Lightning"):
        MoELightningCallback(log_every_n_steps=None)


def test_factory_defaults_are_the_option_defaults() -> None:
    """Each default is written once, in MoECallbackOptions: the factories' signatures
    take theirs from ``DEFAULTS`` (the plain-loop factory's own log_every_n_steps=100 and
    log_dir="moe_logs" aside; layer_metrics / monitor_kwargs None mean the field's)."""
    pytest.importorskip("transformers")
    from moescope import create_moe_callback_for_transformers
    from moescope.integrations.options import DEFAULTS

    own = {"model", "report_to_trainer", "layer_metrics", "monitor_kwargs"}
    for fn, its_own in (
        (create_moe_callback_for_transformers, set()),
        (create_moe_callback_for_pytorch, {"log_every_n_steps", "log_dir"}),
    ):
        for name, p in inspect.signature(fn).parameters.items():
            if name in own or name in its_own:
                continue
            assert p.default is getattr(DEFAULTS, name), (fn.__name__, name)
