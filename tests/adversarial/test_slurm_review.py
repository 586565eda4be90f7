"""Adversarial review of the Slurm backend (part 9): a daemon killed mid-sbatch, a retried
job requeued by Slurm, sbatch options that take back what git tq sets.

The real git-tq, the real daemon and the real single-node cluster (tests/slurm_cluster.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import open_gate, show, submit, tq, wait_state, wait_until
from test_slurm import GATE, events

pytestmark = [pytest.mark.usefixtures("autostart", "slurm_cluster"), pytest.mark.slurm,
              pytest.mark.xdist_group("slurm")]


def daemon_pid() -> int:
    return int(json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())["pid"])


def test_a_daemon_killed_mid_sbatch_never_adopts_another_repositorys_job(
        make_repo: object, tmp_path: Path) -> None:
    """The daemon dies while sbatch is under way and sbatch never gets through. The next
    daemon looks for the job in Slurm by its name: job 1 of another repository (same
    user, same path prefix) must not be taken for it; it is submitted and runs."""
    assert callable(make_repo)
    other, mine = make_repo("other"), make_repo("mine")
    real = shutil.which("sbatch")
    assert real
    block = tmp_path / "block"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "sbatch"
    # An sbatch that, while `block` exists, says it was entered and hangs.
    wrapper.write_text(f"#!/bin/sh\nif [ -e {block} ]; then echo $$ > {block}.entered; "
                       f"while :; do sleep 0.05; done; fi\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    (other / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    theirs = submit(other, "--backend", "slurm", "--cpu", "python", "gate.py", str(gate),
                    env=env)
    wait_until(Path(str(gate) + ".started").exists, timeout=60)
    block.write_text("")
    marker = tmp_path / "ran"
    job = submit(mine, "--backend", "slurm", "--cpu", "touch", str(marker), env=env)
    assert job == theirs == 1
    entered = Path(str(block) + ".entered")
    wait_until(entered.exists, timeout=30)
    os.kill(daemon_pid(), signal.SIGKILL)
    os.kill(int(entered.read_text()), signal.SIGKILL)  # the sbatch died with it
    block.unlink()
    tq(mine, "start")
    try:
        wait_state(mine, job, "done", timeout=60)
        assert marker.exists()
        assert show(other, theirs)["state"] == "running"
    finally:
        open_gate(gate, "0")
    wait_state(other, theirs, "done", timeout=60)


# Attempt 1 fails; attempt 2 saves a checkpoint on its stop signal; attempt 3 finds it and
# waits for its gate.
RETRIED = """\
import os, signal, sys, time
marks, gate = sys.argv[1], sys.argv[2]
attempt = os.environ["TQ_ATTEMPT"]
with open(marks, "a") as fh:
    fh.write(f"up {attempt}\\n")
if attempt == "1":
    sys.exit(1)
if os.path.exists("ckpt"):
    while not os.path.exists(gate):
        time.sleep(0.05)
    sys.exit(0)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
while not stop:
    time.sleep(0.05)
open("ckpt", "w").write("saved")
"""


@pytest.mark.slow  # a requeue and Slurm's cred_expire: ~20 s (pytest -m slow)
def test_a_retried_slurm_job_requeued_while_no_daemon_watched_is_recorded_resumed(
        repo: Path, tmp_path: Path) -> None:
    """Attempt 1 fails; its retry (a new batch job) is requeued by Slurm (a failed node)
    and runs again while the daemon is down. The next daemon records the preemption and
    the resumed attempt at once, not only when the job has ended."""
    (repo / "job.py").write_text(RETRIED)
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    job = submit(repo, "--backend", "slurm", "--cpu", "--retry", "1", "python", "job.py",
                 str(marks), str(gate))
    wait_until(lambda: marks.exists() and "up 2" in marks.read_text(), timeout=60)
    wait_until(lambda: show(repo, job)["attempt"] == 2 and show(repo, job)["state"] ==
               "running", timeout=30)
    os.kill(daemon_pid(), signal.SIGKILL)
    down = ["scontrol", "update", "nodename=localhost", "state=down", "reason=tq-review"]
    subprocess.run(down, check=True, capture_output=True)
    try:
        wait_until(lambda: list(tmp_path.glob("tqhome/run/*/1.exit.2")), timeout=30)
    finally:
        subprocess.run(["scontrol", "update", "nodename=localhost", "state=resume"],
                       capture_output=True)
    wait_until(lambda: "up 3" in marks.read_text(), timeout=60)
    tq(repo, "start")
    try:
        wait_until(lambda: [e for e, _ in events(repo, job)][-2:] == ["preempted", "resumed"],
                   timeout=20)
    finally:
        open_gate(gate, "0")
    record = wait_state(repo, job, "done", timeout=60)
    assert record["attempt"] == 3
    assert [e for e, _ in events(repo, job)] == [
        "submitted", "started", "retry", "started", "preempted", "resumed", "finished"]


@pytest.mark.parametrize("option", ["--open=truncate", "--out=/dev/null", "--job=x",
                                    "--no-req", "--sig=B:USR2@5", "--pars"])
def test_abbreviations_of_the_sbatch_options_git_tq_sets_are_refused(
        repo: Path, option: str) -> None:
    """sbatch takes any unambiguous prefix of a long option: `--open=truncate` would wipe
    the log at each requeue, `--job=x` hide the job from the daemon that looks for it."""
    p = tq(repo, "run", "--backend", "slurm", "--cpu", f"--slurm-arg={option}", "true",
           check=False)
    assert p.returncode != 0 and "sets" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_ls_json_names_the_backend_of_an_active_slurm_job(repo: Path) -> None:
    """`ls` keeps active records in a cache by commit: the backend must survive it."""
    job = submit(repo, "--backend", "slurm", "--cpu", "--slurm-arg=--begin=now+3600", "true")
    wait_until(lambda: "Slurm job" in str(show(repo, job).get("reason")), timeout=30)
    for _ in range(2):  # the second from the cache
        rows = json.loads(tq(repo, "ls", "--json").stdout)
        assert [(r["backend"], r["state"]) for r in rows if r["id"] == job] == [
            ("slurm", "pending")]
    tq(repo, "rm", str(job))


def test_requeue_of_an_ended_slurm_job_asks_slurm_for_its_gpus_again(
        repo: Path, tmp_path: Path) -> None:
    """The copy runs on Slurm (as its record says) with the sbatch options of its
    request: its GPU, its priority, the tq.slurm.* settings."""
    seen = tmp_path / "seen"
    job = submit(repo, "--backend", "slurm", "--gpus", "1", "--sh",
                 f'echo "gpu=$CUDA_VISIBLE_DEVICES" >> {seen}')
    wait_state(repo, job, "done", timeout=60)
    again = int(tq(repo, "requeue", str(job)).stdout.split()[1])
    record = wait_state(repo, again, "done", timeout=60)
    assert record["backend"] == "slurm"
    lines = seen.read_text().splitlines()
    assert len(lines) == 2 and lines[1] == lines[0] and lines[0] != "gpu=", lines


# Saves and exits 0 on SIGTERM.
SAVES_ON_TERM = """\
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(0.05)
"""


@pytest.mark.slow  # waits for Slurm's time-limit signal: ~30 s (pytest -m slow)
def test_a_slurm_job_stopped_by_its_time_limit_signal_is_timed_out_not_done(
        repo: Path) -> None:
    """Slurm sends the stop signal `grace` seconds before the time limit; a job that saves
    and exits 0 on it did not finish its work: the record says timed-out."""
    (repo / "save.py").write_text(SAVES_ON_TERM)
    job = submit(repo, "--backend", "slurm", "--cpu", "--time", "2s", "python", "save.py")
    record = wait_state(repo, job, "failed", timeout=90)
    assert record["event"] == "timed-out" and record["stop"] == "clean", record
    assert "time limit" in str(record["detail"])
