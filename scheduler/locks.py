"""The per-workspace Redis lock that elects one dispatcher at a time.

It keeps dispatchers from stampeding; it does not keep the data right. If it
lies (TTL expired under a paused holder, Redis restarted and forgot it), two
dispatchers may both claim, and the partial unique index turns the second
claim into a lost race. So it is held only around the short claim-and-hand-off
step, never while terraform runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # redis-py is imported by whoever made the client: `runq show`, which
    # imports the dispatcher to apply its rules, takes no lock (issue 8).
    from redis import Redis

log = logging.getLogger(__name__)


def lock_key(workspace: str) -> str:
    return f"runq:lock:workspace:{workspace}"


def dirty_key(workspace: str) -> str:
    return f"runq:dirty:workspace:{workspace}"


@dataclass
class Held:
    """Whether the lock was taken; after release, whether anyone marked the
    workspace dirty while it was held (then the holder must look again)."""

    acquired: bool
    was_dirty: bool = False

    def __bool__(self) -> bool:
        return self.acquired


@contextmanager
def workspace_lock(redis: Redis, workspace: str, *, ttl: float) -> Iterator[Held]:
    """Try the lock once, without waiting; yield a :class:`Held`.

    A caller that finds it busy leaves a *dirty* mark, which the holder reads
    after releasing, so the wake-up the caller carried is not lost. Nobody
    waits for a lock here: a paused holder cannot pin other processes.

    The lock is token-owned (redis-py's ``Lock``): releasing checks the token
    in a Lua script, so a holder whose TTL expired cannot release the lock a
    successor now holds.
    """
    from redis.exceptions import LockNotOwnedError

    lock = redis.lock(lock_key(workspace), timeout=ttl, thread_local=False)
    dirty = dirty_key(workspace)
    if not lock.acquire(blocking=False):
        redis.set(dirty, 1, ex=max(1, math.ceil(2 * ttl)))
        # The holder may have released (and read the mark) just before we
        # set it: try once more, or that wake-up would wait for the reconciler.
        if not lock.acquire(blocking=False):
            yield Held(False)
            return
    # Marks left before we held the lock are answered by what we read now.
    redis.delete(dirty)
    held = Held(True)
    try:
        yield held
    finally:
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
        held.was_dirty = bool(redis.delete(dirty))
