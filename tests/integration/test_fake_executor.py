"""With RUNQ_EXECUTOR=fake a worker runs a local phase with no terraform:
the scheduler sees Started, heartbeats and Finished as from a real one."""

from __future__ import annotations

from executors.fake import FakeRunner
from scheduler import dispatcher, local_runs, tasks
from scheduler.runtime import Runtime
from scheduler.settings import ExecutorKind
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import claimed


def test_a_worker_set_to_fake_runs_plan_and_apply_without_terraform(rt: Runtime, ws: str) -> None:
    fake = Runtime(
        settings=rt.settings.model_copy(
            update={"executor": ExecutorKind.FAKE, "terraform_bin": "/nonexistent/terraform"}
        ),
        publisher=rt.publisher,
        actor="fake",
    )
    try:
        tid, fence = claimed(rt, ws, TaskType.PLAN_AND_APPLY)
        ran = local_runs.execute(fake, tid, fence)
        assert isinstance(ran, local_runs.Ran) and ran.bundle.handoff.phase is Phase.PLAN
        assert tasks.get(rt, tid).status is TaskStatus.APPLY_PENDING
        tasks.confirm(rt, tid)
        decision = dispatcher.dispatch(rt, ws)
        assert decision.claimed and decision.fence is not None
        ran = local_runs.execute(fake, tid, decision.fence)
        assert isinstance(ran, local_runs.Ran) and ran.bundle.handoff.phase is Phase.APPLY
        assert tasks.get(rt, tid).status is TaskStatus.APPLIED
    finally:
        fake.close()


def test_an_explicit_runner_still_wins(rt: Runtime, ws: str) -> None:
    tid, fence = claimed(rt, ws, TaskType.PLAN)
    runner = FakeRunner()
    assert isinstance(local_runs.execute(rt, tid, fence, runner), local_runs.Ran)
    assert [h.task_id for h in runner.ran] == [tid]
