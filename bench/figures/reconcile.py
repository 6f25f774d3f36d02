"""One reconciler sweep over a large backlog: messages published, seconds.

A fresh database gets, through :mod:`bench.bulk`, a backlog of pending tasks
(10 per workspace, 8 plans and 2 plan+apply in every ten) created an hour
ago (older than ``RUNQ_RESEND_AFTER``), and 10 more workspaces with one
such pending plan each. The backlog's hints are put in the private Redis
broker the way ``tasks.submit`` publishes them (a claim hint per plan and a
dispatch per plan+apply in new mode, a dispatch per task in legacy mode),
through runq's Celery publisher; the 10 extra plans have no message
anywhere: they are what is genuinely owed. The broker's keys are then saved
(``DUMP``) and put back before every sweep, so each sweep sees the same
queues. No worker consumes. ``reconciler.sweep(rt)`` runs in-process with a
publisher that records each message and forwards it to the broker; the
figure is how many it sent, against the 10 owed, and how long it took.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import psycopg
from redis import Redis

from bench import bulk
from bench.harness import Bench, pg_url, rotate
from celery_app.runtime import CeleryPublisher, private_app
from scheduler import messages, reconciler
from scheduler.messages import Message, Publisher
from scheduler.models import utcnow
from scheduler.states import DispatchMode, TaskType

OWED = 10


class Forwarding:
    """Records every message, then hands it to the real publisher."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.sent: list[Message] = []

    def publish(self, message: Message) -> str:
        self.sent.append(message)
        return self.inner.publish(message)

    def depth(self, queue: str) -> int | None:
        """The real publisher's answer (the reconciler asks queue depths)."""
        if isinstance(self.inner, messages.QueueDepths):
            return self.inner.depth(queue)
        return None


def hints(rows: list[tuple[int, str, str]], mode: DispatchMode) -> list[Message]:
    """What ``tasks.submit`` publishes for these (id, type, workspace) rows."""
    return [
        messages.claim_plan(task_id)
        if kind == TaskType.PLAN and mode is DispatchMode.NEW
        else messages.dispatch(ws)
        for task_id, kind, ws in rows
    ]


Snapshot = dict[bytes, bytes]


def _dump(redis: Redis) -> Snapshot:
    out: Snapshot = {}
    for key in redis.scan_iter(count=1000):
        value = redis.dump(key)
        if value is not None:
            out[key] = value
    return out


def _restore(redis: Redis, snap: Snapshot) -> None:
    redis.flushdb()
    pipe = redis.pipeline(transaction=False)
    for key, value in snap.items():
        pipe.restore(key, 0, value)
    pipe.execute()


def run(bench: Bench, backlog: int, reps: int) -> dict[str, Any]:
    url = bench.new_database("runq_bench_reconcile")
    tid = bulk.template(bench, url)
    old = utcnow() - timedelta(hours=1)
    started = time.monotonic()
    bulk.load(url, "backlog", backlog // 10, 10, template_id=tid, created_at=old, plan_share=0.8)
    bulk.load(url, "owed", OWED, 1, template_id=tid, created_at=old, plan_share=1.0)
    load_s = time.monotonic() - started
    with psycopg.connect(pg_url(url)) as conn:
        rows = [
            (int(r[0]), str(r[1]), str(r[2]))
            for r in conn.execute(
                "SELECT t.id, t.type, w.name FROM tasks t JOIN workspaces w"
                " ON w.id = t.workspace_id WHERE w.name LIKE 'backlog-%' ORDER BY t.id"
            ).fetchall()
        ]
    redis = Redis.from_url(bench.redis.url)
    result: dict[str, Any] = {"backlog": len(rows), "owed": OWED, "load_s": load_s}
    try:
        snaps: dict[DispatchMode, Snapshot] = {}
        for mode in (DispatchMode.NEW, DispatchMode.LEGACY):
            redis.flushdb()
            settings = bench.settings(mode, url)
            app = private_app(settings, f"bench-backlog-{mode}")
            try:
                with app.producer_or_acquire() as producer:
                    for hint in hints(rows, mode):
                        app.send_task(
                            hint.task, args=list(hint.args), queue=hint.queue, producer=producer
                        )
            finally:
                app.close()
            snaps[mode] = _dump(redis)
        for mode in DispatchMode:
            result[str(mode)] = []
        for rep in range(reps):
            for mode in rotate([DispatchMode.NEW, DispatchMode.LEGACY], rep):
                _restore(redis, snaps[mode])
                settings = bench.settings(mode, url)
                app = private_app(settings, f"bench-sweep-{mode}")
                recorder = Forwarding(CeleryPublisher(app))
                try:
                    with bench.local_runtime(mode, recorder, url) as rt:
                        began = time.perf_counter()
                        sweep = reconciler.sweep(rt)
                        took = time.perf_counter() - began
                finally:
                    app.close()
                result[str(mode)].append(
                    {
                        "messages": len(recorder.sent),
                        "seconds": took,
                        "plans": len(sweep.plans),
                        "workspaces": len(sweep.workspaces),
                    }
                )
    finally:
        redis.flushdb()
        redis.close()
    return result
