"""The pure retry policy: classification table, full-jitter backoff, Retry-After parsing."""

from __future__ import annotations

import email.utils

import pytest

from durable_analytics.config import Config
from durable_analytics.flusher import MAX_RETRY_AFTER
from durable_analytics.retry import Action, backoff_delay, classify, parse_retry_after


@pytest.mark.parametrize(
    ("status", "timed_out", "action", "counts"),
    [
        (200, False, Action.DELIVERED, False),
        (202, False, Action.DELIVERED, False),
        (204, False, Action.DELIVERED, False),
        (None, False, Action.RETRY, False),
        (None, True, Action.RETRY, True),
        (408, False, Action.RETRY, True),
        (429, False, Action.RETRY, False),
        (500, False, Action.RETRY, True),
        (503, False, Action.RETRY, True),
        (413, False, Action.SPLIT, False),
        (400, False, Action.SPLIT, False),
        (422, False, Action.SPLIT, False),
        (401, False, Action.KEEP, False),
        (403, False, Action.KEEP, False),
        (301, False, Action.KEEP, False),
        (307, False, Action.KEEP, False),
        (404, False, Action.DEAD_LETTER, False),
        (410, False, Action.DEAD_LETTER, False),
    ],
)
def test_classification_table(
    status: int | None, timed_out: bool, action: Action, counts: bool
) -> None:
    """Each answer maps to the action and attempt accounting documented in retry.py."""
    decision = classify(status, timed_out=timed_out)
    assert (decision.action, decision.counts_attempt) == (action, counts)


def test_backoff_is_full_jitter_and_capped() -> None:
    """The delay is rand * min(cap, base * 2**(n-1)): 0 at rand=0, the ceiling at rand=1."""
    assert backoff_delay(0, 0.5, 60, lambda: 1.0) == 0
    assert [backoff_delay(n, 0.5, 60, lambda: 1.0) for n in (1, 2, 3, 4)] == [0.5, 1, 2, 4]
    assert backoff_delay(50, 0.5, 60, lambda: 1.0) == 60
    assert backoff_delay(5, 0.5, 60, lambda: 0.0) == 0
    assert backoff_delay(5, 0.5, 60, lambda: 0.5) == 4


def test_retry_after_seconds_date_garbage_and_cap() -> None:
    """Seconds and HTTP-dates are honoured up to the cap; garbage and absence give None."""
    assert parse_retry_after("3", cap=60) == 3
    assert parse_retry_after("1000", cap=60) == 60
    assert parse_retry_after("-5", cap=60) == 0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, cap=60, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon", cap=60) is None
    assert parse_retry_after("nan", cap=60) is None
    assert parse_retry_after(None, cap=60) is None


def test_defaults_retry_forever_with_capped_waits() -> None:
    """By default retryable failures have no attempt limit, our backoff tops out at 60 s and a
    server's Retry-After is honoured up to 300 s, never longer."""
    config = Config(app_id="retry-app")
    assert config.max_retries is None
    assert config.retry_max_delay == 60
    assert backoff_delay(1000, config.retry_base_delay, config.retry_max_delay, lambda: 1.0) == 60
    assert MAX_RETRY_AFTER == 300
    assert parse_retry_after("86400", cap=MAX_RETRY_AFTER) == 300
