"""`git tq pause` / `resume`: holding the queue, end to end with the real daemon."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import git, show, submit, tq, tq_json, wait_state, wait_until

# Here `git tq run` starts the daemon, as it does for users.
pytestmark = pytest.mark.usefixtures("autostart")

# A job that says it started (its attempt), then waits for a gate file and exits 0.
GATED = """\
import os, sys, time
open(sys.argv[1] + ".started", "a").write(os.environ["TQ_ATTEMPT"] + "\\n")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
"""

# Saves for as long as the test wants on SIGTERM (a release file in its worktree).
SLOW_STOP = """\
import os, signal, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print('up', os.environ['TQ_ATTEMPT'], flush=True)
while not stop:
    time.sleep(0.02)
print('got SIGTERM', flush=True)
while not os.path.exists('release'):
    time.sleep(0.02)
"""


def status() -> dict[str, Any]:
    data = tq_json(os.environ["HOME"], "daemon", "status")
    assert isinstance(data, dict)
    return data


def held() -> int:
    """How many waiting jobs the daemon's last cycle held back for a pause."""
    return int(status().get("counts", {}).get("held", 0))


def daemon_pid() -> int:
    return int(json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())["pid"])


def log_text(repo: Path, job_id: int) -> str:
    path = Path(show(repo, job_id)["log"])
    return path.read_text() if path.exists() else ""


def test_pause_holds_new_starts_while_running_jobs_go_on(repo: Path, tmp_path: Path) -> None:
    (repo / "gated.py").write_text(GATED)
    gate = tmp_path / "gate"
    running = submit(repo, "--cpu", "python", "gated.py", str(gate))
    wait_until(lambda: Path(f"{gate}.started").exists())
    assert tq(repo, "pause").stdout.startswith("queue paused since ")
    waiting = submit(repo, "--cpu", "python", "-c", "print('ran')")
    wait_until(lambda: held() == 1)
    listing = tq(repo, "ls").stdout.splitlines()
    assert listing[0].startswith("queue paused since ") and "git tq resume" in listing[0]
    assert any(f"{waiting}" in line and "pending (queue paused)" in line for line in listing)
    text = tq(repo, "daemon", "status").stdout
    assert "pause:  queue paused since" in text
    assert status()["paused"]["everything"] is True
    gate.write_text("")  # the running job goes on to its end
    wait_state(repo, running, "done")
    wait_until(lambda: held() == 1)  # a cycle after the ending: still held
    assert show(repo, waiting)["state"] == "pending"
    assert "QUEUE PAUSED" in tq(repo, "top", "--once").stdout
    assert tq(repo, "resume").stdout.strip() == "queue resumed"
    wait_state(repo, waiting, "done")
    assert "paused" not in tq(repo, "ls").stdout
    assert status()["paused"] == {"paused": False, "everything": False, "gpus": [],
                                  "since": None, "error": None}


def test_a_pause_survives_kill_9_of_the_daemon(repo: Path, tmp_path: Path) -> None:
    tq(repo, "start")
    tq(repo, "pause")
    os.kill(daemon_pid(), signal.SIGKILL)
    job = submit(repo, "--cpu", "python", "-c", "print('ran')")  # starts a new daemon
    wait_until(lambda: held() == 1)
    assert show(repo, job)["state"] == "pending"
    assert status()["paused"]["everything"] is True
    tq(repo, "resume")
    wait_state(repo, job, "done")


def test_pause_of_a_gpu_holds_only_the_jobs_that_would_start_there(repo: Path,
                                                                    tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0,1")
    out = tq(repo, "pause", "--gpu", "0").stdout
    assert out.startswith("GPU 0 paused since ") and "git tq resume --gpu 0" in out
    (repo / "gated.py").write_text(GATED)
    gate = tmp_path / "gate"
    on_zero = submit(repo, "--gpu", "0", "python", "-c", "print('zero')")
    anywhere = submit(repo, "--gpus", "1", "python", "gated.py", str(gate))
    cpu = submit(repo, "--cpu", "python", "-c", "print('cpu')")
    assert wait_state(repo, anywhere, "running")["gpus"] == [1]  # never the paused GPU
    wait_state(repo, cpu, "done")
    wait_until(lambda: held() == 1)
    assert show(repo, on_zero)["state"] == "pending"
    assert f"{on_zero}   pending (GPU 0 paused)" in tq(repo, "ls").stdout
    assert "GPU 0 PAUSED" in tq(repo, "top", "--once").stdout
    # Already held GPUs and a whole-queue pause combine; single GPUs of a wholly paused
    # queue cannot be released.
    assert tq(repo, "pause", "--gpu", "1").stdout.startswith("GPU 0,1 paused")
    assert tq(repo, "resume", "--gpu", "1").stdout.startswith("GPU 0 paused")
    assert "was not paused" in tq(repo, "resume", "--gpu", "1").stdout
    assert tq(repo, "resume", "--gpu", "0").stdout.strip() == "queue resumed"
    wait_state(repo, on_zero, "done")
    gate.write_text("")
    wait_state(repo, anywhere, "done")


def test_an_urgent_job_waits_in_a_paused_queue_and_preempts_nobody(repo: Path,
                                                                   tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    (repo / "gated.py").write_text(GATED)
    gate = tmp_path / "gate"
    victim = submit(repo, "-p", "50", "python", "gated.py", str(gate))
    wait_until(lambda: Path(f"{gate}.started").exists())
    tq(repo, "pause")
    urgent = submit(repo, "-p", "1", "python", "-c", "print('urgent')")
    wait_until(lambda: held() == 1)
    assert show(repo, victim)["state"] == "running"  # not asked to stop
    tq(repo, "resume")
    wait_state(repo, urgent, "done")  # now it preempts the victim
    assert "preempted" in [e["event"] for e in show(repo, victim)["lifecycle"]]
    gate.write_text("")
    wait_state(repo, victim, "done")


def test_a_preemption_decided_before_the_pause_goes_on(repo: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    (repo / "slowstop.py").write_text(SLOW_STOP)
    victim = submit(repo, "-p", "50", "-g", "60", "python", "slowstop.py")
    wait_until(lambda: "up 1" in log_text(repo, victim))
    urgent = submit(repo, "-p", "1", "python", "-c", "print('urgent')")
    wait_until(lambda: "got SIGTERM" in log_text(repo, victim))
    tq(repo, "pause")
    worktree = next((Path(os.environ["TQ_HOME"]) / "worktrees").glob(f"*/{victim}"))
    (worktree / "release").write_text("")
    wait_state(repo, victim, "pending")  # the stop was carried through: preempted
    wait_until(lambda: held() == 2)  # and neither it nor the urgent job starts
    assert show(repo, urgent)["state"] == "pending"
    tq(repo, "resume")
    wait_state(repo, urgent, "done")
    assert wait_state(repo, victim, "running")["attempt"] == 2  # resumed after it
    tq(repo, "kill", "--now", str(victim))
    wait_state(repo, victim, "cancelled")


def test_bad_pause_requests_are_refused_in_one_line(repo: Path) -> None:
    git(repo, "config", "tq.gpus", "0,1")
    for args, message in ((["pause", "--gpu", "7"], "no GPU 7"),
                          (["pause", "--gpu", "x"], "GPU"),
                          (["resume", "--gpu", "-1"], "GPU")):
        p = tq(repo, *args, check=False)
        assert p.returncode != 0 and message in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    tq(repo, "pause")
    p = tq(repo, "resume", "--gpu", "0", check=False)
    assert p.returncode == 1 and "the whole queue is paused" in p.stderr
    assert "already" in tq(repo, "pause", "--gpu", "1").stdout
    assert tq(repo, "resume").stdout.strip() == "queue resumed"
    assert tq(repo, "resume").stdout.strip() == "the queue was not paused"
    # An unreadable pause file holds everything and says how to clear it.
    (Path(os.environ["TQ_HOME"]) / "paused").write_text("{not json")
    assert "unreadable" in tq(repo, "ls").stdout.splitlines()[0]
    tq(repo, "resume")
    assert not (Path(os.environ["TQ_HOME"]) / "paused").exists()


def test_the_console_prompt_says_paused(repo: Path, tmp_path: Path) -> None:
    import pexpect

    tq(repo, "start")
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn("git", ["tq"], cwd=str(repo), env=env, encoding="utf-8",
                          timeout=20, dimensions=(50, 160))
    try:
        child.expect(r"\(tq:any\|ON\) >")
        child.sendline("pause")
        child.expect(r"queue paused since [^\n]*\n[^\n]*\(tq:any\|PAUSED\) >")
        child.sendline("use 0")
        child.expect(r"\(tq:0\|PAUSED\) >")
        child.sendline("resume")  # the selected queue: not alone, the whole queue is held
        child.expect(r"the whole queue is paused[^\n]*\n[^\n]*\(tq:0\|PAUSED\) >")
        child.sendline("resume all")
        child.expect(r"queue resumed[^\n]*\n[^\n]*\(tq:0\|ON\) >")
        child.sendline("pause")  # the selected queue only
        child.expect(r"GPU 0 paused since [^\n]*\n[^\n]*\(tq:0\|PAUSED\) >")
        child.sendline("use any")
        child.expect(r"\(tq:any\|ON\) >")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
    assert tq_json(repo, "daemon", "status")["paused"]["gpus"] == [0]  # type: ignore[index]
