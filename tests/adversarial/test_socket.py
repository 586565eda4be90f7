"""The daemon's socket under attack: malformed, huge, slow and idle clients, random input,
and servers of other users. A real daemon on a real socket; no mocks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from conftest import tq, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adversarial.socketkit import (  # noqa: F401 - fixtures, found by pytest by name
    OtherUser,
    daemon_socket,
    long_home_fixture,
    other_user_fixture,
)
from git_tq import client, supervisor
from git_tq.home import Home

MiB = 1 << 20


def tq_home() -> Home:
    return Home(os.environ["TQ_HOME"])


def exchange(path: str, data: bytes, timeout: float = 15.0) -> bytes:
    """Send raw bytes as a client would (then end our side); what the daemon answers
    before it closes the connection (b"" when it closes without a word)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed on us (a message too large): fine
        reply = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except ConnectionResetError:
            pass
        return reply


def assert_error_or_close(reply: bytes) -> None:
    if reply:
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply[:200]
        answer = json.loads(reply)
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), answer


def assert_daemon_serves(repo: Path, tmp_path: Path) -> None:
    """The daemon answers `daemon status` and `ls`, and still runs a submitted job."""
    assert "running, pid" in tq(repo, "daemon", "status").stdout
    tq(repo, "ls")
    marker = tmp_path / f"ran-{uuid.uuid4().hex[:8]}"
    tq(repo, "run", "-q", "--cpu", "--", "touch", str(marker))
    wait_until(lambda: marker.exists(), timeout=20)


@pytest.fixture
def daemon(repo: Path) -> str:
    """A running daemon for $TQ_HOME; its socket."""
    tq(repo, "start")
    return daemon_socket()


BAD_MESSAGES = {
    "list": b"[]\n",
    "number": b"1\n",
    "string": b'"ping"\n',
    "null": b"null\n",
    "empty-line": b"\n",
    "no-cmd": b'{"v": 1}\n',
    "cmd-not-a-string": b'{"v": 1, "cmd": ["ping"]}\n',
    "unknown-cmd": b'{"v": 1, "cmd": "format-disk"}\n',
    "v-bool": b'{"v": true, "cmd": "ping"}\n',
    "v-other": b'{"v": 2, "cmd": "ping"}\n',
    "kill-without-jobs": b'{"v": 1, "cmd": "kill"}\n',
    "kill-jobs-null": b'{"v": 1, "cmd": "kill", "repo": "/nowhere", "jobs": null}\n',
    "kill-jobs-strings": b'{"v": 1, "cmd": "kill", "repo": "/nowhere", "jobs": ["x"]}\n',
    "kill-jobs-bools": b'{"v": 1, "cmd": "kill", "repo": "/nowhere", "jobs": [true]}\n',
    "kill-jobs-empty": b'{"v": 1, "cmd": "kill", "repo": "/nowhere", "jobs": []}\n',
    "kill-repo-number": b'{"v": 1, "cmd": "kill", "repo": 7, "jobs": [1]}\n',
    "kill-now-string": b'{"v": 1, "cmd": "kill", "repo": "/x", "jobs": [1], "now": "yes"}\n',
    "kill-unknown-repo": b'{"v": 1, "cmd": "kill", "repo": "/nowhere\\u0000", "jobs": [1]}\n',
    "nudge-repo-number": b'{"v": 1, "cmd": "nudge", "repo": 7, "jobs": [1]}\n',
    "nudge-jobs-strings": b'{"v": 1, "cmd": "nudge", "repo": "/x", "jobs": ["1"]}\n',
    "nudge-jobs-negative": b'{"v": 1, "cmd": "nudge", "repo": "/x", "jobs": [-1]}\n',
    "nudge-jobs-without-repo": b'{"v": 1, "cmd": "nudge", "jobs": [1]}\n',
    "nudge-repo-without-jobs": b'{"v": 1, "cmd": "nudge", "repo": "/x"}\n',
    "nested": b"[" * 100_000 + b"\n",
    "nested-objects": b'{"a":' * 100_000 + b"\n",
    "huge-number": b'{"v": 1, "cmd": "kill", "repo": "/x", "jobs": [' + b"9" * 5000 + b"]}\n",
    "invalid-utf8": b'{"v": 1, "cmd": "\xff\xfe\xc3("}\n',
    "utf16": '{"v": 1, "cmd": "ping"}\n'.encode("utf-16"),
    "over-1-MiB": b'{"v": 1, "cmd": "ping", "pad": "' + b"x" * (MiB + 10) + b'"}\n',
    "over-1-MiB-no-newline": b"x" * (MiB + 100_000),
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_a_bad_message_gets_an_error_and_the_daemon_lives(name: str, daemon: str, repo: Path,
                                                          tmp_path: Path) -> None:
    pid = client.request(tq_home(), "ping")["pid"]
    reply = exchange(daemon, BAD_MESSAGES[name])
    assert_error_or_close(reply)
    if name not in ("over-1-MiB", "over-1-MiB-no-newline"):
        assert reply, "a malformed request is answered with an error"
    assert client.request(tq_home(), "ping")["pid"] == pid  # the same daemon: it never died
    assert_daemon_serves(repo, tmp_path)


def test_the_protocol_is_unchanged(daemon: str) -> None:
    assert json.loads(exchange(daemon, b'{"cmd": "nudge"}\n')) == {"ok": True}  # supervisors
    pong = json.loads(exchange(daemon, b'{"v": 1, "cmd": "ping"}\n'))
    assert pong["ok"] is True and pong["pid"] > 0
    # a message ended by the client's close instead of a newline still counts
    assert json.loads(exchange(daemon, b'{"v": 1, "cmd": "ping"}'))["ok"] is True
    old = json.loads(exchange(daemon, b'{"v": 2, "cmd": "ping"}\n'))
    assert "restart it" in old["error"]
    too_big = json.loads(exchange(daemon, b"x" * (MiB + 1) + b"\n"))
    assert "too large" in too_big["error"]
    # a connection that says nothing is closed without an answer
    assert exchange(daemon, b"") == b""


def test_slow_and_idle_clients_delay_nobody(daemon: str, repo: Path) -> None:
    stop = threading.Event()

    def slow_client() -> None:  # one byte a second, connection kept open
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(daemon)
            for byte in b'{"v": 1, "cmd": "status"}\n':
                if stop.wait(1.0):
                    return
                try:
                    s.send(bytes([byte]))
                except OSError:
                    return  # the daemon gave up on us: fine

    slow = threading.Thread(target=slow_client, daemon=True)
    slow.start()
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(s)
            s.setblocking(False)
            wait_until(lambda s=s: s.connect_ex(daemon) == 0)  # EAGAIN: its queue is full
        for _ in range(3):
            p = subprocess.run(["git", "tq", "daemon", "status"], cwd=repo, capture_output=True,
                               text=True, timeout=30)
            assert p.returncode == 0 and "running, pid" in p.stdout, p.stderr
        assert client.request(tq_home(), "ping", timeout=10)["ok"] is True
    finally:
        stop.set()
        for s in idle:
            s.close()
        slow.join(timeout=30)


def test_an_idle_connection_is_closed_at_its_deadline(daemon: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)  # far beyond the daemon's deadline
        s.connect(daemon)
        s.send(b'{"v": 1, "cmd": ')  # and then nothing
        assert s.recv(1) == b""  # closed by the daemon, not by our timeout


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=20)
REQUEST_LIKE = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["ping", "status", "nudge", "kill", "", "Ping"]) | JSON},
    optional={"v": st.sampled_from([1, 2, 0, True, None, "1", 1.0]) | JSON,
              "repo": st.text(max_size=30) | JSON, "jobs": st.lists(st.integers()) | JSON,
              "now": JSON})


def not_a_stop(value: object) -> bool:
    return not (isinstance(value, dict) and value.get("cmd") == "stop")


def line(value: object) -> bytes:
    return json.dumps(value).encode() + b"\n"


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=2048) | JSON.filter(not_a_stop).map(line)
       | REQUEST_LIKE.filter(not_a_stop).map(line))
def test_random_input_leaves_the_daemon_answering(daemon: str, data: bytes) -> None:
    reply = exchange(daemon, data)
    if reply:
        assert isinstance(json.loads(reply), dict)
    assert client.request(tq_home(), "ping", timeout=10)["ok"] is True


# --- servers of other users, socket folders ------------------------------------------------


def test_the_client_refuses_a_server_of_another_user(other_user: OtherUser, repo: Path,
                                                      tmp_path: Path) -> None:
    folder = f"/tmp/tqadv-{uuid.uuid4().hex[:10]}"
    sock, received = other_user.fake_server(folder)
    wait_until(lambda: os.path.exists(sock))
    home = Path(os.environ["TQ_HOME"])
    home.mkdir(mode=0o700)
    (home / "daemon.sock").symlink_to(sock)  # e.g. planted, or a stale link
    try:
        p = tq(repo, "daemon", "status", check=False)
        assert p.returncode == 1
        assert p.stderr == (f"git tq: the socket {home / 'daemon.sock'} is served by uid "
                            f"{other_user.uid}, not by you; refusing\n")
        assert "Traceback" not in p.stdout and "4242" not in p.stdout
        # a supervisor's nudge is not sent there either
        supervisor.nudge(str(home / "daemon.sock"))
        wait_until(lambda: os.path.exists(received) and
                   len(Path(received).read_text().splitlines()) == 2)
        assert Path(received).read_text().splitlines() == ["b''", "b''"]  # nothing sent
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_recorded_socket_folder_that_is_not_ours_is_refused(
        other_user: OtherUser, long_home: Path, repo: Path) -> None:
    folder = f"/tmp/tqadv-{uuid.uuid4().hex[:10]}"
    sock, received = other_user.fake_server(folder, name=tq_home()._socket_name())
    wait_until(lambda: os.path.exists(sock))
    long_home.mkdir(parents=True, mode=0o700)
    link = Path(f"/tmp/tqadv-link-{uuid.uuid4().hex[:10]}")
    link.symlink_to(folder)
    try:
        for recorded in (folder, str(link)):  # another user's folder; a symlink to it
            (long_home / "socket-dir").write_text(recorded + "\n")
            p = tq(repo, "daemon", "status", check=False)
            assert p.returncode == 1 and "Traceback" not in p.stderr
            assert p.stderr == (f"git tq: cannot reach the git tq daemon: the daemon's socket "
                                f"folder {recorded} is not a private folder of this user; "
                                "refusing it\n")
        # our daemon does not use it either: it makes a private folder of its own
        tq(repo, "start")
        mine = Path((long_home / "socket-dir").read_text().strip())
        assert str(mine) not in (folder, str(link))
        info = os.lstat(mine)
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert daemon_socket() == str(mine / tq_home()._socket_name())
        assert "running, pid" in tq(repo, "daemon", "status").stdout
        assert not os.path.exists(received)  # the fake daemon never heard from us
    finally:
        link.unlink()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_recorded_socket_folder_that_went_wrong_is_replaced(long_home: Path,
                                                              repo: Path) -> None:
    tq(repo, "start")
    first = Path((long_home / "socket-dir").read_text().strip())
    assert first.name.startswith("git-tq-") and daemon_socket().startswith(f"{first}/")
    tq(repo, "stop")
    tq(repo, "start")  # a restart reuses the recorded folder while it is sound
    assert Path((long_home / "socket-dir").read_text().strip()) == first
    tq(repo, "stop")
    first.chmod(0o755)  # no longer private
    tq(repo, "start")
    second = Path((long_home / "socket-dir").read_text().strip())
    assert second != first and stat.S_IMODE(os.lstat(second).st_mode) == 0o700
    assert "running, pid" in tq(repo, "daemon", "status").stdout
    tq(repo, "stop")
    shutil.rmtree(first)
    second.rename(first)  # gone; a symlink stands where it was
    second.symlink_to(first)
    try:
        p = tq(repo, "daemon", "status", check=False)
        assert p.returncode == 1 and "not a private folder" in p.stderr
        tq(repo, "start")
        third = Path((long_home / "socket-dir").read_text().strip())
        assert third not in (first, second) and not third.is_symlink()
        assert "running, pid" in tq(repo, "daemon", "status").stdout
    finally:
        second.unlink()
        shutil.rmtree(first)
