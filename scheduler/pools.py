"""Agent pools, and the agents that serve them.

A pool is a name and a secret token. Its agents hold the token; the
scheduler signs hand-offs to the pool with it and checks every report from
the pool against it (:mod:`executors.signing`). Agents describe themselves in
signed beats; a pool's capacity is the sum of its live agents' capacities.
Kubernetes Jobs sign their reports under a pool too (``RUNQ_K8S_POOL``, of
kind ``k8s``, made on first use), each Job with a key for its own claim only.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler.errors import InvalidInput, NotFound
from scheduler.models import Agent, AgentPool, utcnow
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.workspaces import check_name

log = logging.getLogger(__name__)

KIND_AGENT = "agent"
KIND_K8S = "k8s"


class PoolNotFound(NotFound):
    """No such agent pool."""


@dataclass(frozen=True)
class PoolView:
    name: str
    kind: str
    created_at: datetime
    agents: int
    capacity: int
    busy: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "created_at": self.created_at.isoformat(),
            "live_agents": self.agents,
            "capacity": self.capacity,
            "busy": self.busy,
        }


@dataclass(frozen=True)
class AgentView:
    id: str
    pool: str
    hostname: str
    capacity: int
    running: list[dict[str, Any]]
    started_at: datetime
    last_seen_at: datetime
    live: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pool": self.pool,
            "hostname": self.hostname,
            "capacity": self.capacity,
            "running": self.running,
            "started_at": self.started_at.isoformat(),
            "last_seen_at": self.last_seen_at.isoformat(),
            "live": self.live,
        }


def create(rt: Runtime, name: str, *, kind: str = KIND_AGENT) -> tuple[PoolView, str]:
    """Make pool ``name``; return it and its token (shown once, to the caller)."""
    check_name(name, "pool")
    token = secrets.token_urlsafe(32)
    try:
        with rt.transaction() as s:
            s.add(AgentPool(name=name, kind=kind, token=token, created_at=utcnow()))
    except IntegrityError as exc:
        raise InvalidInput(f"pool {name!r} exists already") from exc
    log.info("pool %s created", name, extra={"action": "pool_created", "pool": name})
    return view(rt, name), token


def load(session: Session, name: str) -> AgentPool:
    pool = session.scalars(select(AgentPool).where(AgentPool.name == name)).one_or_none()
    if pool is None:
        raise PoolNotFound(f"agent pool {name!r} does not exist (create it: runq pool create)")
    return pool


def ensure_k8s_pool(session: Session, settings: Settings) -> AgentPool:
    """The pool that signs Kubernetes Jobs' reports, made on first use."""
    pool = session.scalars(
        select(AgentPool).where(AgentPool.name == settings.k8s_pool)
    ).one_or_none()
    if pool is not None:
        if pool.kind != KIND_K8S:
            raise InvalidInput(
                f"RUNQ_K8S_POOL {settings.k8s_pool!r} names an agent pool, not a Kubernetes one"
            )
        return pool
    try:
        with session.begin_nested():
            pool = AgentPool(
                name=settings.k8s_pool,
                kind=KIND_K8S,
                token=secrets.token_urlsafe(32),
                created_at=utcnow(),
            )
            session.add(pool)
    except IntegrityError:
        return load(session, settings.k8s_pool)
    return pool


def live_since(settings: Settings) -> datetime:
    return utcnow() - timedelta(seconds=settings.agent_ttl)


def _agents(session: Session, pool: AgentPool, since: datetime) -> list[Agent]:
    return list(
        session.scalars(select(Agent).where(Agent.pool_id == pool.id, Agent.last_seen_at >= since))
    )


def capacity(session: Session, settings: Settings, pool: AgentPool) -> tuple[int, int]:
    """``(capacity, busy)`` of ``pool``'s live agents."""
    agents = _agents(session, pool, live_since(settings))
    return (
        sum(a.capacity for a in agents),
        sum(len(json.loads(a.running or "[]")) for a in agents),
    )


def capacity_of(session: Session, settings: Settings, name: str) -> tuple[int, int] | None:
    """``(capacity, busy)`` of pool ``name``'s live agents; None if there is
    no such pool (a workspace may name one that was never made)."""
    try:
        return capacity(session, settings, load(session, name))
    except PoolNotFound:
        return None


def view(rt: Runtime, name: str) -> PoolView:
    with rt.sessions() as s:
        return _view(s, rt.settings, load(s, name))


def _view(session: Session, settings: Settings, pool: AgentPool) -> PoolView:
    cap, busy = capacity(session, settings, pool)
    agents = len(_agents(session, pool, live_since(settings)))
    return PoolView(pool.name, pool.kind, pool.created_at, agents, cap, busy)


def list_all(rt: Runtime) -> list[PoolView]:
    with rt.sessions() as s:
        pools = s.scalars(select(AgentPool).order_by(AgentPool.name)).all()
        return [_view(s, rt.settings, p) for p in pools]


def agents(rt: Runtime, pool: str | None = None) -> list[AgentView]:
    since = live_since(rt.settings)
    with rt.sessions() as s:
        q = select(Agent, AgentPool.name).join(AgentPool, AgentPool.id == Agent.pool_id)
        if pool is not None:
            q = q.where(AgentPool.id == load(s, pool).id)
        rows = s.execute(q.order_by(AgentPool.name, Agent.id)).all()
        return [
            AgentView(
                id=a.id,
                pool=name,
                hostname=a.hostname,
                capacity=a.capacity,
                running=json.loads(a.running or "[]"),
                started_at=a.started_at,
                last_seen_at=a.last_seen_at,
                live=a.last_seen_at >= since,
            )
            for a, name in rows
        ]


def record_beat(session: Session, pool: AgentPool, beat: dict[str, Any]) -> None:
    """Upsert an agent from its (verified) beat."""
    agent_id = str(beat["agent"])[:200]
    agent = session.get(Agent, agent_id)
    now = utcnow()
    running = json.dumps(beat.get("running") or [])
    if agent is None:
        session.add(
            Agent(
                id=agent_id,
                pool_id=pool.id,
                hostname=str(beat.get("hostname", ""))[:300],
                capacity=int(beat["capacity"]),
                running=running,
                started_at=now,
                last_seen_at=now,
            )
        )
        log.info(
            "agent %s joined pool %s (capacity %s)",
            agent_id,
            pool.name,
            beat["capacity"],
            extra={"action": "agent_joined", "pool": pool.name},
        )
        return
    if agent.pool_id != pool.id:
        raise InvalidInput(f"agent {agent_id} belongs to another pool")
    # A clean shutdown says so: its capacity stops counting at once.
    agent.capacity = 0 if beat.get("stopping") else int(beat["capacity"])
    agent.running = running
    agent.last_seen_at = now
