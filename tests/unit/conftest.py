"""Fixtures of the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A clean RUNQ_* environment, in an empty working directory."""
    for key in list(os.environ):
        if key.startswith("RUNQ_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    yield monkeypatch
