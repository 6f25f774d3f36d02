"""A small fault run in ``make test``: one fault of each kind into ~100 tasks.

The same harness, injector and checker as ``make faults``, scaled down to
finish in under two minutes here: 3 workers and beat, 8 workspaces, 100
tasks over 45 seconds, short pauses. ``FAULTS_SEED`` picks another schedule
(the default is fixed, so a failure here replays).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.injector import Kind
from tests.faults.run import Config, report, run

pytestmark = [
    pytest.mark.faults,
    pytest.mark.scenario,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.terraform,
]


@pytest.mark.timeout(300)
def test_small_fault_run_keeps_every_invariant(tmp_path: Path) -> None:
    config = Config(
        seed=int(os.environ.get("FAULTS_SEED", "20261128")),
        tasks=100,
        workspaces=8,
        window=45.0,
        faults=len(Kind),
        bound=60.0,
        pause=(0.3, 1.5),
        out=tmp_path,
    )
    outcome = run(config)
    summary = outcome.summary(report(outcome))
    print(summary)
    listed = "\n".join(f"{v.invariant}: {v.detail}" for v in outcome.verdict.violations[:40])
    assert outcome.verdict.ok, f"{summary}\n{listed}"
    assert outcome.orphans == 0, summary
    assert {f.kind for f in outcome.faults if f.injected_at is not None} == set(Kind), summary
