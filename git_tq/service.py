"""User actions, one function each: the porcelain that the CLI and the console call.

Functions here validate input, act through the store and snapshot layers,
and return plain values; they never print.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import subprocess
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from git_tq import backends
from git_tq import gpus as gpu_inventory
from git_tq import pause as pausing

# Re-exported: the CLI, the console and other callers find every action here.
from git_tq.context import Context as Context
from git_tq.context import user_name
from git_tq.context import wake_daemon as wake_daemon
from git_tq.errors import (
    BadSpec,
    BrokenRef,
    DirtyWorkTree,
    InvalidTransition,
    NotOurs,
    TqError,
    UsageError,
)
from git_tq.gitrepo import Repo, run_git, without_repo_vars
from git_tq.home import Home, default_home
from git_tq.joblists import MAX_RANGE as MAX_RANGE
from git_tq.joblists import parse_job_tokens as parse_job_tokens
from git_tq.joblists import resolve_jobs as resolve_jobs
from git_tq.lifecycle import apply_event, now_iso
from git_tq.localjobs import FETCHED, LOCAL, TAMPERED, LedgerEntry, LocalSpec
from git_tq.model import (
    DEFAULT_GRACE,
    DEFAULT_PRIORITY,
    GpuRequest,
    Job,
    JobSpec,
    Metric,
    Outputs,
    State,
    epoch,
    format_duration,
)
from git_tq.pause import Pause
from git_tq.series import AttemptSeries, JobCurves
from git_tq.snapshot import Snapshot, nested_in_tree, take_snapshot
from git_tq.store import MISSING, Unreadable, pending_in_queue_order
from git_tq.submission import MAX_SWEEP as MAX_SWEEP
from git_tq.submission import SHELL_CHARS
from git_tq.submission import SubmitRequest as SubmitRequest
from git_tq.submission import Submitted as Submitted
from git_tq.submission import check_env as check_env
from git_tq.submission import check_retries as check_retries
from git_tq.submission import dependencies as dependencies
from git_tq.submission import gpu_queue as gpu_queue
from git_tq.submission import gpu_request as gpu_request
from git_tq.submission import parse_sweep as parse_sweep
from git_tq.submission import resolve_env_option as resolve_env_option
from git_tq.submission import stop_settings as stop_settings
from git_tq.submission import submit as submit
from git_tq.submission import substitute as substitute
from git_tq.submission import sweep_name as sweep_name
from git_tq.submission import time_limit_setting as time_limit_setting
from git_tq.submission import validate_tag as validate_tag

if TYPE_CHECKING:
    from git_tq.jobtree import Kept
    from git_tq.sharing import Shared

@dataclass(frozen=True)
class EditRequest:
    """What `git tq edit` changes; None (or no GPU option) leaves a field as it is."""

    priority: Optional[int] = None
    grace: Optional[int] = None
    tag: Optional[str] = None  # "" removes the tag
    after: Optional[tuple[str, ...]] = None  # ("none",) removes every dependency
    after_any: Optional[tuple[str, ...]] = None
    gpu_ids: Optional[str] = None
    gpu_count: Optional[int] = None
    cpu: bool = False
    time_limit: Optional[str] = None  # --time 2h; "none" removes the limit


@dataclass(frozen=True)
class Edited:
    job: Job  # as recorded after the edit
    changes: str  # "priority 100 → 10, grace 180 → 30"


def _edited_spec(ctx: Context, job: Job, req: EditRequest,
                 deps_of: dict[int, tuple[int, ...]]) -> JobSpec:
    """`job`'s spec with the edit applied, checked as `run` checks its options."""
    from git_tq.deps import would_cycle

    changes: dict[str, Any] = {}
    if job.spec.backend == "slurm" and (req.priority is not None or req.grace is not None or
                                        req.gpu_ids is not None or req.gpu_count is not None
                                        or req.cpu or req.time_limit is not None):
        # Its sbatch options (nice, signal time, gres, time) were fixed at submission.
        raise BadSpec(f"job {job.id} runs on Slurm: only its tag and dependencies can be "
                      "edited (rm it and run it again to change what it asks of Slurm)")
    if req.priority is not None:
        changes["priority"] = req.priority
    if req.grace is not None:
        if req.grace < 0:
            raise BadSpec("grace period (-g) must be 0 seconds or more")
        changes["grace"] = req.grace
    if req.tag is not None:
        changes["tag"] = validate_tag(req.tag) if req.tag else None
    if req.time_limit is not None:
        # A time already run counts: a limit below it stops the job at the next cycle.
        changes["time_limit"] = time_limit_setting({}, req.time_limit)
    if req.gpu_ids is not None or req.gpu_count is not None or req.cpu:
        request = gpu_request(SubmitRequest((), gpu_ids=req.gpu_ids, gpu_count=req.gpu_count,
                                            cpu=req.cpu), ctx.config)
        if not request.cpu_only:
            gpu_inventory.check_request(request, gpu_inventory.machine_gpus(ctx.config))
        changes["gpus"] = request
    if req.after is not None or req.after_any is not None:
        def given(tokens: Optional[tuple[str, ...]]) -> tuple[str, ...]:
            return () if tokens is None or tuple(tokens) == ("none",) else tokens
        after, after_any = dependencies(ctx, given(req.after), given(req.after_any),
                                        editing=job.id)
        # One option given: the other list keeps what it had (less what moved over).
        keep_after = tuple(i for i in job.spec.after if i not in set(after_any))
        keep_any = tuple(i for i in job.spec.after_any if i not in set(after))
        changes["after"] = after if req.after is not None else keep_after
        changes["after_any"] = after_any if req.after_any is not None else keep_any
        new = tuple(sorted({*changes["after"], *changes["after_any"]}))
        looping = would_cycle(job.id, new, deps_of)
        if looping is not None:
            raise BadSpec(f"job {job.id} cannot wait for job {looping}: job {looping} "
                          f"already waits (directly or not) for job {job.id}")
        deps_of[job.id] = new
    return dataclasses.replace(job.spec, **changes)


def describe_edit(old: JobSpec, new: JobSpec) -> str:
    """What an edit changed, for its record: "priority 100 → 10, gpus any 1 → 0,1"."""
    from git_tq.recordfmt import encode_ids

    words: dict[str, Callable[[JobSpec], str]] = {
        "priority": lambda s: str(s.priority), "grace": lambda s: f"{s.grace}s",
        "tag": lambda s: s.tag or "none", "gpus": lambda s: s.gpus.describe(),
        "after": lambda s: encode_ids(s.after) or "none",
        "after-any": lambda s: encode_ids(s.after_any) or "none",
        "time": lambda s: format_duration(s.time_limit) if s.time_limit else "none",
    }
    changed = [f"{name} {show(old)} → {show(new)}" for name, show in words.items()
               if show(old) != show(new)]
    return ", ".join(changed)


def edit(ctx: Context, tokens: Sequence[str], req: EditRequest) -> list[Edited]:
    """Change waiting (or running) jobs' options, each as an `edited` lifecycle commit.

    A pending job may change priority, grace, tag, time limit, GPUs and dependencies; a
    running one only priority, grace and time limit (the daemon reads them at its next
    plan and stop). Every
    job is checked before anything is written, so a bad one changes nothing. The
    daemon is told at once: a raised priority may preempt a running job."""
    from git_tq.lifecycle import EDITABLE, apply_edit

    if req == EditRequest():
        raise UsageError("nothing to change: give -p, -g, -t, --time, --after, --after-any, "
                         "--gpu, "
                         "--gpus or --cpu")
    jobs = resolve_jobs(ctx, tokens)
    deps_of = {j.id: j.spec.dependencies for j in ctx.store.list_jobs() if j.state.active}
    planned: list[tuple[Job, JobSpec]] = []
    for job in jobs:
        ctx.store.require_ours(job, "edited")
        if job.state not in EDITABLE:
            raise InvalidTransition(f"job {job.id} has ended ({job.state.value}): only a "
                                    "pending or running job can be edited")
        touched = {name for name, given in (
            ("priority", req.priority), ("grace", req.grace), ("tag", req.tag),
            ("time_limit", req.time_limit),
            ("after", req.after), ("after_any", req.after_any), ("gpus", req.gpu_ids),
            ("gpus", req.gpu_count), ("gpus", req.cpu or None)) if given is not None}
        refused = sorted(touched - EDITABLE[job.state])
        if refused:  # said before checking the values themselves
            raise InvalidTransition(
                f"job {job.id} is {job.state.value}: its {', '.join(refused)} can no longer "
                f"change (only {' and '.join(sorted(EDITABLE[job.state]))})")
        spec = _edited_spec(ctx, job, req, deps_of)
        apply_edit(job, spec, "")  # refuses what its state does not allow
        planned.append((job, spec))
    done = []
    for job, spec in planned:
        # Only what this edit changes, applied to the freshest record (a concurrent
        # edit of another field stays).
        fields = {name: getattr(spec, name) for name in
                  ("priority", "grace", "tag", "gpus", "after", "after_any", "time_limit")
                  if getattr(spec, name) != getattr(job.spec, name)}

        def change(current: Job, fields: dict[str, Any] = fields) -> Optional[Job]:
            new = dataclasses.replace(current.spec, **fields)
            what = describe_edit(current.spec, new)
            return apply_edit(current, new, what) if what else None

        stored = ctx.store.update(job.id, change, f"tq: edit job {job.id}")
        done.append(Edited(stored, describe_edit(job.spec, stored.spec)
                           if stored.event == "edited" and stored.tip != job.tip else ""))
    from git_tq import client

    changed = [e.job.id for e in done if e.changes]
    if changed:
        client.nudge(ctx.home, autostart=False, repo=ctx.repo.common_dir, jobs=changed)
    return done


# The console's and top's short edits of a waiting job by its number: `p 3 10`.
QUICK_EDITS = {"p": "priority", "g": "grace", "t": "tag"}


def quick_edit_request(letter: str, value: str) -> EditRequest:
    """The edit `p 3 10` (or g, t) asks for; UsageError for a bad value."""
    field_name = QUICK_EDITS.get(letter)
    if field_name is None:
        raise UsageError(f"unknown edit {letter!r}: p (priority), g (grace) or t (tag)")
    if field_name == "tag":
        return EditRequest(tag=value)
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{field_name} {value[:20]!r} is not a whole number") from None
    return EditRequest(priority=number) if field_name == "priority" else \
        EditRequest(grace=number)



# --- the daemon ----------------------------------------------------------------


def home_for(cwd: Optional[str] = None) -> Home:
    """The tq home for the current repository, or the user's default outside one."""
    try:
        return Context.open(cwd).home
    except TqError:
        return Home(default_home({}, os.environ))


def start_daemon(home: Home) -> bool:
    from git_tq import client

    return client.start(home)


def stop_daemon(home: Home) -> bool:
    from git_tq import client

    return client.stop(home)


def daemon_status(home: Home) -> Optional[dict[str, Any]]:
    """The daemon's own account of itself, with the pause as the tq home records it
    (`paused`); None when no daemon runs."""
    from git_tq import client

    try:
        status = client.request(home, "status")
    except client.DaemonNotRunning:
        return None
    status["paused"] = queue_pause(home).to_json()
    return status


# --- pause and resume ------------------------------------------------------------


def queue_pause(home: Home) -> Pause:
    """What `git tq pause` holds now (for every repository of the tq home)."""
    return pausing.read(home.path)


@dataclass(frozen=True)
class PauseChange:
    before: Pause
    after: Pause
    gpus: Optional[tuple[int, ...]]  # the GPU queues named; None: the whole queue
    daemon_hint: Optional[str]  # set when no daemon runs (nothing starts anyway)


def change_pause(gpu_ids: Optional[str], *, hold: bool,
                 cwd: Optional[str] = None) -> PauseChange:
    """`git tq pause [--gpu IDS]` (`hold`) or `git tq resume [--gpu IDS]`: hold or release
    the whole queue or these GPUs' queues, for every repository of the tq home; the
    daemon is told (never started: a pause needs none)."""
    from git_tq import client

    try:
        ctx: Optional[Context] = Context.open(cwd)
    except TqError:
        ctx = None  # outside a repository: the user's tq home, the machine's GPUs
    home = ctx.home if ctx is not None else Home(default_home({}, os.environ))
    gpus: Optional[tuple[int, ...]] = None
    if gpu_ids is not None:
        gpus = gpu_inventory.parse_gpu_ids(gpu_ids)
        if hold:  # a GPU the machine lacks is refused as `run --gpu` refuses it
            gpu_inventory.check_request(GpuRequest.exact(gpus), gpu_inventory.machine_gpus(
                ctx.config if ctx is not None else {}))
    if hold:
        before, after = pausing.pause(home.path, gpus, now_iso())
    else:
        before, after = pausing.resume(home.path, gpus)
    hint = client.nudge(home, autostart=False)
    return PauseChange(before, after, gpus, hint and "the daemon is not running: nothing "
                       "starts until `git tq start`")


def held_reason(pause: Pause, job: Job) -> Optional[str]:
    """Why the pause holds a waiting job outright ("queue paused", "GPU 0 paused")."""
    from git_tq.scheduler import paused_reason

    # A fetched job waits in its own machine's queue: our pause holds nothing of it.
    if job.state is not State.PENDING or job.origin is not None:
        return None
    return paused_reason(job.spec.gpus, set(pause.gpus), pause.everything)


def run_daemon(home: Home) -> None:
    from git_tq import daemon

    daemon.run_foreground(home)


def kill_jobs(ctx: Context, tokens: Sequence[str], *, now: bool = False) -> list[int]:
    """Stop running jobs (stop signal, grace, SIGKILL; `now` skips the grace): cancelled.

    Pending jobs among them are cancelled directly.
    """
    from git_tq import client

    jobs = resolve_jobs(ctx, tokens)
    for job in jobs:
        ctx.store.require_ours(job, "killed")
        if job.state.finished:
            raise InvalidTransition(f"job {job.id} is {job.state.value}: nothing to kill")
    pending = [j.id for j in jobs if j.state is State.PENDING]
    running = [j.id for j in jobs if j.state is not State.PENDING]
    if pending:
        remove(ctx, [str(i) for i in pending])
    if running:
        client.request(ctx.home, "kill", repo=ctx.repo.common_dir, jobs=running, now=now)
    return [j.id for j in jobs]


def requeue(ctx: Context, token: str, *, command: Sequence[str] = (),
            now: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) \
        -> Submitted:
    """Submit a finished job's code again, as a new local job.

    The new job gets the caller's current environment (a job's saved environment
    is deleted when it ends). Our own job keeps its command unless `command` is
    given; a job we did not write (fetched, or tampered with) is only code to us:
    its snapshot *tree* is reused, and the command must be given explicitly.
    """
    old = ctx.store.resolve(token)
    if old.state.active:
        raise InvalidTransition(f"job {old.name} is {old.state.value}; requeue takes a "
                                "finished job")
    trust = ctx.store.trust(old)
    toplevel = ctx.repo.require_worktree("git tq requeue")
    if trust != LOCAL and not command:
        raise UsageError(f"job {old.name} was not written here by you ({trust}): its command is "
                         f"not trusted; give one: git tq requeue {old.name} -- COMMAND...")
    # Its dependencies have ended long since (one may have failed): the copy has none.
    spec = dataclasses.replace(old.spec, submitted_at=now or now_iso(), user=user_name(),
                               host=os.uname().nodename, after=(), after_any=())
    if command:
        if not any(w.strip() for w in command):
            raise UsageError("empty command")
        shell = len(command) == 1 and bool(SHELL_CHARS.search(command[0]))
        spec = dataclasses.replace(spec, command=tuple(command), shell=shell,
                                   cwd=ctx.repo.prefix if trust != LOCAL else spec.cwd)
    if trust != LOCAL:
        # Nothing of theirs steers it: our defaults for priority, grace, stop and
        # tag; only the GPU request is kept, checked against this machine's GPUs.
        stop_signal, stop_target = stop_settings(ctx.config)
        spec = dataclasses.replace(spec, env=None, tag=None, priority=DEFAULT_PRIORITY,
                                   grace=DEFAULT_GRACE, stop_signal=stop_signal,
                                   stop_target=stop_target,
                                   time_limit=time_limit_setting(ctx.config), retries=0,
                                   backend=backends.choose(ctx.config, None))
        if not spec.gpus.cpu_only and spec.backend == "local":
            gpu_inventory.check_request(spec.gpus, gpu_inventory.machine_gpus(ctx.config))
    # A Slurm job's sbatch options were in its private record, gone with its end: asked
    # again of its request and today's tq.slurm.* settings (its --slurm-arg are not known).
    slurm_args = backends.slurm_options(ctx.config, spec.gpus, spec.time_limit,
                                        spec.priority) if spec.backend == "slurm" else ()
    detail = f"requeued from job {old.name}" if trust == LOCAL else \
        f"code of job {old.name} ({trust}, by {old.spec.user}@{old.spec.host})"
    draft = Job(id=0, spec=spec, state=State.PENDING, event="submitted", attempt=0,
                snapshot="", source=old.source, changes=old.changes,
                detail=" ".join(detail.split()))
    tree = job_tree(ctx, old)  # its code, not what it wrote
    captured = without_repo_vars(os.environ if environ is None else environ)
    if trust == LOCAL:  # a sweep's job: its values again (the command has them already)
        captured.update({f"TQ_PARAM_{k}": v for k, v in spec.params})
    else:
        spec = dataclasses.replace(spec, params=(), sweep=None)
    ctx.home.register_repo(ctx.repo.common_dir)

    nested = nested_in_tree(ctx.repo, tree, toplevel)

    def save_local(commit: str) -> None:
        ctx.local.save_spec(LocalSpec(commit, spec.command, spec.shell, spec.cwd, spec.env,
                                      toplevel, captured, nested, (), spec.stop_signal,
                                      spec.stop_target, time_limit=spec.time_limit,
                                      retries=spec.retries, backend=spec.backend,
                                      slurm_args=slurm_args))

    job = ctx.store.create(draft, tree, before_publish=save_local,
                           after_lost_race=ctx.local.drop_spec)
    snap = Snapshot(tree, old.source, old.changes, ())
    notes = () if trust == LOCAL else (
        f"job {old.name} was {trust}: job {job.name} runs its code with your command and your "
        "environment",)
    return Submitted(job, snap, notes, wake_daemon(ctx, (job.id,)))


@dataclass(frozen=True)
class Finding:
    """A problem `git tq doctor` explains: which record, what is wrong, how to fix it."""

    job: str  # the id (or ref name) concerned
    problem: str  # "tampered", "unreadable", "fetched", "missing private record"
    explanation: str
    fix: str


def _legacy_record(ctx: Context, job: Job,
                   entries: Mapping[int, LedgerEntry]) -> Optional[tuple[str, str, dict[str, Any]]]:
    """The private record an older git tq wrote for this job, as (submission, path,
    data), or None.

    Only a record in the old format (no "format" key: every record written since
    has one) counts, only for a submission commit that names this job itself and
    that no ledger entry claims: a fetched record that points at another job's
    submission (ours) must not reach that job's private record.
    """
    import json

    from git_tq import recordfmt
    from git_tq.home import repo_key
    from git_tq.localjobs import is_oid

    submission = ctx.store.submission(job)
    if not is_oid(submission) or any(e.submission == submission for e in entries.values()):
        return None
    path = os.path.join(ctx.home.path, "jobs", repo_key(ctx.repo.common_dir),
                        f"{submission}.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        message = ctx.repo.out("cat-file", "commit", submission).partition("\n\n")[2]
        first = recordfmt.decode(message, submission)
    except (OSError, ValueError, TqError, recordfmt.RecordFormatError):
        return None
    if not isinstance(data, dict) or "format" in data or first.id != job.id:
        return None
    return submission, path, data


def adopt(ctx: Context, token: str) -> Job:
    """Vouch for a job that git tq queued here before it kept a ledger (it shows as
    fetched): it becomes local again, with the command of its submission commit.

    Only a job with this user's private record from then (old format, named by its
    submission commit, which names the job) can be adopted. What it will run and
    how it is scheduled are read from that submission commit (content-addressed:
    exactly what was submitted), never from later records: adopting writes a new
    record of ours with the submission's spec on top of the current tip.
    """
    from git_tq import recordfmt

    job = ctx.store.resolve(token)
    entries = ctx.local.entries()
    trust = ctx.store.trust(job, entries)
    if trust != FETCHED:
        raise TqError(f"job {job.id} is {trust}: nothing to adopt"
                      + ("; git tq doctor --restore puts it back" if trust == TAMPERED else ""))
    legacy = _legacy_record(ctx, job, entries)
    if legacy is None:
        raise NotOurs(f"job {job.id} was not submitted here by you (no private record of it "
                      "from an older git tq in the tq home): it cannot be adopted; requeue it "
                      "with a command")
    submission, path, data = legacy
    try:
        environ = {str(k): str(v) for k, v in dict(data.get("env") or {}).items()}
        source_dir = str(data.get("worktree") or "")
        message = ctx.repo.out("cat-file", "commit", submission).partition("\n\n")[2]
        first = recordfmt.decode(message, submission)
    except (OSError, ValueError, TypeError, AttributeError, recordfmt.RecordFormatError) as exc:
        raise TqError(f"job {job.id}: its old private record is unreadable ({exc})") from None
    spec = first.spec
    adopted = job.evolve(spec=spec, snapshot=submission)
    commit = ctx.store.commit_record(f"{submission}^{{tree}}", job.tip, adopted)
    with ctx.local.locked():
        if ctx.repo.resolve_ref(job.ref) != job.tip:
            raise TqError(f"job {job.id} changed meanwhile; try again")
        # The old file has the new one's name: it goes first, the new one replaces it.
        if job.state.active:
            ctx.local.save_spec(LocalSpec(submission, spec.command, spec.shell, spec.cwd,
                                          spec.env, source_dir, without_repo_vars(environ)))
        else:
            os.unlink(path)
        ctx.local.record(job.id, LedgerEntry(submission, None, commit))
        moved = ctx.repo.update_ref(job.ref, commit, job.tip, f"tq: adopt job {job.id}")
        ctx.local.record(job.id, LedgerEntry(submission, commit, None) if moved else None)
    if not moved:
        raise TqError(f"job {job.id} changed meanwhile; try again")
    wake_daemon(ctx)
    return first


def doctor(ctx: Context, *, restore: bool = False) -> list[Finding]:
    """Records that are not what this user wrote, and why; with `restore`, move each
    tampered ref back to the record we last wrote (compare-and-swap)."""
    listing = ctx.store.listing()
    entries = ctx.local.entries()
    found: list[Finding] = []
    for bad in listing.unreadable:
        found.append(Finding(bad.name, "unreadable",
                             f"refs/tq/jobs/{bad.name} holds no valid job record: {bad.reason}; "
                             "it is listed, never used",
                             f"look: git log {shlex.quote('refs/tq/jobs/' + bad.name)}; "
                             f"delete: git update-ref -d "
                             f"{shlex.quote('refs/tq/jobs/' + bad.name)} {shlex.quote(bad.tip)}"))
    for job in listing.jobs:
        trust = ctx.store.trust(job, entries)
        entry = entries.get(job.id)
        if trust == TAMPERED and entry is not None:
            ours = entry.tip or entry.next or ""
            if restore and ours:
                with ctx.local.locked():
                    if ctx.repo.update_ref(job.ref, ours, job.tip,
                                           f"tq: doctor restores job {job.id}"):
                        found.append(Finding(str(job.id), "restored",
                                             f"job {job.id}'s ref is back at our record "
                                             f"{ours[:12]} (it was at {job.tip[:12]})", ""))
                        continue
            found.append(Finding(
                str(job.id), "tampered",
                f"job {job.id} is yours, but its ref was moved from the record git tq last "
                f"wrote ({ours[:12]}) to {job.tip[:12]} by something else (a fetch, a push or "
                "a hand edit): it is neither run nor written, and no hook fires for it",
                f"git tq doctor --restore (or: git update-ref refs/tq/jobs/{job.id} "
                f"{shlex.quote(ours)} {shlex.quote(job.tip)})"))
        elif trust == FETCHED and job.state.active:
            if _legacy_record(ctx, job, entries) is not None:
                found.append(Finding(
                    str(job.id), "queued by an older git tq",
                    f"job {job.id} ({job.state.value}) was queued here before git tq kept a "
                    "ledger of its records, so it is treated as fetched and does not run",
                    f"check it (git tq show {job.id}), then: git tq doctor --adopt {job.id}"))
                continue
            found.append(Finding(
                str(job.id), "fetched",
                f"job {job.id} ({job.state.value}) was not submitted here by you "
                f"(by {job.spec.user}@{job.spec.host}): it never runs here",
                f"run its code yourself: git tq requeue {job.id} -- COMMAND"))
        elif trust == LOCAL and job.state is State.PENDING and entry is not None and \
                ctx.local.load_spec(entry.submission) is None:
            found.append(Finding(
                str(job.id), "missing private record",
                f"job {job.id} is pending but its private record (command, environment) is "
                f"gone from {ctx.local.folder}: it cannot start",
                f"git tq rm {job.id}; git tq requeue {job.id}"))
    if any(f.problem == "restored" for f in found):
        wake_daemon(ctx)
    return found


@dataclass(frozen=True)
class Collected:
    """What `gc` did: the worktrees removed, and those kept because their jobs wrote
    files that are not ignored (removed only when asked)."""

    removed: list[str]
    kept: list[tuple[int, Kept]]
    broken: list[Unreadable]  # job refs at missing objects: to repair or forget


def gc(ctx: Context, *, kept: bool = False, tokens: Sequence[str] = ()) -> Collected:
    """Remove worktrees and run files of jobs that have finished (only those of the jobs
    in `tokens`, when given). A worktree whose job wrote files that are not ignored is
    kept (and recorded as kept) unless `kept` is set."""
    import shutil
    import stat

    from git_tq import jobtree
    from git_tq.gitrepo import registered_worktree, remove_worktree, run_git
    from git_tq.home import RunFiles, repo_key

    def real_dir(path: str) -> bool:  # lstat: a symlink to a directory is not one
        try:
            return stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            return False

    only: Optional[set[int]] = None
    if tokens:
        only = set()
        for token in parse_job_tokens(tokens):
            if not (token.strip().isascii() and token.strip().isdigit()):
                raise UsageError(f"not a job id: {token!r}")
            only.add(int(token))
    common = ctx.repo.common_dir
    key = repo_key(common)
    removed = []
    left: list[tuple[int, Kept]] = []
    listing = ctx.store.listing()
    jobs = {j.id: j for j in listing.jobs}
    broken = [u for u in listing.unreadable if u.reason == MISSING]
    entries = ctx.local.entries()
    top = os.path.join(ctx.home.path, "worktrees")
    root = os.path.join(top, key)
    # Never list (or delete in) a folder reached through a symlink a job may have planted.
    names = sorted(os.listdir(root)) if real_dir(top) and real_dir(root) else []
    for name in names:
        job_id = int(name) if name.isascii() and name.isdigit() else None
        if only is not None and job_id not in only:
            continue
        job = jobs.get(job_id) if job_id is not None else None
        # A record someone else moved may say anything ("done" while it runs): skipped.
        if job is not None and (job.state.active or ctx.store.trust(job, entries) != LOCAL):
            continue
        path = os.path.join(root, name)
        if job_id is not None:
            record = jobtree.read_kept(ctx.home.path, key, job_id)
            if record is None and registered_worktree(common, path) is not None:
                entry = entries.get(job_id)
                record = jobtree.check_kept(path, entry.submission if entry else "",
                                             job.outputs if job is not None else None)
                if record is not None:  # a job that ended while no daemon removed it
                    jobtree.keep(ctx.home.path, key, job_id, record)
            if record is not None and not kept:
                left.append((job_id, record))
                continue
        remove_worktree(common, path)  # the registered worktree, or only a link
        if real_dir(path):
            # A leftover git does not know (a failed checkout): ours, inside our
            # folder. rmtree refuses symlinks and never follows one inside.
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        if job_id is not None:
            jobtree.unkeep(ctx.home.path, key, job_id)
        if job is not None:
            RunFiles(ctx.home, key, job.id).clear()
    # Records of kept worktrees that are gone (removed by hand) go too.
    kept_root = os.path.dirname(jobtree.kept_record(ctx.home.path, key, 0))
    for name in os.listdir(kept_root) if real_dir(kept_root) else []:
        stem = name[:-len(".json")]
        if name.endswith(".json") and stem.isascii() and stem.isdigit() and \
                not os.path.lexists(os.path.join(root, stem)):
            jobtree.unkeep(ctx.home.path, key, int(stem))
    run_git(["--git-dir", common, "worktree", "prune"], common,
            env=without_repo_vars(os.environ), check=False)
    return Collected(removed, left, broken)


# --- reading -----------------------------------------------------------------


@dataclass(frozen=True)
class JobView:
    """A job with what lives beside its record: note, log file, category."""

    job: Job
    note: Optional[str]
    log: str
    category: Optional[str]
    trust: str = LOCAL  # localjobs.LOCAL, FETCHED or TAMPERED
    pid: Optional[int] = None  # the job's process, while a local job runs
    waiting_for: tuple[int, ...] = ()  # a pending job's dependencies not yet ended
    reason: Optional[str] = None  # why a pending job waits ("GPU 0 busy"), when known

    def to_json(self) -> dict[str, Any]:
        j, s = self.job, self.job.spec
        gpus = j.assigned_gpus or s.gpus.ids
        return {
            "id": j.id,
            "origin": j.origin,  # `user@host` of a fetched job (from its ref); None: local
            "name": j.name,
            "state": j.state.value,
            "trust": self.trust,
            "priority": s.priority,
            "grace": s.grace,
            "tag": s.tag,
            "command": list(s.command),
            "shell": s.shell,
            "gpus": list(gpus) if gpus is not None else None,
            "gpu_count": s.gpus.count,
            "env": s.env,
            "cwd": s.cwd,
            "source": j.source,
            "snapshot": j.snapshot,
            "submitted_at": s.submitted_at,
            "started_at": j.started_at,
            "ended_at": j.ended_at,
            "exit_code": j.exit_status,
            "signal": j.signal,
            "outcome": j.outcome,
            "pid": self.pid,
            "attempt": j.attempt,
            "log": self.log,
            "note": self.note,
            "category": self.category,
            "event": j.event,
            "detail": j.detail,
            "changes": {"modified": j.changes.modified, "added": j.changes.added,
                        "deleted": j.changes.deleted},
            "user": s.user,
            "host": s.host,
            "stop_signal": s.stop_signal,
            "stop_target": s.stop_target,
            "backend": s.backend,
            "stop": j.stop,
            "stop_seconds": j.stop_seconds,
            "sweep": s.sweep,
            "params": dict(s.params),
            "after": list(s.after),
            "after_any": list(s.after_any),
            "waiting_for": list(self.waiting_for),
            "reason": self.reason,
            "metrics": dict(j.metrics),
            "outputs": None if j.outputs is None else outputs_json(j.outputs),
            "time_limit": s.time_limit,
            "retries": s.retries,
            "retried": j.retried,
            "ran_seconds": j.ran_seconds,
        }


def outputs_json(o: Outputs) -> dict[str, Any]:
    return {"files": o.files, "bytes": o.bytes,
            "not_recorded": [{"path": p, "size": n, "limit": lim} for p, n, lim in o.skipped],
            "not_recorded_count": o.skipped_count, "not_recorded_bytes": o.skipped_bytes,
            "error": o.error}


@dataclass(frozen=True)
class StoppedAttempt:
    """How one attempt that git tq stopped (preempted, cancelled) ended."""

    attempt: int
    event: str  # preempted or cancelled
    stop: str  # clean: it exited within the grace; forced: SIGKILL
    seconds: Optional[float]  # from the stop signal to the end
    exit_code: Optional[int]
    signal: Optional[int]
    stop_signal: str  # the signal it was sent (SIGTERM...)

    def describe(self) -> str:
        secs = "?" if self.seconds is None else f"{self.seconds:g}"
        if self.stop == "forced":
            what = f"killed after {secs} s grace"
        elif self.signal is not None:
            what = f"ended by {_signal_name(self.signal)} after {self.stop_signal} ({secs} s)"
        elif self.exit_code is not None:
            what = f"exited {self.exit_code} after {self.stop_signal} ({secs} s)"
        else:
            what = f"ended after {self.stop_signal} ({secs} s)"
        return f"attempt {self.attempt} {self.event}: {what}"

    def to_json(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "event": self.event, "stop": self.stop,
                "seconds": self.seconds, "exit_code": self.exit_code, "signal": self.signal,
                "stop_signal": self.stop_signal, "text": self.describe()}


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def stopped_attempts(lifecycle: Iterable[tuple[str, Job]]) -> list[StoppedAttempt]:
    """Each attempt a stop ended, from the records of a job's lifecycle (oldest first)."""
    return [StoppedAttempt(r.attempt, r.event, r.stop, r.stop_seconds, r.exit_code, r.signal,
                           r.spec.stop_signal)
            for _, r in lifecycle if r.stop is not None and r.event != "edited"]


def _views(ctx: Context, jobs: Iterable[Job]) -> list[JobView]:
    notes = ctx.store.all_notes()
    logs = ctx.store.find_logs()
    entries = ctx.local.entries()
    jobs = list(jobs)
    keys = _note_keys(ctx, jobs, entries, notes)
    waits = waiting_reasons(ctx, jobs)
    views = []
    for job in jobs:
        log = ctx.store.log_path(job, logs)
        category = ctx.store.category(log) if job.origin is None and job.id in logs else None
        trust = ctx.store.trust(job, entries)
        waiting_for, reason = waits.get(job.id, ((), None)) if job.origin is None \
            else ((), None)
        views.append(JobView(job, notes.get(keys[job.name]), log, category, trust,
                             job_pid(ctx, job, trust), waiting_for, reason))
    return views


def waiting_reasons(ctx: Context, jobs: Sequence[Job]) \
        -> dict[int, tuple[tuple[int, ...], Optional[str]]]:
    """Why each pending job among `jobs` waits: (dependencies not yet ended, reason).
    Dependencies are judged here from the records (`deps`), so `ls` is right even
    with no daemon; the rest ("GPU 0 busy", "yielding to pid 4242 on GPU 0") is what
    the running daemon's last plan said of the job's current record."""
    from git_tq import deps

    jobs = [j for j in jobs if j.origin is None]  # fetched ones wait for nothing here
    pending = [j for j in jobs if j.state is State.PENDING]
    if not pending:
        return {}
    by_id = {j.id: j for j in jobs}
    wanted = {d for j in pending for d in j.spec.dependencies if d not in by_id}
    if wanted:
        by_id.update(_jobs_of(ctx, wanted))
    states = {j.id: j.state for j in by_id.values()}
    entries = None
    for dep in {d for j in pending for d in j.spec.dependencies if d in by_id}:
        if by_id[dep].state.active:
            continue
        entries = ctx.local.entries() if entries is None else entries
        if ctx.store.trust(by_id[dep], entries) != LOCAL:
            # Someone else moved its record: the ending it claims is not ours to believe
            # (and its real one is never recorded). It has not ended, as the daemon says.
            states[dep] = State.PENDING
    verdicts = deps.judge({j.id: deps.Needs(j.spec.after, j.spec.after_any)
                           for j in pending}, states)
    told = _daemon_reasons(ctx)
    result: dict[int, tuple[tuple[int, ...], Optional[str]]] = {}
    for job in pending:
        verdict = verdicts.get(job.id)
        if verdict is not None and not verdict.ready:
            result[job.id] = (verdict.waiting_for, verdict.reason)
            continue
        said = told.get(str(job.id))
        # The daemon's word holds for the record it planned with, and its dependency
        # reasons are judged here afresh.
        if isinstance(said, list) and len(said) == 3 and said[0] == job.tip \
                and said[1] != "dependency" and isinstance(said[2], str):
            result[job.id] = ((), said[2])
    return result


def _jobs_of(ctx: Context, ids: Collection[int]) -> dict[int, Job]:
    """The records of these jobs (those that exist): one listing of the refs, one read
    of the records not at hand."""
    from git_tq.store import _canonical

    listed, _ = ctx.store.ref_tips()
    tips = [tip for tip, name in listed if _canonical(name) in ids]
    found, _bad = ctx.store.records(tips)
    return {job.id: job for job in found.values() if job.id in ids}


def _daemon_reasons(ctx: Context) -> dict[str, Any]:
    """The daemon's last word on this repository's waiting jobs; {} when it is not
    running (its pid gone), so a stale word is never shown."""
    import json

    from git_tq.home import repo_key

    try:
        with open(ctx.home.waiting_file(repo_key(ctx.repo.common_dir)), "rb") as fh:
            data = json.loads(fh.read())
        pid, jobs = data["pid"], data["jobs"]
        if not isinstance(pid, int) or pid <= 0 or not isinstance(jobs, dict):
            return {}
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no file, a daemon that is gone (or someone else's pid)
    return jobs


def _note_keys(ctx: Context, jobs: Sequence[Job], entries: Mapping[int, LedgerEntry],
               notes: Mapping[str, str]) -> dict[str, str]:
    """The commit each job's note hangs on, by job name (`7`, `alice@gpu1:7`): the
    ledger's submission for ours; for a record not ours its recorded submission only
    if that commit is a record of the same job (a fetched job 20 that names job 2's
    submission must not show job 2's note), else its tip."""
    keys = {}
    others: dict[Optional[str], list[Job]] = {}
    for job in jobs:
        entry = entries.get(job.id) if job.origin is None else None
        if entry is not None and entry.trusts(job.tip):
            keys[job.name] = entry.submission
        else:
            keys[job.name] = job.tip
            if job.snapshot in notes:
                others.setdefault(job.origin, []).append(job)
    for origin, group in others.items():  # within one origin, ids are unique
        for job_id, commit in ctx.store.submissions_named(group).items():
            keys[str(job_id) if origin is None else f"{origin}:{job_id}"] = commit
    return keys


def job_pid(ctx: Context, job: Job, trust: str) -> Optional[int]:
    """The pid of a running job of ours, from its run files (the supervisor writes it
    when the job starts; they go when its ending is recorded); None otherwise. A
    record that is not ours says nothing about this machine's processes."""
    if trust != LOCAL or job.state not in (State.RUNNING, State.STOPPING):
        return None
    from git_tq.home import RunFiles, repo_key

    rf = RunFiles(ctx.home, repo_key(ctx.repo.common_dir), job.id)
    try:
        pid = (rf.read(rf.ident) or {})["job"][0]
    except (OSError, KeyError, IndexError, TypeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def parse_states(states: Sequence[str]) -> set[State]:
    """The states named by `ls -s` (comma-separated, repeated; `active`)."""
    result = set()
    for item in states:
        for name in item.split(","):
            name = name.strip().lower()
            if name == "active":
                result |= {s for s in State if s.active}
                continue
            try:
                result.add(State(name))
            except ValueError:
                known = ", ".join(s.value for s in State)
                raise UsageError(f"unknown state {name!r} (states: {known}, active)") from None
    return result


@dataclass(frozen=True)
class JobList:
    views: list[JobView]
    unreadable: list[Unreadable]
    metrics: list[str] = field(default_factory=list)  # the metric columns to show


def list_jobs(ctx: Context, *, include_finished: bool = False, states: Sequence[str] = (),
              tags: Sequence[str] = ()) -> list[JobView]:
    return list_queue(ctx, include_finished=include_finished, states=states, tags=tags).views


def list_queue(ctx: Context, *, include_finished: bool = False, states: Sequence[str] = (),
               tags: Sequence[str] = (), sort: Optional[str] = None,
               metrics: Optional[Sequence[str]] = None) -> JobList:
    """Jobs in queue order (running, then pending by priority); every job by id with --all;
    plus the refs that hold no readable record, and the metric columns to show (`metrics`
    as asked, else `metric_columns`' choice). `sort`: see `sort_jobs`."""
    wanted = parse_states(states)
    # The queue is this machine's; a listing of finished jobs shows fetched ones too.
    listing = ctx.store.listing(fetched=include_finished or bool(wanted))
    jobs = listing.jobs
    if wanted:
        jobs = [j for j in jobs if j.state in wanted]
    elif not include_finished:
        jobs = [j for j in jobs if j.state.active]
    if tags:
        jobs = [j for j in jobs if j.spec.tag in tags]
    if not include_finished and not wanted:
        started = [j for j in jobs if j.state in (State.RUNNING, State.STOPPING)]
        jobs = started + pending_in_queue_order(jobs)
    if sort is not None:
        jobs = sort_jobs(jobs, sort)
    return JobList(_views(ctx, jobs), listing.unreadable, metric_columns(ctx, jobs, metrics))


@dataclass(frozen=True)
class JobDetail:
    view: JobView
    lifecycle: list[tuple[str, Job]]
    # Symlinks whose relative target leaves the repository (path, target as written):
    # the job's worktree points them where the user's links pointed at submission.
    outside_links: list[tuple[str, str]] = field(default_factory=list)
    # The job's worktree, kept after it finished because the job wrote files that are
    # not ignored (jobtree.Kept: where, and why); None when there is none.
    kept: Optional[Kept] = None


def kept_worktree(ctx: Context, job: Job) -> Optional[Kept]:
    """Where this job's kept worktree is and why, if it was kept and is still there."""
    from git_tq import jobtree
    from git_tq.home import repo_key

    if not job.state.finished:
        return None
    kept = jobtree.read_kept(ctx.home.path, repo_key(ctx.repo.common_dir), job.id)
    # The record names the job by its submission: a reused id is another job.
    if kept is None or ctx.store.trust(job) != LOCAL or \
            kept.submission != ctx.store.submission(job) or not os.path.isdir(kept.path):
        return None
    return kept


def show_job(ctx: Context, token: str) -> JobDetail:
    job = ctx.store.resolve(token)
    logs = ctx.store.find_logs()
    log = ctx.store.log_path(job, logs)
    trust = ctx.store.trust(job)
    waiting_for, reason = waiting_reasons(ctx, [job]).get(job.id, ((), None)) \
        if job.origin is None else ((), None)
    view = JobView(job, ctx.store.note(job), log,
                   ctx.store.category(log) if job.origin is None and job.id in logs else None,
                   trust, job_pid(ctx, job, trust), waiting_for, reason)
    from git_tq import jobtree

    links = jobtree.outside_links([], ctx.repo.cwd, ctx.store.submission(job))
    return JobDetail(view, ctx.store.lifecycle(job), links, kept_worktree(ctx, job))


@dataclass(frozen=True)
class HistoryEntry:
    """A commit of the history and the jobs submitted on it (`commit` None: unborn)."""

    commit: Optional[str]
    short: str
    subject: str
    when: str
    jobs: list[JobView] = field(default_factory=list)


def history(ctx: Context, revisions: Sequence[str]) -> list[HistoryEntry]:
    """`git log` of `revisions` (default HEAD), each commit with the jobs run on it."""
    views = _views(ctx, ctx.store.list_jobs(fetched=True))
    by_source: dict[Optional[str], list[JobView]] = {}
    for v in views:
        by_source.setdefault(v.job.source, []).append(v)
    entries = []
    for commit, short, subject, when in history_commits(ctx, revisions):
        entries.append(HistoryEntry(commit, short, subject, when, by_source.get(commit, [])))
    if not revisions and None in by_source:
        entries.append(HistoryEntry(None, "(unborn)", "jobs submitted before the first commit",
                                    "", by_source[None]))
    return entries


def history_commits(ctx: Context, revisions: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(commit, short id, subject, relative date) of `git log` of `revisions` (default HEAD;
    none on an unborn branch)."""
    revs = list(revisions)
    entries: list[tuple[str, str, str, str]] = []
    if revs or ctx.repo.head_commit() is not None:  # an unborn branch has no history yet
        if any(r.startswith("-") for r in revs):
            raise UsageError("git tq log takes revisions only (no git log options)")
        p = ctx.repo.git("log", "--format=%H%x00%h%x00%s%x00%cr%x00", *(revs or ["HEAD"]),
                         "--", check=False)
        if p.returncode != 0:
            raise UsageError(
                f"bad revision range {' '.join(revs)!r}: "
                + p.stderr.decode(errors="replace").strip().splitlines()[-1]
            )
        parts = p.stdout.decode("utf-8", errors="replace").split("\0")
        for i in range(0, len(parts) - 4, 4):
            entries.append((parts[i].lstrip("\n"), parts[i + 1], parts[i + 2], parts[i + 3]))
    return entries


# --- metrics: columns, sorting, comparison ------------------------------------


METRIC_COLUMNS = 3  # metric columns shown when neither -m nor tq.columns names them
SORT_KEYS = ("id", "priority", "time")  # besides metric names
# A metric whose name contains one of these words is better lower; any other, higher.
LOWER_IS_BETTER = ("loss", "error", "err", "perplexity", "ppl", "time", "mae", "mse", "rmse")


def metric_names(values: Sequence[str]) -> list[str]:
    """`-m loss,acc -m f1` -> ['loss', 'acc', 'f1'] (each once, in order; blanks dropped)."""
    names: list[str] = []
    for value in values:
        for name in (n.strip() for n in value.split(",")):
            if name and name not in names:
                names.append(name)
    return names


class HasMetrics(Protocol):
    @property
    def metrics(self) -> tuple[tuple[str, Metric], ...]: ...


def metric_columns(ctx: Context, jobs: Sequence[HasMetrics],
                   requested: Optional[Sequence[str]] = None) -> list[str]:
    """The metrics to show for `jobs`: those `requested` (-m; empty: none); else, if any
    job has metrics, those `tq.columns` names; else the first METRIC_COLUMNS names that
    every job with metrics has (in the order the first of them has them), or, when they
    share none, the METRIC_COLUMNS most common ones."""
    if requested is not None:
        return metric_names(requested)
    reported = [j.metrics for j in jobs if j.metrics]
    if not reported:
        return []
    configured = metric_names([ctx.config.get("tq.columns", "")])
    if configured:
        return configured
    from collections import Counter
    from operator import itemgetter

    # Jobs of one script report the same names: count each sequence of names once (this
    # runs for every `ls`, over 10,000 jobs too).
    sequences = Counter(tuple(map(itemgetter(0), metrics)) for metrics in reported)
    first = next(iter(sequences))
    shared = set(first).intersection(*sequences)
    if shared:
        return [name for name in first if name in shared][:METRIC_COLUMNS]
    counts: dict[str, int] = {}  # insertion order: first appearance breaks ties
    for names, times in sequences.items():
        for name in names:
            counts[name] = counts.get(name, 0) + times
    return sorted(counts, key=lambda name: -counts[name])[:METRIC_COLUMNS]


def metric_of(job: Job, name: str) -> Optional[Metric]:
    for key, value in job.metrics:
        if key == name:
            return value
    return None


def _seconds_between(start: Optional[str], end: Optional[str]) -> Optional[float]:
    import datetime as dt

    if not start:
        return None
    try:
        begun = dt.datetime.fromisoformat(start)
        ended = dt.datetime.fromisoformat(end) if end else dt.datetime.now(begun.tzinfo)
    except (TypeError, ValueError):
        return None
    return max((ended - begun).total_seconds(), 0.0)


def run_seconds(job: Job) -> Optional[float]:
    """How long the job's last attempt ran (until now for a running one); None if it
    never started."""
    return _seconds_between(job.started_at, job.ended_at)


def sort_jobs(jobs: Sequence[Job], key: str) -> list[Job]:
    """Jobs ordered by `key`: id, priority, time (run time) or a metric name, ascending;
    `-key` descending. Numbers come before texts; jobs without a value come last either
    way, in the order they had."""
    descending = key.startswith("-")
    name = (key[1:] if descending else key).strip()
    if not name:
        raise UsageError("--sort needs a key: id, priority, time or a metric name")
    value: Callable[[Job], Any]
    if name == "id":
        value = lambda j: j.id  # noqa: E731
    elif name == "priority":
        value = lambda j: j.spec.priority  # noqa: E731
    elif name == "time":
        value = run_seconds
    else:
        if jobs and not any(metric_of(j, name) is not None for j in jobs):
            raise UsageError(f"no listed job has a metric {name!r} (sort keys: "
                             f"{', '.join(SORT_KEYS)}, or a metric name; -KEY descending)")
        value = lambda j: metric_of(j, name)  # noqa: E731
    numbers: list[tuple[Any, Job]] = []
    texts: list[tuple[Any, Job]] = []
    missing: list[Job] = []
    for job in jobs:
        v = value(job)
        if v is None:
            missing.append(job)
        else:
            (texts if isinstance(v, str) else numbers).append((v, job))
    numbers.sort(key=lambda p: p[0], reverse=descending)  # stable either way
    texts.sort(key=lambda p: p[0], reverse=descending)
    return [j for _, j in numbers] + [j for _, j in texts] + missing


def lower_is_better(name: str, extra: Sequence[str] = ()) -> bool:
    """Whether a smaller value of metric `name` is the better one: its name contains
    loss, error, err, perplexity, ppl, time, mae, mse or rmse (or one of `extra`)."""
    low = name.lower()
    return any(word in low for word in (*LOWER_IS_BETTER, *(e.lower() for e in extra)))


def best_index(values: Sequence[Any], lower: bool) -> Optional[int]:
    """The index of the best number among `values` (the first, on a tie); None unless at
    least two are numbers and they are not all equal."""
    numbers = [(v, i) for i, v in enumerate(values)
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if len(numbers) < 2 or len({v for v, _ in numbers}) == 1:
        return None
    pick = min if lower else max
    best = pick(v for v, _ in numbers)
    return next(i for v, i in numbers if v == best)


Words = tuple[tuple[str, bool], ...]  # a cell's words, each with whether it differs


@dataclass(frozen=True)
class CodeDiff:
    """How a job's code (its submission's tree) differs from the first compared job's."""

    job: int
    tree: str
    base: int  # the job it is compared with
    files: int = 0
    insertions: int = 0
    deletions: int = 0
    paths: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "tree": self.tree, "vs": self.base, "files": self.files,
                "insertions": self.insertions, "deletions": self.deletions,
                "paths": list(self.paths)}


@dataclass(frozen=True)
class CompareRow:
    """One property or metric of every compared job (None where a job has none)."""

    name: str
    kind: str  # "property" or "metric"
    values: tuple[Any, ...]
    best: Optional[int] = None  # metrics: the index of the best value
    lower_is_better: Optional[bool] = None  # metrics: which way is better
    words: Optional[tuple[Words, ...]] = None  # command, params: the words that differ

    @property
    def differs(self) -> bool:
        return any(v != self.values[0] for v in self.values[1:])

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind,
                                "values": list(self.values), "best": self.best,
                                "differs": self.differs}
        if self.kind == "metric":
            data["lower_is_better"] = self.lower_is_better
        if self.words is not None:
            data["differing_words"] = [[w for w, d in cell if d] for cell in self.words]
        return data


@dataclass(frozen=True)
class Comparison:
    views: list[JobView]
    rows: list[CompareRow]
    code: list[CodeDiff]

    def to_json(self) -> dict[str, Any]:
        return {"jobs": [v.to_json() for v in self.views],
                "rows": [r.to_json() for r in self.rows],
                "code": [c.to_json() for c in self.code]}


def _command_words(spec: JobSpec) -> list[str]:
    return spec.command[0].split() if spec.shell else [shlex.quote(w) for w in spec.command]


def differing_words(cells: Sequence[Sequence[str]]) -> tuple[Words, ...]:
    """Each cell's words marked where they differ: the first cell's against every other,
    the others' against the first (difflib's matching of word sequences)."""
    import difflib

    base = list(cells[0])
    marks = [[False] * len(cell) for cell in cells]
    for k, cell in enumerate(cells[1:], start=1):
        matcher = difflib.SequenceMatcher(None, base, list(cell), autojunk=False)
        for op, a0, a1, b0, b1 in matcher.get_opcodes():
            if op != "equal":
                marks[0][a0:a1] = [True] * (a1 - a0)
                marks[k][b0:b1] = [True] * (b1 - b0)
    return tuple(tuple(zip(cell, mark)) for cell, mark in zip(cells, marks))


def _param_words(jobs: Sequence[Job]) -> tuple[Words, ...]:
    per_job = [dict(j.spec.params) for j in jobs]
    names = list(dict.fromkeys(n for p in per_job for n in p))
    differ = {n for n in names if len({p.get(n) for p in per_job}) > 1}
    return tuple(tuple((f"{n}={p[n]}", n in differ) for n in names if n in p)
                 for p in per_job)


def code_differences(ctx: Context, jobs: Sequence[Job]) -> list[CodeDiff]:
    """Each job's code against the first job's: the trees of their submission commits
    (checked, never the tip: a tip's tree may hold the job's outputs too), as
    `git diff --stat` counts them (renames found, binary files count as changed)."""
    from git_tq.localjobs import is_oid

    commits = [ctx.store.submission(j) for j in jobs]
    if not all(is_oid(c) for c in commits):  # only object ids reach git's arguments
        raise TqError("could not find the code of the compared jobs")
    trees = ctx.repo.out("rev-parse", *(f"{c}^{{tree}}" for c in commits)).split()
    if len(trees) != len(jobs):
        raise TqError("could not read the code trees of the compared jobs")
    base = jobs[0].id
    found = [CodeDiff(jobs[0].id, trees[0], base)]
    for job, tree in zip(jobs[1:], trees[1:]):
        if tree == trees[0]:
            found.append(CodeDiff(job.id, tree, base))
            continue
        out = ctx.repo.git("diff-tree", "-r", "-M", "--numstat", "-z", "--end-of-options",
                           trees[0], tree).stdout.decode(errors="surrogateescape")
        parts = out.split("\0")
        insertions = deletions = 0
        paths: list[str] = []
        i = 0
        while i < len(parts) and parts[i]:
            added, deleted, path = (parts[i].split("\t", 2) + ["", ""])[:3]
            if path:
                i += 1
            else:  # a rename: "A\tD\t" then the old and the new path
                path = parts[i + 2] if i + 2 < len(parts) else ""
                i += 3
            insertions += int(added) if added.isdigit() else 0
            deletions += int(deleted) if deleted.isdigit() else 0
            paths.append(path)
        found.append(CodeDiff(job.id, tree, base, len(paths), insertions, deletions,
                              tuple(paths)))
    return found


MAX_COMPARE = 100  # jobs one comparison shows


def compare(ctx: Context, tokens: Sequence[str], *, least: int = 2) -> Comparison:
    """Jobs side by side (ids, ranges, tags, sweeps; at least `least`: two for `compare`,
    one for a report): their properties, how their code differs from the first one's,
    and every metric any of them has, with the best value of each marked (lower for
    loss, error, ... and `tq.compare.lower` names; higher for the others)."""
    jobs = resolve_jobs(ctx, tokens)
    if len(jobs) < least:
        only = f"job {jobs[0].id}" if jobs else "none"
        raise UsageError(f"git tq compare needs at least 2 jobs ({' '.join(tokens)} names "
                         f"only {only})")
    if len(jobs) > MAX_COMPARE:
        raise UsageError(f"git tq compare shows at most {MAX_COMPARE} jobs side by side "
                         f"({len(jobs)} given): name fewer, or use git tq ls -a -m ... "
                         "--sort ...")
    views = _views(ctx, jobs)
    code = code_differences(ctx, jobs)
    specs = [j.spec for j in jobs]
    rows = [CompareRow("command", "property", tuple(s.command_line() for s in specs),
                       words=differing_words([_command_words(s) for s in specs]))]
    if any(s.params for s in specs):
        rows.append(CompareRow("params", "property",
                               tuple(dict(s.params) or None for s in specs),
                               words=_param_words(jobs)))
    if any(s.sweep for s in specs):
        rows.append(CompareRow("sweep", "property", tuple(s.sweep for s in specs)))
    if any(s.tag for s in specs):
        rows.append(CompareRow("tag", "property", tuple(s.tag for s in specs)))
    rows += [
        CompareRow("priority", "property", tuple(s.priority for s in specs)),
        CompareRow("gpus", "property",
                   tuple(",".join(map(str, j.assigned_gpus)) if j.assigned_gpus
                         else j.spec.gpus.describe() for j in jobs)),
        CompareRow("env", "property", tuple(s.env for s in specs)),
        CompareRow("source", "property", tuple(j.source for j in jobs)),
        CompareRow("code", "property",
                   tuple(None if i == 0 else {"files": c.files, "insertions": c.insertions,
                                              "deletions": c.deletions}
                         for i, c in enumerate(code))),
        CompareRow("run time", "property", tuple(run_seconds(j) for j in jobs)),
        CompareRow("outcome", "property",
                   tuple(j.state.value + (f" ({j.outcome})" if j.outcome else "")
                         for j in jobs)),
    ]
    if any(v.note for v in views):
        rows.append(CompareRow("note", "property", tuple(v.note for v in views)))
    extra = metric_names([ctx.config.get("tq.compare.lower", "")])
    for name in dict.fromkeys(n for j in jobs for n, _ in j.metrics):
        values = tuple(metric_of(j, name) for j in jobs)
        lower = lower_is_better(name, extra)
        rows.append(CompareRow(name, "metric", values, best_index(values, lower), lower))
    return Comparison(views, rows, code)


# --- metric series: plot, report, serve -----------------------------------------------


MAX_PLOT_JOBS = 200  # jobs one plot (or report) draws


def curve_jobs(ctx: Context, tokens: Sequence[str], *, every: bool = False) -> list[Job]:
    """The jobs a plot names: the job list tokens (ids, ranges, tags, sweeps), or with
    `every` all jobs, fetched ones too (`ls --all`'s)."""
    if every:
        jobs = ctx.store.list_jobs(fetched=True)
        if tokens:
            raise UsageError("give job lists or --all, not both")
    else:
        jobs = resolve_jobs(ctx, tokens)
    if len(jobs) > MAX_PLOT_JOBS:
        raise UsageError(f"{len(jobs)} jobs: at most {MAX_PLOT_JOBS} are drawn at once; "
                         "name fewer (a range, a tag, a sweep)")
    return jobs


def job_curves(ctx: Context, jobs: Sequence[str] | Sequence[Job],
               metrics: Optional[Sequence[str]] = None, *,
               hints: Optional[list[str]] = None,
               points: Optional[int] = None) -> list[JobCurves]:
    """Every metric series of `jobs` (job list tokens, or jobs already resolved), per
    job in order: the series stored in git for ended attempts, plus, for a running job
    of ours, the points written so far in its metrics files (read incrementally: a
    process that asks again reads only what was added). `metrics` keeps only those
    names (all numeric ones when None). A job recorded before series were kept shows
    its final metrics as one point each. `hints` gets a line for what could not be
    read (TensorBoard files without the extra). `points`: at most this many points per
    series, picked evenly (for drawing; `total` keeps the count), instead of
    tq.metrics.maxPoints."""
    from git_tq import series
    from git_tq.results import max_points_setting

    resolved = [j for j in jobs if isinstance(j, Job)]
    if len(resolved) != len(jobs):
        resolved = resolve_jobs(ctx, [str(t) for t in jobs])
    limit = max_points_setting(ctx.config)
    entries = ctx.local.entries()
    blobs = ctx.store.note_blobs(series.SERIES_REF)
    keys = _note_keys(ctx, resolved, entries, blobs)
    data = ctx.store.blobs((blobs[k] for k in keys.values() if k in blobs),
                           series.MAX_NOTE_BYTES)
    found = []
    for job in resolved:
        blob = blobs.get(keys[job.name])
        attempts = series.decode_attempts(data.get(blob, b""), limit) if blob else []
        trust = ctx.store.trust(job, entries)
        if trust == LOCAL and job.state in (State.RUNNING, State.STOPPING):
            attempts += _live_attempt(ctx, job, limit, hints)
        resumes, curves = series.merge_attempts(attempts, metrics,
                                                min(points or limit, limit))
        if not attempts and job.metrics:
            when = epoch(job.ended_at) or epoch(job.started_at) or 0.0
            curves = {k: v for k, v in series.from_final_metrics(job.metrics, job.attempt,
                                                                 when).items()
                      if metrics is None or k in metrics}
        found.append(series.JobCurves(job.name, job.spec.tag, dict(job.spec.params),
                                      job.state.value, resumes, curves))
    return found


# Live readers of running attempts' metrics files, kept while this process lives (plot
# -f, serve): by (repository, job, attempt), each file read from where the last read ended.
_LIVE: dict[tuple[str, int, int], dict[str, Any]] = {}


def _live_attempt(ctx: Context, job: Job, limit: int,
                  hints: Optional[list[str]]) -> list[AttemptSeries]:
    """The running attempt's points so far, from its metrics files (where they began and
    when their bytes came: the supervisor's run file); none if it has not started."""
    from git_tq import metricfiles
    from git_tq.home import RunFiles, repo_key
    from git_tq.series import downsample

    rf = RunFiles(ctx.home, repo_key(ctx.repo.common_dir), job.id)
    launch = rf.read(rf.launch) if os.path.exists(rf.series) else None
    side = metricfiles.read_sidecar(rf.series)
    spec = (launch or {}).get("results")
    if launch is None or side is None or not isinstance(spec, dict) \
            or side.attempt != job.attempt:
        return []
    key = (ctx.repo.common_dir, job.id, side.attempt)
    readers = _LIVE.setdefault(key, {})
    for old in [k for k in _LIVE if k[:2] == key[:2] and k != key]:
        del _LIVE[old]  # an earlier attempt's
    try:
        names = tuple(str(n) for n in spec["limits"]["metrics_files"])
        paths = metricfiles.metrics_paths(spec.get("metrics_file"), str(launch["cwd"]),
                                          names)
    except (KeyError, TypeError):
        return []
    columns: dict[str, list[tuple[float, float, float]]] = {}
    for path in paths:
        reader = readers.get(path)
        if reader is None:
            reader = readers[path] = metricfiles.FileSeries(path, side.marks.get(path),
                                                            side.started)
        reader.read(side.checkpoints.get(path))
        if reader.hint and hints is not None and reader.hint not in hints:
            hints.append(reader.hint)
        for name, rows in reader.rows.items():
            columns.setdefault(name, []).extend(rows)
    return [AttemptSeries(side.attempt, side.started,
                          {n: downsample(r, limit) for n, r in columns.items()},
                          {n: len(r) for n, r in columns.items()})]


# --- code: diff and checkout ---------------------------------------------------


def diff_targets(ctx: Context, first: str, second: Optional[str],
                 outputs: bool = False) -> tuple[str, str, str]:
    """Trees to compare: job vs job, or job vs the work tree now; plus a description.
    With `outputs`: a job's code against the same plus what its run wrote (one job),
    or two jobs' code-and-outputs."""
    a = ctx.store.resolve(first)
    if outputs and second is None:
        return job_tree(ctx, a), outputs_tree(ctx, a), f"job {a.name}'s outputs"
    if second is not None:
        b = ctx.store.resolve(second)
        tree = outputs_tree if outputs else job_tree
        return tree(ctx, a), tree(ctx, b), f"job {a.name} -> job {b.name}"
    now_tree = take_snapshot(ctx.repo).tree
    return job_tree(ctx, a), now_tree, f"job {a.name} -> work tree"


def job_tree(ctx: Context, job: Job) -> str:
    """The code of a job: the tree of its submission commit (checked, never an object
    named by a trailer taken on trust)."""
    return ctx.repo.out("rev-parse", "--verify", "--end-of-options",
                        f"{ctx.store.submission(job)}^{{tree}}")


def outputs_tree(ctx: Context, job: Job) -> str:
    """The code of a job plus what its last ended attempt wrote: its tip's tree."""
    return ctx.repo.out("rev-parse", "--verify", "--end-of-options", f"{job.tip}^{{tree}}")


@dataclass(frozen=True)
class SnapshotDiff:
    """What a job ran beyond its source commit: its submission commit against its parent
    (HEAD at submission; nothing on an unborn branch), as a patch with a summary."""

    files: tuple[tuple[str, Optional[int], Optional[int]], ...]  # path, +lines, -lines
    patch: str  # git's patch of the files not omitted (surrogate escapes for bad bytes)
    omitted: tuple[str, ...] = ()  # large files left out of `patch` (named in `files`)


DIFF_MAX_LINES = 20_000  # changed lines a snapshot diff shows in full


def snapshot_diff(ctx: Context, job: Job, max_lines: int = DIFF_MAX_LINES) -> SnapshotDiff:
    """The code a job ran against its source commit: `git diff-tree` of its submission
    commit (checked: `store.submission`), plumbing that runs no external diff or textconv
    driver. Files are counted first (`--numstat`); when their changed lines add up to more
    than `max_lines`, the largest are left out of the patch and only named, so one
    snapshotted data file cannot make a page of hundreds of megabytes."""
    from git_tq.localjobs import is_oid

    commit = ctx.store.submission(job)
    if not is_oid(commit):  # only object ids reach git's arguments
        raise TqError(f"could not find the code of job {job.name}")
    base = ["diff-tree", "-r", "-M", "--root", "--no-commit-id", "--no-color"]
    out = ctx.repo.git(*base, "--numstat", "-z", "--end-of-options", commit) \
        .stdout.decode(errors="surrogateescape")
    files: list[tuple[str, Optional[int], Optional[int]]] = []
    parts = out.split("\0")
    i = 0
    while i < len(parts) and parts[i]:
        added, deleted, path = (parts[i].split("\t", 2) + ["", ""])[:3]
        if path:
            i += 1
        else:  # a rename: "A\tD\t" then the old and the new path
            path = parts[i + 2] if i + 2 < len(parts) else ""
            i += 3
        files.append((path, int(added) if added.isdigit() else None,
                      int(deleted) if deleted.isdigit() else None))
    size = {path: (a or 0) + (d or 0) for path, a, d in files}
    shown, omitted, total = [], [], 0
    for path in sorted(size, key=size.__getitem__):
        if total + size[path] <= max_lines:
            shown.append(path)
            total += size[path]
        else:
            omitted.append(path)
    patch = ""
    if shown:
        only = ["--", *shown] if omitted else []
        patch = ctx.repo.git("--literal-pathspecs", *base, "-p", "--end-of-options", commit,
                             *only).stdout.decode(errors="surrogateescape")
    return SnapshotDiff(tuple(files), patch, tuple(sorted(omitted)))


def run_diff(ctx: Context, first: str, second: Optional[str], stat: bool,
             paths: Sequence[str], outputs: bool = False) -> int:
    """Show the difference with git's own diff (pager and colour as git decides)."""
    a, b, _ = diff_targets(ctx, first, second, outputs)
    args = ["git", "diff"] + (["--stat"] if stat else []) + ["--end-of-options", a, b, "--",
                                                              *paths]
    return subprocess.call(args, cwd=ctx.repo.cwd)


def _uncommitted(repo: Repo) -> list[str]:
    out = repo.out("status", "--porcelain=v1", "-z")
    return [e for e in out.split("\0") if e]


def checkout(ctx: Context, token: str, *, branch: Optional[str] = None,
             worktree: Optional[str] = None, force: bool = False,
             outputs: bool = False) -> str:
    """Bring a job's code back (with `outputs`: and what its run wrote), submodules and
    nested repositories included; returns a sentence saying where it went.

    This is the user's own checkout, so git runs the repository's hooks; one that
    fails after the checkout is done is named, and the checkout still reported.
    """
    from git_tq import jobtree

    job = ctx.store.resolve(token)
    # Checked, never a trailer taken on trust; the tip holds the code plus the outputs.
    commit = job.tip if outputs else ctx.store.submission(job)
    repo = ctx.repo
    if branch is not None and (branch.startswith("-") or not branch.strip()):
        raise UsageError(f"bad branch name {branch!r}")
    toplevel = repo.require_worktree("git tq checkout")
    tree = outputs_tree(ctx, job) if outputs else job_tree(ctx, job)
    nested = nested_in_tree(repo, tree, toplevel)
    if worktree is not None:
        path = os.path.abspath(worktree)
        if os.path.exists(path) and os.listdir(path):
            raise TqError(f"{worktree} exists and is not empty: give a new path")
        args = ["worktree", "add"] + (["-b", branch] if branch else ["--detach"])
        hook = _git_or_hook_failure(repo, [*args, "--", path, commit],
                                    lambda: os.path.exists(os.path.join(path, ".git")))
        jobtree.checkout_nested(path, nested)
        jobtree.checkout_present(path, _changed_paths(repo, job.source, tree))
        where = f"branch {branch} in {path}" if branch else f"{path} (detached)"
        return f"job {job.name}'s code is checked out at {where}{_nested_note(nested)}{hook}"
    if ctx.store.trust(job) != LOCAL:
        # A record someone else wrote chooses the gitlinks: restore only the
        # submodules this checkout itself tracks, never other nested repositories.
        tracked = set(_gitlinks(repo, "HEAD"))
        nested = tuple(n for n in nested if n[0] in tracked)
    dirty = _uncommitted(repo)
    for path, git_dir, _ in nested:
        dirty += [f"{e[:3]}{path}/{e[3:]}" for e in _uncommitted_nested(toplevel, path, git_dir)]
    if dirty and not force:
        raise DirtyWorkTree(
            f"the work tree has uncommitted changes ({len(dirty)} paths, e.g. {dirty[0][3:]}): "
            "commit or stash them, or pass --force to overwrite them"
        )
    if branch is not None:
        hook = _git_or_hook_failure(
            repo, ["checkout", *(["-f"] if force else []), "-q", "-b", branch, commit, "--"],
            lambda: repo.resolve_ref(f"refs/heads/{branch}") == commit)
        _restore_nested(toplevel, nested)
        return (f"switched to new branch {branch} at job {job.name}'s snapshot ({commit[:10]})"
                f"{_nested_note(nested)}{hook}")
    repo.git("read-tree", "-u", "--reset", "--end-of-options", commit)
    changed = _changed_paths(repo, job.source, tree)
    if changed:  # outside a sparse cone, read-tree neither writes nor replaces them
        data = "".join(f"{p}\0" for p in changed).encode(errors="surrogateescape")
        repo.git("update-index", "--no-skip-worktree", "-z", "--stdin", input=data)
        repo.git("checkout-index", "-f", "-z", "--stdin", input=data)
    _restore_nested(toplevel, nested)
    head = repo.head_commit()
    msg = f"work tree and index of {toplevel} now hold job {job.name}'s code"
    if head != job.source:
        src = job.source[:10] if job.source else "an unborn branch"
        msg += f" (HEAD stays at {head[:10] if head else 'nothing'}; the job ran on {src})"
    return msg + _nested_note(nested)


def _gitlinks(repo: Repo, commit: str) -> list[str]:
    """Paths of the submodules (gitlinks) in a commit; none on an unborn branch."""
    p = repo.git("ls-tree", "-r", "-z", "--end-of-options", commit, check=False)
    return [e.split("\t", 1)[1] for e in p.stdout.decode(errors="surrogateescape").split("\0")
            if e.startswith("160000 ")]


def _uncommitted_nested(toplevel: str, path: str, git_dir: str) -> list[str]:
    """`git status` lines of a nested repository (ignored by the outer one, so the
    outer status does not see its changes)."""
    where = os.path.join(toplevel, path)
    p = run_git(["--git-dir", git_dir, "--work-tree", where, "status", "--porcelain=v1",
                 "-z"], where, env=without_repo_vars(os.environ), check=False)
    return [e for e in p.stdout.decode(errors="surrogateescape").split("\0") if e]


def _changed_paths(repo: Repo, source: Optional[str], tree: str) -> list[str]:
    """The files a snapshot changed or added against its source: the user had them on
    disk, so a sparse checkout of it must have them too."""
    from git_tq.snapshot import empty_tree

    base = f"{source}^{{tree}}" if source else empty_tree(tree)
    out = repo.git("diff-tree", "-r", "-z", "--no-renames", "--name-only",
                   "--diff-filter=AMT", base, tree).stdout.decode(errors="surrogateescape")
    return [p for p in out.split("\0") if p]


def _git_or_hook_failure(repo: Repo, args: Sequence[str], done: Callable[[], bool]) -> str:
    """Run a porcelain git command; if it failed only in a hook after doing its work,
    say which hook (a note for the user); if it failed, raise git's reason."""
    p = repo.git(*args, check=False)
    err = p.stderr.decode(errors="replace")
    if p.returncode == 0:
        return ""
    if done():
        hooks = [h for h in ("post-checkout", "post-index-change", "reference-transaction")
                 if h in err] or ["a hook"]
        last = [ln.strip() for ln in err.splitlines() if ln.strip()]
        return (f"; note: your {hooks[0]} hook failed (exit {p.returncode})"
                + (f": {last[-1]}" if last else ""))
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))),
                 lines[-1] if lines else "failed")
    raise TqError(f"git {args[0]}: {first}")


def _restore_nested(toplevel: str, nested: Sequence[tuple[str, str, str]]) -> None:
    """Put each submodule's snapshot into its index and files (its HEAD stays)."""
    for path, git_dir, commit in nested:
        where = os.path.join(toplevel, path)
        run_git(["--git-dir", git_dir, "--work-tree", where, "read-tree", "-u", "--reset",
                 "--end-of-options", commit], where, env=without_repo_vars(os.environ))


def _nested_note(nested: Sequence[tuple[str, str, str]]) -> str:
    if not nested:
        return ""
    return f", with {len(nested)} nested repositor{'y' if len(nested) == 1 else 'ies'} " \
        f"({', '.join(p for p, _, _ in nested)})"


# --- editing records ---------------------------------------------------------------


def set_note(ctx: Context, token: str, text: Optional[str], *, append: bool = False,
             remove: bool = False) -> Job:
    job = ctx.store.resolve(token)
    if remove:
        ctx.store.remove_note(job)
        return job
    if text is None or not text.strip():
        raise UsageError("empty note: give the text, or --remove to delete the note")
    ctx.store.set_note(job, text, append=append)
    return job




@dataclass(frozen=True)
class Removal:
    job_id: int
    outcome: str  # "cancelled" or "forgotten"


def remove(ctx: Context, tokens: Sequence[str], *, forget: bool = False,
           now: Optional[str] = None) -> list[Removal]:
    """Cancel pending jobs (they leave the queue; their records stay).

    With `forget`, finished jobs' records are deleted instead, and so are job refs at
    missing objects (that is their repair). Every job is checked before anything
    changes, so a bad id changes nothing; forgetting is one ref transaction (all of
    the jobs or none).
    """
    broken: list[BrokenRef] = []
    jobs = {job.id: job for job in resolve_jobs(ctx, tokens,
                                                 broken=broken if forget else None)}
    for job in jobs.values():
        ctx.store.require_ours(job, "forgotten" if forget else "removed")
        if forget and job.state.active:
            raise InvalidTransition(
                f"job {job.id} is {job.state.value}: only finished jobs can be forgotten"
            )
        if not forget and job.state is not State.PENDING:
            hint = ("stop it with `git tq kill`" if job.state.active
                    else "it has finished; `git tq rm --forget` deletes its record")
            raise InvalidTransition(f"job {job.id} is {job.state.value}, not pending: {hint}")
        kept = kept_worktree(ctx, job) if forget else None
        if kept is not None:  # its id may be given again: the worktree must go first
            raise TqError(f"job {job.id}'s worktree {kept.path} is {kept.reason}; take what "
                          f"you need, run `git tq gc --outputs {job.id}`, then forget it")
    done: list[Removal] = []
    if forget:
        logs = [ctx.store.log_path(job) for job in jobs.values()]
        entries = ctx.store.forget(list(jobs.values()), broken)
        done.extend(Removal(b.job_id, "forgotten (its ref was broken)") for b in broken)
        for job, entry, log in zip(jobs.values(), entries, logs):
            ctx.local.drop_spec(entry.submission)
            if os.path.exists(log):
                # Kept, but no longer a job's log: a later job may get this id again.
                os.replace(log, log + ".forgotten")
            done.append(Removal(job.id, "forgotten"))
        return done
    when = now or now_iso()
    for job in jobs.values():
        ctx.store.update(job.id, lambda j: apply_event(j, "cancelled", when,
                                                       detail="removed from the queue"),
                         f"tq: cancel job {job.id}")
        done.append(Removal(job.id, "cancelled"))
    _nudge(ctx)  # the daemon removes their prepared worktrees
    return done


def _nudge(ctx: Context) -> None:
    """Wake the daemon if it runs (never start one): the queue changed."""
    from git_tq import client

    with contextlib.suppress(TqError, OSError):
        client.request(ctx.home, "nudge", timeout=2.0)


def in_gpu_queue(job: Job, gpus: Optional[Sequence[int]]) -> bool:
    """Whether `job` waits in the GPU queue `gpus`: it asks for exactly those GPUs by id
    (`run --gpu`, the console's `use`, or tq.gpu), in any order. A job asking for any N
    GPUs (--gpus N) or for none (--cpu) is in no GPU queue. `gpus` None: every queue."""
    if gpus is None:
        return True
    return job.spec.gpus.ids is not None and sorted(job.spec.gpus.ids) == sorted(gpus)


def pending_jobs(ctx: Context, gpus: Optional[Sequence[int]] = None) -> list[Job]:
    """Our own pending jobs, in queue order: every one, or GPU queue `gpus`'s."""
    entries = ctx.local.entries()
    return [j for j in pending_in_queue_order(ctx.store.list_jobs())
            if in_gpu_queue(j, gpus) and ctx.store.trust(j, entries) == LOCAL]


def purge(ctx: Context, *, gpus: Optional[Sequence[int]] = None,
          only: Optional[Collection[int]] = None, now: Optional[str] = None) -> list[int]:
    """Cancel every pending job, or GPU queue `gpus`'s; with `only`, none but those (the
    ones the user was asked about: a job queued meanwhile stays). Returns their ids."""
    when = now or now_iso()
    cancelled = []
    entries = ctx.local.entries()
    for job in pending_jobs(ctx, gpus):
        if ctx.store.trust(job, entries) != LOCAL or (only is not None and job.id not in only):
            continue  # not ours (never touched), or not among those confirmed
        try:
            ctx.store.update(job.id, lambda j: apply_event(j, "cancelled", when,
                                                           detail="purged from the queue"),
                             f"tq: purge job {job.id}")
            cancelled.append(job.id)
        except InvalidTransition:
            continue  # it started meanwhile
    if cancelled:
        _nudge(ctx)  # the daemon removes their prepared worktrees
    return cancelled


# --- waiting -------------------------------------------------------------------------

WAIT_POLL = 0.1  # the first interval between two readings of the job refs, in seconds
WAIT_POLL_MAX = 1.0  # it grows to this while the jobs run


def jobs_to_wait_for(ctx: Context, tokens: Sequence[str]) -> list[Job]:
    """The jobs `tokens` name (ids, ranges, commits, sweeps, tags), each of them ours:
    a fetched record never runs here, and a tampered one's ending is not recorded, so
    waiting for either could last forever."""
    jobs = resolve_jobs(ctx, tokens)
    entries = ctx.local.entries()
    for job in jobs:
        trust = ctx.store.trust(job, entries)
        if trust == FETCHED:
            raise NotOurs(f"job {job.id} was not submitted here by you (by {job.spec.user}@"
                          f"{job.spec.host}): a fetched job never runs here, so there is "
                          "nothing to wait for")
        if trust == TAMPERED:
            raise NotOurs(f"job {job.id}'s record was changed by someone else (a fetch or a "
                          "hand edit): its ending would not be recorded; see git tq doctor")
    return jobs


def waiting_hint(ctx: Context, jobs: Sequence[Job]) -> Optional[str]:
    """A word for the user when waiting could last until someone starts the daemon."""
    from git_tq import client

    if not any(j.state.active for j in jobs) or client.is_running(ctx.home):
        return None
    return ("the daemon is not running: nothing starts these jobs or records their "
            "endings until `git tq start`")


@dataclass(frozen=True)
class Waited:
    """The jobs waited for as last read (in the order named), and those of them still
    active: none unless the time ran out."""

    views: list[JobView]
    active: list[Job]

    @property
    def unsuccessful(self) -> list[Job]:
        """The jobs that ended otherwise than done (failed, cancelled)."""
        return [v.job for v in self.views if v.job.state.finished and
                v.job.state is not State.DONE]


def wait_for(ctx: Context, jobs: Sequence[Job], *, timeout: Optional[float] = None,
             poll: float = WAIT_POLL, max_poll: float = WAIT_POLL_MAX) -> Waited:
    """Block until every job has ended (done, failed or cancelled), or until `timeout`
    seconds have passed. The refs are read once per interval (one `git for-each-ref`,
    records from the cache), the interval growing from `poll` to `max_poll`."""
    latest = {j.id: j for j in jobs}
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = poll
    while True:
        active = [j for j in latest.values() if j.state.active]
        if not active:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        time.sleep(delay if left is None else min(delay, left))
        delay = min(delay * 1.5, max_poll)
        if len(active) == 1:
            fresh = {active[0].id: ctx.store.load(active[0].id)}
        else:
            fresh = {j.id: j for j in ctx.store.list_jobs()}
        for job in active:
            if job.id not in fresh:  # forgotten (it ended meanwhile), or now unreadable
                raise TqError(f"job {job.id}'s record is gone or unreadable (see "
                              "git tq ls --all)")
            latest[job.id] = fresh[job.id]
    ordered = [latest[j.id] for j in jobs]
    return Waited(_views(ctx, ordered), [j for j in ordered if j.state.active])


def exit_status(job: Job) -> int:
    """The exit status `run --wait` ends with for an ended job, as a shell gives it: 0
    done; the job's own exit code; 128 + the signal that killed it; 1 when it has none
    (never started, lost, cancelled before it ran)."""
    if job.state is State.DONE:
        return 0
    if job.state is State.FAILED:
        if job.signal is not None and job.event != "start-failed":
            return min(128 + job.signal, 255)
        if job.exit_status:
            return job.exit_status
    return 1


def limits_text(job: Job) -> str:
    """`limits     time 2h (ran 1h3m)    retries 1 of 3 used`, for `show`."""
    from git_tq.model import format_duration

    s = job.spec
    ran = format_duration(job.running_seconds(time.time()))
    parts = [f"time {format_duration(s.time_limit)} (ran {ran})"] if s.time_limit else []
    if s.retries:
        parts.append(f"retries {job.retried} of {s.retries} used")
    return "limits     " + "    ".join(parts)


def describe_ending(job: Job) -> str:
    """`job 7 failed (exit 3)`, `job 8 cancelled`, `job 9 still running`."""
    if job.state.active:
        return f"job {job.id} still {job.state.value}"
    if job.state is State.FAILED and job.outcome:
        return f"job {job.id} failed ({job.outcome})"
    return f"job {job.id} {job.state.value}"



# --- logs ----------------------------------------------------------------------------

_BAD_FOLDER_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def log_folder(ctx: Context, folder: Optional[str]) -> str:
    """The absolute path of a folder under the log root; refuses one that would leave it."""
    root = ctx.store.log_root
    if not folder or folder in (".", "/"):
        return root
    if os.path.isabs(folder) or _BAD_FOLDER_CHARS.search(folder):
        raise UsageError(f"bad folder {folder!r}: give a path inside the log root, like "
                         "archived/failed")
    parts = [p for p in folder.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith("-") for p in parts):
        raise UsageError(f"bad folder {folder!r}: it would leave the log root")
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise UsageError(f"bad folder {folder!r}: it would leave the log root")
    return path


def job_log(ctx: Context, token: str) -> tuple[Job, str]:
    """A job and the path of its log (which may not exist yet)."""
    job = ctx.store.resolve(token)
    return job, ctx.store.log_path(job)


def log_to_view(ctx: Context, token: str, *, follow: bool = False) \
        -> tuple[Job, str, Optional[bytes]]:
    """A job, the path of its log, and the copy kept in git when the file is not here
    (deleted, or the job ran elsewhere and its log came with a fetch of
    refs/notes/tq-logs); refused when there is neither. A job that is not ours ran
    elsewhere, if at all: its log file never appears here (following it would wait
    for ever)."""
    job, path = job_log(ctx, token)
    if os.path.exists(path):
        return job, path, None
    trust = ctx.store.trust(job)
    if not (follow and trust == LOCAL and job.state.active):
        stored = ctx.store.stored_log(job)
        if stored is not None:
            return job, path, stored
    if trust != LOCAL:
        raise TqError(f"job {job.name}'s log is not on this machine: the job is {trust} "
                      f"(submitted by {job.spec.user}@{job.spec.host}), and no copy of it "
                      "came in refs/notes/tq-logs")
    if not follow:
        raise TqError(f"job {job.name} has no log yet ({job.state.value}); "
                      f"`git tq view -f {job.id}` waits for it")
    return job, path, None


def follow_log(ctx: Context, token: str, *, from_start: bool = True,
               poll: float = 0.1) -> Iterator[bytes]:
    """The log's content as it grows, until the job has finished and all is read.

    Follows the job across preemption and resume (the same file), and into
    another folder when it is filed with `catg` meanwhile.
    """
    job, path = job_log(ctx, token)
    offset = 0 if from_start else (os.path.getsize(path) if os.path.exists(path) else 0)
    last_check = 0.0
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
            path = ctx.store.log_path(job)  # moved (catg) or not created yet
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        now = time.monotonic()
        if now - last_check > 1.0:
            last_check = now
            job = ctx.store.load(job.id)
            if job.state.finished:
                if os.path.exists(path) and os.path.getsize(path) > offset:
                    continue
                return
            path = ctx.store.log_path(job)
        time.sleep(poll)


@dataclass(frozen=True)
class LogPiece:
    """Bytes of a job's log from `start` to `end`, for a page that follows it."""

    start: int
    end: int  # where the next read starts
    data: bytes
    ended: bool  # the job has finished and nothing more will come
    stored: bool  # read from the copy kept in git (the file is not on this machine)


def log_piece(ctx: Context, job: Job, offset: Optional[int] = None,
              limit: int = 64 * 1024) -> LogPiece:
    """At most `limit` bytes of the job's log from `offset` (None: its last `limit`
    bytes), from the file while it is here, else from the copy kept in git; never more
    than `limit` bytes are read. An offset past the end (a log filed and replaced)
    starts again from the tail."""
    path = ctx.store.log_path(job)
    ended = job.state.finished
    if path:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                start = max(0, size - limit) if offset is None or offset > size else offset
                fh.seek(start)
                data = fh.read(limit)
            return LogPiece(start, start + len(data), data,
                            ended and start + len(data) >= size, False)
        except (FileNotFoundError, NotADirectoryError):
            pass
    stored = ctx.store.stored_log(job) if ended or job.origin is not None else None
    if stored is None:
        return LogPiece(0, 0, b"", ended, False)
    start = max(0, len(stored) - limit) if offset is None or offset > len(stored) else offset
    data = stored[start:start + limit]
    return LogPiece(start, start + len(data), data, start + len(data) >= len(stored), True)


@dataclass(frozen=True)
class LogEntry:
    number: int  # what `view N` in the console takes
    view: JobView
    path: str


@dataclass(frozen=True)
class LogFolder:
    folder: str  # relative to the log root, '' for the root
    folders: list[str]
    entries: list[LogEntry]


def log_tree(ctx: Context, folder: Optional[str] = None) -> LogFolder:
    """A folder of the log tree: its sub-folders, then its logs numbered by job id."""
    path = log_folder(ctx, folder)
    if not os.path.isdir(path):
        if path == ctx.store.log_root:
            return LogFolder("", [], [])
        raise UsageError(f"no log folder {folder!r} (see git tq hist)")
    names = sorted(os.listdir(path))
    folders = [n for n in names if os.path.isdir(os.path.join(path, n))]
    jobs = {j.id: j for j in ctx.store.list_jobs()}
    notes = ctx.store.all_notes()
    keys = _note_keys(ctx, list(jobs.values()), ctx.local.entries(), notes)
    rel = os.path.relpath(path, ctx.store.log_root)
    rel = "" if rel == "." else rel.replace(os.sep, "/")
    logs = []
    for name in names:
        head = name.split("-", 1)[0]
        if name.endswith(".log") and head.isascii() and head.isdigit() and int(head) in jobs:
            job = jobs[int(head)]
            full = os.path.join(path, name)
            logs.append(JobView(job, notes.get(keys[job.name]), full, rel or None))
    logs.sort(key=lambda v: v.job.id)
    return LogFolder(rel, folders, [LogEntry(i, v, v.log) for i, v in enumerate(logs, 1)])


def file_log(ctx: Context, token: str, folder: str) -> str:
    """Move a job's log into `folder` (created as needed); the new path.

    A running job's log keeps growing in its new place (its writer holds the
    open file); a job that has no log yet gets an empty one there to write to.
    """
    target_dir = log_folder(ctx, folder)
    if target_dir == ctx.store.log_root and folder not in ("", ".", "/"):
        raise UsageError("give a folder")
    from git_tq.home import ensure_private_tree, open_private

    job, path = job_log(ctx, token)
    ctx.store.require_ours(job, "filed")  # its log name would come from their record
    # Logs hold whatever jobs print: folders 0700 from <common>/tq down, files 0600.
    ensure_private_tree(os.path.dirname(ctx.store.log_root), target_dir)
    target = os.path.join(target_dir, os.path.basename(path))
    if os.path.abspath(path) == os.path.abspath(target):
        return target
    if os.path.exists(path):
        os.rename(path, target)
    os.close(open_private(target))  # created, or tightened if it was looser
    _prune_empty_folders(ctx, os.path.dirname(path))
    return target


def _prune_empty_folders(ctx: Context, folder: str) -> None:
    root = os.path.realpath(ctx.store.log_root)
    folder = os.path.realpath(folder)
    while folder != root and folder.startswith(root + os.sep):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


def remove_log(ctx: Context, token: str) -> str:
    """Delete a job's log file and the copy kept in git (never its record); what was
    removed."""
    job, path = job_log(ctx, token)
    ctx.store.require_ours(job, "changed")  # a log here under its id is not its log
    if job.state.active and job.state is not State.PENDING:
        raise InvalidTransition(f"job {job.id} is {job.state.value}: its log is still being "
                                "written (kill it first)")
    stored = ctx.store.stored_log(job) is not None
    if not os.path.exists(path) and not stored:
        raise TqError(f"job {job.id} has no log")
    if stored:
        ctx.store.remove_stored_log(job)
    if os.path.exists(path):
        os.unlink(path)
        _prune_empty_folders(ctx, os.path.dirname(path))
        return path + (" and its copy in git" if stored else "")
    return f"job {job.id}'s log kept in git"


# --- the dashboard -----------------------------------------------------------------


@dataclass(frozen=True)
class BoardJob:
    """A job on the dashboard, with the repository it belongs to."""

    repo: str  # the repository's name
    here: bool  # in the repository `top` runs in
    job: Job
    last_line: str = ""  # a running job's last log line (of the repositories shown)
    reason: Optional[str] = None  # why a pending job waits (waiting_reasons)


@dataclass(frozen=True)
class GpuRow:
    id: int
    details: dict[str, Any]  # name, util, mem_used, mem_total when NVML knows them
    holders: list[BoardJob]  # our jobs on it, from every repository of the tq home
    foreign: Optional[str]


@dataclass(frozen=True)
class Dashboard:
    gpus: list[GpuRow]
    running: list[BoardJob]
    queue: list[BoardJob]
    finished: list[BoardJob]  # most recent first
    daemon: Optional[dict[str, Any]]
    everywhere: bool = False  # the jobs of every repository of the tq home (top --all)
    pause: Pause = field(default_factory=Pause)  # git tq pause


def last_line(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - limit))
            lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def repo_name(common_dir: str) -> str:
    """A repository's short name: its work tree's folder (`proj` for proj/.git)."""
    path = os.path.realpath(common_dir)
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == ".git" else name


def dashboard(ctx: Context, recent: int = 5, *, everywhere: bool = False) -> Dashboard:
    """What `git tq top` shows: GPUs and what holds them, running jobs, the queue and
    recent finishes. The GPUs are shared by every repository of the tq home (one daemon
    schedules them all), so their holders come from all of them; the job panels show this
    repository's jobs, or every repository's with `everywhere`. Only our own jobs count:
    a record that is not ours says nothing about this machine."""
    status = daemon_status(ctx.home)
    foreign = {int(k): v for k, v in (status or {}).get("foreign", {}).items()}
    details = gpu_inventory.gpu_details()
    try:
        ids = gpu_inventory.machine_gpus(ctx.config)
    except TqError:
        ids = ()
    here = os.path.realpath(ctx.repo.common_dir)
    sources = [ctx] + [Context.at_common_dir(common, ctx.home)
                       for common in ctx.home.registered_repos()
                       if os.path.realpath(common) != here and os.path.isdir(common)]
    running: list[BoardJob] = []
    shown: list[BoardJob] = []
    for c in sources:
        is_here = c is ctx
        try:
            entries = c.local.entries()
            jobs = [j for j in c.store.list_jobs() if c.store.trust(j, entries) == LOCAL]
            logs = c.store.find_logs() if is_here or everywhere else {}
        except (TqError, OSError):
            continue  # a repository that went away or broke: nothing of it to show
        name = repo_name(c.repo.common_dir)
        waits = waiting_reasons(c, jobs) if is_here or everywhere else {}
        for j in jobs:
            active = j.state in (State.RUNNING, State.STOPPING)
            if not (is_here or everywhere):
                if active:
                    running.append(BoardJob(name, False, j))
                continue
            board_job = BoardJob(name, is_here, j,
                                 last_line(c.store.log_path(j, logs)) if active else "",
                                 waits.get(j.id, ((), None))[1])
            (running if active else shown).append(board_job)
    rows = [GpuRow(g, dict(details.get(g, {})),
                   [b for b in running if g in (b.job.assigned_gpus or ())], foreign.get(g))
            for g in ids]
    finished = sorted((b for b in shown if b.job.state.finished and b.job.ended_at),
                      key=lambda b: b.job.ended_at or "", reverse=True)[:recent]
    queue = sorted((b for b in shown if b.job.state is State.PENDING),
                   key=lambda b: (b.job.spec.priority, b.job.spec.submitted_at, b.job.id))
    return Dashboard(rows, [b for b in running if b.here or everywhere], queue, finished,
                     status, everywhere, queue_pause(ctx.home))


def refs_signature(ctx: Context) -> str:
    """Changes whenever any job's record changes (for redrawing on events)."""
    return ctx.repo.out("for-each-ref", "--format=%(objectname)", "refs/tq/jobs/")


# --- sharing runs between machines ----------------------------------------------------


def this_origin(ctx: Context) -> str:
    """This machine's origin, `user@host` (`tq.origin`, checked; else the user and the
    short host name)."""
    from git_tq import origins

    return origins.this_origin(ctx.config, user_name())


def push_jobs(ctx: Context, remote: Optional[str], *, dry_run: bool = False) -> Shared:
    """`git tq push`: this machine's jobs, notes and stored logs to `remote` (see
    sharing.push); a sharing.Shared."""
    from git_tq import sharing

    return sharing.push(ctx.store, this_origin(ctx), sharing.find_remote(ctx.repo, remote),
                        dry_run=dry_run)


def fetch_jobs(ctx: Context, remote: Optional[str], *, dry_run: bool = False) -> Shared:
    """`git tq fetch`: every other machine's jobs, and the notes merged (sharing.fetch);
    a sharing.Shared."""
    from git_tq import sharing

    return sharing.fetch(ctx.store, this_origin(ctx), sharing.find_remote(ctx.repo, remote),
                         dry_run=dry_run)


def origin_filter(ctx: Context, mine: bool, origin: Optional[str]) \
        -> Optional[Callable[[Optional[str]], bool]]:
    """Which origins `--mine` / `--origin O` keep (a job's origin None: local); None: all."""
    from git_tq import origins

    if mine and origin is not None:
        raise UsageError("--mine and --origin exclude each other")
    if mine:
        return lambda o: o is None
    if origin is None:
        return None
    wanted = origins.check_origin(origin)
    here = this_origin(ctx)
    return lambda o: o == wanted or (o is None and wanted == here)
