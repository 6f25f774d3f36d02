"""Fixtures of the state-machine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.db import make_engine, upgrade


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file each example copies (migrating is slow)."""
    path = tmp_path_factory.mktemp("template") / "runq.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path
