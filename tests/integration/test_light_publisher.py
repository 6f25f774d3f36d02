"""The clients' publisher (:class:`scheduler.brokers.KombuPublisher`) sends
what Celery's ``app.send_task`` sends, without a Celery app: compared field by
field with a message Celery put on Redis, and run by real ``celery worker``
processes, on Redis and on RabbitMQ. The read-only CLI commands it makes
possible do not import Celery at all (issue 8).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from celery_app.runtime import CeleryPublisher, private_app
from scheduler import messages
from scheduler.api import Client
from scheduler.brokers import KombuPublisher
from scheduler.db import make_engine, upgrade
from scheduler.settings import Settings
from scheduler.states import SETTLED, TaskStatus
from tests.workers import WorkerPool

pytestmark = pytest.mark.redis

#: Fields that differ between any two sends (ids, and kombu's delivery tag).
PER_SEND = {"id", "root_id", "correlation_id", "reply_to", "delivery_tag"}


def raw_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The kombu envelopes waiting in ``queue`` on Redis, oldest first."""
    client = Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    return [json.loads(item) for item in reversed(raw)]  # LPUSH: newest first


def without(fields: dict[str, Any], drop: set[str]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in drop}


@pytest.mark.parametrize(
    "message",
    [
        messages.claim_plan(7, "net"),
        messages.dispatch("net"),
        messages.Message(messages.TASK_EXECUTE, messages.QUEUE_RUNS, (7, 3), "task 7: plan"),
        # No label: the arguments, cut short, stand in for it.
        messages.Message(messages.TASK_EXECUTE, messages.QUEUE_RUNS, (8, 1)),
    ],
    ids=["claim_plan", "dispatch", "execute", "unlabelled"],
)
def test_the_message_is_the_one_celery_sends(redis_url: str, message: messages.Message) -> None:
    app = private_app(Settings(redis_url=redis_url), "light-publisher-test")
    light = KombuPublisher(redis_url)
    try:
        celery_id = CeleryPublisher(app).publish(message)
        light_id = light.publish(message)
    finally:
        light.close()
        app.close()

    sent, ours = raw_messages(redis_url, message.queue)
    assert sent["headers"]["id"] == celery_id and ours["headers"]["id"] == light_id
    # The fields a worker and Flower read, from Celery's own message.
    assert ours["headers"]["task"] == sent["headers"]["task"] == message.task
    assert ours["headers"]["argsrepr"] == sent["headers"]["argsrepr"] == message.describe()
    routed = sent["properties"]["delivery_info"]
    assert (
        ours["properties"]["delivery_info"]
        == routed
        == {
            "exchange": "",
            "routing_key": message.queue,
        }
    )
    assert ours["body"] == sent["body"]  # args, kwargs and embed, byte for byte
    args, kwargs, embed = json.loads(base64.b64decode(ours["body"]))
    assert (args, kwargs) == (list(message.args), {})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    # And everything else, but for what differs between any two sends.
    assert without(ours, {"headers", "properties"}) == without(sent, {"headers", "properties"})
    assert without(ours["headers"], PER_SEND) == without(sent["headers"], PER_SEND)
    assert ours["headers"]["root_id"] == light_id
    assert ours["properties"]["correlation_id"] == light_id
    # Celery also copies argsrepr into the properties, where nothing reads it.
    celery_properties = without(sent["properties"], PER_SEND | {"argsrepr"})
    assert without(ours["properties"], PER_SEND) == celery_properties


def test_depth_counts_waiting_messages(redis_url: str) -> None:
    light = KombuPublisher(redis_url)
    try:
        assert light.depth(messages.QUEUE_PLANS) == 0  # never declared
        light.publish(messages.claim_plan(1))
        light.publish(messages.claim_plan(2))
        assert light.depth(messages.QUEUE_PLANS) == 2
        assert light.depth(messages.QUEUE_DISPATCH) == 0
    finally:
        light.close()
    down = KombuPublisher("redis://127.0.0.1:1/0")
    try:
        assert down.depth(messages.QUEUE_PLANS) is None  # unknown, not 0
    finally:
        down.close()


# ---------------------------------------------------------------- real workers


@pytest.fixture(params=["redis", pytest.param("amqp", marks=pytest.mark.amqp)])
def broker_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    if request.param == "redis":
        return redis_url
    return str(request.getfixturevalue("amqp_url"))


@pytest.fixture
def client(tmp_path: Path, redis_url: str, broker_url: str) -> Iterator[Client]:
    url = f"sqlite:///{tmp_path / 'runq.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    settings = Settings(
        database_url=url,
        redis_url=redis_url,
        broker_url=broker_url if broker_url != redis_url else "",
        data_dir=tmp_path / "data",
        executor="fake",
    )
    made = Client.from_env(settings, actor="light-test")
    assert isinstance(made.runtime.publisher, KombuPublisher)
    yield made
    made.close()


@pytest.mark.scenario
def test_real_workers_run_what_it_sends(client: Client, tmp_path: Path) -> None:
    """A plan (runq.claim_plan on runq.plans) and a plan+apply (runq.dispatch
    on runq.dispatch, then the worker's own runq.execute) submitted through
    the Python API, which publishes with the light publisher, run to the end
    on real workers."""
    st = client.runtime.settings
    env = {
        "RUNQ_DATABASE_URL": st.resolved_database_url,
        "RUNQ_REDIS_URL": st.redis_url,
        "RUNQ_BROKER_URL": st.broker_url,
        "RUNQ_DATA_DIR": str(tmp_path / "worker-data"),
        "RUNQ_EXECUTOR": "fake",
    }
    pool = WorkerPool(1, env, tmp_path / "logs", concurrency=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.tf").write_text("")
    client.create_workspace("net", source_dir=str(src), auto_apply=True)
    pool.start()
    try:
        plan = client.submit("net", "plan", message="light")
        pa = client.submit("net", "plan_and_apply")
        done = client.wait([plan.id, pa.id], timeout=60, until=SETTLED)
        log = pool.logs()["w1"]
    finally:
        pool.stop()
    assert [t.status for t in done] == [TaskStatus.SUCCESS, TaskStatus.APPLIED], log
    # The worker took them as Celery task messages, with runq's labels.
    assert "runq.claim_plan[" in log and "runq.dispatch[" in log


# ---------------------------------------------------------------- the CLI


def test_read_only_commands_do_not_import_celery(tmp_path: Path, redis_url: str) -> None:
    """`runq show` (even of a plan waiting for a worker, which reads the
    queue's depth from the broker) and `runq list` never import Celery."""
    url = f"sqlite:///{tmp_path / 'runq.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNQ_")}
    env.update(RUNQ_DATABASE_URL=url, RUNQ_REDIS_URL=redis_url, RUNQ_DATA_DIR=str(tmp_path))
    src = tmp_path / "src"
    src.mkdir()
    # The console script's entry point, then a look at what it imported.
    probe = (
        "import sys\n"
        "from scheduler.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'celery', 'celery_app'})\n"
        "print('IMPORTED', *loaded, file=sys.stderr)\n"
    )

    def run(*args: str) -> tuple[Any, list[str]]:
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("IMPORTED")]
        return json.loads(proc.stdout), line.split()[1:]

    run("db", "upgrade")
    run("workspace", "create", "net", "--dir", str(src))
    plan, _ = run("submit", "net", "--type", "plan")
    shown, imported = run("show", str(plan["id"]))
    assert shown["waiting_for"]["details"]["depth"] == 1  # asked the broker
    assert imported == []
    listed, imported = run("list")
    assert [t["id"] for t in listed] == [plan["id"]]
    assert imported == []
