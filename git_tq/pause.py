"""Holding the queue (`git tq pause`, `git tq resume`): one small file in the tq home.

The pause belongs to the tq home, as the daemon does: it holds the jobs of every
repository that home serves. A GPU's queue is the machine's (the GPUs are), so
`pause --gpu 0` holds every job that would start on GPU 0, whichever repository
queued it. The file is `<home>/paused` (JSON, 0600, written by temp file +
rename under `paused.lock`, absent when nothing is paused), so a pause survives
the daemon's restart, `kill -9` included; the daemon reads it again only when its
stat data changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from git_tq.errors import TqError
from git_tq.home import ensure_private_dir, write_private_file


@dataclass(frozen=True)
class Pause:
    """What is held: the whole queue, or the queues of some GPUs (nothing: not paused).
    `error`: the file could not be read, so everything is held until a resume."""

    everything: bool = False
    gpus: tuple[int, ...] = ()
    since: Optional[str] = None  # when the pause began (ISO 8601)
    error: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.everything or bool(self.gpus)

    def describe(self) -> str:
        """`queue paused since 2026-12-03 10:00`, `GPU 0,1 paused`, or `not paused`."""
        when = f" since {self.since[:16].replace('T', ' ')}" if self.since else ""
        if self.error:
            return f"queue paused ({self.error}; git tq resume clears it)"
        if self.everything:
            return f"queue paused{when}: nothing new starts (git tq resume releases it)"
        if self.gpus:
            ids = ",".join(map(str, self.gpus))
            return (f"GPU {ids} paused{when}: no new job starts there (git tq resume --gpu "
                    f"{ids} releases it)")
        return "not paused"

    def short(self) -> str:
        """`queue paused`, `GPU 0,1 paused`, or `` (not paused)."""
        if self.everything:
            return "queue paused"
        return f"GPU {','.join(map(str, self.gpus))} paused" if self.gpus else ""

    def holds_gpus(self, gpus: Sequence[int]) -> bool:
        """Whether a queue of these GPUs (none: the whole queue) is held."""
        return self.everything or bool(gpus and set(gpus) & set(self.gpus))

    def to_json(self) -> dict[str, Any]:
        return {"paused": self.active, "everything": self.everything,
                "gpus": list(self.gpus), "since": self.since, "error": self.error}


def pause_file(home: str) -> str:
    return os.path.join(home, "paused")


def read(home: str) -> Pause:
    """The pause as recorded in the tq home (not paused when there is no file)."""
    try:
        with open(pause_file(home), encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return Pause()
    except (OSError, ValueError) as exc:
        return Pause(everything=True, error=f"{pause_file(home)} is unreadable: {exc}")
    try:
        gpus = data.get("gpus", [])
        since = data.get("since")
        if not (isinstance(gpus, list) and all(isinstance(g, int) and not isinstance(g, bool)
                                               and 0 <= g < 1000 for g in gpus)
                and isinstance(data.get("everything", False), bool)
                and (since is None or isinstance(since, str))):
            raise TypeError
        return Pause(bool(data.get("everything", False)), tuple(sorted(set(gpus))),
                     None if since is None else since[:40])
    except (AttributeError, TypeError):
        return Pause(everything=True, error=f"{pause_file(home)} is not a pause record")


@contextlib.contextmanager
def _locked(home: str) -> Iterator[None]:
    ensure_private_dir(home)
    fd = os.open(os.path.join(home, "paused.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(home: str, pause: Pause) -> None:
    if not pause.active:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pause_file(home))  # as atomic as a rename
        return
    write_private_file(pause_file(home), json.dumps(
        {"everything": pause.everything, "gpus": list(pause.gpus),
         "since": pause.since}).encode() + b"\n")


def pause(home: str, gpus: Optional[Sequence[int]], now: str) -> tuple[Pause, Pause]:
    """Hold the whole queue (`gpus` None) or these GPUs' queues: (before, after)."""
    with _locked(home):
        before = read(home)
        if gpus is None:
            after = Pause(everything=True, since=before.since if before.everything and
                          not before.error else now)
        elif before.everything:
            after = before  # already held, GPUs and all
        else:
            after = Pause(gpus=tuple(sorted(set(before.gpus) | set(gpus))),
                          since=before.since or now)
        _write(home, after)
    return before, after


def resume(home: str, gpus: Optional[Sequence[int]]) -> tuple[Pause, Pause]:
    """Release the whole queue (`gpus` None) or these GPUs' queues: (before, after).
    Releasing single GPUs of a wholly paused queue is refused (say which to hold
    instead): it would not be clear what stays held."""
    with _locked(home):
        before = read(home)
        if gpus is None:
            after = Pause()
        elif before.everything:
            raise TqError("the whole queue is paused: `git tq resume` releases all of it "
                          "(then `git tq pause --gpu IDS` holds the GPUs that should wait)")
        else:
            left = tuple(g for g in before.gpus if g not in set(gpus))
            after = Pause(gpus=left, since=before.since if left else None)
        _write(home, after)
    return before, after
