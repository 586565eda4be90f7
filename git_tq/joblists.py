"""Job lists as every command takes them: ids, ranges (`12-15`), comma-separated
lists, `tq/jobs/7`, job commits, and the name of a sweep or a tag."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Optional

from git_tq.errors import BrokenRef, UsageError
from git_tq.model import Job

if TYPE_CHECKING:
    from git_tq.context import Context

MAX_RANGE = 100_000  # jobs one range may name


def parse_job_tokens(tokens: Sequence[str]) -> list[str]:
    """`1 3 5`, `1,3,5` or `1-3,5` (or all of these) -> ['1', '2', '3', '5']; other
    tokens (tags, sweep names, commits) are passed on as they are."""
    result: list[str] = []
    for part in token_parts(tokens):
        ids = _job_range(part)
        if ids is None:
            result.append(part)
        else:
            result.extend(map(str, ids))
    if not result:
        raise UsageError("no job given")
    return result


def token_parts(tokens: Sequence[str]) -> Iterator[str]:
    """The comma-separated, non-empty parts of job tokens."""
    for token in tokens:
        yield from (t.strip() for t in token.split(",") if t.strip())


def _job_range(part: str) -> Optional[range]:
    """The ids of a range `12-15`, None when `part` is not one; a one-line error for
    a backwards or huge range."""
    low, dash, high = part.partition("-")
    if not (dash and is_id(low) and is_id(high)):
        return None
    a, b = int(low), int(high)
    if a > b:
        raise UsageError(f"bad job range {part!r}: {a} is after {b}")
    if b - a >= MAX_RANGE:
        raise UsageError(f"job range {part!r} names more than {MAX_RANGE} jobs")
    return range(a, b + 1)


def is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 18


def resolve_jobs(ctx: Context, tokens: Sequence[str], *,
                 missing_ok_in_ranges: bool = True,
                 broken: Optional[list[BrokenRef]] = None) -> list[Job]:
    """The jobs a list of tokens names, in order, each once: ids, ranges (`12-15`: the
    ids of it that exist, unless none does), `tq/jobs/7`, job commits, and the name of a
    sweep or a tag (every job that has it). Unknown names are a one-line error, and so
    is a local job ref at a missing object, unless `broken` is given: then it is added
    there (once) and the rest are resolved."""
    from git_tq.errors import UnknownJob

    jobs: dict[str, Job] = {}  # by name: a local 7 and alice@gpu1:7 are two jobs
    listing: Optional[list[Job]] = None
    for part in token_parts(tokens):
        span = _job_range(part)
        if span is not None:
            listing = ctx.store.list_jobs() if listing is None else listing
            found = [j for j in listing if j.id in span]
            if not found or not missing_ok_in_ranges and len(found) != len(span):
                raise UnknownJob(f"no job in range {part} (see git tq ls --all)")
            jobs.update((j.name, j) for j in found)
            continue
        try:
            job = ctx.store.resolve(part)
        except BrokenRef as exc:
            if broken is None or exc.origin is not None:
                raise
            if exc.job_id not in {b.job_id for b in broken}:
                broken.append(exc)
            continue
        except UnknownJob:
            if is_id(part) or part.startswith(("tq/", "refs/")):
                raise
            listing = ctx.store.list_jobs() if listing is None else listing
            named = [j for j in listing if part in (j.spec.sweep, j.spec.tag)]
            if not named:
                raise UnknownJob(f"no job, sweep or tag {part!r} (see git tq ls --all)") \
                    from None
            jobs.update((j.name, j) for j in named)
            continue
        jobs[job.name] = job
    if not jobs and not broken:
        raise UsageError("no job given")
    return list(jobs.values())
