"""Kubernetes mode against an in-memory API server, over real HTTP, with the
real client (see :mod:`tests.k8s_harness` for what the emulator does and
does not do). The test plays the Job controller where one is needed.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select

from executors import signing
from executors.base import Bundle, Finished, Handoff, Heartbeat, Started
from executors.k8s import (
    BROKER_FILE,
    BUNDLE_DIR,
    BUNDLE_FILE,
    COMMAND,
    POOL_FILE,
    RUN_KEY_FILE,
    BundleTooLarge,
    JobApi,
    job_name,
    label_value,
)
from scheduler import (
    artifacts,
    dispatcher,
    k8s_jobs,
    reconciler,
    remote,
    reports,
    tasks,
    workspaces,
)
from scheduler.models import AgentPool, Task, Workspace
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import PLAN_WITH_CHANGES, chain, current_handoff, status
from tests.k8s_harness import Emulator, emulator, job_dict, run_job, set_condition
from tests.workers import clean_env

pytestmark = pytest.mark.redis

NS = "runq-test"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with emulator() as server:
        yield server


@pytest.fixture
def api(emu: Emulator) -> JobApi:
    return emu.api()


@pytest.fixture
def krt(tune: Callable[..., Runtime], emu: Emulator, tmp_path: Path) -> Runtime:
    """A runtime whose Kubernetes API is the emulator (through a kubeconfig,
    as RUNQ_K8S_KUBECONFIG names one)."""
    return tune(
        k8s_kubeconfig=str(emu.kubeconfig(tmp_path / "kubeconfig")),
        k8s_namespace=NS,
        k8s_image="runq:test",
        k8s_env=json.dumps({"TF_IN_AUTOMATION": "1"}),
        k8s_job_ttl=600,
        report_timeout=0.2,
    )


def k8s_workspace(rt: Runtime, src: Path, name: str = "net", **k8s: Any) -> str:
    workspaces.create(rt, name, mode="k8s", source_dir=str(src), k8s=k8s or None)
    return name


def claimed(rt: Runtime, workspace: str, kind: TaskType = TaskType.PLAN) -> Handoff:
    """Submit a task and claim its plan (its hand-off may or may not reach
    Kubernetes: a test launches it itself)."""
    task = tasks.submit(rt, workspace, kind)
    if kind is TaskType.PLAN:
        dispatcher.claim_plan(rt, task.id)
    else:
        dispatcher.dispatch(rt, workspace)
    return current_handoff(rt, task.id)


def launch(rt: Runtime, api: JobApi, handoff: Handoff) -> str:
    return k8s_jobs.launcher(rt, api).launch(handoff)


def error_of(rt: Runtime, task_id: int) -> str | None:
    with rt.sessions() as s:
        return s.scalars(select(Task.error).where(Task.id == task_id)).one()


def job_names(api: JobApi, namespace: str = NS) -> list[str]:
    # Listed and filtered here: the emulator ignores label selectors (and
    # knows no Jobs resource before the first Job is made).
    try:
        jobs = api.batch.list_namespaced_job(namespace).items
    except ApiException as exc:
        if exc.status != 404:
            raise
        return []
    return sorted(j.metadata.name for j in jobs)


def started(rt: Runtime, handoff: Handoff) -> None:
    reply = reports.accept(
        rt, Started(handoff.task_id, handoff.fence, handoff.phase, "k8s:pod-1:1:abc")
    )
    assert reply.accepted


# ---------------------------------------------------------------- launching


def test_a_phase_becomes_one_job_and_its_secret(krt: Runtime, api: JobApi, src: Path) -> None:
    (src / "main.tf").write_text('output "x" { value = 1 }\n')
    handoff = claimed(krt, k8s_workspace(krt, src))
    name = job_name(handoff.task_id, Phase.PLAN, handoff.fence)
    assert name == f"runq-{handoff.task_id}-plan-{handoff.fence}"

    assert launch(krt, api, handoff) == f"k8s:{NS}/{name}"

    job = job_dict(api, NS, name)
    want_labels = {
        "runq.dev/workspace": "net",
        "runq.dev/task": str(handoff.task_id),
        "runq.dev/phase": "plan",
        "runq.dev/fence": str(handoff.fence),
    }
    assert job["metadata"]["labels"] == want_labels
    assert job["spec"]["template"]["metadata"]["labels"] == want_labels
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert job["spec"]["activeDeadlineSeconds"] >= handoff.timeout
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["image"] == "runq:test"
    assert (
        container["command"] == list(COMMAND) == ["runq", "run-phase", "--bundle-dir", BUNDLE_DIR]
    )
    assert container["volumeMounts"] == [
        {"name": "bundle", "mountPath": "/var/run/runq", "readOnly": True}
    ]
    assert pod["volumes"][0]["secret"]["secretName"] == name
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TF_IN_AUTOMATION"] == "1"

    secret = api.core.read_namespaced_secret(name, NS)
    assert secret.metadata.labels == want_labels
    # The emulator gives the Job no uid, so nothing can own the Secret by it.
    assert not secret.metadata.owner_references
    files = secret_files(api, name)
    bundle = Bundle.from_json(json.loads(files[BUNDLE_FILE]))
    assert (bundle.handoff.task_id, bundle.handoff.fence) == (handoff.task_id, handoff.fence)
    assert bundle.config and bundle.handoff.config_sha256
    with krt.sessions() as s:
        token = s.scalars(select(AgentPool.token).where(AgentPool.name == "kubernetes")).one()
    key = signing.run_key(token, handoff.task_id, handoff.fence)
    assert files[RUN_KEY_FILE] == key.hex()
    assert files[POOL_FILE] == "kubernetes"
    assert files[BROKER_FILE] == krt.settings.resolved_broker_url

    # Nothing secret where anyone who may read Jobs can read it.
    visible = json.dumps(job)
    for secret_text in (key.hex(), token, krt.settings.resolved_broker_url, files[BUNDLE_FILE]):
        assert secret_text not in visible
    assert "config" not in json.dumps(container.get("args", []))


def secret_files(api: JobApi, name: str) -> dict[str, str]:
    secret = api.core.read_namespaced_secret(name, NS)
    return {k: base64.b64decode(v).decode() for k, v in secret.data.items()}


def test_a_duplicate_hand_off_gets_409_and_starts_nothing_twice(
    krt: Runtime, api: JobApi, emu: Emulator, src: Path
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    first = launch(krt, api, handoff)
    posts = len(emu.requests("POST"))
    assert launch(krt, api, handoff) == first
    assert job_names(api) == [job_name(handoff.task_id, Phase.PLAN, handoff.fence)]
    # Both creates were tried, and both refused (409): nothing new exists.
    assert len(emu.requests("POST")) == posts + 2

    # A launch that died between its Job and its Secret is finished by the next.
    name = job_name(handoff.task_id, Phase.PLAN, handoff.fence)
    api.delete_secret(NS, name)
    assert launch(krt, api, handoff) == first
    assert api.core.read_namespaced_secret(name, NS).data[RUN_KEY_FILE]


def test_the_workspace_overrides_the_settings(krt: Runtime, api: JobApi, src: Path) -> None:
    ws = k8s_workspace(
        krt,
        src,
        "team-a.network_prod",
        namespace="team-a",
        image="registry.example/runq:1.2",
        service_account="terraform",
        resources={"limits": {"memory": "1Gi"}},
        env={"TF_LOG": "info"},
    )
    handoff = claimed(krt, ws)
    assert launch(krt, api, handoff).startswith("k8s:team-a/runq-")
    assert job_names(api) == []  # nothing in the settings' namespace
    job = job_dict(api, "team-a", job_name(handoff.task_id, Phase.PLAN, handoff.fence))
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/runq:1.2"
    assert pod["serviceAccountName"] == "terraform"
    assert "automountServiceAccountToken" not in pod
    assert container["resources"] == {"limits": {"memory": "1Gi"}}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (env["TF_LOG"], env["TF_IN_AUTOMATION"]) == ("info", "1")
    assert job["metadata"]["labels"]["runq.dev/workspace"] == "team-a.network_prod"


def test_label_values_are_sanitised() -> None:
    long = "a" * 150 + ".b"
    value = label_value(long)
    assert len(value) <= 63 and value[0].isalnum() and value[-1].isalnum()
    assert value != label_value("a" * 150 + ".c")
    assert label_value("net") == "net"


# ---------------------------------------------------------------- watching


def test_a_failed_job_fails_its_task_with_the_kubernetes_reason(
    krt: Runtime, api: JobApi, src: Path
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    name = job_name(handoff.task_id, Phase.PLAN, handoff.fence)
    assert k8s_jobs.watch(krt, api) == []  # running: nothing to do

    set_condition(
        api,
        NS,
        name,
        "Failed",
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    )
    assert k8s_jobs.watch(krt, api) == [handoff.task_id]
    assert status(krt, handoff.task_id) is TaskStatus.FAILED
    assert error_of(krt, handoff.task_id) == (
        f"kubernetes: Job {name} failed: BackoffLimitExceeded: "
        "Job has reached the specified backoff limit"
    )
    assert chain(krt, handoff.task_id)[-1] == ("planning", "failed")
    assert k8s_jobs.watch(krt, api) == []  # once


def test_a_job_deleted_before_it_reported_fails_its_task(
    krt: Runtime, api: JobApi, src: Path
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    name = job_name(handoff.task_id, Phase.PLAN, handoff.fence)
    api.delete_job(NS, name)
    # Not started: the re-send makes the Job again (or gives up, counted).
    assert k8s_jobs.watch(krt, api) == []
    assert status(krt, handoff.task_id) is TaskStatus.PLANNING

    launch(krt, api, handoff)
    started(krt, handoff)
    api.delete_job(NS, name)
    # Its last word may still be on its way: it gets RUNQ_REPORT_TIMEOUT.
    reports.accept(krt, Heartbeat(handoff.task_id, handoff.fence, handoff.phase))
    assert k8s_jobs.watch(krt, api) == []
    time.sleep(0.3)
    assert k8s_jobs.watch(krt, api) == [handoff.task_id]
    assert status(krt, handoff.task_id) is TaskStatus.FAILED
    assert error_of(krt, handoff.task_id) == (
        f"kubernetes: Job {name} was deleted before it reported"
    )


def test_a_lost_apply_job_fails_and_is_not_re_run(krt: Runtime, api: JobApi, src: Path) -> None:
    ws = k8s_workspace(krt, src)
    plan = claimed(krt, ws, TaskType.PLAN_AND_APPLY)
    launch(krt, api, plan)
    started(krt, plan)
    reports.accept(
        krt,
        Finished(plan.task_id, plan.fence, Phase.PLAN, PLAN_WITH_CHANGES, plan=b"saved plan"),
    )
    tasks.confirm(krt, plan.task_id)
    dispatcher.dispatch(krt, ws)
    apply = current_handoff(krt, plan.task_id)
    assert apply.phase is Phase.APPLY
    launch(krt, api, apply)
    name = job_name(apply.task_id, Phase.APPLY, apply.fence)
    secret = secret_files(api, name)
    assert Bundle.from_json(json.loads(secret[BUNDLE_FILE])).plan == b"saved plan"
    started(krt, apply)
    set_condition(
        api, NS, name, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline"
    )
    time.sleep(0.3)
    assert k8s_jobs.watch(krt, api) == [apply.task_id]
    assert status(krt, apply.task_id) is TaskStatus.FAILED
    assert error_of(krt, apply.task_id) == (
        f"kubernetes: Job {name} failed: DeadlineExceeded: Job was active longer than "
        "specified deadline; the apply was not re-run (terraform apply is not idempotent)"
    )
    assert job_names(api) == sorted([job_name(plan.task_id, Phase.PLAN, plan.fence), name])


def test_a_job_that_completed_without_reporting_fails_its_task(
    krt: Runtime, api: JobApi, src: Path
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    set_condition(
        api, NS, job_name(handoff.task_id, Phase.PLAN, handoff.fence), "Complete", "Completed"
    )
    assert k8s_jobs.watch(krt, api) == [handoff.task_id]
    assert "completed without reporting its result" in (error_of(krt, handoff.task_id) or "")


def test_an_unreachable_api_server_changes_nothing(krt: Runtime, api: JobApi, src: Path) -> None:
    from kubernetes import client

    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard: nothing listens
    cfg.retries = False
    assert k8s_jobs.watch(krt, JobApi(client.ApiClient(cfg))) == []
    assert status(krt, handoff.task_id) is TaskStatus.PLANNING


# ---------------------------------------------------------------- cancel


def test_cancel_deletes_the_job_with_background_propagation(
    krt: Runtime, api: JobApi, emu: Emulator, src: Path
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    started(krt, handoff)
    name = job_name(handoff.task_id, Phase.PLAN, handoff.fence)

    tasks.cancel(krt, handoff.task_id, actor="alice")

    deletes = [(path, body) for path, body in emu.requests("DELETE") if "/jobs/" in path]
    assert deletes == [
        (f"/apis/batch/v1/namespaces/{NS}/jobs/{name}", {"propagationPolicy": "Background"})
    ]
    assert job_names(api) == []
    # Its pod was told to stop (SIGTERM) and did not report: the sweep ends
    # the task as the canceller asked.
    assert status(krt, handoff.task_id) is TaskStatus.PLANNING
    time.sleep(0.3)
    assert reconciler.sweep(krt).lost == [handoff.task_id]
    assert status(krt, handoff.task_id) is TaskStatus.CANCELLED
    assert chain(krt, handoff.task_id)[-1] == ("planning", "cancelled")


def test_cancelling_an_unstarted_phase_deletes_its_job(
    krt: Runtime, api: JobApi, src: Path
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    assert tasks.cancel(krt, handoff.task_id).status is TaskStatus.CANCELLED
    assert job_names(api) == []


def test_the_reconciler_sweep_watches_jobs(krt: Runtime, api: JobApi, src: Path) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    assert reconciler.sweep(krt).lost == []
    set_condition(
        api, NS, job_name(handoff.task_id, Phase.PLAN, handoff.fence), "Failed", "DeadlineExceeded"
    )
    assert reconciler.sweep(krt).lost == [handoff.task_id]
    assert status(krt, handoff.task_id) is TaskStatus.FAILED


def test_a_sweep_without_kubernetes_config_goes_on(
    tune: Callable[..., Runtime], krt: Runtime, api: JobApi, src: Path, tmp_path: Path
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    broken = tune(k8s_kubeconfig=str(tmp_path / "missing-kubeconfig"))
    assert reconciler.sweep(broken).lost == []
    assert reconciler.sweep(tune(k8s_resources="not json")).lost == []
    assert status(krt, handoff.task_id) is TaskStatus.PLANNING


# ---------------------------------------------------------------- the Job's container


#: Stands in for the container's command where a test only checks what the
#: container is given: the files of its mount, and nothing secret in its env.
CHECK_MOUNT = """
import json, os, sys
from pathlib import Path
d = Path(sys.argv[1])
doc = json.loads((d / "bundle.json").read_text())
key = (d / "run_key").read_text()
assert len(bytes.fromhex(key)) == 32
assert key not in json.dumps(dict(os.environ))
print("task", doc["handoff"]["task_id"], "pool", (d / "pool").read_text())
sys.exit(int(os.environ.get("EXIT", "0")))
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_the_test_plays_the_job_controller(
    krt: Runtime, api: JobApi, src: Path, tmp_path: Path, exit_code: int
) -> None:
    handoff = claimed(krt, k8s_workspace(krt, src))
    launch(krt, api, handoff)
    name = job_name(handoff.task_id, Phase.PLAN, handoff.fence)
    run = run_job(
        api,
        NS,
        name,
        tmp_path / "pod",
        env={"PATH": "/usr/bin:/bin", "EXIT": str(exit_code)},
        command=[sys.executable, "-c", CHECK_MOUNT, BUNDLE_DIR],
    )
    assert run.returncode == exit_code, run.output
    assert f"task {handoff.task_id} pool kubernetes" in run.output
    time.sleep(0.3)
    assert k8s_jobs.watch(krt, api) == [handoff.task_id]
    want = "completed without reporting" if exit_code == 0 else "failed: BackoffLimitExceeded"
    assert want in (error_of(krt, handoff.task_id) or "")


def test_a_bundle_too_large_for_a_secret_is_refused(krt: Runtime, api: JobApi, src: Path) -> None:
    (src / "blob.txt").write_bytes(os.urandom(1024 * 1024))
    handoff = claimed(krt, k8s_workspace(krt, src))
    with pytest.raises(BundleTooLarge, match="a Kubernetes Secret holds at most 1048576"):
        launch(krt, api, handoff)
    assert job_names(api) == []


# ---------------------------------------------------------------- end to end


@pytest.fixture
def consumer(krt: Runtime) -> Iterator[None]:
    """The scheduler's report consumer, as every core worker runs it."""
    stop = threading.Event()
    thread = threading.Thread(target=remote.serve, args=(krt, stop), kwargs={"poll": 0.2})
    thread.start()
    yield
    stop.set()
    thread.join(10)


@pytest.mark.terraform
def test_a_plan_and_apply_runs_end_to_end_as_jobs(
    krt: Runtime,
    api: JobApi,
    src: Path,
    tmp_path: Path,
    consumer: None,
    terraform_bin: str,
    terraform_env: dict[str, str],
) -> None:
    """Hand-off through ``launcher_for``, the Job's real command
    (``runq run-phase``) run as the controller would, signed reports over
    the broker, and the reconciler finding nothing owed."""
    (src / "main.tf").write_text('output "greeting" { value = "hello from a Job" }\n')
    workspaces.create(krt, "net", mode="k8s", source_dir=str(src), auto_apply=True)
    task = tasks.submit(krt, "net", TaskType.PLAN_AND_APPLY)
    host = clean_env({"RUNQ_TERRAFORM_BIN": terraform_bin, **terraform_env})

    dispatcher.dispatch(krt, "net")  # the claim's hand-off makes the Job
    plan = current_handoff(krt, task.id)
    run = run_job(api, NS, job_name(task.id, Phase.PLAN, plan.fence), tmp_path / "plan", env=host)
    assert run.returncode == 0, run.output
    assert status(krt, task.id) is TaskStatus.APPLY_QUEUED

    dispatcher.dispatch(krt, "net")  # the apply, on whichever host its Job lands
    apply = current_handoff(krt, task.id)
    name = job_name(task.id, Phase.APPLY, apply.fence)
    run = run_job(api, NS, name, tmp_path / "apply", env=host)
    assert run.returncode == 0, run.output
    assert status(krt, task.id) is TaskStatus.APPLIED
    with krt.sessions() as s:
        state = artifacts.latest(s, s.scalars(select(Workspace.id)).one())
        handle = s.scalars(select(Task.executor_handle).where(Task.id == task.id)).one()
    assert state is not None and b"hello from a Job" in state.content
    assert handle is not None and handle.startswith("k8s:")
    assert reconciler.sweep(krt).lost == []
    assert job_names(api) == sorted([job_name(task.id, Phase.PLAN, plan.fence), name])
