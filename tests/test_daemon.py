"""The daemon end to end: real repositories, real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import git, open_gate, show, submit, tq, tq_json, wait_state, wait_until

# Here `git tq run` starts the daemon, as it does for users.
pytestmark = pytest.mark.usefixtures("autostart")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def state(repo: Path, job_id: int) -> str:
    return str(show(repo, job_id)["state"])


def log_text(repo: Path, job_id: int) -> str:
    path = Path(show(repo, job_id)["log"])
    return path.read_text() if path.exists() else ""


def daemon_pid() -> int:
    info = json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())
    return int(info["pid"])


def write_script(repo: Path, name: str, body: str) -> None:
    (repo / name).write_text(body)


# A job that waits for a file (a release the test controls) and then exits with a code.
WAITER = """\
import os, sys, time
open(sys.argv[1] + ".started", "a").write(os.environ["TQ_ATTEMPT"] + "\\n")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
sys.exit(int(open(sys.argv[1]).read() or 0))
"""


def test_job_runs_the_code_as_submitted(repo: Path, tmp_path: Path) -> None:
    write_script(repo, "show.py", "import os\nprint('code v1', os.environ['TQ_JOB_ID'],"
                 " repr(os.environ['CUDA_VISIBLE_DEVICES']), os.environ['TQ_ATTEMPT'],"
                 " os.environ['TQ_RESUMED'], os.getcwd())\n")
    (repo / "sub").mkdir()
    release = tmp_path / "release"
    write_script(repo, "sub/wait.py", WAITER)
    first = submit(repo, "--gpu", "1", "python", "sub/wait.py", str(release))
    j = submit(repo, "-t", "v1", "python", "show.py")
    write_script(repo, "show.py", "print('code v2')\n")  # edited after submission
    data = wait_state(repo, j, "done")
    text = log_text(repo, j)
    assert "code v1 2 '0' 1 0" in text and "code v2" not in text
    assert "[git tq] job 2 [v1]" in text and "git tq checkout 2" in text
    assert f"snapshot  {data['snapshot']}" in text
    assert data["exit_code"] == 0 and data["attempt"] == 1 and data["gpus"] == [0]
    assert data["started_at"] and data["ended_at"]
    # the first job runs in its cwd inside its own worktree, on the GPU it asked for
    wait_until(lambda: Path(str(release) + ".started").exists())
    assert show(repo, first)["state"] == "running" and show(repo, first)["gpus"] == [1]
    open_gate(release, "3")
    failed = wait_state(repo, first, "failed")
    assert failed["exit_code"] == 3
    assert "exited with code 3" in log_text(repo, first)
    events = [e["event"] for e in failed["lifecycle"]]
    assert events == ["submitted", "started", "finished"]
    # finished jobs leave no worktree behind
    wait_until(lambda: not list((Path(os.environ["TQ_HOME"]) / "worktrees").glob("*/*")))


def test_cpu_jobs_get_no_gpu(repo: Path) -> None:
    j = submit(repo, "--cpu", "python", "-c",
               "import os; print('CVD=' + repr(os.environ['CUDA_VISIBLE_DEVICES']))")
    wait_state(repo, j, "done")
    assert "CVD=''" in log_text(repo, j)


def test_queue_order_and_gpu_exclusivity(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    write_script(repo, "wait.py", WAITER)
    gate = tmp_path / "gate"
    a = submit(repo, "python", "wait.py", str(gate))
    wait_state(repo, a, "running")
    low = submit(repo, "-p", "200", "python", "-c", "print('low')")
    high = submit(repo, "-p", "100", "python", "-c", "print('high')")  # same as running: waits
    assert state(repo, low) == "pending" and state(repo, high) == "pending"
    open_gate(gate, "0")
    wait_state(repo, low, "done")
    assert show(repo, high)["started_at"] <= show(repo, low)["started_at"]
    assert show(repo, a)["state"] == "done"


def test_preemption_checkpoint_and_resume(repo: Path) -> None:
    """The whole cycle with the shipped example: SIGTERM, checkpoint, urgent job, resume."""
    git(repo, "config", "tq.gpus", "0")
    train = str(EXAMPLES / "train.py")
    victim = submit(repo, "-p", "50", "-g", "30", "python", train, "--steps", "60",
                    "--step-seconds", "0.05")
    wait_until(lambda: "starts at step 0" in log_text(repo, victim))
    urgent = submit(repo, "-p", "10", "python", "-c", "print('urgent work')")
    wait_until(lambda: "SIGTERM: checkpoint saved" in log_text(repo, victim))
    wait_state(repo, urgent, "done")
    done = wait_state(repo, victim, "done", timeout=30)
    text = log_text(repo, victim)
    assert "RESUMED: attempt 2" in text
    assert "attempt 2 (resumed=1) starts at step" in text
    resumed_at = int(text.split("attempt 2 (resumed=1) starts at step ")[1].split()[0])
    assert resumed_at > 0  # it found its checkpoint in the same worktree
    assert "finished 60 steps" in text
    events = [(e["event"], e["detail"]) for e in done["lifecycle"]]
    assert ("stopping", f"preempted by job {urgent}") in events
    assert ("preempted", f"preempted by job {urgent}") in events
    assert [e for e, _ in events] == ["submitted", "started", "stopping", "preempted",
                                      "resumed", "finished"]
    assert done["attempt"] == 2


def test_grace_expires_then_sigkill_whole_tree(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    pids = tmp_path / "pids"
    write_script(repo, "stubborn.py", f"""\
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda *a: open({str(pids)!r} + ".term", "a").write("x"))
child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                         start_new_session=True)  # escapes the process group
open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
while True:
    time.sleep(0.05)
""")
    victim = submit(repo, "-p", "50", "-g", "1", "python", "stubborn.py")
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    job_pid, escaped = map(int, pids.read_text().split())
    urgent = submit(repo, "-p", "1", "python", "-c", "print('now')")
    wait_until(lambda: Path(str(pids) + ".term").exists())
    wait_state(repo, urgent, "done", timeout=20)
    assert not psutil.pid_exists(job_pid) or \
        psutil.Process(job_pid).status() == psutil.STATUS_ZOMBIE
    wait_until(lambda: not psutil.pid_exists(escaped) or
               psutil.Process(escaped).status() == psutil.STATUS_ZOMBIE)
    assert show(repo, victim)["state"] in ("pending", "running")  # back in the queue


def test_kill_cancels_running_and_pending(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    write_script(repo, "wait.py", WAITER)
    a = submit(repo, "-g", "60", "python", "wait.py", str(tmp_path / "never"))
    wait_until(lambda: Path(str(tmp_path / "never") + ".started").exists())
    b = submit(repo, "python", "-c", "print(1)")
    assert "stopping" in tq(repo, "kill", f"{a},{b}").stdout
    data = wait_state(repo, a, "cancelled")
    assert data["signal"] == signal.SIGTERM and data["detail"] == "killed by the user"
    assert state(repo, b) == "cancelled"
    p = tq(repo, "kill", str(a), check=False)
    assert p.returncode == 1 and "nothing to kill" in p.stderr


def test_kill_now_skips_the_grace(repo: Path) -> None:
    write_script(repo, "deaf.py", "import signal, time\nsignal.signal(signal.SIGTERM, "
                 "signal.SIG_IGN)\nprint('up', flush=True)\nwhile True: time.sleep(0.05)\n")
    a = submit(repo, "-g", "600", "python", "deaf.py")
    wait_until(lambda: "up" in log_text(repo, a))
    tq(repo, "kill", "--now", str(a))
    assert wait_state(repo, a, "cancelled")["signal"] == signal.SIGKILL


def test_daemon_killed_with_sigkill_loses_nothing(repo: Path, tmp_path: Path) -> None:
    write_script(repo, "wait.py", WAITER + "")
    git(repo, "config", "tq.gpus", "0,1")
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    ids = [submit(repo, "--gpu", "0", "python", "wait.py", str(gates[0])),
           submit(repo, "--gpu", "1", "python", "wait.py", str(gates[1])),
           submit(repo, "--cpu", "python", "wait.py", str(gates[2]))]
    for g in gates:
        wait_until(lambda g=g: Path(str(g) + ".started").exists())
    os.kill(daemon_pid(), signal.SIGKILL)
    open_gate(gates[0], "7")  # ends while no daemon runs
    wait_until(lambda: not any("wait.py" in " ".join(p.info["cmdline"] or []) and
                               str(gates[0]) in " ".join(p.info["cmdline"] or [])
                               for p in psutil.process_iter(["cmdline"])))
    assert state(repo, ids[0]) == "running"  # nobody recorded it yet
    tq(repo, "start")
    assert wait_state(repo, ids[0], "failed")["exit_code"] == 7  # the real exit code
    assert state(repo, ids[1]) == "running" and state(repo, ids[2]) == "running"
    open_gate(gates[1], "0")
    open_gate(gates[2], "0")
    wait_state(repo, ids[1], "done")
    wait_state(repo, ids[2], "done")
    for g in gates:  # every job ran exactly once
        assert Path(str(g) + ".started").read_text() == "1\n"


def test_daemon_killed_during_a_preemption(repo: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    write_script(repo, "slowstop.py", """\
import os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print('up', os.environ['TQ_ATTEMPT'], flush=True)
while not stop:
    time.sleep(0.02)
print('got SIGTERM', flush=True)
while not os.path.exists('release'):
    time.sleep(0.02)
print('saved', flush=True)
""")
    victim = submit(repo, "-p", "50", "-g", "60", "python", "slowstop.py")
    wait_until(lambda: "up 1" in log_text(repo, victim))
    urgent = submit(repo, "-p", "1", "python", "-c", "print('urgent')")
    wait_until(lambda: "got SIGTERM" in log_text(repo, victim))
    os.kill(daemon_pid(), signal.SIGKILL)  # in the middle of the grace period
    worktree = next((Path(os.environ["TQ_HOME"]) / "worktrees").glob(f"*/{victim}"))
    (worktree / "release").write_text("")
    wait_until(lambda: "saved" in log_text(repo, victim))
    tq(repo, "start")
    wait_state(repo, urgent, "done")
    data = wait_state(repo, victim, "running")
    assert data["attempt"] == 2
    assert [e["event"] for e in data["lifecycle"]][-2:] == ["preempted", "resumed"]


def test_fetched_job_refs_never_run(repo: Path, make_repo: Any, tmp_path: Path) -> None:
    other = make_repo("other")
    git(other, "config", "tq.autostart", "false")  # its owner's daemon is not running now
    marker = tmp_path / "foreign-ran"
    submit(other, "--cpu", "--", "sh", "-c", f"touch {marker}")
    # a second tq home owns `other`'s local records; ours never saw them
    (Path(os.environ["TQ_HOME"])).rename(tmp_path / "other-home")
    git(repo, "fetch", "-q", str(other), "refs/tq/jobs/*:refs/tq/jobs/*")
    mine = submit(repo, "--cpu", "true")  # registers the repository with our daemon
    assert mine == 2
    wait_state(repo, mine, "done")
    assert state(repo, 1) == "pending" and not marker.exists()
    log = (Path(os.environ["TQ_HOME"]) / "daemon.log").read_text()
    assert "job 1" in log and "not submitted here by this user" in log


def test_a_job_that_cannot_start_fails_with_a_reason(repo: Path) -> None:
    bad = submit(repo, "--cpu", "no-such-command-xyz", "arg")
    good = submit(repo, "--cpu", "true")
    data = wait_state(repo, bad, "failed")
    assert "could not start" in (data["detail"] or "")
    assert "could not start" in log_text(repo, bad)
    wait_state(repo, good, "done")
    env_bad = submit(repo, "--cpu", "-e", "no_such_conda_env", "true")
    assert "conda environment" in (wait_state(repo, env_bad, "failed")["detail"] or "")


def test_yield_to_a_foreign_gpu_process(repo: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.json"
    probe.write_text("{}")
    env = {"TQ_GPU_PROBE_FILE": str(probe)}
    git(repo, "config", "tq.gpus", "0")
    train = str(EXAMPLES / "train.py")
    j = submit(repo, "python", train, "--steps", "40", "--step-seconds", "0.05", env=env)
    wait_until(lambda: "starts at step 0" in log_text(repo, j))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        probe.write_text(json.dumps({"0": [stranger.pid]}))
        wait_until(lambda: "SIGTERM: checkpoint saved" in log_text(repo, j))
        data = wait_state(repo, j, "pending")
        assert "foreign process" in data["detail"]
        other = submit(repo, "--gpu", "0", "true", env=env)
        assert state(repo, other) == "pending"  # nothing of ours starts there meanwhile
        status = tq(repo, "daemon", "status").stdout
        assert "GPU 0: held by a foreign process" in status
    finally:
        stranger.kill()
        stranger.wait()
    probe.write_text(json.dumps({"0": []}))
    wait_state(repo, j, "done", timeout=30)
    assert "RESUMED: attempt 2" in log_text(repo, j)


def test_hooks_run_on_events(repo: Path, tmp_path: Path) -> None:
    csv = tmp_path / "events.csv"
    hooks = repo / ".git" / "hooks"
    for event in ("submit", "start", "finish"):
        hook = hooks / f"tq-{event}"
        hook.write_text(f"#!/bin/sh\necho \"$TQ_EVENT,$TQ_JOB_ID,$TQ_STATE,$TQ_EXIT_CODE\" "
                        f">> {csv}\n")
        hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    j = submit(repo, "--cpu", "python", "-c", "raise SystemExit(4)")
    wait_state(repo, j, "failed")
    wait_until(lambda: csv.exists() and len(csv.read_text().splitlines()) == 3)
    assert sorted(csv.read_text().splitlines()) == ["finish,1,failed,4", "start,1,running,",
                                                    "submit,1,pending,"]


def test_core_hooks_path_is_honoured(repo: Path, tmp_path: Path) -> None:
    hooks = tmp_path / "myhooks"
    hooks.mkdir()
    git(repo, "config", "core.hooksPath", str(hooks))
    hook = hooks / "tq-finish"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path / 'fired'}\n")
    hook.chmod(0o755)
    wait_state(repo, submit(repo, "--cpu", "true"), "done")
    wait_until(lambda: (tmp_path / "fired").exists())


def test_daemon_lifecycle_commands(repo: Path) -> None:
    p = tq(repo, "daemon", "status", check=False)
    assert p.returncode == 1 and "not running" in p.stdout
    assert "daemon started" in tq(repo, "start").stdout
    assert "already running" in tq(repo, "start").stdout
    home = Path(os.environ["TQ_HOME"])
    sock = Path(json.loads((home / "daemon.json").read_text())["socket"])
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    # a second daemon on the same home refuses
    second = subprocess.run([sys.executable, "-m", "git_tq.daemon", str(home)],
                            capture_output=True, text=True, timeout=30)
    assert "already runs" in second.stderr
    assert "running, pid" in tq(repo, "daemon", "status").stdout
    assert "daemon stopped" in tq(repo, "stop").stdout
    assert "not running" in tq(repo, "stop").stdout


def test_autostart_can_be_turned_off(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    p = tq(repo, "run", "--cpu", "true")
    assert "git tq start" in p.stderr
    assert state(repo, 1) == "pending"
    tq(repo, "start")
    wait_state(repo, 1, "done")


def test_ignored_paths_are_linked_and_env_is_applied(repo: Path, tmp_path: Path) -> None:
    (repo / ".gitignore").write_text("data/\n.env\n")
    (repo / "data").mkdir()
    (repo / "data" / "train.csv").write_text("1,2,3\n")
    (repo / ".env").write_text("SECRET=1\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "hello-tool").write_text("#!/bin/sh\necho from-the-venv\n")
    (venv / "bin" / "hello-tool").chmod(0o755)
    j = submit(repo, "--cpu", "-e", str(venv), "sh", "-c",
               "cat data/train.csv; test -f .env && echo env-linked; hello-tool; "
               "echo VENV=$VIRTUAL_ENV SRC=$TQ_SOURCE_DIR MINE=$MY_SETTING",
               env={"MY_SETTING": "from-the-shell"})
    wait_state(repo, j, "done")
    text = log_text(repo, j)
    assert "1,2,3" in text and "env-linked" in text and "from-the-venv" in text
    assert f"VENV={venv} SRC={repo} MINE=from-the-shell" in text


def test_requeue_and_gc(repo: Path) -> None:
    git(repo, "config", "tq.keepWorktrees", "true")
    write_script(repo, "count.py", "print('counting')\nraise SystemExit(1)\n")
    first = submit(repo, "--cpu", "python", "count.py")
    wait_state(repo, first, "failed")
    write_script(repo, "count.py", "print('changed')\n")
    second = int(tq(repo, "requeue", "-q", str(first)).stdout.strip())
    wait_state(repo, second, "failed")
    assert "counting" in log_text(repo, second)  # the first job's code, not today's
    assert show(repo, second)["snapshot"] != show(repo, first)["snapshot"]
    assert "removed 2 worktrees" in tq(repo, "gc").stdout
    p = tq(repo, "requeue", "99", check=False)
    assert p.returncode == 1


@pytest.mark.parametrize("n", [6])
def test_many_short_jobs_all_run_once(repo: Path, tmp_path: Path, n: int) -> None:
    out = tmp_path / "ran"
    git(repo, "config", "tq.cpuSlots", "3")
    ids = [submit(repo, "--cpu", "sh", "-c", f"echo {i} >> {out}") for i in range(n)]
    for i in ids:
        wait_state(repo, i, "done")
    assert sorted(out.read_text().split()) == sorted(str(i) for i in range(n))


def test_sample_csv_hook(repo: Path) -> None:
    sample = Path(__file__).resolve().parent.parent / "hooks" / "tq-finish.csv"
    hook = repo / ".git" / "hooks" / "tq-finish"
    hook.write_bytes(sample.read_bytes())
    hook.chmod(0o755)
    j = submit(repo, "--cpu", "-t", "csv", "echo", 'say "hi"')
    wait_state(repo, j, "done")
    out = repo / ".git" / "tq-results.csv"
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) == 2)
    header, line = out.read_text().splitlines()
    assert header.startswith("job,state,exit_code")
    assert line.startswith("1,done,0,,1,csv,") and line.endswith('"echo \'say ""hi""\'"')


def test_a_deleted_repository_is_dropped(repo: Path, make_repo: Any) -> None:
    import shutil

    gone = make_repo("gone")
    git(gone, "config", "tq.autostart", "false")
    submit(gone, "--cpu", "true")
    shutil.rmtree(gone)
    j = submit(repo, "--cpu", "true")
    wait_state(repo, j, "done")
    home = Path(os.environ["TQ_HOME"])
    wait_until(lambda: "is gone; dropped" in (home / "daemon.log").read_text())
    assert len(list((home / "repos").iterdir())) == 1


def run_files(job_id: int, suffix: str) -> list[Path]:
    return list(Path(os.environ["TQ_HOME"]).glob(f"run/*/{job_id}.{suffix}"))


def test_ls_and_show_give_a_running_jobs_pid(repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    j = submit(repo, "--cpu", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    wait_until(lambda: show(repo, j)["pid"] is not None)
    pid = show(repo, j)["pid"]
    assert psutil.Process(pid).cmdline()[:2] == ["sh", "-c"]  # the job itself
    assert [v["pid"] for v in tq_json(repo, "ls")] == [pid]  # type: ignore[union-attr]
    assert tq(repo, "ls").stdout.splitlines()[1].split()[:3] == [str(j), "running", str(pid)]
    assert f"pid {pid}" in tq(repo, "show", str(j)).stdout
    gate.touch()
    assert wait_state(repo, j, "done")["pid"] is None
    assert "pid " not in tq(repo, "show", str(j)).stdout


def test_a_failure_says_why_without_a_made_up_exit_code(repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    git(repo, "config", "tq.cpuSlots", "3")  # all three at once
    lost = submit(repo, "--cpu", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    no_env = submit(repo, "--cpu", "-e", "no-such-conda-env", "true")  # the daemon refuses
    no_cmd = submit(repo, "--cpu", "no-such-command-xyz")  # the supervisor cannot exec it
    wait_until(lambda: bool(run_files(lost, "ident")))
    ident = json.loads(run_files(lost, "ident")[0].read_text())
    os.kill(ident["supervisor"][0], signal.SIGKILL)  # the job's supervisor dies,
    for j in (no_env, no_cmd):
        wait_state(repo, j, "failed")
    tq(repo, "stop")  # and the daemon it came to as child subreaper is restarted:
    gate.touch()  # then the job ends: nobody saw how
    tq(repo, "start")
    for j in (no_env, no_cmd):
        data = wait_state(repo, j, "failed")
        assert (data["exit_code"], data["outcome"], data["event"]) == \
            (None, "not started", "start-failed")
    data = wait_state(repo, lost, "failed")
    assert (data["exit_code"], data["signal"], data["outcome"]) == (None, None, "lost")
    assert "supervisor died" in data["detail"]
    rows = {ln.split()[0]: ln for ln in tq(repo, "ls", "--all").stdout.splitlines()[1:]}
    assert "failed (lost)" in rows[str(lost)]
    assert "failed (not started)" in rows[str(no_env)] and "None" not in rows[str(no_env)]
    assert "failed (not started)" in rows[str(no_cmd)] and "127" not in rows[str(no_cmd)]
    assert tq(repo, "show", str(lost)).stdout.splitlines()[0].endswith("failed  (lost)")
    assert "failed  (not started)" in tq(repo, "show", str(no_cmd)).stdout
    assert "failed (lost)" in tq(repo, "log").stdout
    assert git(repo, "log", "-1", "--format=%s", f"refs/tq/jobs/{lost}").startswith(
        f"tq job {lost} failed (lost):")
    assert "Tq-Exit-Code" not in git(repo, "log", "-1", "--format=%B", f"refs/tq/jobs/{no_cmd}")
