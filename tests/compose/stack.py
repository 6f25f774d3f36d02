"""The compose stack under test: a private dockerd, the images, and
``docker-compose`` (the v1 CLI) driving docker-compose.yml with the host-network
override docker-compose.test.yml.

The runq CLI runs on the host, from this venv, against the stack's PostgreSQL
and Redis on loopback ports; workspace source directories exist on the host
only, so a run that needed them inside a container would fail.

Which container runs a phase is found by a marker in the process list
(``docker top``): a plan sleeps for a workspace-specific number of seconds in
the test's terraform wrapper, and an apply runs a ``local-exec`` ``sleep`` of
its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
PROJECT = "runq-compose-test"
PG_PORT = int(os.environ.get("RUNQ_TEST_PG_PORT", "25432"))
REDIS_PORT = int(os.environ.get("RUNQ_TEST_REDIS_PORT", "26379"))
FLOWER_PORT = int(os.environ.get("RUNQ_TEST_FLOWER_PORT", "25555"))
FLOWER_USER = "runq-test"
FLOWER_PASSWORD = "compose-test-secret"
POSTGRES_PASSWORD = "runq-test-db"
#: The services built from the runq image.
RUNQ_SERVICES = ("migrate", "worker", "agent", "beat", "flower")


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """:func:`tests.runner_harness.wait_for`, polling containers less often."""
    from tests.runner_harness import wait_for as poll

    return poll(what, check, timeout, interval)


def docker_bin() -> str:
    """Debian's docker.io client (20.10, matching the engine), else PATH's."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


@dataclass
class Stack:
    """One compose project on the private engine."""

    docker_host: str
    compose_file: Path
    artifacts: Path
    env: dict[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------- commands

    def _run(self, argv: list[str], *, check: bool = True, timeout: float = 300) -> str:
        proc = subprocess.run(
            argv,
            env={**os.environ, **self.env, "DOCKER_HOST": self.docker_host},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc.stdout

    def docker(self, *args: str, check: bool = True) -> str:
        return self._run([docker_bin(), *args], check=check)

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        argv = ["docker-compose", "-p", PROJECT, "-f", str(self.compose_file), *args]
        return self._run(argv, check=check, timeout=timeout)

    def scale(self, **replicas: int) -> None:
        """Scale the named services, leaving everything else as it is."""
        flags = [f"--scale={name}={n}" for name, n in replicas.items()]
        self.up("--no-build", "--no-recreate", "--no-deps", *flags, *replicas)

    # ---------------------------------------------------------- containers

    def containers(self, service: str, *, all_states: bool = False) -> list[str]:
        """Container ids of ``service`` (running ones unless ``all_states``)."""
        out = self.docker(
            "ps", "-q", "--no-trunc", *(["-a"] if all_states else []),
            "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
        )  # fmt: skip
        return out.split()

    def inspect(self, container: str) -> dict[str, Any]:
        (info,) = json.loads(self.docker("inspect", container))
        return dict(info)

    def inspect_config(self, service: str) -> dict[str, Any]:
        """The service as the stack runs it (the effective compose file)."""
        config = yaml.safe_load(self.compose_file.read_text())
        return dict(config["services"][service])

    def health(self, container: str) -> str | None:
        state = self.inspect(container)["State"]
        return state.get("Health", {}).get("Status")

    def running(self, container: str, marker: str) -> bool:
        """Does a process of ``container`` have ``marker`` in its command line?"""
        out = self.docker("top", container, "-eo", "pid,args", check=False)
        return any(marker in line for line in out.splitlines()[1:])

    def runner_of(self, service: str, marker: str) -> str | None:
        found = [c for c in self.containers(service) if self.running(c, marker)]
        assert len(found) <= 1, f"{marker!r} runs in {len(found)} containers: {found}"
        return found[0] if found else None

    def save_logs(self) -> Path:
        path = self.artifacts / "compose.log"
        path.write_text(self.compose("logs", "--no-color", "--timestamps", check=False))
        return path

    def up(self, *args: str, timeout: float = 600) -> None:
        """``docker-compose up -d ARGS``; on failure the error carries what
        compose cannot say (``Container ... is unhealthy`` names no service
        and no cause): every container's state and its log's last lines,
        taken before the fixture's teardown removes them."""
        try:
            self.compose("up", "-d", *args, timeout=timeout)
        except AssertionError as exc:
            ps = self.compose("ps", "-a", check=False)
            logs = self.compose("logs", "--no-color", "--tail=40", check=False)
            raise AssertionError(
                f"{exc}\n--- ps\n{ps}\n--- logs (last 40 lines each)\n{logs}"
            ) from None

    # ------------------------------------------------------------- runq side

    @property
    def pg_dsn(self) -> str:
        return f"postgresql://runq:{POSTGRES_PASSWORD}@127.0.0.1:{PG_PORT}/runq"

    def runq_env(self) -> dict[str, str]:
        """The host CLI's environment: the stack's database and broker."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RUNQ_") and k != "TF_CLI_CONFIG_FILE"
        }
        env.update(
            RUNQ_DATABASE_URL=self.pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1),
            RUNQ_REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0",
            RUNQ_DATA_DIR=str(self.artifacts / "cli-data"),
            RUNQ_LEASE_TTL="8",
            RUNQ_HEARTBEAT_INTERVAL="1",
            RUNQ_RECONCILE_INTERVAL="2",
        )
        return env

    def runq(self, *args: str, check: bool = True) -> Any:
        """``runq ARGS --json`` from the host venv; the parsed JSON output."""
        runq = shutil.which("runq", path=str(Path(sys.executable).parent)) or "runq"
        proc = subprocess.run(
            [runq, *args, "--json"],
            env=self.runq_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"runq {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_dsn, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def status(self, task_id: int) -> str:
        ((status,),) = self.sql("SELECT status FROM tasks WHERE id = %s", task_id)
        return str(status)

    def wait_status(self, task_id: int, wanted: set[str], timeout: float) -> str:
        return wait_for(
            f"task {task_id} to reach {sorted(wanted)}",
            lambda: (s := self.status(task_id)) in wanted and s,
            timeout,
        )

    def events(self, task_id: int) -> list[tuple[str | None, str, str, int]]:
        """(from, to, reason, fence) of each event of the task, oldest first."""
        rows = self.sql(
            "SELECT from_status, to_status, coalesce(reason, ''), fence FROM task_events"
            " WHERE task_id = %s ORDER BY id",
            task_id,
        )
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]


def effective_compose_file(env: dict[str, str], dest: Path) -> Path:
    """docker-compose.yml with docker-compose.test.yml over it, as one file.

    Compose v1 cannot drop a list in an override, and a host-network
    container must publish no ports, so the published ports are removed here
    from every service on the host's network."""
    proc = subprocess.run(
        [
            "docker-compose",
            "-f",
            str(REPO_ROOT / "docker-compose.yml"),
            "-f",
            str(REPO_ROOT / "docker-compose.test.yml"),
            "config",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    config = yaml.safe_load(proc.stdout)
    for service in config["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def start_engine() -> tuple[str, bool]:
    """Start the private dockerd (deploy/dockerd.sh); (DOCKER_HOST, started here)."""
    was_running = (
        subprocess.run(
            [str(DEPLOY / "dockerd.sh"), "status"], capture_output=True, check=False
        ).returncode
        == 0
    )
    out = subprocess.run(
        [str(DEPLOY / "dockerd.sh"), "start"], capture_output=True, text=True, check=True
    ).stdout
    host = out.strip().rsplit("DOCKER_HOST=", 1)[1]
    return host, not was_running


def stop_engine() -> None:
    subprocess.run([str(DEPLOY / "dockerd.sh"), "stop"], check=True)


def build_images(docker_host: str) -> float:
    """deploy/build-images.sh (cached images are kept); the seconds it took."""
    started = time.monotonic()
    subprocess.run(
        [str(DEPLOY / "build-images.sh")],
        env={**os.environ, "DOCKER_HOST": docker_host, "PYTHON": sys.executable},
        check=True,
        timeout=1800,
    )
    return time.monotonic() - started
