"""The scheduler daemon: one per tq home, serving every repository registered there.

It owns the machine's GPUs. Each cycle it reads every repository's job refs,
records what ended (from the supervisors' exit files), enforces stop
deadlines, asks the pure `scheduler.plan` what to do, and does it: preempt
(its stop signal, once, to the victim's main process; SIGKILL to its whole
tree when that has ended or after the victim's grace) and
start (worktree, environment, supervisor). A cycle runs at once on a nudge
(submit, job exit, kill), on a GPU change, and every few seconds as a safety
net. Killing the daemon loses nothing: supervisors keep running jobs and write
their exit statuses; the next daemon adopts them through their lock files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from git_tq import (
    __version__,
    client,
    deps,
    gpus,
    jobtree,
    recordfmt,
    results,
    scheduler,
    supervisor,
)
from git_tq import pause as pausing
from git_tq.errors import InvalidTransition, NotOurs, RefRace, TqError
from git_tq.gitrepo import Repo, run_git, without_repo_vars
from git_tq.home import (
    Home,
    RunFiles,
    ensure_private_dir,
    repo_key,
    tighten_home,
    write_private_file,
)
from git_tq.lifecycle import apply_event, now_iso
from git_tq.localjobs import LedgerEntry, LocalJobs, LocalSpec
from git_tq.model import STOP_SIGNALS, Job, State, format_duration, stop_signal_number
from git_tq.procs import ProcessId, kill, plan_stop, shell_argv
from git_tq.server import BadRequest, RequestServer, check_request
from git_tq.store import (
    JOBS_PREFIX,
    JobStore,
    Stamp,
    file_stamp,
    identity_env,
    jobs_ref_dir,
    refs_stamp,
    settled,
)
from git_tq.store import _canonical as canonical_id

log = logging.getLogger("git-tq-daemon")

RESCAN_SECONDS = 3.0
PROBE_SECONDS = 0.5
LAUNCH_PATIENCE = 15.0  # how long a launched supervisor may take to take its lock
PREPARE_AHEAD = 2  # waiting jobs whose worktrees are checked out before their turn
# Parallel checkout (one worker per core) pays for big trees; below 1,000 files its two
# worker processes cost more than they save (14 against 13 ms for 100 files here).
CHECKOUT_OPTIONS = ("-c", "checkout.workers=0", "-c", "checkout.thresholdForParallelism=1000",
                    *jobtree.NO_HOOKS)
NAMED_READ_MAX = 64  # a nudge naming more jobs than this reads every ref instead
READ_CHUNK = 500  # records read by one `git cat-file --batch` when many tips changed
AUTO_PUSH_TIMEOUT = 600.0  # seconds a background `git tq push` (tq.autoPush) may take
PACK_REFS_AFTER = 256  # loose job refs that make the daemon run `git pack-refs` (tq.packRefsAfter)
# A record that says it has ended needs no decoding to know the scheduler can skip it.
# Its state is all a dependency needs of it (`deps`), so it is kept: one int per job.
FINISHED = re.compile(r"^Tq-State: (done|failed|cancelled)$", re.MULTILINE)
ENDED_STATES = {s.value: s for s in State if s.finished}



class AlreadyRunning(TqError):
    pass


@dataclass
class RepoState:
    """What the daemon knows of one repository between cycles.

    A cycle reads only what changed: every ref's tip is remembered, and only the
    records the scheduler acts on (waiting, running, stopping: anyone's) are kept
    decoded, so 10,000 finished jobs cost nothing once read. The stamps (stat data
    of the refs folder and packed-refs, the config files, the ledger) say when a
    safety rescan has something to read at all.
    """

    key: str
    common: str
    repo: Repo
    store: JobStore
    config: dict[str, str]
    entries: Mapping[int, LedgerEntry] = field(default_factory=dict)  # ours (the ledger)
    tips: dict[int, str] = field(default_factory=dict)  # every job ref at the last read
    active: dict[int, Job] = field(default_factory=dict)  # waiting/running/stopping records
    ended: dict[int, State] = field(default_factory=dict)  # how every other readable job ended
    read_whole_at: int = -1  # the cycle that last read every ref (all tips known then)
    tampered: set[int] = field(default_factory=set)  # ours by the ledger, moved by others
    refs_stamp: Optional[tuple[Stamp, ...]] = None  # None: read the refs next time
    config_stamp: Optional[tuple[Stamp, ...]] = None
    ledger_stamp: Stamp = None
    ledger_changed: bool = True
    last_submission: Optional[str] = None  # of the last job started: the spare's commit

    @property
    def jobs(self) -> list[Job]:
        """The records the scheduler acts on, by id."""
        return sorted(self.active.values(), key=lambda j: j.id)

    @property
    def local(self) -> LocalJobs:
        assert self.store.local is not None
        return self.store.local

    def ours(self, job: Job) -> Optional[LedgerEntry]:
        """The ledger entry of a job this user submitted here and whose record nobody
        else moved; None for any other record (fetched or tampered)."""
        entry = self.entries.get(job.id)
        return entry if entry is not None and entry.trusts(job.tip) else None


def open_repo(common: str, local: LocalJobs,
              stamp: Optional[tuple[Stamp, ...]] = None) -> RepoState:
    """A repository's state with its config read (`stamp`: its config files' stamps,
    taken before the read)."""
    repo = Repo(toplevel=None, git_dir=common, common_dir=common, prefix="",
                index_path=os.path.join(common, "index"))
    config = repo.config(r"^(tq|user)\.|^core\.(hookspath|attributesfile)$")
    env = identity_env(config, without_repo_vars(os.environ))
    return RepoState(repo_key(common), common, repo, JobStore(repo, env, local), config,
                     config_stamp=stamp)


def give_back_memory() -> None:
    """Return the heap that a big read left free to the system (glibc keeps it)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def config_stamp(common: str) -> Optional[tuple[Stamp, ...]]:
    """The config files git reads for the daemon (an include elsewhere is read again on a
    nudge that names no job, e.g. `git tq start`)."""
    home = os.path.expanduser("~")
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files = [os.path.join(common, "config"), os.path.join(home, ".gitconfig"),
             os.path.join(xdg, "git", "config"), "/etc/gitconfig"]
    return settled(tuple(file_stamp(f) for f in files))


def advance(rs: RepoState, job: Job, event: str, when: str, tree: Optional[str] = None,
            **fields: Any) -> Job:
    """Record `event` on the job, starting from the record in hand (one compare-and-swap
    when nobody else wrote meanwhile; otherwise re-read and retried by the store)."""
    stored = rs.store.write(job, apply_event(job, event, when, **fields),
                            f"tq: job {job.id} {event}", tree)
    return stored if stored is not None else \
        rs.store.advance(job.id, event, when, tree, **fields)


def setting(repos: list[RepoState], name: str) -> Optional[str]:
    """A daemon-wide setting: from the first registered repository that sets it."""
    for rs in repos:
        if name in rs.config:
            return rs.config[name]
    return None


class Forked:
    """A forked child of the loop, polled like a Popen (which only runs programs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = self.pid, 70 << 8  # reaped elsewhere: its result is unknown
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = 70
        return self.returncode


class Waitable(Protocol):
    def poll(self) -> Optional[int]: ...
    def wait(self) -> int: ...


RECYCLE_DECLINED = 10  # a recycling child removed (or kept) the old worktree instead


@dataclass
class Spare:
    """A worktree checked out ahead for the next job that finds a free slot."""

    proc: subprocess.Popen[bytes]
    path: str
    commit: str
    written_by: Optional[tuple[Any, ...]]  # checkout_settings when it was checked out


@dataclass
class Checkout:
    """A waiting job's worktree being checked out in the background: a `git worktree
    add`, or a finished job's worktree recycled into it (`Daemon.recycle`)."""

    proc: Waitable
    rs: RepoState
    spec: LocalSpec
    linked: bool = False
    error: Optional[str] = None  # completing the worktree failed: the start will say why
    recycled_from: Optional[str] = None  # the finished job's worktree being recycled


class Daemon:
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
        self.endings: list[tuple[RepoState, Job, RunFiles, Mapping[str, Any],
                                 Optional[Mapping[str, Any]]]] = []
        # Cycles run, and how often they read all refs or just named ones (daemon status).
        self.stats = {"cycles": 0, "ref_reads": 0, "named_reads": 0, "records_read": 0,
                      "spare_worktrees_used": 0, "worktrees_recycled": 0}
        self.pause = pausing.Pause()  # `git tq pause`: read from the tq home when it changed
        self.pause_stamp: Optional[tuple[Stamp, ...]] = None

    # --- lifecycle of the daemon itself ---------------------------------------

    def acquire(self) -> None:
        ensure_private_dir(self.home.path)
        tighten_home(self.home.path)
        fd = os.open(self.home.daemon_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AlreadyRunning(f"a git tq daemon already runs for {self.home.path}") from None
        self.lock_fd = fd
        path = self.home.make_socket_path()  # in the home, or a private folder it records
        self.socket_file = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # we hold the lock, so no live daemon listens there
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        server.listen(256)  # room for a burst; RequestServer caps what is held open
        server.setblocking(False)
        self.server = server
        write_private_file(self.home.daemon_info, json.dumps({
            "pid": os.getpid(), "started": self.started_at, "socket": path,
            "version": __version__, "protocol": client.PROTOCOL,
        }).encode())

    def serve(self) -> None:
        self.acquire()
        assert self.server is not None
        log.info("daemon %s started, pid %d, home %s", __version__, os.getpid(), self.home.path)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        sel = selectors.DefaultSelector()
        # The socket's connections live in this loop, non-blocking, each with a deadline.
        requests = RequestServer(self.server, sel, self.handle, client.PROTOCOL)
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        last_scan = 0.0
        last_probe = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if self.dirty or now - last_scan >= RESCAN_SECONDS:
                    timer = now - last_scan >= RESCAN_SECONDS
                    self.dirty = False
                    last_scan = now
                    last_probe = now
                    self.safe_cycle(timer)
                elif self.gpus_in_use and now - last_probe >= PROBE_SECONDS:
                    last_probe = now
                    if self.foreign_changed():
                        self.dirty = True
                        continue
                timeout = RESCAN_SECONDS - (time.monotonic() - last_scan)
                if self.gpus_in_use:
                    timeout = min(timeout, PROBE_SECONDS - (time.monotonic() - last_probe))
                if self.next_deadline is not None:
                    timeout = min(timeout, self.next_deadline - time.time())
                conn_deadline = requests.next_deadline()
                if conn_deadline is not None:
                    timeout = min(timeout, conn_deadline - time.monotonic())
                for key, events in sel.select(max(timeout, 0.0)):
                    if requests.owns(key):
                        requests.ready(key, events)  # requests are handled here, on this thread
                    else:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(wake_r, 4096):
                                pass
                        self.reap()
                requests.expire()
                if self.next_deadline is not None and time.time() >= self.next_deadline:
                    self.dirty = True
        finally:
            log.info("daemon stopping; running jobs keep running")
            for repo in self.told:  # its word on waiting jobs goes with it
                with contextlib.suppress(OSError):
                    os.unlink(self.home.waiting_file(repo))
            requests.close_all()
            self.server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_file)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.home.daemon_info)

    def _on_stop_signal(self, *_: Any) -> None:
        self.stopping = True

    def reap(self) -> None:
        """Collect exited supervisors we forked (not other children: a Popen must keep
        its own exit status), and finished hooks."""
        for pid in list(self.supervisors) + list(self.removals):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.supervisors.discard(pid)
                self.removals.pop(pid, None)
                self.dirty = True
        self.hooks = [h for h in self.hooks if h.poll() is None]
        self.packing = {c: p for c, p in self.packing.items() if p.poll() is None}
        self.reap_pushes()
        declined = []
        for path, checkout in self.preparing.items():
            if path in self.abandoned:
                if checkout.proc.poll() is not None:
                    self.dirty = True  # its job was cancelled: the next cycle removes it
            elif checkout.proc.poll() == 0:  # reaped; the status stays for ensure_worktree
                self.finish_checkout(path, checkout)
            elif checkout.recycled_from and checkout.proc.poll() is not None:
                declined.append(path)
        for path in declined:  # prepared the usual way by the next cycle
            del self.preparing[path]
            self.dirty = True

    def finish_checkout(self, path: str, checkout: Checkout) -> None:
        """Complete a checked-out worktree (nested repositories, links...), once."""
        if not checkout.linked:
            checkout.linked = True
            if checkout.recycled_from:
                self.stats["worktrees_recycled"] += 1
            try:
                jobtree.complete(checkout.rs.common, path, checkout.spec, checkout.rs.config)
                jobtree.mark_complete(path, checkout.spec.submission)
            except (OSError, TqError) as exc:
                checkout.error = str(exc)

    # --- the socket -------------------------------------------------------------

    # Connections, limits, deadlines and the request schema: git_tq/server.py.

    def handle(self, request: object) -> dict[str, Any]:
        """Answer one request, on the loop's thread. A request that breaks the schema
        gets an error, never an exception."""
        try:
            req = check_request(request, client.PROTOCOL)
        except BadRequest as exc:
            return {"error": str(exc)}
        cmd = req["cmd"]
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(), "version": __version__}
        if cmd == "nudge":
            # A nudge that names its repository and jobs (a submission, a supervisor) makes
            # the cycle read just those refs; any other reads everything.
            repo, named = req.get("repo"), req.get("jobs")
            if isinstance(repo, str) and isinstance(named, list):
                self.named.setdefault(os.path.realpath(repo), set()).update(named)
            else:
                self.read_everything = True
            log.debug("nudged")
            self.dirty = True
            return {"ok": True}
        if cmd == "stop":
            self.stopping = True
            return {"ok": True}
        if cmd == "status":
            return {"ok": True, "pid": os.getpid(), "version": __version__,
                    "started": self.started_at, "socket": self.socket_file,
                    "home": self.home.path, "repos": self.home.registered_repos(),
                    "counts": self.counts, "stats": self.stats, "foreign": {str(k): v for k, v in
                                                       self.last_foreign.items()},
                    "paused": self.pause.to_json()}
        if cmd == "kill":
            try:
                done = self.kill_jobs(req["repo"], list(req["jobs"]), req.get("now", False))
            except TqError as exc:
                return {"error": str(exc)}
            except Exception as exc:  # the loop must outlive any one request
                log.exception("kill failed")
                return {"error": f"kill failed: {exc}"}
            self.dirty = True
            self.read_everything = True
            return {"ok": True, "jobs": done}
        return {"error": f"unknown request {cmd!r}"}

    # --- one scheduling cycle -------------------------------------------------------

    def safe_cycle(self, timer: bool = False) -> None:
        t0 = time.monotonic()
        try:
            self.cycle(timer)
            log.debug("cycle took %.1f ms", (time.monotonic() - t0) * 1000)
        except Exception:  # the daemon must outlive any one bad repository or race
            log.exception("scheduling cycle failed; retrying on the next one")
            self.dirty = False
            self.read_everything = True

    def load(self, timer: bool = True) -> list[RepoState]:
        """The registered repositories, brought up to date with what changed: every ref
        on a nudge that names no job (and on the first cycle); the named jobs' refs on
        one that does; on the safety rescan (`timer`), every ref only when the refs
        folder or packed-refs changed since the last read. Config and ledger are read
        again only when their files changed."""
        everything, self.read_everything = self.read_everything, False
        named, self.named = self.named, {}
        repos = []
        registered = self.home.registered_repos()
        for common in registered:
            if not os.path.isdir(common):
                log.warning("repository %s is gone; dropped from the list", common)
                self.home.drop_repo(common)
                spare = os.path.join(self.home.path, "spare", repo_key(common))
                if os.path.isdir(spare) and not os.path.islink(spare):
                    shutil.rmtree(spare, ignore_errors=True)
                continue
            try:
                rs = self.repos.get(common)
                fresh = rs is None
                configured = config_stamp(common)
                if rs is None or everything or configured is None or \
                        configured != rs.config_stamp:
                    local = self.ledgers.setdefault(common, LocalJobs(self.home.path, common))
                    rs = self.reopen(open_repo(common, local, configured), rs)
                    self.repos[common] = rs
                ledger = file_stamp(rs.local.ledger_path)
                rs.ledger_changed = ledger != rs.ledger_stamp or ledger is None
                if rs.ledger_changed:
                    rs.ledger_stamp = ledger
                    rs.entries = rs.local.entries_view()
                stamp = refs_stamp(common)
                if fresh or everything or (timer and (stamp is None or stamp != rs.refs_stamp)):
                    self.read_refs(rs, stamp)
                else:
                    ids = named.get(os.path.realpath(common))
                    if ids:
                        self.read_named(rs, ids, stamp)
            except TqError as exc:
                log.warning("skipping %s: %s", common, exc)
                self.read_everything = True  # try it whole next time
                continue
            repos.append(rs)
        for gone in set(self.repos) - set(registered):
            del self.repos[gone]
        return repos

    def reopen(self, new: RepoState, old: Optional[RepoState]) -> RepoState:
        """A repository's state with its config read again, keeping what was read."""
        if old is not None:
            new.entries, new.tips, new.active = old.entries, old.tips, old.active
            new.ended, new.read_whole_at = old.ended, old.read_whole_at
            new.tampered, new.refs_stamp = old.tampered, old.refs_stamp
            new.ledger_stamp, new.last_submission = old.ledger_stamp, old.last_submission
        return new

    def read_refs(self, rs: RepoState, stamp: Optional[tuple[Stamp, ...]]) -> None:
        """Read every job ref's tip (one `git for-each-ref`, no object read) and decode
        only the records at tips not seen before."""
        self.stats["ref_reads"] += 1
        out = rs.repo.out("for-each-ref", "--format=%(objectname) %(refname:lstrip=3)",
                          JOBS_PREFIX)
        tips: dict[int, str] = {}
        for line in out.splitlines():
            oid, _, name = line.partition(" ")
            job_id = canonical_id(name)
            if job_id is None:
                self.warn_once(rs, oid, f"refs/tq/jobs/{name} is unreadable (the ref name is "
                                        "not a canonical job id); ignored")
            else:
                tips[job_id] = oid
        for gone in rs.tips.keys() - tips.keys():
            rs.active.pop(gone, None)
            rs.ended.pop(gone, None)
        rs.read_whole_at = self.stats["cycles"]
        changed = [(i, t) for i, t in tips.items() if rs.tips.get(i) != t]
        rs.tips = tips
        for start in range(0, len(changed), READ_CHUNK):
            chunk = changed[start:start + READ_CHUNK]
            messages = rs.store._messages([t for _, t in chunk])
            for job_id, tip in chunk:
                self.absorb(rs, job_id, tip, messages.get(tip))
        rs.tampered = {i for i, e in rs.entries.items() if i in tips and not e.trusts(tips[i])}
        rs.refs_stamp = stamp
        if len(changed) >= 1000:
            give_back_memory()  # the first read of a long history: ~6 MiB less for ever
        self.pack_refs_if_many(rs)

    def read_named(self, rs: RepoState, ids: set[int],
                   stamp: Optional[tuple[Stamp, ...]]) -> None:
        """Read just these jobs' refs and records (one `git for-each-ref`), as a nudge
        asked; a later safety rescan reads the rest if anything else changed."""
        if len(ids) > NAMED_READ_MAX:
            self.read_refs(rs, stamp)
            return
        self.stats["named_reads"] += 1
        out = rs.repo.git("for-each-ref",
                          "--format=%(objectname)%00%(refname)%00%(contents)%00",
                          *[f"{JOBS_PREFIX}{i}" for i in sorted(ids)]).stdout
        parts = out.decode("utf-8", errors="replace").split("\0")
        found: dict[int, tuple[str, str]] = {}
        for k in range(0, len(parts) - 2, 3):
            oid, ref, message = parts[k].lstrip("\n"), parts[k + 1], parts[k + 2]
            job_id = canonical_id(ref[len(JOBS_PREFIX):])
            if job_id in ids:  # a pattern also matches refs/tq/jobs/<id>/...: exact only
                found[job_id] = (oid, message)
        for job_id in ids:
            if job_id not in found:
                rs.tips.pop(job_id, None)
                rs.active.pop(job_id, None)
                rs.ended.pop(job_id, None)
                rs.tampered.discard(job_id)
            elif rs.tips.get(job_id) != found[job_id][0]:
                self.absorb(rs, job_id, *found[job_id])

    def absorb(self, rs: RepoState, job_id: int, tip: str, message: Optional[str]) -> None:
        """Take in the record at a new tip of a job ref."""
        self.stats["records_read"] += 1
        rs.tips[job_id] = tip
        rs.active.pop(job_id, None)
        rs.ended.pop(job_id, None)
        entry = rs.entries.get(job_id)
        if entry is not None and not entry.trusts(tip):
            rs.tampered.add(job_id)
        else:
            rs.tampered.discard(job_id)
        if message is None:
            self.warn_once(rs, tip, f"refs/tq/jobs/{job_id} is unreadable (not a commit); "
                                    "ignored")
            return
        ended = FINISHED.search(message)
        if ended:  # nothing for the scheduler (and decoding costs ~0.1 ms)
            rs.ended[job_id] = ENDED_STATES[ended.group(1)]
            return
        try:
            job = recordfmt.decode(message, tip)
        except recordfmt.RecordFormatError as exc:
            self.warn_once(rs, tip, f"refs/tq/jobs/{job_id} is unreadable ({exc}); ignored")
            return
        if job.id != job_id:
            self.warn_once(rs, tip, f"refs/tq/jobs/{job_id} is unreadable (the record says "
                                    f"it is job {job.id}); ignored")
            return
        if job.state.active:
            rs.active[job_id] = job

    def remember(self, rs: RepoState, job: Job) -> None:
        """A record this daemon just wrote: no need to read it back."""
        rs.tips[job.id] = job.tip
        if job.state.active:
            rs.active[job.id] = job
            rs.ended.pop(job.id, None)
        else:
            rs.active.pop(job.id, None)
            rs.ended[job.id] = job.state

    def ended_job(self, rs: RepoState, job_id: int) -> Optional[Job]:
        """Any job's record: the scheduler's, or an ended one read on demand (a few, for
        the worktrees still on disk), remembered by tip."""
        job = rs.active.get(job_id)
        tip = rs.tips.get(job_id)
        if job is not None or tip is None:
            return job
        cached = self.ended_records.get((rs.key, tip))
        if cached is None:
            message = rs.store._messages([tip]).get(tip)
            try:
                cached = recordfmt.decode(message, tip) if message is not None else None
            except recordfmt.RecordFormatError:
                cached = None
            if cached is None or cached.id != job_id:
                return None
            if len(self.ended_records) > 1024:
                self.ended_records.clear()
            self.ended_records[(rs.key, tip)] = cached
        return cached

    def pack_refs_if_many(self, rs: RepoState) -> None:
        """Pack the job refs once many are loose (each lifecycle commit leaves one), with
        git's own `pack-refs`, in the background, holding no lock of ours: listing packed
        refs costs a fifth of loose ones at 10,000 jobs."""
        try:
            after = int(rs.config.get("tq.packrefsafter", PACK_REFS_AFTER))
        except ValueError:
            after = PACK_REFS_AFTER
        if after <= 0 or rs.common in self.packing:
            return
        try:
            loose = len(os.listdir(jobs_ref_dir(rs.common)))
        except OSError:
            return
        if loose < after:
            return
        log.info("%s: %d loose job refs; packing them (git pack-refs --all)", rs.common, loose)
        with contextlib.suppress(OSError):
            self.packing[rs.common] = subprocess.Popen(
                ["git", "--git-dir", rs.common, "pack-refs", "--all"], cwd=rs.common,
                env=without_repo_vars(os.environ), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def warn_once(self, rs: RepoState, tip: str, message: str) -> None:
        """Log a problem with a record once per record (tip), not every cycle."""
        if (rs.key, tip) not in self.warned:
            self.warned.add((rs.key, tip))
            log.warning("%s: %s", rs.common, message)

    def cycle(self, timer: bool = True) -> None:
        self.stats["cycles"] += 1
        repos = self.load(timer)
        self.next_deadline = None
        holding: list[scheduler.Holding] = []
        waiting: list[scheduler.Waiting] = []
        jobs: dict[scheduler.JobKey, tuple[RepoState, Job]] = {}
        self.endings = []
        ending: dict[str, int] = {}  # by repository: attempts over, not yet recorded
        for rs in repos:
            verdicts = self.follow_dependencies(rs)
            for job_id in sorted(rs.tampered - rs.active.keys()):
                # Ours by the ledger, but someone moved the record (it says it ended).
                self.warn_once(rs, rs.tips[job_id], f"job {job_id}'s record was moved by "
                               "someone else (a fetch or a hand edit): it is tampered and is "
                               "neither run nor written; see git tq doctor")
                held = self.live_run_gpus(rs, job_id)
                if held is not None:
                    holding.append(scheduler.Holding((rs.key, job_id), -(10**9), held, True))
            for job in rs.jobs:
                key = (rs.key, job.id)
                if rs.ours(job) is None:
                    # Fetched or tampered: never run, written or hooked. A run of ours
                    # that is still alive keeps its GPUs, and is never a victim.
                    self.report_foreign_record(rs, job)
                    held = self.live_run_gpus(rs, job.id)
                    if held is not None:
                        holding.append(scheduler.Holding(key, -(10**9), held, True))
                    continue
                if job.state in (State.RUNNING, State.STOPPING):
                    job = self.reconcile(rs, job)  # may record an ending
                if job.state is State.RUNNING and not (self.endings and
                                                       self.endings[-1][1] is job):
                    job = self.enforce_time_limit(rs, job)
                if job.state in (State.RUNNING, State.STOPPING) and (
                        self.endings and self.endings[-1][1] is job
                        or os.path.exists(RunFiles(self.home, rs.key, job.id).ended)):
                    # Its processes are gone (the supervisor killed what was left): its
                    # GPUs are free while the supervisor records what it produced.
                    jobs[key] = (rs, job)
                    if key in self.made_with:  # its worktree may be recycled
                        ending[rs.key] = ending.get(rs.key, 0) + 1
                elif job.state in (State.RUNNING, State.STOPPING):
                    holding.append(scheduler.Holding(key, job.spec.priority,
                                                     job.assigned_gpus or (),
                                                     job.state is State.STOPPING))
                    jobs[key] = (rs, job)
                elif job.state is State.PENDING:
                    verdict = verdicts.get(job.id)
                    # One still here with a broken dependency (its cancellation lost a
                    # race) waits for the next cycle's judgement, never starts.
                    blocked = () if verdict is None else verdict.waiting_for if \
                        verdict.broken is None else (verdict.broken,)
                    waiting.append(scheduler.Waiting(key, job.spec.priority,
                                                     job.spec.submitted_at, job.spec.gpus,
                                                     blocked))
                    jobs[key] = (rs, job)
                    if job.attempt == 0:
                        self.announce(rs, job)
        machine = self.machine_gpus(repos)
        self.gpus_in_use = bool(machine) and (bool(holding) or bool(waiting))
        foreign = self.find_foreign(machine, holding, jobs)
        self.last_foreign = foreign
        cpu_slots = int(setting(repos, "tq.cpuslots") or max(1, (os.cpu_count() or 2) // 2))
        per_gpu = int(setting(repos, "tq.jobspergpu") or 1)
        self.read_pause()
        plan = scheduler.plan(waiting, holding, machine, foreign=foreign, cpu_slots=cpu_slots,
                              jobs_per_gpu=per_gpu, paused=frozenset(self.pause.gpus),
                              all_paused=self.pause.everything)
        for p in plan.preempts:
            rs, job = jobs[p.victim]
            self.request_stop(rs, job, "preempt", p.reason, now=False)
        for s in plan.starts:
            rs, job = jobs[s.key]
            self.start(rs, job, s.gpus)
        # Endings are recorded after the starts they made room for: storing the log and
        # writing the record take a dozen milliseconds the next job need not wait.
        endings, self.endings = self.endings, []
        for rs, job, rf, outcome, stop in endings:
            self.finish(rs, job, rf, outcome, stop)
        if endings:
            self.dirty = True  # a preempted job is waiting again: plan with it at once
        self.counts = {"running": len(holding) + len(plan.starts), "pending":
                       len(waiting) - len(plan.starts), "repos": len(repos),
                       "held": sum(1 for r in plan.reasons.values() if r.kind == "paused")}
        self.update_deadline(repos)
        self.tell_reasons(repos, plan.reasons, jobs)
        # Work that is not on anyone's critical path: remove finished jobs' worktrees,
        # and check out the next waiting jobs' worktrees so that starting them is a fork.
        started = {s.key for s in plan.starts}
        # The next jobs that can start (their dependencies met): their worktrees first.
        ready = [w for w in scheduler.queue_order(waiting) if not w.waiting_for]
        ahead = [jobs[w.key] for w in ready[:PREPARE_AHEAD] if w.key not in started]
        cleanup, self.cleanup = self.cleanup, []
        for rs, ended in cleanup:
            target = self.recycle_target(rs, ended, ahead)
            if target is not None:
                self.recycle(rs, ended, *target)
            else:
                self.remove_in_background(rs, ended.id, record=ended)
        for rs in repos:
            self.sweep_worktrees(rs)
        for rs in repos:
            if rs.ledger_changed:  # its check reads the ledger's new lines
                with contextlib.suppress(OSError):
                    rs.local.compact_if_sparse()
        for rs, job in self.leave_for_recycling(ahead, ending):
            with contextlib.suppress(TqError, OSError):
                self.prepare_worktree(rs, job)
        for rs in repos:
            self.make_spare(rs)

    def follow_dependencies(self, rs: RepoState) -> dict[int, deps.Verdict]:
        """Where our waiting jobs' dependencies stand. The jobs that can never start (a
        dependency failed, was cancelled or is gone, or one of theirs did) are cancelled
        here, each after the one that dooms it, with the reason on its record. All of it
        follows from the records alone, so a daemon killed half-way through a cascade
        leaves nothing a restarted one does not finish."""
        waiting = {j.id: deps.Needs(j.spec.after, j.spec.after_any) for j in rs.jobs
                   if j.state is State.PENDING and (j.spec.after or j.spec.after_any)
                   and rs.ours(j) is not None}
        if not waiting:
            return {}
        states: dict[int, State] = {}
        for needs in waiting.values():
            for dep in (*needs.after, *needs.after_any):
                if dep in states:
                    continue
                known = rs.active.get(dep)
                state = known.state if known is not None else rs.ended.get(dep)
                if dep in rs.tampered:
                    # Someone else moved its record: whatever ending it claims is not
                    # ours to believe, and its real one cannot be recorded. It waits.
                    state = State.PENDING
                if state is None and (dep in rs.tips or rs.read_whole_at != self.stats["cycles"]):
                    # Unreadable, or not seen yet by a read of just the named refs: it
                    # counts as not ended until a whole read says it is gone.
                    state = State.PENDING
                    if dep not in rs.tips:
                        self.read_everything = self.dirty = True
                if state is not None:
                    states[dep] = state
        verdicts = deps.judge(waiting, states)
        for job_id in deps.doomed_order(verdicts):
            job = rs.active.get(job_id)
            if job is None or job.state is not State.PENDING:
                continue
            detail = verdicts[job_id].detail
            try:
                stored = rs.store.write(job, apply_event(job, "cancelled", now_iso(),
                                                         detail=detail),
                                        f"tq: job {job_id} cancelled: {detail}")
            except (InvalidTransition, RefRace, NotOurs) as exc:
                log.warning("job %d: %s", job_id, exc)
                stored = None
            if stored is None:  # its record moved (an edit?): judge it again from there
                self.read_everything = self.dirty = True
                continue
            self.remember(rs, stored)
            log.info("job %d in %s: cancelled (%s)", job_id, rs.common, detail)
            self.run_hook(rs, stored, "finish")
        return verdicts

    def tell_reasons(self, repos: list[RepoState],
                     reasons: Mapping[scheduler.JobKey, scheduler.Reason],
                     jobs: Mapping[scheduler.JobKey, tuple[RepoState, Job]]) -> None:
        """Write why each waiting job waits where `ls` reads it (`Home.waiting_file`),
        for each repository whose reasons changed:
        {"pid": daemon, "jobs": {id: [tip, kind, text]}}."""
        by_repo: dict[str, dict[str, list[str]]] = {rs.key: {} for rs in repos}
        for key, why in reasons.items():
            rs, job = jobs[key]
            by_repo[rs.key][str(job.id)] = [job.tip, why.kind, why.text]
        for rs in repos:
            told = by_repo[rs.key]
            if self.told.get(rs.key) == told:
                continue
            with contextlib.suppress(OSError):
                path = self.home.waiting_file(rs.key)
                ensure_private_dir(os.path.dirname(path))
                write_private_file(path, json.dumps({"pid": os.getpid(),
                                                     "jobs": told}).encode())
                self.told[rs.key] = told

    def read_pause(self) -> None:
        """The pause as `git tq pause` left it in the tq home; read again only when the
        file's stat data changed (an idle cycle costs one stat)."""
        stamp = settled((file_stamp(pausing.pause_file(self.home.path)),))
        if stamp is None or stamp != self.pause_stamp:
            paused = pausing.read(self.home.path)
            if paused != self.pause:
                log.info("%s", paused.describe() if paused.active else "queue resumed")
            self.pause, self.pause_stamp = paused, stamp

    def machine_gpus(self, repos: list[RepoState]) -> tuple[int, ...]:
        declared = setting(repos, "tq.gpus")
        if declared is not None:
            return gpus.machine_gpus({"tq.gpus": declared})
        return gpus.machine_gpus({})

    def report_foreign_record(self, rs: RepoState, job: Job) -> None:
        if job.id in rs.entries:
            self.warn_once(rs, job.tip, f"job {job.id}'s record was moved by someone else "
                                        "(a fetch or a hand edit): it is tampered and is "
                                        "neither run nor written; see git tq doctor")
        elif job.state.active:
            self.warn_once(rs, job.tip, f"job {job.id} was not submitted here by this user "
                                        "(fetched or pushed?); it will not run")

    def live_run_gpus(self, rs: RepoState, job_id: int) -> Optional[tuple[int, ...]]:
        """The GPUs of a run of ours whose supervisor still lives, from its launch file
        (not from the record, which may be anyone's); None when no run is alive."""
        rf = RunFiles(self.home, rs.key, job_id)
        if not self.supervisor_alive(rf):
            return None
        launch = rf.read(rf.launch) or {}
        gpus_held = launch.get("gpus")
        if isinstance(gpus_held, list) and all(isinstance(g, int) for g in gpus_held):
            return tuple(gpus_held)
        return ()

    def announce(self, rs: RepoState, job: Job) -> None:
        """Run the tq-submit hook once per new job (a marker in its run files says so)."""
        rf = RunFiles(self.home, rs.key, job.id)
        if os.path.exists(rf.announced):
            return
        rf.write(rf.announced, {"snapshot": job.snapshot})
        self.run_hook(rs, job, "submit")

    # --- GPUs shared with processes that are not ours ---------------------------------

    def our_pids(self, rs_jobs: Mapping[scheduler.JobKey, tuple[RepoState, Job]]) -> set[int]:
        pids: set[int] = set()
        for key, job_id in rs_jobs:
            rf = RunFiles(self.home, key, job_id)
            ident = rf.read(rf.ident)
            if not ident:
                continue
            for who in ("supervisor", "job"):
                proc = ProcessId(*ident[who]).process()
                if proc is not None:
                    pids.add(proc.pid)
                    with contextlib.suppress(Exception):
                        pids.update(c.pid for c in proc.children(recursive=True))
        return pids

    def find_foreign(self, machine: tuple[int, ...], holding: list[scheduler.Holding],
                     jobs: Mapping[scheduler.JobKey, tuple[RepoState, Job]]) -> dict[int, str]:
        if not machine:
            return {}
        on_gpu = gpus.gpu_processes(os.environ)
        if not any(on_gpu.values()):
            return {}
        ours = self.our_pids({k: v for k, v in jobs.items()
                              if v[1].state in (State.RUNNING, State.STOPPING)})
        foreign: dict[int, str] = {}
        for g, pids in on_gpu.items():
            strangers = [p for p in pids if p not in ours and ProcessId.of(p) is not None]
            if g in machine and strangers:
                foreign[g] = f"foreign process {strangers[0]}"
        return foreign

    def foreign_changed(self) -> bool:
        """Whether the processes on the GPUs changed since the last look."""
        on_gpu = gpus.gpu_processes(os.environ)
        seen = {(g, p) for g, pids in on_gpu.items() for p in pids}
        changed = seen != self.last_probe
        self.last_probe = seen
        return changed

    # --- running jobs ------------------------------------------------------------

    def supervisor_alive(self, rf: RunFiles) -> bool:
        try:
            fd = os.open(rf.lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops our lock, if we got it
        return False

    def reconcile(self, rs: RepoState, job: Job) -> Job:
        """Bring a running/stopping job's record up to date with its processes."""
        rf = RunFiles(self.home, rs.key, job.id)
        stop = rf.read(rf.stop)
        if self.supervisor_alive(rf):
            ident = rf.read(rf.ident)
            if stop and ident:
                self.enforce_stop(rf, job, stop, ident)
            return job
        outcome = rf.read(rf.exit)
        if outcome is None:
            launch_age = time.time() - os.stat(rf.launch).st_mtime \
                if os.path.exists(rf.launch) else None
            ident = rf.read(rf.ident)
            # A supervisor writes .ident after taking its lock: with .ident there and the
            # lock free, it is not starting any more (it died), so no patience is due.
            if ident is None and launch_age is not None and launch_age < LAUNCH_PATIENCE:
                return job  # the supervisor is still starting
            if ident and ProcessId(*ident["job"]).alive():
                if stop:  # orphaned job, supervisor gone: still ours to stop
                    self.enforce_stop(rf, job, stop, ident)
                return job
            if ident:
                outcome = {"exit_code": None, "signal": None, "ended_at": now_iso(),
                           "lost": "its supervisor died; the exit status is lost"}
            else:
                return self.record(rs, job, "preempted", rf,
                                   detail="had not started when its daemon stopped")
        self.endings.append((rs, job, rf, outcome, stop))  # recorded after this cycle's starts
        return job

    def finish(self, rs: RepoState, job: Job, rf: RunFiles, outcome: Mapping[str, Any],
               stop: Optional[Mapping[str, Any]]) -> Job:
        code, sig = outcome.get("exit_code"), outcome.get("signal")
        produced: dict[str, Any] = {}
        if isinstance(outcome.get("results"), dict):
            try:
                tree, outputs, metrics, blob = results.outputs_from_json(outcome["results"])
            except (TypeError, ValueError, KeyError):
                tree, outputs, metrics, blob = None, None, (), None
            produced = {"tree": tree, "outputs": outputs, "log_blob": blob}
            if metrics:  # an attempt that reported none keeps the last one's
                produced["metrics"] = metrics
        # Neither a command that could not be started nor one whose supervisor died has an
        # exit status: none is recorded (the event and the detail say which it was).
        if outcome.get("start_error"):
            return self.record(rs, job, "start-failed", rf, detail=outcome["start_error"])
        if outcome.get("lost"):
            return self.record(rs, job, "finished", rf, detail=outcome["lost"])
        # A job that was sent its stop signal to make room goes back to the queue whatever
        # its exit code (a checkpointing job exits 0 after saving); a killed one is
        # cancelled. Both record how the attempt ended, and how the stop went.
        stopped = stop_outcome(stop, outcome)
        used_up = self.time_up(job, rf) if stopped and stop and \
            stop.get("kind") == "preempt" else None
        if used_up:  # preempted with its time used up: a resume would only stop again
            return self.record(rs, job, "timed-out", rf, detail=used_up, exit_code=code,
                               signal=sig, **stopped, **produced)
        if stopped and stop and stop.get("kind") == "preempt":
            return self.record(rs, job, "preempted", rf, detail=stop.get("reason"),
                               exit_code=code, signal=sig, **stopped, **produced)
        if stopped and stop and stop.get("kind") == "kill":
            return self.record(rs, job, "cancelled", rf, detail=stop.get("reason"),
                               exit_code=code, signal=sig, **stopped, **produced)
        if stopped and stop and stop.get("kind") == "timeout":
            return self.record(rs, job, "timed-out", rf, detail=stop.get("reason"),
                               exit_code=code, signal=sig, **stopped, **produced)
        retry = self.retry_reason(job, rf, stop, code, sig)
        if retry is not None:
            return self.record(rs, job, "retry", rf, detail=retry, exit_code=code, signal=sig,
                               **produced)
        return self.record(rs, job, "finished", rf, exit_code=code, signal=sig, **stopped,
                           **produced)

    def retry_reason(self, job: Job, rf: RunFiles, stop: Optional[Mapping[str, Any]],
                     code: Optional[int], sig: Optional[int]) -> Optional[str]:
        """`retry 1 of 3 after exit 137` when this attempt failed by itself (a non-zero
        exit, or a signal git tq did not send) and the job may be retried (`--retry N`,
        from its launch file) with time left; None otherwise. A stop of ours (a kill, a
        time limit, a preemption under way) is never retried."""
        failed = sig is not None or (code is not None and code != 0)
        if not failed or (stop and (stop.get("signalled") or stop.get("kind") != "preempt")):
            return None
        retries = (rf.read(rf.launch) or {}).get("retries")
        if not isinstance(retries, int) or job.retried >= retries or self.time_up(job, rf):
            return None  # none left, or its time is up: another attempt would only stop
        cause = f"signal {sig}" if sig is not None else f"exit {code}"
        return f"retry {job.retried + 1} of {retries} after {cause}"

    def time_up(self, job: Job, rf: RunFiles) -> Optional[str]:
        """`time limit 2h reached` when the attempt that just ended used up the job's
        time limit (from its launch file); None otherwise."""
        limit = (rf.read(rf.launch) or {}).get("time_limit")
        due = job.time_limit_due(limit if isinstance(limit, int) else None)
        if limit is None or due is None or time.time() < due:
            return None
        return f"time limit {format_duration(limit)} reached"

    def time_limit(self, rs: RepoState, job: Job) -> Optional[int]:
        """The job's time limit in seconds: from its record, which is ours (the callers
        check), as its priority and grace are, so `git tq edit --time` takes effect at
        the next cycle."""
        limit = job.spec.time_limit
        return limit if isinstance(limit, int) and limit > 0 else None

    def enforce_time_limit(self, rs: RepoState, job: Job) -> Job:
        """Begin stopping a running job whose running time, summed over its attempts, has
        reached its time limit: its stop signal, its grace, SIGKILL (a `.stop` of kind
        timeout, so a restarted daemon carries it through). Its end is recorded failed."""
        limit = self.time_limit(rs, job)
        due = job.time_limit_due(limit)
        if limit is None or due is None or time.time() < due or \
                os.path.exists(RunFiles(self.home, rs.key, job.id).ended):
            return job  # not due, or its processes are gone already
        self.request_stop(rs, job, "timeout", f"time limit {format_duration(limit)} reached",
                          now=False)
        return rs.active.get(job.id, job)

    def record(self, rs: RepoState, job: Job, event: str, rf: RunFiles,
               tree: Optional[str] = None, log_blob: Optional[str] = None,
               **fields: Any) -> Job:
        """Record an attempt's end (or a start that failed): the event, and what the
        attempt produced (`tree`: the code plus its outputs; its metrics and outputs
        summary in `fields`); then the log is stored, run files go, hooks run."""
        when = now_iso()
        if fields.get("outputs") is None:
            fields.pop("outputs", None)
        if log_blob:
            # Before the ending is recorded: a crash in between leaves the exit file,
            # so the next daemon stores it again (the same blob) and records the end.
            try:
                rs.store.store_log(job, log_blob)
            except (TqError, OSError) as exc:
                log.warning("job %d: its log could not be kept in git: %s", job.id, exc)
        try:
            new = advance(rs, job, event, when, tree, **fields)
        except (InvalidTransition, RefRace, NotOurs) as exc:
            log.warning("job %d: could not record %s: %s", job.id, event, exc)
            return job
        self.remember(rs, new)
        log.info("job %d in %s: %s -> %s", job.id, rs.common, event, new.state.value)
        rf.clear()
        if new.state.finished:
            rf.drop_metrics()
            # Its environment (secrets included) is kept only while a resume may need it.
            entry = rs.entries.get(job.id) or rs.local.entry(job.id)
            if entry is not None:
                rs.local.drop_spec(entry.submission)
            keep = new.state is State.FAILED and \
                rs.config.get("tq.keepworktrees", "false").lower() in ("true", "yes", "1")
            if not keep:
                self.cleanup.append((rs, new))  # after this cycle's starts
            else:
                self.made_with.pop((rs.key, job.id), None)
            if rs.config.get("tq.autopush", "false").lower() in ("true", "yes", "on", "1"):
                self.auto_push(rs)
        hook = {"preempted": "preempt", "cancelled": "finish", "finished": "finish",
                "start-failed": "finish", "timed-out": "finish"}.get(event)
        if hook:
            self.run_hook(rs, new, hook)
        return new

    def enforce_stop(self, rf: RunFiles, job: Job, stop: Mapping[str, Any],
                     ident: Mapping[str, Any]) -> None:
        """Send the stop signal once (to the main process, or as the job's private record
        says), then SIGKILL to the group and every descendant at the deadline."""
        if os.path.exists(rf.ended):
            return  # the job is gone; the supervisor's own git processes are not the job
        target, pgid = ProcessId(*ident["job"]), int(ident["pgid"])
        reaper = ProcessId(*ident["supervisor"])
        if not stop.get("signalled"):
            # How to stop it comes from the launch file, written from the private record.
            launch = rf.read(rf.launch) or {}
            name = launch.get("stop_signal")
            sig = stop_signal_number(name) if name in STOP_SIGNALS else int(signal.SIGTERM)
            plan = plan_stop(target, pgid, whole_group=launch.get("stop_target") == "group")
            # Recorded before it is sent: a stop is signalled once, even across a crash
            # (the deadline's SIGKILL is the safety net), and the supervisor learns whom
            # it went to if the main process ends at once.
            stop = {**stop, "signalled": True, "signalled_at": time.time(), "signal": sig,
                    "target": plan.target}
            rf.write(rf.stop, stop)
            plan.send(sig)
            log.info("job %d: %s sent to %s", job.id, signal.Signals(sig).name,
                     {"main": "its main process", "children": "the children of its shell",
                      "group": "its process group", "none": "nobody (it had ended)"}
                     [plan.target])
        if time.time() >= float(stop["deadline"]):
            kill(target, pgid, reaper)

    def update_deadline(self, repos: list[RepoState]) -> None:
        """The nearest stop deadline of a stopping job, or time limit of a running one (the
        loop wakes for it)."""
        deadlines = []
        for rs in repos:
            for job in rs.active.values():
                if job.state in (State.RUNNING, State.STOPPING):
                    rf = RunFiles(self.home, rs.key, job.id)
                    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                        stop = rf.read(rf.stop)
                        if stop is not None:
                            deadlines.append(float(stop["deadline"]))
                if job.state is State.RUNNING and rs.ours(job) is not None:
                    due = job.time_limit_due(self.time_limit(rs, job))
                    if due is not None:
                        deadlines.append(due)
        self.next_deadline = min(deadlines) + 0.01 if deadlines else None

    def request_stop(self, rs: RepoState, job: Job, kind: str, reason: str,
                     now: bool) -> None:
        """Begin stopping a running job: its stop signal now, SIGKILL after its grace."""
        rf = RunFiles(self.home, rs.key, job.id)
        if rf.read(rf.stop):
            return
        grace = 0 if now else job.spec.grace
        rf.write(rf.stop, {"kind": kind, "reason": reason, "deadline": time.time() + grace,
                           "signalled": False})
        if job.state is State.RUNNING:
            try:
                self.remember(rs, advance(rs, job, "stopping", now_iso(), detail=reason))
            except (InvalidTransition, RefRace, NotOurs) as exc:
                log.warning("job %d: %s", job.id, exc)
        ident = rf.read(rf.ident)
        stop = rf.read(rf.stop)
        if ident and stop:
            self.enforce_stop(rf, job, stop, ident)
        log.info("job %d in %s: stopping (%s)", job.id, rs.common, reason)

    def kill_jobs(self, common: str, ids: list[int], now: bool) -> list[int]:
        if os.path.realpath(common) not in map(os.path.realpath, self.home.registered_repos()):
            raise TqError(f"{common} has no jobs of this daemon")
        local = self.ledgers.setdefault(common, LocalJobs(self.home.path, common))
        rs = open_repo(common, local)
        rs.entries = local.entries()
        done = []
        for job_id in ids:
            job = rs.store.load(job_id)
            rs.store.require_ours(job, "killed")
            if job.state not in (State.RUNNING, State.STOPPING):
                raise TqError(f"job {job_id} is {job.state.value}, not running")
        for job_id in ids:
            job = rs.store.load(job_id)
            rf = RunFiles(self.home, rs.key, job_id)
            old = rf.read(rf.stop)
            if old and old.get("kind") in ("preempt", "timeout"):  # a kill outranks them
                rf.write(rf.stop, {**old, "kind": "kill", "reason": "killed by the user",
                                   "deadline": time.time() if now else old["deadline"]})
            elif old is None:
                self.request_stop(rs, job, "kill", "killed by the user", now)
            elif now:
                rf.write(rf.stop, {**old, "deadline": time.time()})
            ident, stop = rf.read(rf.ident), rf.read(rf.stop)
            if ident and stop:
                self.enforce_stop(rf, job, stop, ident)
            done.append(job_id)
        self.update_deadline(list(self.repos.values()))
        return done

    # --- starting a job ---------------------------------------------------------------

    def start(self, rs: RepoState, job: Job, assigned: tuple[int, ...]) -> None:
        """Run one of our pending jobs: what runs (command, cwd, environment, code) comes
        from the private record named by the ledger, never from the job's record."""
        entry = rs.ours(job)
        if entry is None:
            return
        spec = rs.local.load_spec(entry.submission)
        # A retry's next attempt is a start again; after a preemption it is a resume.
        event = "resumed" if job.attempt > 0 and job.event != "retry" else "started"
        try:
            job = advance(rs, job, event, now_iso(), assigned_gpus=assigned)
        except (InvalidTransition, RefRace, NotOurs) as exc:
            log.info("job %d not started: %s", job.id, exc)
            self.read_everything = True  # someone else wrote it: read it again
            return
        self.remember(rs, job)
        rf = RunFiles(self.home, rs.key, job.id)
        logfile = rs.store.log_path(job)
        try:
            if spec is None:
                raise TqError("its private record in the tq home is missing (submitted by an "
                              "older git tq, or deleted); requeue it")
            worktree = self.ensure_worktree(rs, job, entry.submission, spec)
            settings = self.checkout_settings(rs)
            if settings is not None and not spec.nested and not spec.present:
                self.made_with[(rs.key, job.id)] = settings
            env = self.job_env(job, spec, assigned, logfile, worktree, rf.metrics)
            argv = shell_argv(spec.command[0]) if spec.shell else list(spec.command)
            cwd = safe_join(worktree, spec.cwd)
            rf.clear()
            launch = {
                "gpus": list(assigned),
                "job_id": job.id, "attempt": job.attempt, "argv": argv, "cwd": cwd, "env": env,
                "log": logfile, "banner": banner(job, rs, worktree, assigned),
                "lock": rf.lock, "ident": rf.ident, "exit": rf.exit, "stop": rf.stop,
                "ended": rf.ended,
                "stop_signal": spec.stop_signal, "stop_target": spec.stop_target,
                "time_limit": spec.time_limit, "retries": spec.retries,
                "socket": self.home.socket_path(),
                "results": {"common": rs.common, "worktree": worktree,
                            "submission": entry.submission, "metrics_file": rf.metrics,
                            "limits": results.Limits.from_config(rs.config).to_json()},
            }
            rf.write(rf.launch, launch)
            self.supervisors.add(fork_supervisor(launch))
        except (TqError, OSError) as exc:
            reason = f"could not start: {exc}"
            from git_tq.home import ensure_log_folder, open_private

            ensure_log_folder(logfile)  # 0600 in 0700 folders, as the supervisor's
            with open(open_private(logfile), "a", encoding="utf-8") as fh:
                fh.write(banner(job, rs, "", assigned) + f"\n[git tq] {reason}\n")
            self.record(rs, job, "start-failed", rf, detail=reason)
            return
        log.info("job %d in %s: %s on GPUs %s", job.id, rs.common, event, assigned or "cpu")
        self.run_hook(rs, job, "resume" if event == "resumed" else "start")

    def prepare_worktree(self, rs: RepoState, job: Job) -> None:
        """Begin checking out a waiting job's worktree in the background (a `git worktree
        add` process the loop does not wait for), so the daemon stays responsive."""
        path = self.home.worktree_dir(rs.key, job.id)
        entry = rs.ours(job)
        if entry is None or path in self.preparing or (os.path.isdir(path) and os.listdir(path)) \
                or os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
            return
        spec = rs.local.load_spec(entry.submission)
        if spec is None:
            return
        ensure_private_dir(os.path.dirname(path))
        if self.take_spare(rs, path, entry.submission, spec):
            try:  # a few ms here, where a checkout would take the CPU the next start needs
                jobtree.complete(rs.common, path, spec, rs.config)
                jobtree.mark_complete(path, entry.submission)
            except (OSError, TqError):
                self.drop_spare(rs, path)  # its start checks it out the long way
            return
        proc = subprocess.Popen(
            ["git", *CHECKOUT_OPTIONS, "--git-dir", rs.common, "worktree", "add", "--detach",
             "-f", "--", path, entry.submission], cwd=rs.common,
            env=without_repo_vars(os.environ),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.preparing[path] = Checkout(proc, rs, spec)

    def ensure_worktree(self, rs: RepoState, job: Job, submission: str,
                        spec: LocalSpec) -> str:
        """The job's worktree: a checkout of our own submission commit."""
        path = self.home.worktree_dir(rs.key, job.id)
        if os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
            # Only a finished job's worktree is kept: this id was a forgotten job's.
            raise TqError(f"{path} holds the kept worktree of an earlier job {job.id}, with "
                          f"files it wrote; `git tq gc --outputs {job.id}` removes it")
        early = self.preparing.pop(path, None)
        if early is not None:
            if early.proc.wait() == 0:
                self.finish_checkout(path, early)
                if early.error:
                    raise TqError(f"preparing the worktree failed: {early.error}")
                return path
            shutil.rmtree(path, ignore_errors=True)  # a failed checkout: try again below
            run_git(["--git-dir", rs.common, "worktree", "prune"], rs.common, check=False)
        elif os.path.isdir(path) and os.listdir(path):
            mark, ran = jobtree.completed(path), job.attempt > 1
            if mark == submission or (mark is None and ran and jobtree.head(path) == submission):
                return path  # a resumed job: same worktree, checkpoints and all
            if mark is None and ran:
                # Maybe its checkpoints, maybe a checkout cut short: never run, never deleted.
                raise TqError(f"{path} is not a complete checkout of the job's code (a daemon "
                              "killed while making it?); it is left for you to look at, "
                              f"`git tq gc --outputs {job.id}` removes it")
            # A checkout or completion cut short, of a job that never ran: made again.
            log.warning("job %d: %s is not a complete checkout of its code; checked out "
                        "again", job.id, path)
            self.drop_spare(rs, path)
        ensure_private_dir(os.path.dirname(path))
        rs.last_submission = submission  # the next spare worktree starts from it
        if not self.take_spare(rs, path, submission, spec):
            p = run_git([*CHECKOUT_OPTIONS, "--git-dir", rs.common, "worktree", "add",
                         "--detach", "-f", "--", path, submission], rs.common,
                        env=without_repo_vars(os.environ), check=False)
            if p.returncode != 0:
                raise TqError("git worktree add failed: "
                              + p.stderr.decode(errors="replace").strip().splitlines()[-1])
        jobtree.complete(rs.common, path, spec, rs.config)
        jobtree.mark_complete(path, submission)
        return path

    # --- the spare worktree -------------------------------------------------------

    def spare_path(self, rs: RepoState) -> str:
        return os.path.join(self.home.path, "spare", rs.key)

    def make_spare(self, rs: RepoState) -> None:
        """Check out, in the background, a worktree no job has run in, for the next job
        that finds a free slot: moving it into place and checking out only the files
        that differ (`take_spare`) costs a quarter of a `git worktree add`."""
        if rs.key in self.spares or rs.last_submission is None or \
                any(c.proc.poll() is None for c in self.preparing.values()):
            return  # the waiting jobs' checkouts first
        path = self.spare_path(rs)
        if os.path.lexists(path):  # left by an earlier daemon: never trusted as pristine
            self.drop_spare(rs, path)
        ensure_private_dir(os.path.dirname(path))
        with contextlib.suppress(OSError):
            proc = subprocess.Popen(
                ["git", *CHECKOUT_OPTIONS, "--git-dir", rs.common, "worktree", "add",
                 "--detach", "-f", "--", path, rs.last_submission], cwd=rs.common,
                env=without_repo_vars(os.environ), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.spares[rs.key] = Spare(proc, path, rs.last_submission,
                                        self.checkout_settings(rs))

    def checkout_settings(self, rs: RepoState) -> Optional[tuple[Any, ...]]:
        """Stamps of what, besides the commits, decides the bytes a checkout writes: the
        config files (core.autocrlf, core.eol, filters, core.attributesFile...), the
        repository's info/attributes and the user's attributes files. None when one
        changed too recently to tell."""
        config = config_stamp(rs.common)
        if config is None:
            return None
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".config")
        files = [os.path.join(rs.common, "info", "attributes"),
                 os.path.join(xdg, "git", "attributes")]
        own = rs.config.get("core.attributesfile")
        if own:
            files.append(os.path.expanduser(own))
        stamps = settled(tuple(file_stamp(f) for f in files))
        return None if stamps is None else (config, stamps)

    def take_spare(self, rs: RepoState, path: str, submission: str, spec: LocalSpec) -> bool:
        """Make `path` a checkout of `submission` from the spare worktree, if one is ready
        and the result is exactly what `git worktree add` would give: no job ran in it,
        and the attributes (which decide how files are written) are the same in both
        commits. Jobs with nested repositories or sparse files take the long way."""
        spare = self.spares.get(rs.key)
        if spare is None or spare.proc.poll() != 0 or spec.nested or spec.present:
            return False
        del self.spares[rs.key]
        env = without_repo_vars(os.environ)
        try:
            if spare.written_by != self.checkout_settings(rs) or spare.written_by is None:
                raise TqError("the attributes or config that decide how files are written "
                              "changed since it was checked out")
            if spare.commit != submission:
                changed = run_git(["--git-dir", rs.common, "diff-tree", "-r", "--name-only",
                                   spare.commit, submission, "--", ":(glob)**/.gitattributes"],
                                  rs.common, env=env).stdout
                if changed.strip():
                    raise TqError("the attributes differ")
                # In the spare's own place first: a daemon killed here leaves a spare,
                # which the next daemon never uses, and no job folder.
                run_git([*jobtree.NO_HOOKS, "checkout", "-q", "--detach", "-f",
                         "--no-recurse-submodules", submission, "--"], spare.path, env=env)
            run_git([*jobtree.NO_HOOKS, "--git-dir", rs.common, "worktree", "move",
                     spare.path, path], rs.common, env=env)
            self.stats["spare_worktrees_used"] += 1
            return True
        except (TqError, OSError) as exc:
            log.debug("spare worktree not used: %s", exc)
            for leftover in (spare.path, path):
                if os.path.lexists(leftover):
                    self.drop_spare(rs, leftover)
            return False

    def drop_spare(self, rs: RepoState, path: str) -> None:
        from git_tq.gitrepo import remove_worktree

        with contextlib.suppress(TqError, OSError):
            remove_worktree(rs.common, path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)

    # --- recycling a finished job's worktree ------------------------------------------

    def recycling(self) -> set[str]:
        """Finished jobs' worktrees that a child is recycling right now."""
        return {c.recycled_from for c in self.preparing.values()
                if c.recycled_from and c.proc.poll() is None}

    def leave_for_recycling(self, ahead: list[tuple[RepoState, Job]],
                            ending: Mapping[str, int]) -> list[tuple[RepoState, Job]]:
        """The waiting jobs of `ahead` to check out now: in a repository where attempts
        are over but not yet recorded, the last of them (as many) are left for those
        attempts' worktrees to be recycled into once their endings are recorded."""
        left = dict(ending)
        keep: list[tuple[RepoState, Job]] = []
        for rs, job in reversed(ahead):
            if left.get(rs.key, 0) > 0:
                left[rs.key] -= 1
                continue
            keep.append((rs, job))
        return keep[::-1]

    def recycle_target(self, rs: RepoState, ended: Job, ahead: list[tuple[RepoState, Job]]) \
            -> Optional[tuple[Job, str, LocalSpec]]:
        """A waiting job (one of `ahead`, taken from it) whose worktree can be made from
        `ended`'s: ours, started by this daemon in a worktree checked out under the same
        settings as now, and neither job with nested repositories or sparse files."""
        made = self.made_with.pop((rs.key, ended.id), None)
        if made is None or made != self.checkout_settings(rs) or ended.outputs is None:
            return None
        for i, (wrs, job) in enumerate(ahead):
            path = self.home.worktree_dir(rs.key, job.id)
            if wrs is not rs or path in self.preparing or os.path.lexists(path) or \
                    os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
                continue
            entry = rs.ours(job)
            spec = rs.local.load_spec(entry.submission) if entry is not None else None
            if entry is None or spec is None or spec.nested or spec.present:
                continue
            del ahead[i]
            return job, entry.submission, spec
        return None

    def recycle(self, rs: RepoState, ended: Job, job: Job, submission: str,
                spec: LocalSpec) -> None:
        """Make `job`'s worktree out of `ended`'s in a forked child (`recycle_worktree`):
        a `git clean` and a checkout of the files that differ cost a fraction of
        removing one worktree and adding another. The child's exit wakes the loop."""
        old = self.home.worktree_dir(rs.key, ended.id)
        new = self.home.worktree_dir(rs.key, job.id)
        entry = rs.entries.get(ended.id) or rs.local.entry(ended.id)
        ensure_private_dir(os.path.dirname(new))
        pid = in_child(lambda: self.recycle_worktree(
            rs, ended, old, new, entry.submission if entry else "", submission),
            f"recycling {old}")
        self.preparing[new] = Checkout(Forked(pid), rs, spec, recycled_from=old)

    def recycle_worktree(self, rs: RepoState, ended: Job, old: str, new: str,
                         old_submission: str, submission: str) -> int:
        """In the child: turn the worktree at `old` into a checkout of `submission` at
        `new`, exactly what `git worktree add` would give, or else remove (or keep) it as
        `remove_worktree` does and return RECYCLE_DECLINED.

        It is recycled only when what the job left is all expendable: nothing unsaved
        (`check_kept`), no index entry marked assume-unchanged or skip-worktree (a
        checkout would trust such a file as it is), and the same .gitattributes in both
        commits. Then `git clean -ffdx` removes every untracked and ignored file and
        `git checkout -f` rewrites every tracked file that differs from `submission`."""
        from git_tq.gitrepo import registered_worktree

        env = without_repo_vars(os.environ)
        if registered_worktree(rs.common, old) is None or not old_submission:
            self.remove_worktree(rs, ended.id, True, ended)
            return RECYCLE_DECLINED
        kept = jobtree.check_kept(old, old_submission, ended.outputs)
        if kept is not None:
            jobtree.keep(self.home.path, rs.key, ended.id, kept)
            log.info("job %d in %s: worktree %s %s", ended.id, rs.common, old, kept.reason)
            return RECYCLE_DECLINED
        flags = run_git(["ls-files", "-v", "-z"], old, env=env).stdout.split(b"\0")
        changed = b""
        if old_submission != submission:
            changed = run_git(["--git-dir", rs.common, "diff-tree", "-r", "--name-only",
                               old_submission, submission, "--", ":(glob)**/.gitattributes"],
                              rs.common, env=env).stdout
        if changed.strip() or any(f and not f.startswith(b"H ") for f in flags):
            log.info("job %d in %s: worktree not recycled (%s)", ended.id, rs.common,
                     "the attributes differ" if changed.strip() else
                     "index entries marked assume-unchanged or skip-worktree")
            self.remove_worktree(rs, ended.id, False)  # `check_kept` found nothing to keep
            return RECYCLE_DECLINED
        run_git([*jobtree.NO_HOOKS, "clean", "-ffdxq"], old, env=env)
        admin = jobtree.admin_dir(old)
        for name in (jobtree.COMPLETE_MARK, "tq-exclude"):
            if admin is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(admin, name))
        run_git([*CHECKOUT_OPTIONS, "checkout", "-q", "--detach", "-f",
                 "--no-recurse-submodules", submission, "--"], old, env=env)
        run_git([*jobtree.NO_HOOKS, "--git-dir", rs.common, "worktree", "move", old, new],
                rs.common, env=env)
        log.debug("job %d in %s: worktree recycled for %s", ended.id, rs.common, new)
        return 0

    def remove_in_background(self, rs: RepoState, job_id: int, ran: bool = True,
                             record: Optional[Job] = None) -> None:
        """`remove_worktree` in a forked child: checking what a job wrote (`git status`)
        and deleting a big worktree take long, and the loop must keep serving the socket
        and starting jobs meanwhile. The child's exit wakes the loop (SIGCHLD)."""
        path = self.home.worktree_dir(rs.key, job_id)
        self.made_with.pop((rs.key, job_id), None)
        if path in self.removals.values() or path in self.recycling():
            return
        def remove() -> int:
            self.remove_worktree(rs, job_id, ran, record)
            return 0

        self.removals[in_child(remove, f"removing {path}")] = path

    def remove_worktree(self, rs: RepoState, job_id: int, ran: bool = True,
                        record: Optional[Job] = None) -> None:
        """Remove a finished job's worktree, unless the job wrote files there that are not
        ignored (nothing records them yet): that worktree is kept, and the reason recorded
        in the tq home for `git tq show` and `git tq gc`. `ran`: False for a job that never
        started (a prepared worktree), which has nothing of its own to keep."""
        from git_tq.gitrepo import registered_worktree, remove_worktree

        path = self.home.worktree_dir(rs.key, job_id)
        if ran and registered_worktree(rs.common, path) is not None:
            entry = rs.entries.get(job_id) or rs.local.entry(job_id)
            try:  # the ending this daemon just recorded, else the record as it is now
                outputs = (record or rs.store.load(job_id)).outputs
            except TqError:
                outputs = None
            kept = jobtree.check_kept(path, entry.submission if entry else "", outputs)
            if kept is not None:
                jobtree.keep(self.home.path, rs.key, job_id, kept)
                log.info("job %d in %s: worktree %s %s", job_id, rs.common, path, kept.reason)
                return
        if os.path.lexists(path):
            # Never `git worktree remove` a path the job may have replaced by a symlink:
            # only the registered real directory goes; a link is only unlinked.
            outcome = remove_worktree(rs.common, path)
            if outcome != "removed":
                log.warning("job %d's worktree %s was not a registered worktree; %s", job_id,
                            path, "only the link was removed" if outcome == "unlinked"
                            else "it was left alone")

    def sweep_worktrees(self, rs: RepoState) -> None:
        """Remove the worktrees of our jobs that ended without the daemon recording it:
        waiting jobs cancelled by `rm`, `purge` or `kill` (their prepared worktrees, or
        checkouts still under way), and jobs that ended while no daemon ran. A kept
        worktree, and a failed job's under tq.keepWorktrees, stay."""
        root = os.path.join(self.home.path, "worktrees", rs.key)
        try:
            names = set(os.listdir(root))
        except OSError:
            names = set()
        prepared = {p for p, c in self.preparing.items() if c.rs.key == rs.key}
        if not names and not prepared:
            return
        keep_failed = rs.config.get("tq.keepworktrees", "false").lower() in ("true", "yes", "1")
        for path in prepared:
            job = self.ended_job(rs, int(os.path.basename(path)))
            if job is not None and not job.state.finished:
                continue
            if job is not None and rs.ours(job) is None:
                continue  # not ours to judge: its record may say anything
            checkout = self.preparing[path]
            if checkout.proc.poll() is None:
                if path not in self.abandoned:
                    log.debug("%s: its job left the queue; removed once checked out", path)
                self.abandoned.add(path)  # removed once `git worktree add` is done
                continue
            del self.preparing[path]
            self.abandoned.discard(path)
            names.discard(os.path.basename(path))
            self.remove_worktree(rs, int(os.path.basename(path)), ran=False)  # never ran: quick
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)  # a failed checkout git never knew
        busy = set(self.removals.values()) | self.recycling()
        for name in names:
            path = os.path.join(root, name)
            if path in busy or path in self.left_alone:
                continue  # being removed right now, or not ours to remove
            job = self.ended_job(rs, int(name)) if name.isascii() and name.isdigit() \
                and len(name) < 19 else None
            if job is None or not job.state.finished or rs.ours(job) is None or \
                    (keep_failed and job.state is State.FAILED) or path in self.left_alone or \
                    os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
                continue
            self.remove_worktree(rs, job.id, ran=job.attempt > 0)
            if os.path.lexists(path) and not os.path.exists(
                    jobtree.kept_record(self.home.path, rs.key, job.id)):
                self.left_alone.add(path)  # not a registered worktree: `git tq gc` decides

    def job_env(self, job: Job, spec: LocalSpec, assigned: tuple[int, ...], logfile: str,
                worktree: str, metrics_file: str) -> dict[str, str]:
        from git_tq import envs

        env = without_repo_vars(spec.environ)
        if spec.env_name:
            env = envs.activate(spec.env_name, env)
        env.update({
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, assigned)),
            "TQ_JOB_ID": str(job.id), "TQ_ATTEMPT": str(job.attempt),
            "TQ_RESUMED": "1" if job.attempt > 1 else "0", "TQ_LOG": logfile,
            "TQ_SOURCE_DIR": spec.source_dir, "TQ_WORKTREE": worktree,
            "TQ_PRIORITY": str(job.spec.priority), "TQ_TAG": job.spec.tag or "",
            "TQ_METRICS": metrics_file,
        })
        env.update(jobtree.job_git_config(worktree, env))
        return env

    # --- tq.autoPush ----------------------------------------------------------------

    def auto_push(self, rs: RepoState) -> None:
        """Start a best-effort `git tq push` of the repository in the background (its own
        process and session; the loop never waits for it). One at a time per repository:
        a job that ends while one runs gets one more push after it, never a retry."""
        if rs.common in self.pushing:
            self.push_again.add(rs.common)
            return
        err_path = os.path.join(self.home.path, f"push-{rs.key}.err")
        try:
            with open(err_path, "wb") as err:  # in the 0700 home: git's words, no secrets
                proc = subprocess.Popen(
                    [sys.executable, "-m", "git_tq", "push"], cwd=rs.common,
                    env={**without_repo_vars(os.environ), "GIT_TERMINAL_PROMPT": "0"},
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True)
        except OSError as exc:
            log.warning("%s: tq.autoPush could not start git tq push: %s", rs.common, exc)
            return
        self.pushing[rs.common] = (proc, time.monotonic(), err_path)

    def reap_pushes(self) -> None:
        """Log the pushes that failed, give up on any that ran too long (killed, not
        retried), and start the one more push a job's ending asked for meanwhile."""
        for common, (proc, started, err_path) in list(self.pushing.items()):
            code = proc.poll()
            if code is None and time.monotonic() - started > AUTO_PUSH_TIMEOUT:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
                log.warning("%s: tq.autoPush: git tq push took over %d s; stopped",
                            common, AUTO_PUSH_TIMEOUT)
            if code is None:
                continue
            del self.pushing[common]
            if code != 0:
                try:
                    with open(err_path, "rb") as fh:
                        why = fh.read(4096).decode(errors="replace").strip().splitlines()
                except OSError:
                    why = []
                log.warning("%s: tq.autoPush failed (not retried): %s", common,
                            why[-1] if why else f"exit {code}")
            with contextlib.suppress(OSError):
                os.unlink(err_path)
            rs = self.repos.get(common)
            if common in self.push_again and rs is not None:
                self.push_again.discard(common)
                self.auto_push(rs)

    # --- hooks ---------------------------------------------------------------------

    def run_hook(self, rs: RepoState, job: Job, event: str) -> None:
        configured = rs.config.get("core.hookspath")
        if configured:
            hooks_dir = os.path.expanduser(configured)
            if not os.path.isabs(hooks_dir):  # relative to the work tree's top, as in git
                hooks_dir = os.path.join(os.path.dirname(rs.common), hooks_dir)
        else:
            hooks_dir = os.path.join(rs.common, "hooks")
        path = os.path.join(hooks_dir, f"tq-{event}")
        if not os.access(path, os.X_OK):
            return
        env = {**without_repo_vars(os.environ), **hook_env(job, event, rs.common)}
        try:
            self.hooks.append(subprocess.Popen([path], env=env, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL,
                                               start_new_session=True, cwd=rs.common))
        except OSError as exc:
            log.warning("hook %s failed to start: %s", path, exc)


def in_child(work: Callable[[], int], what: str) -> int:
    """Run `work` in a forked child of the loop, whose exit status is what it returns
    (70 if it raised); the child's pid. The child leaves the loop's signal handling
    and closes every descriptor above stderr, above all the daemon's lock."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        code = work()
    except BaseException:  # noqa: BLE001 - a child must never return into the loop
        log.exception("%s failed", what)
    finally:
        os._exit(code)


def stop_outcome(stop: Optional[Mapping[str, Any]],
                 outcome: Mapping[str, Any]) -> dict[str, Any]:
    """How a signalled stop went, for the record: stop (clean: the job ended by itself
    before its deadline; forced: SIGKILL) and stop_seconds (from the signal to the end).
    Empty when no stop signal was sent."""
    if not stop or not stop.get("signalled"):
        return {}
    forced = bool(outcome.get("forced")) or outcome.get("signal") == signal.SIGKILL
    fields: dict[str, Any] = {"stop": "forced" if forced else "clean"}
    sent, ended = stop.get("signalled_at"), outcome.get("ended")
    if isinstance(sent, (int, float)) and isinstance(ended, (int, float)):
        fields["stop_seconds"] = round(min(max(0.0, ended - sent), 10.0**8), 1)
    return fields


def safe_join(worktree: str, cwd: str) -> str:
    """The job's working directory: `cwd` (relative, checked) inside its worktree, and
    never outside it, even through a symlink in the snapshot."""
    from git_tq.recordfmt import RecordFormatError, relative_path

    try:
        rel = relative_path(cwd)
    except RecordFormatError:
        raise TqError(f"bad working directory {cwd!r}") from None
    path = os.path.join(worktree, rel) if rel else worktree
    real_root = os.path.realpath(worktree)
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise TqError(f"the working directory {cwd!r} leaves the job's worktree")
    return path


def fork_supervisor(launch: Mapping[str, Any]) -> int:
    """Start the job's supervisor as a forked copy of the daemon, in a session of its own.

    A fork costs a millisecond where a fresh interpreter (`python -m
    git_tq.supervisor`) costs ~100 ms of start-up and imports. The child keeps
    no descriptor of the daemon's: above all not the daemon's lock, which would
    keep a restarted daemon out for as long as the job runs.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        code = supervisor.run(dict(launch))
    finally:
        os._exit(code)


def hook_env(job: Job, event: str, common: str) -> dict[str, str]:
    s = job.spec
    values = {
        "TQ_EVENT": event, "TQ_JOB_ID": job.id, "TQ_STATE": job.state.value,
        "TQ_COMMAND": s.command_line(), "TQ_PRIORITY": s.priority, "TQ_TAG": s.tag or "",
        "TQ_EXIT_CODE": "" if job.exit_code is None else job.exit_code,
        "TQ_SIGNAL": "" if job.signal is None else job.signal, "TQ_ATTEMPT": job.attempt,
        "TQ_GPUS": ",".join(map(str, job.assigned_gpus or ())), "TQ_DETAIL": job.detail or "",
        "TQ_SNAPSHOT": job.snapshot, "TQ_SOURCE": job.source or "",
        "TQ_SUBMITTED_AT": s.submitted_at, "TQ_STARTED_AT": job.started_at or "",
        "TQ_ENDED_AT": job.ended_at or "", "TQ_REPO": common,
    }
    return {k: str(v) for k, v in values.items()}


def banner(job: Job, rs: RepoState, worktree: str, assigned: tuple[int, ...]) -> str:
    s = job.spec
    when = now_iso()
    if job.attempt > 1:
        what = "RETRIED" if job.event == "started" else "RESUMED"
        return (f"\n{'=' * 72}\n[git tq] job {job.id} {what}: attempt {job.attempt} at {when}"
                f" on GPUs {','.join(map(str, assigned)) or 'none (cpu)'}\n{'=' * 72}\n")
    lines = [
        f"[git tq] job {job.id}" + (f" [{s.tag}]" if s.tag else ""),
        f"  command   {s.command_line()}",
        f"  priority  {s.priority}   grace {s.grace}s   gpus "
        f"{','.join(map(str, assigned)) or 'none (cpu)'} (asked: {s.gpus.describe()})",
        f"  env       {s.env or '-'}",
        f"  source    {job.source or '(unborn branch)'}",
        f"  snapshot  {job.snapshot}",
        f"  repo      {rs.common}",
        f"  worktree  {worktree}",
        f"  restore   git tq checkout {job.id}",
        f"  started   {when} (attempt {job.attempt})",
    ]
    return "\n".join(lines) + f"\n{'-' * 72}\n"


def main() -> None:
    """`python -m git_tq.daemon HOME`: run a daemon in the foreground."""
    home = Home(sys.argv[1] if len(sys.argv) > 1 else os.environ["TQ_HOME"])
    run_foreground(home)


class SafeFormatter(logging.Formatter):
    """Log lines quote record text (paths, ids, reasons): control characters are shown
    as escapes, since `daemon --foreground` may log to a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        from git_tq.safetext import visible

        return visible(super().format(record), newlines=True)


def run_foreground(home: Home) -> None:
    # A daemon started from a shell with GIT_DIR (or GIT_CONFIG_*, ...) set would point
    # every git process of every repository at that one: start from a clean slate.
    from git_tq.gitrepo import clean_git_env

    for name in set(os.environ) - set(clean_git_env(os.environ)):
        del os.environ[name]
    level = logging.DEBUG if os.environ.get("TQ_DEBUG") else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    daemon = Daemon(home)
    try:
        daemon.serve()
    except AlreadyRunning as exc:
        log.info("%s", exc)
        sys.exit(0)


if __name__ == "__main__":
    main()
