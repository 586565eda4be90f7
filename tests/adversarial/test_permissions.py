"""Files git tq writes outside git's object store are private, whatever the umask.

Job logs hold whatever a job printed (tokens, passwords); crash.log holds
arguments and paths; the console history holds typed commands. Files are
0600 and folders 0700 under umask 002 and 022 alike, and looser ones left by
an older version are tightened when written again.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import git, tq, tq_json, wait_until

UMASKS = ["002", "022"]


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tq_umask(repo: Path, umask: str, *args: str) -> str:
    """The real `git tq ARGS`, run (and any daemon it starts) under `umask`."""
    p = subprocess.run(["bash", "-c", f'umask {umask}; exec git tq "$@"', "git-tq", *args],
                       cwd=repo, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def job(repo: Path, job_id: int) -> dict[str, Any]:
    data = tq_json(repo, "show", str(job_id))
    assert isinstance(data, dict)
    return data


def assert_private_tree(top: Path, leaf: Path) -> None:
    """Every folder from `top` down to the folder of `leaf` is 0700, `leaf` is 0600."""
    assert mode(leaf) == 0o600, oct(mode(leaf))
    folder = leaf.parent
    while True:
        assert mode(folder) == 0o700, (str(folder), oct(mode(folder)))
        if folder == top:
            break
        assert top in folder.parents
        folder = folder.parent


@pytest.fixture(autouse=True)
def autostart() -> None:
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")


@pytest.mark.parametrize("umask", UMASKS)
def test_job_logs_and_their_folders_are_private(repo: Path, umask: str) -> None:
    tq_umask(repo, umask, "start")  # the daemon, and so the supervisors, run under it
    j = int(tq_umask(repo, umask, "run", "-q", "--cpu", "--", "echo", "token=s3cret"))
    wait_until(lambda: job(repo, j)["state"] == "done", timeout=30)
    log = Path(job(repo, j)["log"])
    assert "token=s3cret" in log.read_text()
    common = Path(git(repo, "rev-parse", "--git-common-dir").strip())
    if not common.is_absolute():
        common = repo / common
    top = common.resolve() / "tq"
    assert log.resolve().parent == top / "logs"
    assert_private_tree(top, log.resolve())
    daemon_log = Path(os.environ["TQ_HOME"]) / "daemon.log"
    assert mode(daemon_log) == 0o600 and mode(daemon_log.parent) == 0o700

    # catg: the new folders are private, and so is the log in its new place
    filed = Path(tq_umask(repo, umask, "catg", str(j), "archived/secret").split(": ", 1)[1]
                 .strip())
    assert filed.exists() and filed.parent == top / "logs" / "archived" / "secret"
    assert_private_tree(top, filed)

    # a pending job filed before it ran: the empty log catg creates is private too
    tq_umask(repo, umask, "stop")
    git(repo, "config", "tq.autostart", "false")
    pending = int(tq_umask(repo, umask, "run", "-q", "--gpu", "0", "true"))
    early = Path(tq_umask(repo, umask, "catg", str(pending), "early/bird").split(": ", 1)[1]
                 .strip())
    assert_private_tree(top, early)


@pytest.mark.parametrize("umask", UMASKS)
def test_loose_logs_and_folders_are_tightened_when_written(repo: Path, umask: str) -> None:
    tq_umask(repo, umask, "start")
    j = int(tq_umask(repo, umask, "run", "-q", "--cpu", "--", "echo", "hello"))
    wait_until(lambda: job(repo, j)["state"] == "done", timeout=30)
    log = Path(job(repo, j)["log"]).resolve()
    top = log.parent.parent
    # as an older git tq left them
    for folder in (top, log.parent):
        os.chmod(folder, 0o775)
    os.chmod(log, 0o664)
    (log.parent / "old").mkdir(mode=0o775)
    os.chmod(log.parent / "old", 0o775)
    filed = Path(tq_umask(repo, umask, "catg", str(j), "old").split(": ", 1)[1].strip())
    assert filed.parent == log.parent / "old"
    assert_private_tree(top, filed)


def test_the_supervisor_tightens_an_existing_log(repo: Path) -> None:
    """A resumed job's log is opened again for writing: a loose one becomes 0600."""
    from git_tq.home import ensure_log_folder, open_private

    common = repo / ".git"
    log = common / "tq" / "logs" / "deep" / "1-x.log"
    old = subprocess.run([sys.executable, "-c", (
        "import os, sys\nos.umask(0o002)\n"
        "from git_tq.home import ensure_log_folder, open_private\n"
        "ensure_log_folder(sys.argv[1])\nos.close(open_private(sys.argv[1]))\n"), str(log)],
        capture_output=True, text=True)
    assert old.returncode == 0, old.stderr
    assert_private_tree(common / "tq", log)
    os.chmod(log, 0o644)
    os.chmod(log.parent, 0o755)
    ensure_log_folder(str(log))
    os.close(open_private(str(log)))
    assert_private_tree(common / "tq", log)


@pytest.mark.parametrize("umask", UMASKS)
def test_crash_log_is_private(tmp_path: Path, umask: str) -> None:
    """cli._crash, the one place internal errors are written down, in a real process."""
    home = Path(os.environ["TQ_HOME"])
    script = ("import sys\nfrom git_tq.cli import _crash\n"
              "sys.exit(_crash(RuntimeError('boom \\x1b]0;pwned\\x07')))\n")

    def crash() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", f'umask {umask}; exec "$0" -c "$1"',
                               sys.executable, script], capture_output=True, text=True)

    p = crash()
    assert p.returncode == 3 and "internal error" in p.stderr
    assert "\x1b" not in p.stderr and "\\x1b]0;pwned\\x07" in p.stderr
    crash_log = home / "crash.log"
    assert "RuntimeError" in crash_log.read_text()
    assert mode(crash_log) == 0o600 and mode(home) == 0o700
    os.chmod(crash_log, 0o664)  # as an older git tq left it
    crash()
    assert mode(crash_log) == 0o600
    assert crash_log.read_text().count("RuntimeError") >= 2


@pytest.mark.parametrize("umask", UMASKS)
def test_console_history_is_private(repo: Path, umask: str) -> None:
    history = Path(os.environ["TQ_HOME"]) / "console_history"

    def session(line: str) -> None:
        env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "NO_COLOR": "1"}
        child = pexpect.spawn("bash", ["-c", f"umask {umask}; exec git tq"], cwd=str(repo),
                              env=env, encoding="utf-8", timeout=20, dimensions=(50, 160))
        try:
            child.expect(r"\(tq:any\|(ON|OFF)\) >")
            child.send(line)
            child.expect_exact(line)
            child.send("\r")
            child.expect(r"\(tq:any\|(ON|OFF)\) >")
            child.sendline("exit")
            child.expect(pexpect.EOF)
        finally:
            if child.isalive():
                child.terminate(force=True)

    session("pwd")
    assert "pwd" in history.read_text()
    assert mode(history) == 0o600 and mode(history.parent) == 0o700
    os.chmod(history, 0o644)  # as an older git tq left it
    session("use any")
    assert mode(history) == 0o600 and "use any" in history.read_text()


def test_the_folders_above_the_tq_home_are_never_tightened(repo: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # like /tmp: sticky, everyone's
    shared.mkdir()
    shared.chmod(0o1777)
    mine = tmp_path / "loose-home"
    mine.mkdir()
    mine.chmod(0o755)
    for home in (shared / "a" / "b", mine):
        tq(repo, "start", env={"TQ_HOME": str(home)})
        tq(repo, "stop", env={"TQ_HOME": str(home)})
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE((shared / "a").stat().st_mode) == 0o700  # created by us
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700  # a tq home of ours: tightened
