"""The scheduler's side of Kubernetes mode: launching, watching and stopping
the Jobs of :mod:`executors.k8s`.

* :func:`launcher` gives the dispatcher a :class:`~executors.k8s.K8sLauncher`
  whose launch data (bundle, Job settings, run key) is read from the
  database right after the claim commits;
* :func:`watch`, called by every reconciler sweep, reads the Job of each
  running claim of a Kubernetes workspace by its name. A Job that failed, or
  finished or vanished without its Finished report, will never report: the
  task ends ``failed`` with Kubernetes' reason (``cancelled`` if a cancel was
  asked for). A plan is not re-run: its Job failing says something about the
  phase, not the host. A Job not made yet (its hand-off failed) is the
  re-send's business, not this one's;
* :func:`stop` deletes a cancelled claim's Job (background propagation: its
  pod gets SIGTERM, and terraform is interrupted and saves its state).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select

from executors import signing
from executors.base import Handoff
from executors.k8s import (
    JobApi,
    JobSpec,
    K8sLauncher,
    Launch,
    Outcome,
    job_api,
    job_name,
    job_outcome,
)
from scheduler import bundles, pools
from scheduler.errors import ConcurrentChange, IllegalTransition
from scheduler.models import Task, Workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import RUNNING, ExecutionMode, Phase, TaskStatus, phase_of
from scheduler.transitions import transition

log = logging.getLogger(__name__)


def launcher(rt: Runtime, api: JobApi | None = None) -> K8sLauncher:
    return K8sLauncher(rt.settings, api or job_api(rt.settings), lambda h: prepare(rt, h))


def prepare(rt: Runtime, handoff: Handoff) -> Launch:
    """What the Job of ``handoff``'s claim needs; :class:`ConcurrentChange`
    if the claim is no longer current or was started already."""
    settings = rt.settings
    with rt.transaction() as s:
        bundle = bundles.build(s, settings, handoff.task_id, handoff.fence)
        overrides = s.scalars(
            select(Workspace.k8s).where(Workspace.name == handoff.workspace)
        ).one_or_none()
        pool = pools.ensure_k8s_pool(s, settings)
        name, token = pool.name, pool.token
    return Launch(
        bundle=bundle,
        spec=JobSpec.of(settings, overrides),
        pool=name,
        run_key=signing.run_key(token, handoff.task_id, handoff.fence),
        broker_url=settings.k8s_broker_url or settings.resolved_broker_url,
    )


def watch(rt: Runtime, api: JobApi | None = None) -> list[int]:
    """End the running Kubernetes tasks whose Jobs will never report; return
    their ids."""
    with rt.sessions() as s:
        rows = s.execute(
            select(Task, Workspace)
            .join(Workspace, Workspace.id == Task.workspace_id)
            .where(
                Workspace.execution_mode == ExecutionMode.K8S,
                Task.status.in_([str(x) for x in RUNNING]),
            )
            .order_by(Task.id)
        ).all()
    if not rows:
        return []
    ended: list[int] = []
    for task, ws in rows:
        phase = phase_of(TaskStatus(task.status))
        assert phase is not None
        ns, name = "?", job_name(task.id, phase, task.fence)
        try:
            ns = JobSpec.of(rt.settings, ws.k8s).namespace
            api = api or job_api(rt.settings)
            outcome = job_outcome(api.read_job(ns, name))
        except Exception as exc:
            log.error(  # noqa: TRY400 - one line per sweep; the API is down or refuses us
                "k8s watch: reading Job %s/%s failed (%s: %s); the next sweep tries again",
                ns,
                name,
                type(exc).__name__,
                exc,
                extra={"action": "k8s_watch_failed", "task_id": task.id},
            )
            return ended
        if outcome is None:
            continue
        if outcome.kind == "missing" and task.executor_handle is None:
            # Never started: the hand-off may not have made it yet, and the
            # reconciler's re-send makes it (or gives up, counted).
            continue
        if _end(rt, task, phase, ns, name, outcome):
            ended.append(task.id)
    return ended


def _end(rt: Runtime, task: Task, phase: Phase, ns: str, name: str, outcome: Outcome) -> bool:
    if outcome.kind == "missing":
        why = f"kubernetes: Job {name} was deleted before it reported"
    elif outcome.kind == "complete":
        why = f"kubernetes: Job {name} completed without reporting its result"
    else:
        why = f"kubernetes: Job {name} failed: {outcome.reason}"
    # A report sent just before the pod ended may still be on its way: give
    # it the time a reporter waits for a reply before calling it lost.
    quiet = utcnow() - timedelta(seconds=rt.settings.report_timeout)
    guard = or_(Task.heartbeat_at.is_(None), Task.heartbeat_at < quiet)
    cancelled = task.cancel_requested_at is not None
    try:
        with rt.transaction() as s:
            if cancelled:
                done = transition(
                    s,
                    task.id,
                    TaskStatus.CANCELLED,
                    actor=task.cancel_requested_by or rt.actor,
                    reason=f"cancelled; {why}",
                    expect={TaskStatus(task.status)},
                    fence=task.fence,
                    guard=guard,
                )
            else:
                error = why
                if phase is Phase.APPLY and task.executor_handle is not None:
                    error += "; the apply was not re-run (terraform apply is not idempotent)"
                done = transition(
                    s,
                    task.id,
                    TaskStatus.FAILED,
                    actor=rt.actor,
                    reason=why,
                    expect={TaskStatus(task.status)},
                    fence=task.fence,
                    guard=guard,
                    values={"error": error},
                )
    except (ConcurrentChange, IllegalTransition):
        return False  # it reported meanwhile, or is still within its grace
    log.warning(
        "task %s: %s; now %s",
        task.id,
        why,
        done.to_status,
        extra={"action": "k8s_job_lost", "task_id": task.id, "job": f"{ns}/{name}"},
    )
    return True


def stop(rt: Runtime, task_id: int, phase: Phase, fence: int, api: JobApi | None = None) -> None:
    """Delete the Job of ``task_id``'s claim ``fence``, if its workspace runs
    on Kubernetes. Best effort: a Job left behind ends at its deadline, and
    its reports are stale by then."""
    with rt.sessions() as s:
        row = s.execute(
            select(Workspace.execution_mode, Workspace.k8s)
            .join(Task, Task.workspace_id == Workspace.id)
            .where(Task.id == task_id)
        ).one_or_none()
    if row is None or row.execution_mode != ExecutionMode.K8S:
        return
    ns, name = "?", job_name(task_id, phase, fence)
    try:
        ns = JobSpec.of(rt.settings, row.k8s).namespace
        api = api or job_api(rt.settings)
        deleted = api.delete_job(ns, name)
        # The Secret goes with its Job when the Job owns it; not when the API
        # server left the Job without a uid to own it by.
        api.delete_secret(ns, name)
    except Exception as exc:
        log.error(  # noqa: TRY400 - best effort, one line
            "task %s: deleting Job %s/%s failed (%s: %s)",
            task_id,
            ns,
            name,
            type(exc).__name__,
            exc,
            extra={"action": "k8s_job_delete_failed", "task_id": task_id},
        )
        return
    log.info(
        "task %s: Job %s/%s %s",
        task_id,
        ns,
        name,
        "deleted" if deleted else "was gone already",
        extra={"action": "k8s_job_deleted", "task_id": task_id},
    )
