"""git_tq/slurm.py against a real single-node Slurm cluster (tests/slurm_cluster.py), and the
mechanics a Slurm backend relies on: preemption's one SIGTERM, exit 75 and the requeue, fake
GPUs, signalling and cancelling, exit codes and signals as states() reports them, --nice.

Where no cluster can be had (not root, no apt-get), the tests that need one are skipped; the
ones marked plain (no cluster) run everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import pytest
import slurm_cluster as slurm_kit
from conftest import wait_until

from git_tq import slurm
from git_tq.errors import EXIT_USER, SlurmError, TqError

SlurmCluster = slurm_kit.SlurmCluster


class Watch:
    """Polls states() of some jobs, keeping every change it saw (with its time) for the
    report and the asserts."""

    def __init__(self, *ids: str) -> None:
        self.ids = list(ids)
        self.t0 = time.time()
        self.now: dict[str, slurm.SlurmJobState] = {}
        self.seen: list[tuple[float, str, str, str, int]] = []

    def add(self, job_id: str) -> None:
        self.ids.append(job_id)

    def poll(self) -> dict[str, slurm.SlurmJobState]:
        now = slurm.states(self.ids)
        for job_id, st in now.items():
            old = self.now.get(job_id)
            if old != st:
                self.seen.append((time.time() - self.t0, job_id, st.state, st.reason,
                                  st.restart_count))
        self.now = now
        return now

    def until(self, job_id: str, pred: Callable[[slurm.SlurmJobState], object],
              timeout: float = 15) -> slurm.SlurmJobState:
        """Wait (deadline `timeout`) until pred(state of job_id) holds; that state."""

        def ok() -> bool:
            st = self.poll().get(job_id)
            return st is not None and bool(pred(st))

        wait_until(ok, timeout=timeout)
        return self.now[job_id]

    def report(self) -> str:
        return "\n".join(f"  +{t:6.2f}s job {j}: {s} reason={r!r} restarts={n}"
                         for t, j, s, r, n in self.seen)


def sub(script: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return slurm.submit("#!/bin/bash\n" + script, list(args), env=env, cwd=str(cwd))


def stamps(path: Path, word: str) -> list[float]:
    """The times on the lines `WORD <epoch seconds>` of a file."""
    return [float(line.split()[1]) for line in path.read_text().splitlines()
            if line.startswith(word + " ")]


def scontrol_fields(job_id: str) -> dict[str, str]:
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                       text=True, check=True)
    return slurm.parse_scontrol(p.stdout.strip())


# ---------------------------------------------------------------- no cluster needed


def test_gpu_request_args() -> None:
    assert slurm.gpu_request_args(0) == []
    assert slurm.gpu_request_args(2) == ["--gres=gpu:2"]
    with pytest.raises(ValueError):
        slurm.gpu_request_args(-1)


def test_missing_tools_are_one_line_errors(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no sbatch, no squeue
    assert not slurm.available()
    with pytest.raises(SlurmError) as e:
        slurm.submit("#!/bin/sh\ntrue\n")
    assert str(e.value).startswith("sbatch not found")
    assert "\n" not in str(e.value)
    assert isinstance(e.value, TqError) and e.value.exit_code == EXIT_USER
    with pytest.raises(SlurmError, match="squeue not found"):
        slurm.states(["1"])


def test_a_missing_config_is_a_one_line_error_at_once(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not slurm.available():
        pytest.skip("no sbatch here")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nosuch.conf"))
    t0 = time.monotonic()
    with pytest.raises(SlurmError, match="SLURM_CONF names no file"):
        slurm.states(["1"])
    assert time.monotonic() - t0 < 5  # squeue itself would retry for 60 s


def test_every_state_is_pending_running_or_final() -> None:
    named = ["PENDING", "RUNNING", "COMPLETING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
             "NODE_FAIL", "PREEMPTED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "BOOT_FAIL",
             "OUT_OF_MEMORY", "DEADLINE", "SUSPENDED"]
    for state in named:
        kinds = [state in slurm.PENDING_STATES, state in slurm.RUNNING_STATES,
                 state in slurm.FINAL_STATES]
        assert kinds.count(True) == 1, state
    assert slurm.parse_state("CANCELLED by 0") == "CANCELLED"
    assert slurm.parse_state("CANCELLED+") == "CANCELLED"
    assert slurm.parse_state(" running ") == "RUNNING"
    assert slurm.parse_state("") == ""


def test_parse_scontrol_keeps_values_with_odd_keys() -> None:
    line = ("JobId=7 JobName=a b JobState=CANCELLED Reason=None Restarts=1 ExitCode=0:15 "
            "AllocNode:Sid=localhost:5 CPUs/Task=1 NodeList=localhost Partition=low")
    f = slurm.parse_scontrol(line)
    assert f["JobName"] == "a b" and f["ExitCode"] == "0:15" and f["CPUs/Task"] == "1"
    assert f["AllocNode:Sid"] == "localhost:5" and f["Partition"] == "low"


# ---------------------------------------------------------------- the cluster

@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_cluster_fixture(slurm_cluster: SlurmCluster) -> None:
    c = slurm_cluster
    assert os.environ["SLURM_CONF"] == str(c.conf) and c.conf.is_file()
    assert c.partitions == ("low", "high") and c.gpus == 2 and c.grace == 5
    assert c.state_dir.is_dir() and slurm.available()
    assert slurm.version() == c.version
    assert f"GraceTime={c.grace}" in c.conf.read_text()
    p = subprocess.run(["sinfo", "-h", "-o", "%P %a %G"], capture_output=True, text=True,
                       check=True)
    assert p.stdout.split("\n")[0].split() == ["low*", "up", "gpu:2"]
    assert not slurm.accounting()  # no slurmdbd here: sacct is not asked
    # A second user in this process joins the running cluster; no teardown while in use.
    again = slurm_kit.Share(c.base)
    try:
        joined = again.open(grace=c.grace, gpus=c.gpus)
        assert joined.conf == c.conf and joined.start_seconds == 0.0
    finally:
        again.close()
    assert slurm_kit.teardown_if_unused(c.base) is None
    assert slurm_kit.is_up(c.base)


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.slow  # the mechanism test_slurm.py's preemption test relies on (~14 s)
def test_preemption_sends_one_sigterm_and_exit_75_requeues(slurm_cluster: SlurmCluster,
                                                            tmp_path: Path) -> None:
    """Mechanic 1: a `low` job with --requeue --signal=B:TERM@GRACE --open-mode=append is
    preempted by a `high` job that needs both GPUs: its batch script gets ONE SIGTERM, exits 75
    after saving, Slurm requeues it, and it runs again (SLURM_RESTART_COUNT=1) into the same
    log."""
    log, marks = tmp_path / "low.log", tmp_path / "terms"
    script = f"""\
echo "start $(date +%s.%N) restart=${{SLURM_RESTART_COUNT-unset}} gpus=$CUDA_VISIBLE_DEVICES"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "done $(date +%s.%N)"; exit 0; fi
trap 'echo "TERM $(date +%s.%N)" >> {marks}' TERM
sleep 600 & child=$!
wait $child  # returns at the trapped SIGTERM
echo "saving $(date +%s.%N)"
for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.1; done  # a second SIGTERM would show in {marks}
kill $child
echo "exit75 $(date +%s.%N)"
exit 75
"""
    t_submit = time.time()
    low = sub(script, tmp_path, "--requeue", f"--signal=B:TERM@{slurm_cluster.grace}",
              "--open-mode=append", "-o", str(log), "-p", slurm_cluster.low,
              *slurm.gpu_request_args(1))
    t_sbatch = time.time() - t_submit
    watch = Watch(low)
    watch.t0 = t_submit
    watch.until(low, lambda s: s.state == "RUNNING")
    wait_until(lambda: log.exists() and "start" in log.read_text())
    t_running = stamps(log, "start")[0] - t_submit

    t_high = time.time()
    high = sub("sleep 1\n", tmp_path, "-p", slurm_cluster.high, "-o", str(tmp_path / "high.log"),
               *slurm.gpu_request_args(2))
    watch.add(high)
    final = watch.until(low, lambda s: s.state == "COMPLETED", timeout=45)

    text = log.read_text()
    print(f"low job {low}, high job {high}; states seen:\n{watch.report()}\nlog:\n{text}")
    assert len(stamps(marks, "TERM")) == 1, marks.read_text()  # exactly one SIGTERM
    starts = [line for line in text.splitlines() if line.startswith("start ")]
    assert [s.split()[2] for s in starts] == ["restart=unset", "restart=1"]
    assert [line.split()[0] for line in text.splitlines() if not line.startswith("slurmstepd")] \
        == ["start", "saving", "exit75", "start", "done"]  # one log, appended to
    assert final.restart_count == 1 and final.exit_code == 0 and final.signal is None
    assert final.partition == "low" and final.node == "localhost"
    high_state = watch.now[high]
    assert high_state.state == "COMPLETED" and high_state.exit_code == 0
    # The requeued job pended (restart_count 1) while the high job ran.
    seen = [(j, s, n) for _, j, s, _, n in watch.seen]
    assert (low, "PENDING", 1) in seen and (high, "RUNNING", 0) in seen
    assert seen.index((low, "PENDING", 1)) < seen.index((high, "RUNNING", 0))

    term = stamps(marks, "TERM")[0]
    again = stamps(log, "start")[1]
    timings = {
        "sbatch": t_sbatch,
        "sbatch -> running": t_running,
        "high submitted -> SIGTERM": term - t_high,
        "SIGTERM -> exit 75": stamps(log, "exit75")[0] - term,
        "SIGTERM -> running again": again - term,
    }
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    assert timings["high submitted -> SIGTERM"] < 10


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_gpu_jobs_see_their_fake_gpus(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Mechanic 2: --gres=gpu:N sets CUDA_VISIBLE_DEVICES and SLURM_JOB_GPUS; two jobs of one
    GPU each get different ones; a job without GPUs sees none, whatever its submitter had."""
    gate = tmp_path / "gate"
    script = f"""\
echo "${{CUDA_VISIBLE_DEVICES-unset}} ${{SLURM_JOB_GPUS-unset}}" > {tmp_path}/$SLURM_JOB_ID.env
while [ ! -e {gate} ]; do sleep 0.05; done
"""
    one = [sub(script, tmp_path, "-o", "/dev/null", *slurm.gpu_request_args(1))
           for _ in range(2)]
    files = [tmp_path / f"{j}.env" for j in one]
    wait_until(lambda: all(f.exists() and f.read_text().strip() for f in files), timeout=15)
    seen = [f.read_text().split() for f in files]
    gate.touch()
    print(f"gpu:1 jobs saw (CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS): {seen}")
    assert sorted(s[0] for s in seen) == ["0", "1"]
    assert all(s[0] == s[1] for s in seen)

    both = sub(script, tmp_path, "-o", "/dev/null", *slurm.gpu_request_args(2))
    none = sub(script, tmp_path, "-o", "/dev/null", env={"CUDA_VISIBLE_DEVICES": "7"})
    over = sub(script, tmp_path, "-o", "/dev/null", *slurm.gpu_request_args(1),
               env={"CUDA_VISIBLE_DEVICES": "7"})
    files = [tmp_path / f"{j}.env" for j in (both, none, over)]
    wait_until(lambda: all(f.exists() and f.read_text().strip() for f in files), timeout=15)
    got = [f.read_text().split() for f in files]
    print(f"gpu:2 job saw {got[0]}; no-GPU job submitted with CUDA_VISIBLE_DEVICES=7 saw "
          f"{got[1]}; gpu:1 job submitted with CUDA_VISIBLE_DEVICES=7 saw {got[2]}")
    assert got[0] == ["0,1", "0,1"]
    assert got[1] == ["unset", "unset"]  # Slurm drops the submitter's value: no GPUs
    assert got[2][0] in ("0", "1") and got[2][0] == got[2][1]
    states = slurm.states([*one, both, none, over])
    assert all(st.state == "COMPLETED" and st.exit_code == 0 for st in states.values())


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_signal_full_reaches_the_batch_script_and_cancel_ends_it(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Mechanic 3: `scancel --signal=TERM --full` reaches the batch script (and its children),
    `scancel --signal=TERM` alone reaches nothing (no steps), and a plain scancel ends the job
    CANCELLED."""
    marks, child_marks, ready = tmp_path / "terms", tmp_path / "child-terms", tmp_path / "ready"
    script = f"""\
n=0
trap 'n=$((n+1)); echo "TERM $(date +%s.%N)" >> {marks}; [ $n -ge 2 ] && exit 143' TERM
bash -c 'trap "echo child >> {child_marks}" TERM; touch {ready}; while :; do sleep 0.05; done' &
while :; do wait; done
"""
    job = sub(script, tmp_path, "-o", str(tmp_path / "log"))
    watch = Watch(job)
    watch.until(job, lambda s: s.state == "RUNNING")
    wait_until(ready.exists)  # the child's trap is set

    slurm.cancel(job, "TERM")  # steps only: a batch job without srun has none
    slurm.cancel(job, "TERM", full=True)
    wait_until(lambda: marks.exists() and child_marks.exists())
    running = watch.poll()[job]
    fields = scontrol_fields(job)
    print(f"after scancel --signal=TERM --full: states() {running}; scontrol "
          f"JobState={fields['JobState']} Reason={fields['Reason']} ExitCode={fields['ExitCode']}")
    assert len(stamps(marks, "TERM")) == 1  # the one without --full reached nothing
    assert child_marks.read_text() == "child\n"  # --full signals the children too
    assert running.state == "RUNNING" and running.exit_code is None

    slurm.cancel(job)  # plain scancel: SIGTERM to all (the script exits 143), then SIGKILL
    ended = watch.until(job, lambda s: s.ended)
    fields = scontrol_fields(job)
    print(f"after plain scancel: states() {ended}; scontrol JobState={fields['JobState']} "
          f"Reason={fields['Reason']} ExitCode={fields['ExitCode']}\n{watch.report()}")
    assert ended.state == "CANCELLED" and fields["JobState"] == "CANCELLED"
    assert (ended.exit_code, ended.signal) == (143, None)
    assert len(stamps(marks, "TERM")) == 2

    slurm.cancel(job)  # ended: no error
    slurm.cancel(job, "TERM", full=True)

    # A job that does not trap SIGTERM dies of it.
    plain = sub("sleep 600\n", tmp_path, "-o", "/dev/null")
    watch.add(plain)
    watch.until(plain, lambda s: s.state == "RUNNING")
    slurm.cancel(plain)
    st = watch.until(plain, lambda s: s.ended)
    print(f"plain scancel of `sleep 600`: {st}")
    assert st.state == "CANCELLED" and st.signal == 15 and st.exit_code is None


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_states_of_ends(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Mechanic 3: how exit codes and signals come back, all in one states() call."""
    cases = {
        "ok": "true",
        "exit3": "exit 3",
        "self-killed": "kill -KILL $$",
        "self-termed": "kill -TERM $$",
        "child-killed": "sleep 600 & kill -KILL $!; wait $!; exit $?",
    }
    ids = {name: sub(body + "\n", tmp_path, "-o", "/dev/null") for name, body in cases.items()}
    watch = Watch(*ids.values())
    wait_until(lambda: all(st.ended for st in watch.poll().values())
               and len(watch.now) == len(ids), timeout=20)
    got = {name: watch.now[j] for name, j in ids.items()}
    for name, st in got.items():
        fields = scontrol_fields(st.id)
        print(f"{name}: {st}; scontrol JobState={fields['JobState']} Reason={fields['Reason']} "
              f"ExitCode={fields['ExitCode']}")

    def brief(st: slurm.SlurmJobState) -> tuple[str, str, int | None, int | None]:
        return st.state, st.reason, st.exit_code, st.signal

    assert brief(got["ok"]) == ("COMPLETED", "", 0, None)
    assert brief(got["exit3"]) == ("FAILED", "NonZeroExitCode", 3, None)
    assert brief(got["self-killed"]) == ("FAILED", "JobLaunchFailure", None, 9)
    assert brief(got["self-termed"]) == ("FAILED", "JobLaunchFailure", None, 15)
    assert brief(got["child-killed"]) == ("FAILED", "NonZeroExitCode", 137, None)
    assert all(st.node == "localhost" and st.partition == "low" for st in got.values())

    # Unknown ids are left out; many ids are one squeue call; an empty ask asks nothing.
    assert slurm.states([]) == {}
    assert slurm.states(["999999"]) == {}
    both = slurm.states([ids["exit3"], "999999", ids["ok"]])
    assert list(both) == [ids["exit3"], ids["ok"]]


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_nice_orders_pending_jobs_for_root_and_users(slurm_cluster: SlurmCluster,
                                                     tmp_path: Path) -> None:
    """Mechanic 4: --nice=N lowers a job's priority by N (priority/basic), for root (who may
    also give a negative one) and for a plain user (who may not)."""
    hold = sub("sleep 600\n", tmp_path, "-o", "/dev/null", *slurm.gpu_request_args(2))
    watch = Watch(hold)
    watch.until(hold, lambda s: s.state == "RUNNING")
    nices = {"0": "0", "100": "100", "-50": "-50"}
    ids = {n: sub("true\n", tmp_path, "-o", "/dev/null", f"--nice={n}",
                  *slurm.gpu_request_args(2)) for n in nices}
    prio = {n: int(scontrol_fields(j)["Priority"]) for n, j in ids.items()}
    nice = {n: scontrol_fields(j)["Nice"] for n, j in ids.items()}
    print(f"root: Nice {nice}, Priority {prio}")
    assert nice == nices
    assert prio["-50"] > prio["0"] > prio["100"]
    assert prio["0"] - prio["100"] == 100 + 1  # one job later in FIFO order, and 100 nicer
    slurm.cancel(hold)
    for j in ids.values():
        watch.add(j)
    wait_until(lambda: all(st.state == "COMPLETED" for st in watch.poll().values()
                           if st.id != hold), timeout=15)

    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("no runuser: cannot submit as a plain user")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")

    def as_nobody(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([runuser, "-u", "nobody", "--", "sbatch", "--parsable",
                               "--chdir=/tmp", "-o", "/dev/null", *args],
                              input="#!/bin/sh\nid -un\n", capture_output=True, text=True)

    ok = as_nobody(["--nice=10"])
    assert ok.returncode == 0, ok.stderr
    job = ok.stdout.strip()
    fields = scontrol_fields(job)
    assert fields["Nice"] == "10" and fields["UserId"].startswith("nobody(")
    watch.add(job)
    assert watch.until(job, lambda s: s.ended).state == "COMPLETED"
    refused = as_nobody(["--nice=-10"])
    print(f"nobody: --nice=10 ran (Nice={fields['Nice']}); --nice=-10: rc {refused.returncode}, "
          f"{refused.stderr.strip()}")
    assert refused.returncode != 0 and "Invalid --nice value" in refused.stderr


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_sbatch_errors_carry_slurms_complaint(slurm_cluster: SlurmCluster,
                                             tmp_path: Path) -> None:
    with pytest.raises(SlurmError) as e:
        sub("true\n", tmp_path, "-p", "nosuchpartition")
    print(e.value)
    assert str(e.value) == "sbatch failed: invalid partition specified: nosuchpartition"
    with pytest.raises(SlurmError) as e:
        sub("true\n", tmp_path, *slurm.gpu_request_args(3))
    print(e.value)
    assert "Requested node configuration is not available" in str(e.value)
