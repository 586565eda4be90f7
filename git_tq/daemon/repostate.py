"""What the daemon knows of each repository between cycles (`RepoState`), and
reading only what changed since the last cycle (`Reading`): every ref on a nudge that
names no job, the named jobs' refs on one that does, the config and the ledger when
their files changed; records the daemon wrote itself are remembered, not read back.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from git_tq import recordfmt
from git_tq.daemon.base import DaemonBase, log
from git_tq.errors import TqError
from git_tq.gitrepo import Repo, without_repo_vars
from git_tq.home import repo_key
from git_tq.lifecycle import apply_event
from git_tq.localjobs import LedgerEntry, LocalJobs
from git_tq.model import Job, State
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

NAMED_READ_MAX = 64  # a nudge naming more jobs than this reads every ref instead
READ_CHUNK = 500  # records read by one `git cat-file --batch` when many tips changed
PACK_REFS_AFTER = 256  # loose job refs that make the daemon run `git pack-refs` (tq.packRefsAfter)
# A record that says it has ended needs no decoding to know the scheduler can skip it.
# Its state is all a dependency needs of it (`deps`), so it is kept: one int per job.
FINISHED = re.compile(r"^Tq-State: (done|failed|cancelled)$", re.MULTILINE)
ENDED_STATES = {s.value: s for s in State if s.finished}


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


class Reading(DaemonBase):
    """Bringing each repository's state up to date with what changed."""

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
            self.warn_once(rs, tip, f"refs/tq/jobs/{job_id} points at {tip[:12]}, which is "
                                    f"missing or not a commit: job {job_id} is ignored (git tq "
                                    "gc says how to repair it)")
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
