"""Shared by the socket tests (imported, not a conftest: this folder is shared): a
throwaway second unix user, a tq home too long for a socket, the daemon's socket."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

SYSTEM_PYTHON = "/usr/bin/python3"

# A fake daemon another user runs: it logs what each connection sent (repr of the bytes,
# one line per connection) and answers a line with a believable status.
FAKE_SERVER = r"""
import json, os, socket, sys
folder, sock_path, log_path = sys.argv[1:4]
os.makedirs(folder, exist_ok=True)
os.chmod(folder, 0o755)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sock_path)
os.chmod(sock_path, 0o777)
srv.listen(64)
fake = {"ok": True, "pid": 4242, "version": "fake", "started": 0, "socket": sock_path,
        "home": "/fake", "repos": [], "counts": {}, "foreign": {}}
while True:
    conn, _ = srv.accept()
    conn.settimeout(5)
    data = b""
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                conn.sendall(json.dumps(fake).encode() + b"\n")
                break
    except OSError:
        pass
    conn.close()
    with open(log_path, "a") as fh:
        fh.write(repr(data) + "\n")
"""


@dataclass
class OtherUser:
    name: str
    uid: int
    gid: int
    home: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *argv: str) -> subprocess.Popen[bytes]:
        """Start a process as this user (real and effective ids, no supplementary groups)."""
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--",
             *argv], cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": self.home},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def python(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        return self.run(SYSTEM_PYTHON, "-c", script, *args)

    def fake_server(self, folder: str, name: str = "fake.sock") -> tuple[str, str]:
        """Run a fake daemon in `folder` (created by this user); its socket and its log."""
        sock, log = os.path.join(folder, name), os.path.join(folder, "received.log")
        self.python(FAKE_SERVER, folder, sock, log)
        return sock, log


def can_add_users() -> str | None:
    if os.geteuid() != 0:
        return "needs root to add a throwaway user"
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing (the other user cannot read our virtualenv)"
    return None


@pytest.fixture(name="other_user")
def other_user_fixture() -> Iterator[OtherUser]:
    """A real second unix user for the duration of one test; removed with its files and
    processes afterwards."""
    reason = can_add_users()
    if reason:
        pytest.skip(reason)
    name = f"tqadv{uuid.uuid4().hex[:10]}"
    p = subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"useradd failed: {p.stderr.strip()}")
    entry = pwd.getpwnam(name)
    user = OtherUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    try:
        yield user
    finally:
        for proc in user.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for proc in psutil.process_iter(["uids"]):  # anything it left, by pid
            try:
                if proc.info["uids"] and proc.info["uids"].real == user.uid:
                    os.kill(proc.pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError):
                continue
        subprocess.run(["userdel", "-r", name], capture_output=True)


@pytest.fixture(name="long_home")
def long_home_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tq home whose path is too long for a unix socket: the daemon's socket lives in a
    private folder it records in the home (no $XDG_RUNTIME_DIR unless a test sets one).
    That folder is removed afterwards, if it is the daemon's own."""
    home = tmp_path / ("h" * 90) / "tqhome"
    monkeypatch.setenv("TQ_HOME", str(home))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert len(str(home / "daemon.sock")) > 100
    yield home
    subprocess.run(["git", "tq", "stop"], cwd=str(tmp_path), capture_output=True, timeout=30)
    record = home / "socket-dir"
    if record.exists():
        folder = record.read_text().strip()
        info = os.lstat(folder) if os.path.lexists(folder) else None
        if info and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and \
                os.path.basename(folder).startswith("git-tq-"):
            shutil.rmtree(folder, ignore_errors=True)


def daemon_socket() -> str:
    """The socket of the daemon of $TQ_HOME, as it recorded it."""
    info = json.loads((Path(os.environ["TQ_HOME"]) / "daemon.json").read_text())
    return str(info["socket"])
