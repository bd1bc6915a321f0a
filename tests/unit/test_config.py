"""Config: validated at construction, loadable from TOML, one declaration per field."""

import dataclasses
import math
import struct
import threading

import pytest

from connserver import Config, ConfigError
from connserver.config import (MAX_BACKLOG, MAX_THREAD_STACK_SIZE, MAX_TIMEOUT, MIN_RATE,
                               config_fields, parse_address)


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


_DURATIONS = [field.name for field, _ in config_fields()
              if field.name.endswith("_timeout") or field.name in ("max_lifetime", "drain_delay", "websocket_ping_interval")]


def test_every_duration_is_declared_as_one():
    """Every *_timeout field, max_lifetime, drain_delay and websocket_ping_interval is in
    seconds and has a maximum;
    nothing else is."""
    assert "linger_timeout" in _DURATIONS
    for field, spec in config_fields():
        assert (spec.unit == "s") == (field.name in _DURATIONS), field.name
        if field.name in _DURATIONS:
            assert spec.maximum is not None, field.name


@pytest.mark.parametrize("name", _DURATIONS)
def test_every_duration_has_a_maximum_inside_every_ceiling(name):
    """Each duration's maximum fits a timeval, a threading wait and, for timeouts, poll(2)."""
    maximum = dict((field.name, spec) for field, spec in config_fields())[name].maximum
    assert maximum is not None
    struct.pack("ll", int(maximum), 0)   # SO_RCVTIMEO / SO_SNDTIMEO
    assert maximum < threading.TIMEOUT_MAX / 100
    if name.endswith("_timeout"):
        assert maximum * 1000 <= 2**31 - 1   # poll(2)'s int milliseconds (TLS reads)


@pytest.mark.parametrize("name", _DURATIONS)
def test_every_duration_accepts_its_maximum_and_refuses_just_above(name):
    """The documented maximum itself is allowed; the next float above it is a ConfigError."""
    spec = dict((field.name, spec) for field, spec in config_fields())[name]
    assert getattr(Config(**{name: spec.maximum}), name) == spec.maximum
    with pytest.raises(ConfigError) as info:
        Config(**{name: math.nextafter(spec.maximum, math.inf)})
    assert info.value.field == name and "at most" in str(info.value)


@pytest.mark.parametrize("name, value", [
    ("idle_timeout", 1e20), ("write_timeout", 1e20), ("spare_thread_timeout", 1e10),
    ("max_lifetime", 1e10), ("stuck_thread_timeout", 1e10), ("graceful_timeout", 1e10),
    ("read_timeout", 1e308), ("handshake_timeout", 1e308), ("linger_timeout", 1e10),
])
def test_huge_finite_durations_from_the_issue_are_refused(name, value):
    """The values that used to pass and then kill a thread now stop construction."""
    with pytest.raises(ConfigError, match=name):
        Config(**{name: value})


@pytest.mark.parametrize("name, good, bad", [
    ("backlog", MAX_BACKLOG, MAX_BACKLOG + 1),
    ("backlog", MAX_BACKLOG, 99_999_999_999_999),
    ("thread_stack_size", MAX_THREAD_STACK_SIZE, MAX_THREAD_STACK_SIZE + 1),
    ("thread_stack_size", MAX_THREAD_STACK_SIZE, 99_999_999_999_999_999),
])
def test_backlog_and_stack_size_have_maxima(name, good, bad):
    """listen() and thread starts get values they can take, or start-up stops."""
    assert getattr(Config(**{name: good}), name) == good
    with pytest.raises(ConfigError, match=name):
        Config(**{name: bad})


@pytest.mark.parametrize("name", ["rate", "ip_rate", "server_rate"])
def test_rates_have_a_minimum_so_waits_for_tokens_stay_bounded(name):
    """A rate so small that a wait for one token overflows a lock's timeout is refused."""
    assert getattr(Config(**{name: MIN_RATE}), name) == MIN_RATE
    for bad in (1e-300, MIN_RATE / 2):
        with pytest.raises(ConfigError, match=name):
            Config(**{name: bad})
    assert getattr(Config(**{name: 1e300}), name) == 1e300   # huge rates break nothing


def test_burst_over_rate_is_held_to_the_timeout_maximum():
    """burst / rate is the longest wait for tokens: at most MAX_TIMEOUT, like any timeout."""
    assert Config(rate=1.0, burst=MAX_TIMEOUT).burst == MAX_TIMEOUT
    with pytest.raises(ConfigError) as info:
        Config(rate=1.0, burst=MAX_TIMEOUT * 2)
    assert info.value.field == "burst"
    assert Config(rate=MIN_RATE).rate == MIN_RATE   # default burst: max(1, rate)


def test_maxima_read_well_in_messages():
    """Bounds are shown with their unit: seconds with days, bytes with MiB."""
    with pytest.raises(ConfigError, match=r"at most 604,800 s \(7 days\); got 1e\+20"):
        Config(idle_timeout=1e20)
    with pytest.raises(ConfigError, match=r"at most 268,435,456 bytes \(256 MiB\)"):
        Config(thread_stack_size=MAX_THREAD_STACK_SIZE + 1)
    with pytest.raises(ConfigError, match=r"at most 65,535; got"):
        Config(backlog=70_000)


@pytest.mark.parametrize("text", ["127.0.0.1:²", "127.0.0.1:٣", "[::1", "::1]:80", "[::1]x:80"])
def test_parse_address_refuses_odd_ports_and_brackets_with_config_error(text):
    """Unicode digits int() cannot read and unbalanced brackets are ConfigErrors, not ValueErrors."""
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_address(text, "admin_address")
    with pytest.raises(ConfigError, match="admin_address"):
        Config(admin_address=text)


def test_toml_file_that_is_not_utf8_is_a_config_error(tmp_path):
    """A TOML file with bytes that are not UTF-8 is reported as invalid TOML."""
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(path)


def test_toml_values_of_the_wrong_type_name_the_key(tmp_path):
    """Strings, dates, booleans and huge integers in the wrong places are ConfigErrors."""
    for line, name in [('idle_timeout = "10"', "idle_timeout"),
                       ("idle_timeout = 1979-05-27", "idle_timeout"),
                       ("max_lifetime = false", "max_lifetime"),
                       ('trusted_proxy = "10.0.0.1"', "trusted_proxy"),
                       ("backlog = 99999999999999999999999", "backlog"),
                       ("idle_timeout = 1e20", "idle_timeout")]:
        path = tmp_path / "server.toml"
        path.write_text(line + "\n")
        with pytest.raises(ConfigError) as info:
            Config.from_toml(path)
        assert info.value.field == name, line
