"""A full disk at each write path, one at a time: the job refs (a ref update), the object
store (a record: commit-tree, the outputs, the log's blob), the logs, the run files (the
exit status) and the worktrees (a checkout). Each path is a folder on a tmpfs of its own,
filled while a job runs or waits, then freed: nothing is corrupted (git fsck, no lock or
temp file left, no half-made worktree), every error a command shows is one line, the
daemon logs each failure once, and the job is recorded whole (exit status, outputs,
metrics, log) once space returns. Root only (mount); skipped with the reason elsewhere."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import SmallDisk, git, open_gate, show, submit, tq, wait_state, wait_until

NO_SPACE_RUN = ("git tq: no space left on device while submitting the job: free some space "
                "and retry\n")
# The job: writes its metrics, prints, waits for its gate, then writes an output and fails.
JOB = ("echo '{{\"loss\": 0.5}}' > \"$TQ_METRICS\"; echo before; "
       "while [ ! -e {gate} ]; do sleep 0.02; done; echo after; echo result > out.txt; exit 3")


def daemon_log() -> str:
    path = Path(os.environ["TQ_HOME"]) / "daemon.log"
    return path.read_text() if path.exists() else ""


def run_file(job_id: int, suffix: str) -> Path | None:
    found = list((Path(os.environ["TQ_HOME"]) / "run").glob(f"*/{job_id}.{suffix}"))
    return found[0] if found else None


def assert_intact(repo: Path, stop: bool = True) -> None:
    """Nothing half-written: git fsck is clean, no lock or temporary file of git's or
    ours is left, every run file is whole JSON, and git knows of no worktree that is
    not there. The daemon is stopped first (`stop`): its background work (a spare
    checkout, a worktree removed) is not what is checked."""
    if stop:
        tq(repo, "stop")
    p = subprocess.run(["git", "fsck", "--no-dangling", "--no-progress"], cwd=repo,
                       capture_output=True, text=True)
    assert p.returncode == 0 and not p.stderr.strip(), (p.stdout, p.stderr)
    home = Path(os.environ["TQ_HOME"])
    ours = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}$")  # home.create_temp_beside
    # (git leaves a `tmp_obj_*` of an object it could not write: `git gc` prunes them)
    left = [p for p in (repo / ".git").rglob("*") if p.name.endswith(".lock")
            or p.name.startswith("tq-outputs-") or ours.match(p.name)]
    left += [p for p in home.rglob("*") if ours.match(p.name)]
    assert not left, left
    for path in (home / "run").glob("*/*.*"):
        if path.suffix in (".launch", ".ident", ".exit", ".stop", ".ended"):
            json.loads(path.read_text())
    assert git(repo, "worktree", "prune", "--dry-run", "--verbose") == ""


def make_repo(disk: SmallDisk) -> Path:
    repo = disk.path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "tq.cpuSlots", "2")  # a second job starts while the first runs
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    home = Path(os.environ["TQ_HOME"])
    home.mkdir(mode=0o700)
    return repo


# Where the disk is full, and what a submission meanwhile gets: refused in one line (the
# repository cannot take its record), or queued (the repository has room).
PATHS = {
    "ref": (lambda repo, home: repo / ".git" / "refs", "refused"),
    "record": (lambda repo, home: repo / ".git" / "objects", "refused"),
    "log": (lambda repo, home: repo / ".git" / "tq" / "logs", "queued"),
    "exit": (lambda repo, home: home / "run", "queued"),
}


@pytest.mark.usefixtures("autostart")
@pytest.mark.parametrize("where", sorted(PATHS))
def test_a_full_disk_at_each_write_path_loses_nothing(where: str, small_disk: SmallDisk,
                                                      monkeypatch: pytest.MonkeyPatch) \
        -> None:
    monkeypatch.setenv("TQ_RESCAN_SECONDS", "0.3")  # retried each cycle: sooner here
    repo = make_repo(small_disk)
    target, meanwhile = PATHS[where]
    full = small_disk.full_dir(target(repo, Path(os.environ["TQ_HOME"])))
    gate = small_disk.scratch / "gate"
    j = submit(repo, "--cpu", "sh", "-c", JOB.format(gate=gate))
    wait_until(lambda: run_file(j, "ident") is not None)
    full.fill()
    p = tq(repo, "run", "-q", "--cpu", "true", check=False)
    if meanwhile == "refused":
        assert (p.returncode, p.stderr) == (1, NO_SPACE_RUN), where
        second = None
    else:
        assert p.returncode == 0, p.stderr
        second = int(p.stdout)
    open_gate(gate, "")
    job_pid = json.loads(run_file(j, "ident").read_text())["job"][0]  # type: ignore[union-attr]
    wait_until(lambda: not os.path.exists(f"/proc/{job_pid}"))
    if where == "log":  # the log is what cannot grow: the ending is recorded as ever
        wait_state(repo, j, "failed")
    elif where == "ref":  # the daemon found it could not write the ending
        wait_until(lambda: f"job {j}: could not record finished" in daemon_log())
    else:  # the supervisor keeps the exit status (and its lock) until it lands
        wait_until(lambda: run_file(j, "ended") is not None or where == "exit")
    p = tq(repo, "ls", check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) <= 1, p.stderr
    if where != "log":  # (its record, read by git alone: quicker than `show`)
        assert "\nTq-State: running\n" in git(repo, "log", "-1", "--format=%B",
                                               f"refs/tq/jobs/{j}")
    full.free()
    data = wait_state(repo, j, "failed", timeout=30)
    assert (data["exit_code"], data["outcome"]) == (3, "exit 3")
    assert data["outputs"]["files"] == 1, data["outputs"]
    assert git(repo, "show", f"refs/tq/jobs/{j}:out.txt") == "result\n"
    assert data["metrics"] == {"loss": 0.5}
    Path(data["log"]).unlink()  # (gone from disk: `view` shows the copy kept in git)
    stored = tq(repo, "view", "--raw", str(j)).stdout
    assert "before" in stored
    if where != "log":  # (what a job prints while its log cannot grow is not kept)
        assert "after" in stored and "exited with code 3" in stored
    if second is not None:
        wait_state(repo, second, "done", timeout=30)
    else:
        assert submit(repo, "--cpu", "true") == j + 1  # no id or ref half-taken
    assert_intact(repo)
    text = daemon_log()
    assert "Traceback" not in text, text
    warned = re.findall(r"WARNING job (\d+): could not (.*?): no space left", text)
    assert len(warned) == len(set(warned)), text  # each failure once


@pytest.mark.usefixtures("autostart")
def test_a_worktree_with_no_room_leaves_its_job_pending(small_disk: SmallDisk,
                                                        monkeypatch: pytest.MonkeyPatch) \
        -> None:
    monkeypatch.setenv("TQ_RESCAN_SECONDS", "0.3")
    repo = make_repo(small_disk)
    home = Path(os.environ["TQ_HOME"])
    full = small_disk.full_dir(home / "worktrees")
    full.fill()
    j = submit(repo, "--cpu", "sh", "-c", "echo result > out.txt")
    reason = "no space left on device for its worktree"
    wait_until(lambda: reason in tq(repo, "ls").stdout)
    data = show(repo, j)
    assert (data["state"], data["attempt"]) == ("pending", 0)  # no attempt used
    told = json.loads(next((home / "run").glob("*/waiting.json")).read_text())
    assert told["jobs"][str(j)][1:] == ["space", reason]
    cycles = json.loads(tq(repo, "daemon", "status", "--json").stdout)["stats"]["cycles"]
    wait_until(lambda: json.loads(tq(repo, "daemon", "status", "--json").stdout)
               ["stats"]["cycles"] >= cycles + 3)
    assert not list((home / "worktrees").glob("*/*")), "a half-made worktree is left"
    assert_intact(repo, stop=False)
    assert f"/worktrees/{j}" not in git(repo, "worktree", "list")
    assert daemon_log().count(f"job {j}: could not start: no space left") == 1
    # The daemon killed in the window: the next one finds the job pending, as it was.
    os.kill(json.loads((home / "daemon.json").read_text())["pid"], signal.SIGKILL)
    tq(repo, "start")
    wait_until(lambda: daemon_log().count(f"job {j}: could not start: no space left") == 2)
    full.free()
    data = wait_state(repo, j, "done", timeout=30)
    assert (data["attempt"], data["outputs"]["files"]) == (1, 1)
    assert f"job {j}: start done, space is back" in daemon_log()
    assert_intact(repo)
