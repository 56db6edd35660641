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


def test_internals_are_not_part_of_the_public_surface() -> None:
    """Issue 11: the storage class and its flags are internal; the facade exposes the client,
    the config, the errors, the transport seam, the stats types and the context helpers."""
    assert "SQLiteQueue" not in durable_analytics.__all__
    assert not hasattr(durable_analytics, "SQLiteQueue")
    for name in ("Analytics", "Config", "ClosedError", "Transport", "StatsSnapshot"):
        assert name in durable_analytics.__all__


def test_consent_state_is_frozen_and_keeps_its_hash() -> None:
    """Issue 11: a ConsentState can't be changed in place, so one kept in a set is found
    again; the client hands out its state without a way to mutate it behind its back."""
    import dataclasses

    import pytest

    state = durable_analytics.ConsentState(analytics=True)
    seen = {state}
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.analytics = False  # type: ignore[misc]
    assert state in seen
    assert durable_analytics.ConsentState(analytics=True) == state


def test_stats_keys_are_exactly_the_documented_ones(tmp_path: Path) -> None:
    """Issue 11: stats() returns the StatsSnapshot TypedDict: every key it has is declared
    (and so documented) there, including each drop reason."""
    from typing import get_type_hints

    with durable_analytics.Analytics(
        app_id="api", persistence_dir=tmp_path / "q", send=False, handle_signals=False
    ) as client:
        snapshot = client.stats()
    assert set(snapshot) == set(get_type_hints(durable_analytics.StatsSnapshot))
    assert set(snapshot["dropped"]) == set(get_type_hints(durable_analytics.DroppedCounts))
