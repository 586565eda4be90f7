"""Job records in git: job refs and their lifecycle commits, notes, and log paths.

A job is `refs/tq/jobs/<id>`; its first commit (the submission, or snapshot
commit) has the snapshot as tree and the source commit as parent; each state
change is a further commit with the same tree. Every ref write is a
compare-and-swap (`git update-ref <ref> <new> <old>`), retried on a lost race.
Notes are `git notes --ref=tq` on the submission commit (git locks them).
"""

from __future__ import annotations

import contextlib
import functools
import marshal
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from git_tq import origins, recordfmt
from git_tq.errors import (
    BrokenRef,
    GitFailed,
    NotOurs,
    RefRace,
    TqError,
    UnknownJob,
    UnreadableRecord,
)
from git_tq.gitrepo import Repo, git_failure, git_message, out_of_space
from git_tq.home import create_temp_beside, ensure_private_dir
from git_tq.lifecycle import apply_event
from git_tq.localjobs import FETCHED, LOCAL, TAMPERED, LedgerEntry, LocalJobs, is_oid
from git_tq.model import (
    ORIGINS_PREFIX,
    ChangeSummary,
    GpuRequest,
    Job,
    JobSpec,
    Outputs,
    State,
    job_ref,
)
from git_tq.series import SERIES_REF

JOBS_PREFIX = "refs/tq/jobs/"
LIFECYCLE_MAX = 20_000  # records read from one job's history
NOTES_REF = "refs/notes/tq"
LOGS_REF = "refs/notes/tq-logs"  # each job's log, on its submission commit
CAS_ATTEMPTS = 50
MISSING = "missing object"  # an unreadable ref's reason when its object is not here
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def identity_env(config: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """Environment for commit-tree: the user's git identity, or a stand-in if unset."""
    env = dict(base)
    if not (config.get("user.name") or env.get("GIT_COMMITTER_NAME")):
        env.setdefault("GIT_AUTHOR_NAME", "git-tq")
        env.setdefault("GIT_COMMITTER_NAME", "git-tq")
    if not (config.get("user.email") or env.get("GIT_COMMITTER_EMAIL")):
        env.setdefault("GIT_AUTHOR_EMAIL", "git-tq@localhost")
        env.setdefault("GIT_COMMITTER_EMAIL", "git-tq@localhost")
    return env


@dataclass(frozen=True)
class Unreadable:
    """A ref under refs/tq/jobs/ that holds no valid record: listed, never used."""

    name: str  # the ref name after refs/tq/jobs/ (normally the id)
    tip: str
    reason: str


@dataclass(frozen=True)
class Listing:
    jobs: list[Job]
    unreadable: list[Unreadable]


def _is_number(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes '²' and other digits int() refuses)."""
    return text.isascii() and text.isdigit()


def _canonical(name: str) -> Optional[int]:
    try:
        return recordfmt.canonical_id(name)
    except recordfmt.RecordFormatError:
        return None


def split_name(name: str) -> tuple[Optional[str], Optional[int]]:
    """(origin, id) of a listed ref name: `7` (after refs/tq/jobs/) is (None, 7), a
    fetched job's `alice@gpu1:7` (see `JobStore.fetched_tips`) is ("alice@gpu1", 7);
    id None when the name is not canonical."""
    origin, colon, tail = name.rpartition(":")
    if not colon:
        return None, _canonical(name)
    return (origin, _canonical(tail)) if origins.is_origin(origin) else (None, None)


# --- noticing change without reading: stat data of the files git keeps refs in ---

Stamp = Optional[tuple[int, int, int]]  # inode, size, mtime (ns); None: absent
RACY_NS = 100_000_000  # a file changed this recently may change again within its mtime's tick


def file_stamp(path: str) -> Stamp:
    """Inode, size and mtime of a file or folder (None when absent)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def settled(stamps: tuple[Stamp, ...]) -> Optional[tuple[Stamp, ...]]:
    """`stamps`, or None when one of them changed so recently that another change within
    the same clock tick would leave it as it is (git's "racy" case): read again."""
    import time

    newest = max((s[2] for s in stamps if s is not None), default=0)
    return None if time.time_ns() - newest < RACY_NS else stamps


def jobs_ref_dir(common_dir: str) -> str:
    """The folder of the loose job refs."""
    return os.path.join(common_dir, *JOBS_PREFIX.strip("/").split("/"))


def refs_stamp(common_dir: str, *also: str) -> Optional[tuple[Stamp, ...]]:
    """Changes whenever a job ref is created, moved or deleted (git writes a loose ref by
    renaming a lock file into its folder, and rewrites packed-refs the same way), or one
    of the files or folders `also` changes; None when that cannot be told now (see
    `settled`), or ever (a reftable: no files to watch)."""
    if os.path.exists(os.path.join(common_dir, "reftable")):
        return None
    return settled((file_stamp(jobs_ref_dir(common_dir)),
                    file_stamp(os.path.join(common_dir, "packed-refs")),
                    *(file_stamp(path) for path in also)))


@dataclass
class JobStore:
    """Reads and writes the job records of one repository.

    Reading takes any record (and reports the unreadable ones); writing takes
    only this user's own records, through `local` (see localjobs).
    """

    repo: Repo
    commit_env: Mapping[str, str]
    local: Optional[LocalJobs] = None

    # --- reading ------------------------------------------------------------

    def listing(self, fetched: bool = False) -> Listing:
        """Every job of the repository by id, and every ref that holds no valid record;
        with `fetched`, the jobs fetched from other machines too (after the local ones,
        by origin and id).

        Records are commits, so a decoded record never goes stale: decoded
        records (and decoding errors) are cached by commit id (see
        `RecordCache`), and only tips not seen before are read from git.
        """
        tips = self.ref_tips()[0] + (self.fetched_tips() if fetched else [])
        cache = RecordCache(self.cache_dir)
        known, known_bad = cache.load()
        missing = [oid for oid, _ in tips if oid not in known and oid not in known_bad]
        fresh, fresh_bad = self.records(missing) if missing else ({}, {})
        jobs: list[Job] = []
        bad: list[Unreadable] = []
        seen: set[str] = set()
        for oid, name in tips:
            job = fresh.get(oid) or known.get(oid)
            origin, job_id = split_name(name)
            if origin is not None and job is not None:
                job = job.evolve(origin=origin)  # from the ref's name, never the record
            if job_id is None:
                bad.append(Unreadable(name, oid, "the ref name is not a canonical job id"))
            elif job is None:
                bad.append(Unreadable(name, oid, fresh_bad.get(oid) or known_bad.get(oid, "?")))
            elif job.id != job_id:
                bad.append(Unreadable(name, oid, f"the record says it is job {job.id}"))
            else:
                jobs.append(job)
            seen.add(oid)
        if fresh or fresh_bad or len(known) + len(known_bad) != len(seen):
            cache.save(jobs, {u.tip: u.reason for u in bad
                              if u.tip in fresh_bad or u.tip in known_bad})
        jobs.sort(key=lambda j: (j.origin or "", j.id))
        return Listing(jobs, bad)

    def list_jobs(self, fetched: bool = False) -> list[Job]:
        """Every readable job of the repository, by id (`fetched`: see `listing`)."""
        return self.listing(fetched).jobs

    def fetched_tips(self) -> list[tuple[str, str]]:
        """(tip, name) of every ref under refs/tq/origins/ (one git process), in ref name
        order: the name is `alice@gpu1:7` for a valid origin and canonical id (':' is in
        no ref name, so no local name looks like it), else `origins/<rest>` (unreadable)."""
        out = self.repo.out("for-each-ref", "--format=%(objectname) %(refname)",
                            ORIGINS_PREFIX)
        cut = len(ORIGINS_PREFIX)
        tips = []
        for oid, _, ref in (line.partition(" ") for line in out.splitlines()):
            split = origins.split_origin_ref(ref[cut:])
            job_id = _canonical(split[1]) if split is not None else None
            tips.append((oid, f"{split[0]}:{job_id}" if split is not None and job_id
                         else f"origins/{ref[cut:]}"))
        return tips

    @property
    def cache_dir(self) -> str:
        """Where listing caches live (`<common dir>/tq/cache`; any of them may go)."""
        return os.path.join(self.repo.common_dir, "tq", "cache")

    def ref_tips(self) -> tuple[list[tuple[str, str]], Optional[str]]:
        """(tip, name after refs/tq/jobs/) of every job ref, in ref name order, and the
        tip of refs/notes/tq (None: no notes), read by one `git for-each-ref`."""
        out = self.repo.out("for-each-ref", "--format=%(objectname) %(refname)",
                            JOBS_PREFIX, NOTES_REF)
        tips: list[tuple[str, str]] = []
        notes = None
        cut = len(JOBS_PREFIX)
        for line in out.splitlines():
            oid, _, ref = line.partition(" ")
            if ref.startswith(JOBS_PREFIX):
                tips.append((oid, ref[cut:]))
            elif ref == NOTES_REF:
                notes = oid
        return tips, notes

    def records(self, commits: Sequence[str]) -> tuple[dict[str, Job], dict[str, str]]:
        """The records held by `commits` (one `git cat-file --batch`), and why each of the
        others holds none."""
        missing: set[str] = set()
        messages = self._messages(list(commits), missing)
        jobs: dict[str, Job] = {}
        bad: dict[str, str] = {}
        for oid in commits:
            if oid not in messages:
                bad[oid] = MISSING if oid in missing else "not a commit"
                continue
            try:
                jobs[oid] = recordfmt.decode(messages[oid], oid)
            except recordfmt.RecordFormatError as exc:
                bad[oid] = str(exc)
        return jobs, bad

    def _read_refs(self, pattern: str, origin: Optional[str] = None) -> list[Job]:
        p = self.repo.git("for-each-ref",
                          "--format=%(objectname)%00%(refname)%00%(contents)%00", pattern,
                          check=False)
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace")
            broken = re.search(r"missing object ([0-9a-f]{40,64}) for (refs/tq/\S+)", err)
            name = broken.group(2).rpartition("/")[2] if broken else ""
            if broken and _is_number(name):
                raise BrokenRef(int(name), broken.group(1), origin)
            raise GitFailed(git_message(["for-each-ref"], p.stderr))
        out = p.stdout.decode("utf-8", errors="replace")
        parts = out.split("\0")
        jobs = []
        for i in range(0, len(parts) - 2, 3):
            oid, ref, message = parts[i].lstrip("\n"), parts[i + 1], parts[i + 2]
            name = ref.rpartition("/")[2] if origin else ref[len(JOBS_PREFIX):]
            job_id = _canonical(name)
            if job_id is None:
                continue
            shown = f"{origin}:{job_id}" if origin else str(job_id)
            try:
                job = recordfmt.decode(message, oid)
            except recordfmt.RecordFormatError as exc:
                raise UnreadableRecord(f"job {shown}'s record is unreadable: {exc} "
                                       "(see git tq doctor)") from None
            if job.id != job_id:
                raise UnreadableRecord(f"job {shown}'s record says it is job {job.id} "
                                       "(see git tq doctor)")
            jobs.append(job if origin is None else job.evolve(origin=origin))
        jobs.sort(key=lambda j: j.id)
        return jobs

    # --- whose records --------------------------------------------------------

    def trust(self, job: Job, entries: Optional[Mapping[int, LedgerEntry]] = None) -> str:
        """localjobs.LOCAL, FETCHED or TAMPERED: whether this user wrote the record.

        A record read before one of our writers moved its ref (the ledger already
        names the new tip) is ours, not tampered: the ref is read again to tell."""
        if self.local is None or job.origin is not None:
            return FETCHED  # another machine's job is never ours, whatever its tip
        trust = self.local.trust(job.id, job.tip, entries)
        if trust == TAMPERED:
            entry = self.local.entry(job.id)  # fresher than `entries`
            if entry is not None and (entry.trusts(job.tip) or self._moved_by_us(job, entry)):
                return LOCAL
        return trust

    def _moved_by_us(self, job: Job, entry: LedgerEntry) -> bool:
        """Whether the job's ref is now at a tip the ledger names (it moved since `job`
        was read, by one of our writers)."""
        current = self.repo.resolve_ref(job.ref)
        return current is not None and current != job.tip and entry.trusts(current)

    def submission(self, job: Job) -> str:
        """The job's submission commit, where notes go, checked rather than read from a
        trailer: the ledger's for our jobs; for others the recorded one only if it is
        the tip or a first-parent ancestor of it, and every commit from it to the tip
        is a record of this same job (a record that names another
        job's submission must not reach that job's note). Otherwise the tip."""
        if self.local is not None and job.origin is None:
            entry = self.local.entry(job.id)
            if entry is not None and entry.trusts(job.tip):
                return entry.submission
        if not is_oid(job.snapshot):
            return job.tip
        stop = job.source if is_oid(job.source) else None
        for oid, message in self._first_parent_records(job.tip, stop):
            if _canonical(recordfmt.parse_fields(message).get("Job", "")) != job.id:
                return job.tip
            if oid == job.snapshot:
                return job.snapshot
        return job.tip

    def submissions_named(self, jobs: Iterable[Job]) -> dict[int, str]:
        """For many records not written here: job id -> its recorded submission commit,
        for those whose submission commit is a record of that same job (one git process;
        a display check, lighter than `submission`)."""
        wanted = {j.id: j.snapshot for j in jobs if is_oid(j.snapshot)}
        if not wanted:
            return {}
        messages = self._messages(sorted(set(wanted.values())))
        return {job_id: oid for job_id, oid in wanted.items()
                if _canonical(recordfmt.parse_fields(messages.get(oid, "")).get("Job", ""))
                == job_id}

    def _first_parent_records(self, tip: str, stop: Optional[str] = None) \
            -> Iterator[tuple[str, str]]:
        """(commit, message) along the first parents of `tip`, newest first, at most
        LIFECYCLE_MAX of them: a record's history can come from anyone, so its length
        is bounded."""
        revs = [tip] + ([f"^{stop}"] if stop else [])
        out = self.repo.out("log", "--first-parent", f"--max-count={LIFECYCLE_MAX}",
                            "--format=%H%x00%B%x00", "--end-of-options", *revs)
        parts = out.split("\0")
        for i in range(0, len(parts) - 1, 2):
            yield parts[i].lstrip("\n"), parts[i + 1]

    def require_ours(self, job: Job, action: str) -> LedgerEntry:
        """The ledger entry of one of our jobs, or a one-line refusal saying why not."""
        if job.origin is not None:
            raise NotOurs(f"job {job.name} was fetched from {job.origin}: fetched records "
                          f"are read-only, so it cannot be {action}"
                          + ("; git tq requeue makes a new local job of its code"
                             if action != "requeued" else ""))
        entry = self.local.entry(job.id) if self.local is not None else None
        if entry is None:
            who = f" (by {job.spec.user}@{job.spec.host})" if job.spec.user else ""
            raise NotOurs(f"job {job.id} was not submitted here by you{who}: fetched records "
                          f"are read-only, so it cannot be {action}")
        if not entry.trusts(job.tip):
            raise NotOurs(f"job {job.id}'s record was changed by someone else (a fetch or a "
                          f"hand edit): it cannot be {action}; see git tq doctor")
        return entry

    def _messages(self, commits: list[str],
                  missing: Optional[set[str]] = None) -> dict[str, str]:
        """Commit messages of many commits, read by one `git cat-file --batch`; the
        objects the repository lacks are added to `missing`."""
        data = self.repo.git("cat-file", "--batch",
                             input="".join(f"{c}\n" for c in commits).encode()).stdout
        messages: dict[str, str] = {}
        pos = 0
        while pos < len(data):
            header_end = data.index(b"\n", pos)
            header = data[pos:header_end].split()
            if len(header) < 3:  # "<oid> missing"
                if missing is not None and header[1:] == [b"missing"]:
                    missing.add(header[0].decode())
                pos = header_end + 1
                continue
            size = int(header[2])
            body = data[header_end + 1: header_end + 1 + size]
            if header[1] == b"commit":
                raw = body.decode("utf-8", errors="replace")
                messages[header[0].decode()] = raw.partition("\n\n")[2]
            pos = header_end + 1 + size + 1
        return messages

    def load(self, job_id: int) -> Job:
        for job in self._read_refs(job_ref(job_id)):
            if job.id == job_id:
                return job
        raise UnknownJob(f"no job {job_id} in this repository (see `git tq ls --all`)")

    def load_fetched(self, origin: str, job_id: int) -> Job:
        """Job `job_id` fetched from `origin` (refs/tq/origins/<origin>/jobs/<id>)."""
        for job in self._read_refs(job_ref(job_id, origins.check_origin(origin)), origin):
            if job.id == job_id:
                return job
        raise UnknownJob(f"no job {origin}:{job_id} in this repository (git tq fetch brings "
                         "other machines' jobs; see `git tq ls --all`)")

    def resolve(self, token: str) -> Job:
        """A job from `7`, `tq/jobs/7`, `refs/tq/jobs/7`, `alice@gpu1:7` (fetched), or a
        commit-ish of the job."""
        text = token.strip()
        named = origins.parse_job_name(text)
        if named is not None:
            return self.load_fetched(*named)
        for prefix in ("refs/tq/jobs/", "tq/jobs/", "jobs/"):
            if text.startswith(prefix) and _is_number(text[len(prefix):]):
                text = text[len(prefix):]
        if _is_number(text):
            return self.load(int(text))
        if text.startswith("-"):
            raise UnknownJob(f"not a job: {token!r}")
        commit = self.repo.resolve_commit(text)
        if commit is None:
            raise UnknownJob(f"no job {token!r}: give a job id (7), tq/jobs/7, or a job commit")
        message = self.repo.out("cat-file", "commit", commit)
        fields = recordfmt.parse_fields(message.partition("\n\n")[2])
        job_id = _canonical(fields.get("Job", ""))
        if job_id is not None:
            job = self.load(job_id)
            if commit in (job.tip, job.snapshot) or self._ref_contains(job.ref, commit):
                return job
        raise UnknownJob(f"commit {commit[:12]} ({token}) is not a commit of any job")

    def _ref_contains(self, ref: str, commit: str) -> bool:
        p = self.repo.git("merge-base", "--is-ancestor", commit, ref, check=False)
        return p.returncode == 0

    def lifecycle(self, job: Job) -> list[tuple[str, Job]]:
        """Every record of the job, oldest first, with its commit (at most
        LIFECYCLE_MAX; records of other jobs in the history are left out)."""
        history = []
        for oid, message in self._first_parent_records(job.tip, job.source or None):
            try:
                record = recordfmt.decode(message, oid)
            except recordfmt.RecordFormatError:
                continue
            if record.id == job.id:
                history.append((oid, record))
        history.reverse()
        return history

    # --- writing ------------------------------------------------------------

    def _commit(self, tree: str, parent: Optional[str], message: str) -> str:
        args = ["commit-tree", tree]
        if parent:
            args += ["-p", parent]
        return self.repo.git(*args, env=self.commit_env, input=message.encode()).stdout \
            .decode().strip()

    def commit_record(self, tree: str, parent: Optional[str], job: Job) -> str:
        """A commit of `job`'s record (not yet on any ref)."""
        return self._commit(tree, parent, recordfmt.encode(job))

    def taken_ids(self) -> set[int]:
        """Every canonical id that a ref under refs/tq/jobs/ uses or blocks (a ref
        `refs/tq/jobs/7/x`, fetched or hand-made, makes `refs/tq/jobs/7` impossible)."""
        out = self.repo.out("for-each-ref", "--format=%(refname:lstrip=3)", JOBS_PREFIX)
        taken = set()
        for name in out.split():
            job_id = _canonical(name.partition("/")[0])
            if job_id is not None:
                taken.add(job_id)
        return taken

    def next_free_id(self, after: int = 0) -> int:
        """The id after the highest one in use (and after `after`); if someone's ref
        took the highest possible id, the lowest free one instead."""
        taken = self.taken_ids()
        candidate = max(max(taken, default=0), after) + 1
        if candidate <= recordfmt.MAX_ID:
            return candidate
        free = next((i for i in range(max(after, 0) + 1, len(taken) + after + 2)
                     if i not in taken), None)
        if free is None or free > recordfmt.MAX_ID:
            raise RefRace("could not allocate a job id: every id is taken")
        return free

    def first_candidate_id(self) -> int:
        """Where a new job's id search begins: after the highest id we gave (O(1), a file
        in the tq home), or after the highest ref when that is not known. The ref's
        creation is the compare-and-swap that makes it safe either way: an id someone
        else took meanwhile makes the search go on from the refs."""
        last = self.local.last_id() if self.local is not None else None
        if last is None or last >= recordfmt.MAX_ID:
            return self.next_free_id()
        return last + 1

    def create(self, draft: Job, tree: str,
               before_publish: Optional[Callable[[str], None]] = None,
               after_lost_race: Optional[Callable[[str], None]] = None) -> Job:
        """Store `draft` as a new job of ours with the next free id (allocated by
        compare-and-swap), recorded in the ledger as ours.

        `before_publish(commit)` runs before the ref appears (to save the private
        record keyed by the commit); `after_lost_race(commit)` undoes it when
        another submitter took that id.
        """
        local = self._require_local()
        job_id = 0
        for _ in range(CAS_ATTEMPTS * 4):
            with local.locked():
                # The id is chosen and its commit written under the lock our writers hold:
                # concurrent submitters then queue for a few milliseconds each instead of
                # all racing for the same id and writing their commits again (8 x 100 at
                # once: 30 -> 9 s). Only someone else's ref write can take the id meanwhile.
                job_id = max(job_id, self.first_candidate_id())
                job = draft.evolve(id=job_id, snapshot="")
                commit = self._commit(tree, draft.source, recordfmt.encode(job))
                if before_publish:
                    before_publish(commit)
                ref = job_ref(job_id)
                try:
                    # No look first: the ref's creation (old value zero) fails if the id
                    # is taken, and the ledger line is then withdrawn (one process less).
                    local.record(job_id, LedgerEntry(commit, None, commit))
                    won = self.repo.update_ref(ref, commit, "0" * len(commit),
                                               f"tq: submit job {job_id}")
                    local.record(job_id, LedgerEntry(commit, commit, None) if won else None)
                except BaseException as exc:
                    made = False
                    with contextlib.suppress(Exception):
                        made = self.repo.resolve_ref(ref) == commit
                    if made and isinstance(exc, Exception):
                        won = True  # only the ledger's last line failed (a full disk):
                    else:  # its "about to write" line, on record, vouches for the job
                        # No job (a full disk, Ctrl-C): its private record does not stay.
                        if after_lost_race and not made:
                            with contextlib.suppress(OSError):
                                after_lost_race(commit)
                        raise
                if won:
                    with contextlib.suppress(OSError):  # (the refs are listed without it)
                        local.remember_id(job_id)
            if won:
                return job.evolve(snapshot=commit, tip=commit)
            if after_lost_race:
                after_lost_race(commit)
            # Another submitter took this id: skip ahead, re-reading now and then.
            job_id = self.next_free_id(after=job_id)
        raise RefRace("could not allocate a job id: too many concurrent submissions; try again")

    def create_many(self, drafts: Sequence[Job], tree: str,
                    before_publish: Optional[Callable[[list[str]], None]] = None,
                    after_lost_race: Optional[Callable[[list[str]], None]] = None) \
            -> list[Job]:
        """Store several new jobs of ours (a sweep) on one tree, with consecutive free
        ids, in one ref transaction: all of them or none (`git update-ref --stdin`
        creates every ref only if none exists). Their commits are written by one
        `git hash-object` whatever their number. Callbacks as for `create`, with
        every commit at once."""
        local = self._require_local()
        if not drafts:
            return []
        first_id = self.first_candidate_id()
        for _ in range(CAS_ATTEMPTS):
            jobs = [d.evolve(id=first_id + i, snapshot="") for i, d in enumerate(drafts)]
            commits: list[str] = []
            won = False
            try:
                commits = self._commits(tree, drafts[0].source,
                                        [recordfmt.encode(j) for j in jobs])
                if before_publish:
                    before_publish(commits)
                with local.locked():
                    # Our writers hold the lock: ids taken (by another sweep or a run that
                    # got here first) are seen now, before a ledger line names them.
                    taken = self.taken_ids()
                    if not any(j.id in taken for j in jobs):
                        before = local.entries()
                        local.record_many([(j.id, LedgerEntry(c, None, c))
                                           for j, c in zip(jobs, commits)])
                        script = "".join(f"create {j.ref} {c}\n"
                                         for j, c in zip(jobs, commits))
                        p = self.repo.git("update-ref", "--stdin", "-m",
                                          f"tq: submit jobs {jobs[0].id}-{jobs[-1].id}",
                                          input=script.encode(), check=False)
                        won = p.returncode == 0
                        # A lost transaction (a fetch took an id meanwhile) puts back
                        # what the ledger said of those ids before.
                        local.record_many([(j.id, LedgerEntry(c, c, None) if won
                                            else before.get(j.id))
                                           for j, c in zip(jobs, commits)])
                        if won:
                            local.remember_id(jobs[-1].id)
            finally:
                if not won and commits and after_lost_race:
                    after_lost_race(commits)  # also on Ctrl-C: no private record is left
            if won:
                return [j.evolve(snapshot=c, tip=c) for j, c in zip(jobs, commits)]
            first_id = self.next_free_id(after=first_id)
        raise RefRace("could not allocate job ids: too many concurrent submissions; try again")

    def _commits(self, tree: str, parent: Optional[str], messages: Sequence[str]) -> list[str]:
        """Commits of `messages` on one tree and parent: the first by commit-tree (which
        knows the user's identity and the time), the others as the same object with
        another message, all written by one hash-object."""
        first = self._commit(tree, parent, messages[0])
        if len(messages) == 1:
            return [first]
        header = self.repo.out("cat-file", "commit", first).partition("\n\n")[0]
        with tempfile.TemporaryDirectory(prefix="tq-sweep-", dir=self.repo.common_dir) as tmp:
            paths = []
            for i, message in enumerate(messages[1:]):
                path = os.path.join(tmp, str(i))
                with open(path, "wb") as fh:
                    fh.write(f"{header}\n\n{message}".encode())
                paths.append(path)
            out = self.repo.git("hash-object", "-t", "commit", "-w", "--stdin-paths",
                                input="".join(f"{p}\n" for p in paths).encode()).stdout
        return [first] + out.decode().split()

    def _require_local(self) -> LocalJobs:
        if self.local is None:
            raise NotOurs("records can be written only with this user's tq home")
        return self.local

    def write(self, old: Job, new: Job, reason: str,
              tree: Optional[str] = None) -> Optional[Job]:
        """Compare-and-swap our job's ref from `old.tip` to a commit of `new`, whose tree
        is `tree` (an attempt's end: the code plus its outputs) or else old.tip's.

        Returns the stored job, or None if the ref moved meanwhile. Raises
        NotOurs for a record this user did not write (fetched or tampered).
        """
        local = self._require_local()
        commit = self._commit(tree or f"{old.tip}^{{tree}}", old.tip, recordfmt.encode(new))
        with local.locked():
            entry = local.entry(old.id)
            if entry is not None and not entry.trusts(old.tip) and self._moved_by_us(old, entry):
                return None  # one of our writers got there first: re-read and retry
            entry = self.require_ours(old, "changed")
            local.record(old.id, LedgerEntry(entry.submission, old.tip, commit))
            moved = self.repo.update_ref(old.ref, commit, old.tip, reason)
            local.record(old.id, LedgerEntry(entry.submission, commit if moved else old.tip,
                                             None))
        return new.evolve(tip=commit) if moved else None

    def update(self, job_id: int, change: Callable[[Job], Optional[Job]], reason: str,
               tree: Optional[str] = None) -> Job:
        """Apply `change` to the current record until the compare-and-swap lands.

        `change` returns the new record, or None to leave the job as it is; it
        may raise to refuse (it sees the freshest record on every retry).
        """
        for _ in range(CAS_ATTEMPTS):
            current = self.load(job_id)
            new = change(current)
            if new is None:
                return current
            stored = self.write(current, new, reason, tree)
            if stored is not None:
                return stored
        raise RefRace(f"job {job_id} kept changing under us; try again")

    def advance(self, job_id: int, event: str, now: str, tree: Optional[str] = None,
                **fields: object) -> Job:
        """Record lifecycle `event` on the job (compare-and-swap, retried); `tree`: the
        new commit's tree when the event records outputs."""
        return self.update(job_id, lambda j: apply_event(j, event, now, **fields),
                           f"tq: job {job_id} {event}", tree)

    def forget(self, jobs: Sequence[Job], broken: Sequence[BrokenRef] = ()) \
            -> list[LedgerEntry]:
        """Delete our jobs' refs, and refs at missing objects (`broken`), in one ref
        transaction: all of them, or none if any moved since it was read (RefRace) or
        git could not write (NoSpace). The jobs' ledger entries, in order."""
        local = self._require_local()
        with local.locked():
            entries = [self.require_ours(job, "forgotten") for job in jobs]
            refs = [(job.ref, job.tip) for job in jobs] + \
                [(job_ref(b.job_id), b.tip) for b in broken]
            if not refs:
                return entries
            script = "".join(f"delete {ref} {tip}\n" for ref, tip in refs)
            names = ", ".join([str(j.id) for j in jobs] + [str(b.job_id) for b in broken])
            p = self.repo.git("update-ref", "--stdin", "-m", f"tq: forget jobs {names}",
                              input=script.encode(), check=False)
            if p.returncode != 0:
                if out_of_space(p.stderr):
                    raise git_failure(["update-ref"], p.stderr)
                raise RefRace(f"{'a job' if len(refs) > 1 else 'the job'} changed while "
                              "being removed; nothing was removed; try again")
            local.record_many([(job.id, None) for job in jobs] +
                              [(b.job_id, None) for b in broken
                               if local.entry(b.job_id) is not None])
        return entries

    # --- notes ----------------------------------------------------------------

    def note(self, job: Job) -> Optional[str]:
        p = self.repo.git("notes", f"--ref={NOTES_REF}", "show", "--end-of-options",
                          self.submission(job), check=False)
        return p.stdout.decode(errors="replace").rstrip("\n") if p.returncode == 0 else None

    def all_notes(self) -> dict[str, str]:
        """Notes by annotated commit, read in two git processes whatever their number."""
        blobs = self.note_blobs()
        texts = self.note_texts(blobs.values())
        return {target: texts[blob] for target, blob in blobs.items() if blob in texts}

    def note_blobs(self, ref: str = NOTES_REF) -> dict[str, str]:
        """The blob of each note, by annotated commit (one `git notes list`)."""
        p = self.repo.git("notes", f"--ref={ref}", "list", check=False)
        pairs = [ln.split() for ln in p.stdout.decode().splitlines() if ln.strip()]
        return {target: blob for blob, target in pairs}

    def note_texts(self, blobs: Iterable[str]) -> dict[str, str]:
        """The text of each note blob (one `git cat-file --batch`)."""
        wanted = sorted(set(blobs))
        if not wanted:
            return {}
        batch = self.repo.git("cat-file", "--batch",
                              input="".join(f"{blob}\n" for blob in wanted).encode()).stdout
        texts: dict[str, str] = {}
        pos = 0
        for blob in wanted:
            header_end = batch.index(b"\n", pos)
            header = batch[pos:header_end].split()
            if len(header) < 3:  # missing
                pos = header_end + 1
                continue
            size = int(header[2])
            body = batch[header_end + 1: header_end + 1 + size]
            texts[blob] = body.decode(errors="replace").rstrip("\n")
            pos = header_end + 1 + size + 1
        return texts

    def blobs(self, blobs: Iterable[str], limit: int) -> dict[str, bytes]:
        """The bytes of each blob no larger than `limit` (sizes asked first: a fetched
        note may be anything); two `git cat-file` processes."""
        wanted = sorted({b for b in blobs if is_oid(b)})
        if not wanted:
            return {}
        check = self.repo.git("cat-file", "--batch-check=%(objectname) %(objecttype) "
                              "%(objectsize)", input="".join(f"{b}\n" for b in wanted)
                              .encode(), check=False).stdout.decode(errors="replace")
        small = [f[0] for f in (ln.split() for ln in check.splitlines())
                 if len(f) == 3 and f[1] == "blob" and f[2].isdigit() and int(f[2]) <= limit]
        if not small:
            return {}
        batch = self.repo.git("cat-file", "--batch",
                              input="".join(f"{b}\n" for b in small).encode()).stdout
        found: dict[str, bytes] = {}
        pos = 0
        for blob in small:
            header_end = batch.index(b"\n", pos)
            header = batch[pos:header_end].split()
            if len(header) < 3:
                pos = header_end + 1
                continue
            size = int(header[2])
            found[blob] = batch[header_end + 1: header_end + 1 + size]
            pos = header_end + 1 + size + 1
        return found

    # --- series ---------------------------------------------------------------

    def store_series(self, job: Job, blob: str) -> None:
        """Keep an attempt's series (a blob already written: one line) in git: appended to
        the note of the job's submission commit in refs/notes/tq-series (CAS, retried).
        Storing the same attempt again (a daemon restarted before recording the end)
        adds a line that readers take in place of the first."""
        if not is_oid(blob):
            raise TqError(f"not a blob id: {blob[:20]!r}")
        self._edit_notes(job, "append", "-C", blob, ref=SERIES_REF)

    def _edit_notes(self, job: Job, *args: str, text: Optional[str] = None,
                    ref: str = NOTES_REF) -> None:
        """Run a `git notes` edit as a compare-and-swap of refs/notes/tq.

        `git notes` moves its ref without checking the old value, so two
        concurrent writers lose one note. Instead the edit runs on a private
        copy of the ref, and the result lands only if refs/notes/tq has not
        moved meanwhile; otherwise the edit is redone on the new tip.
        """
        scratch = f"refs/notes/tq-scratch/{os.getpid()}-{id(self):x}"
        target = self.submission(job)  # a checked object id, never text from a record
        scratch_left = True
        try:
            for _ in range(CAS_ATTEMPTS):
                # The scratch ref starts as a copy of the notes ref (update-ref reads it);
                # the old value for the compare-and-swap is then the parent of the commit
                # `git notes` makes on it. Four git processes, none to read a ref first.
                cp = self.repo.git("update-ref", scratch, ref, check=False)
                copied = cp.returncode == 0
                if not copied:
                    if out_of_space(cp.stderr):  # (not "no notes yet")
                        raise git_failure(["update-ref"], cp.stderr)
                    self.repo.git("update-ref", "-d", scratch)  # no notes yet: a root commit
                p = self.repo.git("notes", f"--ref={scratch}", *args, "--end-of-options", target,
                                  env=self.commit_env,
                                  input=None if text is None else text.encode(), check=False)
                if p.returncode != 0:
                    if out_of_space(p.stderr):
                        raise git_failure(["notes"], p.stderr)
                    lines = p.stderr.decode(errors="replace").strip().splitlines()
                    raise TqError(f"git notes: {lines[-1] if lines else 'failed'}")
                # Our own ref names (never options): the new tip, the notes ref now, and
                # the commit it was copied from (the new tip's parent; absent when
                # `git notes` made no commit on a root). A name that fails is echoed
                # as text, so only object ids count.
                out = self.repo.git("rev-parse", scratch, ref, f"{scratch}^",
                                    check=False).stdout.decode().split("\n")
                shown = [ln if is_oid(ln) else None for ln in (out + ["", "", ""])[:3]]
                new, now, parent = shown
                if new is None or new == now:
                    return  # the edit changed nothing
                old = parent if copied else None
                if copied and (old is None or now is None):
                    continue  # the notes ref moved or went away meanwhile: redo it
                script = (f"update {ref} {new} {old or '0' * len(new)}\n"
                          f"delete {scratch}\n")
                landed = self.repo.git("update-ref", "--stdin", "-m", f"tq: note on job {job.id}",
                                       input=script.encode(), check=False)
                if landed.returncode == 0:
                    scratch_left = False  # deleted by the same transaction
                    return
                if out_of_space(landed.stderr):
                    raise git_failure(["update-ref"], landed.stderr)
            raise RefRace("notes kept changing under us; try again")
        finally:
            if scratch_left:
                self.repo.git("update-ref", "-d", scratch, check=False)

    def set_note(self, job: Job, text: str, append: bool = False) -> None:
        if append:
            self._edit_notes(job, "append", "-F", "-", text=text)
        else:
            self._edit_notes(job, "add", "-f", "-F", "-", text=text)

    def remove_note(self, job: Job) -> None:
        self._edit_notes(job, "remove", "--ignore-missing")

    # --- logs -----------------------------------------------------------------

    def store_log(self, job: Job, blob: str) -> None:
        """Keep a job's log (a blob already written) in git: the note of its submission
        commit in refs/notes/tq-logs, replacing the previous attempt's (CAS, retried)."""
        if not is_oid(blob):
            raise TqError(f"not a blob id: {blob[:20]!r}")
        self._edit_notes(job, "add", "-f", "-C", blob, ref=LOGS_REF)

    def stored_log(self, job: Job) -> Optional[bytes]:
        """The copy of a job's log kept in git, or None."""
        p = self.repo.git("notes", f"--ref={LOGS_REF}", "show", "--end-of-options",
                          self.submission(job), check=False)
        return p.stdout if p.returncode == 0 else None

    def remove_stored_log(self, job: Job) -> None:
        """Remove a job's log from git: its note, and (the notes ref being history) every
        earlier copy: the ref becomes one commit without parents holding the others."""
        self._edit_notes(job, "remove", "--ignore-missing", ref=LOGS_REF)
        for _ in range(CAS_ATTEMPTS):
            old = self.repo.resolve_ref(LOGS_REF)
            if old is None:
                return
            squashed = self._commit(f"{old}^{{tree}}", None, "tq: logs kept in git\n")
            if self.repo.update_ref(LOGS_REF, squashed, old, f"tq: forget job {job.id}'s log"):
                self.repo.git("reflog", "expire", "--expire=now", LOGS_REF, check=False)
                return
        raise RefRace("the logs kept in git kept changing; try again")

    @functools.cached_property
    def log_root(self) -> str:
        return os.path.join(self.repo.common_dir, "tq", "logs")

    def default_log_name(self, job: Job) -> str:
        """`<id>-<YYYYmmdd-HHMMSS>[-<tag>].log`, from the submission time."""
        t = job.spec.submitted_at  # ISO 8601: 2026-11-24T02:10:58+00:00
        stamp = f"{t[0:4]}{t[5:7]}{t[8:10]}-{t[11:13]}{t[14:16]}{t[17:19]}"
        tag = f"-{_SAFE_NAME.sub('_', job.spec.tag)}" if job.spec.tag else ""
        return f"{job.id}-{stamp}{tag}.log"

    def find_logs(self) -> dict[int, str]:
        """Log files by job id, wherever they were filed under the log root."""
        found: dict[int, str] = {}
        root = self.log_root
        if not os.path.isdir(root):
            return found
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                head = name.split("-", 1)[0]
                if name.endswith(".log") and head.isascii() and head.isdigit():
                    found[int(head)] = os.path.join(dirpath, name)
        return found

    def _has_folders(self) -> bool:
        """Whether logs were filed into folders (a folder's link count is 2 plus its
        subfolders on most file systems; others say 1, and are walked)."""
        try:
            return os.stat(self.log_root).st_nlink != 2
        except OSError:
            return False

    def log_path(self, job: Job, known: Optional[Mapping[int, str]] = None) -> str:
        """Where the job's log is, or will be once it runs; "" for a fetched job (it ran
        elsewhere: its log is the stored copy, `stored_log`, never a path here)."""
        if job.origin is not None:
            return ""
        default = f"{self.log_root}{os.sep}{self.default_log_name(job)}"
        if known is None and (os.path.exists(default) or not self._has_folders()):
            return default  # where a log starts, and stays unless filed: no walk of them all
        logs = known if known is not None else self.find_logs()
        return logs.get(job.id) or default

    def category(self, log_path: str) -> Optional[str]:
        """The folder a log is filed under, relative to the log root; None at the root."""
        if not log_path:
            return None  # a fetched job's: no log here
        folder = os.path.relpath(os.path.dirname(log_path), self.log_root)
        return None if folder == "." else folder.replace(os.sep, "/")


class RecordCache:
    """Decoded job records, and decoding errors, by commit id, in one marshal file.

    Entries are keyed by commit, whose content never changes, so any version
    of the file is correct; it is replaced atomically and rebuilt if unreadable.
    (Version 2: records are fully validated; version 1 entries are not trusted.
    Version 3: rows carry the stop fields. Version 4: params, sweep, metrics, outputs.
    Version 5: time limit, retries, the time run and the retries done.)
    """

    VERSION = 7  # 5: the spec has after, after_any; 6: time_limit, retries, ran, retried;
    # 7: the backend

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, f"records-v{self.VERSION}.marshal")

    def load(self) -> tuple[dict[str, Job], dict[str, str]]:
        try:
            with open(self.path, "rb") as fh:
                rows, errors = marshal.loads(fh.read())  # marshal.load(fh) reads in pieces
            return {row[0]: _job_from_row(row) for row in rows}, dict(errors)
        except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError):
            return {}, {}

    def save(self, jobs: list[Job], errors: Mapping[str, str]) -> None:
        try:
            ensure_private_dir(self.folder)
            fd, tmp = create_temp_beside(self.path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(marshal.dumps(([_job_to_row(j) for j in jobs], dict(errors))))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written only costs speed


def _job_to_row(j: Job) -> tuple[Any, ...]:
    s = j.spec
    return (j.tip, j.id, j.state.value, j.event, j.attempt, j.snapshot, j.source,
            (j.changes.modified, j.changes.added, j.changes.deleted), j.started_at,
            j.ended_at, j.exit_code, j.signal, j.assigned_gpus, j.detail,
            s.command, s.shell, s.priority, s.grace, s.tag, s.env, s.gpus.encode(), s.cwd,
            s.submitted_at, s.user, s.host, s.stop_signal, s.stop_target, j.stop,
            j.stop_seconds, s.params, s.sweep, j.metrics, _outputs_row(j.outputs), s.after,
            s.after_any, s.time_limit, s.retries, j.ran_seconds, j.retried, s.backend)


def _outputs_row(o: Optional[Outputs]) -> Optional[tuple[Any, ...]]:
    return None if o is None else (o.files, o.bytes, o.skipped, o.skipped_count,
                                   o.skipped_bytes, o.error)


_STATES = {s.value: s for s in State}


def _job_from_row(r: tuple[Any, ...]) -> Job:
    spec = JobSpec(r[14], r[15], r[16], r[17], r[18], r[19], _gpu_request(r[20]), r[21],
                   r[22], r[23], r[24], r[25], r[26], r[29], r[30], r[33],
                   r[34], r[35], r[36], backend=r[39])
    return Job(r[1], spec, _STATES[r[2]], r[3], r[4], r[5], r[6], _change_summary(r[7]),
               r[0], r[8], r[9], r[10], r[11], r[12], r[13], r[27], r[28], r[31],
               None if r[32] is None else Outputs(*r[32]), r[37], r[38])


@functools.lru_cache(maxsize=256)
def _gpu_request(text: str) -> GpuRequest:
    return GpuRequest.decode(text)


@functools.lru_cache(maxsize=256)
def _change_summary(counts: tuple[int, int, int]) -> ChangeSummary:
    return ChangeSummary(*counts)


def pending_in_queue_order(jobs: list[Job]) -> list[Job]:
    """Pending jobs, smallest priority number first, then by submission (id)."""
    return sorted((j for j in jobs if j.state is State.PENDING),
                  key=lambda j: (j.spec.priority, j.id))
