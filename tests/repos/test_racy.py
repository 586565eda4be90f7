"""An edit made in the same second as the last index write ("racily clean") is in the
snapshot.

git trusts a file's stat data only when the file is older than the index; a file
whose mtime is not before the index's is compared by content. A snapshot taken
on a copy of the index with a new mtime would trust the stale stat data and run
the old code. Each test also takes that naive snapshot, to prove the round set
the trap.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import git

from repos.kit import (
    Scene,
    git_path,
    job,
    new_repo,
    out,
    submit,
    wait_finished,
    write,
)

EDIT = "echo 'lr = 0.2' > config.py; git commit -qam 'lr 0.2'; echo 'lr = 0.9' > config.py"


def naive_config(top: Path) -> str:
    """config.py as `git add -A` records it into a copy of the index with a new mtime."""
    index = git_path(top, "index")
    copy = index.parent / "naive-index"
    shutil.copyfile(index, copy)  # a fresh mtime, unlike git tq's copy
    env = {"GIT_INDEX_FILE": str(copy), "GIT_OPTIONAL_LOCKS": "0"}
    try:
        git(top, "-c", "core.hooksPath=/dev/null", "add", "-A", env=env)
        return git(top, "show", ":config.py", env=env)
    finally:
        copy.unlink()


def snapshot_config(top: Path, job_id: int) -> str:
    return git(top, "show", f"refs/tq/jobs/{job_id}:config.py")


def next_second() -> int:
    """Wait for a wall-clock second boundary (the condition itself, not a daemon's
    progress) and return the second that starts."""
    now = time.time()
    # File times come from the kernel's coarse clock, a tick behind time.time().
    time.sleep(math.ceil(now) - now + 0.02)
    return int(time.time())


def set_trap(top: Path, second: int) -> bool:
    """The issue's edit; whether it all happened in `second`: the mtime and ctime the
    index recorded for config.py, the file's own, and the index's mtime."""
    subprocess.run(["sh", "-c", EDIT], cwd=top, check=True)
    st = os.stat(top / "config.py")
    ix = os.stat(git_path(top, "index"))
    debug = out(top, "ls-files", "--debug", "config.py")
    recorded = [int(ln.split()[1].split(":")[0]) for ln in debug.splitlines()
                if ln.strip().startswith(("ctime:", "mtime:"))]
    return {int(st.st_mtime), int(st.st_ctime), int(ix.st_mtime), *recorded} == {second}


def test_racy_edit_quick_rounds(tmp_path: Path) -> None:
    """20 rounds in one repository without waiting: the file and the index are dated
    into the same (past) second with os.utime; core.trustctime=false because a ctime
    cannot be set."""
    top = new_repo(tmp_path / "proj", "sha1", {"config.py": "lr = 0.1\n"})
    git(top, "config", "core.trustctime", "false")
    cfg, index = top / "config.py", git_path(top, "index")
    past = int(time.time()) - 1000
    for i in range(20):
        write(cfg, "lr = 0.1\n")
        git(top, "commit", "-qam", "base", "--allow-empty")
        write(cfg, "lr = 0.2\n")
        os.utime(cfg, (past + i, past + i))
        git(top, "commit", "-qam", "lr 0.2")  # the index records mtime past+i
        write(cfg, "lr = 0.9\n")  # same size, same inode
        os.utime(cfg, (past + i, past + i))
        os.utime(index, (past + i, past + i))  # ... and the index was written then
        assert naive_config(top) == "lr = 0.2\n", f"round {i}: the trap is not set"
        job_id, _ = submit(Scene(top, top), "true")
        assert snapshot_config(top, job_id) == "lr = 0.9\n", f"round {i}"


@pytest.mark.slow  # the real clock, ~11 s (test_racy_edit_quick_rounds is quick)
def test_racy_edit_real_clock(tmp_path: Path) -> None:
    """The issue's steps with the real clock, 20 rounds (one per repository, so that
    several share each second and the test waits ~2 s in all), the last one run by
    the daemon."""
    repos = [new_repo(tmp_path / f"r{i:02d}", "sha1", {"config.py": "lr = 0.1\n"})
             for i in range(20)]
    pending = list(repos)
    last_second = 0
    while pending:
        second = next_second()
        for top in list(pending):
            if time.time() - second > 0.6:
                break  # leave the rest for the next second
            if set_trap(top, second):
                pending.remove(top)
                last_second = second
    while time.time() < last_second + 1.2:  # "after >1 s", a wall-clock condition
        time.sleep(0.05)
    for top in repos[:-1]:
        assert naive_config(top) == "lr = 0.2\n", f"{top.name}: the trap is not set"
        job_id, _ = submit(Scene(top, top), "true")
        assert snapshot_config(top, job_id) == "lr = 0.9\n", top.name
    top = repos[-1]
    assert naive_config(top) == "lr = 0.2\n"
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")
    seen = tmp_path / "seen.txt"
    job_id, _ = submit(Scene(top, top), "sh", "-c", f"cat config.py > {seen}",
                       options=("-p", "1"))  # before the others' jobs
    wait_finished(top, job_id)
    assert snapshot_config(top, job_id) == "lr = 0.9\n"
    assert seen.read_text() == "lr = 0.9\n"


@pytest.mark.slow
def test_racy_edit_rounds_in_one_repository(tmp_path: Path) -> None:
    """The issue's steps verbatim, 20 rounds in one repository (about 2 s each)."""
    top = new_repo(tmp_path / "proj", "sha1", {"config.py": "lr = 0.1\n"})
    rounds = 0
    while rounds < 20:
        subprocess.run(["sh", "-c", "echo 'lr = 0.1' > config.py && git add config.py && "
                        "git commit -qm base --allow-empty"], cwd=top, check=True)
        second = next_second()
        if not set_trap(top, second):
            continue  # crossed a second boundary: not the race; again
        while time.time() < second + 2.05:  # "after >1 s"
            time.sleep(0.05)
        assert naive_config(top) == "lr = 0.2\n", f"round {rounds}: the trap is not set"
        job_id, _ = submit(Scene(top, top), "true")
        assert snapshot_config(top, job_id) == "lr = 0.9\n", f"round {rounds}"
        assert out(top, "rev-parse", "HEAD") == job(top, job_id)["source"]
        rounds += 1
