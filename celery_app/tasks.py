"""Thin task functions: ids in, the scheduler does the work.

``claim_plan`` and ``dispatch`` are idempotent (they re-read the database and
do nothing when the hint is stale), so they ack late and are re-queued if the
worker dies under them. ``execute`` is not: see its note.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery_app.app import app, runtime
from executors.base import Handoff
from executors.local import LocalRunner
from scheduler import dispatcher, reconciler
from scheduler.messages import TASK_CLAIM_PLAN, TASK_DISPATCH, TASK_EXECUTE, TASK_RECONCILE
from scheduler.reports import DirectReporter
from scheduler.runtime import Runtime
from scheduler.states import ExecutionMode

log = logging.getLogger(__name__)


def _guarded(what: str, fn: Callable[[Runtime], object]) -> None:
    """Run ``fn``; log a failure with its traceback instead of raising.

    A failed hint is not retried here (no countdowns: the database is the
    queue); the reconciler re-sends what is still owed.
    """
    try:
        fn(runtime())
    except Exception:
        log.exception(
            "%s failed; the reconciler will retry what is still owed",
            what,
            extra={"action": "task_error", "what": what},
        )


@app.task(name=TASK_CLAIM_PLAN, acks_late=True, reject_on_worker_lost=True)
def claim_plan(task_id: int) -> None:
    _guarded(f"claim_plan({task_id})", lambda rt: dispatcher.claim_plan(rt, task_id))


@app.task(name=TASK_DISPATCH, acks_late=True, reject_on_worker_lost=True)
def dispatch(workspace: str) -> None:
    _guarded(f"dispatch({workspace})", lambda rt: dispatcher.dispatch(rt, workspace))


#: acks_late is off on purpose: if the worker dies mid-apply, re-delivering the
#: message would run terraform apply a second time over a half-applied state.
#: The phase stays claimed instead; until leases and heartbeats exist (a later
#: issue) such a task stays planning/applying and needs an operator.
@app.task(name=TASK_EXECUTE, acks_late=False)
def execute(handoff: dict[str, Any]) -> None:
    def run(rt: Runtime) -> None:
        h = Handoff.from_json(handoff)
        if h.mode is not ExecutionMode.LOCAL:
            raise ValueError(f"runs queue got a {h.mode} hand-off; only local runs here")
        LocalRunner(rt.settings).run(h, DirectReporter(rt))

    _guarded(f"execute(task {handoff.get('task_id')}, {handoff.get('phase')})", run)


@app.task(name=TASK_RECONCILE, acks_late=True)
def reconcile() -> None:
    _guarded("reconcile", reconciler.sweep)
