"""Repositories git tq cannot use say why in one line: no traceback, nothing changed."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git, tq


def one_clean_line(p: subprocess.CompletedProcess[str]) -> str:
    err = p.stderr.strip()
    assert p.returncode == 1, (p.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err
    return err


def test_a_newline_in_the_repository_path_is_refused_in_one_line(tmp_path: Path) -> None:
    repo = tmp_path / "new\nline" / "repo"
    repo.mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "a.py").write_text("print(1)\n")
    for args in (["run", "--cpu", "true"], ["ls"]):
        assert "newline" in one_clean_line(tq(repo, *args, check=False))
    assert git(repo, "for-each-ref", "refs/tq/") == ""


@pytest.fixture
def outsider() -> Iterator[tuple[int, int, Path]]:
    """The uid and gid of `nobody`, with a HOME of its own."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="tq-outsider-"))
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    yield nobody.pw_uid, nobody.pw_gid, home
    shutil.rmtree(home, ignore_errors=True)


def test_a_user_who_cannot_write_the_repository_is_told_so(
        outsider: tuple[int, int, Path]) -> None:
    uid, gid, home = outsider
    root = Path(tempfile.mkdtemp(prefix="tq-rootowned-"))
    try:
        os.chmod(root, 0o755)
        repo = root / "repo"
        repo.mkdir()
        git(repo, "init", "-q")
        (repo / "a.py").write_text("print(1)\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "base")
        os.chmod(repo, 0o755)
        # This interpreter's folder, and the system's: not the caller's private ones.
        env = {"HOME": str(home), "PATH": os.path.dirname(sys.executable)
               + ":/usr/local/bin:/usr/bin:/bin", "TQ_HOME": str(home / "tq"),
               "GIT_CONFIG_NOSYSTEM": "1", "NO_COLOR": "1"}
        probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                                "git-tq", "--version"], env=env, capture_output=True)
        if probe.returncode != 0:
            pytest.skip("the other user cannot run this git-tq (its folders are private)")
        subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                        "git", "config", "--global", "--add", "safe.directory", str(repo)],
                       env=env, check=True)
        before = git(repo, "for-each-ref")
        p = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                            "git-tq", "run", "--cpu", "true"], cwd=repo, env=env,
                           capture_output=True, text=True)
        assert "permission denied" in one_clean_line(p).lower()
        assert git(repo, "for-each-ref") == before
        assert not list((repo / ".git").glob("tq-index*"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
