"""``runq agent``: a Celery worker that runs one pool's phases.

An agent needs the broker and its pool's token, and nothing else: no
database credentials, no shared disk. It consumes only its pool's queue,
``runq.pool.<name>``, with at most ``capacity`` phases at once (one pool
process each, prefetch off: a message it cannot start stays in the queue for
another agent). Every hand-off is verified against the pool's hand-off key
before anything runs; every report goes back over the broker, signed
(:mod:`executors.remote`).

Its main process sends a signed beat every ``RUNQ_AGENT_BEAT_INTERVAL``
seconds with its capacity and what it runs, which is how the scheduler
knows the pool's capacity (``runq agent list``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from celery_app.config import durable_queue, worker_config
from celery_app.prefetch import ExecuteRequest, HoldRunSlots
from executors import remote, signing
from executors.base import Bundle
from executors.outcome import MessageRejected, PhaseFailed, Watched
from scheduler.settings import Settings

log = logging.getLogger(__name__)

app = Celery("runq-agent")
# RabbitMQ: a running phase keeps its prefetch slot (celery_app.prefetch).
app.steps["consumer"].add(HoldRunSlots)

_state: dict[str, Any] = {}


def configure(settings: Settings, pool: str, capacity: int, ident: str) -> None:
    queue = remote.pool_queue(pool)
    _state.update(settings=settings, pool=pool, capacity=capacity, id=ident)
    app.conf.update(
        **worker_config(settings),
        task_queues=[durable_queue(queue)],
        task_default_queue=queue,
    )


@app.task(
    name=remote.TASK_AGENT_RUN,
    acks_late=False,
    Request=ExecuteRequest,
    throws=(PhaseFailed, MessageRejected),
)
def run(envelope: Any, meta: Any = None) -> str:
    """Run one phase. acks_late is off for the reasons it is on ``execute``:
    a claim whose agent died before it started is the reconciler's to
    re-send; one that started is covered by its lease; and RabbitMQ would
    close the channel of a delivery held past its consumer_timeout. Its
    request keeps the prefetch slot the early ack frees (celery_app.prefetch)."""
    settings: Settings = _state["settings"]
    pool: str = _state["pool"]
    try:
        body = signing.open_(signing.derive(settings.agent_token, "handoff"), envelope)
        bundle = Bundle.from_json(body)
    except (signing.BadSignature, KeyError, TypeError, ValueError) as exc:
        log.warning(
            "rejected a hand-off on pool %s: %s (not from this pool's scheduler)",
            pool,
            exc,
            extra={"action": "handoff_rejected"},
        )
        raise MessageRejected(f"hand-off rejected on pool {pool}: {exc}") from None
    h = bundle.handoff
    if h.agent_pool != pool:
        log.warning("rejected a hand-off for pool %s on pool %s", h.agent_pool, pool)
        raise MessageRejected(f"hand-off for pool {h.agent_pool} rejected on pool {pool}")
    from executors import runner_for

    reporter = remote.BrokerReporter.of(
        settings,
        settings.resolved_broker_url,
        pool,
        signing.run_key(settings.agent_token, h.task_id, h.fence),
    )
    watched = Watched(reporter)
    try:
        runner_for(settings, kind=f"agent:{_state['id']}").run(bundle, watched)
    finally:
        reporter.close()
    # Flower shows this as the task's result, or its failure.
    return watched.outcome(h)


def _running() -> list[dict[str, Any]]:
    """What this agent runs now: from the main process's active requests."""
    from celery.worker import state

    out = []
    for request in list(state.active_requests):
        args: Any = request.args or []
        meta = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
        out.append({k: meta.get(k) for k in ("task_id", "phase", "fence")})
    return out


@worker_ready.connect
def _start_beats(sender: Any = None, **_: Any) -> None:
    beats = _state.get("beats")
    if beats is not None:
        beats.start()
        beats.send()


@worker_shutting_down.connect
def _stop(**_: Any) -> None:
    # SIGTERM reaches the pool processes through the core app's hook
    # (celery_app.app._interrupt_running_phases, connected in every process
    # that imports the celery_app package, this one included): a phase
    # interrupts terraform and reports before Docker's SIGKILL.
    beats = _state.get("beats")
    if beats is not None:
        beats.stop()


def main(settings: Settings, pool: str, capacity: int, loglevel: str = "INFO") -> None:
    """Check the token with the scheduler, then run the worker until stopped."""
    if not settings.agent_token:
        raise SystemExit("runq agent: RUNQ_AGENT_TOKEN is not set (runq pool create prints it)")
    ident = remote.agent_id()
    configure(settings, pool, capacity, ident)
    # One beater: its first beat (before the worker runs anything) is the
    # answered hello; the worker starts the rest once it is ready.
    beats = _state["beats"] = remote.AgentBeats(
        settings.resolved_broker_url,
        pool,
        settings.agent_token,
        capacity,
        _running,
        interval=settings.agent_beat_interval,
        ident=ident,
    )
    try:
        reply = beats.hello(timeout=settings.report_timeout)
    except remote.Refused as exc:
        raise SystemExit(f"runq agent: the scheduler refused this agent: {exc}") from exc
    except remote.NoReply:
        log.warning(
            "no scheduler answered agent %s's first beat in %gs; starting anyway "
            "(are runq workers running on this broker?)",
            ident,
            settings.report_timeout,
        )
    else:
        if not reply.accepted:
            raise SystemExit(f"runq agent: pool {pool!r} refused this agent: {reply.reason}")
    log.info("agent %s serving pool %s with capacity %s", ident, pool, capacity)
    app.worker_main(
        [
            "worker",
            "--loglevel",
            loglevel,
            "--concurrency",
            str(capacity),
            "--hostname",
            f"agent-{ident}@%h",
            "--queues",
            remote.pool_queue(pool),
            # Agents need no state from other workers (every hand-off is
            # self-contained); skipping the sync saves a second at start.
            # Remote control (Flower's inspect) still reaches them.
            "--without-mingle",
            "--without-gossip",
        ]
    )
