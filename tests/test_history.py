"""Part 6: what a job costs must not grow with the history (ids, scans, packing)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import git, show, submit, tq, tq_json, wait_state, wait_until


def _ledger_folder(repo: Path) -> Path:
    folders = list((Path(os.environ["TQ_HOME"]) / "jobs").iterdir())
    assert len(folders) == 1
    return folders[0]


def test_next_id_comes_from_a_counter_checked_by_the_ref_creation(repo: Path) -> None:
    assert [submit(repo, "--", "true") for _ in range(2)] == [1, 2]
    counter = _ledger_folder(repo) / "last-id"
    assert counter.read_text().strip() == "2"
    assert oct(counter.stat().st_mode & 0o777) == "0o600"
    counter.unlink()  # lost: the refs are listed once instead
    assert submit(repo, "--", "true") == 3
    counter.write_text("garbage\n")
    assert submit(repo, "--", "true") == 4
    counter.write_text("1\n")  # behind (a restored backup): the creation's check skips on
    assert submit(repo, "--", "true") == 5
    assert counter.read_text().strip() == "5"
    # A ref someone else made at the next id is never overwritten.
    tip = git(repo, "rev-parse", "refs/tq/jobs/5").strip()
    git(repo, "update-ref", "refs/tq/jobs/6", tip)
    assert submit(repo, "--", "true") == 7
    assert git(repo, "rev-parse", "refs/tq/jobs/6").strip() == tip


def test_forgotten_ids_are_not_given_again(repo: Path) -> None:
    for _ in range(3):
        submit(repo, "--", "true")
    tq(repo, "rm", "3")
    tq(repo, "rm", "--forget", "3")
    assert submit(repo, "--", "true") == 4


def test_a_sweep_moves_the_counter(repo: Path) -> None:
    submit(repo, "--", "true")
    tq(repo, "run", "-q", "--cpu", "--sweep", "i=1,2,3", "--", "echo", "{i}")
    assert (_ledger_folder(repo) / "last-id").read_text().strip() == "4"
    assert submit(repo, "--", "true") == 5


def _stats(repo: Path) -> dict[str, int]:
    status = tq_json(repo, "daemon", "status", "--json")
    assert isinstance(status, dict)
    stats: dict[str, int] = status["stats"]
    return stats


def test_an_idle_daemon_reads_no_refs_until_one_changes(repo: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQ_RESCAN_SECONDS", "0.5")  # the safety rescans come 6x as often
    tq(repo, "start")
    marker = tmp_path / "ran"
    job = submit(repo, "--cpu", "--", "touch", str(marker))
    wait_state(repo, job, "done")
    # Let the writes of that job settle into one last read of the refs...
    before = _stats(repo)
    wait_until(lambda: _stats(repo)["cycles"] >= before["cycles"] + 2, timeout=15)
    settled = _stats(repo)
    # ...then safety rescans with nothing changed read nothing at all.
    wait_until(lambda: _stats(repo)["cycles"] >= settled["cycles"] + 2, timeout=15)
    idle = _stats(repo)
    assert idle["ref_reads"] == settled["ref_reads"]
    assert idle["records_read"] == settled["records_read"]
    # A ref that changes without a nudge (a fetch, a hand edit) is seen by the next rescan.
    waiting = git(repo, "rev-list", "-1", "--grep=^Tq-State: pending", f"refs/tq/jobs/{job}")
    git(repo, "update-ref", "refs/tq/jobs/77", waiting.strip())  # a record of a waiting job
    wait_until(lambda: _stats(repo)["ref_reads"] > idle["ref_reads"], timeout=15)
    log = Path(os.environ["TQ_HOME"]) / "daemon.log"
    warning = f"refs/tq/jobs/77 is unreadable (the record says it is job {job})"
    wait_until(lambda: warning in log.read_text(), timeout=15)


def test_a_submission_is_read_by_name(repo: Path, tmp_path: Path) -> None:
    tq(repo, "start")
    first = submit(repo, "--cpu", "--", "true")
    wait_state(repo, first, "done")
    before = _stats(repo)
    marker = tmp_path / "ran"
    job = submit(repo, "--cpu", "--", "touch", str(marker))
    wait_until(marker.exists)
    wait_state(repo, job, "done")
    after = _stats(repo)
    assert after["named_reads"] > before["named_reads"]


def test_the_daemon_packs_loose_job_refs(repo: Path) -> None:
    git(repo, "config", "tq.packRefsAfter", "5")
    tq(repo, "run", "-q", "--cpu", "--sweep", "i=1,2,3,4,5,6", "--", "true")
    jobs_dir = Path(git(repo, "rev-parse", "--git-common-dir").strip())
    if not jobs_dir.is_absolute():
        jobs_dir = repo / jobs_dir
    assert len(list((jobs_dir / "refs" / "tq" / "jobs").iterdir())) == 6
    tq(repo, "start")
    wait_until(lambda: all(show(repo, i)["state"] == "done" for i in range(1, 7)), timeout=30)
    loose = jobs_dir / "refs" / "tq" / "jobs"
    wait_until(lambda: not loose.is_dir() or not any(loose.iterdir()), timeout=15)
    assert "refs/tq/jobs/6" in (jobs_dir / "packed-refs").read_text()
    assert [j["id"] for j in tq_json(repo, "ls", "--all", "--json")] == list(range(1, 7))
    # Jobs go on after packing: records are written over packed refs as over loose ones.
    job = submit(repo, "--cpu", "--", "true")
    wait_state(repo, job, "done")


@pytest.mark.slow  # 5 kills (~10 s); test_faults_quick has 3, tests/soak 100: pytest -m slow
def test_daemon_killed_again_and_again_loses_no_job_and_runs_none_twice(
        repo: Path, tmp_path: Path) -> None:
    """SIGKILL the daemon while short jobs start, end and are recorded (the next job
    starts before the last one's ending is written): every job runs once, and every
    exit status and log is recorded."""
    ran = tmp_path / "ran"
    git(repo, "config", "tq.cpuSlots", "2")
    script = f'echo "$TQ_JOB_ID $TQ_ATTEMPT" >> {ran}; echo out-$TQ_JOB_ID; exit $((TQ_JOB_ID % 3))'
    values = ",".join(str(i) for i in range(24))
    tq(repo, "run", "-q", "--cpu", "--sweep", f"i={values}", "--", "sh", "-c", script)
    tq(repo, "start")
    for threshold in (3, 7, 11, 15, 19):
        wait_until(lambda t=threshold: ran.exists() and len(ran.read_text().split("\n")) > t,
                   timeout=30)
        os.kill(_daemon_pid(), signal.SIGKILL)
        tq(repo, "start")
    wait_until(lambda: all(j["state"] in ("done", "failed")
                           for j in tq_json(repo, "ls", "--all", "--json")), timeout=60)
    lines = ran.read_text().split()
    ids = [int(x) for x in lines[0::2]]
    assert sorted(ids) == list(range(1, 25))  # each job ran, and once
    for job in tq_json(repo, "ls", "--all", "--json"):
        assert job["exit_code"] == job["id"] % 3, job
        assert f"out-{job['id']}" in tq(repo, "view", "--raw", str(job["id"])).stdout


def _daemon_pid() -> int:
    info = json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())
    pid: int = info["pid"]
    return pid


def test_a_free_slot_start_from_the_spare_worktree_runs_exactly_the_new_code(
        repo: Path, tmp_path: Path) -> None:
    (repo / "keep.txt").write_text("same\n")
    (repo / "gone.txt").write_text("deleted before the second job\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "old.txt").write_text("old\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    tq(repo, "start")
    listing = "find . -path ./.git -prune -o -type f -print | sort; cat keep.txt"
    first = submit(repo, "--cpu", "--", "sh", "-c", listing)
    wait_state(repo, first, "done")
    wait_until(lambda: _stats(repo)["cycles"] > 0 and
               (Path(os.environ["TQ_HOME"]) / "spare").is_dir(), timeout=15)
    (repo / "gone.txt").unlink()
    (repo / "sub" / "old.txt").unlink()
    (repo / "new.txt").write_text("untracked, on disk\n")
    (repo / "keep.txt").write_text("edited\n")
    before = _stats(repo)["spare_worktrees_used"]
    second = submit(repo, "--cpu", "--", "sh", "-c", listing)
    wait_state(repo, second, "done")
    assert _stats(repo)["spare_worktrees_used"] == before + 1
    out = tq(repo, "view", "--raw", str(second)).stdout
    files = [line for line in out.splitlines() if line.startswith("./")]
    on_disk = sorted(f"./{p.relative_to(repo)}" for p in repo.rglob("*")
                     if p.is_file() and ".git" not in p.relative_to(repo).parts)
    assert files == on_disk and "./new.txt" in files and "./gone.txt" not in files, out
    assert "edited" in out and "same" not in out
