"""The metrics' pure parts: failure reasons, histogram buckets, the dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scheduler.metrics import BUCKETS, FAMILIES, Histogram, failure_reason

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "runq-dashboard.json"
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


@pytest.mark.parametrize(
    ("to_status", "reason", "label"),
    [
        ("failed", "plan failed", "terraform_error"),
        ("failed", "apply failed", "terraform_error"),
        ("failed", "plan failed (timeout)", "timed_out"),
        ("failed", "timed out", "timed_out"),
        ("failed", "executor lost: last heard from at never (None)", "executor_lost"),
        ("failed", "worker shut down during the plan (terraform interrupted)", "worker_shutdown"),
        ("failed", "hand-off failed", "handoff_failed"),
        ("failed", "plan failed: the executor sent no saved plan", "saved_plan"),
        ("failed", "plan failed: saved plan too large", "saved_plan"),
        ("cancelled", "cancelled; executor lost: ...", "cancelled"),
        ("cancelled", "force-cancelled; the executor did not answer", "cancelled"),
        ("discarded", "discard", "discarded"),
        ("discarded", "not confirmed within 60s (RUNQ_CONFIRM_TIMEOUT)", "unconfirmed"),
        ("failed", None, "other"),
    ],
)
def test_failure_reasons(to_status: str, reason: str | None, label: str) -> None:
    assert failure_reason(to_status, reason) == label


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram()
    for v in (0.001, 0.3, 7200.0, -1.0):
        h.observe(v)
    buckets = h.buckets()
    assert [b for b, _ in buckets] == [*(str(float(b)) for b in BUCKETS), "+Inf"]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == 4
    assert dict(buckets)["0.01"] == 2  # 0.001 and the clamped -1
    assert dict(buckets)["0.5"] == 3
    assert h.total == pytest.approx(7200.301)


def exported() -> set[str]:
    return {name + suffix for name, kind in FAMILIES.items() for suffix in SUFFIXES[kind]}


def test_dashboard_is_a_grafana_model_over_the_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    names: set[str] = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            found = set(re.findall(r"\brunq_[a-z_]+", target["expr"]))
            assert found, target["expr"]
            assert found <= exported(), (panel["title"], found - exported())
            names |= found
    # A panel for every family.
    assert {n for n in FAMILIES if any(m.startswith(n) for m in names)} == set(FAMILIES)
