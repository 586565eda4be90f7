"""Removing a job's worktree never follows a symlink the job planted in its place.

A job that replaces its worktree directory with a symlink to another
directory holding a copied `.git` file once had `git worktree remove --force`
empty that directory when it ended. Now only the registered real directory
is removed: a link is unlinked, a foreign directory is left alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import git, tq, tq_json, wait_until

from git_tq.gitrepo import registered_worktree, remove_worktree

# The job: copy its worktree's `.git` file into the decoy, move its worktree away,
# put a symlink to the decoy in its place, say so, and wait for the test's go.
SWAP = """\
set -e
wt="$TQ_WORKTREE"
cp "$wt/.git" "$DECOY/.git"
mv "$wt" "$MOVED"
ln -s "$DECOY" "$wt"
touch "$READY"
while [ ! -e "$GO" ]; do sleep 0.02; done
exit "$CODE"
"""


@pytest.fixture(autouse=True)
def autostart() -> None:
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")


def fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `folder` (not following links): its mode and content hash."""
    found = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(dirpath, name)
            st = path.lstat()
            data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            found[str(path.relative_to(folder))] = (st.st_mode,
                                                    hashlib.sha256(data).hexdigest())
    return found


def make_decoy(root: Path) -> Path:
    decoy = root / "decoy"
    (decoy / "data").mkdir(parents=True)
    (decoy / "precious.txt").write_text("years of work\n")
    (decoy / "data" / "weights.bin").write_bytes(os.urandom(4096))
    return decoy


def job(repo: Path, job_id: int) -> dict[str, Any]:
    data = tq_json(repo, "show", str(job_id))
    assert isinstance(data, dict)
    return data


def swap_job(repo: Path, tmp_path: Path, decoy: Path, name: str, code: int
             ) -> tuple[int, Path, Path]:
    """Submit the swapping job; wait until it has swapped. Its id, link and go file."""
    (repo / "swap.sh").write_text(SWAP)
    ready, go = tmp_path / f"{name}.ready", tmp_path / f"{name}.go"
    env = {"DECOY": str(decoy), "MOVED": str(tmp_path / f"{name}.moved"),
           "READY": str(ready), "GO": str(go), "CODE": str(code)}
    j = int(tq(repo, "run", "-q", "--cpu", "sh", "swap.sh", env=env).stdout)
    wait_until(ready.exists, timeout=30)
    links = list((Path(os.environ["TQ_HOME"]) / "worktrees").glob(f"*/{j}"))
    assert len(links) == 1 and links[0].is_symlink()
    return j, links[0], go


def test_the_daemon_removes_only_the_link(repo: Path, tmp_path: Path) -> None:
    decoy = make_decoy(tmp_path / "outside")
    j, link, go = swap_job(repo, tmp_path, decoy, "daemon", 0)
    before = fingerprint(decoy)
    assert ".git" in before  # the copied .git file that fooled git worktree remove
    go.touch()
    wait_until(lambda: job(repo, j)["state"] == "done", timeout=30)
    # the daemon's clean-up after the ending: the link goes (or the decoy changes)
    wait_until(lambda: not os.path.lexists(link) or fingerprint(decoy) != before, timeout=30)
    assert fingerprint(decoy) == before
    assert not os.path.lexists(link)
    assert (tmp_path / "daemon.moved" / "swap.sh").exists()  # moved away: not ours to touch
    # git no longer lists the worktree (pruned)
    assert str(link) not in git(repo, "worktree", "list", "--porcelain")
    tq(repo, "gc")
    assert fingerprint(decoy) == before


def test_gc_removes_only_the_link(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.keepWorktrees", "true")  # a failed job keeps its worktree
    decoy = make_decoy(tmp_path / "outside")
    j, link, go = swap_job(repo, tmp_path, decoy, "gc", 3)
    before = fingerprint(decoy)
    go.touch()
    wait_until(lambda: job(repo, j)["state"] == "failed", timeout=30)
    assert link.is_symlink()  # kept for gc
    assert "removed 1 worktree" in tq(repo, "gc").stdout
    assert fingerprint(decoy) == before
    assert not os.path.lexists(link)
    assert str(link) not in git(repo, "worktree", "list", "--porcelain")


def test_gc_never_lists_a_folder_behind_a_symlink(repo: Path, tmp_path: Path) -> None:
    """The repository's worktrees folder itself replaced by a link: gc deletes nothing."""
    tq(repo, "run", "-q", "--cpu", "true")
    wait_until(lambda: job(repo, 1)["state"] == "done", timeout=30)
    worktrees = Path(os.environ["TQ_HOME"]) / "worktrees"
    wait_until(lambda: not list(worktrees.glob("*/*")))
    tq(repo, "stop")
    decoy = make_decoy(tmp_path / "outside")
    (decoy / "7").mkdir()
    (decoy / "7" / "keep.txt").write_text("mine\n")
    before = fingerprint(decoy)
    [folder] = list(worktrees.iterdir())
    folder.rmdir()
    folder.symlink_to(decoy)
    tq(repo, "gc")
    assert fingerprint(decoy) == before


def test_remove_worktree_rules(repo: Path, tmp_path: Path) -> None:
    """The function itself: a registered worktree goes, anything else only loses its link."""
    common = str((repo / ".git").resolve())
    real = tmp_path / "wt" / "1"
    git(repo, "worktree", "add", "-q", "--detach", str(real))
    assert registered_worktree(common, str(real)) == str(real.resolve())
    # a symlink to it is not it
    link = tmp_path / "wt" / "link"
    link.symlink_to(real)
    assert registered_worktree(common, str(link)) is None
    assert remove_worktree(common, str(link)) == "unlinked"
    assert real.is_dir() and not os.path.lexists(link)
    # a foreign directory with a copied .git file is left alone
    foreign = make_decoy(tmp_path / "foreign")
    (foreign / ".git").write_bytes((real / ".git").read_bytes())
    before = fingerprint(foreign)
    assert registered_worktree(common, str(foreign)) is None
    assert remove_worktree(common, str(foreign)) == "left"
    assert fingerprint(foreign) == before
    # the registered one goes, and git forgets it; links inside are not followed
    (real / "data").symlink_to(foreign)
    assert remove_worktree(common, str(real)) == "removed"
    assert not os.path.lexists(real) and fingerprint(foreign) == before
    assert str(real) not in git(repo, "worktree", "list", "--porcelain")
    assert remove_worktree(common, str(real)) == "absent"
