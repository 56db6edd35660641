"""Client options: one frozen dataclass, resolved as argument > environment variable > default.

Every option can be set from the environment as ``DURABLE_ANALYTICS_<OPTION>`` (upper case),
e.g. ``DURABLE_ANALYTICS_FLUSH_INTERVAL=2.5`` or ``DURABLE_ANALYTICS_SEND=false``, so a
deployment can change behaviour without touching code. An explicit constructor argument
always wins over the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigurationError

__all__ = ["ENV_PREFIX", "Config"]

#: Prefix of the environment variables that configure a client.
ENV_PREFIX = "DURABLE_ANALYTICS_"

APP_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
ENVIRONMENTS = ("development", "staging", "production")
PROTOCOLS = ("layers", "segment")
DURABILITIES = ("process", "power")

Environment = Literal["development", "staging", "production"]
Protocol = Literal["layers", "segment"]
Durability = Literal["process", "power"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Validated options of one `Analytics` client. See docs/configuration.md."""

    app_id: str
    environment: Environment = "production"
    write_key: str | None = dataclasses.field(default=None, repr=False)
    base_url: str = "https://in.layers.com"
    protocol: Protocol = "layers"
    platform: str = "python"
    persistence_dir: Path | None = None
    flush_interval: float = 10.0
    flush_threshold: int = 20
    max_queue_size: int = 10_000
    max_batch_size: int = 100
    max_batch_bytes: int = 500_000
    max_event_bytes: int = 32_768
    request_timeout: float = 10.0
    max_retries: int | None = None
    shutdown_timeout: float = 5.0
    handle_signals: bool = True
    send: bool = True
    gzip: bool | None = None
    durability: Durability = "process"
    debug: bool = False
    #: First retry delay; later ones double up to ``retry_max_delay`` (full jitter).
    retry_base_delay: float = 0.5
    #: Ceiling of our own backoff (a server's ``Retry-After`` is honoured up to 300 s).
    retry_max_delay: float = 60.0
    #: Permit ``http://`` to a host that is not loopback (the write key travels in clear).
    allow_insecure_http: bool = False

    @property
    def queue_dir(self) -> Path:
        """The directory that holds this app's queue."""
        if self.persistence_dir is not None:
            return self.persistence_dir
        return default_persistence_dir(self.app_id)

    @property
    def use_gzip(self) -> bool:
        """Whether request bodies are compressed: on for segment, off for layers, unless set."""
        if self.gzip is not None:
            return self.gzip
        return self.protocol == "segment"

    @classmethod
    def resolve(
        cls, options: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> Config:
        """Build a Config from constructor keywords, then the environment, then defaults.

        :raises TypeError: an option name is unknown (a typo must not pass silently).
        :raises ConfigurationError: a value is invalid; the message names the option.
        """
        env = os.environ if environ is None else environ
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) for Analytics: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name in known:
            if name in options and options[name] is not None:
                values[name] = options[name]
            elif (raw := env.get(ENV_PREFIX + name.upper())) not in (None, ""):
                assert raw is not None
                values[name] = _from_env(name, raw)
        if "app_id" not in values:
            raise ConfigurationError("app_id", f"required (pass app_id= or set {ENV_PREFIX}APP_ID)")
        for name, value in list(values.items()):
            values[name] = _coerce(name, value)
        config = cls(**values)
        config._validate()
        return config

    def _validate(self) -> None:
        if not isinstance(self.app_id, str) or not APP_ID_RE.fullmatch(self.app_id):
            raise ConfigurationError(
                "app_id", f"{self.app_id!r} must match [A-Za-z0-9._-]{{1,128}}"
            )
        if self.app_id in (".", ".."):
            raise ConfigurationError("app_id", f"{self.app_id!r} is not a usable name")
        _check_choice("environment", self.environment, ENVIRONMENTS)
        _check_choice("protocol", self.protocol, PROTOCOLS)
        _check_choice("durability", self.durability, DURABILITIES)
        if self.write_key is not None and (
            not isinstance(self.write_key, str) or not self.write_key
        ):
            raise ConfigurationError("write_key", "must be a non-empty string")
        if not isinstance(self.platform, str) or not self.platform:
            raise ConfigurationError("platform", "must be a non-empty string")
        _check_url(self.base_url, self.allow_insecure_http)
        for name in (
            "flush_interval",
            "request_timeout",
            "shutdown_timeout",
            "retry_base_delay",
            "retry_max_delay",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(name, f"must be > 0, got {getattr(self, name)!r}")
        for name in (
            "flush_threshold",
            "max_queue_size",
            "max_batch_size",
            "max_batch_bytes",
            "max_event_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigurationError(name, f"must be >= 1, got {getattr(self, name)!r}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ConfigurationError("max_retries", f"must be >= 0, got {self.max_retries!r}")
        if self.max_event_bytes > self.max_batch_bytes:
            raise ConfigurationError(
                "max_event_bytes",
                f"{self.max_event_bytes} is larger than max_batch_bytes={self.max_batch_bytes}",
            )


def default_persistence_dir(app_id: str) -> Path:
    """SPEC's default location: ``<tempfile.gettempdir()>/layers-sdk/<app_id>``.

    A temp directory may be cleaned by the OS or wiped on reboot; production deployments
    should set ``persistence_dir`` to a volume that outlives the process (docs/operations.md).
    """
    return Path(tempfile.gettempdir()) / "layers-sdk" / app_id


_BOOL_OPTIONS = {"handle_signals", "send", "gzip", "debug", "allow_insecure_http"}
_INT_OPTIONS = {
    "flush_threshold",
    "max_queue_size",
    "max_batch_size",
    "max_batch_bytes",
    "max_event_bytes",
    "max_retries",
}
_FLOAT_OPTIONS = {
    "flush_interval",
    "request_timeout",
    "shutdown_timeout",
    "retry_base_delay",
    "retry_max_delay",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_env(name: str, raw: str) -> Any:
    """Parse an environment variable's text into the option's type."""
    var = ENV_PREFIX + name.upper()
    text = raw.strip()
    if name in _BOOL_OPTIONS:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigurationError(name, f"{var}={raw!r} is not a boolean (use true/false)")
    if name in _INT_OPTIONS:
        try:
            return int(text)
        except ValueError:
            raise ConfigurationError(name, f"{var}={raw!r} is not an integer") from None
    if name in _FLOAT_OPTIONS:
        try:
            return float(text)
        except ValueError:
            raise ConfigurationError(name, f"{var}={raw!r} is not a number") from None
    return text


def _coerce(name: str, value: Any) -> Any:
    """Check an option's Python type; bool is not accepted where a number is meant."""
    if name in _BOOL_OPTIONS:
        if not isinstance(value, bool):
            raise ConfigurationError(name, f"must be True or False, got {value!r}")
        return value
    if name in _INT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(name, f"must be an integer, got {value!r}")
        return value
    if name in _FLOAT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(name, f"must be a number of seconds, got {value!r}")
        return float(value)
    if name == "persistence_dir":
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise ConfigurationError(name, f"must be a path, got {value!r}")
        return Path(os.path.abspath(os.fspath(value)))
    return value


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigurationError(
            name, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}"
        )


def _check_url(url: object, allow_insecure_http: bool) -> None:
    if not isinstance(url, str):
        raise ConfigurationError("base_url", f"must be a string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError("base_url", f"{url!r} is not an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        # A credential in the URL would end up in logs; a query would be dropped silently.
        raise ConfigurationError(
            "base_url",
            f"{parts.scheme}://{parts.hostname}/... must not carry "
            "credentials, a query or a fragment (use write_key)",
        )
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback(parts.hostname):
        raise ConfigurationError(
            "base_url",
            f"plain http to {parts.hostname} would send events and the key in clear; use "
            "https, or allow_insecure_http=True",
        )


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback ranges (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
