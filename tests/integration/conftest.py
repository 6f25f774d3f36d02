"""Fixtures shared by the integration modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.runtime import Runtime
from tests.integration.helpers import make_workspace


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
