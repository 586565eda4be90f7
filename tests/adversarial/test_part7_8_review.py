"""Adversarial review of parts 7 and 8 where they meet: dependencies with retries, time
limits, pauses and edits; fetched jobs beside local ones; worktree recycling; bad input.

Real repositories, the real `git tq` and daemon, real processes and signals.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import git, open_gate, show, submit, tq, tq_json, wait_state, wait_until

pytestmark = pytest.mark.usefixtures("autostart")

# Attempt N exits with the N-th code given (the last one for later attempts).
ATTEMPTS = """\
import os, sys
n = int(os.environ["TQ_ATTEMPT"])
open(os.environ["OUT"], "a").write(f"{n}\\n")
codes = sys.argv[1].split(",")
sys.exit(int(codes[min(n, len(codes)) - 1]))
"""

# Waits for its gate file, then exits with the code written in it.
GATE = """\
import os, sys, time
gate = sys.argv[1]
open(gate + ".started", "a").write(os.environ["TQ_ATTEMPT"] + "\\n")
while not os.path.exists(gate):
    time.sleep(0.02)
sys.exit(int(open(gate).read() or 0))
"""


def tqhome() -> Path:
    return Path(os.environ["TQ_HOME"])


def daemon_pid() -> int:
    return int(json.loads((tqhome() / "daemon.json").read_text())["pid"])


def events(repo: Path, job_id: int) -> list[str]:
    return [e["event"] for e in show(repo, job_id)["lifecycle"]]


def ls_rows(repo: Path, *args: str) -> dict[str, dict[str, Any]]:
    """`ls --json` rows by job name (`7`, `alice@gpu1:7`)."""
    data = tq_json(repo, "ls", *args)
    assert isinstance(data, list)
    return {j["name"]: j for j in data}


# --- dependencies meet retries and time limits --------------------------------------------


def test_a_dependent_keeps_waiting_through_its_dependencys_retries(repo: Path,
                                                                   tmp_path: Path) -> None:
    (repo / "attempts.py").write_text(ATTEMPTS)
    out = tmp_path / "attempts"
    env = {"OUT": str(out)}
    tq(repo, "pause")
    a = submit(repo, "--cpu", "--retry", "2", "python", "attempts.py", "3,3,0", env=env)
    b = submit(repo, "--cpu", "--after", str(a), "touch", str(tmp_path / "b-ran"))
    tq(repo, "resume")
    assert wait_state(repo, b, "done", timeout=40)["exit_code"] == 0
    assert out.read_text().split() == ["1", "2", "3"]
    assert events(repo, b) == ["submitted", "started", "finished"]


def test_a_dependent_is_cancelled_only_when_the_retries_run_out(repo: Path,
                                                                tmp_path: Path) -> None:
    (repo / "attempts.py").write_text(ATTEMPTS)
    out = tmp_path / "attempts"
    tq(repo, "pause")  # b is submitted before a can fail
    a = submit(repo, "--cpu", "--retry", "2", "python", "attempts.py", "4",
               env={"OUT": str(out)})
    b = submit(repo, "--cpu", "--after", str(a), "touch", str(tmp_path / "b-ran"))
    tq(repo, "resume")
    wait_state(repo, b, "cancelled", timeout=40)
    assert show(repo, a)["state"] == "failed"
    assert out.read_text().split() == ["1", "2", "3"]
    assert show(repo, b)["detail"] == f"dependency {a} failed"
    assert events(repo, b) == ["submitted", "cancelled"]


def test_a_job_after_a_timed_out_one_is_cancelled_and_after_any_runs(repo: Path,
                                                                     tmp_path: Path) -> None:
    git(repo, "config", "tq.cpuSlots", "4")
    a = submit(repo, "--cpu", "--time", "1s", "-g", "1", "sleep", "100")
    b = submit(repo, "--cpu", "--after", str(a), "touch", str(tmp_path / "b-ran"))
    c = submit(repo, "--cpu", "--after-any", str(a), "touch", str(tmp_path / "c-ran"))
    wait_state(repo, b, "cancelled", timeout=30)
    assert show(repo, a)["state"] == "failed"
    assert show(repo, b)["detail"] == f"dependency {a} failed"
    wait_state(repo, c, "done", timeout=30)
    assert not (tmp_path / "b-ran").exists()


def test_kill_9_during_a_retry_runs_no_attempt_twice(repo: Path, tmp_path: Path) -> None:
    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    a = submit(repo, "--cpu", "--retry", "1", "python", "gate.py", str(gate))
    b = submit(repo, "--cpu", "--after", str(a), "touch", str(tmp_path / "b-ran"))
    started = Path(str(gate) + ".started")
    wait_until(started.exists)
    os.kill(daemon_pid(), signal.SIGKILL)
    open_gate(gate, "5")
    tq(repo, "start")
    wait_until(lambda: started.read_text().split() == ["1", "2"], timeout=30)
    wait_state(repo, b, "cancelled", timeout=30)
    assert started.read_text().split() == ["1", "2"]
    assert [e for e in events(repo, a)].count("retry") == 1


# --- pause, edit, dependencies -----------------------------------------------------------


def test_edit_of_dependencies_while_paused_then_resume(repo: Path, tmp_path: Path) -> None:
    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    a = submit(repo, "--cpu", "python", "gate.py", str(gate))
    wait_until(Path(str(gate) + ".started").exists)
    tq(repo, "pause")
    b = submit(repo, "--cpu", "touch", str(tmp_path / "b-ran"))
    c = submit(repo, "--cpu", "--after", str(b), "touch", str(tmp_path / "c-ran"))
    tq(repo, "edit", str(b), "--after", str(a))
    d = submit(repo, "--cpu", "--after", str(c), "true")
    # d after c after b: b after d would close a cycle
    p = tq(repo, "edit", str(b), "--after", f"{a},{d}", check=False)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    rows = ls_rows(repo)
    assert rows[str(b)]["reason"] == f"waiting for {a}"
    assert rows[str(c)]["reason"] == f"waiting for {b}"
    tq(repo, "resume")
    open_gate(gate, "0")
    wait_state(repo, d, "done", timeout=30)
    assert (tmp_path / "b-ran").exists() and (tmp_path / "c-ran").exists()


# --- fetched jobs beside ours --------------------------------------------------------------


class Machine:
    """One clone with its own tq home and origin (as in tests/test_sharing.py)."""

    def __init__(self, path: Path, home: Path, origin: str) -> None:
        self.path = path
        self.env = {"TQ_HOME": str(home)}
        git(path, "config", "tq.origin", origin)
        git(path, "config", "tq.gpus", "0,1")

    def tq(self, *args: str, check: bool = True) -> Any:
        return tq(self.path, *args, check=check, env=self.env)

    def json(self, *args: str) -> Any:
        return json.loads(self.tq(*args, "--json").stdout)

    def submit(self, *args: str) -> int:
        return int(self.tq("run", "-q", *args).stdout)

    def wait(self, job_id: int, state: str) -> None:
        wait_until(lambda: self.json("show", str(job_id))["state"] == state, timeout=30)


@pytest.fixture
def lab(make_repo: Any, tmp_path: Path) -> Any:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    a_path = make_repo("alice")
    git(a_path, "remote", "add", "origin", str(remote))
    git(a_path, "push", "-q", "origin", "main")
    b_path = tmp_path / "bob"
    git(tmp_path, "clone", "-q", str(remote), str(b_path))
    alice = Machine(a_path, tmp_path / "tqhome", "alice@gpu1")
    bob = Machine(b_path, tmp_path / "tqhome-bob", "bob@gpu2")
    yield alice, bob
    bob.tq("stop", check=False)


def test_fetched_jobs_are_never_held_by_our_pause_and_origin_lists_them(lab: Any,
                                                                        tmp_path: Path) -> None:
    alice, bob = lab
    gate = tmp_path / "gate"
    first = alice.submit("--cpu", "sh", "-c", f"while ! test -e {gate}; do sleep 0.05; done")
    after = alice.submit("--cpu", "--after", str(first), "true")
    alice.wait(first, "running")
    alice.tq("push")
    bob.tq("fetch")
    bob.tq("pause")
    name = f"alice@gpu1:{after}"
    # our pause holds our queue, never alice's (bob's ls must not say it does)
    assert "paused" not in bob.tq("ls", "-s", "pending").stdout.split(name)[1].split("\n")[0]
    # --origin of another machine lists its active jobs, as the man page says
    listed = bob.tq("ls", "--origin", "alice@gpu1").stdout
    assert f"alice@gpu1:{first}" in listed and name in listed
    assert [j["name"] for j in bob.json("ls", "--origin", "alice@gpu1")] == \
        [f"alice@gpu1:{first}", name]
    shown = bob.tq("show", name).stdout
    assert f"after {first}  (jobs of alice@gpu1)" in shown
    gate.write_text("")
    bob.tq("resume")


def test_rm_log_of_a_fetched_job_never_deletes_our_job_of_the_same_id(lab: Any) -> None:
    alice, bob = lab
    mine = bob.submit("--cpu", "echo", "bob's precious log")
    theirs = alice.submit("--cpu", "echo", "alice's")
    assert mine == theirs
    bob.wait(mine, "done")
    alice.wait(theirs, "done")
    alice.tq("push")
    bob.tq("fetch")
    log = Path(bob.json("show", str(mine))["log"])
    assert log.exists()
    p = bob.tq("rm", "--log", "-y", f"alice@gpu1:{theirs}", check=False)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    assert "alice@gpu1" in p.stderr
    assert log.exists() and "precious" in log.read_text()
    assert "precious" in bob.tq("view", str(mine)).stdout


# --- worktree recycling ----------------------------------------------------------------------


MESSES = {
    # the job points its .git file at the user's repository (as `git worktree` repairs can)
    "gitfile": "echo gitdir: $MAIN_GIT > .git",
    # the job makes its worktree a repository of its own
    "gitdir": "rm .git && git init -q . && git add -A",
    "symlink": "rm README && ln -s /etc/hostname README && chmod +x train.py",
    "folder": "rm train.py && mkdir -p train.py/x && mkdir -p sub && echo s > sub/f",
}


@pytest.mark.parametrize("mess", sorted(MESSES))
def test_a_recycled_worktree_never_shows_a_jobs_leftovers_nor_touches_the_repository(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mess: str) -> None:
    from test_worktrees import queue_behind_a_blocker

    monkeypatch.setenv("MAIN_GIT", str(repo / ".git"))
    (repo / "staged.txt").write_text("staged by the user\n")
    git(repo, "add", "staged.txt")  # the user's index, staged while the jobs run
    head = git(repo, "symbolic-ref", "HEAD")
    marks, messy, last = queue_behind_a_blocker(repo, tmp_path, MESSES[mess])
    for job_id in range(messy + 1, last + 1):
        wait_state(repo, job_id, "done")
    assert git(repo, "symbolic-ref", "HEAD") == head  # the user's branch is still checked out
    assert "staged.txt" in git(repo, "diff", "--cached", "--name-only")
    for n in range(3):
        assert (marks / f"content{n}").read_text() == f"version {n}\nprint('v1')\n"
        listing = set((marks / f"listing{n}").read_text().split())
        assert listing == {".git", ".gitignore", "README", "train.py", "wait.py", "staged.txt",
                           *(f"added{i}.txt" for i in range(n + 1))}, n


# --- a dependency's record moved by someone else -------------------------------------------


def test_a_tampered_dependency_that_claims_done_never_starts_its_follower(
        repo: Path, tmp_path: Path) -> None:
    import time

    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    a = submit(repo, "--cpu", "python", "gate.py", str(gate))
    b = submit(repo, "--cpu", "--after", str(a), "touch", str(tmp_path / "b-ran"))
    wait_until(Path(str(gate) + ".started").exists)
    # A hand edit (or a careless fetch) writes "done" on top of a's record.
    tip = git(repo, "rev-parse", f"refs/tq/jobs/{a}").strip()
    fields = [line for line in git(repo, "cat-file", "commit", tip).splitlines()
              if line.startswith("Tq-") and not line.startswith(("Tq-Event", "Tq-State"))]
    message = "\n".join([f"tq job {a} finished", "", "Tq-Event: finished", "Tq-State: done",
                         *fields, "Tq-Ended-At: 2026-12-03T00:00:00+00:00",
                         "Tq-Exit-Code: 0"]) + "\n"
    forged = git(repo, "commit-tree", "-p", tip, "-m", message, f"{tip}^{{tree}}").strip()
    git(repo, "update-ref", f"refs/tq/jobs/{a}", forged, tip)
    assert show(repo, a)["state"] == "done"
    assert ls_rows(repo)[str(b)]["reason"] == f"waiting for {a}"
    log = tqhome() / "daemon.log"
    wait_until(lambda: f"job {a}'s record was moved by someone else" in log.read_text(),
               timeout=15)
    open_gate(gate, "0")  # its real end, which can no longer be recorded
    time.sleep(4)  # more than the daemon's 3-second rescan: b had every chance to start
    assert show(repo, b)["state"] == "pending"
    assert not (tmp_path / "b-ran").exists()
    assert ls_rows(repo)[str(b)]["reason"] == f"waiting for {a}"
