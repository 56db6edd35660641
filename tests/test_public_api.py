"""The public surface: small, exact, typed, and free of framework imports."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import durable_analytics
from durable_analytics import errors


def test_all_is_exactly_what_the_package_exposes() -> None:
    """__all__ lists every public name of the package and nothing it does not define."""
    public = {
        name
        for name in vars(durable_analytics)
        if not name.startswith("_")
        and not isinstance(getattr(durable_analytics, name), type(durable_analytics))
    }
    assert set(durable_analytics.__all__) - {"__version__"} == public
    for name in durable_analytics.__all__:
        assert getattr(durable_analytics, name) is not None


def test_every_error_subclasses_the_base_and_is_documented() -> None:
    """Each exception in errors.py derives from DurableAnalyticsError and appears in its tree."""
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.DurableAnalyticsError)
        assert name in (errors.__doc__ or ""), name
    assert issubclass(errors.ValidationError, ValueError)
    assert issubclass(errors.ConfigurationError, ValueError)


def test_package_is_typed() -> None:
    """py.typed ships with the package so type checkers use our hints."""
    assert (Path(durable_analytics.__file__).parent / "py.typed").exists()


def test_import_does_not_pull_in_web_frameworks_or_install_handlers() -> None:
    """import durable_analytics imports no Flask/Starlette/Django and changes no signal handler."""
    code = (
        "import signal, sys\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "import durable_analytics\n"
        "assert signal.getsignal(signal.SIGTERM) is before\n"
        "print(sorted(m for m in ('flask','starlette','django','fastapi') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_callables_have_docstrings() -> None:
    """Every public class and function, and every public method of Analytics, is documented."""
    for name in durable_analytics.__all__:
        obj = getattr(durable_analytics, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name
    for name, member in vars(durable_analytics.Analytics).items():
        if not name.startswith("_") and callable(member):
            assert member.__doc__, name
