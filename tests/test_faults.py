"""Faults and hostile input, end to end: a full disk, a supervisor killed, a corrupt job
ref. Real repositories, the real `git-tq`, the real daemon, real signals and a real
small filesystem (tmpfs, mounted as root; skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import SmallDisk, git, open_gate, show, submit, tq, wait_state, wait_until


def run_files(job_id: int, suffix: str) -> list[Path]:
    return list((Path(os.environ["TQ_HOME"]) / "run").glob(f"*/{job_id}.{suffix}"))


# ------------------------------------------------------------ a supervisor killed


@pytest.mark.usefixtures("autostart")
def test_a_job_whose_supervisor_was_killed_keeps_its_exit_status(repo: Path,
                                                                  tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    j = submit(repo, "--cpu", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; "
               "echo bye; echo result > out.txt; echo '{\"loss\": 2}' > \"$TQ_METRICS\"; "
               "exit 5")
    wait_until(lambda: bool(run_files(j, "ident")))
    ident = json.loads(run_files(j, "ident")[0].read_text())
    os.kill(ident["supervisor"][0], signal.SIGKILL)  # the OOM killer, a careless kill -9
    wait_until(lambda: "follows the job" in daemon_log())
    assert show(repo, j)["state"] == "running"
    open_gate(gate, "")
    data = wait_state(repo, j, "failed")
    assert (data["exit_code"], data["signal"], data["outcome"]) == (5, None, "exit 5")
    assert "the daemon reaped the job" in data["detail"]
    # Recorded like any ending: its outputs, metrics and log too.
    assert data["outputs"]["files"] == 1 and data["metrics"] == {"loss": 2}
    assert git(repo, "show", f"refs/tq/jobs/{j}:out.txt") == "result\n"
    Path(data["log"]).unlink()  # the copy kept in git
    log = tq(repo, "view", "--raw", str(j)).stdout
    assert "bye" in log and "exited with code 5" in log


@pytest.mark.usefixtures("autostart")
def test_what_a_hook_leaves_running_is_reaped(repo: Path, tmp_path: Path) -> None:
    """The daemon is a child subreaper: a hook's background process becomes its child
    when the hook exits, and must not stay a zombie once it ends."""
    import psutil

    started = tmp_path / "started"
    hook = repo / ".git" / "hooks" / "tq-start"
    hook.write_text(f"#!/bin/sh\nsleep 0.2 &\necho $! > {started}.part; "
                    f"mv {started}.part {started}\n")
    hook.chmod(0o755)
    submit(repo, "--cpu", "true")
    wait_until(started.exists)
    left = int(started.read_text())
    daemon = psutil.Process(json.loads(
        (Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())["pid"])

    def zombies() -> list[int]:
        return [c.pid for c in daemon.children() if c.status() == psutil.STATUS_ZOMBIE]

    wait_until(lambda: not psutil.pid_exists(left) and not zombies())


@pytest.mark.usefixtures("autostart")
def test_an_orphaned_job_can_still_be_killed(repo: Path) -> None:
    j = submit(repo, "--cpu", "-g", "1", "sleep", "600")
    wait_until(lambda: bool(run_files(j, "ident")))
    ident = json.loads(run_files(j, "ident")[0].read_text())
    os.kill(ident["supervisor"][0], signal.SIGKILL)
    wait_until(lambda: "follows the job" in daemon_log())
    tq(repo, "kill", str(j))
    try:
        data = wait_state(repo, j, "cancelled")
    except AssertionError:
        print(daemon_log(), {k: v for k, v in show(repo, j).items() if k != "lifecycle"})
        raise
    assert data["signal"] == signal.SIGTERM and data["stop"] == "clean"


def daemon_log() -> str:
    path = Path(os.environ["TQ_HOME"]) / "daemon.log"
    return path.read_text() if path.exists() else ""


# ------------------------------------------------------------ a corrupt job ref


def test_a_job_ref_at_a_missing_object_is_named_and_can_be_forgotten(repo: Path) -> None:
    first = submit(repo, "--cpu", "true")
    second = submit(repo, "--cpu", "echo", "two")
    bad = "1234567890" * 4
    (repo / ".git" / "refs" / "tq" / "jobs" / str(first)).write_text(bad + "\n")
    warning = (f"git tq: warning: job {first} is broken: refs/tq/jobs/{first} points at "
               f"{bad[:12]}, an object missing from the repository (`git tq rm --forget "
               f"{first}` removes the ref")
    for args in (["ls"], ["ls", "--all"], ["ls", "--json"], ["log"], ["top", "--once"]):
        p = tq(repo, *args)
        assert p.stderr.startswith(warning), (args, p.stderr)
        assert len(p.stderr.splitlines()) == 1, (args, p.stderr)
        assert "two" in p.stdout, args  # the other jobs are listed as ever
    for args in (["show", str(first)], ["rm", str(first)]):
        p = tq(repo, *args, check=False)
        assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, (args, p.stderr)
        assert p.stderr.startswith(f"git tq: job {first} is broken: refs/tq/jobs/{first} "
                                   f"points at {bad[:12]}"), p.stderr
    assert f"job {first} is broken" in tq(repo, "gc").stdout
    assert show(repo, second)["state"] == "pending"
    # All or nothing: job 2 cannot be forgotten (pending), so the broken job 1 stays too.
    p = tq(repo, "rm", "--forget", f"{first},{second}", check=False)
    assert (p.returncode, len(p.stderr.splitlines())) == (1, 1), p.stderr
    assert "only finished jobs can be forgotten" in p.stderr
    assert (repo / ".git" / "refs" / "tq" / "jobs" / str(first)).exists()
    tq(repo, "rm", str(second))  # cancelled: now it can go
    out = tq(repo, "rm", "--forget", f"{first},{second}").stdout
    assert out.count("forgotten") == 2, out
    assert git(repo, "for-each-ref", "refs/tq/jobs/") == ""
    assert submit(repo, "--cpu", "true") == second + 1  # no id given twice
    p = tq(repo, "ls", "--all")
    assert p.stderr == "" and "true" in p.stdout and "two" not in p.stdout


# ------------------------------------------------------------ a full disk


@pytest.mark.usefixtures("autostart")
def test_a_full_disk_loses_no_exit_status(small_disk: SmallDisk) -> None:
    repo = small_disk.path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    big = small_disk.path / "big"
    go = small_disk.scratch / "go"  # off the small disk
    # It fills the disk only once its start is on record (`.ident`): a disk full before
    # then holds the supervisor's write of it until space returns, which is not this test.
    j = submit(repo, "--cpu", "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done; "
               f"echo filling; dd if=/dev/zero of={big} bs=64k 2>/dev/null; echo full; exit 3")
    wait_until(lambda: bool(run_files(j, "ident")))
    open_gate(go, "")
    job_pid = json.loads(run_files(j, "ident")[0].read_text())["job"][0]
    wait_until(lambda: not os.path.exists(f"/proc/{job_pid}"), timeout=20)
    # The job ended on a full disk: its supervisor keeps the status and its lock.
    p = tq(repo, "run", "-q", "--cpu", "true", check=False)
    assert (p.returncode, p.stderr) == (1, "git tq: no space left on device while "
                                           "submitting the job: free some space and retry\n")
    assert show(repo, j)["state"] == "running"
    p = tq(repo, "note", str(j), "a note", check=False)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr
    assert len(p.stderr.splitlines()) <= 1
    big.unlink()  # space is back
    data = wait_state(repo, j, "failed", timeout=30)
    assert (data["exit_code"], data["outcome"]) == (3, "exit 3")
    log = Path(data["log"]).read_text()
    assert "filling" in log and "exited with code 3" in log
    text = daemon_log()
    assert "Traceback" not in text, text
    assert text.count("no space left on device") <= 2, text
    assert submit(repo, "--cpu", "true") == j + 1  # nothing half-written stands in the way
