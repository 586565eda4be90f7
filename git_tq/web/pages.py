"""What each web page shows, as plain values made from `service` and `rows`: the GPU
board, a page of the job list, one job, a comparison (no HTTP, no HTML here).

Text is handed on as the records hold it; the templates escape every value (and make
control characters visible), so nothing here needs to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from git_tq import output, service
from git_tq import rows as cached
from git_tq.errors import UsageError

PER_PAGE = 100  # jobs on one page of the job list
STATES = ("pending", "running", "stopping", "done", "failed", "cancelled")


@dataclass(frozen=True)
class ListedJob:
    """One line of the job list."""

    name: str
    state: str  # the lifecycle state
    status: str  # the state as `ls` words it: "failed (3)", "fetched: done"
    tag: str
    params: str
    command: str
    time: str
    source: str  # the source commit, shortened ("" on an unborn branch)
    note: str
    metrics: tuple[str, ...]  # one text per metric column
    trust: str


@dataclass(frozen=True)
class JobListPage:
    jobs: list[ListedJob]
    metrics: list[str]  # the metric columns
    page: int  # 1-based
    pages: int
    total: int  # jobs that pass the filters
    everything: int  # every job
    state: str  # the filter ("" for none)
    tag: str
    unreadable: int


def job_list(ctx: service.Context, page: int = 1, *, state: str = "", tag: str = "",
             per_page: int = PER_PAGE) -> JobListPage:
    """One page of every job (fetched ones too), newest first: the rows `ls --all`
    prints, from its cache (rows.py), so a page costs about one `ls --all` whatever the
    number of jobs, and only the page's rows are turned into lines."""
    if state and state not in STATES and state != "active":
        raise UsageError(f"unknown state {state!r}")
    got = cached.every(ctx, json=False)
    wanted = cached.ACTIVE if state == "active" else {state} if state else None
    chosen = [r for r in reversed(got.rows)
              if (wanted is None or r.state in wanted) and (not tag or r.tag == tag)]
    pages = max(1, math.ceil(len(chosen) / per_page))
    page = min(max(1, page), pages)
    shown = chosen[(page - 1) * per_page:page * per_page]
    metrics = service.metric_columns(ctx, shown)
    jobs = []
    for r in shown:
        values = dict(r.metrics)
        c = r.cells  # ID STATE PRI GPUS TAG PARAMS COMMAND TIME NOTE
        jobs.append(ListedJob(
            r.name, r.state, c[1], r.tag or "", c[5], c[6], c[7], (r.source or "")[:10], c[8],
            tuple(output.metric_text(values.get(m), 16) for m in metrics), r.trust))
    return JobListPage(jobs, metrics, page, pages, len(chosen), len(got.rows), state, tag,
                       len(got.unreadable))


@dataclass(frozen=True)
class JobPage:
    detail: service.JobDetail
    diff: Optional[service.SnapshotDiff]
    diff_error: str  # why there is no diff ("" when there is one)
    stops: list[service.StoppedAttempt]

    @property
    def active(self) -> bool:
        return self.detail.view.job.state.active


def job_page(ctx: service.Context, name: str) -> JobPage:
    """One job: its record (`show`), the code it ran against its source commit."""
    from git_tq.errors import TqError

    detail = service.show_job(ctx, name)
    try:
        diff, why = service.snapshot_diff(ctx, detail.view.job), ""
    except TqError as exc:  # e.g. a fetched record whose code did not come along
        diff, why = None, str(exc)
    return JobPage(detail, diff, why, service.stopped_attempts(detail.lifecycle))


@dataclass(frozen=True)
class Cell:
    """A cell of the comparison table: its pieces of text, each marked when it differs
    from the first job's; `kind` is "best" (the best value of a metric), "differs",
    a state name (the outcome row), or ""."""

    pieces: tuple[tuple[str, bool], ...]
    kind: str = ""


@dataclass(frozen=True)
class CompareTable:
    jobs: list[str]  # job names, the columns
    rows: list[tuple[str, list[Cell]]]
    footer: str
    active: bool  # some job may still report points


def compare_table(found: service.Comparison) -> CompareTable:
    """The comparison as `git tq compare` prints it, cell by cell."""

    def text(row: service.CompareRow, i: int, value: Any) -> str:
        if row.kind == "metric":
            return output.metric_text(value, 30)
        if row.name == "source":
            return str(value)[:10] if value else "(unborn)"
        if row.name == "code":
            c = found.code[i]
            return "(base)" if i == 0 else "same" if not c.files else \
                f"{c.files} file{'s' if c.files > 1 else ''}, +{c.insertions} -{c.deletions}"
        if row.name == "run time":
            return "-" if value is None else output.duration(value)
        if isinstance(value, dict):
            return " ".join(f"{k}={v}" for k, v in value.items())
        return "-" if value is None or value == "" else str(value)

    rows = []
    for row in found.rows:
        cells = []
        for i, value in enumerate(row.values):
            if row.words is not None:
                cells.append(Cell(tuple(row.words[i]) or (("-", False),)))
                continue
            kind = ""
            if row.kind == "metric" and row.best == i:
                kind = "best"
            elif row.name == "outcome":
                kind = found.views[i].job.state.value
            elif row.kind == "property" and row.differs and (row.name != "code" or i > 0):
                kind = "differs"
            cells.append(Cell(((text(row, i, value), False),), kind))
        rows.append((row.name, cells))
    marked = [r for r in found.rows if r.best is not None]
    lower = [r.name for r in marked if r.lower_is_better]
    higher = [r.name for r in marked if not r.lower_is_better]
    footer = ""
    if marked:
        footer = "best marked" + (f"; lower is better for {', '.join(lower)}" if lower else "") \
            + (f"; higher for {', '.join(higher)}" if higher else "")
    return CompareTable([v.job.name for v in found.views], rows, footer,
                        any(v.job.state.active for v in found.views))


def comparison(ctx: service.Context, tokens: Sequence[str]) -> CompareTable:
    """The jobs `tokens` name (a job list as every command takes it; one job will do)."""
    return compare_table(service.compare(ctx, tokens, least=1))


def curves_json(ctx: service.Context, tokens: Sequence[str],
                metrics: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The jobs' metric series in their JSON form (`series.to_json`), what the pages
    draw."""
    from git_tq import series

    return series.to_json(service.job_curves(ctx, tokens, metrics))
