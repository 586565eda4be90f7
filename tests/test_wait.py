"""`git tq wait`, `git tq run --wait`, and job ranges in the commands that take several jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from conftest import GIT_TQ, git, tq, tq_json, wait_until


def submit(repo: Path, *args: str) -> int:
    return int(tq(repo, "run", "-q", "--cpu", *args).stdout.strip())


def show(repo: Path, job_id: int) -> dict[str, Any]:
    data = tq_json(repo, "show", str(job_id))
    assert isinstance(data, dict)
    return data


def states(repo: Path) -> dict[int, str]:
    data = tq_json(repo, "ls", "--all")
    assert isinstance(data, list)
    return {j["id"]: j["state"] for j in data}


def one_line_error(p: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("git tq: "), p.stderr
    assert text in p.stderr and "Traceback" not in p.stderr


def test_wait_reports_each_job_that_did_not_succeed(repo: Path) -> None:
    ok = submit(repo, "true")
    bad = submit(repo, "--", "sh", "-c", "exit 3")
    gone = submit(repo, "true")
    tq(repo, "rm", str(gone))  # cancelled before the daemon ever saw it
    p = tq(repo, "wait", str(gone), check=False)  # already ended: at once, no daemon hint
    assert p.returncode == 1 and p.stderr == f"job {gone} cancelled\n"
    tq(repo, "start")
    assert tq(repo, "wait", str(ok)).stderr == ""
    p = tq(repo, "wait", str(ok), f"{bad},{gone}", check=False)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"job {bad} failed (exit 3)", f"job {gone} cancelled"]
    p = tq(repo, "wait", str(bad), str(ok), "--timeout", "5", "--json", check=False)
    assert p.returncode == 1
    assert [(j["id"], j["state"], j["exit_code"]) for j in json.loads(p.stdout)] == [
        (bad, "failed", 3), (ok, "done", 0)]


def test_wait_timeout_exits_124_and_the_job_goes_on(repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "go"
    job = submit(repo, "--", "sh", "-c", f"while [ ! -e {marker} ]; do sleep 0.05; done")
    p = tq(repo, "wait", "--timeout", "0.3", str(job), check=False)  # no daemon: a hint
    assert p.returncode == 124
    assert "the daemon is not running" in p.stderr
    assert p.stderr.splitlines()[-1] == f"git tq: timed out after 0.3s: job {job} still pending"
    tq(repo, "start")
    wait_until(lambda: show(repo, job)["state"] == "running")
    p = tq(repo, "wait", "--timeout", "0.3", "--json", str(job), check=False)
    assert p.returncode == 124 and f"job {job} still running" in p.stderr
    assert "daemon" not in p.stderr
    assert [j["state"] for j in json.loads(p.stdout)] == ["running"]
    marker.write_text("")
    assert tq(repo, "wait", "--timeout", "20", str(job)).returncode == 0


def test_ranges_in_rm_kill_and_wait(repo: Path) -> None:
    ids = [submit(repo, "true") for _ in range(6)]
    assert ids == [1, 2, 3, 4, 5, 6]
    assert tq(repo, "rm", "2-3").stdout.splitlines() == ["job 2 cancelled", "job 3 cancelled"]
    assert tq(repo, "kill", "5-6").stdout == "stopping jobs 5, 6\n"
    assert states(repo) == {1: "pending", 2: "cancelled", 3: "cancelled", 4: "pending",
                            5: "cancelled", 6: "cancelled"}
    p = tq(repo, "rm", "1-2", check=False)  # all or nothing: 2 is not pending
    assert p.returncode == 1 and "job 2 is cancelled" in p.stderr
    assert states(repo)[1] == "pending"
    tq(repo, "start")
    assert tq(repo, "wait", "1,4").returncode == 0
    p = tq(repo, "wait", "1-6", check=False)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"job {i} cancelled" for i in (2, 3, 5, 6)]
    tq(repo, "rm", "--forget", "2-3", "5")
    data = tq_json(repo, "wait", "1-5")  # a range names the jobs of it that exist
    assert isinstance(data, list) and [j["id"] for j in data] == [1, 4]
    assert tq(repo, "rm", "--log", "-y", "1-4").stdout.count("deleted ") == 2


def test_bad_ranges_and_unknown_jobs_are_one_line_errors(repo: Path) -> None:
    submit(repo, "true")
    for cmd in (["rm"], ["rm", "--log", "-y"], ["kill"], ["wait"], ["gc"]):
        one_line_error(tq(repo, *cmd, "5-3", check=False), 2, "bad job range '5-3'")
    for cmd in (["rm", "--forget"], ["wait"]):
        one_line_error(tq(repo, *cmd, "1-999999999", check=False), 2, "more than")
    one_line_error(tq(repo, "wait", "7-9", check=False), 1, "no job in range 7-9")
    one_line_error(tq(repo, "wait", "99", check=False), 1, "no job 99")
    one_line_error(tq(repo, "wait", "1", "nosuchtag", check=False), 1, "nosuchtag")
    one_line_error(tq(repo, "wait", "--timeout", "-1", "1", check=False), 2, "--timeout")
    assert states(repo) == {1: "pending"}


def test_wait_refuses_a_fetched_job(repo: Path, make_repo: Any, tmp_path: Path) -> None:
    other = make_repo("other")
    submit(other, "true")
    # a second tq home owns `other`'s local records; ours never saw them
    Path(os.environ["TQ_HOME"]).rename(tmp_path / "other-home")
    git(repo, "fetch", "-q", str(other), "refs/tq/jobs/*:refs/tq/jobs/*")
    one_line_error(tq(repo, "wait", "1", check=False), 1, "never runs here")


def test_run_wait_exits_with_the_jobs_status(repo: Path) -> None:
    tq(repo, "start")
    p = tq(repo, "run", "--wait", "-q", "--cpu", "true")
    assert (p.returncode, p.stdout, p.stderr) == (0, "1\n", "")
    p = tq(repo, "run", "--cpu", "--wait", "--", "sh", "-c", "exit 3", check=False)
    assert p.returncode == 3 and p.stdout.startswith("job 2 queued")
    assert p.stderr == "job 2 failed (exit 3)\n"
    p = tq(repo, "run", "--wait", "--cpu", "--", "sh", "-c", "kill -KILL $$", check=False)
    assert p.returncode == 128 + signal.SIGKILL and p.stderr == "job 3 failed (signal 9)\n"
    p = tq(repo, "run", "--wait", "--cpu", "no-such-command-xyz", check=False)
    assert p.returncode == 1 and p.stderr == "job 4 failed (not started)\n"
    # the `-- make test` form: the job's own words after `--`
    assert tq(repo, "run", "--wait", "--cpu", "--", "true", "--wait").stdout.endswith(
        "job 5 done\n")
    assert show(repo, 5)["command"] == ["true", "--wait"]


def test_ctrl_c_in_run_wait_leaves_the_job_queued(repo: Path, tmp_path: Path) -> None:
    assert GIT_TQ
    tq(repo, "start")
    marker = tmp_path / "go"
    out = tmp_path / "out"
    with open(out, "w") as fh:
        proc = subprocess.Popen(
            [GIT_TQ, "run", "--wait", "--cpu", "--", "sh", "-c",
             f"while [ ! -e {marker} ]; do sleep 0.05; done"],
            cwd=repo, stdout=fh, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "job 1 queued" in out.read_text())
        wait_until(lambda: show(repo, 1)["state"] == "running")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err == "git tq: interrupted: job 1 stays queued (git tq wait 1 waits again; " \
                  "git tq kill 1 stops it)\n"
    assert show(repo, 1)["state"] == "running"
    marker.write_text("")
    assert tq(repo, "wait", "1").returncode == 0
