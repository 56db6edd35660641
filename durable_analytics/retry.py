"""Retry policy, pure: what to do with a batch given the server's answer, and how long to wait.

=====================================  =================  ==========================================
answer                                 action             the events
=====================================  =================  ==========================================
2xx                                    ``DELIVERED``      deleted
connection error, DNS, refused,        ``RETRY``          stay on disk; not counted against
a transport's own exception                               ``max_retries`` (server never saw it)
timeout, 408, 429, 5xx                 ``RETRY``          stay; 408/5xx/timeouts count an attempt;
                                                          retried until delivered (default), or,
                                                          with an integer ``max_retries``, moved
                                                          to ``dead_letter`` after that many
413                                    ``SPLIT``          halved and retried; a single event that is
                                                          still refused goes to ``dead_letter``
400, 422                               ``SPLIT``          bisected so one poison event cannot take
                                                          the rest of its batch with it
401, 403                               ``KEEP``           stay on disk (a wrong key must not destroy
                                                          data); long backoff, reported
3xx                                    ``KEEP``           redirects are not followed (the key must
                                                          not travel to another host); reported
other 4xx                              ``DEAD_LETTER``    moved to ``dead_letter`` with the status
=====================================  =================  ==========================================

The wait between retries is full-jitter exponential backoff capped at ``retry_max_delay``
(60 s by default); a server's ``Retry-After`` is honoured up to 300 s.
"""

from __future__ import annotations

import email.utils
import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Action", "Decision", "backoff_delay", "classify", "parse_retry_after"]


class Action(enum.Enum):
    """What the flusher does with a batch after one send."""

    DELIVERED = "delivered"
    RETRY = "retry"
    SPLIT = "split"
    KEEP = "keep"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Decision:
    """An `Action` plus whether the attempt counts towards ``max_retries``, and why."""

    action: Action
    counts_attempt: bool
    reason: str


def classify(status: int | None, *, timed_out: bool = False) -> Decision:
    """Map one HTTP status (None for a network failure) to a `Decision`."""
    if status is None:
        if timed_out:
            # The server may have choked on this very batch: count it, so a poison batch
            # that always times out ends in dead_letter instead of blocking the queue.
            return Decision(Action.RETRY, True, "timeout")
        return Decision(Action.RETRY, False, "network_error")
    if 200 <= status < 300:
        return Decision(Action.DELIVERED, False, "ok")
    if 300 <= status < 400:
        return Decision(Action.KEEP, False, f"redirect_{status}")
    if status in (401, 403):
        return Decision(Action.KEEP, False, f"auth_{status}")
    if status == 429:
        return Decision(Action.RETRY, False, "rate_limited")
    if status == 408 or status >= 500:
        return Decision(Action.RETRY, True, f"server_{status}")
    if status in (400, 413, 422):
        return Decision(Action.SPLIT, False, f"rejected_{status}")
    if 400 <= status < 500:
        return Decision(Action.DEAD_LETTER, False, f"rejected_{status}")
    return Decision(Action.RETRY, True, f"unexpected_{status}")


def backoff_delay(
    failures: int,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**(failures-1))].

    Full jitter spreads many clients that failed together (a deploy, an outage) instead of
    having them all come back at the same instant.
    """
    if failures <= 0:
        return 0.0
    ceiling = min(cap, base * 2.0 ** min(failures - 1, 30))
    return rand() * ceiling


def parse_retry_after(value: str | None, cap: float, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP-date), capped at ``cap``.

    The server controls this value, so it is capped: a hostile or broken header can't park
    the flusher for a day. Returns None when the header is absent or unreadable.
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment is None:
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, cap))
