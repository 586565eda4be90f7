"""Job worktrees end to end: what a job writes is never lost, links reach empty ignored
folders, and jobs taken out of the queue leave no worktree behind. Real daemon, real jobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import git, tq, wait_until
from test_daemon import WAITER, job, submit, wait_state


@pytest.fixture(autouse=True)
def autostart() -> None:
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")


def worktree_of(repo: Path, job_id: int) -> Path:
    found = list((Path(os.environ["TQ_HOME"]) / "worktrees").glob(f"*/{job_id}"))
    assert len(found) == 1, found
    return found[0]


def registered(repo: Path) -> set[str]:
    """The real paths `git worktree list` shows, the main work tree aside."""
    out = git(repo, "worktree", "list", "--porcelain")
    paths = {os.path.realpath(ln[len("worktree "):]) for ln in out.splitlines()
             if ln.startswith("worktree ")}
    return paths - {os.path.realpath(repo)}


def job_paths(ids: list[int]) -> set[str]:
    root = Path(os.environ["TQ_HOME"]) / "worktrees"
    return {os.path.realpath(p) for i in ids for p in root.glob(f"*/{i}")}


def test_files_a_job_writes_keep_its_worktree(repo: Path) -> None:
    (repo / ".gitignore").write_text("*.log\ndata/\n.env\n")
    (repo / "data").mkdir()
    (repo / "data" / "in.csv").write_text("1\n")
    (repo / ".env").write_text("X=1\n")
    writer = submit(repo, "--cpu", "sh", "-c",
                    "mkdir -p results && echo '{}' > results/run.json && echo 2 > results/b.txt"
                    " && echo v2 > README && echo noise > run.log && echo x > data/out.csv"
                    " && rm train.py")
    quiet = submit(repo, "--cpu", "sh", "-c", "echo only-ignored > run.log; rm README")
    committer = submit(repo, "--cpu", "git", "commit", "-q", "--allow-empty", "-m", "result")
    wait_state(repo, writer, "done")
    wait_state(repo, quiet, "done")
    wait_state(repo, committer, "done")
    # Kept (once the daemon has looked, right after recording the ending), or removed.
    wait_until(lambda: job(repo, writer)["kept_worktree"] and job(repo, committer)["kept_worktree"])
    # Commits on the worktree's detached HEAD would be lost with it too.
    assert "moved the worktree's detached HEAD to" in job(repo, committer)["kept_reason"]
    # A job that wrote only ignored files (and deleted one) loses nothing: its worktree goes.
    wait_until(lambda: not job_paths([quiet]))
    path = worktree_of(repo, writer)
    assert (path / "results" / "run.json").read_text() == "{}\n"
    assert (repo / "data" / "out.csv").exists()  # through the link, into the source tree
    data = job(repo, writer)
    assert data["kept_worktree"] == str(path)
    reason = data["kept_reason"]
    assert reason.startswith("kept: the job wrote 3 files that are not ignored: ")
    assert "results/run.json" in reason and "README" in reason and ".log" not in reason
    assert job(repo, quiet)["kept_worktree"] is None
    text = tq(repo, "show", str(writer)).stdout
    assert f"worktree   {path}  (kept: the job wrote 3 files" in text
    # Durable: a new daemon neither removes it nor forgets why it is there.
    tq(repo, "stop")
    tq(repo, "start")
    wait_state(repo, submit(repo, "--cpu", "true"), "done")
    assert path.is_dir() and job(repo, writer)["kept_worktree"] == str(path)
    p = tq(repo, "rm", "--forget", str(writer), check=False)
    assert p.returncode == 1 and "gc --kept" in p.stderr
    out = tq(repo, "gc").stdout
    assert "removed 0 worktrees" in out and f"job {writer}: {path} kept: the job wrote" in out
    assert path.is_dir()
    assert "removed 1 worktree" in tq(repo, "gc", "--kept", str(writer)).stdout
    assert not path.exists() and str(path) not in registered(repo)
    assert job(repo, writer)["kept_worktree"] is None


def test_gc_keeps_what_a_failed_job_wrote(repo: Path) -> None:
    git(repo, "config", "tq.keepWorktrees", "true")
    clean = submit(repo, "--cpu", "sh", "-c", "exit 1")
    wrote = submit(repo, "--cpu", "sh", "-c", "echo 0.5 > loss.txt; exit 2")
    wait_state(repo, clean, "failed")
    wait_state(repo, wrote, "failed")
    kept = worktree_of(repo, wrote)  # tq.keepWorktrees: the daemon leaves both
    out = tq(repo, "gc").stdout
    assert "removed 1 worktree" in out and "kept: the job wrote 1 file that is not ignored: " \
        "loss.txt" in out
    assert kept.is_dir() and job(repo, wrote)["kept_worktree"] == str(kept)
    assert "removed 1 worktree" in tq(repo, "gc", "--kept").stdout
    assert not kept.exists()


def test_an_empty_ignored_folder_is_linked(repo: Path) -> None:
    (repo / ".gitignore").write_text("results/\n")
    (repo / "results").mkdir()  # empty: the job is to fill it
    j = submit(repo, "--cpu", "sh", "-c", "echo done > results/kept.txt")
    wait_state(repo, j, "done")
    assert (repo / "results" / "kept.txt").read_text() == "done\n"
    wait_until(lambda: not job_paths([j]))  # the link is not the job's writing: removed
    assert job(repo, j)["kept_worktree"] is None


def test_jobs_taken_out_of_the_queue_leave_no_worktree(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    (repo / "wait.py").write_text(WAITER)
    gate = tmp_path / "gate"
    blocker = submit(repo, "python", "wait.py", str(gate))
    wait_state(repo, blocker, "running")
    waiting = [submit(repo, "true") for _ in range(5)]
    # The daemon checks out the next two waiting jobs' worktrees ahead of their turn.
    wait_until(lambda: job_paths(waiting[:2]) <= registered(repo) and
               len(job_paths(waiting[:2])) == 2)
    tq(repo, "rm", str(waiting[0]))
    wait_until(lambda: registered(repo) == job_paths([blocker, *waiting[1:3]]))
    tq(repo, "kill", str(waiting[1]))
    wait_until(lambda: registered(repo) == job_paths([blocker, *waiting[2:4]]))
    # Taken out while no daemon runs: the next one removes it.
    tq(repo, "stop")
    tq(repo, "rm", str(waiting[2]))
    tq(repo, "start")
    wait_until(lambda: registered(repo) == job_paths([blocker, waiting[3], waiting[4]]))
    tq(repo, "purge", "-y")
    wait_until(lambda: registered(repo) == job_paths([blocker]))
    assert not job_paths(waiting)
    gate.write_text("0")
    wait_state(repo, blocker, "done")
    wait_until(lambda: not registered(repo))


def test_a_checkout_under_way_for_a_cancelled_job_is_removed_when_done(
        repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    (repo / "wait.py").write_text(WAITER)
    # A slow checkout: the smudge filter (the user's own setting) takes its time.
    (repo / ".gitattributes").write_text("*.bin filter=slow\n")
    (repo / "weights.bin").write_text("w\n")
    git(repo, "config", "filter.slow.smudge", "sleep 1.5; cat")
    git(repo, "config", "filter.slow.clean", "cat")
    gate = tmp_path / "gate"
    blocker = submit(repo, "python", "wait.py", str(gate))
    wait_state(repo, blocker, "running")
    gone = submit(repo, "true")
    wait_until(lambda: job_paths([gone]))  # `git worktree add` has begun
    tq(repo, "rm", str(gone))
    wait_until(lambda: registered(repo) == job_paths([blocker]) and not job_paths([gone]))
    admin = repo / ".git" / "worktrees"
    assert len(list(admin.iterdir())) == 1  # no half-made worktree left registered
    gate.write_text("0")
    wait_state(repo, blocker, "done")
