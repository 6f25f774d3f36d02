"""``runq show`` says what a task that is not running waits for, one test per
kind of wait, and the dispatcher then does what the explanation says it will;
``runq workspace show`` lists what is in a workspace."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from executors.base import StateWritten
from executors.fake import FakeLauncher
from scheduler import dispatcher, messages, pools, reports, tasks, workspaces
from scheduler.api import Client
from scheduler.brokers import KombuPublisher
from scheduler.messages import QUEUE_DISPATCH, QUEUE_PLANS, QUEUE_RUNS
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskType
from scheduler.waiting import Waiting, why
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_NO_CHANGES,
    PLAN_WITH_CHANGES,
    applying,
    begin,
    claimed,
    end,
)
from tests.integration.test_cli import Cli, cli  # noqa: F401 - the fixture

PA = TaskType.PLAN_AND_APPLY
PLAN = TaskType.PLAN


def waits(rt: Runtime, task_id: int, kind: str) -> Waiting:
    w = why(rt, task_id)
    assert w is not None, f"task {task_id} waits for nothing"
    assert w.kind == kind, w
    assert w.sentence == w.sentence.strip() and "None" not in w.sentence, w.sentence
    return w


def test_a_queued_plan_and_apply_names_its_place_and_the_holder(rt: Runtime, ws: str) -> None:
    holder, fence = claimed(rt, ws, PA)
    assert begin(rt, holder, fence).accepted
    assert why(rt, holder) is None, "a running phase waits for nothing"
    behind = [tasks.submit(rt, ws, PA).id for _ in range(3)]

    w = waits(rt, behind[2], "queue")
    assert w.sentence.startswith(
        f"3rd in line in workspace net: task {holder} (plan_and_apply) holds it, planning since "
    )
    assert re.search(r"planning since \d\d:\d\d:\d\d UTC \(\d+ s ago\);", w.sentence), w
    assert w.sentence.endswith(f"; tasks {behind[0]}, {behind[1]} are ahead")
    assert (w.details["place"], w.details["ahead"], w.details["ahead_count"]) == (
        3,
        behind[:2],
        2,
    )
    assert w.details["holder"]["id"] == holder
    assert w.details["holder"]["status"] == "planning"
    nxt = waits(rt, behind[0], "queue")
    assert nxt.sentence.startswith(f"next in line in workspace net: task {holder} ")
    assert nxt.details["place"] == 1
    assert dispatcher.dispatch(rt, ws).action == "skipped"

    # The holder planned changes: the line now waits on a human.
    assert end(rt, holder, fence, PLAN_WITH_CHANGES).accepted
    assert "holds it, waiting for confirmation since" in waits(rt, behind[1], "queue").sentence

    tasks.discard(rt, holder)
    assert why(rt, holder) is None, "a finished task waits for nothing"
    # Nothing holds the workspace: the head waits only for a worker to
    # dispatch it (rt's publisher records messages and cannot count them).
    head = waits(rt, behind[0], "worker")
    assert head.sentence.startswith(
        "first in line in workspace net, which nothing holds: waiting for a free worker "
        f"to take its dispatch from queue {QUEUE_DISPATCH}"
    )
    assert head.sentence.endswith("unknown: this client's publisher cannot read queue depths")
    assert (head.details["queue"], head.details["depth"]) == (QUEUE_DISPATCH, None)
    second = waits(rt, behind[1], "queue")
    assert second.sentence == f"2nd in line in workspace net; task {behind[0]} is ahead"
    d = dispatcher.dispatch(rt, ws)
    assert (d.action, d.task_id) == ("claimed_plan", behind[0])


def test_a_planned_run_waits_for_confirmation_then_for_its_apply(rt: Runtime, ws: str) -> None:
    tid, fence = claimed(rt, ws, PA)
    w = waits(rt, tid, "worker")  # claimed, its execute message not taken yet
    assert w.sentence.startswith("its plan was claimed at ")
    assert (
        "but has not started: waiting for a free worker to take its execute message "
        f"from queue {QUEUE_RUNS}; how many wait there is unknown"
    ) in w.sentence
    assert (w.details["queue"], w.details["phase"]) == (QUEUE_RUNS, "plan")
    assert begin(rt, tid, fence).accepted
    assert end(rt, tid, fence, PLAN_WITH_CHANGES).accepted

    w = waits(rt, tid, "confirmation")
    assert w.sentence.startswith("waiting for confirmation since ")
    assert w.sentence.endswith(
        f"its plan would change +2 ~1 -0; `runq confirm {tid}` applies it, "
        f"`runq discard {tid}` drops it"
    )
    assert w.details["since"] is not None

    tasks.confirm(rt, tid)
    w = waits(rt, tid, "worker")
    assert w.sentence.startswith("confirmed at ")
    assert "its apply is next: waiting for a free worker to take workspace net's dispatch" in (
        w.sentence
    )
    d = dispatcher.dispatch(rt, ws)
    assert (d.action, d.task_id) == ("claimed_apply", tid)
    w = waits(rt, tid, "worker")
    assert w.sentence.startswith("its apply was claimed at ") and w.details["phase"] == "apply"
    assert begin(rt, tid, fence + 1, Phase.APPLY).accepted
    assert why(rt, tid) is None


def test_a_manual_lock_says_who_why_and_since_when(rt: Runtime, ws: str) -> None:
    workspaces.lock(rt, ws, holder="alice", reason="freeze for release")
    queued = tasks.submit(rt, ws, PA).id
    w = waits(rt, queued, "lock")
    assert w.sentence.startswith(
        'queued but held back: workspace net is locked by alice ("freeze for release") since '
    )
    assert w.sentence.endswith(" s ago); `runq workspace unlock net` lets it go")
    assert w.details["lock"]["by"] == "alice"
    assert w.details["lock"]["reason"] == "freeze for release"
    assert dispatcher.dispatch(rt, ws).action == "skipped"

    # Plans are not held back by a lock.
    plan = waits(rt, tasks.submit(rt, ws, PLAN).id, "worker")
    assert plan.details["queue"] == QUEUE_PLANS
    assert "(plans take no workspace lock)" in plan.sentence

    # A confirmed apply is held back too; the task behind it says both.
    workspaces.unlock(rt, ws)
    d = dispatcher.dispatch(rt, ws)
    assert d.task_id == queued and d.fence is not None
    assert begin(rt, queued, d.fence).accepted
    assert end(rt, queued, d.fence, PLAN_WITH_CHANGES).accepted
    workspaces.lock(rt, ws, holder="bob", reason=None)
    assert "workspace net is also locked by bob (no reason given)" in (
        waits(rt, queued, "confirmation").sentence
    )
    tasks.confirm(rt, queued)
    w = waits(rt, queued, "lock")
    assert w.sentence.startswith("its apply is confirmed but held back: workspace net is locked")
    later = tasks.submit(rt, ws, PA).id
    w = waits(rt, later, "queue")
    assert f"task {queued} (plan_and_apply) holds it, confirmed, its apply queued since" in (
        w.sentence
    )
    assert "(held by the lock); the workspace is also locked by bob" in w.sentence
    assert dispatcher.dispatch(rt, ws).action == "skipped"


def _beat(rt: Runtime, running: list[dict[str, object]]) -> None:
    with rt.transaction() as s:
        beat = {"agent": "agent-1", "hostname": "h1", "capacity": 1, "running": running}
        pools.record_beat(s, pools.load(s, "builders"), beat)


def test_an_agent_phase_waits_for_capacity_in_its_pool(rt: Runtime, src: Path) -> None:
    pools.create(rt, "builders")
    workspaces.create(rt, "remote", mode="agent", agent_pool="builders", source_dir=str(src))
    tid = tasks.submit(rt, "remote", PA).id
    assert dispatcher.dispatch(rt, "remote").task_id == tid

    w = waits(rt, tid, "agent_capacity")
    assert w.sentence.endswith(
        "but has not started: waiting for agent capacity in pool builders: no live agent serves it"
    )
    assert (w.details["pool"], w.details["capacity"], w.details["busy"]) == ("builders", 0, 0)

    _beat(rt, [])  # one agent, one free slot: the hand-off waits for it to start
    w = waits(rt, tid, "executor_start")
    assert "handed to agent pool builders (sent 1 time), which has 1 free slot of 1: " in (
        w.sentence
    )
    assert w.sentence.endswith("waiting for an agent to start it")

    _beat(rt, [{"task_id": 999, "phase": "plan", "fence": 1}])
    w = waits(rt, tid, "agent_capacity")
    assert w.sentence.endswith("in pool builders: every slot is busy (1 of 1)")


def test_a_kubernetes_phase_waits_for_its_job_to_start(
    rt: Runtime, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = FakeLauncher()  # takes the hand-off; no Job reports yet
    monkeypatch.setattr(dispatcher, "launcher_for", lambda rt, mode: launcher)
    workspaces.create(rt, "kube", mode="k8s", source_dir=str(src))
    tid = tasks.submit(rt, "kube", PA).id
    d = dispatcher.dispatch(rt, "kube")
    assert d.task_id == tid and d.fence is not None and launcher.launched
    w = waits(rt, tid, "executor_start")
    assert w.sentence.endswith(
        "but has not started: waiting for its Kubernetes Job to start (sent 1 time)"
    )
    assert (w.details["execution_mode"], w.details["phase"]) == ("k8s", "plan")
    assert begin(rt, tid, d.fence).accepted
    assert why(rt, tid) is None


@pytest.fixture(params=["celery", "light"])
def broker(request: pytest.FixtureRequest, rt: Runtime) -> Iterator[Runtime]:
    """A runtime on rt's database that publishes to the test Redis through
    Celery (as workers do) or kombu alone (as clients do), with runq's
    queues purged before and after."""
    from celery_app.runtime import CeleryPublisher, private_app

    app = private_app(rt.settings, "waiting-test")
    publisher = (
        CeleryPublisher(app)
        if request.param == "celery"
        else KombuPublisher(rt.settings.resolved_broker_url)
    )
    runtime = Runtime(rt.settings, publisher, actor="test")

    def purge() -> None:
        with app.connection_for_write() as conn:
            for queue in messages.ALL_QUEUES:
                conn.default_channel.queue_purge(queue)

    purge()
    yield runtime
    purge()
    runtime.close()
    app.close()


def test_a_plan_waits_for_a_free_worker_and_says_how_deep_the_queue_is(
    rt: Runtime, broker: Runtime, ws: str
) -> None:
    plans = [tasks.submit(broker, ws, PLAN).id for _ in range(3)]
    w = waits(broker, plans[0], "worker")
    assert w.sentence == (
        f"waiting for a free worker to claim it from queue {QUEUE_PLANS} "
        "(plans take no workspace lock); 3 messages wait there"
    )
    assert (w.details["queue"], w.details["depth"], w.details["depth_unknown"]) == (
        QUEUE_PLANS,
        3,
        None,
    )
    # A publisher that cannot count says so, rather than invent a number.
    w = waits(rt, plans[0], "worker")
    assert w.details["depth"] is None
    assert w.sentence.endswith(
        "how many wait there is unknown: this client's publisher cannot read queue depths"
    )

    # A local phase claimed and handed off: its execute message waits in runq.runs.
    pa = tasks.submit(broker, ws, PA).id
    assert waits(broker, pa, "worker").details["depth"] == 1  # its dispatch
    assert dispatcher.dispatch(broker, ws).task_id == pa
    w = waits(broker, pa, "worker")
    assert (w.details["queue"], w.details["depth"]) == (QUEUE_RUNS, 1)
    assert w.sentence.endswith(f"from queue {QUEUE_RUNS}; 1 message waits there")


@pytest.mark.parametrize("kind", ["celery", "light"])
def test_an_unreachable_broker_is_said_to_be_so(rt: Runtime, ws: str, kind: str) -> None:
    from celery_app.runtime import CeleryPublisher, private_app

    settings = rt.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    app = private_app(settings, "waiting-down")
    publisher = (
        CeleryPublisher(app) if kind == "celery" else KombuPublisher(settings.resolved_broker_url)
    )
    down = Runtime(rt.settings, publisher, actor="test")
    try:
        plan = tasks.submit(rt, ws, PLAN).id
        w = waits(down, plan, "worker")
        assert w.details["depth"] is None
        assert w.sentence.endswith(
            "how many wait there is unknown: the broker could not be reached"
        )
    finally:
        down.close()
        app.close()


def test_legacy_mode_every_task_waits_behind_the_workspace(legacy_rt: Runtime, ws: str) -> None:
    first, second = (tasks.submit(legacy_rt, ws, PLAN).id for _ in range(2))
    third = tasks.submit(legacy_rt, ws, PA).id
    assert waits(legacy_rt, first, "worker").details["queue"] == QUEUE_DISPATCH
    d = dispatcher.dispatch(legacy_rt, ws)
    assert d.task_id == first and d.fence is not None
    assert begin(legacy_rt, first, d.fence).accepted

    w = waits(legacy_rt, third, "queue")
    assert w.sentence.startswith(
        f"2nd in line in workspace net: task {first} (plan) holds it, planning since "
    )
    assert w.sentence.endswith(f"; task {second} is ahead")

    # In legacy mode a lock lets the plans in the line go, not the plan+apply.
    assert end(legacy_rt, first, d.fence, PLAN_NO_CHANGES).accepted
    workspaces.lock(legacy_rt, ws, holder="alice", reason="freeze")
    assert waits(legacy_rt, second, "worker").details["place"] == 1
    assert waits(legacy_rt, third, "lock").details["lock"]["reason"] == "freeze"
    assert dispatcher.dispatch(legacy_rt, ws).task_id == second


# ---------------------------------------------------------------- runq workspace show


def test_a_workspace_overview_lists_its_active_task_queue_plans_lock_and_state(
    rt: Runtime, ws: str
) -> None:
    applied, f = applying(rt, ws)
    assert begin(rt, applied, f, Phase.APPLY).accepted
    assert reports.accept(rt, StateWritten(applied, f, 4, "L1", b'{"serial": 4}')).accepted
    assert end(rt, applied, f, APPLY_OK, Phase.APPLY).accepted
    active, f = claimed(rt, ws, PA)
    assert begin(rt, active, f).accepted
    queued = [tasks.submit(rt, ws, PA).id for _ in range(2)]
    plan, f = claimed(rt, ws, PLAN)
    assert begin(rt, plan, f).accepted
    tasks.submit(rt, ws, PLAN)  # a pending plan queues behind nothing
    workspaces.lock(rt, ws, holder="alice", reason="freeze")

    o = Client(rt).workspace(ws)
    assert o.active is not None and o.active.id == active
    assert [t.id for t in o.queue] == queued
    assert [t.id for t in o.running_plans] == [plan]
    assert (o.workspace.locked_by, o.workspace.lock_reason) == ("alice", "freeze")
    assert o.state is not None
    assert (o.state.version, o.state.serial, o.state.task_id) == (1, 4, applied)
    j = o.to_json()
    assert [(t["id"], t["place"]) for t in j["queue"]] == [(queued[0], 1), (queued[1], 2)]
    assert (j["active"]["id"], j["state"]["serial"], j["locked_by"]) == (active, 4, "alice")
    w = Client(rt).why(queued[1])
    assert w is not None and (w.kind, w.details["ahead"]) == ("queue", [queued[0]])


# ---------------------------------------------------------------- the CLI


def test_cli_show_and_workspace_show(cli: Cli) -> None:  # noqa: F811 - the fixture
    cli.ok("db", "upgrade")
    cli.ok("workspace", "create", "net", "--dir", str(cli.source))
    plan = cli.ok("submit", "net", "--type", "plan")["id"]
    w = cli.ok("show", str(plan))["waiting_for"]
    assert (w["kind"], w["details"]["queue"], w["details"]["depth"]) == ("worker", QUEUE_PLANS, 1)

    pa = cli.ok("submit", "net", "--type", "plan_and_apply")["id"]
    cli.ok("workspace", "lock", "net", "--reason", "freeze")
    w = cli.ok("show", str(pa))["waiting_for"]
    assert (w["kind"], w["details"]["lock"]["reason"]) == ("lock", "freeze")
    text = cli("show", str(pa), as_json=False)
    assert text.code == 0
    assert "             why: queued but held back: workspace net is locked by cli:" in text.out

    shown = cli.ok("workspace", "show", "net")
    assert (shown["name"], shown["locked"], shown["lock_reason"]) == ("net", True, "freeze")
    assert [(t["id"], t["place"]) for t in shown["queue"]] == [(pa, 1)]
    assert (shown["active"], shown["running_plans"], shown["state"]) == (None, [], None)
    assert shown["dispatch_mode"] == "new"
    text = cli("workspace", "show", "net", as_json=False)
    assert text.code == 0
    assert f"1. task {pa} plan_and_apply, pending since " in text.out
    assert "     locked by: cli:" in text.out and '("freeze") since ' in text.out
    assert "state: none stored yet" in text.out

    cli.ok("cancel", str(pa))
    assert cli.ok("show", str(pa))["waiting_for"] is None
    r = cli("workspace", "show", "nope")
    assert r.code == 3 and r.error == "workspace 'nope' does not exist"
