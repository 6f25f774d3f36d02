"""The per-workspace Redis lock that elects one dispatcher at a time.

It keeps dispatchers from stampeding; it does not keep the data right. If it
lies (TTL expired under a paused holder, Redis restarted and forgot it), two
dispatchers may both claim, and the partial unique index turns the second
claim into a lost race. So it is held only around the short claim-and-hand-off
step, never while terraform runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis
from redis.exceptions import LockNotOwnedError

log = logging.getLogger(__name__)


def lock_key(workspace: str) -> str:
    return f"runq:lock:workspace:{workspace}"


@contextmanager
def workspace_lock(redis: Redis, workspace: str, *, ttl: float, wait: float) -> Iterator[bool]:
    """Yield True while holding the lock, False if it stayed busy for ``wait`` s.

    The lock is token-owned (redis-py's ``Lock``): releasing checks the token
    in a Lua script, so a holder whose TTL expired cannot release the lock a
    successor now holds.
    """
    lock = redis.lock(lock_key(workspace), timeout=ttl, blocking_timeout=wait, thread_local=False)
    acquired = lock.acquire(blocking=wait > 0)
    try:
        yield acquired
    finally:
        if acquired:
            try:
                lock.release()
            except LockNotOwnedError:
                log.warning(
                    "workspace lock %s expired before release (held past its %ss TTL); "
                    "the database guard kept the claim safe",
                    workspace,
                    ttl,
                    extra={"action": "lock_expired", "workspace": workspace},
                )
