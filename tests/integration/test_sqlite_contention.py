"""Several OS processes write one SQLite file at once: no "database is locked"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from executors.base import Finished, PhaseResult, Started
from scheduler import dispatcher, reports, tasks
from scheduler.messages import RecordingPublisher
from scheduler.models import Task, TaskEvent
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import make_workspace

PROCESSES = 4
ROUNDS = 25
ROOT = Path(__file__).resolve().parents[2]


def worker(url: str, data_dir: str, index: str) -> None:
    """One process: ROUNDS plans submitted, claimed and finished, and every
    fifth round a plan+apply submitted and cancelled."""
    rt = Runtime(
        settings=Settings(database_url=url, data_dir=Path(data_dir), redis_url="redis://unused"),
        publisher=RecordingPublisher(),
        actor=f"proc-{index}",
    )
    done = {"plans": 0, "cancelled": 0}
    try:
        for i in range(ROUNDS):
            t = tasks.submit(rt, "shared", TaskType.PLAN, message=f"{index}-{i}")
            d = dispatcher.claim_plan(rt, t.id)
            assert d.claimed and d.fence is not None, d
            assert reports.accept(rt, Started(t.id, d.fence, Phase.PLAN, f"proc-{index}"))
            assert reports.accept(
                rt, Finished(t.id, d.fence, Phase.PLAN, PhaseResult(ok=True, has_changes=False))
            )
            done["plans"] += 1
            if i % 5 == 0:
                pa = tasks.submit(rt, "shared", TaskType.PLAN_AND_APPLY)
                tasks.cancel(rt, pa.id)
                done["cancelled"] += 1
    finally:
        rt.close()
    print(json.dumps(done))


def test_processes_share_one_sqlite_file(sqlite_url: str, tmp_path: Path, redis_url: str) -> None:
    rt = Runtime(
        settings=Settings(database_url=sqlite_url, data_dir=tmp_path, redis_url=redis_url),
        publisher=RecordingPublisher(),
    )
    make_workspace(rt, "shared", tmp_path / "src")
    db_path = sqlite_url.removeprefix("sqlite:///")
    code = (
        "import sys; from tests.integration.test_sqlite_contention import worker; "
        "worker(*sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNQ_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, sqlite_url, str(tmp_path), str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert "database is locked" not in err
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"plans": ROUNDS, "cancelled": 5}

    per_process_pa = (ROUNDS + 4) // 5
    with rt.sessions() as s:
        rows = s.execute(select(Task.type, Task.status, Task.queue_seq)).all()
        n_events = s.scalar(select(func.count()).select_from(TaskEvent))
        by_status = Counter((r.type, r.status) for r in rows)
        seqs = sorted(r.queue_seq for r in rows)
    total = PROCESSES * (ROUNDS + per_process_pa)
    assert len(rows) == total
    assert seqs == list(range(1, total + 1)), "every submit got its own queue position"
    assert by_status == {
        (TaskType.PLAN, TaskStatus.SUCCESS): PROCESSES * ROUNDS,
        (TaskType.PLAN_AND_APPLY, TaskStatus.CANCELLED): PROCESSES * per_process_pa,
    }
    # created, claimed, finished per plan; created, cancelled per plan+apply
    assert n_events == PROCESSES * (3 * ROUNDS + 2 * per_process_pa)
    assert Path(db_path).is_file()
    rt.close()
