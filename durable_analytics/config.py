"""Client options: one frozen dataclass, resolved as argument > environment variable > default.

Every option can be set from the environment as ``DURABLE_ANALYTICS_<OPTION>`` (upper case),
e.g. ``DURABLE_ANALYTICS_FLUSH_INTERVAL=2.5`` or ``DURABLE_ANALYTICS_SEND=false``, so a
deployment can change behaviour without touching code. An explicit constructor argument
always wins over the environment.

How a variable is read, and how an argument is checked, both follow from the field's type
annotation (``bool``, ``int``, ``float``, a ``Literal`` of choices, ``Path``, ``str``, and
``None`` in a union): adding an option is adding one field.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import tempfile
import threading
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigurationError

__all__ = ["ENV_PREFIX", "NON_OPTION_VARIABLES", "Config"]

logger = logging.getLogger("durable_analytics")

#: Prefix of the environment variables that configure a client.
ENV_PREFIX = "DURABLE_ANALYTICS_"

#: ``DURABLE_ANALYTICS_*`` variables that something reads but that are not `Config` options;
#: they are not reported as misspellings. (Today every variable the package reads is an option.)
NON_OPTION_VARIABLES: frozenset[str] = frozenset()

#: Longest accepted time option, in seconds (one week). Waits longer than about 9.2e9 s make
#: ``threading`` raise ``OverflowError`` on a background thread; a week is already forever.
MAX_SECONDS = 604_800.0
#: Largest accepted integer option: what an SQLite INTEGER (used in LIMITs and counts) holds.
MAX_INT = 2**63 - 1

APP_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")

Environment = Literal["development", "staging", "production"]
Protocol = Literal["layers", "segment"]
Durability = Literal["process", "power"]
QueueFullPolicy = Literal["drop_oldest", "block", "raise"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Validated options of one `Analytics` client. See docs/configuration.md.

    Constructing it checks every value (types from the annotations, then ranges); the write
    key loses surrounding whitespace. :raises ConfigurationError: naming the option.
    """

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
    #: Retries of a retryable failure before dead-lettering; None retries until delivered.
    max_retries: int | None = dataclasses.field(default=None, metadata={"minimum": 0})
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
    #: What ``track()`` does when the queue is full.
    on_queue_full: QueueFullPolicy = "drop_oldest"
    #: Longest a ``track()`` waits for room under ``on_queue_full="block"``.
    block_timeout: float = 5.0
    #: Proxy URL; None follows HTTP(S)_PROXY/NO_PROXY, False ignores them. Hidden from repr:
    #: a proxy URL often carries a password.
    proxy: str | bool | None = dataclasses.field(default=None, repr=False)
    #: CA file or directory for HTTPS; None: REQUESTS_CA_BUNDLE/SSL_CERT_FILE, else certifi.
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _check_type(field, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
        if isinstance(self.write_key, str):
            # open(path).read() leaves a "\n" that would end up inside the Authorization
            # header, and in the error that header raises.
            object.__setattr__(self, "write_key", self.write_key.strip())
        for field in dataclasses.fields(self):
            _check_range(field, getattr(self, field.name))
        self._validate()

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

        An option passed as None counts as not passed. An environment variable that is empty
        (or only whitespace) counts as unset. A ``DURABLE_ANALYTICS_*`` variable that names
        no option is logged once per process (a warning naming the closest option).

        :raises TypeError: an option name is unknown (a typo must not pass silently).
        :raises ConfigurationError: a value is invalid; the message names the option, and
            the variable when the value came from the environment.
        """
        env = os.environ if environ is None else environ
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                "unknown option(s) for Analytics: "
                + ", ".join(_with_suggestion(name, known) for name in unknown)
            )
        _warn_unknown_variables(env, known)
        values: dict[str, Any] = {}
        from_env: dict[str, str] = {}
        for name, field in known.items():
            variable = ENV_PREFIX + name.upper()
            if name in options and options[name] is not None:
                values[name] = options[name]
            elif (raw := env.get(variable)) is not None and raw.strip():
                values[name] = _from_env(field, variable, raw)
                from_env[name] = variable
        if "app_id" not in values:
            raise ConfigurationError("app_id", f"required (pass app_id= or set {ENV_PREFIX}APP_ID)")
        try:
            return cls(**values)
        except ConfigurationError as exc:
            source = from_env.get(exc.option)
            if source is None or source in str(exc):
                raise
            detail = str(exc).removeprefix(f"{exc.option}: ")
            raise ConfigurationError(exc.option, f"{detail} (from {source})") from None

    def _validate(self) -> None:
        """The checks a type and a range cannot express."""
        if not APP_ID_RE.fullmatch(self.app_id):
            raise ConfigurationError(
                "app_id", f"{self.app_id!r} must match [A-Za-z0-9._-]{{1,128}}"
            )
        if self.app_id in (".", ".."):
            raise ConfigurationError("app_id", f"{self.app_id!r} is not a usable name")
        if self.write_key is not None:
            # Never quote the key: this message reaches logs and tracebacks.
            if not self.write_key:
                raise ConfigurationError(
                    "write_key", "is empty (after removing surrounding whitespace)"
                )
            if not all("!" <= ch <= "~" for ch in self.write_key):
                raise ConfigurationError(
                    "write_key",
                    "must be printable ASCII with no whitespace or control characters inside "
                    "(the key is not shown)",
                )
        if not self.platform:
            raise ConfigurationError("platform", "must be a non-empty string")
        _check_url(self.base_url, self.allow_insecure_http)
        if self.proxy is True:
            raise ConfigurationError(
                "proxy", "True is not a proxy: pass a URL, False (ignore the environment) or None"
            )
        if isinstance(self.proxy, str):
            _check_proxy(self.proxy)
        if self.ca_bundle is not None and not self.ca_bundle.exists():
            raise ConfigurationError(
                "ca_bundle", f"{self.ca_bundle} does not exist (a CA file or directory)"
            )
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


# --- types: what each field accepts, read from its annotation -----------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# "Plain decimal": digits, an optional sign and point; no exponent, underscore, inf or nan.
_PLAIN_INT = re.compile(r"-?[0-9]+")
_PLAIN_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


@dataclass(frozen=True)
class _Kind:
    """A field's annotation taken apart: the accepted types, choices, and whether None is."""

    types: tuple[type, ...]
    choices: tuple[str, ...]
    optional: bool

    def describe(self) -> str:
        """What a value must be, in words, for error messages."""
        words = []
        if bool in self.types:
            words.append("True or False")
        if int in self.types:
            words.append("an integer")
        if float in self.types:
            words.append("a number of seconds")
        if self.choices:
            words.append("one of " + ", ".join(repr(c) for c in self.choices))
        if Path in self.types:
            words.append("a path")
        if str in self.types:
            words.append("a string")
        if self.optional:
            words.append("None")
        return " or ".join(words)


_KINDS: dict[str, _Kind] = {}


def _kind(field: dataclasses.Field[Any]) -> _Kind:
    if (kind := _KINDS.get(field.name)) is None:
        hint = typing.get_type_hints(Config)[field.name]
        members = (
            typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType)
            else (hint,)
        )
        accepted: list[type] = []
        choices: list[str] = []
        for member in members:
            if typing.get_origin(member) is Literal:
                choices.extend(typing.get_args(member))
            elif member is not type(None):
                accepted.append(member)
        kind = _KINDS[field.name] = _Kind(tuple(accepted), tuple(choices), type(None) in members)
    return kind


def _check_type(field: dataclasses.Field[Any], value: Any) -> Any:
    """Return the value as the field's type, or raise naming the option.

    bool is not accepted where a number is meant, an int is accepted as a float, a path may
    be a str or PathLike (made absolute). A field hidden from repr is never quoted.
    """
    kind = _kind(field)
    if value is None and kind.optional:
        return None
    if isinstance(value, bool):
        if bool in kind.types:
            return value
    elif int in kind.types and isinstance(value, int):
        return value
    elif float in kind.types and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(value, str) and value in kind.choices:
        return value
    elif Path in kind.types and isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str) and path:
            return Path(os.path.abspath(path))
    elif str in kind.types and isinstance(value, str):
        return value
    shown = f"got {value!r}" if field.repr else "the value is not shown"
    raise ConfigurationError(field.name, f"must be {kind.describe()}, {shown}")


def _check_range(field: dataclasses.Field[Any], value: Any) -> None:
    """Numbers: times finite, > 0 and at most a week; integers from a minimum (default 1)."""
    if isinstance(value, float):
        if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
            raise ConfigurationError(
                field.name,
                f"must be a finite number of seconds > 0 and <= {MAX_SECONDS:.0f}, got {value!r}",
            )
    elif isinstance(value, int) and not isinstance(value, bool):
        minimum = field.metadata.get("minimum", 1)
        if value < minimum:
            raise ConfigurationError(field.name, f"must be >= {minimum}, got {value!r}")
        if value > MAX_INT:
            raise ConfigurationError(field.name, f"must be <= 2**63 - 1, got {value!r}")


def _from_env(field: dataclasses.Field[Any], variable: str, raw: str) -> Any:
    """Parse a variable's text (surrounding whitespace stripped) as the field's type.

    Numbers are plain decimal; booleans are 1/true/yes/on or 0/false/no/off; ``none`` means
    None for an optional number or boolean (where it cannot be a legitimate string or path).
    """
    kind = _kind(field)
    text = raw.strip()
    lowered = text.lower()
    if kind.optional and lowered == "none" and not {str, Path} & set(kind.types):
        return None
    if bool in kind.types and lowered in _TRUE + _FALSE:
        return lowered in _TRUE
    if int in kind.types and _PLAIN_INT.fullmatch(text):
        return int(text)
    if float in kind.types and _PLAIN_DECIMAL.fullmatch(text):
        return float(text)
    if text in kind.choices or {str, Path} & set(kind.types):
        return text
    expected = []
    if bool in kind.types:
        expected.append(f"a boolean ({'/'.join(_TRUE)} or {'/'.join(_FALSE)})")
    if int in kind.types:
        expected.append("a whole number in plain decimal (like 100)")
    if float in kind.types:
        expected.append("a plain decimal number (like 2.5; no exponent, _, inf or nan)")
    if kind.choices:
        expected.append("one of " + ", ".join(kind.choices))
    if kind.optional:
        expected.append("none")
    shown = f"={raw!r}" if field.repr else ""
    raise ConfigurationError(field.name, f"{variable}{shown} is not {' or '.join(expected)}")


# --- variables that name no option --------------------------------------------------------------

_warned_variables: set[str] = set()
_warned_lock = threading.Lock()


def _warn_unknown_variables(
    env: Mapping[str, str], known: Mapping[str, dataclasses.Field[Any]]
) -> None:
    """Log, once per process and variable, a DURABLE_ANALYTICS_* variable that is no option.

    A misspelt variable would otherwise be silently ignored. `logging`, not `warnings`: a
    host running with warnings as errors must not crash over its environment.
    """
    expected = {ENV_PREFIX + name.upper() for name in known} | NON_OPTION_VARIABLES
    for variable in env:
        if not variable.startswith(ENV_PREFIX) or variable in expected:
            continue
        with _warned_lock:
            if variable in _warned_variables:
                continue
            _warned_variables.add(variable)
        option = variable[len(ENV_PREFIX) :].lower()
        close = difflib.get_close_matches(option, list(known), n=1)
        hint = f"; did you mean {ENV_PREFIX}{close[0].upper()}?" if close else ""
        logger.warning(
            "durable_analytics: the environment variable %s is not an option and is ignored%s",
            variable,
            hint,
        )


def _with_suggestion(name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


# --- URLs ---------------------------------------------------------------------------------------


def _check_url(url: str, allow_insecure_http: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Not quoted whole: a malformed URL may still carry a user:password@ part.
        shown = f"{parts.scheme}://{parts.hostname or ''}..." if parts.scheme else "it"
        raise ConfigurationError("base_url", f"{shown} is not an http(s) URL")
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


def _check_proxy(url: str) -> None:
    """An http(s) proxy URL with a host; it may carry user:password, which is never quoted."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            "proxy",
            "must be an http:// or https:// URL with a host, False or None "
            "(the value is not shown: it may carry a password)",
        )


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback ranges (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
