"""The real ``runq`` console script, run as a subprocess.

Messages the CLI publishes go to the machine's Redis as the Celery broker, in
the test database (``redis_url``, db 15, flushed per test), where they are
read back.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

RUNQ = Path(sys.prefix) / "bin" / "runq"
TASK_KEYS = {
    "id",
    "workspace",
    "type",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "changes",
    "error",
    # issue 5: who runs the current phase, plan attempts, a pending cancel
    "executor",
    "plan_attempts",
    "cancel",
}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def error(self) -> str:
        """The error message a ``--json`` command printed on stderr."""
        return str(json.loads(self.err)["error"])


@dataclass
class Cli:
    env: dict[str, str]
    source: Path

    def __call__(self, *args: str, as_json: bool = True) -> Result:
        argv = [str(RUNQ), *args, *(["--json"] if as_json else [])]
        proc = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str) -> Any:
        r = self(*args)
        assert r.code == 0, r.err
        return r.json()


@pytest.fixture
def cli(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Cli:
    """The CLI against a fresh SQLite file, or (``db_url`` param) PostgreSQL."""
    if getattr(request, "param", "sqlite") == "postgres":
        url = str(request.getfixturevalue("pg_url"))
    else:
        url = f"sqlite:///{tmp_path / 'cli' / 'runq.db'}"  # not migrated yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNQ_")}
    env.update(
        RUNQ_DATABASE_URL=url,
        RUNQ_REDIS_URL=redis_url,
        RUNQ_DATA_DIR=str(tmp_path / "data"),
    )
    source = tmp_path / "src"
    source.mkdir()
    return Cli(env, source)


def broker_messages(redis_url: str, queue: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of the Celery messages waiting in ``queue``."""
    client = Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    found = []
    for item in raw:
        envelope = json.loads(item)
        body = json.loads(base64.b64decode(envelope["body"]))
        found.append((envelope["headers"]["task"], body[0]))
    return sorted(found, key=repr)


@pytest.mark.parametrize("cli", ["sqlite", "postgres"], indirect=True)
def test_cli_end_to_end(cli: Cli, redis_url: str) -> None:
    assert cli.ok("db", "upgrade")["revision"] == "0003"

    ws = cli.ok("workspace", "create", "net", "--dir", str(cli.source))
    assert (ws["name"], ws["execution_mode"], ws["locked"]) == ("net", "local", False)
    assert ws["source_dir"] == str(cli.source.resolve())
    assert [w["name"] for w in cli.ok("workspace", "list")] == ["net"]

    plan = cli.ok("submit", "net", "--type", "plan", "--message", "look")
    assert set(plan) >= TASK_KEYS
    assert (plan["workspace"], plan["type"], plan["status"], plan["changes"]) == (
        "net",
        "plan",
        "pending",
        {"add": None, "change": None, "destroy": None},
    )
    assert plan["started_at"] is None and plan["finished_at"] is None and plan["error"] is None
    # Not running, never claimed, no cancel asked for.
    assert (plan["executor"], plan["plan_attempts"], plan["cancel"]) == (None, 0, None)
    pa = cli.ok("submit", "net", "--type", "plan_and_apply")
    assert (pa["type"], pa["status"], pa["queue_position"]) == ("plan_and_apply", "pending", 2)

    # The hints reached the broker, on their queues.
    assert broker_messages(redis_url, "runq.plans") == [("runq.claim_plan", [plan["id"]])]
    assert broker_messages(redis_url, "runq.dispatch") == [("runq.dispatch", ["net"])]

    shown = cli.ok("show", str(plan["id"]))
    assert shown["id"] == plan["id"] and shown["message"] == "look"
    assert [(e["from"], e["to"]) for e in shown["events"]] == [(None, "pending")]

    listed = cli.ok("list", "--workspace", "net", "--status", "pending")
    assert [t["id"] for t in listed] == [pa["id"], plan["id"]]

    locked = cli.ok("workspace", "lock", "net", "--reason", "freeze")
    assert (locked["locked"], locked["locked_by"], locked["lock_reason"]) == (
        True,
        f"cli:{getpass.getuser()}",
        "freeze",
    )
    assert cli.ok("workspace", "unlock", "net")["locked"] is False

    # confirm a plan task: an error, on stderr only.
    r = cli("confirm", str(plan["id"]))
    assert r.code == 1
    assert r.out == ""
    err = json.loads(r.err)
    assert err["type"] == "IllegalTransition" and "plan task" in err["error"]

    # wait on a pending task times out with exit 4.
    r = cli("wait", str(plan["id"]), "--timeout", "0.5")
    assert r.code == 4 and r.out == ""
    assert json.loads(r.err)["type"] == "WaitTimeout"

    cancelled = cli.ok("cancel", str(pa["id"]))
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert [t["id"] for t in cli.ok("list", "--status", "cancelled")] == [pa["id"]]
    r = cli("cancel", str(pa["id"]))
    assert r.code == 1 and r.out == ""

    assert cli.ok("logs", str(plan["id"])) == {"task_id": plan["id"], "logs": {}}

    # Nothing above moved the plan.
    assert cli.ok("show", str(plan["id"]))["status"] == "pending"


def test_cli_bad_input(cli: Cli, redis_url: str) -> None:
    cli.ok("db", "upgrade")
    cli.ok("workspace", "create", "net", "--dir", str(cli.source))

    r = cli("submit", "nope", "--type", "plan")
    assert (r.code, r.out) == (3, "")
    assert json.loads(r.err)["type"] == "WorkspaceNotFound"

    r = cli("submit", "net", "--type", "apply")
    assert (r.code, r.out) == (1, "")
    assert json.loads(r.err)["type"] == "InvalidInput"

    for verb in ("show", "confirm", "cancel", "logs"):
        r = cli(verb, "999999")
        assert (r.code, r.out) == (3, ""), verb
        assert json.loads(r.err)["type"] == "TaskNotFound"

    r = cli("workspace", "create", "net", "--dir", str(cli.source))
    assert r.code == 1 and json.loads(r.err)["type"] == "WorkspaceExists"
    r = cli("workspace", "create", "bad name", "--dir", str(cli.source))
    assert r.code == 1 and "invalid workspace name" in json.loads(r.err)["error"]
    r = cli("workspace", "create", "nodir")
    assert r.code == 1 and "--dir" in json.loads(r.err)["error"]

    r = cli("list", "--status", "bogus")
    assert r.code == 1 and json.loads(r.err)["type"] == "InvalidInput"

    # None of that queued anything.
    assert cli.ok("list") == []
    assert broker_messages(redis_url, "runq.plans") == []
    assert broker_messages(redis_url, "runq.dispatch") == []


def test_cli_human_output(cli: Cli) -> None:
    assert cli("db", "upgrade", as_json=False).code == 0
    assert cli("workspace", "create", "net", "--dir", str(cli.source), as_json=False).code == 0
    r = cli("submit", "net", "--type", "plan", as_json=False)
    assert r.code == 0 and "net" in r.out and "pending" in r.out

    r = cli("show", "999999", as_json=False)
    assert r.code == 3
    assert r.err.strip() == "runq: error: task 999999 does not exist"

    r = cli("logs", "1", as_json=False)
    assert r.code == 0 and "no logs yet" in r.err


def test_cli_against_an_unreachable_database(cli: Cli) -> None:
    cli.env["RUNQ_DATABASE_URL"] = "postgresql+psycopg://postgres@127.0.0.1:1/none"
    r = cli("workspace", "list")
    assert r.code == 1 and r.out == ""
    assert "OperationalError" in json.loads(r.err)["error"]
    assert "Traceback" not in r.err


def test_pool_agent_and_state_commands(cli: Cli, tmp_path: Path) -> None:
    """runq pool create/list, agent list, and state versions/show, as a user
    runs them; the stored states come through the scheduler's own path."""
    cli.ok("db", "upgrade")
    created = cli.ok("pool", "create", "builders")
    assert created["name"] == "builders" and len(created["token"]) >= 40
    assert [(p["name"], p["kind"], p["capacity"]) for p in cli.ok("pool", "list")] == [
        ("builders", "agent", 0)
    ]
    again = cli("pool", "create", "builders")
    assert again.code == 1 and "exists already" in again.error
    assert cli.ok("agent", "list") == []
    usage = cli("agent", as_json=False)
    assert usage.code == 2 and "needs --pool" in usage.err

    # An agent workspace whose pool is gone: a clear error, nothing inserted.
    cli.ok(
        "workspace",
        "create",
        "far",
        "--mode",
        "agent",
        "--agent-pool",
        "ghost",
        "--dir",
        str(cli.source),
    )
    refused = cli("submit", "far", "--type", "plan")
    assert refused.code == 3 and "agent pool 'ghost' does not exist" in refused.error
    assert cli.ok("list") == []

    # Two states stored for a workspace, then listed and shown.
    cli.ok("workspace", "create", "net", "--dir", str(cli.source))
    assert cli.ok("state", "versions", "net") == []
    missing = cli("state", "show", "net")
    assert missing.code == 3 and "no stored state" in missing.error
    _store_two_states(cli.env["RUNQ_DATABASE_URL"], "net")
    versions = cli.ok("state", "versions", "net")
    assert [(v["version"], v["serial"]) for v in versions] == [(1, 1), (2, 2)]
    current = cli.ok("state", "show", "net")
    assert (current["version"], current["serial"], current["state"]["serial"]) == (2, 2, 2)
    first = cli("state", "show", "net", "--version", "1", as_json=False)
    assert first.code == 0 and json.loads(first.out)["serial"] == 1
    beyond = cli("state", "show", "net", "--version", "3")
    assert beyond.code == 3 and "versions 1..2" in beyond.error


def _store_two_states(url: str, workspace: str) -> None:
    from executors.base import StateWritten
    from scheduler import artifacts, workspaces
    from scheduler.db import make_engine
    from scheduler.models import Task
    from scheduler.states import TaskStatus, TaskType

    engine = make_engine(url)
    try:
        from sqlalchemy.orm import Session

        with Session(engine) as s, s.begin():
            ws = workspaces.load(s, workspace)
            task = Task(
                workspace_id=ws.id,
                type=TaskType.PLAN_AND_APPLY,
                status=TaskStatus.APPLYING,
                queue_seq=1,
                fence=2,
            )
            s.add(task)
            s.flush()
            for serial in (1, 2):
                doc = {"version": 4, "serial": serial, "lineage": "L", "resources": []}
                reply = artifacts.store_state(
                    s, StateWritten(task.id, 2, serial, "L", json.dumps(doc).encode())
                )
                assert reply.accepted, reply
    finally:
        engine.dispose()
