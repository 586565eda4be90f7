"""What every part of the daemon shares: its logger, and `DaemonBase`, which
declares (and sets up) every instance attribute of the daemon, so that each part (a
mixin class in its own file, listed in the package's docstring) sees them all.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from git_tq import pause as pausing
from git_tq.errors import NO_SPACE, NoSpace
from git_tq.gitrepo import free_space
from git_tq.home import Home, RunFiles
from git_tq.localjobs import LocalJobs
from git_tq.model import Job
from git_tq.store import Stamp

if TYPE_CHECKING:
    from git_tq.daemon.repostate import RepoState
    from git_tq.daemon.worktrees import Checkout, Spare

log = logging.getLogger("git-tq-daemon")

ROOM_MARGIN = 64 << 10  # free bytes beyond what a failed start needed (or had) to try again


@dataclass(frozen=True)
class NoRoom:
    """A start that failed for want of space: the job stays pending, out of the plan (so
    that it neither fails again each cycle nor preempts anyone for a start that cannot
    happen) until its filesystem has room again."""

    path: str  # a folder on the filesystem that was full
    free: int  # bytes free there when the start failed
    needed: int  # bytes the start needs there (a worktree's files); 0 when not known
    reason: str  # why it waits, for `ls` (waiting.json)

    def room_again(self) -> bool:
        """Whether to try again: the space it needs is free, or (not knowing what it
        needs) more than when it failed, with a margin; or the folder cannot be looked
        at."""
        free = free_space(self.path)
        return free is None or free >= (self.needed or self.free) + ROOM_MARGIN


class DaemonBase:
    """The daemon's state: every instance attribute, declared here with its type."""

    socket_file: str  # the socket's path (`Daemon.acquire` sets it)

    def __init__(self, home: Home) -> None:
        self.home = home
        self.lock_fd: Optional[int] = None
        self.server: Optional[socket.socket] = None
        self.stopping = False
        self.dirty = True
        self.warned: set[tuple[str, str]] = set()  # (repository, tip) already reported
        self.ledgers: dict[str, LocalJobs] = {}  # per repository, read incrementally
        self.hooks: list[subprocess.Popen[bytes]] = []
        self.last_foreign: dict[int, str] = {}
        self.last_probe: set[tuple[int, int]] = set()
        self.next_deadline: Optional[float] = None
        self.gpus_in_use = False
        self.started_at = time.time()
        self.counts: dict[str, int] = {}
        self.cleanup: list[tuple[RepoState, Job]] = []  # ended jobs whose worktrees go
        self.preparing: dict[str, Checkout] = {}  # worktree path -> checkout under way
        self.abandoned: set[str] = set()  # checkouts under way for jobs that left the queue
        self.left_alone: set[str] = set()  # worktrees not ours to remove (warned once)
        self.supervisors: set[int] = set()  # pids of the supervisors we forked
        # Jobs whose supervisor died while they ran: being a child subreaper, the daemon
        # inherits them and reaps them itself (job pid -> its run files and `.ident`).
        self.orphans: dict[int, tuple[RunFiles, dict[str, Any]]] = {}
        self.orphan_groups: set[int] = set()  # their process groups, until empty
        # Exit statuses the daemon reaped that could not be written (a full disk), by
        # the `.exit` path they belong at.
        self.reaped: dict[str, dict[str, Any]] = {}
        # Stand-ins finishing reaped orphans' attempts (outputs, `.exit`): pid -> the
        # `.exit` path and the exit status they were given.
        self.concluding: dict[int, tuple[str, dict[str, Any]]] = {}
        # Writes of a record that failed for want of space, logged once each (job, event).
        self.no_space: set[tuple[str, int, str]] = set()
        # Pending jobs whose start failed for want of space, by (repository, job).
        self.no_room: dict[tuple[str, int], NoRoom] = {}
        self.removals: dict[int, str] = {}  # forked worktree removals: pid -> path
        self.repos: dict[str, RepoState] = {}  # by common dir, kept between cycles
        self.read_everything = True  # the next cycle reads every repository's refs
        self.named: dict[str, set[int]] = {}  # jobs a nudge said changed, by repository
        self.packing: dict[str, subprocess.Popen[bytes]] = {}  # `git pack-refs` under way
        # tq.autoPush: the `git tq push` under way per repository (process, start, its
        # stderr file), and the repositories where a job ended while it ran.
        self.pushing: dict[str, tuple[subprocess.Popen[bytes], float, str]] = {}
        self.push_again: set[str] = set()
        self.spares: dict[str, Spare] = {}  # by repository key
        # Checkout settings of the worktrees our running jobs were started in, for
        # recycling them once they end (only those: see `recycle_target`).
        self.made_with: dict[tuple[str, int], tuple[Any, ...]] = {}
        self.ended_records: dict[tuple[str, str], Job] = {}  # ended jobs read for sweeps
        self.told: dict[str, dict[str, list[str]]] = {}  # waiting reasons written, by repo
        # Attempts whose exit file is there, to record once this cycle's starts are done.
        # Slurm jobs: when Slurm was first seen saying one ended with no exit file of
        # ours, by (repository, job, attempt); and the repositories that have some.
        self.slurm_gone: dict[tuple[str, int, int], float] = {}
        self.slurm_repos: set[str] = set()
        self.endings: list[tuple[RepoState, Job, RunFiles, Mapping[str, Any],
                                 Optional[Mapping[str, Any]]]] = []
        # Cycles run, and how often they read all refs or just named ones (daemon status).
        self.stats = {"cycles": 0, "ref_reads": 0, "named_reads": 0, "records_read": 0,
                      "spare_worktrees_used": 0, "worktrees_recycled": 0}
        self.pause = pausing.Pause()  # `git tq pause`: read from the tq home when it changed
        self.pause_stamp: Optional[tuple[Stamp, ...]] = None

    def short_of_space(self, rs: RepoState, job_id: int, what: str,
                       exc: BaseException) -> bool:
        """Whether `exc` is a write that failed for want of space (a full disk): then it
        is logged once per job and `what` (retried each cycle, silently, until it lands),
        and the caller goes on. False for any other error (the caller's to handle)."""
        if not isinstance(exc, NoSpace) and not (
                isinstance(exc, OSError) and exc.errno in NO_SPACE):
            return False
        key = (rs.key, job_id, what)
        if key not in self.no_space:
            self.no_space.add(key)
            log.warning("job %d: could not %s: no space left on device (%s); tried again "
                        "until it lands", job_id, what, exc)
        return True

    def space_again(self, rs: RepoState, job_id: int, what: str) -> None:
        """`what` landed after failing for want of space: said once."""
        if (rs.key, job_id, what) in self.no_space:
            self.no_space.discard((rs.key, job_id, what))
            log.info("job %d: %s done, space is back", job_id, what)

    if TYPE_CHECKING:
        # In reconcile.py (`Reconciling`), declared here for `Launching.start`, which
        # records a start that failed and sits below it.
        def record(self, rs: RepoState, job: Job, event: str, rf: RunFiles,
                   tree: Optional[str] = None, log_blob: Optional[str] = None,
                   series_blob: Optional[str] = None, **fields: Any) -> Job: ...
