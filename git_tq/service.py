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
from typing import TYPE_CHECKING, Any, Callable, Optional

from git_tq import gpus as gpu_inventory
from git_tq.errors import (
    BadSpec,
    DirtyWorkTree,
    InvalidTransition,
    NotOurs,
    TqError,
    UsageError,
)
from git_tq.gitrepo import Repo, discover, run_git, without_repo_vars
from git_tq.home import Home, default_home
from git_tq.lifecycle import apply_event, now_iso
from git_tq.localjobs import FETCHED, LOCAL, TAMPERED, LedgerEntry, LocalJobs, LocalSpec
from git_tq.model import (
    DEFAULT_GRACE,
    DEFAULT_PRIORITY,
    DEFAULT_STOP_SIGNAL,
    GpuRequest,
    Job,
    JobSpec,
    State,
)
from git_tq.snapshot import Snapshot, nested_in_tree, take_snapshot
from git_tq.store import JobStore, Unreadable, identity_env, pending_in_queue_order

if TYPE_CHECKING:
    from git_tq.jobtree import Kept

_SHELL_CHARS = re.compile(r"[\s|&;<>()$`\\\"'*?~#=]")
_BAD_TAG = re.compile(r"[\x00-\x20/\\\x7f]")


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", str(os.getuid()))



@dataclass
class Context:
    """An opened repository with its settings, job store and tq home."""

    repo: Repo
    config: dict[str, str]
    store: JobStore
    home: Home

    @classmethod
    def open(cls, cwd: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) \
            -> Context:
        environ = os.environ if environ is None else environ
        repo = discover(cwd)
        config = repo.config(r"^(tq|user)\.")  # the tq settings and the identity
        home = Home(default_home(config, environ))
        store = JobStore(repo, identity_env(config, without_repo_vars(environ)),
                         LocalJobs(home.path, repo.common_dir))
        return cls(repo, config, store, home)

    @classmethod
    def at_common_dir(cls, common: str, home: Home) -> Context:
        """Another repository registered in `home`, by its common git dir (no work tree:
        for reading its jobs, as the daemon does)."""
        repo = Repo(toplevel=None, git_dir=common, common_dir=common, prefix="",
                    index_path=os.path.join(common, "index"))
        config = repo.config(r"^(tq|user)\.")
        store = JobStore(repo, identity_env(config, without_repo_vars(os.environ)),
                         LocalJobs(home.path, common))
        return cls(repo, config, store, home)

    @property
    def local(self) -> LocalJobs:
        assert self.store.local is not None
        return self.store.local


# --- submit ------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitRequest:
    command: tuple[str, ...]
    priority: int = DEFAULT_PRIORITY
    grace: int = DEFAULT_GRACE
    tag: Optional[str] = None
    env: Optional[str] = None
    gpu_ids: Optional[str] = None  # --gpu 0,1
    gpu_count: Optional[int] = None  # --gpus N
    cpu: bool = False  # --cpu
    shell: Optional[bool] = None  # None: decide from the command's shape
    stop_signal: Optional[str] = None  # --signal; None: tq.stopSignal, else SIGTERM


@dataclass(frozen=True)
class Submitted:
    job: Job
    snapshot: Snapshot
    warnings: tuple[str, ...] = ()
    daemon_hint: Optional[str] = None  # set when no daemon will run the job


def gpu_request(req: SubmitRequest, config: Mapping[str, str]) -> GpuRequest:
    chosen = sum(x for x in (req.gpu_ids is not None, req.gpu_count is not None, req.cpu))
    if chosen > 1:
        raise UsageError("give only one of --gpu, --gpus and --cpu")
    if req.cpu:
        return GpuRequest.any(0)
    if req.gpu_ids is not None:
        return GpuRequest.exact(gpu_inventory.parse_gpu_ids(req.gpu_ids))
    if req.gpu_count is not None:
        if req.gpu_count < 0:
            raise BadSpec("--gpus takes a count of 0 or more")
        return GpuRequest.any(req.gpu_count)
    default = config.get("tq.gpu", "").strip()
    if not default:
        return GpuRequest.any(1)
    try:
        if default == "cpu" or default.startswith("any:"):
            return GpuRequest.decode(default)
        return GpuRequest.exact(gpu_inventory.parse_gpu_ids(default))
    except (ValueError, BadSpec):
        raise BadSpec(
            f"git config tq.gpu is {default!r}: use cpu, any:N, or GPU ids like 0,1"
        ) from None


def stop_settings(config: Mapping[str, str], given: Optional[str] = None) -> tuple[str, str]:
    """How a new job is stopped: (signal name, "main" or "group"), from --signal or
    tq.stopSignal, and tq.stopTarget."""
    from git_tq.model import STOP_TARGETS, stop_signal_name

    if given is not None:
        try:
            name = stop_signal_name(given)
        except ValueError as exc:
            raise UsageError(f"--signal: {exc}") from None
    else:
        configured = config.get("tq.stopsignal", "").strip()
        try:
            name = stop_signal_name(configured) if configured else DEFAULT_STOP_SIGNAL
        except ValueError as exc:
            raise BadSpec(f"git config tq.stopSignal: {exc}") from None
    target = config.get("tq.stoptarget", "").strip().lower() or "main"
    if target not in STOP_TARGETS:
        raise BadSpec(f"git config tq.stopTarget is {target[:20]!r}: use main or group")
    return name, target


def gpu_queue(ctx: Context, text: str) -> tuple[int, ...]:
    """The GPU ids of a queue (`use 0,1` in the console), refused as `run --gpu` refuses
    them: malformed, or naming a GPU this machine does not have."""
    ids = gpu_inventory.parse_gpu_ids(text)
    gpu_inventory.check_request(GpuRequest.exact(ids), gpu_inventory.machine_gpus(ctx.config))
    return ids


def validate_tag(tag: Optional[str]) -> Optional[str]:
    if tag is None:
        return None
    if not tag or len(tag) > 64 or _BAD_TAG.search(tag) or tag.startswith((".", "-")):
        raise BadSpec(
            f"bad tag {tag!r}: use up to 64 characters without spaces or slashes, "
            "not starting with . or -"
        )
    return tag


def resolve_env_option(env: Optional[str], cwd: str) -> Optional[str]:
    """A conda env name is kept as given; a path must exist and is made absolute."""
    if env is None:
        return None
    if not env.strip() or "\n" in env:
        raise BadSpec("empty or multi-line -e: give a conda env name or an env path")
    if "/" in env or env.startswith(("~", ".")):
        path = os.path.abspath(os.path.join(cwd, os.path.expanduser(env)))
        if not os.path.isdir(path):
            raise BadSpec(f"environment {env!r} is not a directory (give a venv or conda prefix)")
        return path
    return env


def check_env(env: str, cwd: str) -> tuple[str, Optional[str]]:
    """An environment chosen once for many jobs (the console's `env NAME`): a path is
    checked and made absolute as `run -e` does (refused if it is not a directory); a conda
    env name is looked up, and a warning comes back when no conda, mamba or micromamba
    knows it (jobs given it would fail to start)."""
    resolved = resolve_env_option(env, cwd)
    assert resolved is not None
    if "/" in resolved:
        return resolved, None
    from git_tq import envs

    try:
        envs.conda_prefix(resolved, os.environ)
    except TqError as exc:
        return resolved, f"{exc}: jobs run with it will not start"
    except (OSError, subprocess.SubprocessError) as exc:
        return resolved, f"could not ask conda about {resolved!r}: {exc}"
    return resolved, None


def submit(ctx: Context, req: SubmitRequest, *, environ: Optional[Mapping[str, str]] = None,
           now: Optional[str] = None) -> Submitted:
    """Snapshot the work tree and record a pending job."""
    if not req.command or not any(w.strip() for w in req.command):
        raise UsageError("no command given: git tq run [options] [--] COMMAND...")
    if req.grace < 0:
        raise BadSpec("grace period (-g) must be 0 seconds or more")
    stop_signal, stop_target = stop_settings(ctx.config, req.stop_signal)
    toplevel = ctx.repo.require_worktree("git tq run")
    if "\n" in ctx.repo.prefix:
        raise BadSpec("the current directory's name contains a newline; run from elsewhere")
    request = gpu_request(req, ctx.config)
    if not request.cpu_only:
        gpu_inventory.check_request(request, gpu_inventory.machine_gpus(ctx.config))
    command = tuple(req.command)
    shell = req.shell
    if shell is None:
        shell = len(command) == 1 and bool(_SHELL_CHARS.search(command[0]))
    if shell and len(command) > 1:
        command = (" ".join(command),)
    spec = JobSpec(
        command=command,
        shell=shell,
        priority=req.priority,
        grace=req.grace,
        tag=validate_tag(req.tag),
        env=resolve_env_option(req.env, os.path.join(toplevel, ctx.repo.prefix)),
        gpus=request,
        cwd=ctx.repo.prefix,
        submitted_at=now or now_iso(),
        user=_user_name(),
        host=os.uname().nodename,
        stop_signal=stop_signal,
        stop_target=stop_target,
    )
    snap = take_snapshot(ctx.repo)
    if spec.cwd and ctx.repo.resolve_object(f"{snap.tree}:{spec.cwd}") is None:
        raise BadSpec(f"the current directory {spec.cwd}/ is not in the snapshot (it is empty "
                      "or ignored), so the job could not start there: run from a directory "
                      "with files git sees")
    draft = Job(id=0, spec=spec, state=State.PENDING, event="submitted", attempt=0,
                snapshot="", source=snap.source, changes=snap.changes)
    environ = os.environ if environ is None else environ
    captured = without_repo_vars(environ)
    ctx.home.register_repo(ctx.repo.common_dir)

    nested = tuple((n.path, n.git_dir, n.commit) for n in snap.nested)

    def save_local(commit: str) -> None:
        ctx.local.save_spec(LocalSpec(commit, spec.command, spec.shell, spec.cwd, spec.env,
                                      toplevel, captured, nested, snap.outside_cone,
                                      spec.stop_signal, spec.stop_target))

    job = ctx.store.create(draft, snap.tree, before_publish=save_local,
                           after_lost_race=ctx.local.drop_spec)
    return Submitted(job, snap, snap.warnings, wake_daemon(ctx))


def _flag(ctx: Context, name: str, default: bool) -> bool:
    value = ctx.config.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("true", "yes", "on", "1")


def wake_daemon(ctx: Context) -> Optional[str]:
    """Nudge the daemon (starting it unless tq.autostart is false); a hint if it is off."""
    from git_tq import client

    return client.nudge(ctx.home, autostart=_flag(ctx, "tq.autostart", True))


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
    from git_tq import client

    try:
        return client.request(home, "status")
    except client.DaemonNotRunning:
        return None


def run_daemon(home: Home) -> None:
    from git_tq import daemon

    daemon.run_foreground(home)


def kill_jobs(ctx: Context, tokens: Sequence[str], *, now: bool = False) -> list[int]:
    """Stop running jobs (stop signal, grace, SIGKILL; `now` skips the grace): cancelled.

    Pending jobs among them are cancelled directly.
    """
    from git_tq import client

    jobs = [ctx.store.resolve(t) for t in parse_job_tokens(tokens)]
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
        raise InvalidTransition(f"job {old.id} is {old.state.value}; requeue takes a finished job")
    trust = ctx.store.trust(old)
    toplevel = ctx.repo.require_worktree("git tq requeue")
    if trust != LOCAL and not command:
        raise UsageError(f"job {old.id} was not written here by you ({trust}): its command is "
                         f"not trusted; give one: git tq requeue {old.id} -- COMMAND...")
    spec = dataclasses.replace(old.spec, submitted_at=now or now_iso(), user=_user_name(),
                               host=os.uname().nodename)
    if command:
        if not any(w.strip() for w in command):
            raise UsageError("empty command")
        shell = len(command) == 1 and bool(_SHELL_CHARS.search(command[0]))
        spec = dataclasses.replace(spec, command=tuple(command), shell=shell,
                                   cwd=ctx.repo.prefix if trust != LOCAL else spec.cwd)
    if trust != LOCAL:
        # Nothing of theirs steers it: our defaults for priority, grace, stop and
        # tag; only the GPU request is kept, checked against this machine's GPUs.
        stop_signal, stop_target = stop_settings(ctx.config)
        spec = dataclasses.replace(spec, env=None, tag=None, priority=DEFAULT_PRIORITY,
                                   grace=DEFAULT_GRACE, stop_signal=stop_signal,
                                   stop_target=stop_target)
        if not spec.gpus.cpu_only:
            gpu_inventory.check_request(spec.gpus, gpu_inventory.machine_gpus(ctx.config))
    detail = f"requeued from job {old.id}" if trust == LOCAL else \
        f"code of job {old.id} ({trust}, by {old.spec.user}@{old.spec.host})"
    draft = Job(id=0, spec=spec, state=State.PENDING, event="submitted", attempt=0,
                snapshot="", source=old.source, changes=old.changes,
                detail=" ".join(detail.split()))
    tree = ctx.repo.out("rev-parse", "--verify", "--end-of-options", f"{old.tip}^{{tree}}")
    captured = without_repo_vars(os.environ if environ is None else environ)
    ctx.home.register_repo(ctx.repo.common_dir)

    nested = nested_in_tree(ctx.repo, tree, toplevel)

    def save_local(commit: str) -> None:
        ctx.local.save_spec(LocalSpec(commit, spec.command, spec.shell, spec.cwd, spec.env,
                                      toplevel, captured, nested, (), spec.stop_signal,
                                      spec.stop_target))

    job = ctx.store.create(draft, tree, before_publish=save_local,
                           after_lost_race=ctx.local.drop_spec)
    snap = Snapshot(tree, old.source, old.changes, ())
    notes = () if trust == LOCAL else (
        f"job {old.id} was {trust}: job {job.id} runs its code with your command and your "
        "environment",)
    return Submitted(job, snap, notes, wake_daemon(ctx))


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
    jobs = {j.id: j for j in ctx.store.list_jobs()}
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
                record = jobtree.check_kept(path, entry.submission if entry else "")
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
    return Collected(removed, left)


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

    def to_json(self) -> dict[str, Any]:
        j, s = self.job, self.job.spec
        gpus = j.assigned_gpus or s.gpus.ids
        return {
            "id": j.id,
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
            "stop": j.stop,
            "stop_seconds": j.stop_seconds,
        }


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
            for _, r in lifecycle if r.stop is not None]


def _views(ctx: Context, jobs: Iterable[Job]) -> list[JobView]:
    notes = ctx.store.all_notes()
    logs = ctx.store.find_logs()
    entries = ctx.local.entries()
    jobs = list(jobs)
    keys = _note_keys(ctx, jobs, entries, notes)
    views = []
    for job in jobs:
        log = ctx.store.log_path(job, logs)
        category = ctx.store.category(log) if job.id in logs else None
        trust = ctx.store.trust(job, entries)
        views.append(JobView(job, notes.get(keys[job.id]), log, category, trust,
                             job_pid(ctx, job, trust)))
    return views


def _note_keys(ctx: Context, jobs: Sequence[Job], entries: Mapping[int, LedgerEntry],
               notes: Mapping[str, str]) -> dict[int, str]:
    """The commit each job's note hangs on: the ledger's submission for ours; for a
    record not ours its recorded submission only if that commit is a record of the
    same job (a fetched job 20 that names job 2's submission must not show job 2's
    note), else its tip."""
    keys = {}
    others = []
    for job in jobs:
        entry = entries.get(job.id)
        if entry is not None and entry.trusts(job.tip):
            keys[job.id] = entry.submission
        else:
            keys[job.id] = job.tip
            if job.snapshot in notes:
                others.append(job)
    keys.update(ctx.store.submissions_named(others))
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


def _parse_states(states: Sequence[str]) -> set[State]:
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


def list_jobs(ctx: Context, *, include_finished: bool = False, states: Sequence[str] = (),
              tags: Sequence[str] = ()) -> list[JobView]:
    return list_queue(ctx, include_finished=include_finished, states=states, tags=tags).views


def list_queue(ctx: Context, *, include_finished: bool = False, states: Sequence[str] = (),
               tags: Sequence[str] = ()) -> JobList:
    """Jobs in queue order (running, then pending by priority); every job by id with --all;
    plus the refs that hold no readable record."""
    wanted = _parse_states(states)
    listing = ctx.store.listing()
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
    return JobList(_views(ctx, jobs), listing.unreadable)


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
    view = JobView(job, ctx.store.note(job), log,
                   ctx.store.category(log) if job.id in logs else None, trust,
                   job_pid(ctx, job, trust))
    from git_tq import jobtree

    links = jobtree.outside_links([], ctx.repo.cwd, job.tip)
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
    views = _views(ctx, ctx.store.list_jobs())
    by_source: dict[Optional[str], list[JobView]] = {}
    for v in views:
        by_source.setdefault(v.job.source, []).append(v)
    revs = list(revisions)
    entries: list[HistoryEntry] = []
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
            commit = parts[i].lstrip("\n")
            entries.append(HistoryEntry(commit, parts[i + 1], parts[i + 2], parts[i + 3],
                                        by_source.get(commit, [])))
    if not revisions and None in by_source:
        entries.append(HistoryEntry(None, "(unborn)", "jobs submitted before the first commit",
                                    "", by_source[None]))
    return entries


# --- code: diff and checkout ---------------------------------------------------


def diff_targets(ctx: Context, first: str, second: Optional[str]) -> tuple[str, str, str]:
    """Trees to compare: job vs job, or job vs the work tree now; plus a description."""
    a = ctx.store.resolve(first)
    if second is not None:
        b = ctx.store.resolve(second)
        return job_tree(ctx, a), job_tree(ctx, b), f"job {a.id} -> job {b.id}"
    now_tree = take_snapshot(ctx.repo).tree
    return job_tree(ctx, a), now_tree, f"job {a.id} -> work tree"


def job_tree(ctx: Context, job: Job) -> str:
    """The code of a job: the tree of its record's commit (every commit of a job has the
    submission's tree), never an object named by a trailer."""
    return ctx.repo.out("rev-parse", "--verify", "--end-of-options", f"{job.tip}^{{tree}}")


def run_diff(ctx: Context, first: str, second: Optional[str], stat: bool,
             paths: Sequence[str]) -> int:
    """Show the difference with git's own diff (pager and colour as git decides)."""
    a, b, _ = diff_targets(ctx, first, second)
    args = ["git", "diff"] + (["--stat"] if stat else []) + ["--end-of-options", a, b, "--",
                                                              *paths]
    return subprocess.call(args, cwd=ctx.repo.cwd)


def _uncommitted(repo: Repo) -> list[str]:
    out = repo.out("status", "--porcelain=v1", "-z")
    return [e for e in out.split("\0") if e]


def checkout(ctx: Context, token: str, *, branch: Optional[str] = None,
             worktree: Optional[str] = None, force: bool = False) -> str:
    """Bring a job's code back, submodules and nested repositories included; returns a
    sentence saying where it went.

    This is the user's own checkout, so git runs the repository's hooks; one that
    fails after the checkout is done is named, and the checkout still reported.
    """
    from git_tq import jobtree

    job = ctx.store.resolve(token)
    commit = ctx.store.submission(job)  # checked, never a trailer taken on trust
    repo = ctx.repo
    if branch is not None and (branch.startswith("-") or not branch.strip()):
        raise UsageError(f"bad branch name {branch!r}")
    toplevel = repo.require_worktree("git tq checkout")
    tree = job_tree(ctx, job)
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
        return f"job {job.id}'s code is checked out at {where}{_nested_note(nested)}{hook}"
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
        return (f"switched to new branch {branch} at job {job.id}'s snapshot ({commit[:10]})"
                f"{_nested_note(nested)}{hook}")
    repo.git("read-tree", "-u", "--reset", "--end-of-options", commit)
    changed = _changed_paths(repo, job.source, tree)
    if changed:  # outside a sparse cone, read-tree neither writes nor replaces them
        data = "".join(f"{p}\0" for p in changed).encode(errors="surrogateescape")
        repo.git("update-index", "--no-skip-worktree", "-z", "--stdin", input=data)
        repo.git("checkout-index", "-f", "-z", "--stdin", input=data)
    _restore_nested(toplevel, nested)
    head = repo.head_commit()
    msg = f"work tree and index of {toplevel} now hold job {job.id}'s code"
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


def parse_job_tokens(tokens: Sequence[str]) -> list[str]:
    """`1 3 5` or `1,3,5` (or both) -> ['1', '3', '5']."""
    result: list[str] = []
    for token in tokens:
        result.extend(t for t in token.split(",") if t.strip())
    if not result:
        raise UsageError("no job given")
    return result


@dataclass(frozen=True)
class Removal:
    job_id: int
    outcome: str  # "cancelled" or "forgotten"


def remove(ctx: Context, tokens: Sequence[str], *, forget: bool = False,
           now: Optional[str] = None) -> list[Removal]:
    """Cancel pending jobs (they leave the queue; their records stay).

    With `forget`, finished jobs' records are deleted instead. Every job is
    checked before anything changes, so a bad id changes nothing.
    """
    jobs = {}
    for token in parse_job_tokens(tokens):
        job = ctx.store.resolve(token)
        jobs[job.id] = job
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
                          f"you need, run `git tq gc --kept {job.id}`, then forget it")
    when = now or now_iso()
    done = []
    for job in jobs.values():
        if forget:
            log = ctx.store.log_path(job)
            entry = ctx.store.forget(job)
            ctx.local.drop_spec(entry.submission)
            if os.path.exists(log):
                # Kept, but no longer a job's log: a later job may get this id again.
                os.replace(log, log + ".forgotten")
            done.append(Removal(job.id, "forgotten"))
        else:
            ctx.store.update(job.id, lambda j: apply_event(j, "cancelled", when,
                                                           detail="removed from the queue"),
                             f"tq: cancel job {job.id}")
            done.append(Removal(job.id, "cancelled"))
    if not forget:
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


def log_to_view(ctx: Context, token: str, *, follow: bool = False) -> tuple[Job, str]:
    """A job and its log, for `view`: refused when the log is not here to read. A job
    that is not ours (fetched, tampered) ran elsewhere, if at all: its log is not on this
    machine, and never will be (following it would wait for ever)."""
    job, path = job_log(ctx, token)
    if os.path.exists(path):
        return job, path
    trust = ctx.store.trust(job)
    if trust != LOCAL:
        raise TqError(f"job {job.id}'s log is not on this machine: the job is {trust} "
                      f"(submitted by {job.spec.user}@{job.spec.host}), and a log stays "
                      "where its job ran")
    if not follow:
        raise TqError(f"job {job.id} has no log yet ({job.state.value}); "
                      f"`git tq view -f {job.id}` waits for it")
    return job, path


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
            logs.append(JobView(job, notes.get(keys[job.id]), full, rel or None))
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
    """Delete a job's log file (never its record); the path removed."""
    job, path = job_log(ctx, token)
    ctx.store.require_ours(job, "changed")  # a log here under its id is not its log
    if job.state.active and job.state is not State.PENDING:
        raise InvalidTransition(f"job {job.id} is {job.state.value}: its log is still being "
                                "written (kill it first)")
    if not os.path.exists(path):
        raise TqError(f"job {job.id} has no log yet")
    os.unlink(path)
    _prune_empty_folders(ctx, os.path.dirname(path))
    return path


# --- the dashboard -----------------------------------------------------------------


@dataclass(frozen=True)
class BoardJob:
    """A job on the dashboard, with the repository it belongs to."""

    repo: str  # the repository's name
    here: bool  # in the repository `top` runs in
    job: Job
    last_line: str = ""  # a running job's last log line (of the repositories shown)


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
        for j in jobs:
            active = j.state in (State.RUNNING, State.STOPPING)
            if not (is_here or everywhere):
                if active:
                    running.append(BoardJob(name, False, j))
                continue
            board_job = BoardJob(name, is_here, j,
                                 last_line(c.store.log_path(j, logs)) if active else "")
            (running if active else shown).append(board_job)
    rows = [GpuRow(g, dict(details.get(g, {})),
                   [b for b in running if g in (b.job.assigned_gpus or ())], foreign.get(g))
            for g in ids]
    finished = sorted((b for b in shown if b.job.state.finished and b.job.ended_at),
                      key=lambda b: b.job.ended_at or "", reverse=True)[:recent]
    queue = sorted((b for b in shown if b.job.state is State.PENDING),
                   key=lambda b: (b.job.spec.priority, b.job.spec.submitted_at, b.job.id))
    return Dashboard(rows, [b for b in running if b.here or everywhere], queue, finished,
                     status, everywhere)


def refs_signature(ctx: Context) -> str:
    """Changes whenever any job's record changes (for redrawing on events)."""
    return ctx.repo.out("for-each-ref", "--format=%(objectname)", "refs/tq/jobs/")
