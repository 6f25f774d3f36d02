"""Handoff and Bundle: their JSON forms, and what the local launcher puts on
the broker.

Since issue 5 the broker carries only (task id, fence); the worker rebuilds
the hand-off from the database (:func:`scheduler.leases.load_handoff`), and
since issue 6 the whole bundle (:func:`scheduler.bundles.build`). Agents and
Kubernetes Jobs get the bundle as JSON, its bytes in base64.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from executors.base import Bundle, Handoff
from executors.local import LocalLauncher
from scheduler.messages import QUEUE_RUNS, TASK_EXECUTE, RecordingPublisher
from scheduler.states import ExecutionMode, Phase

handoffs = st.builds(
    Handoff,
    task_id=st.integers(min_value=1, max_value=2**62),
    workspace=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", fullmatch=True),
    phase=st.sampled_from(Phase),
    fence=st.integers(min_value=0, max_value=2**62),
    speculative=st.booleans(),
    mode=st.sampled_from(ExecutionMode),
    source_dir=st.none() | st.text(max_size=40),
    agent_pool=st.none() | st.text(max_size=20),
    timeout=st.none() | st.floats(min_value=0.001, max_value=7 * 24 * 3600.0),
    config_sha256=st.none() | st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
)
bundles = st.builds(
    Bundle,
    handoff=handoffs,
    config=st.binary(max_size=200),
    state=st.none() | st.binary(max_size=200),
    plan=st.none() | st.binary(max_size=200),
)


@given(handoffs)
def test_json_round_trip(h: Handoff) -> None:
    wire = json.dumps(h.to_json())  # JSON text only
    back = Handoff.from_json(json.loads(wire))
    assert back == h
    assert isinstance(back.phase, Phase) and isinstance(back.mode, ExecutionMode)


def test_json_shape() -> None:
    h = Handoff(7, "net", Phase.APPLY, 3, False, ExecutionMode.LOCAL, "/src", None, 600.0)
    assert json.loads(json.dumps(h.to_json())) == {
        "task_id": 7,
        "workspace": "net",
        "phase": "apply",
        "fence": 3,
        "speculative": False,
        "mode": "local",
        "source_dir": "/src",
        "agent_pool": None,
        "timeout": 600.0,
        "config_sha256": None,
    }


@given(bundles)
def test_bundle_json_round_trip(b: Bundle) -> None:
    wire = json.dumps(b.to_json())  # JSON text only: bytes travel as base64
    assert Bundle.from_json(json.loads(wire)) == b


def test_bundle_json_shape_and_refusals() -> None:
    h = Handoff(7, "net", Phase.PLAN, 3, False, ExecutionMode.LOCAL)
    doc = Bundle(h, config=b"\x1f\x8b config", state=None, plan=None).to_json()
    assert doc == {"handoff": h.to_json(), "config": "H4sgY29uZmln", "state": None, "plan": None}
    with pytest.raises(ValueError, match="no configuration"):
        Bundle.from_json({**doc, "config": None})
    with pytest.raises(ValueError):
        Bundle.from_json({**doc, "state": "not base64!"})
    with pytest.raises(TypeError, match="base64 text"):
        Bundle.from_json({**doc, "plan": 12})


def test_from_json_refuses_unknown_values() -> None:
    good = Handoff(1, "w", Phase.PLAN, 1, True, ExecutionMode.LOCAL).to_json()
    with pytest.raises(ValueError, match="destroy"):
        Handoff.from_json({**good, "phase": "destroy"})
    with pytest.raises(ValueError, match="ssh"):
        Handoff.from_json({**good, "mode": "ssh"})
    with pytest.raises(TypeError):
        Handoff.from_json({**good, "surprise": 1})


def test_local_launcher_publishes_only_task_id_and_fence_to_the_runs_queue() -> None:
    pub = RecordingPublisher()
    h = Handoff(9, "net", Phase.PLAN, 2, True, ExecutionMode.LOCAL, "/src", timeout=60.0)
    handle = LocalLauncher(pub).launch(h)
    assert handle == "celery:recorded-1"
    [msg] = pub.sent
    assert (msg.task, msg.queue) == (TASK_EXECUTE, QUEUE_RUNS)
    # What to run (workspace, phase, source dir) is read from the database by
    # the worker, so a forged message cannot choose it: only the id and the
    # fence travel, as JSON.
    assert msg.args == (9, 2)
    assert json.loads(json.dumps(msg.args)) == [9, 2]
