"""The commit-message format of job records (version 1): writing and reading it.

Every commit on a job ref carries the whole record, so the tip alone says
everything about the job and one `git for-each-ref` lists a queue. Example::

    tq job 7 submitted: python train.py --lr 3

    Tq-Format: 1
    Tq-Job: 7
    Tq-Event: submitted
    Tq-State: pending
    Tq-Command: ["python", "train.py", "--lr", "3"]
    Tq-Priority: 10
    ...

Fields are `Tq-Name: value` trailers, one per line, in the last paragraph.
Values are plain text except Tq-Command (a JSON list of strings). Unknown
fields are ignored, so later versions may add fields; Tq-Format changes only
when a field changes meaning.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Optional

from git_tq.model import ChangeSummary, GpuRequest, Job, JobSpec, State

FORMAT_VERSION = 1
SUBJECT_WIDTH = 72


class RecordFormatError(ValueError):
    pass


def encode(job: Job) -> str:
    """The commit message holding `job`."""
    s = job.spec
    what = job.event
    if job.state.finished and job.event == "finished":
        what = "done" if job.state is State.DONE else _exit_text(job)
    subject = f"tq job {job.id} {what}: {s.command_line()}".replace("\n", " ")
    if len(subject) > SUBJECT_WIDTH:
        subject = subject[: SUBJECT_WIDTH - 1] + "…"
    fields: list[tuple[str, Optional[str]]] = [
        ("Format", str(FORMAT_VERSION)),
        ("Job", str(job.id)),
        ("Event", job.event),
        ("State", job.state.value),
        ("Detail", job.detail),
        ("Command", json.dumps(list(s.command))),
        ("Shell", "yes" if s.shell else None),
        ("Priority", str(s.priority)),
        ("Grace", str(s.grace)),
        ("Gpus", s.gpus.encode()),
        ("Tag", s.tag),
        ("Env", s.env),
        ("Cwd", s.cwd or "."),
        ("Submitted-At", s.submitted_at),
        ("User", s.user),
        ("Host", s.host),
        ("Source", job.source or "none"),
        ("Changes", job.changes.encode()),
        ("Snapshot", job.snapshot or None),
        ("Attempt", str(job.attempt)),
        ("Started-At", job.started_at),
        ("Ended-At", job.ended_at),
        ("Exit-Code", None if job.exit_code is None else str(job.exit_code)),
        ("Signal", None if job.signal is None else str(job.signal)),
        ("Assigned-Gpus",
         None if job.assigned_gpus is None else ",".join(map(str, job.assigned_gpus))),
    ]
    body = "\n".join(f"Tq-{k}: {v}" for k, v in fields if v is not None)
    return f"{subject}\n\n{body}\n"


def _exit_text(job: Job) -> str:
    if job.state is State.FAILED and job.signal is not None:
        return f"failed (signal {job.signal})"
    if job.state is State.FAILED and job.exit_code is not None:
        return f"failed (exit {job.exit_code})"
    return job.state.value


_FIELD = re.compile(r"^Tq-([A-Za-z-]+): (.*)$", re.MULTILINE)


def parse_fields(message: str) -> dict[str, str]:
    """The `Tq-Name: value` trailers of a message (a later one wins)."""
    return dict(_FIELD.findall(message))


@functools.lru_cache(maxsize=256)
def _gpus(text: str) -> GpuRequest:
    return GpuRequest.decode(text)


@functools.lru_cache(maxsize=256)
def _changes(text: str) -> ChangeSummary:
    return ChangeSummary.decode(text)


_STATES = {s.value: s for s in State}


def _int_or_none(text: Optional[str]) -> Optional[int]:
    return None if text is None else int(text)


def decode(message: str, tip: str) -> Job:
    """The job recorded in commit `tip` whose message is `message`.

    Listing 10,000 jobs calls this 10,000 times, so it avoids repeated work
    (value objects that repeat, like GPU requests, are shared).
    """
    f = parse_fields(message)
    get = f.get
    try:
        if int(f["Format"]) > FORMAT_VERSION:
            raise RecordFormatError(
                f"job record format {f['Format']} is newer than this git tq understands; upgrade"
            )
        cwd = get("Cwd", ".")
        spec = JobSpec(
            command=tuple(json.loads(f["Command"])),
            shell=get("Shell") == "yes",
            priority=int(f["Priority"]),
            grace=int(f["Grace"]),
            tag=get("Tag"),
            env=get("Env"),
            gpus=_gpus(f["Gpus"]),
            cwd="" if cwd == "." else cwd,
            submitted_at=f["Submitted-At"],
            user=get("User", ""),
            host=get("Host", ""),
        )
        source = get("Source", "none")
        assigned = get("Assigned-Gpus")
        return Job(
            id=int(f["Job"]),
            spec=spec,
            state=_STATES[f["State"]],
            event=f["Event"],
            attempt=int(get("Attempt", "0")),
            snapshot=get("Snapshot", tip),
            source=None if source == "none" else source,
            changes=_changes(get("Changes", "")),
            tip=tip,
            started_at=get("Started-At"),
            ended_at=get("Ended-At"),
            exit_code=_int_or_none(get("Exit-Code")),
            signal=_int_or_none(get("Signal")),
            assigned_gpus=tuple(int(x) for x in assigned.split(",")) if assigned else None,
            detail=get("Detail"),
        )
    except RecordFormatError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise RecordFormatError(f"commit {tip[:12]} is not a valid tq job record ({exc})") from None
