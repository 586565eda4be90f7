"""Metric series: points a job reported over time, per attempt, as stored in git and read live.

A job's series are kept in git as the note of its submission commit in
`refs/notes/tq-series`: one line per attempt, each a compact JSON object of columns
(`encode_attempt`), so a resumed attempt adds one line and the points of each attempt
stay apart. Everything read back (a note may have been fetched) is data only: parsed
defensively, sizes capped, non-numbers skipped (`decode_attempts`).

`JobCurves` is what `git tq plot`, `report` and `serve` draw; `to_json` is its one JSON
form (`git tq plot --json`, the web pages).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

SERIES_REF = "refs/notes/tq-series"  # each job's series, on its submission commit
DEFAULT_MAX_POINTS = 100_000  # per series (tq.metrics.maxPoints)
MAX_SERIES = 200  # metrics kept per attempt; more are dropped
MAX_NOTE_BYTES = 64 * 1024 * 1024  # a stored note larger than this is not read
MAX_ATTEMPTS = 1000  # attempts read from one note
FORMAT = 1  # the attempt line's "v"


@dataclass(frozen=True)
class Point:
    step: float  # the point's `step` (or the x it was logged at), else its index in the series
    value: float
    time: float  # wall time of the point, seconds since the epoch
    attempt: int  # 1, 2, ... (a resumed attempt continues the series)


@dataclass(frozen=True)
class Series:
    metric: str
    points: tuple[Point, ...]
    total: int  # points reported before downsampling (== len(points) when not downsampled)


@dataclass(frozen=True)
class Resume:
    """Where an attempt begins (a marker on the plot)."""

    attempt: int
    step: float
    time: float


@dataclass(frozen=True)
class JobCurves:
    job: str  # the job's name as `ls` prints it ("12", "alice@gpu1:7")
    tag: Optional[str]
    params: Mapping[str, str]  # sweep parameters
    state: str  # lifecycle state, as ls shows it
    resumes: tuple[Resume, ...]
    series: Mapping[str, Series]  # metric name -> series (numbers only)


@dataclass(frozen=True)
class AttemptSeries:
    """The points one attempt reported, as stored: per metric, (step, value, time) rows,
    and how many there were before downsampling."""

    attempt: int
    started: float  # wall time the attempt began (0.0 if unknown)
    columns: Mapping[str, tuple[tuple[float, float, float], ...]]
    totals: Mapping[str, int] = field(default_factory=dict)


def to_json(curves: Sequence[JobCurves]) -> dict[str, Any]:
    """The JSON form that `git tq plot --json` prints and the web pages fetch."""
    return {"jobs": [{
        "job": c.job, "tag": c.tag, "params": dict(c.params), "state": c.state,
        "resumes": [{"attempt": r.attempt, "step": _num(r.step), "time": r.time}
                    for r in c.resumes],
        "series": {name: {"total": s.total,
                          "points": [[_num(p.step), _num(p.value), p.time, p.attempt]
                                     for p in s.points]}
                   for name, s in c.series.items()},
    } for c in curves]}


def _num(x: float) -> float | int:
    """An integral float as an int (steps print as 40, not 40.0)."""
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


T = TypeVar("T")


def downsample(points: Sequence[T], limit: int) -> tuple[T, ...]:
    """At most `limit` points, picked evenly (the first and the last always kept)."""
    n = len(points)
    if limit <= 0 or n <= limit:
        return tuple(points)
    if limit == 1:
        return (points[-1],)
    return tuple(points[round(i * (n - 1) / (limit - 1))] for i in range(limit))


def finite(x: object) -> Optional[float]:
    """A number as a finite float; None for anything else (bools, texts, NaN, inf)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        f = float(x)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --- the stored form: one line per attempt ---------------------------------------


def encode_attempt(attempt: AttemptSeries) -> bytes:
    """One compact line: {"v":1,"attempt":N,"t0":T,"series":{"loss":{"n":TOTAL,"step":[..],
    "value":[..],"dt":[..]}}}; times are offsets from t0 in ms (short integers)."""
    t0 = attempt.started or min((row[2] for rows in attempt.columns.values()
                                 for row in rows), default=0.0)
    series: dict[str, Any] = {}
    for name, rows in attempt.columns.items():
        series[name] = {"n": max(attempt.totals.get(name, len(rows)), len(rows)),
                        "step": [_num(r[0]) for r in rows],
                        "value": [_num(r[1]) for r in rows],
                        "dt": [round((r[2] - t0) * 1000) for r in rows]}
    line = {"v": FORMAT, "attempt": attempt.attempt, "t0": round(t0, 3), "series": series}
    return json.dumps(line, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode_attempts(data: bytes, max_points: int = DEFAULT_MAX_POINTS) -> list[AttemptSeries]:
    """The attempts a note holds, by attempt number (a later line for the same attempt
    wins). Anything malformed is skipped; sizes are never trusted."""
    found: dict[int, AttemptSeries] = {}
    for raw in data[:MAX_NOTE_BYTES].splitlines():
        if len(found) >= MAX_ATTEMPTS:
            break
        parsed = _attempt_of(raw, max_points)
        if parsed is not None:
            found[parsed.attempt] = parsed
    return [found[k] for k in sorted(found)]


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/@+-]{0,127}")


def _numbers(column: object, limit: int) -> list[float]:
    """A stored column as floats (at most `limit`); [] unless every item is a finite
    number (NaN and Infinity were read as None: see decode_attempts)."""
    if not isinstance(column, list):
        return []
    try:
        numbers = array("d", column[:limit])  # C speed; refuses None, texts, lists
    except (TypeError, OverflowError):
        return []
    return numbers.tolist() if all(map(math.isfinite, numbers)) else []


def _attempt_of(raw: bytes, max_points: int) -> Optional[AttemptSeries]:
    raw = raw.strip()
    if not raw.startswith(b"{"):
        return None
    try:
        line = json.loads(raw, parse_constant=lambda _: None)  # NaN, Infinity: no number
    except (ValueError, RecursionError):
        return None
    if not isinstance(line, dict):
        return None
    attempt = line.get("attempt")
    t0 = finite(line.get("t0"))
    series = line.get("series")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= 10**6 \
            or t0 is None or not isinstance(series, dict):
        return None
    columns: dict[str, tuple[tuple[float, float, float], ...]] = {}
    totals: dict[str, int] = {}
    for name, col in list(series.items())[:MAX_SERIES]:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or not isinstance(col, dict):
            continue
        steps, values, dts = (_numbers(col.get(k), max_points) for k in ("step", "value", "dt"))
        times = [t0 + d / 1000 for d in dts]
        rows = list(zip(steps, values, times))
        if len(rows) != len(steps) or len(rows) != len(values) \
                or not all(map(math.isfinite, times)):
            rows = []  # columns of different lengths, or times past a float: not ours
        n = col.get("n")
        total = n if isinstance(n, int) and not isinstance(n, bool) else 0
        columns[name] = tuple(rows)
        totals[name] = min(max(total, len(rows)), 10**12)
    return AttemptSeries(attempt, t0, columns, totals)


# --- from attempts to curves --------------------------------------------------------


def merge_attempts(attempts: Iterable[AttemptSeries], metrics: Optional[Sequence[str]] = None,
                   max_points: int = DEFAULT_MAX_POINTS) \
        -> tuple[tuple[Resume, ...], dict[str, Series]]:
    """One series per metric over every attempt (in attempt order), at most `max_points`
    points each (picked evenly; the count kept), and where each attempt after the first
    began."""
    wanted = None if metrics is None else set(metrics)
    # Per metric: every attempt's rows in order, and where each attempt's begin.
    rows: dict[str, list[tuple[float, float, float]]] = {}
    starts: dict[str, tuple[list[int], list[int]]] = {}
    totals: dict[str, int] = {}
    resumes: list[Resume] = []
    for a in sorted(attempts, key=lambda a: a.attempt):
        first: Optional[tuple[float, float]] = None
        for name, column in a.columns.items():
            if wanted is not None and name not in wanted:
                continue
            found = rows.setdefault(name, [])
            at, numbers = starts.setdefault(name, ([], []))
            at.append(len(found))
            numbers.append(a.attempt)
            found.extend(column)
            totals[name] = totals.get(name, 0) + max(a.totals.get(name, len(column)),
                                                     len(column))
            if column and (first is None or column[0][0] < first[0]):
                first = (column[0][0], column[0][2])
        if a.attempt > 1 and first is not None:
            resumes.append(Resume(a.attempt, first[0], a.started or first[1]))
    series = {}
    for name, found in rows.items():
        at, numbers = starts[name]
        kept = tuple(Point(*found[i], numbers[bisect.bisect_right(at, i) - 1])
                     for i in downsample(range(len(found)), max_points))
        series[name] = Series(name, kept, max(totals[name], len(kept)))
    return tuple(resumes), series


def from_final_metrics(metrics: Iterable[tuple[str, object]], attempt: int, time: float) \
        -> dict[str, Series]:
    """A record's final metrics as one-point series (jobs recorded before series were
    kept)."""
    found = {}
    for name, value in metrics:
        v = finite(value)
        if v is not None:
            found[name] = Series(name, (Point(0.0, v, time, max(attempt, 1)),), 1)
    return found
