"""Time limits (`run --time`, tq.defaultTime) and retries (`run --retry`), end to end:
the real executable, the real daemon, real processes and signals."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import git, show, submit, tq, wait_state, wait_until

from git_tq import recordfmt
from git_tq.lifecycle import apply_event
from git_tq.model import (
    ChangeSummary,
    GpuRequest,
    Job,
    JobSpec,
    State,
    format_duration,
    parse_duration,
)

# Here `git tq run` starts the daemon, as it does for users.
pytestmark = pytest.mark.usefixtures("autostart")

# Notes each SIGTERM and goes on: only SIGKILL ends it.
TRAPS_TERM = """\
import os, signal, time
signal.signal(signal.SIGTERM, lambda *a: open(os.environ["OUT"] + ".term", "a").write("x"))
open(os.environ["OUT"] + ".up", "a").write(os.environ["TQ_ATTEMPT"] + "\\n")
while True:
    time.sleep(0.05)
"""

# Attempt N writes its number, then exits with the code the test gave for it (the last
# code given for later attempts); "kill" ends the attempt by its own SIGKILL.
ATTEMPTS = """\
import os, signal, sys
n = int(os.environ["TQ_ATTEMPT"])
open(os.environ["OUT"], "a").write(f"{n}\\n")
codes = sys.argv[1].split(",")
code = codes[min(n, len(codes)) - 1]
if code == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(code))
"""


def daemon_pid() -> int:
    return int(json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())["pid"])


def events(repo: Path, job_id: int) -> list[str]:
    return [e["event"] for e in show(repo, job_id)["lifecycle"]]


def test_a_time_limit_stops_a_job_that_traps_sigterm(repo: Path, tmp_path: Path) -> None:
    (repo / "traps.py").write_text(TRAPS_TERM)
    out = tmp_path / "job"
    job = submit(repo, "--cpu", "--time", "3s", "-g", "1", "python", "traps.py",
                 env={"OUT": str(out)})
    assert show(repo, job)["time_limit"] == 3
    data = wait_state(repo, job, "failed", timeout=30)
    assert data["event"] == "timed-out" and data["detail"] == "time limit 3s reached"
    assert data["outcome"] == "time limit"
    assert data["stop"] == "forced" and data["signal"] == signal.SIGKILL  # after the grace
    assert Path(f"{out}.term").read_text() == "x"  # its stop signal, once
    assert data["ran_seconds"] >= 3
    assert Path(f"{out}.up").read_text() == "1\n"  # never requeued or retried
    assert events(repo, job)[-2:] == ["stopping", "timed-out"]
    assert f"{job}   failed (time limit)" in tq(repo, "ls", "-a").stdout
    p = tq(repo, "wait", str(job), check=False)
    assert p.returncode == 1 and f"job {job} failed (time limit)" in p.stderr


def test_the_time_limit_sums_every_attempt(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    (repo / "ticks.py").write_text("import os, time\nstart = time.time()\n"
                                   "while True:\n"
                                   "    time.sleep(0.05)\n"
                                   "    if time.time() - start > 2.5:\n"
                                   "        open(os.environ['OUT'], 'w').write('long')\n")
    out = tmp_path / "ran"
    job = submit(repo, "-p", "50", "--time", "5s", "python", "ticks.py", env={"OUT": str(out)})
    wait_until(out.exists, timeout=20)  # its first attempt has run 2.5 s
    gate = tmp_path / "gate"
    urgent = submit(repo, "-p", "1", "python", "-c",
                    f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)")
    wait_state(repo, job, "pending")  # preempted: waiting does not count
    first = show(repo, job)["ran_seconds"]
    assert first >= 2
    gate.write_text("")
    wait_state(repo, urgent, "done")
    data = wait_state(repo, job, "failed", timeout=30)
    assert data["event"] == "timed-out" and data["attempt"] == 2
    assert data["ran_seconds"] >= 4
    second = (dt.datetime.fromisoformat(data["ended_at"]) -
              dt.datetime.fromisoformat(data["started_at"])).total_seconds()
    assert second <= 5 - first + 1  # the rest of the 5 s, not 5 s again


def test_a_time_limit_stop_begun_before_kill_9_is_carried_through(repo: Path,
                                                                  tmp_path: Path) -> None:
    (repo / "traps.py").write_text(TRAPS_TERM)
    out = tmp_path / "job"
    job = submit(repo, "--cpu", "--time", "3s", "-g", "3", "python", "traps.py",
                 env={"OUT": str(out)})
    wait_until(lambda: Path(f"{out}.term").exists(), timeout=20)  # the stop has begun
    os.kill(daemon_pid(), signal.SIGKILL)  # in the middle of its grace
    assert show(repo, job)["state"] == "stopping"
    tq(repo, "start")
    data = wait_state(repo, job, "failed", timeout=30)
    assert data["event"] == "timed-out" and data["detail"] == "time limit 3s reached"
    assert Path(f"{out}.term").read_text() == "x"  # signalled once across the restart


def test_default_time_applies_to_jobs_without_time(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.defaultTime", "1s")
    (repo / "traps.py").write_text(TRAPS_TERM)
    out = tmp_path / "job"
    limited = submit(repo, "--cpu", "-g", "0", "python", "traps.py", env={"OUT": str(out)})
    unlimited = submit(repo, "--cpu", "--time", "none", "python", "-c", "print(1)")
    overridden = submit(repo, "--cpu", "--time", "1d12h", "python", "-c", "print(1)")
    assert show(repo, unlimited)["time_limit"] is None
    assert show(repo, overridden)["time_limit"] == 36 * 3600
    assert wait_state(repo, limited, "failed", timeout=30)["detail"] == \
        "time limit 1s reached"
    wait_state(repo, unlimited, "done")


def test_bad_time_limits_and_retries_are_refused_in_one_line(repo: Path) -> None:
    for args, message in ((["--time", "5x"], "is not a duration"),
                          (["--time", "0"], "is not a duration"),
                          (["--time", "0s"], "must be more than 0"),
                          (["--time", "-1h"], "is not a duration"),
                          (["--time", "90"], "is not a duration"),
                          (["--time", ""], "is not a duration"),
                          (["--retry", "-1"], "give a count from 0 to 1000"),
                          (["--retry", "x"], "is not a valid integer")):
        p = tq(repo, "run", *args, "--", "true", check=False)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    git(repo, "config", "tq.defaultTime", "soon")
    p = tq(repo, "run", "true", check=False)
    assert p.returncode == 1 and "tq.defaultTime" in p.stderr and "soon" in p.stderr
    assert tq(repo, "ls", "-a").stdout.startswith("no jobs")  # nothing was queued


def test_a_retry_succeeds_on_the_second_attempt(repo: Path, tmp_path: Path) -> None:
    (repo / "attempts.py").write_text(ATTEMPTS)
    out = tmp_path / "attempts"
    job = submit(repo, "--cpu", "--retry", "3", "python", "attempts.py", "137,0",
                 env={"OUT": str(out)})
    data = wait_state(repo, job, "done", timeout=30)
    assert out.read_text() == "1\n2\n"  # TQ_ATTEMPT counts on
    assert data["attempt"] == 2 and data["retried"] == 1 and data["retries"] == 3
    lifecycle = show(repo, job)["lifecycle"]
    assert [e["event"] for e in lifecycle] == ["submitted", "started", "retry", "started",
                                               "finished"]
    retry = lifecycle[2]
    assert retry["detail"] == "retry 1 of 3 after exit 137" and retry["exit_code"] == 137
    assert retry["state"] == "pending"
    log = Path(data["log"]).read_text()
    assert "RETRIED: attempt 2" in log


def test_a_retry_decided_after_kill_9_of_the_daemon_is_recorded_once(repo: Path,
                                                                     tmp_path: Path) -> None:
    import psutil

    gate = tmp_path / "gate"
    (repo / "gated.py").write_text(
        "import os, sys, time\n"
        "n = os.environ['TQ_ATTEMPT']\n"
        "open(os.environ['OUT'], 'a').write(n + '\\n')\n"
        "while n == '1' and not os.path.exists(sys.argv[1]):\n"
        "    time.sleep(0.02)\n"
        "sys.exit(3 if n == '1' else 0)\n")
    out = tmp_path / "attempts"
    job = submit(repo, "--cpu", "--retry", "2", "python", "gated.py", str(gate),
                 env={"OUT": str(out)})
    wait_until(out.exists)
    os.kill(daemon_pid(), signal.SIGKILL)
    gate.write_text("")  # attempt 1 fails while no daemon runs
    wait_until(lambda: not any(str(gate) in " ".join(p.info["cmdline"] or [])
                               for p in psutil.process_iter(["cmdline"])))
    assert show(repo, job)["state"] == "running"  # nobody recorded it yet
    tq(repo, "start")
    wait_state(repo, job, "done")
    assert out.read_text() == "1\n2\n"
    assert events(repo, job) == ["submitted", "started", "retry", "started", "finished"]


def test_retries_run_out_and_a_signal_counts(repo: Path, tmp_path: Path) -> None:
    (repo / "attempts.py").write_text(ATTEMPTS)
    out = tmp_path / "attempts"
    job = submit(repo, "--cpu", "--retry", "2", "python", "attempts.py", "kill,3",
                 env={"OUT": str(out)})
    data = wait_state(repo, job, "failed", timeout=30)
    assert out.read_text() == "1\n2\n3\n"  # the first attempt and two retries
    assert data["exit_code"] == 3 and data["retried"] == 2
    details = [e["detail"] for e in show(repo, job)["lifecycle"] if e["event"] == "retry"]
    assert details == ["retry 1 of 2 after signal 9", "retry 2 of 2 after exit 3"]
    plain = submit(repo, "--cpu", "python", "attempts.py", "4", env={"OUT": str(out)})
    assert wait_state(repo, plain, "failed")["exit_code"] == 4  # no --retry: no retry
    assert "retry" not in events(repo, plain)


def test_a_killed_or_timed_out_job_is_not_retried(repo: Path, tmp_path: Path) -> None:
    (repo / "traps.py").write_text(TRAPS_TERM)
    out = tmp_path / "killed"
    killed = submit(repo, "--cpu", "--retry", "3", "python", "traps.py",
                    env={"OUT": str(out)})
    wait_until(lambda: Path(f"{out}.up").exists())
    tq(repo, "kill", "--now", str(killed))
    assert wait_state(repo, killed, "cancelled")["retried"] == 0
    out2 = tmp_path / "timed"
    timed = submit(repo, "--cpu", "--retry", "3", "--time", "1s", "-g", "0", "python",
                   "traps.py", env={"OUT": str(out2)})
    data = wait_state(repo, timed, "failed", timeout=30)
    assert data["event"] == "timed-out" and data["retried"] == 0 and data["attempt"] == 1


def test_a_preempted_job_is_resumed_not_retried(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    # Exits 5 when asked to stop: a failure of the attempt, but one git tq asked for.
    (repo / "exits.py").write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(5))\n"
        "open(os.environ['OUT'] + '.up', 'a').write(os.environ['TQ_ATTEMPT'] + '\\n')\n"
        "while True:\n    time.sleep(0.05)\n")
    out = tmp_path / "victim"
    victim = submit(repo, "-p", "50", "--retry", "3", "python", "exits.py",
                    env={"OUT": str(out)})
    wait_until(lambda: Path(f"{out}.up").exists())
    urgent = submit(repo, "-p", "1", "python", "-c", "print('urgent')")
    wait_state(repo, urgent, "done")
    wait_until(lambda: Path(f"{out}.up").read_text() == "1\n2\n")
    data = show(repo, victim)
    assert "retry" not in events(repo, victim) and data["retried"] == 0
    assert events(repo, victim)[-2:] == ["preempted", "resumed"]
    assert [e["exit_code"] for e in data["lifecycle"] if e["event"] == "preempted"] == [5]
    tq(repo, "kill", "--now", str(victim))
    wait_state(repo, victim, "cancelled")


# --- the records and the pure parts --------------------------------------------------


def test_durations_parse_and_print() -> None:
    assert [parse_duration(t) for t in ("90s", "45m", "2h", "1d12h", " 1H30M ")] == \
        [90, 2700, 7200, 129600, 5400]
    for bad in ("", "5x", "0", "0s", "-1h", "90", "1h1d", "2 h", "1.5h", "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(s) for s in (90, 7200, 5400, 129600, 0)] == \
        ["1m30s", "2h", "1h30m", "1d12h", "0s"]


def _job(**fields: object) -> Job:
    spec = JobSpec(("python", "a.py"), False, 100, 180, None, None, GpuRequest.any(1), "",
                   "2026-12-03T10:00:00+00:00", "u", "h", time_limit=7200, retries=3)
    return Job(7, spec, State.PENDING, "submitted", 0, "a" * 40, None, ChangeSummary(),
               tip="b" * 40).evolve(**fields)


def test_records_keep_the_limits_and_the_time_run() -> None:
    job = _job()
    started = apply_event(job, "started", "2026-12-03T10:00:00+00:00")
    retried = apply_event(started, "retry", "2026-12-03T10:00:30+00:00", exit_code=137,
                          detail="retry 1 of 3 after exit 137")
    assert retried.state is State.PENDING and retried.retried == 1
    assert retried.ran_seconds == 30 and retried.assigned_gpus is None
    again = apply_event(retried, "started", "2026-12-03T11:00:00+00:00")
    assert again.attempt == 2 and again.exit_code is None
    assert again.time_limit_due(None) is None
    eleven = dt.datetime(2026, 12, 3, 11, tzinfo=dt.timezone.utc).timestamp()
    assert again.time_limit_due(7200) == eleven + 7200 - 30  # 11:00 + what is left
    out = apply_event(again, "timed-out", "2026-12-03T12:59:30+00:00",
                      detail="time limit 2h reached", signal=9)
    assert out.state is State.FAILED and out.outcome == "time limit"
    assert out.ran_seconds == 7200
    text = recordfmt.encode(out)
    assert "Tq-Time-Limit: 7200\n" in text and "Tq-Retries: 3\n" in text
    assert "Tq-Ran-Seconds: 7200.0\n" in text and "Tq-Retried: 1\n" in text
    back = recordfmt.decode(text, "c" * 40)
    assert (back.spec.time_limit, back.spec.retries, back.ran_seconds, back.retried) == \
        (7200, 3, 7200.0, 1)
    # A record from before these fields: no limit, no retries, nothing run.
    old = "\n".join(line for line in text.splitlines()
                    if not line.startswith(("Tq-Time-Limit", "Tq-Retries", "Tq-Ran-Seconds",
                                            "Tq-Retried")))
    plain = recordfmt.decode(old, "c" * 40)
    assert (plain.spec.time_limit, plain.spec.retries, plain.ran_seconds, plain.retried) == \
        (None, 0, 0.0, 0)
    for field, bad in (("Time-Limit", "0"), ("Time-Limit", "2h"), ("Retries", "-1"),
                       ("Retries", "100000"), ("Ran-Seconds", "-3"), ("Retried", "x")):
        broken = text.replace(f"Tq-{field}: ", f"Tq-{field}: {bad}\nTq-Ignored: ", 1)
        with pytest.raises(recordfmt.RecordFormatError):
            recordfmt.decode(broken, "c" * 40)


def test_an_edited_time_limit_stops_a_running_job(repo: Path, tmp_path: Path) -> None:
    (repo / "traps.py").write_text(TRAPS_TERM)
    out = tmp_path / "job"
    job = submit(repo, "--cpu", "-g", "1", "python", "traps.py", env={"OUT": str(out)})
    wait_until(lambda: Path(f"{out}.up").exists(), timeout=20)
    assert show(repo, job).get("time_limit") is None
    edited = tq(repo, "edit", str(job), "--time", "1s").stdout
    assert edited == f"job {job}: time none → 1s\n"
    data = wait_state(repo, job, "failed", timeout=30)
    assert data["event"] == "timed-out" and data["detail"] == "time limit 1s reached"
    assert "edited" in events(repo, job)
    # A pending job's limit can go too; an ended job's cannot change.
    p = tq(repo, "edit", str(job), "--time", "none", check=False)
    assert p.returncode != 0 and "has ended" in p.stderr and "Traceback" not in p.stderr
    p = tq(repo, "edit", str(job), "--time", "5x", check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
