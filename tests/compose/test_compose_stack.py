"""docker-compose.yml on real containers (``make compose-test``; not part of
``make test``).

A private dockerd (deploy/dockerd.sh: no bridge, no iptables, its own data
root) runs the stack with host networking on loopback ports: three worker
containers, two agent containers, beat, Flower, PostgreSQL and Redis, all
from images built here from Debian packages (deploy/build-images.sh). The
runq CLI runs on the host against the stack; the workspaces' directories
exist on the host only.

The tests run in file order on one stack: services and their health, plans
and plan+applies, the CLI in a one-off container as the README shows it, a
worker killed mid-apply and one killed mid-plan, scaling
while work flows, agents, and last the mounts of every container that ran.
Every wait is a bounded poll of the database or of Docker; none is a sleep.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.compose.stack import (
    FLOWER_PASSWORD,
    FLOWER_PORT,
    FLOWER_USER,
    PG_PORT,
    POSTGRES_PASSWORD,
    REDIS_PORT,
    REPO_ROOT,
    RUNQ_SERVICES,
    Stack,
    build_images,
    effective_compose_file,
    start_engine,
    stop_engine,
    wait_for,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(2400)]

WORKERS = 3
AGENTS = 2
POOL = "compose-pool"
#: A lapsed lease (8 s) is found by a sweep (every 2 s): allow a few of each.
LOST_WITHIN = 60.0
SETTLED = {"success", "applied", "failed", "cancelled", "discarded", "apply_pending"}

ARTIFACTS = REPO_ROOT / ".runq" / "compose-test"


def agent_command_exists() -> bool:
    runq = Path(sys.executable).parent / "runq"
    argv = [str(runq) if runq.is_file() else "runq", "agent", "--help"]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def record_timing(name: str, seconds: float) -> None:
    path = ARTIFACTS / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[name] = round(seconds, 1)
    path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"compose-test timing: {name} {seconds:.1f}s")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip("the compose test starts dockerd and runs debootstrap: it needs root")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    docker_host, started_engine = start_engine()
    st: Stack | None = None
    try:
        record_timing("build_images", build_images(docker_host))
        env = {
            "FLOWER_USER": FLOWER_USER,
            "FLOWER_PASSWORD": FLOWER_PASSWORD,
            "POSTGRES_PASSWORD": POSTGRES_PASSWORD,
            "RUNQ_TEST_PG_PORT": str(PG_PORT),
            "RUNQ_TEST_REDIS_PORT": str(REDIS_PORT),
            "RUNQ_TEST_FLOWER_PORT": str(FLOWER_PORT),
            "RUNQ_AGENT_POOL": POOL,
            "RUNQ_AGENT_TOKEN": "",
        }
        compose_file = effective_compose_file(env, ARTIFACTS / "docker-compose.effective.yml")
        st = Stack(docker_host, compose_file, ARTIFACTS, env)
        st.compose("down", "-v", "--remove-orphans", "-t", "2", check=False)
        began = time.monotonic()
        # Agents need their pool's token, which exists once the schema does.
        st.up("--no-build", f"--scale=worker={WORKERS}", "--scale=agent=0")
        wait_for("3 workers to answer a ping", lambda: workers_answering(st) >= WORKERS, 120)
        if agent_command_exists():
            token = st.runq("pool", "create", POOL)["token"]
            st.env["RUNQ_AGENT_TOKEN"] = token
            st.compose_file = effective_compose_file(st.env, compose_file)
            st.scale(agent=AGENTS)
        record_timing("stack_up", time.monotonic() - began)
        yield st
    finally:
        if st is not None:
            print(f"compose logs: {st.save_logs()}")
            st.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
        if started_engine:
            stop_engine()


def workers_answering(st: Stack) -> int:
    status = st.runq("status", check=False) or {}
    return len(status.get("workers") or [])


def workspace(st: Stack, tmp_path: Path, name: str, main_tf: str, *extra: str) -> Path:
    src = tmp_path / name
    src.mkdir()
    (src / "main.tf").write_text(main_tf)
    st.runq("workspace", "create", name, "--dir", str(src), *extra)
    return src


def submit(st: Stack, ws: str, task_type: str) -> int:
    return int(st.runq("submit", ws, "--type", task_type)["id"])


def wait_settled(st: Stack, ids: list[int], timeout: float) -> dict[int, str]:
    def check() -> dict[int, str] | None:
        rows = st.sql("SELECT id, status FROM tasks WHERE id = ANY(%s)", ids)
        statuses = {int(i): str(s) for i, s in rows}
        return statuses if all(s in SETTLED for s in statuses.values()) else None

    return wait_for(f"tasks {ids} to settle", check, timeout, interval=1.0)


def stored_states(stack: Stack, task_id: int) -> list[int]:
    """The serials of the states a task's apply stored."""
    rows = stack.sql("SELECT serial FROM state_versions WHERE task_id = %s ORDER BY id", task_id)
    return [int(r[0]) for r in rows]


def null_resource(name: str, trigger: str, provisioner: str = "") -> str:
    body = f'  triggers = {{ v = "{trigger}" }}\n'
    if provisioner:
        body += f'  provisioner "local-exec" {{\n    command = "{provisioner}"\n  }}\n'
    return f'resource "null_resource" "{name}" {{\n{body}}}\n'


# ---------------------------------------------------------------- the tests


def test_services_up_and_healthy(stack: Stack) -> None:
    assert len(stack.containers("worker")) == WORKERS
    (migrate,) = stack.containers("migrate", all_states=True)
    state = stack.inspect(migrate)["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0)
    for service in ("redis", "postgres", "beat", "flower"):
        (container,) = stack.containers(service)
        wait_for(f"{service} to be healthy", lambda c=container: stack.health(c) == "healthy", 90)
    for service in ("worker", "agent", "beat", "flower", "redis", "postgres"):
        restart = stack.inspect_config(service)["restart"]
        assert restart == "unless-stopped", (service, restart)


def flower_api(path: str) -> Any:
    auth = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    url = f"http://127.0.0.1:{FLOWER_PORT}{path}"
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
        return json.loads(reply.read())


def test_flower_asks_for_basic_auth_on_loopback(stack: Stack) -> None:
    url = f"http://127.0.0.1:{FLOWER_PORT}/api/workers"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url, timeout=10)
    assert denied.value.code == 401
    flower_api("/api/workers")
    (flower,) = stack.containers("flower")
    args = stack.inspect(flower)["Config"]["Env"]
    assert "FLOWER_ADDRESS=127.0.0.1" in args


def test_agent_service_has_no_database_credentials(stack: Stack) -> None:
    agent = stack.inspect_config("agent")
    values = " ".join(f"{k}={v}" for k, v in agent["environment"].items())
    assert "RUNQ_DATABASE_URL" not in agent["environment"]
    assert POSTGRES_PASSWORD not in values
    assert "postgresql" not in values
    for container in stack.containers("agent"):
        env = " ".join(stack.inspect(container)["Config"]["Env"])
        assert "RUNQ_DATABASE_URL" not in env
        assert POSTGRES_PASSWORD not in env


def test_plans_and_plan_applies(stack: Stack, tmp_path: Path) -> None:
    workspace(stack, tmp_path, "net", null_resource("vpc", "1"), "--auto-apply")
    workspace(stack, tmp_path, "app", null_resource("svc", "1"))
    plans = [submit(stack, ws, "plan") for ws in ("net", "app", "net", "app", "net")]
    net_run = submit(stack, "net", "plan_and_apply")
    app_run = submit(stack, "app", "plan_and_apply")

    statuses = wait_settled(stack, [*plans, net_run, app_run], 180)
    assert [statuses[p] for p in plans] == ["success"] * len(plans)
    assert statuses[net_run] == "applied"
    assert statuses[app_run] == "apply_pending"
    stack.runq("confirm", str(app_run))
    assert wait_settled(stack, [app_run], 120)[app_run] == "applied"
    for run in (net_run, app_run):
        shown = stack.runq("show", str(run))
        assert shown["changes"]["add"] == 1
        assert [e["to"] for e in shown["events"]].count("applying") == 1

    # The applied state is in the database: a plan on any worker sees it.
    again = submit(stack, "net", "plan")
    assert wait_settled(stack, [again], 120)[again] == "success"
    assert stack.runq("show", str(again))["has_changes"] is False

    # Flower, in its container, saw the worker containers run each of them,
    # and lists it by what it is.
    def labelled() -> dict[str, str]:
        return {t["args"]: t["state"] for t in flower_api("/api/tasks").values()}

    expected = {f"task {p}: plan in {ws}" for p, ws in zip(plans, ["net", "app"] * 3, strict=False)}
    shown = wait_for("Flower to list every plan", lambda: expected <= set(labelled()), 30)
    assert shown
    assert {labelled()[label] for label in expected} == {"SUCCESS"}


def test_cli_in_a_one_off_container(stack: Stack, tmp_path: Path) -> None:
    """The README's way to submit: the CLI in a `docker compose run` of the
    migrate service, the directory mounted read-only for that container only."""
    src = tmp_path / "oneoff"
    src.mkdir()
    (src / "main.tf").write_text(null_resource("r", "1"))
    src.chmod(0o755)
    mount = f"{src}:/config/oneoff:ro"

    def cli(*args: str) -> str:
        return stack.compose("run", "--rm", "--no-deps", "-v", mount, "migrate", "runq", *args)

    cli("workspace", "create", "oneoff", "--dir", "/config/oneoff", "--auto-apply")
    run = int(json.loads(cli("submit", "oneoff", "--type", "plan_and_apply", "--json"))["id"])
    assert wait_settled(stack, [run], 180)[run] == "applied"


def test_worker_killed_mid_apply_fails_it_and_never_reruns(stack: Stack, tmp_path: Path) -> None:
    marker = "sleep 47.31"
    src = workspace(
        stack,
        tmp_path,
        "crash",
        null_resource("first", "1")
        + null_resource("slow", "1", marker).replace(
            'resource "null_resource" "slow" {\n',
            'resource "null_resource" "slow" {\n  depends_on = [null_resource.first]\n',
        ),
        "--auto-apply",
    )
    run = submit(stack, "crash", "plan_and_apply")
    stack.wait_status(run, {"applying"}, 120)
    victim = wait_for(
        "the apply's local-exec to run", lambda: stack.runner_of("worker", marker), 60
    )
    # Terraform wrote the state with null_resource.first before it started
    # the slow one; the runner stores it while the apply still runs.
    stored_before = wait_for(
        "the partial state to be stored", lambda: stored_states(stack, run), 30
    )
    stack.docker("kill", victim)
    killed_at = time.monotonic()

    def failed_and_not_rerun() -> bool:
        assert stack.runner_of("worker", marker) is None, "the apply runs again"
        return stack.status(run) == "failed"

    wait_for("the killed apply to fail", failed_and_not_rerun, LOST_WITHIN, interval=1.0)
    record_timing("apply_lost_found_after_kill", time.monotonic() - killed_at)
    shown = stack.runq("show", str(run))
    assert shown["error"].startswith("executor lost"), shown["error"]
    assert [e["to"] for e in shown["events"]].count("applying") == 1
    # What the apply wrote before it was killed is kept, and nothing came after.
    assert stored_states(stack, run) == stored_before

    # The workspace moves on, with the configuration as it is at submit.
    (src / "main.tf").write_text(null_resource("first", "1") + null_resource("slow", "2"))
    after = submit(stack, "crash", "plan_and_apply")
    assert wait_settled(stack, [after], 180)[after] == "applied"
    stack.scale(worker=WORKERS)
    wait_for("workers back", lambda: workers_answering(stack) >= WORKERS, 120)


def test_worker_killed_mid_plan_is_rerun_elsewhere(stack: Stack, tmp_path: Path) -> None:
    marker = "sleep 15.37"
    src = workspace(stack, tmp_path, "replan", null_resource("a", "1"))
    (src / "slow.env").write_text("SLOW_TF_PLAN_SECONDS=15.37\n")
    plan = submit(stack, "replan", "plan")
    victim = wait_for("the plan to run", lambda: stack.runner_of("worker", marker), 120)
    stack.docker("kill", victim)
    rerun_on = wait_for(
        "the plan to be re-run", lambda: stack.runner_of("worker", marker), LOST_WITHIN
    )
    assert rerun_on != victim
    assert wait_settled(stack, [plan], 120)[plan] == "success"
    events = stack.events(plan)
    assert ("planning", "planning") in [(e[0], e[1]) for e in events]
    assert max(e[3] for e in events) >= 2
    stack.scale(worker=WORKERS)
    wait_for("workers back", lambda: workers_answering(stack) >= WORKERS, 120)


def test_scaling_workers_while_work_flows(stack: Stack, tmp_path: Path) -> None:
    for name in ("flow1", "flow2"):
        src = workspace(stack, tmp_path, name, null_resource("r", name), "--auto-apply")
        (src / "slow.env").write_text("SLOW_TF_PLAN_SECONDS=2\n")
    ids = [submit(stack, ws, "plan") for ws in ("flow1", "flow2") * 4]
    ids += [submit(stack, ws, "plan_and_apply") for ws in ("flow1", "flow2")]

    stack.scale(worker=5)
    wait_for("5 workers", lambda: workers_answering(stack) >= 5, 120)
    ids += [submit(stack, ws, "plan") for ws in ("flow1", "flow2") * 2]
    # Scaling down stops containers with SIGTERM: their running plans are
    # handed back and re-run; an apply would fail "worker shut down".
    stack.scale(worker=2)
    assert len(stack.containers("worker")) == 2
    ids += [submit(stack, ws, "plan") for ws in ("flow1", "flow2") * 2]
    ids += [submit(stack, ws, "plan_and_apply") for ws in ("flow1", "flow2")]

    statuses = wait_settled(stack, ids, 300)
    bad = {
        i: (s, stack.runq("show", str(i))["error"])
        for i, s in statuses.items()
        if s not in {"success", "applied"}
    }
    shut_down = {i: v for i, v in bad.items() if (v[1] or "").startswith("worker shut down")}
    assert bad == shut_down, bad
    assert all(stack.runq("show", str(i))["type"] == "plan_and_apply" for i in shut_down)
    stack.scale(worker=WORKERS)
    wait_for("workers back", lambda: workers_answering(stack) >= WORKERS, 120)


def test_agents_run_their_pool(stack: Stack, tmp_path: Path) -> None:
    if not agent_command_exists():
        pytest.skip("`runq agent` is not in this checkout yet")
    agents = stack.containers("agent")
    assert len(agents) == AGENTS
    for container in agents:
        wait_for("the agent to be healthy", lambda c=container: stack.health(c) == "healthy", 120)
    workspace(
        stack, tmp_path, "remote", null_resource("r", "1"),
        "--auto-apply", "--mode", "agent", "--agent-pool", POOL,
    )  # fmt: skip
    ids = [submit(stack, "remote", "plan"), submit(stack, "remote", "plan_and_apply")]
    statuses = wait_settled(stack, ids, 180)
    assert [statuses[i] for i in ids] == ["success", "applied"]
    for i in ids:
        handle = stack.runq("show", str(i))["executor_handle"] or ""
        assert not handle.startswith("local:"), handle


def test_no_container_shares_a_volume_for_state_or_plans(stack: Stack) -> None:
    by_source: dict[str, list[str]] = {}
    for service in (*RUNQ_SERVICES, "redis", "postgres"):
        for container in stack.containers(service, all_states=True):
            info = stack.inspect(container)
            mounts = info["Mounts"]
            if service in RUNQ_SERVICES:
                assert mounts == [], (service, mounts)
                env = dict(e.split("=", 1) for e in info["Config"]["Env"])
                assert env["RUNQ_DATA_DIR"] == "/var/lib/runq"
            for mount in mounts:
                by_source.setdefault(mount.get("Name") or mount["Source"], []).append(container)
    shared = {source: users for source, users in by_source.items() if len(users) > 1}
    assert shared == {}
    # The compose file itself declares no volume for any runq service.
    config = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    for service in RUNQ_SERVICES:
        assert "volumes" not in config["services"][service], service
