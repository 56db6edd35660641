"""Options: argument > environment > default, and errors that name the option."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from durable_analytics.config import (
    ENV_PREFIX,
    NON_OPTION_VARIABLES,
    Config,
    default_persistence_dir,
)
from durable_analytics.errors import ConfigurationError

TIME_OPTIONS = (
    "flush_interval",
    "request_timeout",
    "shutdown_timeout",
    "retry_base_delay",
    "retry_max_delay",
    "block_timeout",
)


def test_defaults_match_the_spec() -> None:
    """The documented defaults."""
    c = Config.resolve({"app_id": "a"}, environ={})
    assert (c.environment, c.base_url, c.protocol, c.platform) == (
        "production",
        "https://in.layers.com",
        "layers",
        "python",
    )
    assert (c.flush_interval, c.flush_threshold, c.max_queue_size, c.max_batch_size) == (
        10.0,
        20,
        10_000,
        100,
    )
    assert (c.request_timeout, c.max_retries, c.shutdown_timeout) == (10.0, None, 5.0)
    assert (c.handle_signals, c.send, c.durability, c.debug) == (True, True, "process", False)
    assert (c.on_queue_full, c.block_timeout, c.proxy, c.ca_bundle) == (
        "drop_oldest",
        5.0,
        None,
        None,
    )
    assert c.use_gzip is False
    assert Config.resolve({"app_id": "a", "protocol": "segment"}, environ={}).use_gzip is True
    assert c.queue_dir == default_persistence_dir("a")
    assert c.queue_dir.parts[-2:] == ("layers-sdk", "a")


def test_environment_variables_configure_and_arguments_win(tmp_path: Path) -> None:
    """DURABLE_ANALYTICS_<OPTION> sets an option; an explicit argument overrides it."""
    env = {
        "DURABLE_ANALYTICS_APP_ID": "from-env",
        "DURABLE_ANALYTICS_FLUSH_INTERVAL": "2.5",
        "DURABLE_ANALYTICS_MAX_QUEUE_SIZE": "50",
        "DURABLE_ANALYTICS_SEND": "false",
        "DURABLE_ANALYTICS_PERSISTENCE_DIR": str(tmp_path),
        "DURABLE_ANALYTICS_ENVIRONMENT": "staging",
    }
    c = Config.resolve({"max_queue_size": 7}, environ=env)
    assert (c.app_id, c.flush_interval, c.max_queue_size, c.send, c.environment) == (
        "from-env",
        2.5,
        7,
        False,
        "staging",
    )
    assert c.queue_dir == tmp_path


def test_unknown_option_is_a_type_error() -> None:
    """A misspelt option fails loudly instead of being ignored."""
    with pytest.raises(TypeError, match="flush_intervall"):
        Config.resolve({"app_id": "a", "flush_intervall": 1}, environ={})


@pytest.mark.parametrize("app_id", ["../x", "a/b", "", ".", "..", "a\x00b", "x" * 300, "sp ace"])
def test_hostile_app_ids_are_refused(app_id: str) -> None:
    """app_id must match [A-Za-z0-9._-]{1,128} and not be . or .. (it names a directory)."""
    with pytest.raises(ConfigurationError, match="app_id") as info:
        Config.resolve({"app_id": app_id}, environ={})
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"environment": "prod"}, "environment"),
        ({"protocol": "amplitude"}, "protocol"),
        ({"durability": "paranoid"}, "durability"),
        ({"flush_interval": 0}, "flush_interval"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"send": "yes"}, "send"),
        ({"base_url": "ftp://example.com"}, "base_url"),
        ({"base_url": "http://example.com"}, "base_url"),
        ({"base_url": "https://user:pw@example.com"}, "base_url"),
        ({"max_event_bytes": 10**7}, "max_event_bytes"),
        ({"write_key": ""}, "write_key"),
    ],
)
def test_invalid_values_name_the_option(options: dict[str, object], option: str) -> None:
    """Each invalid value raises ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError) as info:
        Config.resolve({"app_id": "a", **options}, environ={})
    assert info.value.option == option


def test_bad_environment_values_name_the_variable() -> None:
    """A malformed environment value says which variable is wrong."""
    with pytest.raises(ConfigurationError, match="DURABLE_ANALYTICS_FLUSH_THRESHOLD"):
        Config.resolve({"app_id": "a"}, environ={"DURABLE_ANALYTICS_FLUSH_THRESHOLD": "many"})


def test_plain_http_is_allowed_to_loopback_only_by_default() -> None:
    """http:// is fine for the local collector; elsewhere it needs allow_insecure_http."""
    for url in ("http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9"):
        assert Config.resolve({"app_id": "a", "base_url": url}, environ={}).base_url == url
    c = Config.resolve(
        {"app_id": "a", "base_url": "http://collector:8080", "allow_insecure_http": True},
        environ={},
    )
    assert c.base_url == "http://collector:8080"


def test_write_key_is_not_in_repr() -> None:
    """The key never shows up in a repr (which ends up in logs and tracebacks)."""
    c = Config.resolve({"app_id": "a", "write_key": "sk_live_SECRET"}, environ={})
    assert "SECRET" not in repr(c)


# --- item 8: times are finite positive numbers ------------------------------------------------


@pytest.mark.parametrize("option", TIME_OPTIONS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0, 0.0, -1, 1e300])
def test_time_options_must_be_finite_and_positive(option: str, value: float) -> None:
    """inf, nan, 0, negatives and absurdly long times are refused, naming the option.

    ``shutdown_timeout=inf`` used to be accepted: a process with the endpoint down never exited.
    """
    with pytest.raises(ConfigurationError) as info:
        Config.resolve({"app_id": "a", option: value}, environ={})
    assert info.value.option == option
    assert str(info.value).startswith(f"{option}: ")


@pytest.mark.parametrize("option", TIME_OPTIONS)
@pytest.mark.parametrize("text", ["inf", "Infinity", "-inf", "nan", "NaN", "0", "-1", "0.0"])
def test_time_variables_must_be_finite_and_positive(option: str, text: str) -> None:
    """DURABLE_ANALYTICS_SHUTDOWN_TIMEOUT=inf (and nan, 0, ...) fails naming the variable."""
    variable = ENV_PREFIX + option.upper()
    with pytest.raises(ConfigurationError, match=variable) as info:
        Config.resolve({"app_id": "a"}, environ={variable: text})
    assert info.value.option == option


def test_a_week_is_the_longest_time_accepted() -> None:
    """A long but finite time is fine up to a week; the bound is documented."""
    c = Config.resolve({"app_id": "a", "shutdown_timeout": 604_800}, environ={})
    assert c.shutdown_timeout == 604_800.0
    with pytest.raises(ConfigurationError, match="604800"):
        Config.resolve({"app_id": "a", "shutdown_timeout": 604_801}, environ={})


def test_config_built_directly_is_validated_too() -> None:
    """Config(...) itself refuses bad values, so no caller can bypass resolve()'s checks."""
    with pytest.raises(ConfigurationError, match="shutdown_timeout"):
        Config(app_id="a", shutdown_timeout=math.inf)


@pytest.mark.parametrize("option", ["max_queue_size", "max_batch_size", "max_retries"])
def test_integers_must_fit_sqlite(option: str) -> None:
    """An integer option larger than an SQLite INTEGER is refused at construction."""
    with pytest.raises(ConfigurationError) as info:
        Config.resolve({"app_id": "a", option: 2**63}, environ={})
    assert info.value.option == option


# --- item 15: environment values --------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "text"),
    [
        ("flush_interval", "1e1"),
        ("flush_interval", "1_0"),
        ("flush_interval", "0x10"),
        ("flush_interval", "2,5"),
        ("flush_interval", "\u0661\u0660"),  # Arabic-Indic digits: float() takes them
        ("max_queue_size", "10_000"),
        ("max_queue_size", "1e4"),
        ("max_queue_size", "10000.0"),
        ("max_queue_size", "\uff11\uff10"),  # full-width digits: int() takes them
        ("max_retries", "3.5"),
    ],
)
def test_environment_numbers_must_be_plain_decimal(option: str, text: str) -> None:
    """Exponents, underscores, hex and non-ASCII digits are refused, naming the variable."""
    variable = ENV_PREFIX + option.upper()
    with pytest.raises(ConfigurationError, match=f"{variable}.*plain decimal") as info:
        Config.resolve({"app_id": "a"}, environ={variable: text})
    assert info.value.option == option


def test_plain_decimals_with_surrounding_whitespace_are_read() -> None:
    """Plain decimals are read; surrounding whitespace is stripped; a blank variable is unset."""
    env = {
        "DURABLE_ANALYTICS_FLUSH_INTERVAL": " 2.5 ",
        "DURABLE_ANALYTICS_REQUEST_TIMEOUT": ".5",
        "DURABLE_ANALYTICS_SHUTDOWN_TIMEOUT": "7",
        "DURABLE_ANALYTICS_MAX_QUEUE_SIZE": "\t5\n",
        "DURABLE_ANALYTICS_PLATFORM": "   ",
    }
    c = Config.resolve({"app_id": "a"}, environ=env)
    assert (c.flush_interval, c.request_timeout, c.shutdown_timeout) == (2.5, 0.5, 7.0)
    assert (c.max_queue_size, c.platform) == (5, "python")


def test_invalid_choice_from_the_environment_names_variable_and_choices() -> None:
    """DURABLE_ANALYTICS_ENVIRONMENT=prod says which variable, and what it may be."""
    with pytest.raises(ConfigurationError) as info:
        Config.resolve({"app_id": "a"}, environ={"DURABLE_ANALYTICS_ENVIRONMENT": "prod"})
    message = str(info.value)
    assert info.value.option == "environment"
    assert "DURABLE_ANALYTICS_ENVIRONMENT" in message
    assert all(choice in message for choice in ("development", "staging", "production"))


def test_a_misspelt_variable_is_logged_once_naming_the_closest_option(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DURABLE_ANALYTICS_FLUSH_INTERVALL is not silently ignored: one warning, with a hint."""
    env = {"DURABLE_ANALYTICS_FLUSH_INTERVALL": "2", "DURABLE_ANALYTICS_MAX_RETRYS": "3"}
    with caplog.at_level(logging.WARNING, logger="durable_analytics"):
        for _ in range(3):
            assert Config.resolve({"app_id": "a"}, environ=env).flush_interval == 10.0
    warnings = [r for r in caplog.records if r.name == "durable_analytics"]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    messages = sorted(r.getMessage() for r in warnings)
    assert "DURABLE_ANALYTICS_FLUSH_INTERVALL" in messages[0]
    assert "did you mean DURABLE_ANALYTICS_FLUSH_INTERVAL?" in messages[0]
    assert "did you mean DURABLE_ANALYTICS_MAX_RETRIES?" in messages[1]


def test_known_variables_are_not_reported(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """Every option's variable, and the allow-listed non-option ones, log nothing."""
    env = {ENV_PREFIX + f.name.upper(): "" for f in dataclasses.fields(Config)}
    env.update({name: "x" for name in NON_OPTION_VARIABLES})
    env.update({"DURABLE_ANALYTICS_APP_ID": "a", "OTHER_FLUSH_INTERVALL": "1"})
    with caplog.at_level(logging.DEBUG, logger="durable_analytics"):
        Config.resolve({}, environ=env)
    assert caplog.records == []


# --- issue 11: environment parsing follows the field types -------------------------------------

#: A non-default value for every option, as text and as the option holds it.
EVERY_OPTION: dict[str, tuple[str, Any]] = {
    "app_id": ("env-app", "env-app"),
    "environment": ("staging", "staging"),
    "write_key": ("sk_test_1", "sk_test_1"),
    "base_url": ("http://127.0.0.1:9", "http://127.0.0.1:9"),
    "protocol": ("segment", "segment"),
    "platform": ("worker", "worker"),
    "persistence_dir": ("/srv/queue", Path("/srv/queue")),
    "flush_interval": ("2.5", 2.5),
    "flush_threshold": ("7", 7),
    "max_queue_size": ("50", 50),
    "max_batch_size": ("9", 9),
    "max_batch_bytes": ("90000", 90_000),
    "max_event_bytes": ("9000", 9000),
    "request_timeout": ("3", 3.0),
    "max_retries": ("0", 0),
    "shutdown_timeout": ("1.5", 1.5),
    "handle_signals": ("off", False),
    "send": ("no", False),
    "gzip": ("yes", True),
    "durability": ("power", "power"),
    "debug": ("1", True),
    "retry_base_delay": ("0.25", 0.25),
    "retry_max_delay": ("30", 30.0),
    "allow_insecure_http": ("TRUE", True),
    "on_queue_full": ("block", "block"),
    "block_timeout": ("0.5", 0.5),
    "proxy": ("http://127.0.0.1:3128", "http://127.0.0.1:3128"),
    "ca_bundle": ("/", Path("/")),
}


def test_every_option_is_read_from_its_variable_as_its_type() -> None:
    """Each Config field is set by DURABLE_ANALYTICS_<NAME>, parsed by the field's type."""
    assert set(EVERY_OPTION) == {f.name for f in dataclasses.fields(Config)}
    env = {ENV_PREFIX + name.upper(): text for name, (text, _) in EVERY_OPTION.items()}
    c = Config.resolve({}, environ=env)
    for name, (_, expected) in EVERY_OPTION.items():
        value = getattr(c, name)
        assert (type(value), value) == (type(expected), expected), name


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("DURABLE_ANALYTICS_SEND", "maybe"),
        ("DURABLE_ANALYTICS_GZIP", "2"),
        ("DURABLE_ANALYTICS_DURABILITY", "Power"),
        ("DURABLE_ANALYTICS_ON_QUEUE_FULL", "wait"),
        ("DURABLE_ANALYTICS_MAX_RETRIES", "forever"),
    ],
)
def test_bad_variables_name_the_variable(variable: str, text: str) -> None:
    """Whatever the type, a value that does not parse names its variable and its text."""
    with pytest.raises(ConfigurationError, match=f"{variable}={text!r}"):
        Config.resolve({"app_id": "a"}, environ={variable: text})


# --- item 2: max_retries -----------------------------------------------------------------------


def test_max_retries_defaults_to_no_limit() -> None:
    """None (no limit) by default and from "none"; an integer >= 0 keeps a limit."""
    assert Config.resolve({"app_id": "a"}, environ={}).max_retries is None
    env = {"DURABLE_ANALYTICS_MAX_RETRIES": "None"}
    assert Config.resolve({"app_id": "a"}, environ=env).max_retries is None
    assert Config.resolve({"app_id": "a", "max_retries": 0}, environ={}).max_retries == 0
    env = {"DURABLE_ANALYTICS_MAX_RETRIES": "12"}
    assert Config.resolve({"app_id": "a"}, environ=env).max_retries == 12
    with pytest.raises(ConfigurationError, match="max_retries"):
        Config.resolve({"app_id": "a", "max_retries": -1}, environ={})


# --- item 9: write_key -------------------------------------------------------------------------


def test_write_key_surrounding_whitespace_is_stripped(tmp_path: Path) -> None:
    """A key read with open(f).read() keeps no trailing newline (it leaked in header errors)."""
    key_file = tmp_path / "key"
    key_file.write_text("sk_live_abc123\n")
    c = Config.resolve({"app_id": "a", "write_key": key_file.read_text()}, environ={})
    assert c.write_key == "sk_live_abc123"
    env = {"DURABLE_ANALYTICS_WRITE_KEY": "\tsk_live_abc123\r\n"}
    assert Config.resolve({"app_id": "a"}, environ=env).write_key == "sk_live_abc123"


@pytest.mark.parametrize(
    "key",
    [
        " \n",
        "sk_live_SECRET inside",
        "sk_live_SECRET\x00x",
        "sk_live_SECRET\ninside",
        "sk_live_SECRET\u200binside",
        "sk_live_SECRET\u00e9",
        b"sk_live_SECRET",
    ],
)
def test_bad_write_keys_are_refused_without_quoting_them(key: object) -> None:
    """Empty after stripping, whitespace or controls inside, not ASCII, not a str: refused,
    and the message never contains the key."""
    with pytest.raises(ConfigurationError) as info:
        Config.resolve({"app_id": "a", "write_key": key}, environ={})
    assert info.value.option == "write_key"
    assert "SECRET" not in str(info.value)
    if isinstance(key, str) and key.strip():
        with pytest.raises(ConfigurationError) as info:
            Config.resolve({"app_id": "a"}, environ={"DURABLE_ANALYTICS_WRITE_KEY": key})
        assert "SECRET" not in str(info.value)
        assert "DURABLE_ANALYTICS_WRITE_KEY" in str(info.value)


# --- new options -------------------------------------------------------------------------------


def test_proxy_is_a_url_false_or_none() -> None:
    """proxy: an http(s) URL, False (ignore the environment) or None; env takes "false"."""
    url = "http://user:hunter2@proxy.internal:3128"
    c = Config.resolve({"app_id": "a", "proxy": url}, environ={})
    assert c.proxy == url
    assert "hunter2" not in repr(c)
    assert Config.resolve({"app_id": "a", "proxy": False}, environ={}).proxy is False
    env = {"DURABLE_ANALYTICS_PROXY": "false"}
    assert Config.resolve({"app_id": "a"}, environ=env).proxy is False
    env = {"DURABLE_ANALYTICS_PROXY": "https://proxy.internal"}
    assert Config.resolve({"app_id": "a"}, environ=env).proxy == "https://proxy.internal"
    for bad in ("socks5://user:hunter2@proxy:1080", "http://user:hunter2@proxy:port", True, 3):
        with pytest.raises(ConfigurationError) as info:
            Config.resolve({"app_id": "a", "proxy": bad}, environ={})
        assert info.value.option == "proxy"
        assert "hunter2" not in str(info.value)


def test_ca_bundle_must_exist(tmp_path: Path) -> None:
    """ca_bundle is a CA file or directory that exists, made absolute; else it is named."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Config.resolve({"app_id": "a", "ca_bundle": bundle}, environ={}).ca_bundle == bundle
    env = {"DURABLE_ANALYTICS_CA_BUNDLE": str(tmp_path)}
    assert Config.resolve({"app_id": "a"}, environ=env).ca_bundle == tmp_path
    with pytest.raises(ConfigurationError, match=r"ca_bundle: .*missing\.pem does not exist"):
        Config.resolve({"app_id": "a", "ca_bundle": str(tmp_path / "missing.pem")}, environ={})
    env = {"DURABLE_ANALYTICS_CA_BUNDLE": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigurationError, match="DURABLE_ANALYTICS_CA_BUNDLE"):
        Config.resolve({"app_id": "a"}, environ=env)


def test_on_queue_full_and_block_timeout() -> None:
    """on_queue_full is one of three policies; block_timeout is a time like the others."""
    for policy in ("drop_oldest", "block", "raise"):
        c = Config.resolve({"app_id": "a", "on_queue_full": policy}, environ={})
        assert c.on_queue_full == policy
    with pytest.raises(ConfigurationError, match=r"on_queue_full: .*'block'"):
        Config.resolve({"app_id": "a", "on_queue_full": "wait"}, environ={})
    c = Config.resolve({"app_id": "a", "block_timeout": 1}, environ={})
    assert c.block_timeout == 1.0


def test_unknown_option_suggests_the_closest() -> None:
    """A misspelt keyword is a TypeError that names it and the option it probably meant."""
    with pytest.raises(TypeError, match=r"max_retry \(did you mean max_retries\?\)"):
        Config.resolve({"app_id": "a", "max_retry": 1}, environ={})


def test_a_malformed_base_url_is_refused_without_quoting_its_password() -> None:
    """Review finding: a base_url with a wrong scheme was quoted whole in the error, password
    included, while a well-formed one with credentials was refused without quoting them."""
    with pytest.raises(ConfigurationError, match="base_url") as caught:
        Config.resolve({"app_id": "a", "base_url": "htps://user:hunter22@in.example.com"}, {})
    assert "hunter22" not in str(caught.value)
