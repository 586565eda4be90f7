"""Jobs run by Slurm (`--backend slurm`), end to end: the real git-tq, the real daemon and
a real single-node Slurm cluster (tests/slurm_cluster.py), fake GPUs as GRES devices.
Skipped, with the reason, where no cluster can be had (not root, no apt-get)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import git, open_gate, show, submit, tq, wait_state, wait_until

pytestmark = [pytest.mark.usefixtures("autostart", "slurm_cluster"), pytest.mark.slurm,
              pytest.mark.xdist_group("slurm")]

# Writes what it sees, the code it runs and metrics; exits with the code in argv[2].
REPORT = """\
import json, os, sys
os.makedirs("results", exist_ok=True)
open("results/out.txt", "w").write("made on the node\\n")
with open(os.environ["TQ_METRICS"], "w") as fh:
    json.dump({"loss": 0.25}, fh)
seen = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TQ_ATTEMPT", "SLURM_JOB_ID",
                                       "TQ_JOB_ID", "TQ_WORKTREE")}
seen["code"] = open("code.txt").read()
seen["cwd"] = os.getcwd()
open(sys.argv[1], "w").write(json.dumps(seen))
print("hello from slurm")
sys.exit(int(sys.argv[2]))
"""

# A checkpointing job: counts TERMs, saves and exits 0 on one; on attempt 2 it finds its
# checkpoint and finishes.
CHECKPOINTING = """\
import os, signal, sys, time
marks = sys.argv[1]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
attempt = os.environ["TQ_ATTEMPT"]
with open(marks, "a") as fh:
    fh.write(f"up {attempt} {os.path.exists('ckpt')}\\n")
if os.path.exists("ckpt"):
    sys.exit(0)
while not stop:
    time.sleep(0.05)
open("ckpt", "w").write("saved")
with open(marks, "a") as fh:
    fh.write(f"term {attempt} {len(stop)}\\n")
"""

# Waits for its gate file, then exits with the code written in it.
GATE = """\
import os, sys, time
gate = sys.argv[1]
open(gate + ".started", "w").write(os.environ.get("SLURM_JOB_ID", ""))
while not os.path.exists(gate):
    time.sleep(0.05)
sys.exit(int(open(gate).read() or 0))
"""


def slurm_id(repo: Path, job: int) -> str:
    """The Slurm job id the daemon submitted the job as (from its run file)."""
    found = list((Path(os.environ["TQ_HOME"]) / "run").glob(f"*/{job}.slurm"))
    if not found:
        return ""
    return str(json.loads(found[0].read_text()).get("id") or "")


def slurm_state(sid: str) -> str:
    p = subprocess.run(["scontrol", "show", "job", "-o", sid], capture_output=True, text=True)
    for word in p.stdout.split():
        if word.startswith("JobState="):
            return word.partition("=")[2]
    return ""


def events(repo: Path, job: int) -> list[tuple[str, Any]]:
    return [(e["event"], e.get("detail")) for e in show(repo, job)["lifecycle"]]


def test_a_slurm_job_runs_its_snapshot_and_records_its_end(repo: Path, tmp_path: Path) -> None:
    (repo / "report.py").write_text(REPORT)
    (repo / "code.txt").write_text("as submitted")
    seen = tmp_path / "seen.json"
    job = submit(repo, "--backend", "slurm", "--gpus", "1", "python", "report.py", str(seen),
                 "3")
    (repo / "code.txt").write_text("edited after the submission")
    record = wait_state(repo, job, "failed", timeout=60)
    assert record["exit_code"] == 3 and record["backend"] == "slurm"
    got = json.loads(seen.read_text())
    assert got["code"] == "as submitted"
    assert got["CUDA_VISIBLE_DEVICES"] in ("0", "1") and got["TQ_ATTEMPT"] == "1"
    assert got["SLURM_JOB_ID"] == slurm_id(repo, job) or got["SLURM_JOB_ID"]
    assert got["TQ_JOB_ID"] == str(job) and got["cwd"] == got["TQ_WORKTREE"]
    started = [d for e, d in events(repo, job) if e == "started"]
    assert started and started[0].startswith(f"Slurm job {got['SLURM_JOB_ID']} on ")
    assert record["metrics"] == {"loss": 0.25}
    assert record["outputs"]["files"] >= 1
    assert "hello from slurm" in tq(repo, "view", str(job)).stdout


def test_kill_stops_a_slurm_job_with_one_signal(repo: Path, tmp_path: Path) -> None:
    (repo / "ckpt.py").write_text(CHECKPOINTING)
    marks = tmp_path / "marks"
    job = submit(repo, "--backend", "slurm", "--cpu", "-g", "20", "python", "ckpt.py",
                 str(marks))
    wait_until(lambda: marks.exists(), timeout=60)
    sid = slurm_id(repo, job)
    tq(repo, "kill", str(job))
    record = wait_state(repo, job, "cancelled", timeout=60)
    assert record["stop"] == "clean"
    assert marks.read_text().splitlines() == ["up 1 False", "term 1 1"]
    wait_until(lambda: slurm_state(sid) in ("COMPLETED", "CANCELLED", ""), timeout=30)


def test_a_preempted_slurm_job_saves_is_requeued_and_resumes(repo: Path,
                                                             tmp_path: Path) -> None:
    (repo / "ckpt.py").write_text(CHECKPOINTING)
    marks = tmp_path / "marks"
    low = submit(repo, "--backend", "slurm", "--gpus", "2", "python", "ckpt.py", str(marks))
    wait_until(lambda: marks.exists(), timeout=60)
    urgent = submit(repo, "--backend", "slurm", "--gpus", "2",
                    "--slurm-arg=--partition=high", "true")
    wait_state(repo, urgent, "done", timeout=60)
    record = wait_state(repo, low, "done", timeout=90)
    assert record["attempt"] == 2
    assert marks.read_text().splitlines() == ["up 1 False", "term 1 1", "up 2 True"]
    names = [e for e, _ in events(repo, low)]
    assert names == ["submitted", "started", "preempted", "resumed", "finished"]
    assert dict(events(repo, low))["preempted"] == "preempted (slurm)"
    log = tq(repo, "view", str(low)).stdout
    assert "attempt 1" in log and "attempt 2" in log


def test_an_scancel_outside_git_tq_is_recorded_with_slurms_reason(repo: Path,
                                                                  tmp_path: Path) -> None:
    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    job = submit(repo, "--backend", "slurm", "--cpu", "python", "gate.py", str(gate))
    started = Path(str(gate) + ".started")
    wait_until(started.exists, timeout=60)
    subprocess.run(["scancel", started.read_text()], check=True)
    record = _ended(repo, job)
    assert "CANCELLED" in (record["detail"] or ""), record["detail"]


def _ended(repo: Path, job: int) -> dict[str, Any]:
    wait_until(lambda: show(repo, job)["state"] in ("failed", "cancelled", "done"), timeout=60)
    return show(repo, job)


def test_daemon_killed_while_slurm_runs_a_job_loses_nothing(repo: Path,
                                                            tmp_path: Path) -> None:
    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    job = submit(repo, "--backend", "slurm", "--cpu", "python", "gate.py", str(gate))
    wait_until(Path(str(gate) + ".started").exists, timeout=60)
    wait_state(repo, job, "running", timeout=30)
    info = json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())
    os.kill(int(info["pid"]), signal.SIGKILL)
    open_gate(gate, "4")
    wait_until(lambda: list((Path(os.environ["TQ_HOME"]) / "run").glob(f"*/{job}.exit.1")),
               timeout=60)
    tq(repo, "start")
    record = wait_state(repo, job, "failed", timeout=60)
    assert record["exit_code"] == 4


def test_rm_of_a_waiting_slurm_job_cancels_it_in_slurm(repo: Path) -> None:
    job = submit(repo, "--backend", "slurm", "--cpu", "--slurm-arg=--begin=now+3600", "true")
    wait_until(lambda: slurm_id(repo, job) != "", timeout=30)
    sid = slurm_id(repo, job)
    wait_until(lambda: "Slurm job" in (tq_ls_reason(repo, job) or ""), timeout=30)
    tq(repo, "rm", str(job))
    wait_until(lambda: slurm_state(sid) in ("CANCELLED", ""), timeout=30)
    assert show(repo, job)["state"] == "cancelled"
    git(repo, "status")


def tq_ls_reason(repo: Path, job: int) -> str:
    rows = json.loads(tq(repo, "ls", "--json").stdout)
    return next((str(r.get("reason")) for r in rows if r["id"] == job), "")


# Ignores its stop signal: only SIGKILL ends it.
STUBBORN = """\
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("up")
while True:
    time.sleep(0.05)
"""


def test_a_slurm_job_that_ignores_its_stop_signal_is_killed_after_its_grace(
        repo: Path, tmp_path: Path) -> None:
    (repo / "stubborn.py").write_text(STUBBORN)
    up = tmp_path / "up"
    job = submit(repo, "--backend", "slurm", "--cpu", "-g", "1", "python", "stubborn.py",
                 str(up))
    wait_until(up.exists, timeout=60)
    sid = slurm_id(repo, job)
    tq(repo, "kill", str(job))
    record = wait_state(repo, job, "cancelled", timeout=60)
    assert record["stop"] == "forced"
    wait_until(lambda: slurm_state(sid) not in ("RUNNING", "PENDING"), timeout=30)


@pytest.mark.slow  # a requeue and Slurm's cred_expire: ~13 s (pytest -m slow)
def test_a_failed_node_is_recorded_and_the_job_resumes(repo: Path, tmp_path: Path) -> None:
    (repo / "ckpt.py").write_text(CHECKPOINTING)
    marks = tmp_path / "marks"
    job = submit(repo, "--backend", "slurm", "--cpu", "python", "ckpt.py", str(marks))
    wait_until(marks.exists, timeout=60)
    wait_state(repo, job, "running", timeout=30)
    down = ["scontrol", "update", "nodename=localhost", "state=down", "reason=tq-test"]
    subprocess.run(down, check=True, capture_output=True)
    try:
        wait_until(lambda: "preempted" in [e for e, _ in events(repo, job)], timeout=60)
    finally:
        subprocess.run(["scontrol", "update", "nodename=localhost", "state=resume"],
                       capture_output=True)
    detail = dict(events(repo, job))["preempted"]
    assert "slurm" in str(detail).lower(), detail
    record = wait_state(repo, job, "done", timeout=90)
    assert record["attempt"] == 2
