"""`runq timeline`: the picture drawn from the event table says what happened."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scheduler import dispatcher, tasks, timeline_picture
from scheduler.browser import find_chromium
from scheduler.errors import InvalidInput
from scheduler.runtime import Runtime
from scheduler.states import TaskType
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_NO_CHANGES,
    PLAN_WITH_CHANGES,
    make_workspace,
    run_phase,
)
from tests.integration.test_cli import Cli, cli  # noqa: F401 - the cli fixture

SVG = "{http://www.w3.org/2000/svg}"
PA = TaskType.PLAN_AND_APPLY


def bars(path: Path) -> dict[str, str]:
    """Each bar's hover title -> its fill."""
    root = ET.parse(path).getroot()
    found = {}
    for rect in root.iter(f"{SVG}rect"):
        title = rect.find(f"{SVG}title")
        if title is not None and title.text:
            found[title.text] = rect.attrib["fill"]
    return found


def history(rt: Runtime, src: Path) -> tuple[int, int, int]:
    """A plan+apply confirmed and applied, a plan beside it, a cancelled one."""
    make_workspace(rt, "net", src)
    pa = tasks.submit(rt, "net", PA)
    plan = tasks.submit(rt, "net", TaskType.PLAN)
    dropped = tasks.submit(rt, "net", PA)
    dispatcher.dispatch(rt, "net")
    run_phase(rt, pa.id, PLAN_WITH_CHANGES)
    dispatcher.claim_plan(rt, plan.id)
    run_phase(rt, plan.id, PLAN_NO_CHANGES)
    tasks.confirm(rt, pa.id)
    dispatcher.dispatch(rt, "net")
    run_phase(rt, pa.id, APPLY_OK)
    tasks.cancel(rt, dropped.id)
    return pa.id, plan.id, dropped.id


def test_every_phase_and_wait_is_a_bar(rt: Runtime, src: Path, tmp_path: Path) -> None:
    pa, plan, dropped = history(rt, src)
    path, count = timeline_picture.draw(rt, tmp_path / "t.svg", workspace="net")
    assert (path, count) == (tmp_path / "t.svg", 3)
    got = bars(path)
    colours = timeline_picture.COLOURS
    by_task = {
        title.split(":")[0]: fill for title, fill in got.items() if title.startswith("task ")
    }
    assert by_task[f"task {pa} queued"] == colours[(timeline_picture.Segment.QUEUED, None)]
    assert by_task[f"task {pa} plan"] == colours[(timeline_picture.Segment.PLAN, PA)]
    assert by_task[f"task {pa} confirm"] == colours[(timeline_picture.Segment.CONFIRM, None)]
    assert by_task[f"task {pa} apply"] == colours[(timeline_picture.Segment.APPLY, PA)]
    assert by_task[f"task {plan} plan"] == colours[(timeline_picture.Segment.PLAN, TaskType.PLAN)]
    assert by_task[f"task {dropped} cancelled"] == timeline_picture.BAD_END
    assert f"task {dropped} plan" not in by_task, "a task cancelled in the queue never planned"


def test_html_png_and_bad_input(rt: Runtime, src: Path, tmp_path: Path) -> None:
    history(rt, src)
    page, _ = timeline_picture.draw(rt, tmp_path / "t.html")
    text = page.read_text()
    assert "<svg" in text and "waiting for confirmation" in text
    with pytest.raises(InvalidInput, match=r"\.svg, \.html or \.png"):
        timeline_picture.draw(rt, tmp_path / "t.jpg")
    if find_chromium() is None:
        with pytest.raises(InvalidInput, match="chromium"):
            timeline_picture.draw(rt, tmp_path / "t.png")
        pytest.skip("Debian's chromium is not installed: the PNG is not drawn here")
    png, _ = timeline_picture.draw(rt, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_since_takes_a_duration_or_a_time() -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert timeline_picture.parse_since("15m", now) == now - timedelta(minutes=15)
    assert timeline_picture.parse_since("2h", now) == now - timedelta(hours=2)
    assert timeline_picture.parse_since("2026-11-28T11:00:00", now) == now - timedelta(hours=1)
    assert timeline_picture.parse_since(None, now) is None
    with pytest.raises(InvalidInput, match="duration"):
        timeline_picture.parse_since("yesterday", now)


def test_the_cli_writes_the_picture(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    assert cli.ok("db", "upgrade")
    cli.ok("workspace", "create", "net", "--dir", str(cli.source))
    cli.ok("submit", "net", "--type", "plan")
    out = tmp_path / "t.svg"
    got = cli.ok("timeline", "--workspace", "net", "--since", "1h", "--out", str(out))
    assert got == {"path": str(out), "tasks": 1}
    assert [t for t in bars(out) if " queued: " in t], "the pending plan shows as queued"
    missing = cli("timeline", "--workspace", "nope", "--out", str(out))
    assert missing.code != 0 and "nope" in missing.error
