"""The floor for serialized dispatch: a minimal claim loop doing the same work.

N processes (as many as the worker processes runq gets) loop over W
workspaces, each claim being: take the workspace's Redis lock (redis-py's
token lock: ``SET NX PX``, released by a compare-and-delete script), SELECT
the head pending row of a plain bench table for that workspace, a
conditional ``UPDATE ... WHERE status = 'pending'``, an event INSERT,
COMMIT, one small message ``LPUSH``-ed to a Redis list, release the lock. A
busy lock moves the process on to the next workspace. psycopg directly, on
the same PostgreSQL and the same private Redis; claims/s is taken as for
runq: claim events over the window from the first to the last.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from multiprocessing.synchronize import Event as MpEvent

import psycopg
from redis import Redis

SCHEMA = """
DROP TABLE IF EXISTS bench_floor_events, bench_floor_tasks;
CREATE TABLE bench_floor_tasks (
    id bigserial PRIMARY KEY,
    workspace text NOT NULL,
    seq int NOT NULL,
    status text NOT NULL DEFAULT 'pending'
);
CREATE INDEX ON bench_floor_tasks (workspace, status, seq);
CREATE TABLE bench_floor_events (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL REFERENCES bench_floor_tasks (id),
    to_status text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""
QUEUE = "bench:floor:messages"


def _loop(pg: str, redis_url: str, names: list[str], offset: int, go: MpEvent) -> None:
    redis = Redis.from_url(redis_url)
    conn = psycopg.connect(pg)
    left = names[offset:] + names[:offset]
    go.wait()
    try:
        while left:
            for name in list(left):
                lock = redis.lock(f"bench:floor:lock:{name}", timeout=30, thread_local=False)
                if not lock.acquire(blocking=False):
                    continue
                try:
                    with conn.transaction():
                        row = conn.execute(
                            "SELECT id FROM bench_floor_tasks WHERE workspace = %s"
                            " AND status = 'pending' ORDER BY seq LIMIT 1",
                            (name,),
                        ).fetchone()
                        if row is None:
                            left.remove(name)
                            continue
                        claimed = conn.execute(
                            "UPDATE bench_floor_tasks SET status = 'claimed'"
                            " WHERE id = %s AND status = 'pending'",
                            (row[0],),
                        ).rowcount
                        if claimed:
                            conn.execute(
                                "INSERT INTO bench_floor_events (task_id, to_status)"
                                " VALUES (%s, 'claimed')",
                                (row[0],),
                            )
                    if claimed:
                        redis.lpush(QUEUE, json.dumps({"task": row[0], "workspace": name}))
                finally:
                    lock.release()
    finally:
        conn.close()
        redis.close()


def run(pg: str, redis_url: str, processes: int, n_workspaces: int, claims_each: int) -> float:
    """Claims per second of ``processes`` loops over ``n_workspaces`` x
    ``claims_each`` rows (fresh tables in database ``pg``)."""
    names = [f"floor-{i}" for i in range(n_workspaces)]
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(SCHEMA)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO bench_floor_tasks (workspace, seq) VALUES (%s, %s)",
                [(name, seq) for seq in range(claims_each) for name in names],
            )
        conn.execute("ANALYZE bench_floor_tasks")
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [
        ctx.Process(
            target=_loop,
            args=(pg, redis_url, names, i * n_workspaces // processes, go),
            daemon=True,
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        go.set()
        for p in procs:
            p.join(600)
            assert p.exitcode == 0, f"floor loop exited {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    with psycopg.connect(pg) as conn:
        row = conn.execute(
            "SELECT count(*), extract(epoch FROM max(at) - min(at)) FROM bench_floor_events"
        ).fetchone()
    assert row is not None
    count, window = int(row[0]), float(row[1])
    assert count == n_workspaces * claims_each, f"floor made {count} claims"
    return count / window
