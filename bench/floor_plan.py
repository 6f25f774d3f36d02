"""The floor for a plan's round trip: the least a durable scheduler must do.

What no design that keeps its queue in PostgreSQL can skip, written in
psycopg directly with no ORM, no settings, no logging and no checks: the
client INSERTs the task and its event and COMMITs, then sends one Celery
message; a worker UPDATEs the row to ``planning`` (a conditional UPDATE,
the claim) with its start time and INSERTs the event, COMMIT; then marks it
``success`` the same way (the finish). Same broker, same queues, same worker
flags as runq and bare Celery: the task runs in :mod:`bench.bare`'s app.

Latency is the client's time before the INSERT to the claim's start time;
throughput is N / (last finish - first INSERT). Set against bare Celery's
no-op, it is the price of durability plus one hop; set against runq, the
rest is runq's own code.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_plan_tasks (
    id bigserial PRIMARY KEY,
    status text NOT NULL DEFAULT 'pending',
    fence bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at timestamptz,
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS bench_plan_events (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL REFERENCES bench_plan_tasks (id),
    to_status text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""
TASK = "bench.floor_plan"

CLAIM = """
WITH claimed AS (
    UPDATE bench_plan_tasks SET status = 'planning', fence = fence + 1,
        started_at = clock_timestamp()
    WHERE id = %s AND status = 'pending' RETURNING id
)
INSERT INTO bench_plan_events (task_id, to_status) SELECT id, 'planning' FROM claimed
"""
FINISH = """
WITH done AS (
    UPDATE bench_plan_tasks SET status = 'success', finished_at = clock_timestamp()
    WHERE id = %s AND status = 'planning' RETURNING id
)
INSERT INTO bench_plan_events (task_id, to_status) SELECT id, 'success' FROM done
"""


@cache
def _conn(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url)


def run_plan(url: str, task_id: int) -> None:
    """The worker's side: claim (one statement, committed), then finish."""
    conn = _conn(url)
    with conn.transaction():
        conn.execute(CLAIM, (task_id,))
    with conn.transaction():
        conn.execute(FINISH, (task_id,))


class Client:
    """The client's side: insert + commit, then send the hint."""

    def __init__(self, url: str, app: Any) -> None:
        self.url = url
        self.app = app
        self.conn = psycopg.connect(url, autocommit=False)
        with self.conn.transaction():
            self.conn.execute(SCHEMA)

    def close(self) -> None:
        with self.conn.transaction():
            self.conn.execute("TRUNCATE bench_plan_events, bench_plan_tasks")
        self.conn.close()

    def submit(self) -> int:
        with self.conn.transaction():
            row = self.conn.execute(
                "WITH t AS (INSERT INTO bench_plan_tasks DEFAULT VALUES RETURNING id) "
                "INSERT INTO bench_plan_events (task_id, to_status) "
                "SELECT id, 'pending' FROM t RETURNING task_id"
            ).fetchone()
        assert row is not None
        task_id = int(row[0])
        self.app.send_task(TASK, args=[self.url, task_id])
        return task_id

    def latency(self) -> float:
        began = time.time()
        task_id = self.submit()
        deadline = time.monotonic() + 60
        while True:
            row = self.conn.execute(
                "SELECT started_at FROM bench_plan_tasks WHERE id = %s", (task_id,)
            ).fetchone()
            self.conn.rollback()
            if row is not None and row[0] is not None:
                return float(row[0].timestamp()) - began
            assert time.monotonic() < deadline, "the floor plan was never claimed"
            time.sleep(0.001)

    def throughput(self, n: int) -> float:
        began = time.time()
        ids = [self.submit() for _ in range(n)]
        deadline = time.monotonic() + 600
        while True:
            row = self.conn.execute(
                "SELECT count(*), max(finished_at) FROM bench_plan_tasks"
                " WHERE id = ANY(%s) AND finished_at IS NOT NULL",
                (ids,),
            ).fetchone()
            self.conn.rollback()
            assert row is not None
            if row[0] == n:
                return n / (float(row[1].timestamp()) - began)
            assert time.monotonic() < deadline, "the floor plans did not drain"
            time.sleep(0.02)
