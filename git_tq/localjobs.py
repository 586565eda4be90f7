"""What this user submitted on this machine: the private job store and the ledger of tips.

This is the trust boundary. A job ref in a repository can come from anywhere
(a fetch, a push, a hand edit), so nothing in a record decides whether a job
is ours. Instead, per repository, the tq home holds (0700 folders, 0600 files)::

    <home>/jobs/<repo key>/<submission oid>.json   what to run: command, cwd, -e, the
                                                   environment (kept until the job ends)
    <home>/jobs/<repo key>/ledger                  for each of our jobs: its submission
                                                   commit and the tip we last wrote
    <home>/jobs/<repo key>/ledger.lock             serialises our writers (flock)
    <home>/jobs/<repo key>/last-id                 the highest id we gave a job (so the
                                                   next id costs one read, not a ref list)

A private record is named by the submission commit that the submitting process
created itself, never by a trailer. A job is *local* when the ledger knows its
id and the ref's tip is the tip we last wrote (or the one we were about to
write when we stopped); *tampered* when the ledger knows it but the tip is
something else (moved by a fetch or by hand); *fetched* when the ledger does
not know it. Only local jobs run, get written to, or fire hooks.

The ledger is a journal, like git's reflogs: one line per write, appended
under the lock (`<id> <submission> <tip> <next or ->`, or `<id> -` when a job
is forgotten); the last line for an id wins, a torn last line is ignored, and
the daemon compacts it (temp file + rename, under the lock) when mostly
superseded. A writer first
appends "tip T, about to write N", then moves the ref (compare-and-swap), then
appends "tip N" (or restores the old line if the swap lost), so a crash at any
point leaves the ref and the ledger agreeing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from git_tq.home import ensure_private_dir, repo_key, write_private_file
from git_tq.model import (
    BACKENDS,
    DEFAULT_STOP_SIGNAL,
    MAX_RETRIES,
    MAX_TIME_LIMIT,
    STOP_SIGNALS,
    STOP_TARGETS,
)

_OID = r"[0-9a-f]{40}(?:[0-9a-f]{24})?"
_LINES = re.compile(rf"^([1-9][0-9]{{0,17}}) (?:({_OID}) ({_OID}|-) ({_OID}|-)|-)$".encode(),
                    re.MULTILINE)
_OID_ONLY = re.compile(rf"{_OID}\Z")
COMPACT_BYTES = 256 * 1024

LOCAL, FETCHED, TAMPERED = "local", "fetched", "tampered"


def is_oid(text: object) -> bool:
    """Full lowercase hex of a SHA-1 or SHA-256 object id (never an option or a path)."""
    return isinstance(text, str) and _OID_ONLY.match(text) is not None


@dataclass(frozen=True)
class LedgerEntry:
    """What we know of one of our jobs: its submission commit and the tips we wrote."""

    submission: str
    tip: Optional[str]  # the tip we last wrote (None: creation not finished)
    next: Optional[str]  # a tip we were about to write (compare-and-swap in flight)

    def trusts(self, tip: str) -> bool:
        return tip in (self.tip, self.next)


@dataclass(frozen=True)
class LocalSpec:
    """The private record of a job: what the daemon runs (never read from git)."""

    submission: str
    command: tuple[str, ...]
    shell: bool
    cwd: str
    env_name: Optional[str]
    source_dir: str  # the work tree it was submitted from (for TQ_SOURCE_DIR and links)
    environ: dict[str, str]
    # Submodules and nested repositories: (path, their git dir, the commit to check out).
    nested: tuple[tuple[str, str, str], ...] = ()
    # In a sparse checkout: the files the user had on disk (the job gets them all).
    present: tuple[str, ...] = ()
    # How the daemon stops it (preemption, kill): this signal (a model.STOP_SIGNALS
    # name) to the main process, or to the whole process group.
    stop_signal: str = DEFAULT_STOP_SIGNAL
    stop_target: str = "main"
    # Its time limit in seconds (None: none) and how often a failed attempt is retried.
    time_limit: Optional[int] = None
    retries: int = 0
    # Where it runs, and for Slurm the sbatch options fixed at submission (partition,
    # account, --gres...), in the order given.
    backend: str = "local"
    slurm_args: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"format": 2, "submission": self.submission, "command": list(self.command),
                "shell": self.shell, "cwd": self.cwd, "env_name": self.env_name,
                "source_dir": self.source_dir, "environ": self.environ,
                "nested": [list(n) for n in self.nested], "present": list(self.present),
                "stop_signal": self.stop_signal, "stop_target": self.stop_target,
                "time_limit": self.time_limit, "retries": self.retries,
                "backend": self.backend, "slurm_args": list(self.slurm_args)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocalSpec:
        command = data["command"]
        environ = data["environ"]
        if not (isinstance(command, list) and command
                and all(isinstance(w, str) for w in command)):
            raise ValueError("bad command")
        if not (isinstance(environ, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in environ.items())):
            raise ValueError("bad environment")
        env_name = data.get("env_name")
        nested = tuple((str(p), str(d), str(c)) for p, d, c in data.get("nested", []))
        if not all(is_oid(c) for _, _, c in nested):
            raise ValueError("bad nested commit")
        stop_signal = data.get("stop_signal", DEFAULT_STOP_SIGNAL)
        stop_target = data.get("stop_target", "main")
        if stop_signal not in STOP_SIGNALS or stop_target not in STOP_TARGETS:
            raise ValueError("bad stop signal")
        time_limit, retries = data.get("time_limit"), data.get("retries", 0)
        if not (time_limit is None or _count(time_limit, 1, MAX_TIME_LIMIT)) \
                or not _count(retries, 0, MAX_RETRIES):
            raise ValueError("bad time limit or retries")
        backend, slurm_args = data.get("backend", "local"), data.get("slurm_args", [])
        if backend not in BACKENDS or not (isinstance(slurm_args, list)
                                           and all(isinstance(a, str) for a in slurm_args)):
            raise ValueError("bad backend")
        return cls(str(data["submission"]), tuple(command), bool(data["shell"]),
                   str(data["cwd"]), None if env_name is None else str(env_name),
                   str(data["source_dir"]), dict(environ), nested,
                   tuple(str(p) for p in data.get("present", [])), str(stop_signal),
                   str(stop_target), time_limit, retries, str(backend), tuple(slurm_args))


def _count(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


LedgerMark = tuple[int, int, bytes]  # see LocalJobs.changes_since
MARK_BYTES = 64


def _read_from(fd: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _entry(m: re.Match[bytes]) -> Optional[LedgerEntry]:
    if m.group(2) is None:
        return None
    sub, tip, nxt = m.group(2, 3, 4)
    return LedgerEntry(sub.decode(), None if tip == b"-" else tip.decode(),
                       None if nxt == b"-" else nxt.decode())


def _parse(data: bytes, end: int) -> dict[int, Optional[LedgerEntry]]:
    """The last entry of each job in the whole lines of data[:end] (None: forgotten).

    One pass of the regular expression (lines that do not match, whatever they hold,
    are skipped); each job's entry is built once, from its last line."""
    last: dict[bytes, tuple[bytes, bytes, bytes]] = {}
    for job_id, sub, tip, nxt in _LINES.findall(data, 0, end):
        last[job_id] = (sub, tip, nxt)  # sub is b"" on a forget line
    out: dict[int, Optional[LedgerEntry]] = {}
    for job_id, (sub, tip, nxt) in last.items():
        out[int(job_id)] = LedgerEntry(sub.decode(), None if tip == b"-" else tip.decode(),
                                       None if nxt == b"-" else nxt.decode()) if sub else None
    return out


class LocalJobs:
    """One repository's private store and ledger in a tq home."""

    def __init__(self, home_path: str, common_dir: str) -> None:
        self.folder = os.path.join(home_path, "jobs", repo_key(common_dir))
        self.ledger_path = os.path.join(self.folder, "ledger")
        self._cache: tuple[int, int, dict[int, LedgerEntry], int] = (-1, 0, {}, 0)

    # --- the private records --------------------------------------------------

    def spec_path(self, submission: str) -> str:
        if not is_oid(submission):  # a path is built only from an object id we made
            raise ValueError(f"not an object id: {submission!r}")
        return os.path.join(self.folder, f"{submission}.json")

    def save_spec(self, spec: LocalSpec) -> None:
        ensure_private_dir(self.folder)
        write_private_file(self.spec_path(spec.submission), json.dumps(spec.to_json()).encode())

    def load_spec(self, submission: str) -> Optional[LocalSpec]:
        try:
            with open(self.spec_path(submission), encoding="utf-8") as fh:
                return LocalSpec.from_json(json.load(fh))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def drop_spec(self, submission: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.unlink(self.spec_path(submission))

    # --- the ledger -----------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the repository's writer lock (every ref write of ours happens inside)."""
        ensure_private_dir(self.folder)
        fd = os.open(os.path.join(self.folder, "ledger.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def entries(self) -> dict[int, LedgerEntry]:
        """Every job of ours by id. Only bytes appended since the last call are read."""
        return dict(self._current())

    def entries_view(self) -> Mapping[int, LedgerEntry]:
        """`entries` without the copy, for a reader that keeps it only until its next
        call (the daemon, each cycle): O(new lines), not O(jobs)."""
        return self._current()

    def _current(self) -> dict[int, LedgerEntry]:
        """The cached entries (never handed out: updated in place), brought up to date."""
        try:
            fd = os.open(self.ledger_path, os.O_RDONLY)
        except FileNotFoundError:
            self._cache = (-1, 0, {}, 0)
            return {}
        try:
            st = os.fstat(fd)
            inode, offset, known, lines = self._cache
            if st.st_ino != inode or st.st_size < offset:
                offset, known, lines = 0, {}, 0
            data = _read_from(fd, offset)
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # a torn last line waits (or is ignored for ever)
        lines += data.count(b"\n", 0, end)
        for job_id, entry in _parse(data, end).items():
            if entry is None:
                known.pop(job_id, None)
            else:
                known[job_id] = entry
        self._cache = (st.st_ino, offset + end, known, lines)
        return known

    def last_id(self) -> Optional[int]:
        """The highest id this user gave a job here; None when not known (never written,
        or unreadable: the caller then lists the refs once)."""
        try:
            with open(os.path.join(self.folder, "last-id"), "rb") as fh:
                text = fh.read(32).strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and len(text) <= 18 else None

    def remember_id(self, job_id: int) -> None:
        """Note that `job_id` was given (only ever moving up). Hold `locked()`: it is a
        hint, checked by the compare-and-swap that creates the ref, never trusted alone."""
        if job_id > (self.last_id() or 0):
            write_private_file(os.path.join(self.folder, "last-id"), f"{job_id}\n".encode())

    def entry(self, job_id: int) -> Optional[LedgerEntry]:
        return self._current().get(job_id)

    def changes_since(self, mark: Optional[LedgerMark]) \
            -> tuple[LedgerMark, dict[int, Optional[LedgerEntry]], bool]:
        """What changed since `mark` (from an earlier call): the mark now, the entries of
        the jobs with lines appended since (None: forgotten), and whether those are all
        the entries (the ledger was replaced or compacted meanwhile, or `mark` is None:
        then every job may have changed). Reads only the appended bytes when it can.

        A mark is (inode, length read, the bytes just before that length): the ledger
        only grows between compactions, which replace the file (a new inode; the bytes
        compared guard against an inode reused)."""
        try:
            fd = os.open(self.ledger_path, os.O_RDONLY)
        except FileNotFoundError:
            return (0, 0, b""), {}, True
        try:
            st = os.fstat(fd)
            start = 0
            if mark is not None and mark[0] == st.st_ino and len(mark[2]) <= mark[1] <= st.st_size:
                tail = mark[2]
                if os.pread(fd, len(tail), mark[1] - len(tail)) == tail:
                    start = mark[1]
            data = _read_from(fd, start)
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # a torn last line waits
        changes = _parse(data, end)
        edge = start + end
        if end >= MARK_BYTES or start == 0:
            tail = data[max(end - MARK_BYTES, 0):end]
        else:
            tail = (mark[2] if mark else b"")[-(MARK_BYTES - end):] + data[:end]
        return (st.st_ino, edge, tail), changes, start == 0

    def entries_for(self, ids: Iterable[int]) -> dict[int, LedgerEntry]:
        """The entries of a few jobs (as `entries`, which is faster for many): each id's
        last complete line is searched from the end of the journal."""
        try:
            with open(self.ledger_path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return {}
        end = data.rfind(b"\n") + 1
        found: dict[int, LedgerEntry] = {}
        for job_id in ids:
            key = b"%d " % job_id
            pos = end
            while pos > 0:
                at = data.rfind(b"\n" + key, 0, pos - 1) + 1
                if at == 0 and not data.startswith(key):
                    break
                m = _LINES.match(data, at, end)
                if m is not None and m.end() < end and data[m.end()] == 10:  # a whole line
                    entry = _entry(m)
                    if entry is not None:
                        found[job_id] = entry
                    break
                pos = at  # not a valid line: the one before it counts
        return found

    def trust(self, job_id: int, tip: str,
              entries: Optional[Mapping[int, LedgerEntry]] = None) -> str:
        """LOCAL, FETCHED or TAMPERED for the record at `tip` of job `job_id`."""
        entry = (self.entries() if entries is None else entries).get(job_id)
        if entry is None:
            return FETCHED
        return LOCAL if entry.trusts(tip) else TAMPERED

    def record(self, job_id: int, entry: Optional[LedgerEntry]) -> None:
        """Append the new state of one job's entry (None: forgotten). Hold `locked()`."""
        self.record_many([(job_id, entry)])

    def record_many(self, changes: Sequence[tuple[int, Optional[LedgerEntry]]]) -> None:
        """Append the new states of several jobs' entries in one write. Hold `locked()`."""
        lines = []
        for job_id, entry in changes:
            if entry is None:
                lines.append(f"{job_id} -\n")
                continue
            for oid in (entry.submission, entry.tip, entry.next):
                if oid is not None and not is_oid(oid):
                    raise ValueError(f"not an object id: {oid!r}")
            lines.append(f"{job_id} {entry.submission} {entry.tip or '-'} {entry.next or '-'}\n")
        ensure_private_dir(self.folder)
        fd = os.open(self.ledger_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            data = "".join(lines).encode()
            while data:  # one write of a few KiB is whole; the loop is for huge sweeps
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)

    def compact_if_sparse(self) -> bool:
        """Rewrite the journal with one line per job when most lines are superseded.

        Called by the daemon after a cycle: its incremental read makes the check free,
        where a short-lived command would have to parse the whole journal.
        """
        live = self.entries()
        lines = self._cache[3]
        if self._cache[1] < COMPACT_BYTES or lines < 4 * max(len(live), 1):
            return False
        with self.locked():
            live = self.entries()  # what was appended meanwhile, too
            text = "".join(f"{i} {e.submission} {e.tip or '-'} {e.next or '-'}\n"
                           for i, e in sorted(live.items()))
            write_private_file(self.ledger_path, text.encode())
        self._cache = (-1, 0, {}, 0)
        return True
