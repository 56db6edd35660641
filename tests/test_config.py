"""Options: argument > environment > default, and errors that name the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from durable_analytics.config import Config, default_persistence_dir
from durable_analytics.errors import ConfigurationError


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
