"""Fixtures shared by the integration modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.messages import RecordingPublisher
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import DispatchMode
from tests.integration.helpers import make_workspace, tuned


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """An (empty) Terraform source directory for local workspaces."""
    path = tmp_path / "src"
    path.mkdir()
    return path


@pytest.fixture
def ws(rt: Runtime, src: Path) -> str:
    """A local workspace named ``net``."""
    make_workspace(rt, "net", src)
    return "net"


@pytest.fixture
def legacy_rt(settings: Settings) -> Iterator[Runtime]:
    """A runtime in RUNQ_DISPATCH_MODE=legacy, with its own recording publisher."""
    runtime = Runtime(
        settings=settings.model_copy(update={"dispatch_mode": DispatchMode.LEGACY}),
        publisher=RecordingPublisher(),
        actor="legacy",
    )
    yield runtime
    runtime.close()


@pytest.fixture
def tune(rt: Runtime) -> Iterator[Callable[..., Runtime]]:
    """``tune(lease_ttl=2, ...)``: runtimes on ``rt``'s database and publisher
    with other settings, closed after the test."""
    made: list[Runtime] = []

    def make(**changes: Any) -> Runtime:
        made.append(tuned(rt, **changes))
        return made[-1]

    yield make
    for r in made:
        r.close()
