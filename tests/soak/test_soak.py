"""Part 10's soak, at full counts (`pytest -m slow`; several minutes on 2 cores): the
daemon SIGKILLed 100 times at random moments, a supervisor 30 times, 800 concurrent
`git tq run`. The work and the counting are bench/faults.py's, which prints the same
figures (BENCHMARKS.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from soak import faults

pytestmark = pytest.mark.slow


def test_daemon_killed_100_times_loses_nothing(tmp_path: Path) -> None:
    figures = faults.daemon_rounds(tmp_path, 100, env=os.environ)
    print(figures.summary())
    assert figures.kills == 100 and figures.preemptions > 0
    assert figures.zero(), (figures.summary(), figures.problems[:20])


def test_supervisor_killed_30_times_every_job_ends(tmp_path: Path) -> None:
    """Each killed supervisor's job is recorded as ended, with its true exit status: the
    daemon, the job's subreaper, reaps it."""
    figures = faults.supervisor_rounds(tmp_path, 30, env=os.environ)
    print(figures.summary())
    assert figures.killed + figures.too_late == 30
    assert figures.not_ended == 0 and figures.wrong == 0, figures.problems
    assert figures.lost == 0, figures.problems


def test_800_concurrent_runs_give_800_distinct_jobs(tmp_path: Path) -> None:
    figures = faults.concurrent_runs(tmp_path, 800, 16, env=os.environ)
    print(figures.summary())
    assert figures.ok(), (figures.summary(), figures.problems[:10])
