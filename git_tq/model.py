"""The records git tq keeps about a job: its spec, its lifecycle state, its snapshot.

Plain frozen values; nothing here touches git, files or processes.
"""

from __future__ import annotations

import enum
import re
import shlex
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

DEFAULT_PRIORITY = 100
DEFAULT_GRACE = 180

# How a job is asked to stop (preemption, `kill`): one signal to its main process.
DEFAULT_STOP_SIGNAL = "SIGTERM"
BACKENDS = ("local", "slurm")  # where a job runs: this machine's daemon, or Slurm
STOP_TARGETS = ("main", "group")  # the main process (default), or the whole process group
# Signals a job may choose to be stopped with: catchable ones whose default action ends
# the process (so a job without a handler still stops). Names are portable; numbers are not.
STOP_SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGABRT", "SIGUSR1", "SIGUSR2", "SIGALRM",
                "SIGTERM", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF")

# Every lifecycle event a record can name (lifecycle.EVENTS, plus the submission).
EVENT_NAMES = frozenset({"submitted", "started", "resumed", "stopping", "preempted",
                         "finished", "start-failed", "cancelled", "retry", "timed-out",
                         "edited"})
MAX_RETRIES = 1000  # `--retry N`: at most this many
MAX_TIME_LIMIT = 10**9  # seconds (~31 years): what a record's Tq-Time-Limit may hold


class State(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (State.PENDING, State.RUNNING, State.STOPPING)

    @property
    def finished(self) -> bool:
        return not self.active


@dataclass(frozen=True)
class GpuRequest:
    """What a job asks for: exact GPU ids, any `count` GPUs, or none (count 0)."""

    ids: Optional[tuple[int, ...]] = None
    count: int = 1

    @classmethod
    def exact(cls, ids: tuple[int, ...]) -> GpuRequest:
        return cls(ids=ids, count=len(ids))

    @classmethod
    def any(cls, count: int) -> GpuRequest:
        return cls(ids=None, count=count)

    @property
    def cpu_only(self) -> bool:
        return self.count == 0

    def encode(self) -> str:
        """`0,1` for exact ids, `any:2` for any two, `cpu` for none."""
        if self.ids is not None:
            return ",".join(str(i) for i in self.ids)
        return "cpu" if self.count == 0 else f"any:{self.count}"

    @classmethod
    def decode(cls, text: str) -> GpuRequest:
        text = text.strip()
        if text == "cpu":
            return cls(None, 0)
        if text.startswith("any:"):
            return cls(None, int(text[4:]))
        return cls.exact(tuple(int(x) for x in text.split(",")))

    def describe(self) -> str:
        if self.ids is not None:
            return ",".join(str(i) for i in self.ids)
        return "cpu" if self.count == 0 else f"any {self.count}"


@dataclass(frozen=True)
class ChangeSummary:
    """How the snapshot differs from its source commit (counts of files)."""

    modified: int = 0
    added: int = 0
    deleted: int = 0

    @property
    def total(self) -> int:
        return self.modified + self.added + self.deleted

    def encode(self) -> str:
        return f"M={self.modified} A={self.added} D={self.deleted}"

    @classmethod
    def decode(cls, text: str) -> ChangeSummary:
        parts = dict(p.split("=", 1) for p in text.split() if "=" in p)
        return cls(int(parts.get("M", 0)), int(parts.get("A", 0)), int(parts.get("D", 0)))

    def describe(self) -> str:
        if not self.total:
            return "clean"
        bits = []
        if self.modified:
            bits.append(f"{self.modified} modified")
        if self.added:
            bits.append(f"{self.added} added")
        if self.deleted:
            bits.append(f"{self.deleted} deleted")
        return ", ".join(bits)


@dataclass(frozen=True)
class JobSpec:
    """What the user asked to run; fixed at submission."""

    command: tuple[str, ...]
    shell: bool  # True: command[0] is a shell string run with `sh -c`
    priority: int
    grace: int
    tag: Optional[str]
    env: Optional[str]
    gpus: GpuRequest
    cwd: str  # relative to the repository root, '' for the root
    submitted_at: str  # ISO 8601 with offset
    user: str
    host: str
    stop_signal: str = DEFAULT_STOP_SIGNAL  # for display: the daemon reads the private record
    stop_target: str = "main"  # "main" or "group" (STOP_TARGETS)
    # A sweep's parameters for this job (name, value as given), in the order given, and
    # the sweep's name; empty and None for a job that is not part of a sweep.
    params: tuple[tuple[str, str], ...] = ()
    sweep: Optional[str] = None
    # Jobs of this repository it waits for: `after` must end done (exit 0), or this job
    # is cancelled; `after_any` must end in any way. Sorted ids, () for none.
    after: tuple[int, ...] = ()
    after_any: tuple[int, ...] = ()

    @property
    def dependencies(self) -> tuple[int, ...]:
        return tuple(sorted({*self.after, *self.after_any}))
    # The most seconds it may run, summed over its attempts (`--time`, tq.defaultTime),
    # and how often an attempt that failed by itself is queued again (`--retry`).
    time_limit: Optional[int] = None
    retries: int = 0
    # Where it runs: "local" (this machine's daemon) or "slurm" (a batch job).
    backend: str = "local"

    def command_line(self) -> str:
        return self.command[0] if self.shell else shlex.join(self.command)


Metric = Union[int, float, str]  # a number as the job wrote it, or a short text


@dataclass(frozen=True)
class Outputs:
    """What the end of an attempt recorded of the files the job wrote in its worktree:
    `files` of them (`bytes` in all) are in the ending commit's tree; the rest, over a
    limit, are not (kept on disk), the first OUTPUTS_LISTED of them named."""

    files: int
    bytes: int
    skipped: tuple[tuple[str, int, str], ...] = ()  # (path, size, the limit it broke)
    skipped_count: int = 0
    skipped_bytes: int = 0
    error: Optional[str] = None  # they could not be recorded at all (why)


OUTPUTS_LISTED = 20


@dataclass(frozen=True)
class Job:
    """A job as recorded at the tip of its ref: spec plus where it is in its lifecycle."""

    id: int
    spec: JobSpec
    state: State
    event: str  # the lifecycle event that produced this record
    attempt: int  # how many times it has been started
    snapshot: str  # the submission commit (its tree is the code)
    source: Optional[str]  # HEAD at submission; None on an unborn branch
    changes: ChangeSummary
    tip: str = ""  # the commit at the ref's tip that holds this record ("" before it exists)
    started_at: Optional[str] = None
    ended_at: Optional[str] = None
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    assigned_gpus: Optional[tuple[int, ...]] = None
    detail: Optional[str] = None  # why this event happened ("preempted by job 9")
    # How a stop (preemption, kill) ended this attempt: "clean" (it exited by itself
    # within the grace) or "forced" (SIGKILL), and seconds from the stop signal to the end.
    stop: Optional[str] = None
    stop_seconds: Optional[float] = None
    # What the job reported ($TQ_METRICS, tq.metrics files), flattened ("val.loss"), as of
    # its last attempt's end; and what that end recorded of the files it wrote.
    metrics: tuple[tuple[str, Metric], ...] = ()
    outputs: Optional[Outputs] = None
    # Seconds its ended attempts ran (summed; the running one not included), and how many
    # of its attempts were retried after failing by themselves.
    ran_seconds: float = 0.0
    retried: int = 0
    # The machine the job came from, `user@host`, when it was fetched (from the name of
    # its ref, refs/tq/origins/<origin>/jobs/<id>, never from the record); None: local.
    origin: Optional[str] = None

    @property
    def ref(self) -> str:
        return job_ref(self.id, self.origin)

    @property
    def name(self) -> str:
        """How the job is named on the command line: `7`, or `alice@gpu1:7` if fetched."""
        return str(self.id) if self.origin is None else f"{self.origin}:{self.id}"

    @property
    def exit_status(self) -> Optional[int]:
        """The exit code the job's process returned; None when it has none: never
        started, killed by a signal, or lost (older records wrote -1 for lost)."""
        if self.event == "start-failed" or self.exit_code == -1:
            return None
        return self.exit_code

    @property
    def outcome(self) -> Optional[str]:
        """How a finished job ended, in a word or two: "exit 3", "signal 9", "not
        started", "lost" (its supervisor died, so its exit status is unknown); None
        for an active job and a cancelled one that never ran."""
        if not self.state.finished:
            return None
        if self.event == "start-failed":
            return "not started"
        if self.event == "timed-out":
            return "time limit"
        if self.signal is not None:
            return f"signal {self.signal}"
        if self.exit_status is not None:
            return f"exit {self.exit_status}"
        return "lost" if self.state is State.FAILED else None

    def evolve(self, **changes: Any) -> Job:
        return replace(self, **changes)

    def running_seconds(self, now: float) -> float:
        """Seconds it has run, over every attempt, as of `now` (epoch seconds)."""
        if self.state not in (State.RUNNING, State.STOPPING):
            return self.ran_seconds
        return self.ran_seconds + max(0.0, now - (epoch(self.started_at) or now))

    def time_limit_due(self, limit: Optional[int]) -> Optional[float]:
        """When (epoch seconds) a running job reaches a time limit of `limit` seconds,
        summed over its attempts; None without a limit or when it is not running."""
        begun = epoch(self.started_at)
        if limit is None or begun is None or self.state not in (State.RUNNING, State.STOPPING):
            return None
        return begun + limit - self.ran_seconds


def epoch(stamp: Optional[str]) -> Optional[float]:
    """Epoch seconds of a record's time stamp (ISO 8601 with an offset); None if none."""
    if not stamp:
        return None
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?\Z")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def parse_duration(text: str) -> int:
    """Seconds of a duration written `90s`, `45m`, `2h`, `1d12h` (units d h m s, largest
    first); ValueError with a one-line reason for anything else, and for 0."""
    word = text.strip().lower()
    m = _DURATION.match(word)
    if not word or m is None or not any(m.groups()):
        raise ValueError(f"{text.strip()[:20]!r} is not a duration: write it like 90s, 45m, "
                         "2h or 1d12h")
    seconds = sum(int(n) * unit for n, (_, unit) in zip(m.groups(), _UNITS) if n)
    if seconds <= 0:
        raise ValueError(f"{text.strip()[:20]!r}: a time limit must be more than 0")
    if seconds > MAX_TIME_LIMIT:
        raise ValueError(f"{text.strip()[:20]!r} is longer than {MAX_TIME_LIMIT} seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """`2h`, `1h30m`, `1d12h`, `90s` -> `1m30s`: the shortest text parse_duration reads."""
    left = int(round(seconds))
    parts = []
    for name, unit in _UNITS:
        if left >= unit:
            parts.append(f"{left // unit}{name}")
            left %= unit
    return "".join(parts) or "0s"


def describe_ids(ids: tuple[int, ...], shown: int = 3) -> str:
    """Job ids in a reason: `12, 14`, or `12, 13, 14 and 997 more`."""
    head = ", ".join(map(str, ids[:shown]))
    return head if len(ids) <= shown else f"{head} and {len(ids) - shown} more"


ORIGINS_PREFIX = "refs/tq/origins/"  # <origin>/jobs/<id>: jobs of other machines


def job_ref(job_id: int, origin: Optional[str] = None) -> str:
    if origin is not None:
        return f"{ORIGINS_PREFIX}{origin}/jobs/{job_id}"
    return f"refs/tq/jobs/{job_id}"


def stop_signal_name(text: str) -> str:
    """The canonical name (SIGUSR1) of a stop signal given as TERM, USR1, SIGUSR1, sigint
    or a number of this machine; ValueError for anything else (KILL and STOP included:
    a stop signal must be one the job can catch)."""
    import signal

    word = text.strip().upper()
    if word.isascii() and word.isdigit() and len(word) <= 3:
        try:
            word = signal.Signals(int(word)).name
        except ValueError:
            raise ValueError(f"{text.strip()!r} is not a signal number") from None
    name = word if word.startswith("SIG") else f"SIG{word}"
    if name not in STOP_SIGNALS:
        raise ValueError(f"{text.strip()[:20]!r} cannot be a stop signal: use one of "
                         + ", ".join(n[3:] for n in STOP_SIGNALS) + " (or its number)")
    return name


def launch_stop_signal(name: object) -> str:
    """The stop signal a launch file names, as a canonical name: the default for anything
    that is not one (the file is ours, but is read as if it might not be)."""
    return name if isinstance(name, str) and name in STOP_SIGNALS else DEFAULT_STOP_SIGNAL


def stop_signal_number(name: str) -> int:
    """This machine's number of a canonical stop-signal name (SIGTERM if unknown here)."""
    import signal

    return int(getattr(signal, name, signal.SIGTERM))
