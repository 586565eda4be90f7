"""Submitting and running where the surroundings are unusual: a daemon started from a
shell pointed at another repository, failing hooks, folders git does not see, a
repository owned by someone else, Ctrl-C in the middle of a snapshot, and the links
git tq itself places in a job's worktree."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import git, tq, wait_until

from repos.kit import (
    DUMP,
    Scene,
    dump_command,
    git_path,
    job,
    manifest,
    new_repo,
    read_json,
    repo_state,
    state_changes,
    submit,
    wait_finished,
    write,
)


@pytest.fixture
def daemon() -> None:
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    assert "Traceback" not in text
    return lines[0]


def leftovers(top: Path) -> list[str]:
    folder = git_path(top, "index").parent
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("tq-index"))


@pytest.mark.parametrize("how", ["start", "foreground"])
def test_daemon_started_with_git_variables_runs_other_repositories(
        tmp_path: Path, daemon: None, how: str) -> None:
    """GIT_DIR, GIT_WORK_TREE, GIT_INDEX_FILE and GIT_CONFIG_* in the shell that starts
    the daemon (`git tq start`, or `git tq daemon --foreground` as a service manager
    would) point at one repository and change how git checks files out; the daemon
    serves every repository, so none of it may reach their jobs."""
    elsewhere = new_repo(tmp_path / "elsewhere", "sha1")
    repos = []
    for name in ("a", "b"):
        top = new_repo(tmp_path / name, "sha1", {f"{name}.txt": f"only in {name}\n"})
        os.symlink("README", top / "readme-link")  # core.symlinks=false would flatten it
        write(top / "lf.txt", "lf\nonly\n")  # core.autocrlf=true would add CRs
        repos.append(top)
    env = {"GIT_DIR": str(elsewhere / ".git"), "GIT_WORK_TREE": str(elsewhere),
           "GIT_INDEX_FILE": str(elsewhere / ".git" / "index"), "GIT_CONFIG_COUNT": "2",
           "GIT_CONFIG_KEY_0": "core.autocrlf", "GIT_CONFIG_VALUE_0": "true",
           "GIT_CONFIG_KEY_1": "core.symlinks", "GIT_CONFIG_VALUE_1": "false"}
    before = repo_state(elsewhere)
    tqhome = Path(os.environ["TQ_HOME"])
    if how == "start":
        assert "daemon started" in tq(tmp_path, "start", env=env).stdout
    else:
        log = open(tmp_path / "foreground.log", "wb")  # noqa: SIM115 - the daemon's
        subprocess.Popen(["git", "tq", "daemon", "--foreground"], cwd=tmp_path,
                         env={**os.environ, **env}, stdout=log, stderr=log,
                         start_new_session=True)
        wait_until(lambda: tq(tmp_path, "daemon", "status", check=False).returncode == 0,
                   timeout=30, interval=0.1)
    pid = json.loads((tqhome / "daemon.json").read_text())["pid"]
    jobs = []
    for top in repos:
        scene = Scene(top, top)
        target = tmp_path / f"{top.name}.json"
        jobs.append((top, target, manifest(top, top), submit(scene, *dump_command(
            scene, target))[0]))
    for top, target, expected, job_id in jobs:
        wait_finished(top, job_id)
        assert read_json(target) == expected, f"the job of {top.name}"
    assert json.loads((tqhome / "daemon.json").read_text())["pid"] == pid  # that daemon
    assert state_changes({"x": before}, {"x": repo_state(elsewhere)}) == []
    assert git(elsewhere, "for-each-ref", "refs/tq") == ""


def test_a_failing_post_checkout_hook(tmp_path: Path, daemon: None) -> None:
    """The job's own worktree runs no hook of the user's; `git tq checkout` is the
    user's checkout: the hook runs, fails after the work is done, and is named."""
    top = new_repo(tmp_path / "proj", "sha1")
    hooks = tmp_path / "hooks"
    write(hooks / "post-checkout", "#!/bin/sh\necho 'post-checkout: no thanks' >&2\nexit 1\n",
          0o755)
    git(top, "config", "core.hooksPath", str(hooks))
    write(top / "train.py", "print('as submitted')\n")
    ran = tmp_path / "ran"
    job_id, _ = submit(Scene(top, top), "sh", "-c", f"cat train.py > {ran}")
    wait_finished(top, job_id)
    assert ran.read_text() == "print('as submitted')\n"
    git(top, "-c", "core.hooksPath=/dev/null", "checkout", "-q", "--", "train.py")  # clean
    p = tq(top, "checkout", str(job_id), "-b", "best", check=False)
    assert p.returncode == 0, p.stderr
    assert "post-checkout" in one_line(p.stdout + p.stderr)
    submission = job(top, job_id)["snapshot"]
    assert git(top, "rev-parse", "best").strip() == submission
    assert git(top, "symbolic-ref", "HEAD").strip() == "refs/heads/best"
    assert (top / "train.py").read_text() == "print('as submitted')\n"
    p = tq(top, "checkout", str(job_id), "--worktree", str(tmp_path / "wt"), check=False)
    assert p.returncode == 0, p.stderr
    assert "post-checkout" in one_line(p.stdout + p.stderr)
    assert (tmp_path / "wt" / "train.py").read_text() == "print('as submitted')\n"


def test_run_from_an_untracked_empty_folder(tmp_path: Path) -> None:
    top = new_repo(tmp_path / "proj", "sha1")
    (top / "empty").mkdir()
    p = tq(top / "empty", "run", "--cpu", "true", check=False)
    assert p.returncode == 1
    assert "snapshot" in one_line(p.stderr)
    assert git(top, "for-each-ref", "refs/tq/jobs") == ""
    assert leftovers(top) == []


def test_run_from_inside_the_git_dir(tmp_path: Path) -> None:
    top = new_repo(tmp_path / "proj", "sha1")
    for where in (top / ".git", top / ".git" / "refs" / "heads"):
        p = tq(where, "run", "--cpu", "true", check=False)
        assert p.returncode == 1
        assert "work tree" in one_line(p.stderr)
    assert git(top, "for-each-ref", "refs/tq/jobs") == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the repository away")
def test_a_repository_owned_by_another_user(tmp_path: Path, daemon: None) -> None:
    top = new_repo(tmp_path / "proj", "sha1")
    write(top / "train.py", "print('mine now')\n")
    nobody = pwd.getpwnam("nobody")
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, nobody.pw_uid, nobody.pw_gid)
    p = tq(top, "run", "--cpu", "true", check=False)
    assert p.returncode == 1
    assert "dubious ownership" in one_line(p.stderr)
    git(tmp_path, "config", "--global", "--add", "safe.directory", str(top))
    target = tmp_path / "out.json"
    scene = Scene(top, top)
    expected = manifest(top, top)
    job_id, _ = submit(scene, *dump_command(scene, target))
    wait_finished(top, job_id)  # the daemon must not skip the repository
    assert read_json(target) == expected


def big_repo(top: Path, files: int = 20000) -> None:
    top.mkdir(parents=True)
    git(top, "init", "-q")
    for d in range(files // 20):
        folder = top / f"pkg{d:04d}"
        folder.mkdir()
        for f in range(20):
            (folder / f"mod{f:02d}.py").write_text(f"VALUE = {d * f}\n")
    git(top, "add", "-A")
    git(top, "commit", "-qm", "big")
    for i in range(10):
        (top / f"pkg{i:04d}" / "mod00.py").write_text("edited\n")
    (top / "untracked.py").write_text("new\n")


@pytest.mark.slow
def test_ctrl_c_during_a_submission(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole foreground process group, git's children included)
    at different moments of a snapshot of 20,000 files, from the moment its temporary
    index appears: one line, and no temporary index left behind."""
    top = tmp_path / "big"
    big_repo(top)
    index_before = git_path(top, "index").read_bytes()
    interrupted = 0
    for delay in (0, 0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08):
        p = subprocess.Popen(["git", "tq", "run", "--cpu", "true"], cwd=top,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        # The snapshot is under way once its temporary index exists.
        wait_until(lambda p=p: leftovers(top) or p.poll() is not None, timeout=30,
                   interval=0.001)
        time.sleep(delay)  # the stimulus: that many seconds into the snapshot
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
        assert leftovers(top) == [], f"Ctrl-C {delay}s in left a temporary index"
        # Through `git tq`, git itself dies of the signal once git-tq has exited.
        assert p.returncode in (0, 130, -signal.SIGINT), (p.returncode, stderr)
        if p.returncode != 0:
            interrupted += 1
            assert "interrupted" in one_line(stdout + stderr), f"Ctrl-C {delay}s in"
    assert interrupted, "no round was interrupted: the snapshot was too quick to hit"
    assert git_path(top, "index").read_bytes() == index_before


def test_ignored_links_are_not_untracked_in_the_jobs_git(tmp_path: Path, daemon: None) -> None:
    """git tq links the source tree's ignored `data/` and `.env` into the worktree; the
    job's own `git status` must not list them (nor anything else: its tree is its
    commit)."""
    top = new_repo(tmp_path / "proj", "sha1", {".gitignore": "data/\n.env\n"})
    write(top / "data/train.csv", "1,2,3\n")
    write(top / ".env", "SECRET=1\n")
    write(top / "untracked.py", "new\n")
    excludes = tmp_path / "global-excludes"
    excludes.write_text("*.log\n")
    git(top, "config", "--global", "core.excludesFile", str(excludes))
    status = tmp_path / "status.txt"
    job_id, _ = submit(Scene(top, top), "sh", "-c",
                       f"cat data/train.csv > {status}.data; echo job > job.log; "
                       f"git status --porcelain > {status}")
    wait_finished(top, job_id)
    assert Path(f"{status}.data").read_text() == "1,2,3\n"
    assert status.read_text() == ""


def test_the_dump_script_sees_what_the_test_sees(tmp_path: Path) -> None:
    """The manifest the jobs write (the copied script, run as a program) is the one the
    tests take in-process."""
    top = new_repo(tmp_path / "proj", "sha1")
    os.symlink("README", top / "link")
    target = tmp_path / "m.json"
    subprocess.run(["python", DUMP, str(target), str(top)], cwd=top, check=True)
    assert read_json(target) == manifest(top, top)
