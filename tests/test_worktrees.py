"""Job worktrees end to end: what a job writes is never lost, links reach empty ignored
folders, and jobs taken out of the queue leave no worktree behind. Real daemon, real jobs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import git, open_gate, show, submit, tq, tq_json, wait_state, wait_until
from test_daemon import WAITER

# Here `git tq run` starts the daemon, as it does for users.
pytestmark = pytest.mark.usefixtures("autostart")


def worktree_of(repo: Path, job_id: int) -> Path:
    found = list((Path(os.environ["TQ_HOME"]) / "worktrees").glob(f"*/{job_id}"))
    assert len(found) == 1, found
    return found[0]


def registered(repo: Path) -> set[str]:
    """The real paths `git worktree list` shows, the main work tree and the daemon's
    spare worktree (checked out ahead for the next job) aside."""
    out = git(repo, "worktree", "list", "--porcelain")
    paths = {os.path.realpath(ln[len("worktree "):]) for ln in out.splitlines()
             if ln.startswith("worktree ")}
    spare = os.path.realpath(Path(os.environ["TQ_HOME"]) / "spare")
    return {p for p in paths - {os.path.realpath(repo)} if not p.startswith(spare + os.sep)}


def job_paths(ids: list[int]) -> set[str]:
    root = Path(os.environ["TQ_HOME"]) / "worktrees"
    return {os.path.realpath(p) for i in ids for p in root.glob(f"*/{i}")}


def test_what_a_job_writes_is_recorded_and_only_what_is_not_keeps_its_worktree(
        repo: Path) -> None:
    (repo / ".gitignore").write_text("*.log\ndata/\n.env\n")
    (repo / "data").mkdir()
    (repo / "data" / "in.csv").write_text("1\n")
    (repo / ".env").write_text("X=1\n")
    git(repo, "config", "tq.outputs.maxFileSize", "1k")
    writer = submit(repo, "--cpu", "sh", "-c",
                    "mkdir -p results && echo '{}' > results/run.json && echo 2 > results/b.txt"
                    " && echo v2 > README && echo noise > run.log && echo x > data/out.csv"
                    " && rm train.py")
    big = submit(repo, "--cpu", "sh", "-c", "echo small > s.txt; head -c 4096 /dev/zero > "
                 "model.pt; head -c 2048 /dev/zero > opt.pt")
    committer = submit(repo, "--cpu", "git", "commit", "-q", "--allow-empty", "-m", "result")
    for j in (writer, big, committer):
        wait_state(repo, j, "done")
    # What the writer wrote is in git, so nothing keeps its worktree.
    wait_until(lambda: not job_paths([writer]))
    tip = f"refs/tq/jobs/{writer}"
    assert git(repo, "show", f"{tip}:results/run.json") == "{}\n"
    assert git(repo, "show", f"{tip}:README") == "v2\n"
    assert git(repo, "show", f"{tip}:train.py") == "print('v1')\n"  # deletions: not outputs
    assert (repo / "data" / "out.csv").exists()  # through the link, into the source tree
    assert show(repo, writer)["kept_worktree"] is None
    # Files over the limits are not recorded: they keep the worktree, named.
    wait_until(lambda: show(repo, big)["kept_worktree"] and show(repo, committer)["kept_worktree"])
    assert "moved the worktree's detached HEAD to" in show(repo, committer)["kept_reason"]
    path = worktree_of(repo, big)
    data = show(repo, big)
    assert data["kept_worktree"] == str(path) and (path / "model.pt").stat().st_size == 4096
    assert data["kept_reason"] == ("kept: 2 outputs over the tq.outputs limits were not "
                                   "recorded in git: model.pt, opt.pt")
    assert git(repo, "show", f"refs/tq/jobs/{big}:s.txt") == "small\n"
    assert "[git tq] not recorded in git, kept on disk: model.pt (4.0 KiB, over " \
        "tq.outputs.maxFileSize), opt.pt (2.0 KiB, over tq.outputs.maxFileSize)" in \
        tq(repo, "view", str(big)).stdout
    text = tq(repo, "show", str(big)).stdout
    assert f"worktree   {path}  (kept: 2 outputs over" in text
    # Durable: a new daemon neither removes it nor forgets why it is there.
    tq(repo, "stop")
    tq(repo, "start")
    wait_state(repo, submit(repo, "--cpu", "true"), "done")
    assert path.is_dir() and show(repo, big)["kept_worktree"] == str(path)
    p = tq(repo, "rm", "--forget", str(big), check=False)
    assert p.returncode == 1 and "gc --outputs" in p.stderr
    out = tq(repo, "gc").stdout
    assert "removed 0 worktrees" in out and f"job {big}: {path} kept: 2 outputs" in out
    assert path.is_dir()
    assert "removed 1 worktree" in tq(repo, "gc", "--outputs", str(big)).stdout
    assert not path.exists() and str(path) not in registered(repo)
    assert show(repo, big)["kept_worktree"] is None


def test_gc_keeps_what_a_failed_job_wrote_only_when_git_does_not_have_it(repo: Path) -> None:
    git(repo, "config", "tq.keepWorktrees", "true")
    git(repo, "config", "tq.outputs.maxTotal", "10")
    clean = submit(repo, "--cpu", "sh", "-c", "exit 1")
    wrote = submit(repo, "--cpu", "sh", "-c", "echo 0.5 > loss.txt; exit 2")
    over = submit(repo, "--cpu", "sh", "-c", "echo 0123456789abcdef > big.txt; exit 2")
    for j in (clean, wrote, over):
        wait_state(repo, j, "failed")
    kept = worktree_of(repo, over)  # tq.keepWorktrees: the daemon leaves all three
    out = tq(repo, "gc").stdout
    assert "removed 2 worktrees" in out and "kept: 1 output over the tq.outputs limits was " \
        "not recorded in git: big.txt" in out
    assert git(repo, "show", f"refs/tq/jobs/{wrote}:loss.txt") == "0.5\n"
    assert kept.is_dir() and show(repo, over)["kept_worktree"] == str(kept)
    assert "removed 1 worktree" in tq(repo, "gc", "--kept").stdout  # the older name works
    assert not kept.exists()


def test_an_empty_ignored_folder_is_linked(repo: Path) -> None:
    (repo / ".gitignore").write_text("results/\n")
    (repo / "results").mkdir()  # empty: the job is to fill it
    j = submit(repo, "--cpu", "sh", "-c", "echo done > results/kept.txt")
    wait_state(repo, j, "done")
    assert (repo / "results" / "kept.txt").read_text() == "done\n"
    wait_until(lambda: not job_paths([j]))  # the link is not the job's writing: removed
    assert show(repo, j)["kept_worktree"] is None


def test_every_tq_link_path_is_linked(repo: Path) -> None:
    """`tq.link` may be given many times (each an untracked or ignored path of the source
    tree); a path outside it is never linked."""
    (repo / ".gitignore").write_text("data/\nckpt/\n")  # not in the snapshot
    for name in ("data", "ckpt"):
        (repo / name).mkdir()
        (repo / name / "x").write_text(name)
    git(repo, "config", "tq.linkIgnored", "false")  # only what tq.link names
    for value in ("data", "ckpt/", "../outside"):
        git(repo, "config", "--add", "tq.link", value)
    j = submit(repo, "--cpu", "sh", "-c", "cat data/x ckpt/x > both; ls -d ../outside || true")
    wait_state(repo, j, "done")
    assert git(repo, "show", f"refs/tq/jobs/{j}:both") == "datackpt"


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
    open_gate(gate, "0")
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
    # (two slow checkouts may be under way: the job's and the daemon's spare worktree)
    wait_until(lambda: registered(repo) == job_paths([blocker]) and not job_paths([gone]),
               timeout=30)
    admin = repo / ".git" / "worktrees"
    spare = str(Path(os.environ["TQ_HOME"]) / "spare")
    jobs_admin = [d for d in admin.iterdir() if spare not in (d / "gitdir").read_text()]
    assert len(jobs_admin) == 1  # no half-made worktree left registered
    open_gate(gate, "0")
    wait_state(repo, blocker, "done")


def recycled(repo: Path) -> int:
    data = tq_json(repo, "daemon", "status")
    assert isinstance(data, dict)
    return int(data["stats"]["worktrees_recycled"])


def queue_behind_a_blocker(repo: Path, tmp_path: Path, messy: str) -> tuple[Path, int, int]:
    """One slot, held by a job that waits, then leaves its worktree in the state `messy`
    makes; behind it three jobs with other code. When it ends, the first starts, the
    second was prepared ahead, and the third is made out of its worktree if that can be
    recycled. Returns the folder where the three wrote what they saw, the messy job and
    the last one."""
    git(repo, "config", "tq.cpuSlots", "1")
    settle_config(repo)
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "wait.py").write_text(WAITER)
    release = tmp_path / "release"
    messy_job = submit(repo, "--cpu", "sh", "-c", f"python wait.py {release} && {messy}")
    wait_until(lambda: (tmp_path / "release.started").exists())
    marks = tmp_path / "marks"
    marks.mkdir()
    last = 0
    for n in range(3):
        (repo / "README").write_text(f"version {n}\n")
        (repo / f"added{n}.txt").write_text(f"{n}\n")
        last = submit(repo, "--cpu", "sh", "-c",
                      f"ls -A > {marks}/listing{n}; cat README train.py > {marks}/content{n}")
    open_gate(release, "0")
    wait_state(repo, last, "done")
    return marks, messy_job, last


def settle_config(repo: Path) -> None:
    """Date the config files back: the daemon recycles only worktrees checked out under
    settings it can tell apart from later ones (a file changed within the last clock
    tick cannot be)."""
    old = time.time() - 60
    for path in (repo / ".git" / "config", Path(os.environ["HOME"]) / ".gitconfig"):
        if path.exists():
            os.utime(path, (old, old))


def test_a_finished_jobs_worktree_is_recycled_into_exactly_the_next_jobs_code(
        repo: Path, tmp_path: Path) -> None:
    marks, messy, last = queue_behind_a_blocker(
        repo, tmp_path, "echo junk > run.log && echo new > untracked.txt && echo v9 > README"
        " && rm train.py && mkdir -p cache && echo c > cache/x.log")
    assert recycled(repo) >= 1
    assert show(repo, messy)["state"] == "done"
    # Each job saw its own code, whole, and nothing a job before it left.
    for n in range(3):
        assert (marks / f"content{n}").read_text() == f"version {n}\nprint('v1')\n"
        listing = set((marks / f"listing{n}").read_text().split())
        assert listing == {".git", ".gitignore", "README", "train.py", "wait.py",
                           *(f"added{i}.txt" for i in range(n + 1))}
    assert git(repo, "show", f"refs/tq/jobs/{messy}:README") == "v9\n"  # its outputs kept
    wait_until(lambda: not job_paths([messy, last]))


def test_a_worktree_whose_index_hides_a_change_is_never_recycled(
        repo: Path, tmp_path: Path) -> None:
    # assume-unchanged makes git status and a checkout trust a file as it is.
    marks, messy, last = queue_behind_a_blocker(
        repo, tmp_path, "git update-index --assume-unchanged README && echo tampered > README")
    assert show(repo, messy)["state"] == "done"
    log = (Path(os.environ["TQ_HOME"]) / "daemon.log").read_text()
    assert f"job {messy} in {repo / '.git'}: worktree not recycled (index entries marked " \
        "assume-unchanged or skip-worktree)" in log
    assert (marks / "content2").read_text() == "version 2\nprint('v1')\n"
