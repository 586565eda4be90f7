"""Dependencies (`run --after`) and `git tq edit` end to end: the real git-tq, the real
daemon, real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import git, open_gate, show, submit, tq, tq_json, wait_state, wait_until

# A job that waits for its gate file, then exits with the code written in it.
GATE = """\
import os, sys, time
gate = sys.argv[1]
open(gate + ".started", "a").write(os.environ["TQ_ATTEMPT"] + "\\n")
while not os.path.exists(gate):
    time.sleep(0.02)
sys.exit(int(open(gate).read() or 0))
"""

# A job that runs until SIGTERM, then exits 0 (a checkpointing job).
STOPPABLE = """\
import os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
open(sys.argv[1], "a").write("up " + os.environ["TQ_ATTEMPT"] + "\\n")
while not stop:
    time.sleep(0.02)
"""


def daemon_pid() -> int:
    info = json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())
    return int(info["pid"])


def ls_rows(repo: Path) -> dict[int, dict[str, Any]]:
    data = tq_json(repo, "ls")
    assert isinstance(data, list)
    return {j["id"]: j for j in data}


def detail(repo: Path, job_id: int) -> str:
    return str(show(repo, job_id)["detail"])


# --- refused at submission, no daemon ----------------------------------------------------


BAD_AFTER = [
    (["--after", "99"], "--after: no job 99", 1),
    (["--after", "abc"], "--after: no job, sweep or tag 'abc'", 1),
    (["--after", "3-1"], "--after: bad job range '3-1': 3 is after 1", 2),
    (["--after", "1-5"], "--after: no job in range 1-5", 1),
    (["--after-any", "0"], "--after-any: ", 1),
]


def test_bad_dependencies_are_refused_in_one_line(repo: Path) -> None:
    submit(repo, "--cpu", "true")
    submit(repo, "--cpu", "true")
    for args, message, code in BAD_AFTER:
        p = tq(repo, "run", *args, "--", "true", check=False)
        assert p.returncode == code and message in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert len(tq_json(repo, "ls", "--all")) == 2  # type: ignore[arg-type]


def test_dependencies_are_recorded_and_refused_when_hopeless(repo: Path,
                                                             make_repo: Any) -> None:
    first = submit(repo, "--cpu", "true")
    sweep = tq(repo, "run", "-q", "--cpu", "--sweep", "x=1,2,3", "--sweep-name", "sw",
               "echo", "{x}").stdout.split()
    job = submit(repo, "--cpu", "--after", f"{first},sw", "--after-any", "sw,1", "true")
    data = show(repo, job)
    assert data["after"] == [1, *map(int, sweep)] and data["after_any"] == []
    assert data["waiting_for"] == [1, 2, 3, 4]
    assert data["reason"] == "waiting for 1, 2, 3 and 1 more"
    message = git(repo, "log", "-1", "--format=%B", f"refs/tq/jobs/{job}")
    assert "Tq-After: 1-4\n" in message
    # a job that already failed or was cancelled can never be followed
    tq(repo, "rm", str(first))
    p = tq(repo, "run", "--after", str(first), "true", check=False)
    assert p.returncode == 1 and "job 1 was cancelled, so a job after it could never" in p.stderr
    assert submit(repo, "--cpu", "--after-any", str(first), "true")  # any ending will do
    # a fetched job is not ours: nothing here would ever run it
    other = make_repo("other")
    git(other, "config", "tq.autostart", "false")
    tq(other, "run", "-q", "--cpu", "--sweep", "x=1,2,3,4,5,6,7,8,9", "true")
    git(repo, "fetch", "-q", str(other), "refs/tq/jobs/9:refs/tq/jobs/9")
    p = tq(repo, "run", "--after", "9", "true", check=False)
    assert p.returncode == 1 and "job 9 was not submitted here by you" in p.stderr


def test_ls_says_what_a_waiting_job_waits_for_without_a_daemon(repo: Path) -> None:
    a = submit(repo, "--cpu", "true")
    b = submit(repo, "--cpu", "--after", str(a), "true")
    rows = ls_rows(repo)
    assert rows[b]["waiting_for"] == [a] and rows[b]["reason"] == f"waiting for {a}"
    assert rows[a]["reason"] is None and rows[a]["waiting_for"] == []
    table = tq(repo, "ls").stdout
    assert "REASON" in table and f"waiting for {a}" in table
    tq(repo, "rm", str(a))  # no daemon yet to cancel b: ls says why it never will start
    assert ls_rows(repo)[b]["reason"] == f"after {a} (cancelled)"
    assert "after 1 (cancelled)" in tq(repo, "ls").stdout


# --- the daemon ------------------------------------------------------------------------


@pytest.mark.usefixtures("autostart")
def test_chain_is_cancelled_when_its_first_job_fails(repo: Path, tmp_path: Path) -> None:
    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    a = submit(repo, "--cpu", "python", "gate.py", str(gate))
    b = submit(repo, "--cpu", "--after", str(a), "touch", str(tmp_path / "b-ran"))
    c = submit(repo, "--cpu", "--after", str(b), "touch", str(tmp_path / "c-ran"))
    d = submit(repo, "--cpu", "--after-any", str(a), "touch", str(tmp_path / "d-ran"))
    wait_until(lambda: Path(str(gate) + ".started").exists())
    rows = ls_rows(repo)
    assert rows[b]["reason"] == f"waiting for {a}" and rows[c]["reason"] == f"waiting for {b}"
    open_gate(gate, "3")
    wait_state(repo, c, "cancelled")
    assert wait_state(repo, a, "failed")["exit_code"] == 3
    assert show(repo, b)["state"] == "cancelled"
    assert detail(repo, b) == f"dependency {a} failed"
    assert detail(repo, c) == f"dependency {b} was cancelled"
    wait_state(repo, d, "done")
    assert (tmp_path / "d-ran").exists()
    assert not (tmp_path / "b-ran").exists() and not (tmp_path / "c-ran").exists()
    events = [e["event"] for e in show(repo, c)["lifecycle"]]
    assert events == ["submitted", "cancelled"]


@pytest.mark.usefixtures("autostart")
def test_a_job_after_a_range_starts_only_when_all_are_done(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.cpuSlots", "4")
    (repo / "gate.py").write_text(GATE)
    gates = [tmp_path / f"g{i}" for i in range(2)]
    first = [submit(repo, "--cpu", "python", "gate.py", str(g)) for g in gates]
    marker = tmp_path / "after-ran"
    # it checks, when it runs, that both gates were opened (so both jobs had ended)
    check = f"test -e {gates[0]} && test -e {gates[1]} && touch {marker}"
    last = submit(repo, "--cpu", "--after", f"{first[0]}-{first[1]}", "sh", "-c", check)
    for g in gates:
        wait_until(lambda g=g: Path(str(g) + ".started").exists())
    open_gate(gates[0], "0")
    wait_state(repo, first[0], "done")
    assert show(repo, last)["state"] == "pending"
    assert show(repo, last)["reason"] == f"waiting for {first[1]}"
    open_gate(gates[1], "0")
    assert wait_state(repo, last, "done")["exit_code"] == 0
    assert marker.exists()


@pytest.mark.usefixtures("autostart")
def test_a_restarted_daemon_finishes_a_cascade(repo: Path, tmp_path: Path) -> None:
    """A daemon killed with SIGKILL at any point of a cascade: the next one finishes it,
    each job cancelled once, with the reason of the job before it."""
    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    head = submit(repo, "--cpu", "python", "gate.py", str(gate))
    chain = [head]
    git(repo, "config", "tq.autostart", "false")  # queue the chain quickly, unread
    for _ in range(8):
        chain.append(submit(repo, "--cpu", "--after", str(chain[-1]), "true"))
    wait_until(lambda: Path(str(gate) + ".started").exists())
    tq(repo, "start")  # a nudge naming nothing: the daemon reads the whole chain
    open_gate(gate, "1")
    wait_until(lambda: show(repo, head)["state"] == "failed" or
               show(repo, chain[1])["state"] == "cancelled", timeout=20)
    os.kill(daemon_pid(), signal.SIGKILL)  # wherever it is in the cascade
    wait_until(lambda: not (Path(os.environ["TQ_HOME"]) / "daemon.json").exists() or
               not _alive(daemon_pid()))
    tq(repo, "start")
    wait_state(repo, chain[-1], "cancelled", timeout=30)
    assert show(repo, head)["state"] == "failed"
    for before, job in zip(chain, chain[1:]):
        data = show(repo, job)
        assert data["state"] == "cancelled"
        expected = "failed" if before == head else "was cancelled"
        assert data["detail"] == f"dependency {before} {expected}"
        assert [e["event"] for e in data["lifecycle"]] == ["submitted", "cancelled"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.usefixtures("autostart")
def test_a_cancelled_dependency_found_at_start_cancels_its_followers(repo: Path) -> None:
    """What a daemon killed between two cancellations leaves (one follower cancelled,
    the next still pending) is finished by the next daemon from the records alone."""
    git(repo, "config", "tq.autostart", "false")
    a = submit(repo, "--cpu", "true")
    b = submit(repo, "--cpu", "--after", str(a), "true")
    c = submit(repo, "--cpu", "--after", str(b), "true")
    tq(repo, "rm", str(b))
    tq(repo, "start")
    assert wait_state(repo, c, "cancelled")["detail"] == f"dependency {b} was cancelled"
    wait_state(repo, a, "done")


# --- edit --------------------------------------------------------------------------------


def test_edit_changes_a_pending_job_as_a_lifecycle_commit(repo: Path) -> None:
    a = submit(repo, "--cpu", "true")
    job = submit(repo, "-p", "100", "true")
    out = tq(repo, "edit", str(job), "-p", "10", "-g", "30", "-t", "urgent", "--gpu", "1",
             "--after", str(a)).stdout
    assert out.strip() == (f"job {job}: priority 100 → 10, grace 180s → 30s, tag none → "
                           f"urgent, gpus any 1 → 1, after none → {a}")
    data = show(repo, job)
    assert (data["priority"], data["grace"], data["tag"], data["gpus"], data["after"]) == \
        (10, 30, "urgent", [1], [a])
    assert data["state"] == "pending" and data["event"] == "edited"
    assert [e["event"] for e in data["lifecycle"]] == ["submitted", "edited"]
    assert data["lifecycle"][-1]["detail"].startswith("priority 100 → 10")
    assert "edited" in tq(repo, "show", str(job)).stdout
    subject = git(repo, "log", "-1", "--format=%s", f"refs/tq/jobs/{job}").strip()
    assert subject == f"tq job {job} edited: true"
    tq(repo, "edit", str(job), "--after", "none", "-t", "")
    data = show(repo, job)
    assert data["after"] == [] and data["tag"] is None
    assert tq(repo, "edit", str(job), "-p", "10").stdout.strip() == f"job {job}: unchanged"
    assert len(show(repo, job)["lifecycle"]) == 3


BAD_EDITS = [
    (["-p", "x"], "Invalid value for '-p'", 2),
    (["-g", "-1"], "Invalid value for '-g'", 2),
    ([], "nothing to change", 2),
    (["--gpu", "7"], "GPU", 1),
    (["--gpu", "0", "--cpu"], "give only one of --gpu, --gpus and --cpu", 2),
    (["-t", "a b"], "bad tag", 1),
    (["--after", "2"], "job 2 cannot wait for itself", 1),
    (["--after", "3"], "job 2 cannot wait for job 3: job 3 already waits", 1),
    (["--after", "99"], "--after: no job 99", 1),
]


def test_bad_edits_fail_in_one_line_and_change_nothing(repo: Path) -> None:
    submit(repo, "--cpu", "true")
    job = submit(repo, "true")
    submit(repo, "--after", str(job), "true")
    before = git(repo, "rev-parse", f"refs/tq/jobs/{job}")
    for args, message, code in BAD_EDITS:
        p = tq(repo, "edit", str(job), *args, check=False)
        assert p.returncode == code and message in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert git(repo, "rev-parse", f"refs/tq/jobs/{job}") == before


def test_edit_of_an_unknown_or_ended_job_is_refused(repo: Path) -> None:
    job = submit(repo, "--cpu", "true")
    p = tq(repo, "edit", "99", "-p", "1", check=False)
    assert p.returncode == 1 and "no job 99" in p.stderr
    tq(repo, "rm", str(job))
    p = tq(repo, "edit", str(job), "-p", "1", check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"git tq: job {job} has ended (cancelled): only a pending or "
                                "running job can be edited")


@pytest.mark.usefixtures("autostart")
def test_an_edit_makes_a_pending_job_preempt_a_running_one(repo: Path,
                                                           tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    (repo / "stoppable.py").write_text(STOPPABLE)
    log = tmp_path / "victim.log"
    victim = submit(repo, "-p", "50", "-g", "30", "python", "stoppable.py", str(log))
    wait_until(lambda: log.exists() and "up 1" in log.read_text())
    waiting = submit(repo, "-p", "100", "touch", str(tmp_path / "ran"))
    wait_until(lambda: show(repo, waiting).get("reason") == "GPU 0 busy")
    assert show(repo, victim)["state"] == "running"
    # a running job may change its priority and grace, nothing else
    p = tq(repo, "edit", str(victim), "--gpus", "2", check=False)
    assert p.returncode == 1 and "its gpus can no longer change" in p.stderr
    assert "grace 30s → 20s" in tq(repo, "edit", str(victim), "-g", "20").stdout
    tq(repo, "edit", str(waiting), "-p", "10")
    wait_state(repo, waiting, "done")
    assert (tmp_path / "ran").exists()
    data = wait_state(repo, victim, "running")  # resumed once the GPU was free again
    events = [(e["event"], e["detail"]) for e in data["lifecycle"]]
    assert ("preempted", f"preempted by job {waiting}") in events
    assert data["grace"] == 20 and data["attempt"] == 2
    tq(repo, "kill", "--now", str(victim))


@pytest.mark.usefixtures("autostart")
def test_ls_gives_the_daemons_reasons(repo: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.json"
    probe.write_text("{}")
    env = {"TQ_GPU_PROBE_FILE": str(probe)}
    (repo / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    busy = submit(repo, "--gpu", "0", "python", "gate.py", str(gate), env=env)
    wait_until(lambda: Path(str(gate) + ".started").exists())
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        probe.write_text(json.dumps({"1": [stranger.pid]}))
        on_0 = submit(repo, "--gpu", "0", "true", env=env)
        on_1 = submit(repo, "--gpu", "1", "true", env=env)
        wait_until(lambda: ls_rows(repo)[on_1]["reason"] ==
                   f"yielding to foreign process {stranger.pid} on GPU 1")
        assert ls_rows(repo)[on_0]["reason"] == "GPU 0 busy"
        assert "GPU 0 busy" in tq(repo, "ls").stdout
        tq(repo, "stop")  # a daemon's word is not shown once it has gone
        assert ls_rows(repo)[on_0]["reason"] is None
    finally:
        stranger.kill()
        stranger.wait()
    open_gate(gate, "0")
    assert busy
