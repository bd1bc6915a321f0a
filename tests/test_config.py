"""Config: validated at construction, loadable from TOML, one declaration per field."""

import dataclasses
import math

import pytest

from connserver import Config, ConfigError
from connserver.config import config_fields


def test_defaults_are_finite_and_safe():
    """Every timeout has a finite default except the explicitly unlimited lifetime."""
    config = Config()
    for name in ("idle_timeout", "read_timeout", "write_timeout", "handshake_timeout",
                 "graceful_timeout"):
        assert 0 < getattr(config, name) < math.inf
    assert config.backlog == 1024
    assert config.max_lifetime is None


@pytest.mark.parametrize("field, value", [
    ("idle_timeout", 0), ("idle_timeout", -1.0), ("read_timeout", float("nan")),
    ("write_timeout", float("inf")), ("max_connections", 0), ("max_connections", 1.5),
    ("on_limit", "queue"), ("backlog", "10"), ("tcp_keepalive", 1), ("idle_timeout", None),
    ("lifetime_jitter", 0.9), ("thread_stack_size", 1000), ("max_connections_per_ip", 0),
])
def test_bad_values_raise_config_error_naming_the_field(field, value):
    """A bad value stops construction with a ConfigError that names the field."""
    with pytest.raises(ConfigError) as info:
        Config(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_config_is_frozen_and_replace_validates():
    """Config cannot be mutated; replace() returns a validated copy."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.idle_timeout = 5  # type: ignore[misc]
    assert config.replace(idle_timeout=5).idle_timeout == 5
    with pytest.raises(ConfigError):
        config.replace(idle_timeout=-5)
    with pytest.raises(ConfigError) as info:
        config.replace(idle_timeot=5)
    assert info.value.field == "idle_timeot"


def test_from_toml_reads_keys_and_rejects_unknown_ones(tmp_path):
    """TOML keys are the field names (dashes allowed); unknown keys are errors."""
    good = tmp_path / "good.toml"
    good.write_text('idle-timeout = 12.5\n[server]\nmax_connections = 7\n')
    config = Config.from_toml(good)
    assert config.idle_timeout == 12.5 and config.max_connections == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("idle_timeout = 1\nmax_conections = 3\n")
    with pytest.raises(ConfigError, match="max_conections"):
        Config.from_toml(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("idle_timeout = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_toml(tmp_path / "missing.toml")


def test_every_field_has_help_and_a_kind():
    """The CLI and docs are generated from the declarations, so each must be complete."""
    for field, spec in config_fields():
        assert spec.help.strip(), field.name
        assert spec.kind in (int, float, bool, str, tuple), field.name
