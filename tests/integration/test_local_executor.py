"""PhaseRunner with the real terraform binary (1.0.3), in this process.

Tasks go through the real scheduler functions: ``submit`` (which snapshots
the workspace's directory into a configuration version), then
``dispatcher.claim_plan`` / ``dispatcher.dispatch`` on the messages a
:class:`RecordingPublisher` caught, and the phase runs from the
``runq.execute(task_id, fence)`` message: the :class:`Bundle` is built from
the database (:func:`scheduler.local_runs.execute`) and run by
``PhaseRunner(...).run`` with a :class:`DirectReporter`, as a worker does. A
:class:`Pump` replays the recorded messages in order: a Celery worker with the
broker replaced by a list.

Nothing a run needs or leaves is on the worker's disk: the workspace's
Terraform state lives in ``state_versions`` (assertions read
:func:`scheduler.artifacts.latest`), the saved plan in ``plan_artifacts``,
the output in ``log_chunks``; a phase's working copy is removed when it ends
(tests that look into one set ``keep_workdirs``).

Configurations need no download: outputs only, or ``hashicorp/null`` 2.1.2
from the filesystem mirror of the ``terraform_env`` fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from executors import archive
from executors.base import Handoff
from executors.local import PLAN_FILE, STATE_FILE
from scheduler import artifacts, local_runs, tasks, workspaces
from scheduler.errors import InvalidInput
from scheduler.messages import (
    TASK_EXECUTE,
    RecordingPublisher,
)
from scheduler.models import ConfigurationVersion, PlanArtifact, StateVersion, Task
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import Phase, TaskStatus
from scheduler.supervise import RedisServer
from scheduler.views import TaskView
from tests.integration.helpers import deliver_hint
from tests.runner_harness import latest_working_copy, working_copies

pytestmark = [pytest.mark.terraform, pytest.mark.redis]

NULL_PROVIDER = """\
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}
"""


def null_config(count: int, extra: str = "") -> str:
    """``count`` null_resources (stable: no changes once applied)."""
    return (
        NULL_PROVIDER
        + f'resource "null_resource" "r" {{\n  count = {count}\n{extra}}}\n'
        + 'output "ids" {\n  value = null_resource.r[*].id\n}\n'
    )


class Pump:
    """Delivers recorded broker messages to the code a worker would run."""

    def __init__(self, rt: Runtime, publisher: RecordingPublisher) -> None:
        self.rt = rt
        self.publisher = publisher
        self.delivered = 0
        self.handoffs: list[Handoff] = []

    def run(self) -> None:
        while self.delivered < len(self.publisher.sent):
            message = self.publisher.sent[self.delivered]
            self.delivered += 1
            if deliver_hint(self.rt, message):
                pass
            elif message.task == TASK_EXECUTE:
                task_id, fence = message.args  # only these travel
                ran = local_runs.execute(self.rt, task_id, fence)
                assert isinstance(ran, local_runs.Ran), f"execute{message.args}: {ran}"
                self.handoffs.append(ran.bundle.handoff)
            else:
                raise AssertionError(f"unexpected message {message}")


class Harness:
    def __init__(self, rt: Runtime, publisher: RecordingPublisher, root: Path) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.pump = Pump(rt, publisher)
        self.root = root

    def workspace(self, name: str, config: str, *, auto_apply: bool = False) -> Path:
        src = self.root / "src" / name
        src.mkdir(parents=True)
        (src / "main.tf").write_text(config)
        workspaces.create(self.rt, name, source_dir=str(src), auto_apply=auto_apply)
        return src

    def run(self, workspace: str, task_type: str) -> TaskView:
        """Submit a task and deliver messages until nothing is left to do."""
        task = tasks.submit(self.rt, workspace, task_type)
        self.pump.run()
        return tasks.get(self.rt, task.id)

    def confirm(self, task_id: int) -> TaskView:
        tasks.confirm(self.rt, task_id)
        self.pump.run()
        return tasks.get(self.rt, task_id)

    def plan_and_apply(self, workspace: str) -> TaskView:
        planned = self.run(workspace, "plan_and_apply")
        assert planned.status is TaskStatus.APPLY_PENDING, planned
        return self.confirm(planned.id)

    def log(self, task_id: int, phase: str) -> str:
        """A phase's output as runq stored it (what ``runq logs`` prints)."""
        with self.rt.sessions() as s:
            return artifacts.log_text(s, task_id, phase).decode()

    def tune(self, **changes: object) -> Settings:
        """Change the settings of the runs from now on (the same database)."""
        self.settings = self.rt.settings = self.settings.model_copy(update=changes)
        return self.settings

    def config_of(self, task_id: int) -> ConfigurationVersion:
        with self.rt.sessions() as s:
            task = s.get(Task, task_id)
            assert task is not None and task.config_version_id is not None
            version = s.get(ConfigurationVersion, task.config_version_id)
            assert version is not None
            s.expunge(version)
            return version

    def config_versions(self, workspace: str) -> list[tuple[int, str]]:
        with self.rt.sessions() as s:
            ws_id = workspaces.load(s, workspace).id
            rows = s.execute(
                select(ConfigurationVersion.id, ConfigurationVersion.sha256)
                .where(ConfigurationVersion.workspace_id == ws_id)
                .order_by(ConfigurationVersion.id)
            ).all()
        return [(r[0], r[1]) for r in rows]

    def versions(self, workspace: str) -> list[StateVersion]:
        """The workspace's stored states, oldest first."""
        with self.rt.sessions() as s:
            ws_id = workspaces.load(s, workspace).id
            return list(
                s.scalars(
                    select(StateVersion)
                    .where(StateVersion.workspace_id == ws_id)
                    .order_by(StateVersion.id)
                )
            )

    def state_bytes(self, workspace: str) -> bytes:
        """The workspace's Terraform state: its newest stored version."""
        with self.rt.sessions() as s:
            latest = artifacts.latest(s, workspaces.load(s, workspace).id)
        assert latest is not None, f"no state stored for {workspace}"
        return latest.content

    def state(self, workspace: str) -> dict[str, Any]:
        return dict(json.loads(self.state_bytes(workspace)))

    def instances(self, workspace: str) -> list[dict[str, Any]]:
        return [
            inst
            for res in self.state(workspace)["resources"]
            if res["type"] == "null_resource"
            for inst in res["instances"]
        ]


def commands(log: str) -> list[str]:
    """The command lines the executor wrote into a phase log."""
    return [line[2:] for line in log.splitlines() if line.startswith("$ ")]


def subcommand_line(log: str, sub: str) -> str:
    [line] = [c for c in commands(log) if c.split()[1] == sub]
    return line


@pytest.fixture
def tf_env(monkeypatch: pytest.MonkeyPatch, terraform_env: dict[str, str]) -> dict[str, str]:
    for key, value in terraform_env.items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("RUNQ_")]:
        monkeypatch.delenv(key)
    return terraform_env


def make_harness(db: str, redis: str, tmp_path: Path, terraform_bin: str) -> Iterator[Harness]:
    settings = Settings(
        database_url=db,
        redis_url=redis,
        data_dir=tmp_path / "data",
        terraform_bin=terraform_bin,
    )
    publisher = RecordingPublisher()
    rt = Runtime(settings=settings, publisher=publisher, actor="test")
    yield Harness(rt, publisher, tmp_path)
    rt.close()


@pytest.fixture
def h_db(
    db_url: str,
    private_redis: RedisServer,
    tmp_path: Path,
    terraform_bin: str,
    tf_env: dict[str, str],
) -> Iterator[Harness]:
    """On SQLite and on PostgreSQL."""
    yield from make_harness(db_url, private_redis.url, tmp_path, terraform_bin)


@pytest.fixture
def h(
    sqlite_url: str,
    private_redis: RedisServer,
    tmp_path: Path,
    terraform_bin: str,
    tf_env: dict[str, str],
) -> Iterator[Harness]:
    yield from make_harness(sqlite_url, private_redis.url, tmp_path, terraform_bin)


# ------------------------------------------------------------------ the flow


@pytest.mark.postgres
def test_plan_and_apply_with_null_provider(h_db: Harness, terraform_bin: str) -> None:
    h = h_db
    # Kept, to compare what terraform left on disk with what runq stored.
    h.tune(keep_workdirs=True)
    h.workspace("net", null_config(2))

    planned = h.run("net", "plan_and_apply")
    assert planned.status is TaskStatus.APPLY_PENDING, planned.error
    assert (planned.has_changes, planned.add, planned.change, planned.destroy) == (
        True,
        2,
        0,
        0,
    )
    plan_log = h.log(planned.id, "plan")
    assert [c.split()[1] for c in commands(plan_log)] == ["init", "plan", "show"]
    assert subcommand_line(plan_log, "init").endswith("init -input=false -no-color")
    plan_line = subcommand_line(plan_log, "plan")
    assert f"plan -input=false -no-color -detailed-exitcode -out={PLAN_FILE}" in plan_line
    # A plan+apply's plan is not speculative: it keeps terraform's lock.
    assert "-lock=false" not in plan_line
    assert "Plan: 2 to add, 0 to change, 0 to destroy." in plan_log
    assert h.versions("net") == []  # planning stored no state

    applied = h.confirm(planned.id)
    assert applied.status is TaskStatus.APPLIED, applied.error
    apply_log = h.log(planned.id, "apply")
    # A fresh working copy on whatever host takes the apply: init installs
    # the providers the saved plan's lock file names, then the plan applies.
    assert commands(apply_log) == [
        f"{terraform_bin} init -input=false -no-color",
        f"{terraform_bin} apply -input=false -no-color -auto-approve {PLAN_FILE}",
    ]
    assert "Apply complete! Resources: 2 added, 0 changed, 0 destroyed." in apply_log
    assert len(h.instances("net")) == 2
    assert [x.phase for x in h.pump.handoffs] == [Phase.PLAN, Phase.APPLY]
    assert not any(x.speculative for x in h.pump.handoffs)
    # Every state the apply wrote is stored under its task and apply fence,
    # serials growing in one lineage; the newest is what terraform left.
    apply_fence = h.pump.handoffs[-1].fence
    versions = h.versions("net")
    assert versions
    assert {(v.task_id, v.fence) for v in versions} == {(planned.id, apply_fence)}
    serials = [v.serial for v in versions]
    assert serials == sorted(set(serials))
    assert len({v.lineage for v in versions}) == 1
    for v in versions:
        assert (v.sha256, v.size) == (hashlib.sha256(v.content).hexdigest(), len(v.content))
        assert json.loads(v.content)["serial"] == v.serial
    final = latest_working_copy(h.settings, planned.id, "apply") / STATE_FILE
    assert versions[-1].content == final.read_bytes()
    # The apply ran in its own working copy, from the plan's saved plan.
    [plan_copy] = working_copies(h.settings, planned.id, "plan")
    assert (plan_copy / PLAN_FILE).read_bytes() == (final.parent / PLAN_FILE).read_bytes()
    with h.rt.sessions() as s:
        saved = s.get(PlanArtifact, planned.id)
        assert saved is not None
        assert saved.fence == h.pump.handoffs[0].fence
        assert (saved.sha256, saved.size) == (archive.sha256(saved.content), len(saved.content))
        assert archive.names(saved.content) == sorted([PLAN_FILE, ".terraform.lock.hcl"])
    # No state file outside the phase's working copy.
    assert not h.settings.state_dir.exists()


def test_logs_per_phase_via_runq_logs(h: Harness, tmp_path: Path) -> None:
    h.workspace("logged", null_config(1))
    task = h.plan_and_apply("logged")
    assert task.status is TaskStatus.APPLIED, task.error
    fences = {x.phase: x.fence for x in h.pump.handoffs if x.task_id == task.id}
    for phase in ("plan", "apply"):
        # This host's copy of the output, per claim, is what runq stored.
        local = h.settings.logs_dir / str(task.id) / f"{phase}-{fences[Phase(phase)]}.log"
        assert local.stat().st_size > 0
        assert local.read_text() == h.log(task.id, phase)
    # Everything that matters was stored: no working copy is left behind.
    assert working_copies(h.settings, task.id) == []

    # `runq logs` on another host (its own, empty data dir) prints it all.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNQ_")}
    env.update(
        RUNQ_DATABASE_URL=h.settings.database_url,
        RUNQ_DATA_DIR=str(tmp_path / "another-host"),
        RUNQ_REDIS_URL=h.settings.redis_url,
    )
    out = subprocess.run(
        [str(Path(sys.executable).parent / "runq"), "logs", "--json", str(task.id)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    logs = json.loads(out.stdout)["logs"]
    assert set(logs) == {"plan", "apply"}
    assert "Plan: 1 to add" in logs["plan"]
    assert "Apply complete! Resources: 1 added" in logs["apply"]
    assert logs == {p: h.log(task.id, p) for p in ("plan", "apply")}


def test_plan_with_no_changes_succeeds(h: Harness) -> None:
    h.workspace("empty", 'locals {\n  unused = "nothing to do"\n}\n')

    plan = h.run("empty", "plan")
    assert plan.status is TaskStatus.SUCCESS, plan.error
    assert (plan.has_changes, plan.add, plan.change, plan.destroy) == (False, 0, 0, 0)

    # A plan+apply whose plan changes nothing is done after planning.
    pa = h.run("empty", "plan_and_apply")
    assert pa.status is TaskStatus.SUCCESS, pa.error
    assert pa.has_changes is False
    assert h.log(pa.id, "apply") == ""
    assert list((h.settings.logs_dir / str(pa.id)).glob("apply-*.log")) == []


def test_output_only_config_counts_as_changes(h: Harness) -> None:
    h.workspace("outputs", 'output "greeting" {\n  value = "hello"\n}\n')

    pa = h.run("outputs", "plan_and_apply")
    # A new output is a change (-detailed-exitcode 2) with no resources.
    assert pa.status is TaskStatus.APPLY_PENDING, pa.error
    assert (pa.has_changes, pa.add, pa.change, pa.destroy) == (True, 0, 0, 0)
    applied = h.confirm(pa.id)
    assert applied.status is TaskStatus.APPLIED, applied.error
    assert h.state("outputs")["outputs"] == {"greeting": {"value": "hello", "type": "string"}}

    again = h.run("outputs", "plan")
    assert again.status is TaskStatus.SUCCESS
    assert again.has_changes is False


def test_apply_applies_exactly_its_saved_plan(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    variable = 'variable "n" {\n  type = number\n}\n'
    config = variable + NULL_PROVIDER + ('resource "null_resource" "r" {\n  count = var.n\n}\n')
    src = h.workspace("exact", config)
    monkeypatch.setenv("TF_VAR_n", "2")
    planned = h.run("exact", "plan_and_apply")
    assert planned.status is TaskStatus.APPLY_PENDING, planned.error
    assert planned.add == 2

    # Between review and apply, both the input variable and the source
    # change: the apply must still do what the reviewed plan said (a
    # re-plan at apply time would create 5, or 4).
    monkeypatch.setenv("TF_VAR_n", "5")
    (src / "main.tf").write_text(config.replace("count = var.n", "count = var.n - 1"))
    applied = h.confirm(planned.id)
    assert applied.status is TaskStatus.APPLIED, applied.error
    assert "Resources: 2 added" in h.log(planned.id, "apply")
    assert len(h.instances("exact")) == 2

    # The next run plans from the source as it is now, over the state left.
    nxt = h.run("exact", "plan_and_apply")
    assert nxt.status is TaskStatus.APPLY_PENDING, nxt.error
    assert (nxt.add, nxt.change, nxt.destroy) == (2, 0, 0)


def test_state_persists_between_runs(h: Harness) -> None:
    src = h.workspace("persist", null_config(2))
    first = h.plan_and_apply("persist")
    assert first.status is TaskStatus.APPLIED, first.error
    ids = {inst["attributes"]["id"] for inst in h.instances("persist")}
    assert len(ids) == 2

    # Unchanged configuration: the second plan sees what the first created.
    unchanged = h.run("persist", "plan_and_apply")
    assert unchanged.status is TaskStatus.SUCCESS, unchanged.error
    assert unchanged.has_changes is False

    (src / "main.tf").write_text(null_config(3))
    grown = h.run("persist", "plan_and_apply")
    assert grown.status is TaskStatus.APPLY_PENDING, grown.error
    assert (grown.add, grown.change, grown.destroy) == (1, 0, 0)
    done = h.confirm(grown.id)
    assert done.status is TaskStatus.APPLIED, done.error
    after = {inst["attributes"]["id"] for inst in h.instances("persist")}
    assert len(after) == 3
    assert ids < after  # the first two were kept, not re-created

    (src / "main.tf").write_text(null_config(1))
    shrunk = h.run("persist", "plan")
    assert shrunk.status is TaskStatus.SUCCESS, shrunk.error
    assert (shrunk.add, shrunk.change, shrunk.destroy) == (0, 0, 2)


def test_speculative_plan_takes_no_lock_and_writes_no_state(h: Harness) -> None:
    src = h.workspace("spec", null_config(1))

    # On a fresh workspace a plan leaves no state behind at all.
    fresh = h.run("spec", "plan")
    assert fresh.status is TaskStatus.SUCCESS, fresh.error
    assert (fresh.has_changes, fresh.add) == (True, 1)
    assert h.versions("spec") == []

    applied = h.plan_and_apply("spec")
    assert applied.status is TaskStatus.APPLIED, applied.error
    before = [(v.id, v.serial, v.sha256) for v in h.versions("spec")]
    assert before
    stored = h.state_bytes("spec")

    (src / "main.tf").write_text(null_config(3))
    h.tune(keep_workdirs=True)  # to look at the plan's private copy of the state
    plan = h.run("spec", "plan")
    assert plan.status is TaskStatus.SUCCESS, plan.error
    assert (plan.has_changes, plan.add, plan.change, plan.destroy) == (True, 2, 0, 0)

    [handoff] = [x for x in h.pump.handoffs if x.task_id == plan.id]
    assert handoff.speculative and handoff.phase is Phase.PLAN
    plan_log = h.log(plan.id, "plan")
    assert "-lock=false" in subcommand_line(plan_log, "plan").split()
    assert not any(c.split()[1] == "apply" for c in commands(plan_log))
    # The plan stored no state, and did not even change its private copy.
    assert [(v.id, v.serial, v.sha256) for v in h.versions("spec")] == before
    assert (latest_working_copy(h.settings, plan.id, "plan") / STATE_FILE).read_bytes() == stored
    # And nothing will apply it: no saved plan was kept.
    with h.rt.sessions() as s:
        assert s.get(PlanArtifact, plan.id) is None


def test_runq_env_reaches_terraform_and_provisioners(
    h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's own settings, secrets among them, are in its environment;
    # terraform and the configuration's provisioners must not see them.
    monkeypatch.setenv("RUNQ_DATABASE_URL", h.settings.database_url)
    monkeypatch.setenv("RUNQ_AGENT_TOKEN", "pool-token-s3cret")
    monkeypatch.setenv("RUNQ_REDIS_URL", h.settings.redis_url)
    record = tmp_path / "commands.txt"
    wrapper = tmp_path / "tf-wrapper.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$1 $RUNQ_TASK_ID $RUNQ_WORKSPACE $RUNQ_PHASE $RUNQ_DATABASE_URL" >> "{record}"\n'
        f'exec "{h.settings.terraform_bin}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    h.settings = h.rt.settings = h.settings.model_copy(update={"terraform_bin": str(wrapper)})

    seen = tmp_path / "provisioner-env.txt"
    provisioner = (
        f'  provisioner "local-exec" {{\n    command = "env | grep ^RUNQ_ | sort > {seen}"\n  }}\n'
    )
    h.workspace("envy", null_config(1, provisioner))
    task = h.plan_and_apply("envy")
    assert task.status is TaskStatus.APPLIED, task.error

    lines = record.read_text().splitlines()
    # (Each ends with the database URL terraform saw: none.)
    assert lines == [
        f"init {task.id} envy plan ",
        f"plan {task.id} envy plan ",
        f"show {task.id} envy plan ",
        f"init {task.id} envy apply ",
        f"apply {task.id} envy apply ",
    ]
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    assert env["RUNQ_TASK_ID"] == str(task.id)
    assert env["RUNQ_WORKSPACE"] == "envy"
    assert env["RUNQ_PHASE"] == "apply"
    assert env["RUNQ_FENCE"] == str(h.pump.handoffs[-1].fence)
    # Only what runq tells the run about itself: no database URL, no token.
    assert set(env) == {"RUNQ_TASK_ID", "RUNQ_WORKSPACE", "RUNQ_PHASE", "RUNQ_FENCE"}
    assert "s3cret" not in seen.read_text()


def test_syntax_error_fails_with_terraform_error_line(h: Harness) -> None:
    h.workspace("broken", 'resource "null_resource" "r" {\n  count = \n')

    task = h.run("broken", "plan")
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert task.error.startswith("terraform init exited 1: Error: "), task.error
    log = h.log(task.id, "plan")
    [first_error] = [
        line.strip(" \u2502\u2577\u2575")
        for line in log.splitlines()
        if line.strip(" \u2502\u2577\u2575").startswith("Error:")
    ][:1]
    assert task.error.endswith(first_error)


def test_failed_apply_still_publishes_partial_state(h: Harness) -> None:
    # Two resources; the second one's provisioner fails during apply, after
    # the first was created (-parallelism is irrelevant: r[1] waits on ok).
    config = (
        NULL_PROVIDER
        + 'resource "null_resource" "ok" {}\n'
        + 'resource "null_resource" "bad" {\n'
        + "  depends_on = [null_resource.ok]\n"
        + '  provisioner "local-exec" {\n    command = "exit 3"\n  }\n}\n'
    )
    h.workspace("partial", config)
    planned = h.run("partial", "plan_and_apply")
    assert planned.status is TaskStatus.APPLY_PENDING, planned.error
    task = h.confirm(planned.id)
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert task.error.startswith("terraform apply exited 1: Error: "), task.error
    # The resource that was created is in the workspace's state, so the next
    # plan does not create it again.
    names = {res["name"] for res in h.state("partial")["resources"]}
    assert "ok" in names
    nxt = h.run("partial", "plan")
    assert nxt.status is TaskStatus.SUCCESS, nxt.error
    assert nxt.add == 1  # only the tainted "bad" is re-created
    assert nxt.destroy == 1


@pytest.mark.parametrize("binary", ["/nonexistent/bin/terraform", "terraform-not-on-path-xyz"])
def test_missing_terraform_binary_fails_clearly(h: Harness, binary: str) -> None:
    h.settings = h.rt.settings = h.settings.model_copy(update={"terraform_bin": binary})
    h.workspace("nobin", null_config(1))

    task = h.run("nobin", "plan")
    assert task.status is TaskStatus.FAILED
    assert task.error == (
        f"terraform binary {binary!r} not found (install it or set RUNQ_TERRAFORM_BIN)"
    )
    assert task.executor_handle is not None  # it was started, then failed

    pa = h.run("nobin", "plan_and_apply")
    assert pa.status is TaskStatus.FAILED
    assert pa.error is not None and "not found" in pa.error


def test_missing_source_dir_is_refused_at_submit(h: Harness) -> None:
    """The directory is snapshotted at submit, where the user can fix it: a
    missing one is refused there, and no task is queued."""
    src = h.workspace("gone", null_config(1))
    (src / "main.tf").unlink()
    src.rmdir()
    with pytest.raises(InvalidInput) as refused:
        tasks.submit(h.rt, "gone", "plan")
    assert str(refused.value) == (
        f"cannot snapshot workspace 'gone': configuration directory {str(src)!r} does not exist"
    )
    with h.rt.sessions() as s:
        assert s.scalars(select(Task.id)).all() == []
    assert h.config_versions("gone") == []
    assert h.pump.publisher.sent == []


# ------------------------------------------------ configuration versions, saved plans


def test_editing_the_directory_after_submit_changes_nothing_the_task_runs(h: Harness) -> None:
    """A task plans and applies the configuration as it was at submit."""
    src = h.workspace("snap", null_config(2))
    (src / "notes.txt").write_text("submitted with two\n")
    task = tasks.submit(h.rt, "snap", "plan_and_apply")
    version = h.config_of(task.id)
    # Edited (and a file added) before the plan even starts...
    (src / "main.tf").write_text(null_config(5))
    (src / "extra.tf").write_text('output "late" {\n  value = "added after submit"\n}\n')
    h.pump.run()
    planned = tasks.get(h.rt, task.id)
    assert planned.status is TaskStatus.APPLY_PENDING, planned.error
    assert (planned.add, planned.change, planned.destroy) == (2, 0, 0)
    assert "late" not in h.log(task.id, "plan")
    # ...and again before the apply.
    (src / "main.tf").write_text(null_config(7))
    applied = h.confirm(task.id)
    assert applied.status is TaskStatus.APPLIED, applied.error
    assert len(h.instances("snap")) == 2
    assert "late" not in h.state("snap")["outputs"]
    # Both phases ran the one snapshot taken at submit.
    assert {x.config_sha256 for x in h.pump.handoffs if x.task_id == task.id} == {version.sha256}
    assert archive.names(version.content) == ["main.tf", "notes.txt"]

    # The next task snapshots the directory as it is now.
    nxt = h.run("snap", "plan")
    assert nxt.status is TaskStatus.SUCCESS, nxt.error
    assert (nxt.add, nxt.change, nxt.destroy) == (5, 0, 0)
    assert h.config_of(nxt.id).sha256 != version.sha256


def test_an_unchanged_directory_is_stored_once(h: Harness) -> None:
    h.workspace("once", null_config(1))
    a = h.run("once", "plan")
    b = h.run("once", "plan")
    assert a.status is b.status is TaskStatus.SUCCESS, (a.error, b.error)
    assert h.config_of(a.id).id == h.config_of(b.id).id
    assert len(h.config_versions("once")) == 1


def test_apply_runs_on_another_host_from_the_stored_saved_plan(h: Harness, tmp_path: Path) -> None:
    """No disk is shared between the plan and the apply: the plan's host is
    wiped, and the apply runs on a host with its own RUNQ_DATA_DIR, from the
    saved plan and state in the database."""
    h.workspace("moved", null_config(2))
    planned = h.run("moved", "plan_and_apply")
    assert planned.status is TaskStatus.APPLY_PENDING, planned.error
    shutil.rmtree(h.settings.data_dir)  # the plan's host is gone, disk and all
    other = h.tune(data_dir=tmp_path / "another-host")

    applied = h.confirm(planned.id)
    assert applied.status is TaskStatus.APPLIED, applied.error
    assert "Apply complete! Resources: 2 added, 0 changed, 0 destroyed." in h.log(
        planned.id, "apply"
    )
    assert len(h.instances("moved")) == 2
    assert not h.settings.data_dir.parent.joinpath("data").exists()
    apply_fence = h.pump.handoffs[-1].fence
    assert (other.logs_dir / str(planned.id) / f"apply-{apply_fence}.log").is_file()
    # Its plan's output is still readable: it is stored, not on the lost disk.
    assert "Plan: 2 to add, 0 to change, 0 to destroy." in h.log(planned.id, "plan")
