"""Submitting jobs (`git tq run`): validating a request, snapshotting the work tree
and recording one pending job, or a sweep's jobs from one snapshot.

`git tq run` imports this module and `context`, not `service`: the other actions'
record types cost ~20 ms of start-up (dataclass set-up) that a submission need not pay.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq import backends
from git_tq import gpus as gpu_inventory
from git_tq.context import Context, user_name, wake_daemon
from git_tq.errors import BadSpec, NotOurs, TqError, UsageError
from git_tq.gitrepo import without_repo_vars
from git_tq.joblists import is_id, resolve_jobs
from git_tq.lifecycle import now_iso
from git_tq.localjobs import LOCAL, LocalSpec
from git_tq.model import (
    DEFAULT_GRACE,
    DEFAULT_PRIORITY,
    DEFAULT_STOP_SIGNAL,
    GpuRequest,
    Job,
    JobSpec,
    State,
)
from git_tq.snapshot import Snapshot, take_snapshot

SHELL_CHARS = re.compile(r"[\s|&;<>()$`\\\"'*?~#=]")
_BAD_TAG = re.compile(r"[\x00-\x20/\\\x7f]")



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
    sweep: tuple[str, ...] = ()  # --sweep NAME=V1,V2 ...: one job per combination
    sweep_name: Optional[str] = None
    after: tuple[str, ...] = ()  # --after 12,14: start once these are done (exit 0)
    after_any: tuple[str, ...] = ()  # --after-any 12: start once these have ended
    time_limit: Optional[str] = None  # --time 2h (none: no limit); None: tq.defaultTime
    retries: int = 0  # --retry N
    backend: Optional[str] = None  # --backend local|slurm; None: tq.backend
    slurm_args: tuple[str, ...] = ()  # --slurm-arg: sbatch options for this job


@dataclass(frozen=True)
class Submitted:
    job: Job  # the first job (of a sweep)
    snapshot: Snapshot
    warnings: tuple[str, ...] = ()
    daemon_hint: Optional[str] = None  # set when no daemon will run the job
    jobs: tuple[Job, ...] = ()  # every job queued (one, or a sweep's)


MAX_SWEEP = 10_000  # jobs one sweep may queue
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_sweep(items: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """`lr=1e-3,1e-4` ... -> [("lr", ("1e-3", "1e-4")), ...]; one-line errors."""
    from git_tq.recordfmt import CONTROL_CHARACTERS, RecordFormatError, param_name

    params: list[tuple[str, tuple[str, ...]]] = []
    for item in items:
        name, eq, values = item.partition("=")
        try:
            param_name(name.strip())
        except RecordFormatError as exc:
            raise UsageError(f"--sweep {item!r}: {exc}") from None
        if not eq:
            raise UsageError(f"--sweep {item!r}: give NAME=VALUE,VALUE...")
        if name.strip() in (n for n, _ in params):
            raise UsageError(f"--sweep: parameter {name.strip()} is given twice")
        words = tuple(v.strip() for v in values.split(",") if v.strip())
        if not words:
            raise UsageError(f"--sweep: parameter {name.strip()} has no values")
        if any(CONTROL_CHARACTERS.search(v) for v in words):  # a record could not hold it
            raise UsageError(f"--sweep: a value of {name.strip()} holds control characters")
        params.append((name.strip(), tuple(dict.fromkeys(words))))
    return params


def substitute(command: Sequence[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """Each `{name}` in the command's words replaced by its value (`{{`, `}}`: a brace);
    an unknown `{name}` is an error (a typo would otherwise run the whole sweep wrong)."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        name = m.group(1)
        if name not in values:
            raise UsageError(f"unknown placeholder {{{name}}} in the command: no --sweep "
                             f"{name}=... (write {{{{{name}}}}} for the text itself)")
        return values[name]
    return tuple(_PLACEHOLDER.sub(one, word) for word in command)


def sweep_name(command: Sequence[str], now: str) -> str:
    """A default sweep name: the script's name and the time, `train-20261203-072613`."""
    words = [w for w in " ".join(command).split() if not w.startswith("-")]
    script = next((w for w in words if w.endswith((".py", ".sh"))), words[0] if words else "sweep")
    stem = os.path.splitext(os.path.basename(script))[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-")[:40] or "sweep"
    stamp = f"{now[0:4]}{now[5:7]}{now[8:10]}-{now[11:13]}{now[14:16]}{now[17:19]}"
    return f"{stem}-{stamp}"


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


def time_limit_setting(config: Mapping[str, str], given: Optional[str] = None) -> Optional[int]:
    """A new job's time limit in seconds: --time (`none`: no limit), else tq.defaultTime,
    else none."""
    from git_tq.model import parse_duration

    if given is not None:
        if given.strip().lower() == "none":
            return None
        try:
            return parse_duration(given)
        except ValueError as exc:
            raise UsageError(f"--time: {exc}") from None
    configured = config.get("tq.defaulttime", "").strip()
    if not configured or configured.lower() == "none":
        return None
    try:
        return parse_duration(configured)
    except ValueError as exc:
        raise BadSpec(f"git config tq.defaultTime: {exc}") from None


def check_retries(retries: int) -> int:
    from git_tq.model import MAX_RETRIES

    if not 0 <= retries <= MAX_RETRIES:
        raise UsageError(f"--retry {retries}: give a count from 0 to {MAX_RETRIES}")
    return retries


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
    time_limit = time_limit_setting(ctx.config, req.time_limit)
    retries = check_retries(req.retries)
    toplevel = ctx.repo.require_worktree("git tq run")
    if "\n" in ctx.repo.prefix:
        raise BadSpec("the current directory's name contains a newline; run from elsewhere")
    request = gpu_request(req, ctx.config)
    backend = backends.choose(ctx.config, req.backend)
    slurm_args: tuple[str, ...] = ()
    if backend == "slurm":
        slurm_args = backends.slurm_options(ctx.config, request, time_limit, req.priority,
                                            req.slurm_args)
        import shutil

        if shutil.which("sbatch") is None:
            raise BadSpec("the slurm backend needs sbatch, which is not on PATH (run from a "
                          "machine that submits to your cluster)")
    elif req.slurm_args:
        raise UsageError("--slurm-arg is for jobs run by Slurm (--backend slurm)")
    elif not request.cpu_only:
        gpu_inventory.check_request(request, gpu_inventory.machine_gpus(ctx.config))
    after, after_any = dependencies(ctx, req.after, req.after_any)
    command = tuple(req.command)
    shell = req.shell
    if shell is None:
        shell = len(command) == 1 and bool(SHELL_CHARS.search(command[0]))
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
        user=user_name(),
        host=os.uname().nodename,
        stop_signal=stop_signal,
        stop_target=stop_target,
        after=after,
        after_any=after_any,
        time_limit=time_limit,
        retries=retries,
        backend=backend,
    )
    variants: list[tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = [((), command)]
    if req.sweep:
        import itertools

        params = parse_sweep(req.sweep)
        total = 1
        for _, values in params:
            total *= len(values)
        if total > MAX_SWEEP:
            raise UsageError(f"the sweep makes {total} jobs; at most {MAX_SWEEP} at once")
        names = [n for n, _ in params]
        variants = []
        for combo in itertools.product(*(values for _, values in params)):
            chosen = tuple(zip(names, combo))
            variants.append((chosen, substitute(command, dict(chosen))))
        name = req.sweep_name or ""
        if is_id(name) or re.fullmatch(r"[0-9]+-[0-9]+", name):
            raise BadSpec(f"bad sweep name {name!r}: it would read as a job id or range")
        spec = dataclasses.replace(spec, sweep=validate_tag(
            req.sweep_name or sweep_name(command, spec.submitted_at)))
    elif req.sweep_name:
        raise UsageError("--sweep-name needs --sweep")
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
                                      spec.stop_signal, spec.stop_target,
                                      time_limit=spec.time_limit, retries=spec.retries,
                                      backend=backend, slurm_args=slurm_args))

    if not req.sweep:
        job = ctx.store.create(draft, snap.tree, before_publish=save_local,
                               after_lost_race=ctx.local.drop_spec)
        return Submitted(job, snap, snap.warnings, wake_daemon(ctx, (job.id,)), (job,))
    drafts = [draft.evolve(spec=dataclasses.replace(spec, command=words, params=chosen))
              for chosen, words in variants]

    def save_all(commits: list[str]) -> None:
        # What runs comes from these private records: the command with its values
        # substituted, and TQ_PARAM_<name> in the environment.
        for d, commit in zip(drafts, commits):
            s = d.spec
            env = {**captured, **{f"TQ_PARAM_{k}": v for k, v in s.params}}
            ctx.local.save_spec(LocalSpec(commit, s.command, s.shell, s.cwd, s.env, toplevel,
                                          env, nested, snap.outside_cone, s.stop_signal,
                                          s.stop_target, time_limit=s.time_limit,
                                          retries=s.retries, backend=backend,
                                          slurm_args=slurm_args))

    def drop_all(commits: list[str]) -> None:
        for commit in commits:
            ctx.local.drop_spec(commit)

    jobs = ctx.store.create_many(drafts, snap.tree, before_publish=save_all,
                                 after_lost_race=drop_all)
    return Submitted(jobs[0], snap, snap.warnings, wake_daemon(ctx, [j.id for j in jobs]),
                     tuple(jobs))


def dependencies(ctx: Context, after: Sequence[str], after_any: Sequence[str], *,
                 editing: Optional[int] = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids `--after` and `--after-any` name (ids, ranges, sweeps, tags), sorted; a
    job in both counts as `--after`. Refused: a job that does not exist (every id of a
    range must), one not submitted here by this user (it never runs here), and for
    `--after` one that already failed or was cancelled (this one could never start)."""
    if not after and not after_any:
        return (), ()
    entries = ctx.local.entries()
    chosen: dict[str, tuple[int, ...]] = {}
    for option, tokens in (("--after", after), ("--after-any", after_any)):
        if not tokens:
            chosen[option] = ()
            continue
        try:
            jobs = resolve_jobs(ctx, tokens, missing_ok_in_ranges=False)
        except TqError as exc:
            raise type(exc)(f"{option}: {exc}") from None
        for job in jobs:
            trust = ctx.store.trust(job, entries)
            if trust != LOCAL:
                raise NotOurs(f"{option}: job {job.name} was not submitted here by you "
                              f"({trust}): it never runs here, so nothing could follow it")
            if job.id == editing:
                raise BadSpec(f"{option}: job {job.id} cannot wait for itself")
            if option == "--after" and job.state in (State.FAILED, State.CANCELLED):
                ended = "failed" if job.state is State.FAILED else "was cancelled"
                raise BadSpec(f"--after: job {job.id} {ended}, so a job after it could never "
                              "start (--after-any waits for any ending)")
        chosen[option] = tuple(sorted(j.id for j in jobs))
    firm = chosen["--after"]
    return firm, tuple(i for i in chosen["--after-any"] if i not in set(firm))
