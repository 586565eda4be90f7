"""What a run produced: the files it wrote (its outputs), the metrics it reported, its log.

When an attempt ends, its supervisor calls `collect` in the job's worktree:

- outputs: every file the job created or modified there that is not ignored (the
  snapshot's rule, and never a link git tq placed; see jobtree.unsaved) becomes part of
  a tree = the submission's tree + those files, which the ending commit records. A file
  over `tq.outputs.maxFileSize`, or past `tq.outputs.maxTotal` in all, is not recorded:
  it is named in the record and stays on disk (the worktree is kept);
- metrics: what the job wrote to `$TQ_METRICS` or to the files `tq.metrics` names
  (default metrics.json, relative to its cwd, globs allowed): JSON lines, CSV/TSV,
  TensorBoard events (metricfiles). Its final metrics are the last value of each key,
  flattened (`{"val": {"loss": 1}}` -> `val.loss`) to numbers and short texts; the
  points this attempt added are its series, a one-line blob (series.encode_attempt)
  that the daemon appends to the note of the submission commit in refs/notes/tq-series;
- the log, cut to `tq.logs.maxStored` (head and tail), as a blob the daemon hangs on
  the job's submission commit in `refs/notes/tq-logs`.

Nothing here raises into the supervisor: a failure becomes `Outputs.error`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from git_tq import jobtree, metricfiles, series
from git_tq.errors import NO_SPACE, NoSpace, TqError, UsageError
from git_tq.gitrepo import run_git, without_repo_vars
from git_tq.metricfiles import flatten as flatten
from git_tq.model import OUTPUTS_LISTED, Metric, Outputs
from git_tq.recordfmt import (
    CONTROL_CHARACTERS,
    RecordFormatError,
    relative_path,
)

MiB = 1024 * 1024
DEFAULT_MAX_FILE = 20 * MiB
DEFAULT_MAX_TOTAL = 200 * MiB
DEFAULT_MAX_LOG = 8 * MiB
DEFAULT_METRICS_FILES = ("metrics.json",)
LOGS_REF = "refs/notes/tq-logs"

_SIZE = re.compile(r"\s*([0-9]+)\s*([kmgt]?)(i?b)?\s*\Z", re.IGNORECASE)


def human_size(n: int) -> str:
    """1.2 GiB, 340.0 KiB, 12 B."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def parse_size(text: str, name: str) -> int:
    """`20m`, `200MiB`, `1g`, `512k` or bytes (git's suffixes, 1024-based)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{name} = {text!r} is not a size (like 20m, 1g, 512k)")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    return int(m.group(1)) * unit[(m.group(2) or "").lower()]


@dataclass(frozen=True)
class Limits:
    """How much of what a job wrote is recorded in git (from `git config`)."""

    max_file: int = DEFAULT_MAX_FILE
    max_total: int = DEFAULT_MAX_TOTAL
    max_log: int = DEFAULT_MAX_LOG
    metrics_files: tuple[str, ...] = DEFAULT_METRICS_FILES
    max_points: int = series.DEFAULT_MAX_POINTS  # per series (tq.metrics.maxPoints)

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Limits:
        """From a repository's config (keys as `git config` lists them, lower case).
        A bad value falls back to the default: a job's end must never fail on it."""
        def size(key: str, default: int) -> int:
            try:
                return parse_size(config[key], key) if key in config else default
            except UsageError:
                return default
        names = tuple(n.strip() for n in config.get("tq.metrics", "").split(",") if n.strip())
        return cls(size("tq.outputs.maxfilesize", DEFAULT_MAX_FILE),
                   size("tq.outputs.maxtotal", DEFAULT_MAX_TOTAL),
                   size("tq.logs.maxstored", DEFAULT_MAX_LOG),
                   names or DEFAULT_METRICS_FILES, max_points_setting(config))

    def to_json(self) -> dict[str, Any]:
        return {"max_file": self.max_file, "max_total": self.max_total,
                "max_log": self.max_log, "metrics_files": list(self.metrics_files),
                "max_points": self.max_points}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        return cls(int(data["max_file"]), int(data["max_total"]), int(data["max_log"]),
                   tuple(str(n) for n in data["metrics_files"]),
                   int(data.get("max_points", series.DEFAULT_MAX_POINTS)))


def max_points_setting(config: Mapping[str, str]) -> int:
    """`tq.metrics.maxPoints`: points kept per series (default 100,000; a bad value is
    the default: a job's end must never fail on it)."""
    text = config.get("tq.metrics.maxpoints", "").strip()
    return int(text) if text.isdigit() and 0 < int(text) <= 10**8 \
        else series.DEFAULT_MAX_POINTS


@dataclass(frozen=True)
class Collected:
    """An attempt's results, as the supervisor hands them to the daemon (exit file)."""

    tree: Optional[str]  # submission tree + recorded outputs; None if nothing to record
    outputs: Outputs
    not_recorded: tuple[tuple[str, int, str], ...]  # every file left out (all of them)
    metrics: tuple[tuple[str, Metric], ...]
    log_blob: Optional[str]
    series_blob: Optional[str] = None  # the attempt's points (one line), None if none
    problems: tuple[str, ...] = ()  # bad input in the metrics files, a line per file
    no_space: bool = False  # the outputs or the log could not be stored for want of space

    def to_json(self) -> dict[str, Any]:
        o = self.outputs
        return {"tree": self.tree, "files": o.files, "bytes": o.bytes, "error": o.error,
                "not_recorded": [list(s) for s in self.not_recorded],
                "metrics": [[k, v] for k, v in self.metrics], "log_blob": self.log_blob,
                "series_blob": self.series_blob,
                **({"no_space": True} if self.no_space else {})}


def series_blob_of(data: Mapping[str, Any]) -> Optional[str]:
    """The series blob of an exit file's "results", if it names one."""
    blob = data.get("series_blob")
    return blob if isinstance(blob, str) and re.fullmatch(r"[0-9a-f]{40,64}", blob) else None


def outputs_from_json(data: Mapping[str, Any]) -> tuple[Optional[str], Outputs,
                                                        tuple[tuple[str, Metric], ...],
                                                        Optional[str]]:
    """(tree, outputs, metrics, log blob) from an exit file's "results" (written by our
    supervisor: trusted, but checked for shape)."""
    skipped = tuple((str(p), int(n), str(lim)) for p, n, lim in data.get("not_recorded", []))
    listed = tuple(s for s in skipped if _recordable(s[0]))[:OUTPUTS_LISTED]
    error = data.get("error")
    outputs = Outputs(int(data.get("files", 0)), int(data.get("bytes", 0)), listed,
                      len(skipped), sum(n for _, n, _ in skipped),
                      None if error is None else CONTROL_CHARACTERS.sub("?", str(error))[:500])
    metrics = tuple((str(k), v) for k, v in data.get("metrics", []))
    tree = data.get("tree")
    blob = data.get("log_blob")
    return (tree if isinstance(tree, str) else None, outputs, metrics,
            blob if isinstance(blob, str) else None)


def collect(common: str, worktree: str, submission: str, cwd: str, limits: Limits,
            metrics_file: Optional[str],
            watch: Optional[metricfiles.Watch] = None) -> Collected:
    """The outputs, metrics and series of the attempt that just ended in `worktree` (see
    the module doc; `watch`: where the files stood when it began, and when their lines
    came); the log is added by `with_log` once everything is written to it."""
    tree: Optional[str] = None
    recorded: list[tuple[str, int]] = []
    skipped: list[tuple[str, int, str]] = []
    error: Optional[str] = None
    no_space = False
    try:
        tree, recorded, skipped = _outputs_tree(common, worktree, submission, limits)
    except (TqError, OSError) as exc:
        error = CONTROL_CHARACTERS.sub("?", str(exc))[:500] or type(exc).__name__
        no_space = _no_space(exc)
    if watch is None:  # no marks: every point is this attempt's
        read = metricfiles.read_attempt(
            metricfiles.metrics_paths(metrics_file, cwd, limits.metrics_files), {}, {}, 1,
            0.0, limits.max_points, display=cwd,
            labels={metrics_file: "$TQ_METRICS"} if metrics_file else {})
    else:
        read = watch.read(limits.max_points, display=cwd)
    metrics = read.metrics
    series_blob = None
    if any(read.attempt.columns.values()):
        try:
            series_blob = _git(["--git-dir", common, "hash-object", "-w", "--stdin"], common,
                               input=series.encode_attempt(read.attempt))
        except (TqError, OSError) as exc:
            series_blob = None
            no_space = no_space or _no_space(exc)  # tried again once there is room
    # The record names the first of them, those whose names a record can hold (no
    # control characters); the counts cover all, and the log names every one.
    listed = tuple(s for s in skipped if _recordable(s[0]))[:OUTPUTS_LISTED]
    outputs = Outputs(len(recorded), sum(n for _, n in recorded), listed, len(skipped),
                      sum(n for _, n, _ in skipped), error)
    return Collected(tree, outputs, tuple(skipped), metrics, None, series_blob,
                     read.problems, no_space)


def _no_space(exc: BaseException) -> bool:
    return isinstance(exc, NoSpace) or isinstance(exc, OSError) and exc.errno in NO_SPACE


def _recordable(path: str) -> bool:
    try:
        relative_path(path, "Outputs")
        return True
    except RecordFormatError:
        return False


def left_out_lines(collected: Collected) -> list[str]:
    """Lines for the job's log naming what was not recorded, and why."""
    lines = []
    skipped = collected.not_recorded
    if skipped:
        shown = ", ".join(f"{p} ({human_size(n)}, over {lim})" if lim.startswith("tq.")
                          else f"{p} ({lim})" for p, n, lim in skipped[:5])
        more = len(skipped) - 5
        lines.append(f"not recorded in git, kept on disk: {shown}"
                     + (f" and {more} more" if more > 0 else ""))
    if collected.outputs.error:
        lines.append(f"the job's outputs could not be recorded: {collected.outputs.error}")
    lines.extend(collected.problems)
    return lines


def with_log(collected: Collected, common: str, log_path: str, limit: int) -> Collected:
    """`collected` with the job's log stored as a blob (None if that failed)."""
    try:
        blob = store_log(common, log_path, limit)
    except (TqError, OSError) as exc:
        return dataclasses.replace(collected, log_blob=None, no_space=_no_space(exc))
    return dataclasses.replace(collected, log_blob=blob)


def _git(args: Sequence[str], cwd: str, env: Optional[Mapping[str, str]] = None,
         input: Optional[bytes] = None) -> str:
    base = without_repo_vars(os.environ)
    base.update(env or {})
    return run_git([*jobtree.NO_HOOKS, *args], cwd, env=base, input=input).stdout.decode().strip()


def _outputs_tree(common: str, worktree: str, submission: str, limits: Limits) \
        -> tuple[Optional[str], list[tuple[str, int]], list[tuple[str, int, str]]]:
    found = jobtree.unsaved(worktree, submission)
    if found.error:
        raise TqError(found.error)
    recorded: list[tuple[str, int]] = []
    skipped: list[tuple[str, int, str]] = []
    total = 0
    for path in sorted(set(found.files)):
        full = os.path.join(worktree, path)
        try:
            st = os.lstat(full)
        except OSError:
            continue  # gone since git looked: nothing to record
        size = st.st_size
        if stat.S_ISDIR(st.st_mode):  # a repository the job made: not a file to record
            skipped.append((path.rstrip("/"), 0, "a nested repository"))
        elif stat.S_ISREG(st.st_mode) and not os.access(full, os.R_OK):
            skipped.append((path, size, "unreadable"))  # git could not add it
        elif size > limits.max_file:
            skipped.append((path, size, "tq.outputs.maxFileSize"))
        elif total + size > limits.max_total:
            skipped.append((path, size, "tq.outputs.maxTotal"))
        else:
            total += size
            recorded.append((path, size))
    if not recorded:
        return None, recorded, skipped
    fd, index = tempfile.mkstemp(prefix="tq-outputs-", dir=common)
    os.close(fd)
    os.unlink(index)  # git must create it: an empty file is not an index
    env = {"GIT_INDEX_FILE": index, "GIT_DIR": common, "GIT_WORK_TREE": worktree}
    try:
        _git(["read-tree", "--end-of-options", submission], worktree, env)
        data = "".join(f"{p}\0" for p, _ in recorded).encode(errors="surrogateescape")
        _git(["update-index", "--add", "--replace", "-z", "--stdin"], worktree, env, data)
        tree = _git(["write-tree"], worktree, env)
    finally:
        for path in (index, index + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return tree, recorded, skipped


def read_metrics(metrics_file: Optional[str], cwd: str, names: Sequence[str]) \
        -> tuple[tuple[str, Metric], ...]:
    """The final metrics of an attempt: the last value of each key in `$TQ_METRICS` and
    the `tq.metrics` files, the file written last winning key by key."""
    paths = metricfiles.metrics_paths(metrics_file, cwd, names)
    return metricfiles.read_attempt(paths, {}, {}, 1, 0.0, 1).metrics


def read_cut_log(log_path: str, limit: int) -> bytes:
    """The log as stored: whole, or its head and tail with a line saying what was cut
    (only those parts are read: a log can be larger than memory)."""
    with open(log_path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= limit:
            return fh.read(limit)
        half = max(limit // 2, 1)
        head = fh.read(half)
        fh.seek(size - half)
        tail = fh.read(half)
    marker = f"\n[git tq] ... {size - 2 * half} bytes of this log were not stored (over " \
        f"tq.logs.maxStored) ...\n".encode()
    return head + marker + tail


def store_log(common: str, log_path: str, limit: int) -> Optional[str]:
    """Write the (cut) log as a blob; its id, or None if there is no log."""
    try:
        data = read_cut_log(log_path, limit)
    except FileNotFoundError:
        return None
    return _git(["--git-dir", common, "hash-object", "-w", "--stdin"], common, input=data)
