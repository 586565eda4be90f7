"""Ready-to-print rows of `git tq ls` and `git tq log`, cached by job tip.

Listing 10,000 finished jobs should cost little more than git's own listing of
their refs, so a finished job's rows (its JSON object, its `ls` cells, its
`log` line, each already sanitised) are made once and kept in
`<common dir>/tq/cache/`:

    tips-v1.marshal   every tip seen: its job id and whether it is finished, the
                      records of active ones, why unreadable ones are (read by every
                      listing; plain `ls` reads nothing else, so it does not grow with
                      the number of finished jobs)
    rows-v1.marshal   per finished tip: its rows and what they were made from (read
                      by `ls --all --json` and `log`)
    json-v1.marshal   per finished tip: its JSON object as `ls --json` prints it
    all-json-v1.marshal  the whole text of `ls --all --json` when every job had ended,
                      stamped with what it was made from (see `every_json`)
    log-v1.marshal    what `git tq log` prints of each job, under the same condition
                      and stamp (see `log_rows`)

A row depends on more than its record: whose record it is (the ledger), its
note, its log file and folder. Each row keeps those inputs and is used only
while they are unchanged: the file keeps the ledger's mark, the notes ref's tip
and the log root its rows were checked against; when the ledger moved, the
rows of the jobs its appended lines name are checked again (all of them when
it was compacted); when the notes moved, every row's note blob is compared;
every row's log path is compared on every call. Active jobs' rows are made on
every call (their time and pid change). Both files are replaced atomically
(temp file + rename), ignored and rebuilt when unreadable, and never needed.
"""

from __future__ import annotations

import json
import marshal
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from git_tq import output
from git_tq.home import create_temp_beside, ensure_private_dir
from git_tq.localjobs import LOCAL, LedgerEntry
from git_tq.model import ORIGINS_PREFIX, Job, Metric, State
from git_tq.safetext import json_safe, visible
from git_tq.service import Context, JobView, job_pid, waiting_reasons
from git_tq.store import (
    Unreadable,
    _job_from_row,
    _job_to_row,
    file_stamp,
    refs_stamp,
    settled,
    split_name,
)

VERSION = 4  # 2: dependencies and waiting reasons; 3: time_limit, retries, retried, ran_seconds;
# 4: the backend
FEW = 64  # up to this many jobs' ledger entries are looked up one by one
_FINISHED = frozenset(s.value for s in State if s.finished)
ACTIVE = frozenset(s.value for s in State if s.active)


@dataclass
class Row:
    """One job as `ls` and `log` print it; `job` is set when it was decoded for this call."""

    id: int
    tip: str
    state: str
    tag: Optional[str]
    priority: int
    source: Optional[str]
    metrics: tuple[tuple[str, Metric], ...]
    params: tuple[tuple[str, str], ...]
    trust: str
    json: str  # the JSON object, as `ls --json` prints it (C1 and bidi escaped)
    cells: tuple[str, ...]  # ID STATE PRI GPUS TAG PARAMS COMMAND TIME NOTE, made visible
    line: tuple[str, ...]  # log: status, runtime, tag, command, changes, note, made visible
    pid: Optional[int] = None
    job: Optional[Job] = None
    # what the row was made from (checked before it is used again)
    ledger: tuple[str, Optional[str]] = (LOCAL, None)  # ledger's verdict, our submission
    note_key: str = ""
    note_blob: Optional[str] = None
    named: Optional[bool] = None  # whether the recorded submission names this job
    log: str = ""
    default_log: str = ""
    reason: str = ""  # why a pending job waits (made visible); made afresh every call
    origin: Optional[str] = None  # a fetched job's `user@host` (from its ref name)

    @property
    def name(self) -> str:
        return str(self.id) if self.origin is None else f"{self.origin}:{self.id}"

    @property
    def slot(self) -> str:
        """Its key in the rows files: the tip, and the origin for a fetched job (the same
        commit may be fetched under two names; its row names its origin)."""
        return slot(self.origin, self.tip)

    def dump(self) -> tuple[Any, ...]:
        """(id, state, what it was made from, its text fields) for the rows file."""
        return (self.id, self.state,
                (self.ledger[0], self.ledger[1], self.note_key, self.note_blob, self.named,
                 self.log, self.default_log, self.job.snapshot if self.job else ""),
                (self.tag, self.priority, self.source, self.metrics, self.params, self.trust,
                 self.cells, self.line))


def _row_from(tip: str, t: tuple[Any, ...], json_text: str) -> Row:
    d, x = t[2], t[3]
    row = Row(t[0], tip, t[1], x[0], x[1], x[2], x[3], x[4], x[5], json_text, x[6], x[7],
              None, None, (d[0], d[1]), d[2], d[3], d[4], d[5], d[6])
    if not (isinstance(row.cells, tuple) and len(row.cells) == 9
            and isinstance(row.line, tuple) and len(row.line) == 6):
        raise ValueError("not a row")
    return row


def slot(origin: Optional[str], tip: str) -> str:
    return tip if origin is None else f"{origin} {tip}"


Key = tuple[str, int]  # (origin or "", id): local jobs first, then by origin


class _NoJson(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


_NO_JSON = _NoJson()


@dataclass
class Rows:
    rows: list[Row]  # by id
    unreadable: list[Unreadable]


# --- the cache files ------------------------------------------------------------------


def _load(path: str) -> Any:
    try:
        with open(path, "rb") as fh:
            data = marshal.loads(fh.read())
        if isinstance(data, tuple) and data and data[0] == VERSION:
            return data
    except (OSError, EOFError, ValueError, TypeError):
        pass
    return None


def _save(folder: str, name: str, data: Any) -> None:
    try:
        ensure_private_dir(folder)
        path = os.path.join(folder, name)
        fd, tmp = create_temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(marshal.dumps(data))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except (OSError, ValueError):
        pass  # a cache that cannot be written only costs speed


@dataclass
class _Tips:
    """tips-v1: tip -> (job id, finished); active tips' records; unreadable tips."""

    known: dict[str, tuple[int, bool]]
    active: dict[str, tuple[Any, ...]]
    bad: dict[str, str]
    changed: bool = False

    @classmethod
    def load(cls, folder: str) -> _Tips:
        data = _load(os.path.join(folder, "tips-v1.marshal"))
        try:
            if data is not None:
                known, active, bad = data[1], data[2], data[3]
                if isinstance(known, dict) and isinstance(active, dict) \
                        and isinstance(bad, dict):
                    return cls(known, active, bad)
        except IndexError:
            pass
        return cls({}, {}, {}, changed=True)

    def save(self, folder: str, present: set[str]) -> None:
        if not self.changed and len(self.known) + len(self.bad) <= 2 * len(present) + 100:
            return
        keep = present.__contains__
        _save(folder, "tips-v1.marshal",
              (VERSION, {t: v for t, v in self.known.items() if keep(t)},
               {t: v for t, v in self.active.items() if keep(t)},
               {t: v for t, v in self.bad.items() if keep(t)}))


def _jobs(ctx: Context, tips: _Tips, wanted: Sequence[str]) -> dict[str, Job]:
    """The records at `wanted` (readable, not finished-and-cached): from the tips cache
    when it has them, else read from git (and remembered)."""
    jobs: dict[str, Job] = {}
    missing = []
    for tip in wanted:
        row = tips.active.get(tip)
        if row is not None:
            try:
                jobs[tip] = _job_from_row(row)
                continue
            except (IndexError, KeyError, TypeError, ValueError):
                pass
        missing.append(tip)
    if missing:
        fresh, bad = ctx.store.records(missing)
        for tip, job in fresh.items():
            jobs[tip] = job
            tips.known[tip] = (job.id, job.state.finished)
            if not job.state.finished:
                tips.active[tip] = _job_to_row(job)
        tips.bad.update(bad)
        tips.changed = True
    return jobs


def _sorted_tips(ctx: Context, tips: _Tips, listed: list[tuple[str, str]], *,
                 finished: bool) -> tuple[list[tuple[Key, str]], list[Unreadable]]:
    """((origin or "", id), tip) of the readable jobs listed (finished ones only if
    `finished`), and the refs that hold no readable record. New tips are read from git."""
    new = [tip for tip, _ in listed if tip not in tips.known and tip not in tips.bad]
    if new:
        _jobs(ctx, tips, new)
    out: list[tuple[Key, str]] = []
    bad: list[Unreadable] = []
    known = tips.known
    for tip, name in listed:
        info = known.get(tip)
        origin, job_id = split_name(name)
        if job_id is None:
            bad.append(Unreadable(name, tip, "the ref name is not a canonical job id"))
        elif info is None:
            bad.append(Unreadable(name, tip, tips.bad.get(tip, "?")))
        elif info[0] != job_id:
            bad.append(Unreadable(name, tip, f"the record says it is job {info[0]}"))
        elif finished or not info[1]:
            out.append(((origin or "", job_id), tip))
    out.sort()
    return out, bad


# --- making rows ------------------------------------------------------------------------


def _cells(view: JobView) -> tuple[str, ...]:
    j = view.job
    if j.state in (State.RUNNING, State.STOPPING):
        when = output.since(j.started_at)
    elif j.state.finished:
        when = output.since(j.started_at, j.ended_at) if j.started_at else "-"
    else:
        when = output.since(j.spec.submitted_at) + " ago"
    state = j.state.value
    if j.event == "timed-out":
        state += f" ({j.outcome})"
    elif j.state is State.FAILED:  # (3), (sig 9), (not started), (lost)
        state += f" ({j.exit_status})" if j.exit_status is not None else \
            f" (sig {j.signal})" if j.signal is not None else f" ({j.outcome})"
    if view.trust != LOCAL and j.origin is None:
        state = f"{view.trust}: {state}"  # not ours: never run, never written
    gpus = ",".join(map(str, j.assigned_gpus)) if j.assigned_gpus else j.spec.gpus.describe()
    params = output.shorten(" ".join(f"{k}={x}" for k, x in j.spec.params), 40)
    return tuple(visible(c) for c in (
        j.name, state, str(j.spec.priority), gpus, j.spec.tag or "", params,
        output.shorten(j.spec.command_line(), 60), when, output.shorten(view.note or "", 40)))


def _line(view: JobView) -> tuple[str, ...]:
    j = view.job
    status = j.state.value
    if not j.state.active and j.outcome:  # exit 3, signal 9, (not started), (lost)
        status += f" {j.outcome}" if j.outcome[-1].isdigit() else f" ({j.outcome})"
    runtime = output.since(j.started_at, j.ended_at) if j.started_at else "-"
    return tuple(visible(c) for c in (
        status, runtime, j.spec.tag or "", output.shorten(j.spec.command_line(), 50),
        f"(+{j.changes.total} files differ)" if j.changes.total else "",
        output.shorten(view.note, 60) if view.note else ""))


def _make(view: JobView, ledger: tuple[str, Optional[str]], note_key: str,
          note_blob: Optional[str], named: Optional[bool], default_log: str) -> Row:
    j = view.job
    return Row(j.id, j.tip, j.state.value, j.spec.tag, j.spec.priority, j.source, j.metrics,
               j.spec.params, view.trust,
               json_safe(json.dumps(view.to_json(), ensure_ascii=False)),
               _cells(view), _line(view), view.pid, j, ledger, note_key, note_blob, named,
               view.log, default_log, visible(view.reason or ""), j.origin)


def _ledger_view(entry: Optional[LedgerEntry], tip: str) -> tuple[str, Optional[str]]:
    """What the ledger alone says of a record: its verdict, and our submission commit
    when the record is ours."""
    if entry is None:
        return "fetched", None
    return (LOCAL, entry.submission) if entry.trusts(tip) else ("tampered", None)


def _build(ctx: Context, jobs: Iterable[Job], entries: Mapping[int, LedgerEntry],
           blobs: Mapping[str, str], logs: Mapping[int, str]) -> list[Row]:
    """Rows made from records, as `service._views` sees them."""
    jobs = list(jobs)
    others: dict[Optional[str], list[Job]] = {}  # by origin: ids are unique within one
    for j in jobs:
        entry = entries.get(j.id) if j.origin is None else None
        if (not entry or not entry.trusts(j.tip)) and j.snapshot in blobs:
            others.setdefault(j.origin, []).append(j)
    named = {slot(origin, str(i)): commit for origin, group in others.items()
             for i, commit in ctx.store.submissions_named(group).items()}
    keys: dict[str, str] = {}
    ledgers: dict[str, tuple[str, Optional[str]]] = {}
    for j in jobs:
        n = slot(j.origin, str(j.id))
        ledgers[n] = verdict = _ledger_view(entries.get(j.id) if j.origin is None else None,
                                            j.tip)
        keys[n] = verdict[1] or named.get(n) or j.tip
    texts = ctx.store.note_texts(blobs[k] for k in keys.values() if k in blobs)
    waits = waiting_reasons(ctx, jobs)
    rows = []
    for j in jobs:
        n = slot(j.origin, str(j.id))
        key = keys[n]
        blob = blobs.get(key)
        if j.origin is None:
            default_log = f"{ctx.store.log_root}{os.sep}{ctx.store.default_log_name(j)}"
            log = logs.get(j.id) or default_log
        else:  # it ran elsewhere: no log file here, whatever its id
            default_log = log = ""
        trust = ctx.store.trust(j, entries)
        waiting_for, reason = waits.get(j.id, ((), None)) if j.origin is None else ((), None)
        view = JobView(j, texts.get(blob) if blob else None, log,
                       ctx.store.category(log) if j.origin is None and j.id in logs else None,
                       trust, job_pid(ctx, j, trust), waiting_for, reason)
        was_named = None if ledgers[n][1] or j.snapshot not in blobs else n in named
        rows.append(_make(view, ledgers[n], key, blob, was_named, default_log))
    return rows


def _entries(ctx: Context, ids: Sequence[int]) -> dict[int, LedgerEntry]:
    return ctx.local.entries_for(ids) if len(ids) <= FEW else ctx.local.entries()


# --- the listings -----------------------------------------------------------------------


def _stamp(ctx: Context) -> Optional[tuple[Any, ...]]:
    """Stat data that changes whenever a job ref or the notes ref is created, moved or
    deleted, or our ledger is written; None when that cannot be told (`refs_stamp`)."""
    common = ctx.repo.common_dir
    return refs_stamp(common, os.path.join(common, "refs", "notes"), ctx.local.ledger_path)


def active(ctx: Context) -> Rows:
    """The active jobs (by id) and the unreadable refs: reads no finished job's row. When
    no job ref, notes ref or ledger line changed since the last call (`_stamp`), not
    even the refs are listed: the active jobs' tips and records, the unreadable refs
    and the active jobs' note blobs come from `active-v1.marshal`, so the cost is the
    same whatever the number of finished jobs."""
    folder = ctx.store.cache_dir
    stamp = _stamp(ctx)
    snap = _load(os.path.join(folder, "active-v1.marshal")) if stamp is not None else None
    try:
        if snap is None or snap[1] != list(stamp or ()):
            raise TypeError
        chosen = [_job_from_row(r) for r in snap[2]]
        bad = [Unreadable(str(n), str(t), str(why)) for n, t, why in snap[3]]
        blobs = {str(k): str(v) for k, v in snap[4].items()}
    except (TypeError, IndexError, KeyError, ValueError, AttributeError):
        listed, notes_tip = ctx.store.ref_tips()
        tips = _Tips.load(folder)
        order, bad = _sorted_tips(ctx, tips, listed, finished=False)
        jobs = _jobs(ctx, tips, [tip for _, tip in order])  # local only: no origin
        chosen = [jobs[tip] for _, tip in order]
        blobs = ctx.store.note_blobs() if notes_tip and chosen else {}
        tips.save(folder, {tip for tip, _ in listed})
        if stamp is not None:
            entries = _entries(ctx, [j.id for j in chosen]) if chosen else {}
            keys = {k for j in chosen for k in (j.tip, j.snapshot, getattr(
                entries.get(j.id), "submission", None)) if k}
            _save(folder, "active-v1.marshal", (
                VERSION, list(stamp), [_job_to_row(j) for j in chosen],
                [(u.name, u.tip, u.reason) for u in bad],
                {k: v for k, v in blobs.items() if k in keys}))
    entries = _entries(ctx, [j.id for j in chosen]) if chosen else {}
    # Each job's log where it starts unless logs were filed into folders (then walked).
    logs = {j.id: ctx.store.log_path(j) for j in chosen}
    rows = _build(ctx, chosen, entries, blobs, logs)
    return Rows(rows, bad)


def every(ctx: Context, *, text: bool = True, json: bool = True) -> Rows:
    """Every job by id (finished ones from their cached rows) and the unreadable refs.
    Without `text`, finished rows hold only their JSON (what `ls --all --json` needs);
    without `json`, no JSON (what `log` needs)."""
    folder = ctx.store.cache_dir
    listed, notes_tip = ctx.store.ref_tips()
    listed += ctx.store.fetched_tips()  # other machines' jobs (git tq fetch)
    tips = _Tips.load(folder)
    order, bad = _sorted_tips(ctx, tips, listed, finished=True)
    cached = _load(os.path.join(folder, "rows-v1.marshal"))
    jsons: Any = _load(os.path.join(folder, "json-v1.marshal")) if json else None
    try:
        token, log_root, mark, old_notes, old_logs, stored = cached[1:7]
        if log_root != ctx.store.log_root or not isinstance(stored, dict) \
                or (json and jsons[1] != token):
            raise TypeError
        texts = jsons[2] if json else _NO_JSON
        mark = (int(mark[0]), int(mark[1]), bytes(mark[2]))
    except (TypeError, IndexError, ValueError):
        mark, old_notes, old_logs, stored, texts = None, None, None, {}, {}
    new_mark, changed, complete = ctx.local.changes_since(mark)
    notes_moved = notes_tip != old_notes
    blobs: Optional[dict[str, str]] = None
    if notes_moved:
        blobs = ctx.store.note_blobs() if notes_tip else {}
    logs = ctx.store.find_logs()
    logs_moved = logs != old_logs
    kept: dict[Key, Row] = {}
    redo: list[tuple[Key, str]] = []
    for key, tip in order:
        origin, job_id = key[0] or None, key[1]
        t = stored.get(slot(origin, tip))
        if t is None:
            redo.append((key, tip))
            continue
        try:
            deps = t[2]
            ok = origin is not None or not logs_moved or (logs.get(job_id) or deps[6]) == deps[5]
            if ok and origin is None and (complete or job_id in changed):
                ok = _ledger_view(changed.get(job_id), tip) == (deps[0], deps[1])
            if ok and blobs is not None:
                ok = blobs.get(deps[2]) == deps[3] and \
                    (deps[1] is not None or deps[4] is not None or deps[7] not in blobs)
            if ok:
                where = slot(origin, tip)
                row = _row_from(tip, t, texts[where]) if text else \
                    Row(job_id, tip, t[1], t[3][0], 0, None, (), (), "", texts[where], (), ())
                row.origin = origin
                kept[key] = row
        except (TypeError, IndexError, ValueError, KeyError):
            ok = False
        if not ok:
            redo.append((key, tip))
    if redo:
        jobs = _jobs(ctx, tips, [tip for _, tip in redo])
        ids = [key[1] for key, _ in redo if not key[0]]
        entries = {i: e for i, e in changed.items() if e is not None} if complete \
            else _entries(ctx, ids)
        if blobs is None:
            blobs = ctx.store.note_blobs() if notes_tip else {}
        # The origin comes from the ref's name, never from the record (cached by tip).
        made = [jobs[tip] if not key[0] else jobs[tip].evolve(origin=key[0])
                for key, tip in redo]
        for row in _build(ctx, made, entries, blobs, logs):
            kept[(row.origin or "", row.id)] = row
    rows = [kept[key] for key, _ in order]
    fresh = {r.slot: r for r in rows if r.state in _FINISHED}
    if redo or notes_moved or logs_moved or new_mark != mark or len(stored) != len(fresh):
        if not json:
            jsons = _load(os.path.join(folder, "json-v1.marshal"))
            texts = jsons[2] if jsons is not None and jsons[1] == cached[1] else {}
        token = os.urandom(8).hex()  # the two files belong together
        try:
            _save(folder, "json-v1.marshal",
                  (VERSION, token, {where: r.json if r.job is not None else texts[where]
                                    for where, r in fresh.items()}))
        except KeyError:  # a row's JSON is not at hand: the rows file is redone next time
            token = ""
        _save(folder, "rows-v1.marshal",
              (VERSION, token, ctx.store.log_root, new_mark, notes_tip, logs,
               {where: (r.dump() if r.job is not None or where not in stored
                        else stored[where])
                for where, r in fresh.items()}))
    tips.save(folder, {tip for tip, _ in listed})
    return Rows(rows, bad)


def _every_stamp(ctx: Context) -> Optional[list[Any]]:
    """What the text of `ls --all --json` depends on when every job has ended, as stat
    data: the job refs, packed-refs, the notes refs, our ledger (`_stamp`), the fetched
    refs' folders, the log root's folders (a log filed elsewhere renames into one) and
    the repository's config (where the log root is set); None when it cannot be told."""
    base = _stamp(ctx)
    if base is None:
        return None
    common = ctx.repo.common_dir
    folders: list[str] = []
    for top in (os.path.join(common, *ORIGINS_PREFIX.strip("/").split("/")),
                ctx.store.log_root):
        for dirpath, dirs, _files in os.walk(top):
            dirs.sort()
            folders.append(dirpath)
    extra = tuple(file_stamp(path) for path in
                  (os.path.join(common, "config"), *folders))
    stamps = settled(base + extra)
    return None if stamps is None else [ctx.store.log_root, *folders, *stamps]


def every_json(ctx: Context) -> tuple[str, list[Unreadable]]:
    """The text of `ls --all --json` (every job, as `json_text` of `every`'s rows) and
    the unreadable refs. When every job had ended at the last call and nothing it
    depends on changed since (`_every_stamp`), the text is read whole from
    all-json-v1.marshal: no ref is listed and no row is read, so 10,000 jobs cost one
    file read (an active job's row changes with time and the daemon, so it is never kept
    this way)."""
    folder = ctx.store.cache_dir
    path = os.path.join(folder, "all-json-v1.marshal")
    stamp = _every_stamp(ctx)
    if stamp is not None:
        kept = _load(path)
        if kept is not None and len(kept) == 3 and kept[1] == stamp \
                and isinstance(kept[2], str):
            return kept[2], []
    got = every(ctx, text=False)
    text = json_text(got.rows)
    if stamp is not None and not got.unreadable \
            and all(r.state in _FINISHED for r in got.rows):
        _save(folder, "all-json-v1.marshal", (VERSION, stamp, text))
    return text, got.unreadable


class LogRow(NamedTuple):
    """What `git tq log` prints of a job (a `Row`'s fields that it reads)."""

    id: int
    origin: Optional[str]
    source: Optional[str]  # the commit it was submitted on
    state: str
    line: tuple[str, ...]  # status, runtime, tag, command, changes, note, made visible
    metrics: tuple[tuple[str, Metric], ...]

    @property
    def name(self) -> str:
        return str(self.id) if self.origin is None else f"{self.origin}:{self.id}"


def log_rows(ctx: Context) -> tuple[list[LogRow], list[Unreadable]]:
    """Every job as `git tq log` prints it, and the unreadable refs; like `every_json`,
    read whole from one file (log-v1.marshal) while every job has ended and nothing
    they depend on changed."""
    folder = ctx.store.cache_dir
    stamp = _every_stamp(ctx)
    if stamp is not None:
        kept = _load(os.path.join(folder, "log-v1.marshal"))
        if kept is not None and len(kept) == 3 and kept[1] == stamp:
            try:
                return [LogRow(*t) for t in kept[2]], []
            except TypeError:
                pass
    got = every(ctx, json=False)
    rows = [LogRow(r.id, r.origin, r.source, r.state, r.line, r.metrics) for r in got.rows]
    if stamp is not None and not got.unreadable and all(r.state in _FINISHED for r in rows):
        _save(folder, "log-v1.marshal", (VERSION, stamp, [tuple(r) for r in rows]))
    return rows, got.unreadable


def from_view(view: JobView) -> Row:
    """The rows of a job viewed by `service` (what `ls --sort` lists)."""
    return _make(view, (view.trust, None), "", None, None, view.log)


def json_text(rows: Sequence[Row]) -> str:
    """The rows as one JSON array, as `json.dumps` of the objects would write it."""
    return "[" + ", ".join(r.json for r in rows) + "]"
