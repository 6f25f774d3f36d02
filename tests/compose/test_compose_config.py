"""docker-compose.yml and its test override, checked without an engine (part
of ``make test``): ``docker-compose config -q``, the Compose specification's
JSON schema, and the rules the stack depends on.

The schema is the one Debian's docker-compose package ships
(``compose/config/compose_spec.json``); ``make install`` installs the
package where it runs as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from tests.compose.stack import REPO_ROOT, RUNQ_SERVICES

COMPOSE_FILES = ("docker-compose.yml", "docker-compose.test.yml")
ENV = {"FLOWER_PASSWORD": "x"}

docker_compose = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    docker_compose is None,
    reason="docker-compose is not installed (`make install` installs it as root: "
    "apt-get install docker-compose)",
)


def compose_spec_schema() -> dict[str, Any] | None:
    """The schema file of the installed docker-compose, found through the
    interpreter its script runs with."""
    if docker_compose is None:
        return None
    shebang = Path(docker_compose).read_text(errors="replace").splitlines()[0]
    python = shebang.removeprefix("#!").strip().split()[0] or "python3"
    proc = subprocess.run(
        [
            python,
            "-c",
            "import compose.config, os; print(os.path.dirname(compose.config.__file__))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    path = Path(proc.stdout.strip()) / "compose_spec.json"
    return json.loads(path.read_text()) if proc.returncode == 0 and path.is_file() else None


def load(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((REPO_ROOT / name).read_text()))


def merged() -> dict[str, Any]:
    """What docker-compose makes of the file with the test override on top."""
    assert docker_compose is not None
    argv = [docker_compose, *(a for f in COMPOSE_FILES for a in ("-f", str(REPO_ROOT / f)))]
    out = subprocess.run(
        [*argv, "config"],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(yaml.safe_load(out))


@needs_compose
@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES])
def test_docker_compose_config_is_valid(files: tuple[str, ...]) -> None:
    assert docker_compose is not None
    argv = [docker_compose, *(a for f in files for a in ("-f", str(REPO_ROOT / f)))]
    proc = subprocess.run(
        [*argv, "config", "-q"],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@needs_compose
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_matches_the_compose_spec_schema(name: str) -> None:
    schema = compose_spec_schema()
    if schema is None:
        pytest.skip("this docker-compose ships no compose_spec.json")
    errors = sorted(Draft7Validator(schema).iter_errors(load(name)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_flower_needs_a_password() -> None:
    if docker_compose is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_PASSWORD"}
    proc = subprocess.run(
        [docker_compose, "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "FLOWER_PASSWORD" in proc.stderr


def test_the_stack_as_the_issue_asks() -> None:
    services = load("docker-compose.yml")["services"]
    assert set(services) == {"redis", "postgres", "migrate", "worker", "agent", "beat", "flower"}
    for name, service in services.items():
        assert "container_name" not in service, f"{name} could not scale"
        assert service["restart"] == ("no" if name == "migrate" else "unless-stopped"), name
        if name in RUNQ_SERVICES:
            # One Dockerfile, and no volume: state and plans are in PostgreSQL.
            assert service["image"] == "runq:local", name
            assert service["build"]["context"] == ".", name
            assert "volumes" not in service, name
    for name in ("redis", "postgres", "beat", "flower", "worker", "agent"):
        assert "healthcheck" in services[name], name
    assert "-h 127.0.0.1" in " ".join(services["postgres"]["healthcheck"]["test"])
    agent_env = services["agent"]["environment"]
    assert "RUNQ_DATABASE_URL" not in agent_env
    assert not any("postgres" in str(v) for v in agent_env.values())
    assert "RUNQ_AGENT_TOKEN" in agent_env
    flower = services["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])


@needs_compose
def test_test_override_keeps_to_loopback_and_other_ports() -> None:
    config = merged()
    for name, service in config["services"].items():
        assert service.get("network_mode") == "host", name
    text = json.dumps(config)
    for port in ("5432", "6379", "5555"):
        # The machine's own servers hold these; the stack must not.
        assert f"127.0.0.1:{port}/" not in text and f'"{port}"' not in text, port
