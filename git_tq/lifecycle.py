"""The job state machine: which events move a job from which states to which.

Pure: `apply_event` returns a new `Job`; the store writes it as a commit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Optional

from git_tq.errors import InvalidTransition
from git_tq.model import Job, JobSpec, State, epoch

P, R, S = State.PENDING, State.RUNNING, State.STOPPING


def now_iso() -> str:
    """The time stamp lifecycle records carry: local time, seconds, with its offset."""
    return dt.datetime.now().astimezone().replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Event:
    name: str
    sources: frozenset[State]
    target: Optional[State]  # None: decided by the exit status (done or failed)


EVENTS: dict[str, Event] = {
    e.name: e
    for e in (
        Event("started", frozenset({P}), R),  # attempt 1, or the next after a retry
        Event("resumed", frozenset({P}), R),  # attempt 2, 3, ... after a preemption
        Event("stopping", frozenset({R}), S),  # stop signal sent; grace running
        Event("preempted", frozenset({R, S}), P),  # back to the queue, same worktree
        Event("finished", frozenset({R, S}), None),  # done (exit 0) or failed
        Event("start-failed", frozenset({P, R}), State.FAILED),  # never got going
        Event("cancelled", frozenset({P, R, S}), State.CANCELLED),
        # An attempt that failed by itself, queued again (`--retry N`), and an attempt
        # stopped at its time limit (failed, whatever its exit status; never retried).
        Event("retry", frozenset({R, S}), P),
        Event("timed-out", frozenset({R, S}), State.FAILED),
    )
}

# Every state a job can be in after the named event, for documentation and tests.
TRANSITIONS: dict[State, frozenset[State]] = {
    state: frozenset(
        t
        for e in EVENTS.values()
        if state in e.sources
        for t in ((e.target,) if e.target else (State.DONE, State.FAILED))
    )
    for state in State
}


def apply_event(job: Job, event: str, now: str, **fields: Any) -> Job:
    """The job after `event` at time `now`; raises InvalidTransition if not allowed.

    `fields` may set exit_code, signal, assigned_gpus, detail, stop and stop_seconds.
    An event that ends an attempt adds its running time to `ran_seconds`.
    """
    spec = EVENTS.get(event)
    if spec is None:
        raise InvalidTransition(f"unknown lifecycle event {event!r}")
    if job.state not in spec.sources:
        raise InvalidTransition(f"job {job.id} is {job.state.value}: it cannot be {event}")
    changes: dict[str, Any] = {"event": event, "detail": fields.pop("detail", None)}
    if event in ("started", "resumed"):
        changes.update(attempt=job.attempt + 1, started_at=now, ended_at=None,
                       exit_code=None, signal=None, stop=None, stop_seconds=None)
    if event in ("preempted", "retry"):
        changes.update(assigned_gpus=None)
    if event == "retry":
        changes.update(retried=job.retried + 1)
    target = spec.target
    if event == "finished":
        code, sig = fields.get("exit_code"), fields.get("signal")
        target = State.DONE if code == 0 and sig is None else State.FAILED
    if target is not None and target.finished:
        changes["ended_at"] = now
    if job.state in (R, S) and target not in (R, S):
        # The attempt ended: its running time joins the sum a time limit is checked against.
        begun, ended = epoch(job.started_at), epoch(now)
        if begun is not None and ended is not None:
            changes["ran_seconds"] = round(job.ran_seconds + max(0.0, ended - begun), 1)
    changes.update(fields)
    assert target is not None
    return job.evolve(state=target, **changes)


# What an edit may change, by state: a waiting job anything it was submitted with that
# decides when and where it runs; a running one only what the daemon reads while it runs.
EDITABLE: dict[State, frozenset[str]] = {
    P: frozenset({"priority", "grace", "tag", "gpus", "after", "after_any", "time_limit"}),
    R: frozenset({"priority", "grace", "time_limit"}),
    S: frozenset({"priority", "grace", "time_limit"}),
}


def apply_edit(job: Job, spec: JobSpec, detail: str) -> Job:
    """The job with its spec replaced (event `edited`, same state); raises
    InvalidTransition for a job that has ended or a field its state does not allow."""
    allowed = EDITABLE.get(job.state)
    if allowed is None:
        raise InvalidTransition(f"job {job.id} is {job.state.value}: only a pending or "
                                "running job can be edited")
    changed = [name for name in ("priority", "grace", "tag", "gpus", "after", "after_any",
                                 "time_limit", "retries", "command", "shell", "env", "cwd",
                                 "stop_signal", "stop_target", "params", "sweep",
                                 "submitted_at", "user", "host")
               if getattr(job.spec, name) != getattr(spec, name)]
    refused = [name.replace("_", "-") for name in changed if name not in allowed]
    if refused:
        raise InvalidTransition(f"job {job.id} is {job.state.value}: its "
                                f"{', '.join(refused)} can no longer change (only "
                                f"{' and '.join(sorted(allowed))})")
    return job.evolve(spec=spec, event="edited", detail=detail)
