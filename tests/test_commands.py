"""The commands that read and edit job records, run as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import git, tq, tq_json

from git_tq.service import Context


def submit(repo: Path, *args: str) -> int:
    return int(tq(repo, "run", "-q", *args).stdout.strip())


def jobs_json(repo: Path, *args: str) -> list[dict[str, Any]]:
    data = tq_json(repo, "ls", *args)
    assert isinstance(data, list)
    return data


def mark(repo: Path, job_id: int, *events: tuple[str, dict[str, Any]]) -> None:
    """Drive lifecycle events through the store, as the daemon will."""
    ctx = Context.open(str(repo))
    for name, fields in events:
        ctx.store.advance(job_id, name, "2026-01-01T00:00:00+00:00", **fields)


START = ("started", {"assigned_gpus": (0,)})
DONE = ("finished", {"exit_code": 0})


# --- run -------------------------------------------------------------------------


def test_run_prints_id_and_summary(repo: Path) -> None:
    (repo / "train.py").write_text("print('v2')\n")
    (repo / "new.txt").write_text("x")
    p = tq(repo, "run", "-p", "10", "-g", "30", "-t", "exp1", "--gpu", "1", "python",
           "train.py", "--lr", "3")
    assert p.stdout.startswith("job 1 queued (priority 10, gpus 1): python train.py --lr 3")
    assert "1 modified, 1 added" in p.stdout
    job = jobs_json(repo)[0]
    assert job["command"] == ["python", "train.py", "--lr", "3"] and job["shell"] is False
    assert (job["priority"], job["grace"], job["tag"], job["gpus"]) == (10, 30, "exp1", [1])
    expected = {"id", "state", "priority", "grace", "tag", "command", "gpus", "env", "cwd",
                "source", "snapshot", "submitted_at", "started_at", "ended_at", "exit_code",
                "attempt", "log", "note", "category"}
    assert expected <= set(job)


def test_options_stop_at_the_first_command_word(repo: Path) -> None:
    submit(repo, "--cpu", "python", "train.py", "-p", "5", "--gpu", "0")
    job = jobs_json(repo)[0]
    assert job["command"] == ["python", "train.py", "-p", "5", "--gpu", "0"]
    assert job["priority"] == 100
    submit(repo, "--cpu", "--", "-weird-name", "x")
    assert jobs_json(repo)[1]["command"] == ["-weird-name", "x"]


def test_defaults_and_shell_strings(repo: Path) -> None:
    submit(repo, "python train.py && echo done")
    job = jobs_json(repo)[0]
    assert job["shell"] is True and job["command"] == ["python train.py && echo done"]
    assert (job["priority"], job["grace"], job["gpu_count"], job["gpus"]) == (100, 180, 1, None)
    submit(repo, "--sh", "echo", "$HOME")
    assert jobs_json(repo)[1]["command"] == ["echo $HOME"]


def test_gpu_default_comes_from_config(repo: Path) -> None:
    git(repo, "config", "tq.gpu", "cpu")
    submit(repo, "true")
    git(repo, "config", "tq.gpu", "any:2")
    submit(repo, "true")
    git(repo, "config", "tq.gpu", "1")
    submit(repo, "true")
    got = [(j["gpus"], j["gpu_count"]) for j in jobs_json(repo)]
    assert got == [(None, 0), (None, 2), ([1], 1)]


def test_env_option(repo: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    submit(repo, "-e", "torch", "--cpu", "true")
    submit(repo, "-e", str(venv), "--cpu", "true")
    assert [j["env"] for j in jobs_json(repo)] == ["torch", str(venv)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "high", "true"], "not a valid integer"),
        (["--cpu"], "Missing argument"),
        (["--cpu", "--", ""], "no command"),
        (["--gpu", "7", "true"], "no GPU 7 on this machine (GPUs: 0,1)"),
        (["--gpu", "x", "true"], "bad GPU list"),
        (["--gpus", "3", "true"], "asked for 3 GPUs, this machine has 2"),
        (["--gpu", "0", "--cpu", "true"], "only one of --gpu, --gpus and --cpu"),
        (["-g", "-5", "true"], "-5"),
        (["-t", "../../etc", "true"], "bad tag"),
        (["-t", "a b", "true"], "bad tag"),
        (["-e", "./no/such/env", "true"], "is not a directory"),
        (["--bogus", "true"], "No such option"),
    ],
)
def test_bad_submissions_fail_cleanly_and_change_nothing(repo: Path, args: list[str],
                                                         message: str) -> None:
    before = git(repo, "for-each-ref")
    p = tq(repo, "run", *args, check=False)
    assert p.returncode in (1, 2), p.stderr
    assert message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert git(repo, "for-each-ref") == before
    assert p.stdout == ""


def test_no_gpus_declared_needs_cpu(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(gpus="")
    p = tq(repo, "run", "true", check=False)
    assert p.returncode == 1 and "no GPUs" in p.stderr and "--cpu" in p.stderr
    assert submit(repo, "--cpu", "true") == 1


def test_bad_tq_gpus_config_is_reported(repo: Path) -> None:
    git(repo, "config", "tq.gpus", "zero")
    p = tq(repo, "run", "true", check=False)
    assert p.returncode == 1 and "tq.gpus" in p.stderr


# --- ls ------------------------------------------------------------------------------


def test_ls_shows_the_active_queue_in_order(repo: Path) -> None:
    a = submit(repo, "-p", "50", "-t", "slow", "python", "a.py")
    b = submit(repo, "-p", "10", "-t", "fast", "python", "b.py")
    c = submit(repo, "-p", "50", "python", "c.py")
    d = submit(repo, "python", "d.py")
    mark(repo, d, START)
    e = submit(repo, "python", "e.py")
    mark(repo, e, START, DONE)
    assert [j["id"] for j in jobs_json(repo)] == [d, b, a, c]
    assert [j["id"] for j in jobs_json(repo, "--all")] == [a, b, c, d, e]
    assert [j["id"] for j in jobs_json(repo, "--state", "done")] == [e]
    assert [j["id"] for j in jobs_json(repo, "-s", "pending,running")] == [a, b, c, d]
    assert [j["id"] for j in jobs_json(repo, "--tag", "fast")] == [b]
    out = tq(repo, "st").stdout.splitlines()
    assert out[0].split() == ["ID", "STATE", "PID", "PRI", "GPUS", "TAG", "COMMAND", "TIME",
                              "NOTE"]
    assert out[1].split()[:4] == [str(d), "running", "100", "0"]
    assert "python b.py" in out[2]


def test_ls_bad_state_and_empty(repo: Path) -> None:
    assert "no active jobs" in tq(repo, "ls").stdout
    p = tq(repo, "ls", "--state", "sleeping", check=False)
    assert p.returncode == 2 and "unknown state 'sleeping'" in p.stderr


# --- show and job references -----------------------------------------------------------


def test_job_references(repo: Path) -> None:
    job_id = submit(repo, "--cpu", "true")
    snapshot = git(repo, "rev-parse", f"refs/tq/jobs/{job_id}").strip()
    mark(repo, job_id, START)
    tip = git(repo, "rev-parse", f"refs/tq/jobs/{job_id}").strip()
    for ref in (str(job_id), f"tq/jobs/{job_id}", f"refs/tq/jobs/{job_id}", snapshot,
                snapshot[:8], tip, f"refs/tq/jobs/{job_id}~1"):
        data = tq_json(repo, "show", ref)
        assert isinstance(data, dict) and data["id"] == job_id, ref
    for bad in ("99", "tq/jobs/99", "HEAD", "nonsense", "-x"):
        p = tq(repo, "show", bad, check=False)
        assert p.returncode in (1, 2) and "Traceback" not in p.stderr, bad
        assert len(p.stderr.strip().splitlines()) == 1


def test_show_has_lifecycle_note_and_log(repo: Path) -> None:
    job_id = submit(repo, "-t", "base", "python", "train.py")
    tq(repo, "note", str(job_id), "baseline")
    mark(repo, job_id, START, ("stopping", {"detail": "preempted by job 9"}),
         ("preempted", {"detail": "preempted by job 9"}), ("resumed", {}), DONE)
    out = tq(repo, "show", str(job_id)).stdout
    for text in ("job 1", "done", "python train.py", "baseline", "tq/logs/1-",
                 "-base.log", "preempted by job 9", "git tq checkout 1"):
        assert text in out
    data = tq_json(repo, "show", "1")
    assert isinstance(data, dict)
    assert [e["event"] for e in data["lifecycle"]] == [
        "submitted", "started", "stopping", "preempted", "resumed", "finished"]
    assert data["attempt"] == 2 and data["exit_code"] == 0
    assert data["log"].startswith(str(repo / ".git" / "tq" / "logs"))


def test_log_category_comes_from_the_log_folder(repo: Path) -> None:
    job_id = submit(repo, "--cpu", "true")
    ctx = Context.open(str(repo))
    name = ctx.store.default_log_name(ctx.store.load(job_id))
    folder = repo / ".git" / "tq" / "logs" / "archived" / "good"
    folder.mkdir(parents=True)
    (folder / name).write_text("log\n")
    data = jobs_json(repo)[0]
    assert data["category"] == "archived/good" and data["log"] == str(folder / name)


# --- log -------------------------------------------------------------------------------


def test_log_lists_jobs_under_their_commits(repo: Path) -> None:
    first = submit(repo, "-t", "v1", "python", "train.py")
    tq(repo, "note", str(first), "first try")
    for i in range(3):
        (repo / "f").write_text(str(i))
        git(repo, "add", "f")
        git(repo, "commit", "-qm", f"change {i}")
    (repo / "train.py").write_text("dirty\n")
    second = submit(repo, "python", "train.py")
    mark(repo, second, START, ("finished", {"exit_code": 2}))
    out = tq(repo, "log").stdout
    lines = out.splitlines()
    assert lines[0].endswith("change 2") or "change 2" in lines[0]
    assert "#2" in lines[1] and "failed exit 2" in lines[1] and "(+1 files differ)" in lines[1]
    assert "2 commits without jobs" in lines[2]
    assert "initial" in lines[3]
    assert "#1" in lines[4] and "[v1]" in lines[4] and "first try" in lines[4]
    data = tq_json(repo, "log")
    assert isinstance(data, list) and [len(e["jobs"]) for e in data] == [1, 0, 0, 1]
    ranged = tq_json(repo, "log", "HEAD~1..HEAD")
    assert isinstance(ranged, list) and len(ranged) == 1
    p = tq(repo, "log", "nosuchbranch", check=False)
    assert p.returncode == 2 and "bad revision" in p.stderr


def test_log_on_unborn_branch(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(commit=False)
    (repo / "a").write_text("a")
    submit(repo, "--cpu", "true")
    out = tq(repo, "log").stdout
    assert "before the first commit" in out and "#1" in out


# --- diff --------------------------------------------------------------------------------


def test_diff_between_jobs_and_against_the_work_tree(repo: Path) -> None:
    (repo / "train.py").write_text("lr = 1\n")
    a = submit(repo, "--cpu", "python", "train.py")
    (repo / "train.py").write_text("lr = 2\n")
    (repo / "extra.py").write_text("new\n")
    b = submit(repo, "--cpu", "python", "train.py")
    out = tq(repo, "diff", str(a), str(b)).stdout
    assert "-lr = 1" in out and "+lr = 2" in out and "extra.py" in out
    stat = tq(repo, "diff", "--stat", str(a), str(b)).stdout
    assert "2 files changed" in stat
    only = tq(repo, "diff", str(a), str(b), "--", "extra.py").stdout
    assert "extra.py" in only and "train.py" not in only
    (repo / "untracked_now.py").write_text("u\n")
    wt = tq(repo, "diff", str(b)).stdout
    assert "untracked_now.py" in wt and "lr = 2" not in wt
    assert tq(repo, "diff", str(b), "--", "train.py").stdout == ""
    p = tq(repo, "diff", "42", check=False)
    assert p.returncode == 1 and "no job 42" in p.stderr


# --- checkout -------------------------------------------------------------------------------


def test_checkout_into_the_work_tree(repo: Path) -> None:
    (repo / "train.py").write_text("job code\n")
    (repo / "README").unlink()
    (repo / "added.py").write_text("added\n")
    job_id = submit(repo, "--cpu", "true")
    git(repo, "checkout", "-q", "--", ".")
    git(repo, "clean", "-qfd")
    (repo / "train.py").write_text("later edit\n")
    p = tq(repo, "checkout", str(job_id), check=False)
    assert p.returncode == 1 and "uncommitted changes" in p.stderr
    assert (repo / "train.py").read_text() == "later edit\n"  # untouched
    tq(repo, "checkout", "--force", str(job_id))
    assert (repo / "train.py").read_text() == "job code\n"
    assert (repo / "added.py").read_text() == "added\n"
    assert not (repo / "README").exists()


def test_checkout_onto_a_branch_and_into_a_worktree(repo: Path, tmp_path: Path) -> None:
    (repo / "train.py").write_text("job code\n")
    job_id = submit(repo, "--cpu", "true")
    git(repo, "checkout", "-q", "--", ".")
    wt = tmp_path / "restored"
    tq(repo, "checkout", str(job_id), "--worktree", str(wt))
    assert (wt / "train.py").read_text() == "job code\n"
    tq(repo, "checkout", str(job_id), "-b", "from-job")
    assert git(repo, "branch", "--show-current").strip() == "from-job"
    assert (repo / "train.py").read_text() == "job code\n"
    assert git(repo, "status", "--porcelain") == ""
    p = tq(repo, "checkout", str(job_id), "--worktree", str(wt), check=False)
    assert p.returncode == 1 and "not empty" in p.stderr


# --- note, rm, purge ---------------------------------------------------------------


def test_note_bad_inputs(repo: Path) -> None:
    submit(repo, "--cpu", "true")
    for args, msg in ((["9", "x"], "no job 9"), (["1"], "empty note"),
                      (["1", "--remove", "x"], "takes no text")):
        p = tq(repo, "note", *args, check=False)
        assert p.returncode in (1, 2) and msg in p.stderr, p.stderr
    assert git(repo, "for-each-ref", "refs/notes") == ""


def test_rm_cancels_pending_jobs(repo: Path) -> None:
    ids = [submit(repo, "--cpu", "true") for _ in range(5)]
    assert tq(repo, "rm", "1,3", "5").stdout.split("\n")[:3] == [
        "job 1 cancelled", "job 3 cancelled", "job 5 cancelled"]
    states = {j["id"]: j["state"] for j in jobs_json(repo, "--all")}
    assert states == {1: "cancelled", 2: "pending", 3: "cancelled", 4: "pending",
                      5: "cancelled"}
    assert ids == [1, 2, 3, 4, 5]


def test_rm_refuses_all_when_one_is_bad(repo: Path) -> None:
    submit(repo, "--cpu", "true")
    running = submit(repo, "--cpu", "true")
    mark(repo, running, START)
    for args, msg in ((["1", "99"], "no job 99"), (["1", str(running)], "git tq kill")):
        p = tq(repo, "rm", *args, check=False)
        assert p.returncode == 1 and msg in p.stderr
        assert jobs_json(repo, "--state", "pending")[0]["id"] == 1


def test_rm_forget_deletes_finished_records(repo: Path) -> None:
    job_id = submit(repo, "--cpu", "true")
    p = tq(repo, "rm", "--forget", str(job_id), check=False)
    assert p.returncode == 1 and "only finished jobs" in p.stderr
    tq(repo, "rm", str(job_id))
    log = Path(jobs_json(repo, "--all")[0]["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("old run\n")
    tq(repo, "rm", "--forget", str(job_id))
    assert git(repo, "for-each-ref", "refs/tq/jobs") == ""
    assert Path(str(log) + ".forgotten").read_text() == "old run\n"  # kept, detached
    assert submit(repo, "--cpu", "true") == 2  # ids are never given twice by this user
    assert not Path(jobs_json(repo)[0]["log"]).exists()


def test_purge(repo: Path) -> None:
    for _ in range(3):
        submit(repo, "--cpu", "true")
    mark(repo, 2, START)
    p = tq(repo, "purge", check=False)  # stdin is not a terminal: refuse without -y
    assert p.returncode == 1 and "without -y" in p.stderr
    assert len(jobs_json(repo, "-s", "pending")) == 2
    assert "2 pending jobs removed" in tq(repo, "purge", "-y").stdout
    assert {j["id"]: j["state"] for j in jobs_json(repo, "--all")} == {
        1: "cancelled", 2: "running", 3: "cancelled"}
    assert "no pending jobs" in tq(repo, "purge", "-y").stdout


def test_purge_gpu_clears_one_queue(repo: Path) -> None:
    """A GPU queue is the jobs that asked for exactly those GPUs, in any order."""
    a = submit(repo, "--gpu", "0", "true")
    b = submit(repo, "--gpu", "1", "true")
    c = submit(repo, "--gpu", "1,0", "true")
    d = submit(repo, "--gpus", "1", "true")
    e = submit(repo, "--cpu", "true")
    f = submit(repo, "--gpu", "0,1", "true")
    assert "no pending jobs in GPU queue 0,1,2" in tq(repo, "purge", "--gpu", "0,1,2").stdout
    assert "2 pending jobs removed: 3, 6" in tq(repo, "purge", "--gpu", "0,1", "-y").stdout
    assert "1 pending jobs removed: 1" in tq(repo, "purge", "--gpu", "0", "-y").stdout
    states = {j["id"]: j["state"] for j in jobs_json(repo, "--all")}
    assert states == {a: "cancelled", b: "pending", c: "cancelled", d: "pending",
                      e: "pending", f: "cancelled"}
    assert "bad GPU list" in tq(repo, "purge", "--gpu", "x", "-y", check=False).stderr
    assert "3 pending jobs removed" in tq(repo, "purge", "-y").stdout  # no option: all


# --- general behaviour -----------------------------------------------------------------------


def test_commands_outside_a_repository(tmp_path: Path) -> None:
    for args in (["ls"], ["show", "1"], ["log"], ["note", "1", "x"], ["rm", "1"]):
        p = tq(tmp_path, *args, check=False)
        assert p.returncode == 1 and "not a git repository" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_short_help_and_version(repo: Path) -> None:
    assert "Usage: git tq" in tq(repo, "-h").stdout
    assert "--priority" in tq(repo, "run", "-h").stdout
    assert "git tq" in tq(repo, "--version").stdout


def test_json_output_is_valid_with_unicode_and_newlines(repo: Path) -> None:
    submit(repo, "--cpu", "echo", "héllo wörld")
    tq(repo, "note", "1", "multi\nline — note")
    data = jobs_json(repo)
    assert data[0]["command"] == ["echo", "héllo wörld"]
    assert data[0]["note"] == "multi\nline — note"
    json.dumps(data)


def test_crash_is_one_line_with_a_log(repo: Path) -> None:
    # A job ref that git cannot read as a commit (points at a blob) must not crash listing.
    blob = git(repo, "hash-object", "-w", "train.py").strip()
    git(repo, "update-ref", "refs/tq/jobs/3", blob)
    p = tq(repo, "ls", "--all", check=False)
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 1
    assert os.environ["TQ_HOME"]
