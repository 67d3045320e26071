"""Config loading: YAML + overrides, strict keys and types."""

from __future__ import annotations

import pytest

from layerwise.config import RunConfig, resolve
from layerwise.errors import ConfigError
from layerwise.schema import build, load_yaml, parse_override


def test_defaults_are_lift_on_minilm_rotten_tomatoes():
    cfg, mcfg = resolve({})
    assert cfg.model == "minilm" and cfg.data.source == "rotten_tomatoes" and mcfg.name == "lift"


def test_override_parsing():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("method.layers=[1, 2]") == (["method", "layers"], [1, 2])
    assert parse_override("train.bf16=true") == (["train", "bf16"], True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"trian": {}}, "unknown config key 'trian'"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"max_steps": 1.5}}, "train.max_steps"),
        ({"train": {"bf16": "yes"}}, "true or false"),
        ({"train": {"optimizer_state": "forget"}}, "reset, keep"),
        ({"data": {"colour": 1}}, "data.colour"),
        ({"method": {"name": "lift", "foo": 1}}, "method.foo"),
    ],
)
def test_strict_config_errors(raw, needle):
    with pytest.raises(ConfigError) as exc:
        resolve(raw)
    assert needle in str(exc.value)


def test_int_stays_int_in_union():
    cfg = build(RunConfig, {"data": {"eval_size": 1000}})
    assert cfg.data.eval_size == 1000 and isinstance(cfg.data.eval_size, int)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(bad)


def test_each_method_trains_at_its_own_default_lr_unless_one_is_given():
    from layerwise.methods import METHODS

    builtin = {name: cls for name, cls in METHODS.items() if cls.__module__.startswith("layerwise.")}
    assert len(builtin) >= 8
    for name, cls in builtin.items():
        method = {"name": name, **cls.stated_defaults(6, with_data=False, given={})}
        cfg, mcfg = resolve({"method": method})
        assert cfg.train.lr == cls.Config.default_lr > 0  # declared by every method layerwise ships
        assert resolve({"method": method, "train": {"lr": 0.0123}})[0].train.lr == 0.0123


def test_a_method_config_without_a_default_lr_trains_at_the_fallback():
    from layerwise.methods.base import FALLBACK_LR, default_lr

    class PluginConfig:
        name = "plugin"

    assert default_lr(PluginConfig()) == FALLBACK_LR
