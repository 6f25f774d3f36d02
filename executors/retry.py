"""Retrying a report (or any call) with capped exponential backoff.

Both reporters use it: the direct one on a database error, the broker one
when no reply came. Every report is idempotent, so sending one again is
always safe; what differs is which failures are worth another try.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def with_backoff(
    fn: Callable[[], T],
    *,
    what: str,
    give_up_after: float,
    retry_if: Callable[[Exception], bool],
    first: float,
    cap: float,
) -> T:
    """``fn()``; a failure ``retry_if`` accepts is retried after ``first``
    seconds, doubling up to ``cap``, until ``give_up_after`` seconds would
    pass (then, or for any other failure, it is raised)."""
    deadline = time.monotonic() + give_up_after
    delay = first
    while True:
        try:
            return fn()
        except Exception as exc:
            if not retry_if(exc) or time.monotonic() + delay > deadline:
                raise
            detail = str(exc).splitlines()[0] if str(exc) else ""
            log.warning(
                "%s failed (%s: %s); retrying in %.1fs",
                what,
                type(exc).__name__,
                detail,
                delay,
                extra={"action": "report_retry", "what": what},
            )
            time.sleep(delay)
            delay = min(delay * 2, cap)
