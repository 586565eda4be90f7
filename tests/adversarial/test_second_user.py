"""A second real unix user on the machine tries to take over the daemon's socket.

The old fallback for long home paths was a fixed `/tmp/git-tq-<uid>`: another user who
created it first kept the daemon from starting, and one flipping a symlink there could
answer for it. Now the folder is private, chosen by the daemon and recorded in the home.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import tq, wait_until

from adversarial.socketkit import (  # noqa: F401 - fixtures, found by pytest by name
    OtherUser,
    daemon_socket,
    long_home_fixture,
    other_user_fixture,
)

# Keeps flipping symlinks in the folder it owns at the old fixed place: each name a
# client or daemon of the old layout would use points now at its fake daemon, now nowhere.
FLIPPER = r"""
import os, sys
folder, target = sys.argv[1], sys.argv[2]
names = sys.argv[3:]
i = 0
while True:
    for name in names:
        tmp = os.path.join(folder, f".{name}.tmp")
        try:
            os.symlink(target if i % 2 else "/nonexistent", tmp)
            os.replace(tmp, os.path.join(folder, name))
        except OSError:
            pass
    i += 1
    if i == 1:
        open(os.path.join(folder, "flipping"), "w").close()
"""


def snapshot(folder: str) -> dict[str, tuple[int, int]]:
    """Names in `folder` with owner and type bits (symlink targets flip; those don't)."""
    found = {}
    for name in os.listdir(folder):
        if name.startswith("."):
            continue  # the flipper's scratch names come and go
        info = os.lstat(os.path.join(folder, name))
        found[name] = (info.st_uid, stat.S_IFMT(info.st_mode))
    return found


def test_another_user_cannot_block_or_impersonate_the_daemon(
        other_user: OtherUser, long_home: Path, repo: Path) -> None:
    squatted = f"/tmp/git-tq-{os.getuid()}"
    if os.path.lexists(squatted):
        pytest.skip(f"{squatted} already exists; the other user cannot create it first")
    import hashlib

    old_name = hashlib.sha1(os.path.realpath(long_home).encode()).hexdigest()[:16] + ".sock"
    sock, received = other_user.fake_server(squatted)
    wait_until(lambda: os.path.exists(sock))
    other_user.python(FLIPPER, squatted, sock, old_name, "daemon.sock")
    wait_until(lambda: os.path.exists(os.path.join(squatted, "flipping")))
    before = os.lstat(squatted)
    try:
        assert "daemon started" in tq(repo, "start").stdout
        pid = json.loads((long_home / "daemon.json").read_text())["pid"]
        for _ in range(25):
            status = json.loads(tq(repo, "daemon", "status", "--json").stdout)
            assert status["pid"] == pid
            assert status["socket"] == daemon_socket()
            assert not status["socket"].startswith(squatted + "/")
        # the other user's folder is as it left it: its owner, its mode, its entries only
        assert not os.path.exists(received), "nobody of ours ever connected to the fake"
        after = os.lstat(squatted)
        assert (after.st_uid, after.st_mode, after.st_ino) == \
            (before.st_uid, before.st_mode, before.st_ino)
        assert snapshot(squatted) == {
            "fake.sock": (other_user.uid, stat.S_IFSOCK),
            "flipping": (other_user.uid, stat.S_IFREG),
            old_name: (other_user.uid, stat.S_IFLNK),
            "daemon.sock": (other_user.uid, stat.S_IFLNK),
        }
        # and our own folder is private
        folder = os.path.dirname(daemon_socket())
        info = os.lstat(folder)
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert (long_home / "socket-dir").read_text().strip() == folder
    finally:
        for proc in other_user.procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(squatted, ignore_errors=True)


def test_xdg_runtime_dir_is_used_when_private(long_home: Path, repo: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tempfile.mkdtemp(prefix="tqxdg-", dir="/tmp")  # 0700, ours: like /run/user/N
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        tq(repo, "start")
        assert os.path.dirname(daemon_socket()) == runtime
        assert (long_home / "socket-dir").read_text().strip() == runtime
        assert stat.S_IMODE(os.stat(daemon_socket()).st_mode) == 0o600
        assert "running, pid" in tq(repo, "daemon", "status").stdout
        tq(repo, "stop")
        os.chmod(runtime, 0o755)  # not private: not used
        tq(repo, "start")
        folder = os.path.dirname(daemon_socket())
        assert folder != runtime and os.path.basename(folder).startswith("git-tq-")
        assert "running, pid" in tq(repo, "daemon", "status").stdout
    finally:
        subprocess.run(["git", "tq", "stop"], cwd=str(repo), capture_output=True, timeout=30)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_short_home_keeps_its_socket_inside(repo: Path) -> None:
    home = Path(os.environ["TQ_HOME"])
    if len(str(home / "daemon.sock")) > 100:
        pytest.skip("the temporary home is too long here")
    tq(repo, "start")
    assert daemon_socket() == str(home / "daemon.sock")
    assert not (home / "socket-dir").exists()
    assert f"socket: {home / 'daemon.sock'}" in tq(repo, "daemon", "status").stdout
