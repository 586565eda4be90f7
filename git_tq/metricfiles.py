"""A job's metrics files read as points: JSON lines ($TQ_METRICS, metrics.json), CSV/TSV files
with a header row, TensorBoard event files.

Each file is read from where an attempt began (its `Mark`), so an attempt keeps only the
points it added, and a reader that stays (`FileSeries`) reads only what is new. A point's
wall time is the event's own (TensorBoard, dvclive's `timestamp` column), else the time the
supervisor first saw the line (`Checkpoints`, recorded while the job runs), else the file's
modification time. Bad input is skipped and counted, the first problem of each file named.
Nothing here raises on a file's content: the files are the job's, and may be anything.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import fnmatch
import glob
import json
import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from git_tq.model import Metric
from git_tq.recordfmt import MAX_METRICS, RecordFormatError, metric_value
from git_tq.series import MAX_SERIES, AttemptSeries, downsample, finite

MiB = 1024 * 1024
MAX_READ = 64 * MiB  # of one file, at most its last 64 MiB are read
MAX_LINE = 1 * MiB  # a longer line is skipped
MAX_FILES = 64  # files the tq.metrics names and globs may match
MAX_RECORD = 16 * MiB  # a TensorBoard record longer than this ends the read
TFEVENTS = "events.out.tfevents."
STEP_KEYS = ("step",)  # the x of a point, not a metric
TIME_KEYS = ("timestamp",)  # dvclive's wall time (ms since the epoch), not a metric
HINT_TENSORBOARD = ("TensorBoard event files need the tensorboard extra: "
                    "pip install 'git-tq[tensorboard]'")
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:/@+-]")


def kind_of(path: str) -> str:
    """"tfevents", "csv", "tsv" or "json" (JSON lines, or one JSON object)."""
    name = os.path.basename(path)
    if name.startswith(TFEVENTS):
        return "tfevents"
    lower = name.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".tsv"):
        return "tsv"
    return "json"


def metric_name(key: str) -> str:
    """A key as a metric's name: other characters become `_`, it starts with a letter, a
    digit or `_`, at most 128 characters."""
    name = _BAD_NAME_CHARS.sub("_", key)[:128]
    if not name[:1].isascii() or not (name[:1].isalnum() or name[:1] == "_"):
        name = "_" + name[1:]
    return name


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Metric]]:
    """Numbers and short texts of a JSON object, nested keys joined with dots; names
    made safe (see metric_name), at most MAX_METRICS."""
    found: list[tuple[str, Metric]] = []
    for key, value in data.items():
        name = metric_name(f"{prefix}{key}")
        if isinstance(value, dict):
            found.extend(flatten(value, name + "."))
            continue
        try:
            found.append((name, metric_value(value)))
        except RecordFormatError:
            continue  # lists, nulls, long texts: not a metric
    return found[:MAX_METRICS]


def metrics_paths(metrics_file: Optional[str], cwd: str, names: Sequence[str]) -> list[str]:
    """$TQ_METRICS, then the files `tq.metrics` names relative to the job's cwd (globs
    allowed, `**` too), never outside it, at most MAX_FILES, each once."""
    found = [metrics_file] if metrics_file else []
    real_cwd = os.path.realpath(cwd)
    for name in names:
        if glob.has_magic(name):
            matched = sorted(glob.glob(os.path.join(glob.escape(cwd), name), recursive=True))
        else:
            matched = [os.path.join(cwd, name)]
        for path in matched[:MAX_FILES]:
            real = os.path.realpath(path)
            if os.path.commonpath([real, real_cwd]) == real_cwd and real not in found:
                found.append(real)
    return found[:MAX_FILES]


def _open_regular(path: str) -> Optional[tuple[Any, os.stat_result]]:
    """A regular file open for reading (O_NONBLOCK: a FIFO must not hang us), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    fh = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fh.fileno())
    except OSError:
        fh.close()
        return None
    if not stat.S_ISREG(st.st_mode):
        fh.close()
        return None
    return fh, st


@dataclass(frozen=True)
class Mark:
    """A metrics file as an attempt found it when it began."""

    inode: int
    size: int
    lines: int  # complete lines in it (data lines and the header alike)

    def to_json(self) -> list[int]:
        return [self.inode, self.size, self.lines]

    @classmethod
    def from_json(cls, data: object) -> Optional[Mark]:
        if isinstance(data, list) and len(data) == 3 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in data):
            return cls(data[0], data[1], data[2])
        return None


def mark_of(path: str) -> Optional[Mark]:
    """Where a file ends now (None if there is no such regular file)."""
    opened = _open_regular(path)
    if opened is None:
        return None
    fh, st = opened
    with fh:
        lines = 0
        if kind_of(path) != "tfevents":
            left = min(st.st_size, MAX_READ)
            fh.seek(st.st_size - left)
            while left > 0:
                chunk = fh.read(min(left, MiB))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                left -= len(chunk)
        return Mark(st.st_ino, st.st_size, lines)


class Checkpoints:
    """When a file's bytes appeared: (offset, time) pairs, each saying that the file was
    `offset` bytes long at `time` (taken while the job runs)."""

    def __init__(self, pairs: Iterable[tuple[int, float]] = ()) -> None:
        self.offsets: list[int] = []
        self.times: list[float] = []
        for offset, when in pairs:
            self.add(offset, when)

    def add(self, offset: int, when: float) -> None:
        if self.offsets and offset <= self.offsets[-1]:
            if offset < self.offsets[-1]:  # rewritten: start again
                self.offsets.clear()
                self.times.clear()
            else:
                return
        self.offsets.append(offset)
        self.times.append(when)

    def time_of(self, end: int, otherwise: float) -> float:
        """The time the byte before `end` was first seen, or `otherwise`."""
        i = bisect.bisect_left(self.offsets, end)
        return self.times[i] if i < len(self.times) else otherwise


@dataclass
class Problems:
    """The first bad input of a file, and how many there were."""

    first: Optional[str] = None
    count: int = 0

    def add(self, text: str) -> None:
        if self.first is None:
            self.first = text
        self.count += 1

    def line(self, name: str) -> Optional[str]:
        if self.first is None:
            return None
        more = self.count - 1
        return f"{name} {self.first}" + (f" (and {more} more skipped)" if more > 0 else "")


class FileSeries:
    """One metrics file, read as far as it was written: the points of the lines past its
    `mark` (every point without one), and the last value of every key in the whole of
    what was read (`last`: the record's final metrics)."""

    def __init__(self, path: str, mark: Optional[Mark], started: float = 0.0,
                 from_start: bool = False) -> None:
        self.path = path
        self.kind = kind_of(path)
        self.mark = mark
        self.started = started  # TensorBoard events before it are an earlier attempt's
        self.from_start = from_start
        self.rows: dict[str, list[tuple[float, float, float]]] = {}
        self.last: dict[str, Metric] = {}
        self.problems = Problems()
        self.hint: Optional[str] = None
        self._restart(first=True)

    def _restart(self, first: bool = False) -> None:
        """Where reading begins: at the mark (a live reader's first read), else at the
        file's start, the lines that were there at the mark read for `last` only (a
        logger that rewrites its file rewrites them too)."""
        mark = self.mark
        live = first and mark is not None and not self.from_start
        self.offset = mark.size if live and mark else 0
        self.line_no = mark.lines if live and mark else 0
        self.skip = 0 if live or mark is None else mark.lines
        self.data_rows = max(self.line_no - 1, 0)  # a CSV's data rows before the offset
        self.inode: Optional[int] = mark.inode if first and mark else None
        self.rows.clear()
        self.header: Optional[list[str]] = None
        self._records = 0
        self._whole = False  # the last read took the file as one object
        self._quiet = False

    def read(self, checkpoints: Optional[Checkpoints] = None, final: bool = False) -> None:
        """Read what was added since the last read; `final`: a last line without its
        newline counts too (the job has ended)."""
        opened = _open_regular(self.path)
        if opened is None:
            return
        fh, st = opened
        with fh:
            if self.inode is not None and st.st_ino != self.inode or st.st_size < self.offset:
                self._restart()
            self.inode = st.st_ino
            if self.kind == "tfevents":
                self._read_events(fh, st)
                return
            if self.kind == "json" and 0 < st.st_size <= 4 * MiB:
                first = fh.readline(4 * MiB + 1)
                # The first line is the whole file: one object (part 5's form, maybe
                # written over and over), or the first line of JSON lines.
                if not fh.read(64).strip() and (self.offset == 0 or not first.endswith(b"\n")):
                    self._read_whole(first, st, final)
                    return
                if self.offset == 0 and first.strip().startswith(b"{") \
                        and not first.strip().endswith(b"}"):  # an object over many lines?
                    fh.seek(0)
                    data = fh.read(4 * MiB)
                    with contextlib.suppress(ValueError, RecursionError):
                        if isinstance(json.loads(data), dict):
                            self._read_whole(data, st, final)
                            return
            if self._whole:  # more lines came: they are JSON lines, read from the start
                self._whole = False
                self.rows.clear()
                self.offset = self.line_no = 0
            if self.kind in ("csv", "tsv") and self.header is None and self.offset > 0:
                fh.seek(0)
                line = fh.readline(MAX_LINE)
                self.header = [metric_name(c.strip()) for c in self._cells(line)] \
                    if line.endswith(b"\n") else None
            start = max(self.offset, st.st_size - MAX_READ)
            if start > self.offset:  # only the end of a huge file is read
                self.problems.add(f"is over {MAX_READ // MiB} MiB: only its end was read")
                fh.seek(start)
                fh.readline()  # a partial line
                start = fh.tell()
                self.offset = start
            fh.seek(start)
            data = fh.read(st.st_size - start)
        end = len(data) if final else data.rfind(b"\n") + 1
        if end <= 0:
            return
        cp = checkpoints or Checkpoints()
        pos = 0
        while pos < end:
            cut = data.find(b"\n", pos, end)
            stop = end if cut < 0 else cut + 1
            line = data[pos:stop]
            when = cp.time_of(self.offset + stop, st.st_mtime)
            pos = stop
            self._line(line, when)
        self.offset += end

    def _cells(self, raw: bytes) -> list[str]:
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            return next(csv.reader([text], delimiter="\t" if self.kind == "tsv" else ","))
        except (csv.Error, StopIteration):
            return []

    def _line(self, raw: bytes, when: float) -> None:
        self.line_no += 1
        counted = self.skip <= 0
        if not counted:
            self.skip -= 1
        self._quiet = not counted  # an earlier attempt's line: its problems were told
        if not raw.strip() or len(raw) > MAX_LINE:
            if len(raw) > MAX_LINE:
                self._problem(f"line {self.line_no}: longer than {MAX_LINE // MiB} MiB")
            return
        if self.kind == "json":
            self._json_line(raw, when, counted, self.line_no - 1)
        elif self.header is None:
            self.header = [metric_name(c.strip()) for c in self._cells(raw)]
        else:
            self._csv_line(raw, when, counted)

    def _problem(self, text: str) -> None:
        if not self._quiet:
            self.problems.add(text)

    def _add(self, values: Iterable[tuple[str, Metric]], step: Optional[float], when: float,
             counted: bool, index: int) -> None:
        x = float(index) if step is None else step
        for name, value in values:
            self.last[name] = value
            v = finite(value)
            if not counted or v is None or name in STEP_KEYS:
                continue  # the step is the x of the others (and a final metric)
            rows = self.rows.get(name)
            if rows is None:
                if len(self.rows) >= MAX_SERIES:
                    continue
                rows = self.rows[name] = []
            rows.append((x, v, when))
        if len(self.last) > MAX_METRICS:
            for extra in list(self.last)[MAX_METRICS:]:
                del self.last[extra]

    def _json_line(self, raw: bytes, when: float, counted: bool, index: int) -> None:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            self._problem(f"line {self.line_no}: not a JSON object")
            return
        if not isinstance(data, dict):
            self._problem(f"line {self.line_no}: not a JSON object")
            return
        values = flatten(data)
        step = next((finite(v) for k, v in values if k in STEP_KEYS), None)
        self._add(values, step, when, counted, index)

    def _csv_line(self, raw: bytes, when: float, counted: bool) -> None:
        assert self.header is not None
        cells = self._cells(raw)
        index = self.data_rows
        self.data_rows += 1
        if len(cells) != len(self.header):
            self._problem(f"line {self.line_no}: {len(cells)} columns, the header has "
                              f"{len(self.header)}")
            return
        step: Optional[float] = None
        values: list[tuple[str, Metric]] = []
        for name, cell in zip(self.header, cells):
            cell = cell.strip()
            if not cell:
                continue  # not logged on this row (Lightning leaves cells empty)
            try:
                number = float(cell)
            except ValueError:
                self._problem(f"line {self.line_no}: not a number")
                continue
            if name in STEP_KEYS:
                step = finite(number)
            if name in TIME_KEYS:
                t = finite(number)
                if t is not None:
                    when = t / 1000 if t > 1e11 else t
            else:
                values.append((name, int(number) if number.is_integer() and
                               abs(number) < 2**53 and "." not in cell else number))
        self._add(values, step, when, counted, index)

    def _read_whole(self, data: bytes, st: os.stat_result, final: bool) -> None:
        """A file of one line, read whole each time: its one point (counted if written
        since the attempt began)."""
        if not final and not data.rstrip().endswith(b"}"):
            return  # being written
        self.rows.clear()
        self._whole = True
        self.line_no, self.skip = 0, 0
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            self.problems.add("line 1: not a JSON object")
            return
        values = flatten(obj)
        step = next((finite(v) for k, v in values if k in STEP_KEYS), None)
        self._add(values, step, st.st_mtime,
                  self.mark is None or st.st_mtime >= self.started, 0)

    def _read_events(self, fh: Any, st: os.stat_result) -> None:
        try:
            from tensorboard.compat.proto import event_pb2
        except ImportError:
            self.hint = HINT_TENSORBOARD
            return
        fh.seek(self.offset)
        data = fh.read(min(st.st_size - self.offset, MAX_READ))
        pos = 0
        for record, end in _records(data):
            pos = end
            self._records += 1
            try:
                event = event_pb2.Event.FromString(record)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError, or worse
                self.problems.add(f"record {self._records}: not an event")
                continue
            if not event.HasField("summary"):
                continue
            counted = event.wall_time >= self.started
            values: list[tuple[str, Metric]] = []
            for value in event.summary.value:
                number = _scalar(value)
                if number is not None:
                    values.append((metric_name(value.tag), number))
            self._add(values, float(event.step), event.wall_time, counted, 0)
        self.offset += pos


def _records(data: bytes) -> Iterator[tuple[bytes, int]]:
    """TFRecord framing: (payload, end offset) of each complete record (length u64, its
    CRC, the payload, its CRC; the CRCs are not checked)."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if length > MAX_RECORD or end > len(data):
            return
        yield data[pos + 12: pos + 12 + length], end
        pos = end


def _scalar(value: Any) -> Optional[float]:
    """A summary value's number: TF1's simple_value, or a TF2 scalar tensor."""
    if value.HasField("simple_value"):
        return finite(value.simple_value)
    if not value.HasField("tensor"):
        return None
    tensor = value.tensor
    if tensor.tensor_shape.dim:
        return None
    for field in ("float_val", "double_val", "int_val", "int64_val"):
        vals = getattr(tensor, field)
        if len(vals) == 1:
            return finite(vals[0])
    content = tensor.tensor_content
    fmt = {1: "<f", 2: "<d", 3: "<i", 9: "<q"}.get(tensor.dtype)
    if fmt and len(content) == struct.calcsize(fmt):
        return finite(struct.unpack(fmt, content)[0])
    return None


# --- an attempt's points, and the final metrics ---------------------------------------


@dataclass(frozen=True)
class Read:
    """What an attempt's end read: its series, the final metrics, one line per file with
    bad input (or a missing extra)."""

    attempt: AttemptSeries
    metrics: tuple[tuple[str, Metric], ...]
    problems: tuple[str, ...]


def read_attempt(paths: Sequence[str], marks: Mapping[str, Mark],
                 checkpoints: Mapping[str, Checkpoints], attempt: int, started: float,
                 max_points: int, final: bool = True, display: Optional[str] = None,
                 labels: Optional[Mapping[str, str]] = None) -> Read:
    """Every file of `paths` read whole: the points added since `marks` (the attempt's
    start), and the last value of every key, the files merged by modification time (the
    one written last wins key by key)."""
    files = []
    for path in paths:
        f = FileSeries(path, marks.get(path), started, from_start=True)
        f.read(checkpoints.get(path), final=final)
        with contextlib.suppress(OSError):
            files.append((os.stat(path).st_mtime, f))
    columns: dict[str, list[tuple[float, float, float]]] = {}
    merged: dict[str, Metric] = {}
    problems = []
    hints = set()
    for _, f in sorted(files, key=lambda item: item[0]):
        merged.update(f.last)
        for name, rows in f.rows.items():
            columns.setdefault(name, []).extend(rows)  # files in the order written
        line = f.problems.line(_label(f.path, display, labels or {}))
        if line:
            problems.append(line)
        if f.hint:
            hints.add(f"{os.path.basename(f.path)}: {f.hint}")
    kept: dict[str, tuple[tuple[float, float, float], ...]] = {}
    totals = {}
    for name, rows in list(columns.items())[:MAX_SERIES]:
        kept[name] = downsample(rows, max_points)
        totals[name] = len(rows)
    series = AttemptSeries(attempt, started, kept, totals)
    return Read(series, tuple(list(merged.items())[:MAX_METRICS]),
                tuple(problems) + tuple(sorted(hints)))


def _label(path: str, folder: Optional[str], labels: Mapping[str, str]) -> str:
    """How a metrics file is named in the job's log: `$TQ_METRICS`, or its path relative to
    the job's cwd, or its name."""
    if path in labels:
        return labels[path]
    if folder:
        real = os.path.realpath(folder)
        if os.path.commonpath([path, real]) == real:
            return os.path.relpath(path, real)
    return os.path.basename(path)


def has_tfevents(paths: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(os.path.basename(p), TFEVENTS + "*") for p in paths)


# --- the supervisor's watch while the job runs ---------------------------------------


POLL_SECONDS = 1.0  # how often the supervisor looks at the metrics files' sizes


class Watch:
    """The metrics files of a running attempt: where each began (marks, taken before the
    job starts), and when their bytes appeared (checkpoints). Both are also written to a
    run file (`sidecar`: a header line, then one line per change) for live readers."""

    def __init__(self, metrics_file: Optional[str], cwd: str, names: Sequence[str],
                 attempt: int, started: float, sidecar: Optional[str]) -> None:
        self.metrics_file, self.cwd, self.names = metrics_file, cwd, tuple(names)
        self.attempt, self.started, self.sidecar = attempt, started, sidecar
        self.paths = metrics_paths(metrics_file, cwd, names)
        self.marks: dict[str, Mark] = {}
        for path in self.paths:
            mark = mark_of(path)
            if mark is not None:
                self.marks[path] = mark
        self.sizes = {p: m.size for p, m in self.marks.items()}
        self.checkpoints: dict[str, Checkpoints] = {}
        if sidecar:
            from git_tq.home import write_private_file

            head = {"attempt": attempt, "started": started,
                    "marks": {p: m.to_json() for p, m in self.marks.items()}}
            with contextlib.suppress(OSError):
                write_private_file(sidecar, json.dumps(head).encode() + b"\n")

    def poll(self, now: float) -> None:
        """Note the files that grew (or appeared) since the last look."""
        if any(glob.has_magic(n) for n in self.names):
            self.paths = metrics_paths(self.metrics_file, self.cwd, self.names)
        lines = []
        for path in self.paths:
            try:
                size = os.stat(path).st_size
            except OSError:
                continue
            if size != self.sizes.get(path):
                self.sizes[path] = size
                self.checkpoints.setdefault(path, Checkpoints()).add(size, now)
                lines.append(json.dumps({"p": path, "o": size, "t": round(now, 3)}) + "\n")
        if lines and self.sidecar:
            with contextlib.suppress(OSError), open(self.sidecar, "a", encoding="utf-8") as fh:
                fh.write("".join(lines))

    def run(self, done: Any, interval: float = POLL_SECONDS) -> None:
        """Poll until `done` (a threading.Event) is set; never raises."""
        import time

        while not done.wait(interval):
            try:
                self.poll(time.time())
            except Exception:  # noqa: BLE001, S112 - a watch must never end the supervisor
                continue

    def read(self, max_points: int, display: Optional[str] = None) -> Read:
        """The attempt's points and final metrics, at its end."""
        paths = list(dict.fromkeys([*self.paths, *metrics_paths(self.metrics_file, self.cwd,
                                                                   self.names)]))
        return read_attempt(paths, self.marks, self.checkpoints, self.attempt, self.started,
                            max_points, display=display,
                            labels={self.metrics_file: "$TQ_METRICS"} if self.metrics_file
                            else {})


@dataclass(frozen=True)
class Sidecar:
    """A running attempt's watch as its run file tells it."""

    attempt: int
    started: float
    marks: Mapping[str, Mark]
    checkpoints: Mapping[str, Checkpoints]


def read_sidecar(path: str, limit: int = 16 * MiB) -> Optional[Sidecar]:
    """The run file `Watch` writes, or None (missing, or not one)."""
    opened = _open_regular(path)
    if opened is None:
        return None
    fh, _ = opened
    with fh:
        data = fh.read(limit)
    lines = data.splitlines()
    try:
        head = json.loads(lines[0]) if lines else None
    except ValueError:
        return None
    if not isinstance(head, dict) or not isinstance(head.get("attempt"), int) \
            or finite(head.get("started")) is None or not isinstance(head.get("marks"), dict):
        return None
    marks = {p: m for p, m in ((p, Mark.from_json(v)) for p, v in head["marks"].items())
             if isinstance(p, str) and m is not None}
    checkpoints: dict[str, Checkpoints] = {}
    for raw in lines[1:]:
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("p"), str) \
                and isinstance(item.get("o"), int) and finite(item.get("t")) is not None:
            checkpoints.setdefault(item["p"], Checkpoints()).add(item["o"], float(item["t"]))
    return Sidecar(head["attempt"], float(head["started"]), marks, checkpoints)
