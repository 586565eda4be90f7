"""Processes: identity that survives pid reuse, and stopping whole process trees (psutil).

A process is named by (pid, start time), never by a bare pid: a restarted
daemon must not signal a stranger that happens to reuse a job's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass
from typing import Optional

import psutil

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcessId:
    pid: int
    started: float  # psutil create_time()

    @classmethod
    def of(cls, pid: int) -> Optional[ProcessId]:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def alive(self) -> bool:
        try:
            p = psutil.Process(self.pid)
            return bool(abs(p.create_time() - self.started) < 0.01) and \
                p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def process(self) -> Optional[psutil.Process]:
        try:
            p = psutil.Process(self.pid)
            return p if abs(p.create_time() - self.started) < 0.01 else None
        except psutil.Error:
            return None


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to us (Linux), so none escapes the tree."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def descendants(root: ProcessId) -> list[psutil.Process]:
    proc = root.process()
    if proc is None:
        return []
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False if the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def signal_tree(job: ProcessId, pgid: int, sig: int,
                reaper: Optional[ProcessId] = None) -> None:
    """`sig` to the job's process group, the job, and every descendant of the job
    (and of `reaper`, the supervisor that adopts escaped orphans), even those that
    left the group."""
    signal_group(pgid, sig)
    targets = descendants(job) + (descendants(reaper) if reaper else [])
    jp = job.process()
    if jp is not None:
        targets.append(jp)
    for p in targets:
        if reaper is not None and p.pid == reaper.pid:
            continue
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def terminate(job: ProcessId, pgid: int, reaper: Optional[ProcessId] = None) -> None:
    signal_tree(job, pgid, signal.SIGTERM, reaper)


def kill(job: ProcessId, pgid: int, reaper: Optional[ProcessId] = None) -> None:
    signal_tree(job, pgid, signal.SIGKILL, reaper)
