"""Issue 6: the seed's four scenarios in agent mode, and work spread over
hosts that share no disk.

One cluster for the module: three core workers (``celery -A celery_app
worker``) and two ``runq agent --capacity 2`` processes, each a host of its
own as separate containers would be: its own ``RUNQ_DATA_DIR``, its own
terraform wrapper logging what it ran. The agents get the broker and their
pool's token, and a database URL nothing answers on.

Capacity: the "three plans at once" scenario needs three phases running in
the pool at the same moment, so the agents' capacities must add up to at
least three; with two agents that is capacity 2 each (1 each would run two
plans and queue the third). The mixed scenario needs two (A's apply beside
plan B).

Verdicts are orderings of ``task_events`` timestamps, as in
tests/scenario/test_scenarios.py; who ran what comes from the hosts' wrapper
logs and the executor handles.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from scheduler import artifacts
from scheduler.states import DispatchMode, ExecutionMode, Phase, TaskStatus
from tests.scenario import scenarios
from tests.scenario.cluster import Cluster, Invocation, Life, describe

pytestmark = [pytest.mark.scenario, pytest.mark.postgres, pytest.mark.terraform]

CLUSTER_MODE = DispatchMode.NEW
CLUSTER_REDIS_DB = 4
CLUSTER_WORKERS = 3
CLUSTER_SEPARATE_HOSTS = True
CLUSTER_AGENTS = 2
CLUSTER_AGENT_CAPACITY = 2
CLUSTER_EXECUTION_MODE = ExecutionMode.AGENT
#: The agents report and ask over the broker: run on both.
CLUSTER_BROKERS = ("redis", "amqp")

WORKERS = {f"w{i}" for i in range(1, CLUSTER_WORKERS + 1)}
AGENTS = {f"a{i}" for i in range(1, CLUSTER_AGENTS + 1)}

#: The terraform command that is the phase itself (init and show surround it).
MAIN_COMMAND = {Phase.PLAN: "plan", Phase.APPLY: "apply"}


def phases_run(c: Cluster, ids: set[int]) -> dict[tuple[int, str], list[Invocation]]:
    """(task, phase) -> the terraform commands run for it, on any host."""
    out: dict[tuple[int, str], list[Invocation]] = defaultdict(list)
    for inv in c.invocations():
        if inv.task_id in ids:
            out[(inv.task_id, inv.phase)].append(inv)
    return out


def check_each_phase_ran_once(
    c: Cluster, lives: list[Life], hosts: set[str]
) -> dict[tuple[int, str], str]:
    """Each phase the events record ran once, whole, on one of ``hosts``:
    one fence, one host, its main command once. Returns (task, phase) -> host."""
    ids = {life.id for life in lives}
    runs = phases_run(c, ids)
    timeline = describe(lives)
    ran: dict[tuple[int, str], str] = {}
    for life in lives:
        expected = {(life.id, str(Phase.PLAN))}
        if any(e.to_status is TaskStatus.APPLYING for e in life.events):
            expected.add((life.id, str(Phase.APPLY)))
        got = {key for key in runs if key[0] == life.id}
        assert got == expected, f"task {life.id}: phases run {got}, expected {expected}\n{timeline}"
        # One claim per phase: nothing was handed out twice.
        claims = [
            e for e in life.events if e.to_status in {TaskStatus.PLANNING, TaskStatus.APPLYING}
        ]
        assert len(claims) == len(expected), timeline
    for (task_id, phase), invs in runs.items():
        where = {(i.host, i.fence) for i in invs}
        assert len(where) == 1, f"task {task_id} {phase} ran on {where}: {invs}"
        [(host, _fence)] = where
        assert host in hosts, f"task {task_id} {phase} ran on {host}, not on {hosts}"
        main = [i for i in invs if i.command == MAIN_COMMAND[Phase(phase)]]
        assert len(main) == 1, f"task {task_id} {phase}: terraform {phase} ran {len(main)}x"
        ran[(task_id, phase)] = host
    return ran


def check_on_agents(c: Cluster, lives: list[Life]) -> None:
    """Every phase ran on an agent, and each task's last handle names one."""
    check_each_phase_ran_once(c, lives, AGENTS)
    for life in lives:
        handle = life.task.executor_handle or ""
        assert handle.startswith("agent:"), f"task {life.id}: handle {handle!r}"


# -- the seed's four scenarios, in agent mode ---------------------------------------


def test_plan_does_not_delay_plan_and_apply(cluster: Cluster) -> None:
    a, b = scenarios.plan_then_plan_and_apply(cluster)
    scenarios.check_plan_does_not_delay_plan_and_apply(a, b)
    check_on_agents(cluster, [a, b])


def test_three_plans_run_at_the_same_time(cluster: Cluster) -> None:
    lives = scenarios.three_plans(cluster)
    scenarios.check_three_plans_at_once(lives)
    check_on_agents(cluster, lives)


def test_plan_and_applies_never_overlap_and_keep_queue_order(cluster: Cluster) -> None:
    a, b = scenarios.two_plan_and_applies(cluster)
    scenarios.check_plan_and_applies_serialized(a, b)
    check_on_agents(cluster, [a, b])


def test_mixed_plan_runs_beside_apply_next_plan_and_apply_waits(cluster: Cluster) -> None:
    a, b, c = scenarios.mixed(cluster)
    scenarios.check_mixed(a, b, c)
    check_on_agents(cluster, [a, b, c])


# -- spread over hosts ------------------------------------------------------------


def handle_owner(c: Cluster, handle: str) -> str | None:
    """The worker or agent whose process an executor handle names
    (``local:host:pid:run`` or ``agent:id:host:pid:run``)."""
    parts = handle.split(":")
    pool = c.pool if parts[0] == "local" else c.agents
    assert pool is not None
    return pool.worker_of(int(parts[-2]))


def test_work_spreads_over_workers_and_agents_and_state_follows(cluster: Cluster) -> None:
    c = cluster
    local_plans = c.workspace("spread-local", plan_seconds=2, mode=ExecutionMode.LOCAL)
    agent_plans = c.workspace("spread-agent", plan_seconds=2, mode=ExecutionMode.AGENT)
    chains = {
        ExecutionMode.LOCAL: c.workspace("state-local", auto_apply=True, mode=ExecutionMode.LOCAL),
        ExecutionMode.AGENT: c.workspace("state-agent", auto_apply=True, mode=ExecutionMode.AGENT),
    }
    plan_ws = {ExecutionMode.LOCAL: local_plans, ExecutionMode.AGENT: agent_plans}
    members = {ExecutionMode.LOCAL: WORKERS, ExecutionMode.AGENT: AGENTS}
    plans: dict[ExecutionMode, list[int]] = {
        ExecutionMode.LOCAL: [c.submit(local_plans, "plan").id for _ in range(6)],
        ExecutionMode.AGENT: [c.submit(agent_plans, "plan").id for _ in range(4)],
    }
    applies: dict[ExecutionMode, list[int]] = {m: [] for m in chains}
    # Plan+applies queue behind each other in their workspace; each plan
    # and apply may land on any host of its mode. Nothing steers them: until
    # each chain has three applies and has crossed hosts (a phase on one host
    # after a phase on another), queue another plan+apply; until every host
    # of a mode ran something, queue more plans (rarely needed).
    ran: dict[tuple[int, str], str] = {}
    by_mode: dict[ExecutionMode, set[str]] = {}
    for _round in range(6):
        for mode, ws in chains.items():
            if len(applies[mode]) < 3 or not crossed(ran, applies[mode]):
                applies[mode].append(c.submit(ws, "plan_and_apply").id)
            if ran and by_mode[mode] != members[mode]:
                plans[mode] += [c.submit(plan_ws[mode], "plan").id for _ in range(3)]
        ids = {m: plans[m] + applies[m] for m in chains}
        all_ids = [i for m in chains for i in ids[m]]
        c.wait(all_ids)
        lives = list(c.lives(all_ids).values())
        ran = check_each_phase_ran_once(c, lives, WORKERS | AGENTS)
        by_mode = {
            m: {host for (task_id, _p), host in ran.items() if task_id in ids[m]} for m in chains
        }
        if all(
            len(applies[m]) >= 3 and crossed(ran, applies[m]) and by_mode[m] == members[m]
            for m in chains
        ):
            break
    timeline = describe(lives)
    views = {life.id: life.task for life in lives}
    all_plans = {i for m in chains for i in plans[m]}
    assert all(
        v.status is (TaskStatus.SUCCESS if v.id in all_plans else TaskStatus.APPLIED)
        for v in views.values()
    ), timeline

    # No host used a common data directory (the client's stays unmade).
    assert not c.settings.data_dir.exists(), sorted(c.settings.data_dir.iterdir())
    assert all((c.hosts[h] / "data" / "work").is_dir() for h in WORKERS | AGENTS), c.hosts

    # Local phases ran on the core workers, agent phases on the agents, and
    # every one of them took some.
    assert by_mode[ExecutionMode.LOCAL] == WORKERS, f"{by_mode}\n{timeline}"
    assert by_mode[ExecutionMode.AGENT] == AGENTS, f"{by_mode}\n{timeline}"
    local_ids = set(ids[ExecutionMode.LOCAL])
    # The handles agree with the wrapper logs on who ran each task's last phase.
    for v in views.values():
        handle = v.executor_handle or ""
        last = str(Phase.APPLY) if v.status is TaskStatus.APPLIED else str(Phase.PLAN)
        assert handle.startswith("local:" if v.id in local_ids else "agent:"), handle
        assert handle_owner(c, handle) == ran[(v.id, last)], (handle, ran[(v.id, last)])

    # State carries across hosts: every apply stored a version, serials grow
    # in one lineage, and every plan after the first saw the state the
    # previous apply left (it replaces the resource instead of adding it).
    for mode, chain in applies.items():
        ws = chains[mode]
        with c.rt.sessions() as s:
            versions = artifacts.state_versions(s, ws)
        # An apply may store more than one version: the runner stores each
        # serial terraform writes mid-apply (a replacement is a destroy, then
        # a create), as it catches them. In order, and none missing:
        writers = [v.task_id for v in versions]
        assert [t for i, t in enumerate(writers) if i == 0 or writers[i - 1] != t] == chain, (
            mode,
            versions,
        )
        serials = [v.serial for v in versions]
        assert serials == sorted(set(serials)), (mode, serials)
        assert len({v.lineage for v in versions}) == 1, (mode, versions)
        first, *later = (views[i] for i in chain)
        assert (first.add, first.destroy) == (1, 0), first
        assert all((v.add, v.destroy) == (1, 1) for v in later), later
        assert crossed(ran, chain), f"{mode}: all on one host: {chain_hosts(ran, chain)}"
    print(
        "\nhosts: "
        + ", ".join(
            f"{h}={sum(1 for x in ran.values() if x == h)}" for h in sorted(WORKERS | AGENTS)
        )
        + "; chains: "
        + "; ".join(f"{m}: {chain_hosts(ran, chain)}" for m, chain in applies.items())
    )


def chain_hosts(ran: dict[tuple[int, str], str], ids: list[int]) -> list[str]:
    """The hosts of a chain's phases, in order (plan, apply, plan, ...)."""
    return [ran.get((i, str(p)), "?") for i in ids for p in (Phase.PLAN, Phase.APPLY)]


def crossed(ran: dict[tuple[int, str], str], ids: list[int]) -> bool:
    """Did a phase of the chain run on another host than the one before it?"""
    hosts = chain_hosts(ran, ids)
    return "?" not in hosts and len(set(hosts)) > 1
