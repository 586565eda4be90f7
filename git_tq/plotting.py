"""Metric curves drawn in the terminal (plotext): one panel per metric, one line per job,
resumes marked; the x axis (step, time, epoch), smoothing and log scale; and the CSV form.

plotext 5 (its last line): plotext 6 builds its documentation when imported, ~0.5 s of
a plot's 1 s budget (BENCHMARKS.md).

Pure rendering: `JobCurves` in, text out. Every label that comes from a record (tags,
params, metric names) goes through safetext.
"""

from __future__ import annotations

import bisect
import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq.errors import UsageError
from git_tq.safetext import visible
from git_tq.series import JobCurves, Point, Series

MAX_PANELS = 6  # metrics drawn when none is named
DRAWABLE = 1e300  # points with a larger |x| or |y| are left out: plotext's ranges overflow
X_AXES = ("step", "time", "epoch")
DRAWN_PER_COLUMN = 2  # points per terminal column worth drawing (braille: 2 dots wide)


@dataclass(frozen=True)
class Drawn:
    """A plot as text, with the lines to say beside it (panels left out, jobs with no
    epoch...)."""

    text: str
    notes: tuple[str, ...]


def shared_metrics(curves: Sequence[JobCurves], x: str = "step") -> tuple[list[str], int]:
    """The metrics every job has (all of them when no metric is shared), at most
    MAX_PANELS, and how many there were in all."""
    having = [set(c.series) for c in curves if c.series]
    if not having:
        return [], 0
    shared = set.intersection(*having) or set.union(*having)
    if x == "epoch" and len(shared) > 1:
        shared.discard("epoch")
    names = sorted(shared)
    return names[:MAX_PANELS], len(names)


def legend(c: JobCurves) -> str:
    """`12 base lr=1e-3`: the job, its tag, its sweep parameters."""
    bits = [c.job] + ([c.tag] if c.tag else []) + [f"{k}={v}" for k, v in c.params.items()]
    return visible(" ".join(bits))[:60]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """A trailing moving average over `window` points (fewer at the start)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _epochs(c: JobCurves) -> Optional[tuple[list[float], list[float]]]:
    """(steps, epochs) of the job's `epoch` series, by step."""
    s = c.series.get("epoch")
    if s is None or not s.points:
        return None
    pairs = sorted((p.step, p.value) for p in s.points)
    return [a for a, _ in pairs], [b for _, b in pairs]


def x_of(points: Sequence[Point], x: str, origin: float,
         epochs: Optional[tuple[list[float], list[float]]]) -> list[Optional[float]]:
    """Each point's x: its step, its time (seconds since `origin`), or the value of the
    `epoch` metric at its step (None where there is none)."""
    if x == "time":
        return [p.time - origin for p in points]
    if x == "epoch":
        if epochs is None:
            return [None] * len(points)
        steps, values = epochs
        found: list[Optional[float]] = []
        for p in points:
            i = bisect.bisect_right(steps, p.step) - 1
            found.append(values[i] if i >= 0 else None)
        return found
    return [p.step for p in points]


def render(curves: Sequence[JobCurves], metrics: Sequence[str], *, x: str = "step",
           window: int = 1, log: bool = False, width: int = 100, height: int = 0,
           color: bool = True) -> Drawn:
    """The panels as text (ANSI colours only with `color`)."""
    import plotext as plt

    notes: list[str] = []
    origin = min((p.time for c in curves for s in c.series.values() for p in s.points[:1]),
                 default=0.0)
    panels = max(len(metrics), 1)
    plt.clear_figure()
    plt.plotsize(max(width, 40), height or max(12, min(24, 48 // panels)) * panels)
    if panels > 1:
        plt.subplots(panels, 1)
    no_epoch = [c.job for c in curves if x == "epoch" and _epochs(c) is None]
    if no_epoch:
        notes.append("no epoch metric for job " + ", ".join(visible(j) for j in no_epoch))
    for row, name in enumerate(metrics, start=1):
        if panels > 1:
            plt.subplot(row, 1)
        plt.title(visible(name) + (f" (smoothed over {window})" if window > 1 else ""))
        plt.xlabel({"step": "step", "time": "seconds since the first point",
                    "epoch": "epoch"}[x])
        drawn = 0
        for c in curves:
            s: Optional[Series] = c.series.get(name)
            if s is None or not s.points:
                continue
            epochs = _epochs(c)
            xs = x_of(s.points, x, origin, epochs)
            pairs = [(a, p.value) for a, p in zip(xs, s.points) if a is not None]
            ys = smooth([v for _, v in pairs], window)
            xy = [(a, v) for (a, _), v in zip(pairs, ys)
                  if (v > 0 or not log) and abs(a) <= DRAWABLE and abs(v) <= DRAWABLE]
            if len(xy) < len(pairs):
                notes.append(f"{visible(name)}, job {visible(c.job)}: "
                             f"{len(pairs) - len(xy)} points left out "
                             f"({'not above 0 on a log scale, or ' if log else ''}"
                             "too large to draw)")
            if not xy:
                continue
            marks = [m for m in (x_of([Point(r.step, 0.0, r.time, r.attempt)], x, origin,
                                      epochs)[0] for r in c.resumes)
                     if m is not None and abs(m) <= DRAWABLE]
            label = legend(c)
            if s.total > len(s.points):
                label += f" ({len(s.points)} of {s.total} points)"
            if marks:
                label += " | resumed at " + ", ".join(f"{m:g}" for m in marks)
            plt.plot([a for a, _ in xy], [v for _, v in xy], label=label, marker="braille")
            for m in marks:
                plt.vline(m)
            drawn += 1
        if log and drawn:  # plotext fails on a log axis with nothing on it
            plt.yscale("log")
        if not drawn:
            notes.append(f"{visible(name)}: no points")
    try:
        text = plt.build()
    except (ArithmeticError, ValueError, IndexError, TypeError) as exc:  # plotext's own
        raise UsageError(f"cannot draw these values in a terminal ({exc}): "
                         "`git tq plot --json` prints them") from None
    finally:
        plt.clear_figure()
    return Drawn(text if color else plt.uncolorize(text), tuple(notes))


def to_csv(curves: Sequence[JobCurves]) -> str:
    """Long format, one row per point: job,metric,attempt,step,time,value."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["job", "metric", "attempt", "step", "time", "value"])
    for c in curves:
        for name, s in c.series.items():
            for p in s.points:
                w.writerow([visible(c.job), visible(name), p.attempt, _g(p.step),
                            f"{p.time:.3f}", _g(p.value)])
    return out.getvalue()


def _g(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
