"""Talking to the daemon: its socket protocol (one JSON line each way) and starting it.

Requests are `{"v": 1, "cmd": ...}`; a daemon of another protocol version
answers with an error telling the user to restart it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from git_tq.errors import TqError
from git_tq.gitrepo import clean_git_env
from git_tq.home import Home, connect_private, ensure_private_dir

PROTOCOL = 1


class DaemonNotRunning(TqError):
    pass


def read_line(conn: socket.socket) -> bytes:
    """One message of the protocol: bytes up to a newline (or the peer's close)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def connect(home: Home, timeout: float) -> socket.socket:
    """A connection to the daemon's socket, checked to be served by this user (the
    socket's path comes from the tq home, never from a fixed name in /tmp)."""
    return connect_private(home.socket_path(), timeout)


def request(home: Home, cmd: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
    """Send one request; the reply. Raises DaemonNotRunning if nobody listens, TqError if
    the socket is served by another user."""
    try:
        with connect(home, timeout) as s:
            s.sendall(json.dumps({"v": PROTOCOL, "cmd": cmd, **fields}).encode() + b"\n")
            data = read_line(s)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunning(
            "the git tq daemon is not running: start it with `git tq start`"
        ) from None
    except socket.timeout:
        raise TqError("the git tq daemon does not answer; see `git tq daemon status`") from None
    except OSError as exc:
        raise TqError(f"cannot reach the git tq daemon: {exc}") from None
    try:
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        raise TqError("the git tq daemon gave no answer; restart it (git tq stop; git tq start)"
                      ) from None
    if reply.get("error"):
        raise TqError(str(reply["error"]))
    return reply


def is_running(home: Home) -> bool:
    try:
        request(home, "ping", timeout=2.0)
        return True
    except TqError:
        return False


def spawn(home: Home) -> None:
    """Start a daemon in the background (it exits at once if one already runs)."""
    ensure_private_dir(home.path)
    log = os.open(home.daemon_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(log, 0o600)  # a looser one from before is tightened
    env = dict(clean_git_env(os.environ), TQ_HOME=home.path)
    subprocess.Popen([sys.executable, "-m", "git_tq.daemon", home.path],
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                     start_new_session=True, close_fds=True)
    os.close(log)


def start(home: Home, wait: float = 10.0) -> bool:
    """Start the daemon and wait until it answers; False if one was already running."""
    if is_running(home):
        return False
    spawn(home)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if is_running(home):
            return True
        time.sleep(0.02)
    raise TqError(f"the daemon did not come up within {wait:.0f}s; see {home.daemon_log}")


def nudge(home: Home, autostart: bool, repo: Optional[str] = None,
          jobs: Sequence[int] = ()) -> Optional[str]:
    """Wake the daemon (starting it if allowed); a hint for the user if it is not running.

    The nudge is sent without waiting for the answer: the kernel queues it even while
    the daemon is busy (checking out a big worktree, say), so a submission never
    waits for the daemon's work. A connection that succeeds, to a socket this user
    serves, is proof enough that the daemon lives.
    """
    try:
        with connect(home, 2.0) as s:
            # Naming the repository and the new jobs lets the daemon read just their refs.
            named = {"repo": repo, "jobs": list(jobs)} if repo is not None and jobs else {}
            s.sendall(json.dumps({"v": PROTOCOL, "cmd": "nudge", **named}).encode() + b"\n")
        return None
    except (FileNotFoundError, ConnectionRefusedError):
        if autostart:
            spawn(home)
            return None
        return "the daemon is not running (tq.autostart is false): start it with `git tq start`"
    except TqError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot reach the git tq daemon: {exc}"


def stop(home: Home, wait: float = 10.0) -> bool:
    """Ask the daemon to exit; False if none was running."""
    try:
        request(home, "stop")
    except DaemonNotRunning:
        return False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and is_running(home):
        time.sleep(0.02)
    return True
