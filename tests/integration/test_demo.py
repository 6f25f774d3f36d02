"""`runq demo` end to end: private Redis, real workers, real terraform.

The demo's JSON carries every task's segments (seconds from the first
submit); the overlaps are recomputed here from those, not taken from the
demo's own verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

RUNQ_VARS = (
    "RUNQ_REDIS_URL",
    "RUNQ_BROKER_URL",
    "RUNQ_DATABASE_URL",
    "RUNQ_DATA_DIR",
    "RUNQ_DISPATCH_MODE",
    "RUNQ_TERRAFORM_BIN",
)


def _env(path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RUNQ_VARS}
    env["PATH"] = path
    return env


def _demo(tmp_path: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "demo", "--json", "--data-dir", str(tmp_path)],
        env=_env(path),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


@pytest.mark.scenario
def test_demo_plans_overlap_applies_and_applies_never_overlap(tmp_path: Path) -> None:
    venv_bin = str(Path(sys.executable).parent)
    proc = _demo(tmp_path, f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is JSON and nothing else

    assert report["ok"] is True, report["problems"]
    assert report["redis"].startswith("private redis-server")
    assert Path(report["demo_dir"]).parent == tmp_path.resolve()
    assert (Path(report["demo_dir"]) / "report.json").is_file()
    # It ends with a timeline picture of what it ran: every task has a lane.
    picture = Path(report["timeline"])
    assert picture.name == "timeline.html" and picture.with_suffix(".svg").is_file()
    assert all(f"#{t['id']} " in picture.read_text() for t in report["tasks"])
    assert set(report["workspaces"]) == {"networking", "app", "sandbox"}

    tasks = report["tasks"]
    assert len(tasks) >= 8
    for t in tasks:
        want = "applied" if t["type"] == "plan_and_apply" else "success"
        assert t["status"] == want, t
        assert all(s["end"] is not None for s in t["segments"]), t

    plans_beside_applies = 0
    for ws in report["workspaces"]:
        mine = [t for t in tasks if t["workspace"] == ws]
        applies = [
            s
            for t in mine
            if t["type"] == "plan_and_apply"
            for s in t["segments"]
            if s["kind"] == "apply"
        ]
        plans = [
            s for t in mine if t["type"] == "plan" for s in t["segments"] if s["kind"] == "plan"
        ]
        assert len(applies) == sum(t["type"] == "plan_and_apply" for t in mine)
        assert not [(a, b) for a, b in combinations(applies, 2) if _overlap(a, b)], ws
        plans_beside_applies += sum(any(_overlap(p, a) for a in applies) for p in plans)
        assert report["workspaces"][ws]["applies_overlapping_each_other"] == 0

    assert plans_beside_applies > 0
    assert report["totals"]["plans_overlapping_an_apply"] == plans_beside_applies


def test_demo_names_what_to_install_without_redis_server(tmp_path: Path) -> None:
    # No redis-server on PATH (terraform is still found beside the interpreter).
    proc = _demo(tmp_path, str(tmp_path / "empty-bin"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    error = json.loads(proc.stderr)
    assert "redis-server not found on PATH" in error["error"]
    assert "apt-get install redis-server" in error["error"]
    assert "RUNQ_REDIS_URL" in error["error"]
