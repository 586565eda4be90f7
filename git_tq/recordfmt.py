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

import datetime as dt
import functools
import json
import re
from typing import Optional

from git_tq.model import (
    BACKENDS,
    DEFAULT_STOP_SIGNAL,
    EVENT_NAMES,
    MAX_RETRIES,
    MAX_TIME_LIMIT,
    OUTPUTS_LISTED,
    STOP_SIGNALS,
    STOP_TARGETS,
    ChangeSummary,
    GpuRequest,
    Job,
    JobSpec,
    Metric,
    Outputs,
    State,
)

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
        ("Detail", None if job.detail is None else " ".join(job.detail.split())),
        ("Command", json.dumps(list(s.command))),
        ("Shell", "yes" if s.shell else None),
        ("Priority", str(s.priority)),
        ("Grace", str(s.grace)),
        ("Stop-Signal", None if s.stop_signal == DEFAULT_STOP_SIGNAL else s.stop_signal),
        ("Stop-Target", None if s.stop_target == "main" else s.stop_target),
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
        ("Stop", job.stop),
        ("Stop-Seconds", None if job.stop_seconds is None else f"{job.stop_seconds:.1f}"),
        ("Assigned-Gpus",
         None if job.assigned_gpus is None else ",".join(map(str, job.assigned_gpus))),
        ("Sweep", s.sweep),
        ("Params", _json(dict(s.params)) if s.params else None),
        ("After", encode_ids(s.after) if s.after else None),
        ("After-Any", encode_ids(s.after_any) if s.after_any else None),
        ("Time-Limit", None if s.time_limit is None else str(s.time_limit)),
        ("Retries", str(s.retries) if s.retries else None),
        ("Backend", None if s.backend == "local" else s.backend),
        ("Ran-Seconds", f"{job.ran_seconds:.1f}" if job.ran_seconds else None),
        ("Retried", str(job.retried) if job.retried else None),
        ("Metrics", _json(dict(job.metrics)) if job.metrics else None),
        ("Outputs", None if job.outputs is None else _json(_outputs_json(job.outputs))),
    ]
    body = "\n".join(f"Tq-{k}: {v}" for k, v in fields if v is not None)
    return f"{subject}\n\n{body}\n"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _outputs_json(o: Outputs) -> dict[str, object]:
    data: dict[str, object] = {"files": o.files, "bytes": o.bytes}
    if o.skipped_count:
        data.update(skipped=[list(s) for s in o.skipped], skipped_count=o.skipped_count,
                    skipped_bytes=o.skipped_bytes)
    if o.error:
        data["error"] = o.error
    return data


def _exit_text(job: Job) -> str:
    if job.state is not State.FAILED:
        return str(job.state.value)
    if job.signal is not None:
        return f"failed (signal {job.signal})"
    if job.exit_code is not None:
        return f"failed (exit {job.exit_code})"
    return "failed (lost)"  # finished with no exit status: its supervisor died


_FIELD = re.compile(r"^Tq-([A-Za-z-]+): (.*)$", re.MULTILINE)


def parse_fields(message: str) -> dict[str, str]:
    """The `Tq-Name: value` trailers of a message (a later one wins)."""
    return dict(_FIELD.findall(message))


# Every field is parsed into a typed value before use: a record can come from
# anyone (a fetch), so nothing in it is trusted to be well-formed.
_ID = re.compile(r"[1-9][0-9]{0,17}\Z")
MAX_ID = 10**18 - 1  # the longest canonical id has 18 digits
_INT = re.compile(r"-?[0-9]{1,18}\Z")
_HEX = re.compile(r"[0-9a-f]+\Z")
_STAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
                    r"[+-][0-9]{2}:[0-9]{2}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
CONTROL_CHARACTERS = _CONTROL  # what no text field of a record may hold (C0, DEL, C1)
_BAD_TAG = re.compile(r"[\x00-\x20/\\\x7f-\x9f]")
_CHANGES = re.compile(r"M=([0-9]{1,9}) A=([0-9]{1,9}) D=([0-9]{1,9})\Z")
_GPUS = re.compile(r"(?:cpu|any:[0-9]{1,3}|[0-9]{1,3}(?:,[0-9]{1,3}){0,63})\Z")
_GPU_IDS = re.compile(r"[0-9]{1,3}(?:,[0-9]{1,3}){0,63}\Z")
_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,3})?\Z")
_STOPS = ("clean", "forced")
_STATES = {s.value: s for s in State}
MAX_FIELD = 64 * 1024


def canonical_id(text: str) -> int:
    """A job id as written in ref names and records: a positive integer, no padding."""
    if not _ID.match(text):
        raise RecordFormatError(f"job id {text[:20]!r} is not a canonical number")
    return int(text)


def _int(text: str, name: str, low: int, high: int) -> int:
    if not _INT.match(text) or not low <= int(text) <= high:
        raise RecordFormatError(f"Tq-{name} {text[:20]!r} is not a number in {low}..{high}")
    return int(text)


def _oid(text: str, name: str, length: int) -> str:
    if len(text) != length or not _HEX.match(text):
        raise RecordFormatError(f"Tq-{name} is not an object id of this repository")
    return text


def _stamp(text: str, name: str) -> str:
    if not _STAMP.match(text):
        raise RecordFormatError(f"Tq-{name} {text[:40]!r} is not a time stamp with an offset")
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        raise RecordFormatError(f"Tq-{name} {text[:40]!r} is not a valid time") from None
    return text


def _text(text: str, name: str, limit: int = 4096) -> str:
    if len(text) > limit or _CONTROL.search(text):
        raise RecordFormatError(f"Tq-{name} holds control characters or is too long")
    return text


def relative_path(text: str, name: str = "Cwd") -> str:
    """A path inside the repository: relative, normalised, no `..`, no `.git`."""
    if text in ("", "."):
        return ""
    parts = text.split("/")
    if text.startswith("/") or _CONTROL.search(text) or len(text) > 4096 or \
            any(p in ("", ".", "..") or p.lower() == ".git" for p in parts):
        raise RecordFormatError(f"Tq-{name} {text[:40]!r} is not a normalised relative path")
    return text


def _command(text: str, shell: bool) -> tuple[str, ...]:
    try:
        words = json.loads(text)
    except (ValueError, RecursionError):
        raise RecordFormatError("Tq-Command is not a JSON list of strings") from None
    if not isinstance(words, list) or not words or \
            not all(isinstance(w, str) and "\0" not in w for w in words) or not words[0]:
        raise RecordFormatError("Tq-Command is not a non-empty JSON list of strings")
    if shell and len(words) != 1:
        raise RecordFormatError("Tq-Command of a shell job must be one string")
    return tuple(words)


@functools.lru_cache(maxsize=256)
def _gpus(text: str) -> GpuRequest:
    if not _GPUS.match(text):
        raise RecordFormatError(f"Tq-Gpus {text[:20]!r} is not cpu, any:N or GPU ids")
    return GpuRequest.decode(text)


@functools.lru_cache(maxsize=256)
def _changes(text: str) -> ChangeSummary:
    m = _CHANGES.match(text)
    if not m:
        raise RecordFormatError(f"Tq-Changes {text[:30]!r} is not M=n A=n D=n")
    return ChangeSummary(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def _gpu_ids(text: str) -> tuple[int, ...]:
    if not _GPU_IDS.match(text):
        raise RecordFormatError(f"Tq-Assigned-Gpus {text[:20]!r} is not a list of GPU ids")
    return tuple(int(x) for x in text.split(","))


def _tag(text: Optional[str], name: str = "Tag") -> Optional[str]:
    if text is None:
        return None
    if not text or len(text) > 64 or _BAD_TAG.search(text) or text.startswith((".", "-")):
        raise RecordFormatError(f"Tq-{name} {text[:20]!r} is not a valid {name.lower()}")
    return text


def _env_name(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    if not text or len(text) > 4096 or _CONTROL.search(text) or text.startswith("-"):
        raise RecordFormatError("Tq-Env is not a conda env name or a path")
    return text


def _choice(text: Optional[str], name: str, allowed: tuple[str, ...],
            default: Optional[str]) -> Optional[str]:
    if text is None:
        return default
    if text not in allowed:
        raise RecordFormatError(f"Tq-{name} {text[:20]!r} is not one of {', '.join(allowed)}")
    return text


def _seconds(text: Optional[str], name: str = "Stop-Seconds") -> Optional[float]:
    if text is None:
        return None
    if not _SECONDS.match(text):
        raise RecordFormatError(f"Tq-{name} {text[:20]!r} is not a number of seconds")
    return float(text)


MAX_DEPENDENCIES = 100_000  # ids one Tq-After field may name (a range counts its ids)
_IDS = re.compile(r"[1-9][0-9]{0,17}(?:-[1-9][0-9]{0,17})?(?:,[1-9][0-9]{0,17}"
                  r"(?:-[1-9][0-9]{0,17})?)*\Z")


def encode_ids(ids: tuple[int, ...]) -> str:
    """Sorted job ids as a short list of runs: (3, 4, 5, 9) -> `3-5,9` (a sweep of
    10,000 jobs is one range, so a field never grows with it)."""
    runs: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        runs.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(runs)


def decode_ids(text: Optional[str], name: str = "After") -> tuple[int, ...]:
    """The ids of `encode_ids`' text: canonical, sorted, no repeats, at most
    MAX_DEPENDENCIES; RecordFormatError for anything else."""
    if text is None:
        return ()
    if not _IDS.match(text):
        raise RecordFormatError(f"Tq-{name} {text[:30]!r} is not a list of job ids")
    ids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        a, b = int(low), int(high or low)
        if a > b or (ids and a <= ids[-1]) or len(ids) + b - a >= MAX_DEPENDENCIES:
            raise RecordFormatError(f"Tq-{name} is not a sorted list of at most "
                                    f"{MAX_DEPENDENCIES} job ids")
        ids.extend(range(a, b + 1))
    return tuple(ids)


_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_METRIC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/@+-]{0,127}\Z")
MAX_METRICS = 256
MAX_METRIC_TEXT = 256


def param_name(text: str) -> str:
    """A sweep parameter's name: an identifier (it becomes TQ_PARAM_<name>)."""
    if not _PARAM.match(text):
        raise RecordFormatError(f"parameter name {text[:20]!r} is not an identifier "
                                "(letters, digits, _)")
    return text


def metric_name(text: str) -> str:
    if not _METRIC.match(text):
        raise RecordFormatError(f"metric name {text[:40]!r} is not a name (letters, digits, "
                                "_ . : / @ + -)")
    return text


def metric_value(value: object) -> Metric:
    """A metric's value as kept: a finite number, or a short text without control
    characters; RecordFormatError otherwise."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if abs(value) >= 2**63:
            raise RecordFormatError("a metric is out of range")
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise RecordFormatError("a metric is not a finite number")
        return value
    if isinstance(value, str) and len(value) <= MAX_METRIC_TEXT and not _CONTROL.search(value):
        return value
    raise RecordFormatError("a metric is neither a number nor a short text")


def _strict_json(text: str, name: str) -> object:
    def no_constants(word: str) -> object:
        raise RecordFormatError(f"Tq-{name} holds {word}")
    try:
        return json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise RecordFormatError(f"Tq-{name} is not valid JSON") from None


def _params(text: Optional[str]) -> tuple[tuple[str, str], ...]:
    if text is None:
        return ()
    data = _strict_json(text, "Params")
    if not isinstance(data, dict) or len(data) > 64 or not all(
            isinstance(v, str) and len(v) <= 4096 and not _CONTROL.search(v)
            for v in data.values()):
        raise RecordFormatError("Tq-Params is not an object of short texts")
    return tuple((param_name(k), v) for k, v in data.items())


def _metrics(text: Optional[str]) -> tuple[tuple[str, Metric], ...]:
    if text is None:
        return ()
    data = _strict_json(text, "Metrics")
    if not isinstance(data, dict) or len(data) > MAX_METRICS:
        raise RecordFormatError(f"Tq-Metrics is not an object of at most {MAX_METRICS} metrics")
    return tuple((metric_name(k), metric_value(v)) for k, v in data.items())


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise RecordFormatError(f"Tq-Outputs: {name} is not a count")
    return value


def _outputs(text: Optional[str]) -> Optional[Outputs]:
    if text is None:
        return None
    data = _strict_json(text, "Outputs")
    if not isinstance(data, dict):
        raise RecordFormatError("Tq-Outputs is not an object")
    skipped = data.get("skipped", [])
    if not isinstance(skipped, list) or len(skipped) > OUTPUTS_LISTED:
        raise RecordFormatError("Tq-Outputs: skipped is not a short list")
    entries = []
    for item in skipped:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[2], str) and len(item[2]) <= 64):
            raise RecordFormatError("Tq-Outputs: a skipped file is not [path, size, limit]")
        entries.append((relative_path(item[0], "Outputs"), _count(item[1], "size"),
                        _text(item[2], "Outputs", 64)))
    error = data.get("error")
    if error is not None and not isinstance(error, str):
        raise RecordFormatError("Tq-Outputs: error is not a text")
    return Outputs(_count(data.get("files"), "files"), _count(data.get("bytes"), "bytes"),
                   tuple(entries), _count(data.get("skipped_count", 0), "skipped_count"),
                   _count(data.get("skipped_bytes", 0), "skipped_bytes"),
                   None if error is None else _text(error, "Outputs", 1024))


def decode(message: str, tip: str) -> Job:
    """The job recorded in commit `tip` (an object id from git) whose message is `message`.

    Raises RecordFormatError, and nothing else, for anything that is not a
    well-formed record. Listing 10,000 jobs calls this 10,000 times, so it
    avoids repeated work (value objects that repeat, like GPU requests, are shared).
    """
    try:
        return _decode(message, tip)
    except RecordFormatError:
        raise
    except (KeyError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        name = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        what = f"no Tq-{name}" if isinstance(exc, KeyError) else str(exc)[:80]
        raise RecordFormatError(f"not a valid tq job record ({what})") from None


def _decode(message: str, tip: str) -> Job:
    f = parse_fields(message)
    get = f.get
    if not _HEX.match(tip) or len(tip) not in (40, 64):
        raise RecordFormatError("the record's commit id is not an object id")
    if any(len(v) > MAX_FIELD for v in f.values()):
        raise RecordFormatError("a field is longer than 64 KiB")
    version = _int(f["Format"], "Format", 1, 10**9)
    if version > FORMAT_VERSION:
        raise RecordFormatError(
            f"job record format {version} is newer than this git tq understands; upgrade"
        )
    oid_len = len(tip)
    shell_text = get("Shell")
    if shell_text not in (None, "yes"):
        raise RecordFormatError("Tq-Shell is not yes")
    shell = shell_text == "yes"
    limit = get("Time-Limit")
    spec = JobSpec(
        command=_command(f["Command"], shell),
        shell=shell,
        priority=_int(f["Priority"], "Priority", -10**9, 10**9),
        grace=_int(f["Grace"], "Grace", 0, 10**9),
        tag=_tag(get("Tag")),
        env=_env_name(get("Env")),
        gpus=_gpus(f["Gpus"]),
        cwd=relative_path(get("Cwd", ".")),
        submitted_at=_stamp(f["Submitted-At"], "Submitted-At"),
        user=_text(get("User", ""), "User", 256),
        host=_text(get("Host", ""), "Host", 256),
        stop_signal=_choice(get("Stop-Signal"), "Stop-Signal", STOP_SIGNALS,
                            DEFAULT_STOP_SIGNAL) or DEFAULT_STOP_SIGNAL,
        stop_target=_choice(get("Stop-Target"), "Stop-Target", STOP_TARGETS, "main") or "main",
        params=_params(get("Params")),
        sweep=_tag(get("Sweep"), "Sweep"),
        after=decode_ids(get("After")),
        after_any=decode_ids(get("After-Any"), "After-Any"),
        time_limit=None if limit is None else _int(limit, "Time-Limit", 1, MAX_TIME_LIMIT),
        retries=_int(get("Retries", "0"), "Retries", 0, MAX_RETRIES),
        backend=_choice(get("Backend"), "Backend", BACKENDS, "local") or "local",
    )
    state = _STATES.get(f["State"])
    if state is None:
        raise RecordFormatError(f"Tq-State {f['State'][:20]!r} is not a job state")
    event = f["Event"]
    if event not in EVENT_NAMES:
        raise RecordFormatError(f"Tq-Event {event[:20]!r} is not a lifecycle event")
    source = get("Source", "none")
    assigned = get("Assigned-Gpus")
    started, ended = get("Started-At"), get("Ended-At")
    code, sig = get("Exit-Code"), get("Signal")
    detail = get("Detail")
    return Job(
        id=canonical_id(f["Job"]),
        spec=spec,
        state=state,
        event=event,
        attempt=_int(get("Attempt", "0"), "Attempt", 0, 10**9),
        snapshot=_oid(get("Snapshot", tip), "Snapshot", oid_len),
        source=None if source == "none" else _oid(source, "Source", oid_len),
        changes=_changes(get("Changes", "M=0 A=0 D=0")),
        tip=tip,
        started_at=None if started is None else _stamp(started, "Started-At"),
        ended_at=None if ended is None else _stamp(ended, "Ended-At"),
        exit_code=None if code is None else _int(code, "Exit-Code", -1, 255),
        signal=None if sig is None else _int(sig, "Signal", 1, 128),
        assigned_gpus=None if not assigned else _gpu_ids(assigned),
        detail=None if detail is None else _text(detail, "Detail"),
        stop=_choice(get("Stop"), "Stop", _STOPS, None),
        stop_seconds=_seconds(get("Stop-Seconds")),
        metrics=_metrics(get("Metrics")),
        outputs=_outputs(get("Outputs")),
        ran_seconds=_seconds(get("Ran-Seconds"), "Ran-Seconds") or 0.0,
        retried=_int(get("Retried", "0"), "Retried", 0, 10**9),
    )
