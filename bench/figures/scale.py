"""One dispatch and one plan claim at a large backlog against a small one.

Two databases, bulk-loaded (:mod:`bench.bulk`, then ``ANALYZE``): a small
one (1k queued tasks: 100 workspaces x 10) and a large one (100k queued:
10k workspaces x 10), half plans, half plan+apply. In-process (no workers),
with a :class:`~scheduler.messages.RecordingPublisher` runtime and the
private Redis for the workspace lock, each sample times one
``dispatcher.claim_plan(rt, id)`` of a random pending plan, or one
``dispatcher.dispatch(rt, ws)`` of a random workspace, with
``time.perf_counter``. After each sample the bench puts the workspace's
rows back as they were (tasks UPDATEd from a snapshot, new events deleted),
outside the timing, so the queue keeps its size. Median per repetition;
sizes and modes alternate between repetitions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg

from bench import bulk
from bench.harness import Bench, pg_url, rotate
from scheduler import dispatcher
from scheduler.dispatcher import Decision
from scheduler.messages import RecordingPublisher
from scheduler.models import utcnow
from scheduler.runtime import Runtime
from scheduler.states import DispatchMode


class Restorer:
    """Snapshots a workspace's task rows and puts them back afterwards."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(pg_url(database_url), autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def snapshot(self, workspace: str) -> tuple[list[str], list[tuple[Any, ...]], int]:
        cur = self.conn.execute(
            "SELECT t.* FROM tasks t JOIN workspaces w ON w.id = t.workspace_id WHERE w.name = %s",
            (workspace,),
        )
        cols = [d.name for d in cur.description or ()]
        rows = cur.fetchall()
        top = self.conn.execute("SELECT coalesce(max(id), 0) FROM task_events").fetchone()
        assert top is not None
        return cols, rows, int(top[0])

    def restore(self, snap: tuple[list[str], list[tuple[Any, ...]], int]) -> None:
        cols, rows, top = snap
        sets = ", ".join(f"{c} = %s" for c in cols if c != "id")
        with self.conn.transaction():
            for row in rows:
                values = [v for c, v in zip(cols, row, strict=True) if c != "id"]
                self.conn.execute(
                    f"UPDATE tasks SET {sets} WHERE id = %s",  # noqa: S608 - column names
                    (*values, row[cols.index("id")]),
                )
            self.conn.execute("DELETE FROM task_events WHERE id > %s", (top,))


class Backlog:
    """A bulk-loaded database and the names/ids to sample from."""

    def __init__(self, bench: Bench, label: str, n_workspaces: int, per_workspace: int) -> None:
        self.label = label
        self.url = bench.new_database(f"runq_bench_{label}")
        tid = bulk.template(bench, self.url)
        started = time.monotonic()
        bulk.load(
            self.url,
            f"q{label}",
            n_workspaces,
            per_workspace,
            template_id=tid,
            created_at=utcnow(),
            plan_share=0.5,
        )
        self.load_s = time.monotonic() - started
        with psycopg.connect(pg_url(self.url)) as conn:
            self.plans: list[tuple[int, str]] = [
                (int(r[0]), str(r[1]))
                for r in conn.execute(
                    "SELECT t.id, w.name FROM tasks t JOIN workspaces w ON w.id = t.workspace_id"
                    " WHERE t.status = 'pending' AND t.type = 'plan'"
                ).fetchall()
            ]
            self.queued = len(
                conn.execute("SELECT id FROM tasks WHERE status = 'pending'").fetchall()
            )
        self.workspaces = sorted({name for _, name in self.plans})


def _time(
    rt: Runtime, restorer: Restorer, workspace: str, call: Callable[[], Decision]
) -> tuple[float, str]:
    snap = restorer.snapshot(workspace)
    began = time.perf_counter()
    decision = call()
    took = 1000 * (time.perf_counter() - began)
    restorer.restore(snap)
    rt.redis.delete(f"runq:dirty:workspace:{workspace}")
    return took, decision.action


def measure(
    bench: Bench, backlog: Backlog, mode: DispatchMode, samples: int, rng: random.Random
) -> dict[str, Any]:
    restorer = Restorer(backlog.url)
    actions: dict[str, int] = {}
    out: dict[str, Any] = {"claim_ms": [], "dispatch_ms": []}
    try:
        with bench.local_runtime(mode, RecordingPublisher(), backlog.url) as rt:
            for _ in range(samples):
                task_id, ws = rng.choice(backlog.plans)
                took, action = _time(rt, restorer, ws, partial(dispatcher.claim_plan, rt, task_id))
                out["claim_ms"].append(took)
                actions[f"claim:{action}"] = actions.get(f"claim:{action}", 0) + 1
                ws = rng.choice(backlog.workspaces)
                took, action = _time(rt, restorer, ws, partial(dispatcher.dispatch, rt, ws))
                out["dispatch_ms"].append(took)
                actions[f"dispatch:{action}"] = actions.get(f"dispatch:{action}", 0) + 1
    finally:
        restorer.close()
    out["actions"] = actions
    return out


def run(bench: Bench, sizes: dict[str, tuple[int, int]], reps: int, samples: int) -> dict[str, Any]:
    """Per size label, per mode: every repetition's samples."""
    backlogs = [Backlog(bench, label, n, k) for label, (n, k) in sizes.items()]
    rng = random.Random(7)  # noqa: S311 - sampling, not secrets
    result: dict[str, Any] = {
        b.label: {"queued": b.queued, "load_s": b.load_s, "new": [], "legacy": []} for b in backlogs
    }
    for rep in range(reps):
        for backlog in rotate(backlogs, rep):
            for mode in rotate([DispatchMode.NEW, DispatchMode.LEGACY], rep):
                measure(bench, backlog, mode, 3, rng)  # warm-up, unrecorded
                got = measure(bench, backlog, mode, samples, rng)
                result[backlog.label][str(mode)].append(got)
    return result
