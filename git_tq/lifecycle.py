"""The job state machine: which events move a job from which states to which.

Pure: `apply_event` returns a new `Job`; the store writes it as a commit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Optional

from git_tq.errors import InvalidTransition
from git_tq.model import Job, JobSpec, State

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
        Event("started", frozenset({P}), R),  # attempt 1
        Event("resumed", frozenset({P}), R),  # attempt 2, 3, ... after a preemption
        Event("stopping", frozenset({R}), S),  # stop signal sent; grace running
        Event("preempted", frozenset({R, S}), P),  # back to the queue, same worktree
        Event("finished", frozenset({R, S}), None),  # done (exit 0) or failed
        Event("start-failed", frozenset({P, R}), State.FAILED),  # never got going
        Event("cancelled", frozenset({P, R, S}), State.CANCELLED),
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
    if event == "preempted":
        changes.update(assigned_gpus=None)
    target = spec.target
    if event == "finished":
        code, sig = fields.get("exit_code"), fields.get("signal")
        target = State.DONE if code == 0 and sig is None else State.FAILED
    if target is not None and target.finished:
        changes["ended_at"] = now
    changes.update(fields)
    assert target is not None
    return job.evolve(state=target, **changes)


# What an edit may change, by state: a waiting job anything it was submitted with that
# decides when and where it runs; a running one only what the daemon reads while it runs.
EDITABLE: dict[State, frozenset[str]] = {
    P: frozenset({"priority", "grace", "tag", "gpus", "after", "after_any"}),
    R: frozenset({"priority", "grace"}),
    S: frozenset({"priority", "grace"}),
}


def apply_edit(job: Job, spec: JobSpec, detail: str) -> Job:
    """The job with its spec replaced (event `edited`, same state); raises
    InvalidTransition for a job that has ended or a field its state does not allow."""
    allowed = EDITABLE.get(job.state)
    if allowed is None:
        raise InvalidTransition(f"job {job.id} is {job.state.value}: only a pending or "
                                "running job can be edited")
    changed = [name for name in ("priority", "grace", "tag", "gpus", "after", "after_any",
                                 "command", "shell", "env", "cwd", "stop_signal",
                                 "stop_target", "params", "sweep", "submitted_at", "user",
                                 "host")
               if getattr(job.spec, name) != getattr(spec, name)]
    refused = [name.replace("_", "-") for name in changed if name not in allowed]
    if refused:
        raise InvalidTransition(f"job {job.id} is {job.state.value}: its "
                                f"{', '.join(refused)} can no longer change (only "
                                f"{' and '.join(sorted(allowed))})")
    return job.evolve(spec=spec, event="edited", detail=detail)
