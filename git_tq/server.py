"""The daemon's request server: connections, limits, deadlines, request schema.

The daemon's socket serves one request per connection: one JSON line in, one
JSON line out, then close. Every connection is non-blocking and lives in the
daemon's selector loop with its own buffer and deadline, so a slow, idle or
hostile client never delays another:

- a peer of another uid is answered "permission denied" and closed at once;
- a message may be at most `MAX_MESSAGE` bytes (an error, then close);
- a connection lives at most `DEADLINE` seconds from its accept;
- at most `MAX_CONNECTIONS` are open at once: a new one beyond that closes the
  oldest (which is the nearest its deadline anyway), so clients that hold
  connections open cannot lock anyone out;
- every request is checked against the schema (`check_request`) before the
  daemon sees it, and nothing a request raises leaves `RequestServer`: the
  daemon's loop lives on, the client gets `{"error": ...}`.

The request handler runs on the loop's thread (the daemon's state and git refs
are touched from one thread only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from git_tq.home import peer_uid

log = logging.getLogger("git-tq-daemon")

MAX_MESSAGE = 1 << 20  # bytes in one request line
DEADLINE = 5.0  # seconds a connection may live, from its accept
MAX_CONNECTIONS = 256
COMPLAINTS_PER_MINUTE = 20  # bad requests logged a minute; the rest are counted
COMMANDS = frozenset({"ping", "nudge", "status", "kill", "stop"})

Handler = Callable[[dict[str, Any]], Mapping[str, Any]]


class BadRequest(ValueError):
    """A request that does not follow the protocol; its text is the reply's error."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, (str, int, float)) or value is None \
        else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def check_request(req: object, protocol: int) -> dict[str, Any]:
    """`req` if it is a valid request of `protocol`, else BadRequest saying why.

    A JSON object; `v` absent or the protocol number; `cmd` one of COMMANDS; for
    `kill`: `repo` a string, `jobs` a non-empty list of job numbers (ints, not
    bools, above 0), `now` a bool if present; for `nudge`, optionally `repo` and
    `jobs` (a list of job numbers, maybe empty): what changed. Other fields are ignored.
    """
    if not isinstance(req, dict):
        raise BadRequest("a request must be a JSON object")
    if "v" in req:
        v = req["v"]
        if not _is_int(v):
            raise BadRequest(f"v must be the protocol number, not {_show(v)}")
        if v != protocol:
            raise BadRequest(f"the running daemon speaks protocol {protocol}; "
                             "restart it (git tq stop; git tq start)")
    cmd = req.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise BadRequest(f"unknown request {_show(cmd)}")
    if cmd == "nudge" and ("repo" in req or "jobs" in req):
        named = req.get("jobs")
        if not isinstance(req.get("repo"), str):
            raise BadRequest("nudge: repo must be a string")
        if not isinstance(named, list) or len(named) > 100_000 or \
                not all(_is_int(j) and 0 < j <= 10**18 for j in named):
            raise BadRequest("nudge: jobs must be a list of job numbers")
    if cmd == "kill":
        if not isinstance(req.get("repo"), str):
            raise BadRequest("kill: repo must be a string")
        jobs = req.get("jobs")
        if not isinstance(jobs, list) or not jobs or \
                not all(_is_int(j) and j > 0 for j in jobs):
            raise BadRequest("kill: jobs must be a non-empty list of job numbers")
        if not isinstance(req.get("now", False), bool):
            raise BadRequest("kill: now must be true or false")
    return req


def parse_request(line: bytes, protocol: int) -> dict[str, Any]:
    """One request line (UTF-8 JSON) checked against the schema; BadRequest if not."""
    try:
        req = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, nesting too deep
        raise BadRequest("malformed request: not one line of UTF-8 JSON") from None
    return check_request(req, protocol)


@dataclass(eq=False)
class Connection:
    """One client's connection: what it sent so far, what we still have to send."""

    sock: socket.socket
    deadline: float  # time.monotonic() after which it is closed
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""


class RequestServer:
    """The listening socket and its connections, inside the daemon's selector.

    `ready(key, events)` services any key whose data is this server or one of its
    connections (`owns(key)`); `next_deadline()` belongs in the select timeout and
    `expire()` after each select.
    """

    def __init__(self, listener: socket.socket, sel: selectors.BaseSelector,
                 handle: Handler, protocol: int, *, deadline: float = DEADLINE,
                 max_connections: int = MAX_CONNECTIONS,
                 max_message: int = MAX_MESSAGE) -> None:
        self.listener = listener
        self.sel = sel
        self.handle = handle
        self.protocol = protocol
        self.deadline = deadline
        self.max_connections = max_connections
        self.max_message = max_message
        # In accept order, which is deadline order: the first one expires first.
        self.conns: dict[socket.socket, Connection] = {}
        self._window, self._logged, self._suppressed = time.monotonic(), 0, 0
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, self)

    def owns(self, key: selectors.SelectorKey) -> bool:
        return key.data is self or isinstance(key.data, Connection)

    def ready(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data is self:
            self.accept()
            return
        conn = key.data
        assert isinstance(conn, Connection)
        try:
            if events & selectors.EVENT_READ and not conn.outbox:
                self._read(conn)
            elif events & selectors.EVENT_WRITE:
                self._write(conn)
        except Exception:  # one connection's trouble must never reach the daemon's loop
            log.exception("request connection failed")
            self.close(conn)

    def next_deadline(self) -> Optional[float]:
        """The monotonic time at which the oldest connection expires, if any."""
        first = next(iter(self.conns.values()), None)
        return None if first is None else first.deadline

    def expire(self) -> None:
        now = time.monotonic()
        while self.conns:
            first = next(iter(self.conns.values()))
            if first.deadline > now:
                return
            log.debug("closing a connection past its deadline")
            self.close(first)

    def close(self, conn: Connection) -> None:
        if self.conns.pop(conn.sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn.sock)
        conn.sock.close()

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.listener)

    # --- inside ----------------------------------------------------------------------

    def accept(self) -> None:
        for _ in range(self.max_connections):  # then back to the loop: others' turn
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: try again on the next wake
                log.warning("cannot accept a connection: %s", exc)
                return
            try:
                sock.setblocking(False)
                uid = peer_uid(sock)
            except OSError:
                sock.close()
                continue
            if uid != os.getuid():
                log.warning("refused a connection from uid %d", uid)
                with contextlib.suppress(OSError):
                    sock.send(b'{"error": "permission denied"}\n')
                sock.close()
                continue
            while len(self.conns) >= self.max_connections:
                oldest = next(iter(self.conns.values()))
                log.warning("too many connections: closing the oldest")
                self.close(oldest)
            conn = Connection(sock, time.monotonic() + self.deadline)
            self.conns[sock] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Connection) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        start = len(conn.inbox)
        conn.inbox += chunk
        end = conn.inbox.find(b"\n", start)
        if end < 0 and len(conn.inbox) <= self.max_message:
            if chunk:
                return  # more to come
            if not conn.inbox:
                self.close(conn)  # closed without a word
                return
            end = len(conn.inbox)  # the peer's shutdown ends its message
        if end > self.max_message or (end < 0 and len(conn.inbox) > self.max_message):
            self._complain("request over %d bytes refused", self.max_message)
            self._answer(conn, {"error": f"request too large (over {self.max_message} "
                                         "bytes)"})
            return
        line = bytes(conn.inbox[:end])
        self._answer(conn, self._serve(line))

    def _complain(self, fmt: str, *args: object) -> None:
        """Log a bad request, at most COMPLAINTS_PER_MINUTE a minute: a flood of them
        must not fill the disk with daemon.log."""
        now = time.monotonic()
        if now - self._window > 60:
            if self._suppressed:
                log.warning("%d more bad requests were not logged", self._suppressed)
            self._window, self._logged, self._suppressed = now, 0, 0
        if self._logged < COMPLAINTS_PER_MINUTE:
            self._logged += 1
            log.warning(fmt, *args)
        else:
            self._suppressed += 1

    def _serve(self, line: bytes) -> Mapping[str, Any]:
        try:
            req = parse_request(line, self.protocol)
        except BadRequest as exc:
            self._complain("bad request: %s", exc)
            return {"error": str(exc)}
        try:
            return self.handle(req)
        except Exception as exc:
            log.exception("request %r failed", req.get("cmd"))
            return {"error": f"the daemon failed on this request: {exc}"}

    def _answer(self, conn: Connection, reply: Mapping[str, Any]) -> None:
        try:
            data = json.dumps(reply).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            log.error("unserialisable reply: %s", exc)
            data = b'{"error": "the daemon could not encode its reply"}\n'
        conn.inbox = bytearray()
        conn.outbox = data
        self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)  # most replies go out at once

    def _write(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the client left without reading
            self.close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self.close(conn)
