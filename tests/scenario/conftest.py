"""Scenario tests: real celery workers. A failing test shows their logs."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.scenario.cluster import Cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if isinstance(cluster, Cluster):
        for name, text in cluster.pool.logs().items():
            report.sections.append((f"celery worker {name} log (last lines)", text))
