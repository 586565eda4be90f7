"""The `git-tq` command line: click wiring from arguments to `service`, and printing.

No logic lives here: each command parses, calls one service function, prints.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional, TypeVar

import click

from git_tq import __version__
from git_tq.errors import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_USAGE, EXIT_USER, NoSpace, TqError
from git_tq.safetext import visible

if TYPE_CHECKING:
    from git_tq.context import Context
    from git_tq.model import Job

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
ALIASES = {"st": "ls"}


def say(text: str, err: bool = False) -> None:
    """click.echo for text that holds record data: control characters shown as escapes."""
    click.echo(visible(text, newlines=True), err=err)


class TqGroup(click.Group):
    """A group that knows command aliases (`st` for `ls`)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        return super().get_command(ctx, ALIASES.get(cmd_name, cmd_name))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[Optional[str], Optional[click.Command], list[str]]:
        _, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else None), cmd, rest


class PathspecCommand(click.Command):
    """A command whose arguments after `--` are paths, as in git (click would drop the `--`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["pathspec"] = args[cut + 1:]
            args = args[:cut]
        return super().parse_args(ctx, args)


def open_context() -> Any:
    from git_tq.context import Context

    return Context.open()


def complete_jobs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Job ids for shell completion (active jobs first)."""
    from click.shell_completion import CompletionItem

    try:
        from git_tq import service

        views = service.list_jobs(open_context(), include_finished=True)
    except Exception:  # completion must never fail loudly
        return []
    items = []
    for v in sorted(views, key=lambda v: (not v.job.state.active, -v.job.id)):
        if v.job.name.startswith(incomplete):  # 7, or alice@gpu1:7 when fetched
            items.append(CompletionItem(v.job.name,
                                        help=visible(f"{v.job.state.value}: "
                                                     f"{v.job.spec.command_line()}")))
    return items


def complete_job_list(ctx: click.Context, param: click.Parameter,
                      incomplete: str) -> list[Any]:
    """Job ids after the last comma of a job list (`--after 12,1<TAB>`)."""
    from click.shell_completion import CompletionItem

    done, comma, word = incomplete.rpartition(",")
    return [CompletionItem(done + comma + item.value, help=item.help)
            for item in complete_jobs(ctx, param, word)]


def after_options(f: F) -> F:
    """--after and --after-any, as `run` and `edit` take them."""
    f = click.option("--after-any", "after_any", multiple=True, metavar="JOBS",
                     shell_complete=complete_job_list,
                     help="Start only once these jobs have ended, however they ended.")(f)
    return click.option("--after", "after", multiple=True, metavar="JOBS",
                        shell_complete=complete_job_list,
                        help="Start only once these jobs are done (exit 0); cancelled if "
                             "one fails or is cancelled. Ids, ranges (12-15), sweeps, "
                             "tags.")(f)


def complete_gpus(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """This machine's GPU ids (tq.gpus, else NVML), after the last comma."""
    from click.shell_completion import CompletionItem

    try:
        from git_tq import gpus

        try:
            config = open_context().config
        except Exception:  # outside a repository: the machine's GPUs
            config = {}
        ids = gpus.machine_gpus(config)
    except Exception:  # completion must never fail loudly
        return []
    done, _, word = incomplete.rpartition(",")
    taken = set(done.split(",")) if done else set()
    return [CompletionItem(f"{done},{g}" if done else str(g)) for g in ids
            if str(g).startswith(word) and str(g) not in taken]


def complete_folders(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Log folders for shell completion."""
    from click.shell_completion import CompletionItem

    try:
        root = open_context().store.log_root
    except Exception:
        return []
    found = []
    for folder, dirs, _files in os.walk(root):
        for d in dirs:
            rel = os.path.relpath(os.path.join(folder, d), root)
            if rel.startswith(incomplete):
                found.append(CompletionItem(rel + "/"))
    return found


def complete_metrics(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Metric names the jobs reported, for shell completion (after the last comma)."""
    from click.shell_completion import CompletionItem

    try:
        from git_tq import service

        views = service.list_jobs(open_context(), include_finished=True)
    except Exception:  # completion must never fail loudly
        return []
    done, _, word = incomplete.rpartition(",")
    names = dict.fromkeys(n for v in views for n, _ in v.job.metrics)
    return [CompletionItem(f"{done},{n}" if done else n) for n in names if n.startswith(word)]


def complete_sort_keys(ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[Any]:
    """id, priority, time and the metric names, for --sort."""
    from click.shell_completion import CompletionItem

    sign = "-" if incomplete.startswith("-") else ""
    keys = ["id", "priority", "time"] + [item.value for item in
                                         complete_metrics(ctx, param, "")]
    return [CompletionItem(sign + k) for k in keys if (sign + k).startswith(incomplete)]


def metrics_option(f: F) -> F:
    return click.option("-m", "--metrics", "metrics", multiple=True, metavar="NAMES",
                        shell_complete=complete_metrics,
                        help="Metrics to show, e.g. loss,acc ('' for none) [tq.columns, "
                             "else the first three the jobs share].")(f)


def origin_options(f: F) -> F:
    f = click.option("--origin", "origin", metavar="USER@HOST",
                     help="Only the jobs of this origin (fetched ones, or ours).")(f)
    return click.option("--mine", is_flag=True, help="Only this machine's jobs (no fetched "
                        "ones).")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print machine-readable JSON (stable; see the man page).")(f)


@click.group(cls=TqGroup, context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(__version__, "--version", prog_name="git tq")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """git tq: a preemptive GPU job queue built into git.

    `git tq` alone on a terminal opens the interactive console. `git tq --help`
    (through git) opens the man page; `git tq -h` prints this.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())  # on a terminal, entry.main opened the console instead


# --- run ---------------------------------------------------------------------------


@cli.command(context_settings={**CONTEXT, "allow_interspersed_args": False,
                               "ignore_unknown_options": False})
@click.option("-p", "--priority", type=int, default=None,
              help="Priority: a smaller number runs first and preempts larger ones [100].")
@click.option("-g", "--grace", type=click.IntRange(min=0), default=None,
              help="Seconds between the stop signal and SIGKILL when preempted [180].")
@click.option("-t", "--tag", help="A short label (also used in the log file name).")
@click.option("-e", "--env", "env_name", help="Conda env name, or a virtualenv/conda prefix path.")
@click.option("--gpu", "gpu_ids", metavar="IDS", shell_complete=complete_gpus,
              help="Exactly these GPUs, e.g. 0 or 0,1.")
@click.option("--gpus", "gpu_count", type=click.IntRange(min=0), metavar="N",
              help="Any N free GPUs.")
@click.option("--cpu", is_flag=True, help="No GPU: run in a CPU slot.")
@click.option("--sh", "shell", flag_value=True, default=None,
              help="Run the command through `sh -c` (automatic for one quoted string).")
@click.option("--signal", "stop_signal", metavar="SIG",
              help="The signal that stops the job (TERM, USR1, INT or a number) "
                   "[tq.stopSignal, else TERM].")
@click.option("--sweep", "sweep", multiple=True, metavar="NAME=V1,V2",
              help="Queue one job per combination of the values (repeatable); {NAME} in "
                   "the command's words takes each value, $TQ_PARAM_NAME too.")
@click.option("--sweep-name", metavar="NAME",
              help="The sweep's name, usable as a job list [script-date-time].")
@after_options
@click.option("--time", "time_limit", metavar="DURATION",
              help="Stop it (stop signal, grace, SIGKILL; recorded failed) once it has run "
                   "this long over all its attempts: 90s, 45m, 2h, 1d12h, none "
                   "[tq.defaultTime, else none].")
@click.option("--retry", "retries", type=int, default=0, metavar="N",
              help="Queue it again, up to N times, when an attempt fails by itself "
                   "(non-zero exit, or a signal git tq did not send) [0].")
@click.option("--backend", metavar="local|slurm",
              shell_complete=lambda ctx, param, incomplete: [
                  b for b in ("local", "slurm") if b.startswith(incomplete)],
              help="Where it runs: this machine's daemon, or a Slurm batch job "
                   "[tq.backend, else local].")
@click.option("--slurm-arg", "slurm_args", multiple=True, metavar="OPTION",
              help="An sbatch option for this Slurm job, e.g. --slurm-arg=--constraint=a100 "
                   "(repeatable; after tq.slurm.* settings).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the job id (one per line).")
@click.option("--wait", "wait", is_flag=True,
              help="Wait until the job has ended; exit with its exit status.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run(priority: Optional[int], grace: Optional[int], tag: Optional[str],
        env_name: Optional[str], gpu_ids: Optional[str], gpu_count: Optional[int], cpu: bool,
        shell: Optional[bool], stop_signal: Optional[str], sweep: tuple[str, ...],
        sweep_name: Optional[str], after: tuple[str, ...], after_any: tuple[str, ...],
        time_limit: Optional[str], retries: int, backend: Optional[str],
        slurm_args: tuple[str, ...], quiet: bool, wait: bool,
        command: tuple[str, ...]) -> None:
    """Snapshot the work tree and queue COMMAND as a job.

    Options end at the first word that is not an option (or at `--`). With --wait,
    the exit status is the job's: 0 done, its exit code, 128+N for signal N, 1 if it
    never ran.
    """
    from git_tq import submission  # not `service`: a submission starts faster without it
    from git_tq.model import DEFAULT_GRACE, DEFAULT_PRIORITY

    ctx = open_context()
    req = submission.SubmitRequest(
        command=command,
        priority=DEFAULT_PRIORITY if priority is None else priority,
        grace=DEFAULT_GRACE if grace is None else grace,
        tag=tag, env=env_name, gpu_ids=gpu_ids, gpu_count=gpu_count, cpu=cpu, shell=shell,
        stop_signal=stop_signal, sweep=sweep, sweep_name=sweep_name, after=after,
        after_any=after_any, time_limit=time_limit, retries=retries, backend=backend,
        slurm_args=slurm_args,
    )
    result = submission.submit(ctx, req)
    for w in result.warnings:
        say(f"git tq: warning: {w}", err=True)
    if result.daemon_hint:
        say(f"git tq: {result.daemon_hint}", err=True)
    job = result.job
    if sweep:
        jobs = result.jobs
        if quiet:
            click.echo("\n".join(str(j.id) for j in jobs))
        else:
            say(f"sweep {job.spec.sweep}: {len(jobs)} jobs queued ({jobs[0].id}-{jobs[-1].id}, "
                f"priority {job.spec.priority}, gpus {job.spec.gpus.describe()}"
                f"{after_text(job)})")
            for j in jobs:
                say(f"  job {j.id}: " + " ".join(f"{k}={v}" for k, v in j.spec.params))
            src = job.source[:10] if job.source else "no commit yet"
            click.echo(f"  code: {src} + {job.changes.describe()}; one snapshot "
                       f"{job.snapshot[:10]}")
        if wait:
            wait_for_sweep(ctx, list(jobs), quiet)
        return
    if quiet:
        click.echo(str(job.id))
    else:
        src = job.source[:10] if job.source else "no commit yet"
        say(f"job {job.id} queued (priority {job.spec.priority}, gpus "
            f"{job.spec.gpus.describe()}{after_text(job)}): {job.spec.command_line()}")
        click.echo(f"  code: {src} + {job.changes.describe()}; snapshot {job.snapshot[:10]}")
    if wait:
        wait_for_submitted(ctx, job, quiet)


def after_text(job: Job) -> str:
    """`, after 12,14` for a job with dependencies, as `run` and `edit` print it."""
    from git_tq.recordfmt import encode_ids

    s = job.spec
    return (f", after {encode_ids(s.after)}" if s.after else "") + \
        (f", after any {encode_ids(s.after_any)}" if s.after_any else "")


def wait_for_sweep(ctx: Context, jobs: list[Job], quiet: bool) -> None:
    """`run --sweep --wait`: wait for every job; exit 0 if all are done, else 1."""
    import signal

    from git_tq import service
    from git_tq.errors import Interrupted

    try:
        ended = [v.job for v in service.wait_for(ctx, jobs).views]
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Interrupted(f"interrupted: the sweep's jobs stay queued (git tq wait "
                          f"{jobs[0].spec.sweep} waits again)") from None
    failed = [j for j in ended if service.exit_status(j)]
    for j in failed:
        say(service.describe_ending(j), err=True)
    if not failed and not quiet:
        click.echo(f"sweep {jobs[0].spec.sweep}: all {len(jobs)} jobs done")
    sys.exit(1 if failed else 0)


def wait_for_submitted(ctx: Context, job: Job, quiet: bool) -> None:
    """`run --wait`: wait for the job; exit with its exit status (Ctrl-C leaves it queued)."""
    import signal

    from git_tq import service
    from git_tq.errors import Interrupted

    try:
        ended = service.wait_for(ctx, [job]).views[0].job
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # git passes on a second Ctrl-C
        raise Interrupted(f"interrupted: job {job.id} stays queued (git tq wait {job.id} "
                          f"waits again; git tq kill {job.id} stops it)") from None
    code = service.exit_status(ended)
    if code:
        say(service.describe_ending(ended), err=True)
    elif not quiet:
        click.echo(f"job {ended.id} done")
    sys.exit(code)


# --- listing and showing ---------------------------------------------------------------


@cli.command("ls", context_settings=CONTEXT)
@click.option("-a", "--all", "show_all", is_flag=True, help="Every job, finished ones too.")
@click.option("-s", "--state", "states", multiple=True,
              help="Only jobs in this state (pending, running, stopping, done, failed, "
                   "cancelled, active); repeat or comma-separate.")
@click.option("-t", "--tag", "tags", multiple=True, help="Only jobs with this tag.")
@metrics_option
@click.option("--sort", "sort", metavar="KEY", shell_complete=complete_sort_keys,
              help="Order by id, priority, time (run time) or a metric; -KEY descending "
                   "(jobs without the value last).")
@origin_options
@json_option
def ls_cmd(show_all: bool, states: tuple[str, ...], tags: tuple[str, ...],
           metrics: tuple[str, ...], sort: Optional[str], mine: bool, origin: Optional[str],
           as_json: bool) -> None:
    """List jobs: the active queue by default (alias: st); --all adds finished and
    fetched jobs."""
    from git_tq import output, service
    from git_tq import rows as cached

    ctx = open_context()
    keep = service.origin_filter(ctx, mine, origin)
    text: Optional[str] = None  # ls --all --json of every job: often one file read
    if as_json and show_all and not states and not tags and keep is None and sort is None:
        text, unreadable = cached.every_json(ctx)
    elif sort is not None:
        listed = service.list_queue(ctx, include_finished=show_all, states=states,
                                    tags=tags, sort=sort, metrics=metrics or None)
        jobs: list[Any] = [cached.from_view(v) for v in listed.views]
        unreadable, shown = listed.unreadable, listed.metrics
        if keep is not None:
            jobs = [r for r in jobs if keep(r.origin)]
    else:
        wanted = service.parse_states(states)
        # The plain queue is this machine's (`active`); `--origin` another machine's
        # asks for fetched jobs, which only `every` reads.
        fetched = keep is not None and not keep(None)
        got = cached.every(ctx, text=not as_json) if show_all or wanted or fetched \
            else cached.active(ctx)
        jobs = [r for r in got.rows if (r.state in wanted if wanted else
                                        show_all or r.state in cached.ACTIVE)
                and (not tags or r.tag in tags) and (keep is None or keep(r.origin))]
        if not show_all and not wanted:  # the queue: running, then pending by priority
            jobs = [r for r in jobs if r.state in ("running", "stopping")] + sorted(
                (r for r in jobs if r.state == "pending"), key=lambda r: (r.priority, r.id))
        unreadable = got.unreadable
        shown = service.metric_columns(ctx, jobs, metrics or None)
    unreadable = warn_broken(unreadable)
    if unreadable and (as_json or not show_all):
        click.echo(f"git tq: {len(unreadable)} job record"
                   f"{'s are' if len(unreadable) > 1 else ' is'} unreadable "
                   "(git tq ls --all lists them; git tq doctor explains)", err=True)
    if as_json:
        output.print_json_text(text if text is not None else cached.json_text(jobs))
        return
    paused = service.queue_pause(ctx.home)
    if paused.active:
        say(paused.describe())
    if not jobs and not (show_all and unreadable):
        output.echo("no jobs" if show_all or states or tags else
                    "no active jobs (git tq ls --all shows finished ones)")
        return
    rows, styles = [], []
    with_params = any(r.params for r in jobs)
    with_reason = any(r.reason for r in jobs)
    metric_text = output.metric_text
    for r in jobs:
        c = r.cells  # ID STATE PRI GPUS TAG PARAMS COMMAND TIME NOTE, already visible
        metric = dict(r.metrics) if shown else {}
        held = service.held_reason(paused, r.job) if paused.active and r.job else None
        rows.append([c[0], f"{c[1]} ({held})" if held else c[1],
                     "" if r.pid is None else str(r.pid), c[2], c[3], c[4],
                     *([c[5]] if with_params else []), c[6], c[7],
                     *([r.reason] if with_reason else []),
                     *[metric_text(metric.get(name), 16) for name in shown], c[8]])
        styles.append(output.STATE_STYLES.get(r.state) if r.trust == "local" else "dim")
    headers = ["ID", "STATE", "PID", "PRI", "GPUS", "TAG", *(["PARAMS"] if with_params else []),
               "COMMAND", "TIME", *(["REASON"] if with_reason else []), *shown, "NOTE"]
    if show_all:
        for u in unreadable:
            rows.append([u.name, f"(unreadable: {u.reason})"] + [""] * (len(headers) - 2))
            styles.append("red")
    first_metric = headers.index("TIME") + 1 + with_reason
    output.print_table(headers, rows, styles,
                       right=range(first_metric, first_metric + len(shown)))


@cli.command(context_settings=CONTEXT)
@click.argument("job", shell_complete=complete_jobs)
@json_option
def show(job: str, as_json: bool) -> None:
    """Show a job's whole record: spec, code, lifecycle, note, log."""
    from git_tq import output, service

    detail = service.show_job(open_context(), job)
    data = detail.view.to_json()
    stops = service.stopped_attempts(detail.lifecycle)
    if as_json:
        data["lifecycle"] = [
            {"commit": c, "event": r.event, "state": r.state.value, "detail": r.detail,
             "at": (r.ended_at or r.started_at or r.spec.submitted_at)
             if r.event != "submitted" else r.spec.submitted_at,
             "attempt": r.attempt, "exit_code": r.exit_code, "signal": r.signal,
             "stop": r.stop, "stop_seconds": r.stop_seconds, "ran_seconds": r.ran_seconds}
            for c, r in detail.lifecycle
        ]
        data["stops"] = [st.to_json() for st in stops]
        data["outside_links"] = [{"path": p, "target": t} for p, t in detail.outside_links]
        data["kept_worktree"] = detail.kept.path if detail.kept else None
        data["kept_reason"] = detail.kept.reason if detail.kept else None
        output.print_json(data)
        return
    j, s = detail.view.job, detail.view.job.spec
    e = output.esc
    lines = [
        f"{output.styled(f'job {j.name}', 'bold')}  "
        f"{output.styled(j.state.value, output.STATE_STYLES[j.state.value])}"
        + (f"  ({j.outcome})" if j.outcome else ""),  # exit N, signal N, not started, lost
        f"command    {e(s.command_line())}" + ("   [sh -c]" if s.shell else ""),
        f"priority   {s.priority}    grace {s.grace}s    gpus {s.gpus.describe()}"
        + (f" (holding {','.join(map(str, j.assigned_gpus))})" if j.assigned_gpus else "")
        + (f"    stop {s.stop_signal}" + (" to the group" if s.stop_target == "group" else "")
           if (s.stop_signal, s.stop_target) != ("SIGTERM", "main") else ""),
        f"tag        {e(s.tag or '-')}    env {e(s.env or '-')}    cwd {e(s.cwd or '.')}",
        f"submitted  {e(s.submitted_at)} by {e(s.user)}@{e(s.host)}"
        + (f"   [fetched from {j.origin}: read-only, never runs here]" if j.origin else
           {"local": "", "fetched": "   [fetched: read-only, never runs here]",
           "tampered": "   [TAMPERED: moved by someone else; see git tq doctor]"}.get(
               detail.view.trust, "")),
        f"source     {e(j.source or '(unborn branch)')}",
        f"snapshot   {e(j.snapshot)}  ({j.changes.describe()} vs source)",
        f"attempts   {j.attempt}"
        + (f"    started {e(j.started_at)}" if j.started_at else "")
        + (f"    ended {e(j.ended_at)}" if j.ended_at else "")
        + (f"    pid {detail.view.pid}" if detail.view.pid is not None else ""),
        *([service.limits_text(j)] if s.time_limit or s.retries else []),
        f"log        {e(detail.view.log)}"
        + (f"  [{e(detail.view.category)}]" if detail.view.category else "")
        + ("  (not on this machine: the job ran elsewhere)"
           if detail.view.trust != "local" and not os.path.exists(detail.view.log) else ""),
        f"restore    git tq checkout {j.name}   (or -b BRANCH, --worktree PATH)",
    ]
    if s.after or s.after_any or detail.view.reason:
        # A fetched job's ids are its machine's jobs, not ours of the same number.
        lines.insert(4, f"depends    {after_text(j)[2:] or '-'}"
                     + (f"  (jobs of {j.origin})" if j.origin and s.after + s.after_any
                        else "")
                     + (f"    ({e(detail.view.reason)})" if detail.view.reason else ""))
    if j.metrics:
        lines.append("metrics    " + "  ".join(f"{e(k)}={e(output.metric_text(v))}"
                                               for k, v in j.metrics))
    if j.outputs is not None:
        o = j.outputs
        text = f"{o.files} file{'s' if o.files != 1 else ''} ({output.size_text(o.bytes)}) " \
            f"recorded in git" + (f": git tq diff {j.name} --outputs" if o.files else "")
        if o.skipped_count:
            text += f"; {o.skipped_count} not recorded ({output.size_text(o.skipped_bytes)}): " \
                + ", ".join(f"{e(p)} ({e(lim)})" for p, _, lim in o.skipped[:5]) \
                + (", ..." if o.skipped_count > 5 else "")
        if o.error:
            text = f"not recorded: {e(o.error)}"
        lines.append(f"outputs    {text}")
    if detail.kept:
        lines.append(f"worktree   {e(detail.kept.path)}  ({e(detail.kept.reason)}; "
                     f"git tq gc --outputs {j.id} removes it)")
    for path, target in detail.outside_links:
        lines.append(f"link       {e(path)} -> {e(target)}  (leaves the repository: the job "
                     "sees what it pointed to at submission)")
    if detail.view.note:
        # one line per line of the note, each made safe (a note may span lines)
        note_lines = [e(part) for part in detail.view.note.split("\n")]
        lines.append("note       " + output.styled("\n           ".join(note_lines), "cyan"))
    lines.append("lifecycle")
    for commit, rec in detail.lifecycle:
        at = rec.spec.submitted_at if rec.event == "submitted" else \
            (rec.ended_at if rec.state.finished else rec.started_at) or ""
        if rec.event in ("preempted", "cancelled", "stopping", "edited"):
            at = ""
        extra = f"  {e(rec.detail)}" if rec.detail else ""
        lines.append(f"  {e(commit[:10])}  {e(rec.event):<12} -> {rec.state.value:<9} "
                     f"{e(at)}{extra}")
    if stops:
        lines.append("stops")
        lines.extend(f"  {e(st.describe())}" for st in stops)
    output.print_markup("\n".join(lines))


def warn_broken(unreadable: Sequence[Any]) -> list[Any]:
    """One warning line on stderr for each job ref at a missing object (naming the job,
    the object and the repair); the other unreadable refs, for the caller to report."""
    from git_tq.errors import broken_ref_text
    from git_tq.store import MISSING

    for u in unreadable:
        if u.reason == MISSING:
            origin, _, name = u.name.rpartition(":")
            click.echo(visible(f"git tq: warning: job {u.name} is broken: "
                               f"{broken_ref_text(name, u.tip, origin or None)}"), err=True)
    return [u for u in unreadable if u.reason != MISSING]


@cli.command("log", context_settings=CONTEXT)
@click.argument("revisions", nargs=-1)
@metrics_option
@origin_options
@json_option
def log_cmd(revisions: tuple[str, ...], metrics: tuple[str, ...], mine: bool,
            origin: Optional[str], as_json: bool) -> None:
    """History with the jobs run on each commit, fetched ones included (commits without
    jobs are folded)."""
    from git_tq import output, service
    from git_tq import rows as cached

    tq_ctx = open_context()
    keep = service.origin_filter(tq_ctx, mine, origin)
    if as_json:
        got = cached.every(tq_ctx)
        listed: Sequence[Any] = got.rows
        warn_broken(got.unreadable)
    else:
        listed, unreadable = cached.log_rows(tq_ctx)
        warn_broken(unreadable)
    by_source: dict[Optional[str], list[Any]] = {}
    for r in listed:
        if keep is not None and not keep(r.origin):
            continue
        by_source.setdefault(r.source, []).append(r)
    entries = [(commit, short, subject, when, by_source.get(commit, []))
               for commit, short, subject, when in service.history_commits(tq_ctx, revisions)]
    if not revisions and None in by_source:
        entries.append((None, "(unborn)", "jobs submitted before the first commit", "",  # type: ignore[arg-type]
                        by_source[None]))
    if as_json:
        output.print_json_text("[" + ", ".join(
            output.json_text({"commit": commit, "subject": subject})[:-1]
            + ', "jobs": ' + cached.json_text(jobs) + "}"
            for commit, _, subject, _, jobs in entries) + "]")
        return
    e = output.esc
    lines: list[str] = []
    folded = 0
    shown = service.metric_columns(tq_ctx, [r for en in entries for r in en[4]],
                                   metrics or None)
    tty = output.is_tty()
    plain = not tty or bool(os.environ.get("NO_COLOR"))

    def styled(text: str, style: str) -> str:
        return text if plain else output.styled(text, style)

    def flush() -> None:
        nonlocal folded
        if folded:
            lines.append(output.styled(f"  ⋮ {folded} commit{'s' if folded > 1 else ''} "
                                       "without jobs", "dim"))
            folded = 0

    for _commit, short, subject, when, jobs in entries:
        if not jobs:
            folded += 1
            continue
        flush()
        lines.append(f"{output.styled(e(short), 'yellow')} {e(subject)}"
                     + (output.styled(f" ({e(when)})", "dim") if when else ""))
        for r in sorted(jobs, key=lambda r: (r.origin or "", r.id)):
            status, runtime, tag, command, changes, note = r.line  # already visible
            if tty:
                tag, command, note = e(tag), e(command), e(note)
            bits = [f"  #{r.name:<5}", styled(f"{status:<14}", output.STATE_STYLES[r.state]),
                    f"{runtime:>8}"]
            if tag:
                bits.append(styled(f"[{tag}]", "blue"))
            bits.append(command)
            if r.metrics and shown:
                values = dict(r.metrics)
                bits.extend(styled(f"{e(name)}={e(output.metric_text(values[name], 16))}",
                                   "bold")
                            for name in shown if name in values)
            if changes:
                bits.append(styled(changes, "magenta"))
            if note:
                bits.append(styled("— " + note, "cyan"))
            lines.append(" ".join(bits))
    flush()
    output.print_markup("\n".join(lines) if lines else "no commits")


@cli.command(context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@json_option
def compare(jobs: tuple[str, ...], as_json: bool) -> None:
    """Jobs side by side: command, settings, code, outcome and metrics (best marked).

    JOBS: ids, ranges (12-15), a tag or a sweep name; at least two jobs.
    """
    from git_tq import output, service

    found = service.compare(open_context(), jobs)
    if as_json:
        output.print_json(found.to_json())
        return
    differs = "bold yellow"

    def words(cell: service.Words) -> list[tuple[str, Optional[str]]]:
        pieces: list[tuple[str, Optional[str]]] = []
        for i, (word, changed) in enumerate(cell):
            pieces += [(" ", None)] if i else []
            pieces.append((word, differs if changed else None))
        return pieces or [("-", None)]

    def text(row: service.CompareRow, i: int, value: Any) -> str:
        if row.kind == "metric":
            return output.metric_text(value, 30)
        if row.name == "source":
            return value[:10] if value else "(unborn)"
        if row.name == "code":
            c = found.code[i]
            return "(base)" if i == 0 else "same" if not c.files else \
                f"{c.files} file{'s' if c.files > 1 else ''}, +{c.insertions} -{c.deletions}"
        if row.name == "run time":
            return "-" if value is None else output.duration(value)
        return "-" if value is None or value == "" else str(value)

    rows = []
    for row in found.rows:
        cells: list[list[tuple[str, Optional[str]]]] = [[(row.name, None)]]
        for i, value in enumerate(row.values):
            if row.words is not None:
                cells.append(words(row.words[i]))
            elif row.kind == "metric" and row.best == i:
                cells.append([(text(row, i, value) + " *", "bold green")])
            elif row.name == "outcome":
                state = found.views[i].job.state.value
                cells.append([(text(row, i, value), output.STATE_STYLES.get(state))])
            else:
                style = differs if row.kind == "property" and row.differs and \
                    (row.name != "code" or i > 0) else None
                cells.append([(text(row, i, value), style)])
        rows.append(cells)
    marked = [r for r in found.rows if r.best is not None]
    lower = [r.name for r in marked if r.lower_is_better]
    higher = [r.name for r in marked if not r.lower_is_better]
    footer = None
    if marked:
        footer = "* best" + (f"; lower is better for {', '.join(lower)}" if lower else "") \
            + (f"; higher for {', '.join(higher)}" if higher else "")
    output.print_segment_table([""] + [f"#{v.job.name}" for v in found.views], rows, footer)


@cli.command(context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@click.option("-o", "--output", "path", default="tq-report.html", show_default=True,
              metavar="FILE", help="Where to write the report ('-': standard output).")
@click.option("-m", "--metrics", "metrics", multiple=True, metavar="NAMES",
              shell_complete=complete_metrics,
              help="Only these metrics' curves, e.g. loss,acc [every metric].")
@click.option("--open", "open_it", is_flag=True, help="Open it in the default browser.")
def report(jobs: tuple[str, ...], path: str, metrics: tuple[str, ...], open_it: bool) -> None:
    """Write one self-contained HTML file: the jobs' compare table and interactive curves
    (it needs no network to open). JOBS: ids, ranges (12-15), a tag or a sweep name."""
    from git_tq import service, web

    web.require("report", web.REPORT_NEEDS)
    from git_tq.output import size_text
    from git_tq.web import report as reporting

    written = reporting.write(open_context(), jobs, path,
                              service.metric_names(metrics) or None)
    if path == "-":
        return
    say(f"wrote {written.path}: {written.jobs} job{'s' if written.jobs != 1 else ''}, "
        f"{written.metrics} metric{'s' if written.metrics != 1 else ''} "
        f"({size_text(written.size)})")
    if open_it and not reporting.open_in_browser(written.path):
        say("git tq: no browser could be started: open the file yourself", err=True)


@cli.command(context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another makes the queue visible to anyone who "
                   "can reach it and has the token).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to listen on (0: any free one) [8765, else any free one].")
def serve(host: str, port: Optional[int]) -> None:
    """A live, read-only view of the queue in your browser: GPUs, jobs, logs, curves.
    Open the URL it prints (it carries the token every request needs); Ctrl-C stops it."""
    from git_tq import web

    web.require("serve", web.SERVE_NEEDS)
    from git_tq.web import app

    open_context()  # a repository, or one clear line

    def announce(url: str) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            say(f"git tq serve: listening on {host}: anyone who can reach it and has the "
                "token sees this repository's jobs", err=True)
        say(f"git tq serve: {url}")
        say("(read-only; Ctrl-C stops it)", err=True)

    app.serve(os.getcwd(), host, port, announce)


@cli.command(context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@click.option("-m", "--metric", "metric", multiple=True, metavar="NAMES",
              help="Metrics to draw, one panel each (comma-separated; default: those the "
                   "jobs share).")
@click.option("--x", "x_axis", type=click.Choice(["step", "time", "epoch"]), default="step",
              show_default=True, help="The x axis: the step, the wall time, or the value of "
                                      "the epoch metric.")
@click.option("--smooth", type=click.IntRange(min=1, max=100000), default=1, metavar="N",
              help="Moving average over N points.")
@click.option("--log", "log_scale", is_flag=True, help="Log scale for y (log10).")
@click.option("-a", "--all", "every", is_flag=True, help="Every job, fetched ones too.")
@click.option("-f", "--follow", is_flag=True,
              help="Draw again every 2 s while the jobs run (Ctrl-C stops).")
@json_option
@click.option("--csv", "as_csv", is_flag=True,
              help="Print the points as CSV: job,metric,attempt,step,time,value.")
def plot(jobs: tuple[str, ...], metric: tuple[str, ...], x_axis: str, smooth: int,
         log_scale: bool, every: bool, follow: bool, as_json: bool, as_csv: bool) -> None:
    """Metric curves of JOBS in the terminal: one panel per metric, one line per job,
    resumed attempts marked.

    JOBS: ids, ranges (12-15), a tag or a sweep name (or --all).
    """
    import shutil
    import time

    from git_tq import output, plotting, series, service
    from git_tq.errors import UsageError
    from git_tq.model import State

    if not jobs and not every:
        raise UsageError("name the jobs to plot (ids, ranges, a tag, a sweep) or give --all")
    ctx = open_context()
    names = service.metric_names(metric)
    wanted = (names + ["epoch"] if x_axis == "epoch" else names) if names else None
    hints: list[str] = []

    tty = output.is_tty()
    width = shutil.get_terminal_size((100, 24)).columns if tty else 100
    # A terminal shows a few points per column: more would only cost time to draw.
    drawn_points = None if as_json or as_csv else plotting.DRAWN_PER_COLUMN * width

    def curves() -> list[series.JobCurves]:
        return service.job_curves(ctx, service.curve_jobs(ctx, jobs, every=every), wanted,
                                  hints=hints, points=drawn_points)

    found = curves()
    if as_json or as_csv:
        if as_json:
            output.print_json(series.to_json(found))
        else:
            click.echo(plotting.to_csv(found), nl=False)
        return
    color = tty and not os.environ.get("NO_COLOR")
    said: set[str] = set()
    try:
        while True:
            panels, total = (names, len(names)) if names else \
                plotting.shared_metrics(found, x_axis)
            if not panels:
                raise UsageError("no numeric metrics in these jobs (they write them to "
                                 "$TQ_METRICS or the files tq.metrics names)")
            drawn = plotting.render(found, panels, x=x_axis, window=smooth, log=log_scale,
                                    width=width, color=color)
            if follow and tty:
                click.echo("\x1b[H\x1b[2J", nl=False)
            click.echo(drawn.text)
            notes = list(drawn.notes)
            if total > len(panels):
                notes.append(f"{len(panels)} of {total} metrics drawn: -m names others")
            for line in notes + hints:
                if line not in said or follow:
                    say(f"git tq: {line}", err=True)
                    said.add(line)
            if not follow or all(State(c.state).finished for c in found):
                return
            time.sleep(2)
            found = curves()
    except KeyboardInterrupt:
        return


# --- code ----------------------------------------------------------------------


@cli.command(cls=PathspecCommand, context_settings=CONTEXT)
@click.argument("job")
@click.argument("job2", required=False)
@click.option("--stat", is_flag=True, help="Only a summary of changed files.")
@click.option("--outputs", is_flag=True, help="What JOB's run wrote (its code -> its code "
              "plus outputs); with JOB2, both jobs' code and outputs.")
@click.pass_context
def diff(ctx: click.Context, job: str, job2: Optional[str], stat: bool, outputs: bool) -> None:
    """Code difference between JOB and the work tree, or between JOB and JOB2.

    Limit it to some paths after `--`: git tq diff 12 15 -- src/
    """
    from git_tq import service

    paths = ctx.meta.get("pathspec", [])
    sys.exit(service.run_diff(open_context(), job, job2, stat, paths, outputs))


@cli.command(context_settings=CONTEXT)
@click.argument("job")
@click.option("-b", "--branch", help="Create this branch at the job's snapshot.")
@click.option("--worktree", type=click.Path(), help="Check out into a new worktree here.")
@click.option("-f", "--force", is_flag=True, help="Overwrite uncommitted changes.")
@click.option("--outputs", is_flag=True, help="With the files the job's run wrote.")
def checkout(job: str, branch: Optional[str], worktree: Optional[str], force: bool,
             outputs: bool) -> None:
    """Bring back the code a job ran: into the work tree, a new branch, or a worktree."""
    from git_tq import service

    say(service.checkout(open_context(), job, branch=branch, worktree=worktree, force=force,
                         outputs=outputs))


# --- editing -------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.argument("job", shell_complete=complete_jobs)
@click.argument("text", nargs=-1)
@click.option("-a", "--append", is_flag=True, help="Add to the note instead of replacing it.")
@click.option("--remove", is_flag=True, help="Delete the note.")
def note(job: str, text: tuple[str, ...], append: bool, remove: bool) -> None:
    """Annotate a job (git notes --ref=tq on its submission commit)."""
    from git_tq import service
    from git_tq.errors import UsageError

    if remove and text:
        raise UsageError("--remove takes no text")
    j = service.set_note(open_context(), job, " ".join(text) if text else None,
                         append=append, remove=remove)
    click.echo(f"note {'removed from' if remove else 'saved on'} job {j.name}")


@cli.command(context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@click.option("--forget", is_flag=True, help="Delete the records of finished jobs instead.")
@click.option("--log", "logs", is_flag=True, help="Delete the jobs' log files instead "
              "(records stay).")
@click.option("-y", "--yes", is_flag=True, help="With --log: do not ask for confirmation.")
def rm(jobs: tuple[str, ...], forget: bool, logs: bool, yes: bool) -> None:
    """Remove pending jobs from the queue (JOBS: `1 3 5`, `1,3,5` or `2-4`)."""
    from git_tq import service
    from git_tq.errors import TqError, UsageError

    ctx = open_context()
    if logs:
        if forget:
            raise UsageError("give --log or --forget, not both")
        # By name: a fetched alice@gpu1:7 must not become our job 7 here.
        tokens = [j.name for j in service.resolve_jobs(ctx, jobs)]
        if not yes:
            if not sys.stdin.isatty():
                raise TqError("refusing to delete logs without -y (no terminal to ask on)")
            if not click.confirm(f"Delete the log of job {', '.join(tokens)}? "
                                 "(the job records stay)"):
                click.echo("nothing deleted")
                return
        for token in tokens:
            say(f"deleted {service.remove_log(ctx, token)}")
        return
    for r in service.remove(ctx, jobs, forget=forget):
        say(f"job {r.job_id} {r.outcome}")


@cli.command(context_settings=CONTEXT)
@click.option("--gpu", "gpu_ids", metavar="IDS", shell_complete=complete_gpus,
              help="Only GPU queue IDS: the jobs that asked for exactly these GPUs (--gpu).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(gpu_ids: Optional[str], yes: bool) -> None:
    """Remove every pending job from the queue (or from one GPU queue)."""
    from git_tq import service
    from git_tq.errors import TqError
    from git_tq.gpus import parse_gpu_ids

    ctx = open_context()
    gpus = None if gpu_ids is None else parse_gpu_ids(gpu_ids)
    where = "the queue" if gpus is None else f"GPU queue {','.join(map(str, gpus))}"
    pending = service.pending_jobs(ctx, gpus)
    if not pending:
        click.echo(f"no pending jobs in {where}")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise TqError(f"refusing to purge {len(pending)} pending jobs without -y")
        if not click.confirm(f"Remove {len(pending)} pending jobs from {where}?"):
            click.echo("nothing removed")
            return
    # Only the jobs counted above: one queued since then stays.
    ids = service.purge(ctx, gpus=gpus, only={j.id for j in pending})
    click.echo(f"{len(ids)} pending jobs removed: {', '.join(map(str, ids))}")


# --- logs ------------------------------------------------------------------------------


def _read_chunks(path: str, size: int = 1 << 16) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(size)
            if not chunk:
                return
            yield chunk


def page(path: str | bytes, raw: bool = False) -> None:
    """Show a log in the pager on a terminal ($GIT_PAGER, $PAGER, else less -R); else print.

    Unless `raw`, its bytes are made safe first (safetext.visible_bytes): a job's
    output may hold escape sequences meant for whoever reads the log."""
    import shlex
    import subprocess

    from git_tq.safetext import visible_stream

    chunks = iter([path]) if isinstance(path, bytes) else _read_chunks(path)
    if not raw:
        chunks = visible_stream(chunks)
    if not sys.stdout.isatty():
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        return
    pager = os.environ.get("GIT_PAGER") or os.environ.get("PAGER") or "less -R"
    if raw and isinstance(path, str):
        with open(path, "rb") as fh:
            subprocess.call(shlex.split(pager), stdin=fh)
        return
    proc = subprocess.Popen(shlex.split(pager), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for chunk in chunks:
            proc.stdin.write(chunk)
    except BrokenPipeError:
        pass  # the reader quit the pager early
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait()


@cli.command(context_settings=CONTEXT)
@click.argument("job", shell_complete=complete_jobs)
@click.option("-f", "--follow", is_flag=True,
              help="Follow the log as it grows, until the job ends (Ctrl-C stops).")
@click.option("-n", "--tail", "tail", type=click.IntRange(min=0), metavar="N",
              help="Only the last N lines (then follow, with -f).")
@click.option("--raw", is_flag=True,
              help="The log's exact bytes, escape sequences included (by default control "
                   "characters are shown as escapes such as \\x1b).")
def view(job: str, follow: bool, tail: Optional[int], raw: bool) -> None:
    """Show a job's log: in the pager, or followed live with -f."""
    from git_tq import service
    from git_tq.safetext import visible_stream

    ctx = open_context()
    j, path, stored = service.log_to_view(ctx, job, follow=follow)  # refused if none here

    def write(chunks: Iterable[bytes]) -> None:
        for chunk in chunks if raw else visible_stream(chunks):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()

    if stored is not None:  # the file is gone: the copy kept in git
        lines = stored.splitlines(keepends=True)
        if tail is not None:
            write([b"".join(lines[-tail:] if tail else [])])
        else:
            page(stored, raw=raw)
        return
    if tail is not None and os.path.exists(path):
        with open(path, "rb") as fh:
            lines = fh.read().splitlines(keepends=True)
        write([b"".join(lines[-tail:] if tail else [])])
        if not follow:
            return
    elif not follow:
        page(path, raw=raw)
        return
    try:
        write(service.follow_log(ctx, job, from_start=tail is None))
    except KeyboardInterrupt:
        return


@cli.command(context_settings=CONTEXT)
@click.argument("folder", required=False, shell_complete=complete_folders)
@json_option
def hist(folder: Optional[str], as_json: bool) -> None:
    """The log tree: folders, then the logs of FOLDER (default: the root), numbered."""
    from git_tq import output, service

    tree = service.log_tree(open_context(), folder)
    if as_json:
        output.print_json({"folder": tree.folder, "folders": tree.folders,
                           "logs": [{"number": e.number, **e.view.to_json()}
                                    for e in tree.entries]})
        return
    e = output.esc
    lines = [output.styled(f"logs/{e(tree.folder)}" if tree.folder else "logs/", "bold")]
    lines += [output.styled(f"  {e(name)}/", "blue") for name in tree.folders]
    for entry in tree.entries:
        j = entry.view.job
        state = output.styled(f"{j.state.value:<9}", output.STATE_STYLES[j.state.value])
        note = output.styled(" — " + e(output.shorten(entry.view.note, 60)), "bold cyan") \
            if entry.view.note else ""
        tag = f" [{e(j.spec.tag)}]" if j.spec.tag else ""
        lines.append(f"  {entry.number:>3}. #{j.id:<5} {state} {e(j.spec.submitted_at[:16])}"
                     f"{tag} {e(os.path.basename(entry.path))}{note}")
    if not tree.folders and not tree.entries:
        lines.append("  (empty)")
    output.print_markup("\n".join(lines))


@cli.command(context_settings=CONTEXT)
@click.argument("job", shell_complete=complete_jobs)
@click.argument("folder", shell_complete=complete_folders)
def catg(job: str, folder: str) -> None:
    """File a job's log under FOLDER (e.g. archived/failed; created as needed)."""
    from git_tq import service

    say(f"filed: {service.file_log(open_context(), job, folder)}")


@cli.command(context_settings=CONTEXT)
@click.option("--once", is_flag=True, help="Print one frame and exit (the default off a "
              "terminal).")
@click.option("-a", "--all", "everywhere", is_flag=True,
              help="The jobs of every repository of the tq home, not only this one's.")
def top(once: bool, everywhere: bool) -> None:
    """Live dashboard: GPUs, running jobs, the queue, recent finishes (q quits)."""
    from git_tq import top as dashboard

    ctx = open_context()
    warn_broken(ctx.store.listing().unreadable)
    try:
        dashboard.run(ctx, once=once, everywhere=everywhere)
    except KeyboardInterrupt:
        return


# --- the daemon ---------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
def start() -> None:
    """Start the scheduler daemon in the background (`git tq run` does it by itself)."""
    from git_tq import service

    home = service.home_for()
    started = service.start_daemon(home)
    say(("daemon started" if started else "the daemon is already running")
        + f" (home {home.path})")


@cli.command(context_settings=CONTEXT)
def stop() -> None:
    """Stop the daemon. Running jobs keep running; the next daemon adopts them."""
    from git_tq import service

    home = service.home_for()
    click.echo("daemon stopped" if service.stop_daemon(home) else "the daemon was not running")


@cli.group(cls=TqGroup, context_settings=CONTEXT, invoke_without_command=True)
@click.option("--foreground", is_flag=True, help="Run the daemon in this terminal (for "
              "debugging and service managers such as systemd).")
@click.pass_context
def daemon(ctx: click.Context, foreground: bool) -> None:
    """The scheduler daemon: `git tq daemon --foreground`, `git tq daemon status`."""
    from git_tq import service

    if foreground:
        service.run_daemon(service.home_for())
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@daemon.command("status", context_settings=CONTEXT)
@json_option
def daemon_status(as_json: bool) -> None:
    """Whether the daemon runs, and what it is doing."""
    import time

    from git_tq import output, service

    home = service.home_for()
    status = service.daemon_status(home)
    paused = service.queue_pause(home)
    if as_json:
        output.print_json(status or {"running": False, "home": home.path,
                                     "paused": paused.to_json()})
        return
    if status is None:
        say(f"daemon: not running (home {home.path}); start it with `git tq start`")
        if paused.active:
            say(f"pause:  {paused.describe()}")
        sys.exit(1)
    counts = status.get("counts", {})
    say(f"daemon: running, pid {status['pid']}, version {status['version']}, up "
        f"{output.duration(time.time() - status['started'])}")
    say(f"home:   {status['home']}")
    say(f"socket: {status['socket']}")
    say(f"jobs:   {counts.get('running', 0)} running, {counts.get('pending', 0)} "
        f"pending, in {counts.get('repos', 0)} repositories")
    if paused.active:
        say(f"pause:  {paused.describe()}")
    for gpu, who in sorted(status.get("foreign", {}).items()):
        # `who` names a foreign process: its name is whatever that process chose
        say(f"GPU {gpu}: held by a {who}; nothing of ours runs there")


@cli.command(context_settings=CONTEXT)
@click.option("--gpu", "gpu_ids", metavar="IDS", shell_complete=complete_gpus,
              help="Only the queues of these GPUs: jobs that would start there wait.")
def pause(gpu_ids: Optional[str]) -> None:
    """Hold the queue: nothing new starts (running jobs go on) until `git tq resume`."""
    from git_tq import service

    change = service.change_pause(gpu_ids, hold=True)
    if change.gpus is not None and change.before.everything:
        say(f"the whole queue is paused already: {change.after.describe()}")
    else:
        say(change.after.describe())
    if change.daemon_hint:
        say(f"git tq: {change.daemon_hint}", err=True)


@cli.command(context_settings=CONTEXT)
@click.option("--gpu", "gpu_ids", metavar="IDS", shell_complete=complete_gpus,
              help="Only the queues of these GPUs.")
def resume(gpu_ids: Optional[str]) -> None:
    """Release the queue held by `git tq pause` (all of it, or these GPUs' queues)."""
    from git_tq import service

    change = service.change_pause(gpu_ids, hold=False)
    if not change.before.active:
        say("the queue was not paused")
    elif change.gpus is not None and not set(change.gpus) & set(change.before.gpus):
        say(f"GPU {','.join(map(str, change.gpus))} was not paused; "
            f"{change.after.describe()}")
    else:
        say("queue resumed" if not change.after.active else change.after.describe())
    if change.daemon_hint:
        say(f"git tq: {change.daemon_hint}", err=True)


@cli.command("kill", context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@click.option("--now", is_flag=True, help="SIGKILL at once, without the grace period.")
def kill_cmd(jobs: tuple[str, ...], now: bool) -> None:
    """Stop running jobs (stop signal, grace, SIGKILL) and mark them cancelled."""
    from git_tq import service

    ids = service.kill_jobs(open_context(), jobs, now=now)
    click.echo(f"stopping job{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}")


@cli.command("edit", context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@click.option("-p", "--priority", type=int, default=None,
              help="New priority (pending or running: may preempt, or be preempted, at once).")
@click.option("-g", "--grace", type=click.IntRange(min=0), default=None,
              help="New grace period in seconds (pending or running).")
@click.option("-t", "--tag", default=None, help="New tag ('' removes it; pending only).")
@after_options
@click.option("--gpu", "gpu_ids", metavar="IDS", help="Exactly these GPUs (pending only).")
@click.option("--gpus", "gpu_count", type=click.IntRange(min=0), metavar="N",
              help="Any N free GPUs (pending only).")
@click.option("--cpu", is_flag=True, help="No GPU: a CPU slot (pending only).")
@click.option("--time", "time_limit", metavar="DURATION",
              help="New time limit over all attempts (90s, 45m, 2h, 1d12h; none removes "
                   "it; pending or running).")
def edit_cmd(jobs: tuple[str, ...], priority: Optional[int], grace: Optional[int],
             tag: Optional[str], after: tuple[str, ...], after_any: tuple[str, ...],
             gpu_ids: Optional[str], gpu_count: Optional[int], cpu: bool,
             time_limit: Optional[str]) -> None:
    """Change the options of pending jobs (of running ones: priority, grace and time).

    --after and --after-any replace the job's list (`none` empties it). Each change
    is recorded as an `edited` lifecycle commit.
    """
    from git_tq import service

    req = service.EditRequest(priority=priority, grace=grace, tag=tag,
                              after=after or None, after_any=after_any or None,
                              gpu_ids=gpu_ids, gpu_count=gpu_count, cpu=cpu,
                              time_limit=time_limit)
    for edited in service.edit(open_context(), jobs, req):
        say(f"job {edited.job.id}: {edited.changes}" if edited.changes
            else f"job {edited.job.id}: unchanged")


@cli.command("wait", context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@click.option("--timeout", type=click.FloatRange(min=0), metavar="S",
              help="Give up after S seconds (exit status 124); the jobs go on.")
@json_option
def wait_cmd(jobs: tuple[str, ...], timeout: Optional[float], as_json: bool) -> None:
    """Wait until JOBS have ended: exit 0 if all are done, else 1 (each one that is not
    is named on stderr)."""
    from git_tq import output, service
    from git_tq.errors import UsageError, WaitTimedOut

    if timeout is not None and not timeout < float("inf"):  # FloatRange lets nan through
        raise UsageError(f"bad --timeout {timeout}: give a number of seconds")
    ctx = open_context()
    found = service.jobs_to_wait_for(ctx, jobs)
    hint = service.waiting_hint(ctx, found)
    if hint:
        say(f"git tq: {hint}", err=True)
    waited = service.wait_for(ctx, found, timeout=timeout)
    if as_json:
        output.print_json([v.to_json() for v in waited.views])
    if waited.active:
        more = len(waited.active) - 10
        raise WaitTimedOut(f"timed out after {timeout or 0:g}s: "
                           + ", ".join(service.describe_ending(j) for j in waited.active[:10])
                           + (f" and {more} more" if more > 0 else ""))
    for job in waited.unsuccessful:
        say(service.describe_ending(job), err=True)
    sys.exit(1 if waited.unsuccessful else 0)


@cli.command(context_settings={**CONTEXT, "allow_interspersed_args": False})
@click.argument("job")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-q", "--quiet", is_flag=True, help="Print only the new job id.")
def requeue(job: str, command: tuple[str, ...], quiet: bool) -> None:
    """Submit a finished job's code again, as a new job, with your current environment.

    Your own job keeps its command unless COMMAND is given. A job you did not
    submit here (fetched) is only code to you: give the command,
    `git tq requeue 12 -- python train.py`.
    """
    from git_tq import service

    if command[:1] == ("--",):
        command = command[1:]
    result = service.requeue(open_context(), job, command=command)
    for w in result.warnings:
        say(f"git tq: {w}", err=True)
    if result.daemon_hint:
        say(f"git tq: {result.daemon_hint}", err=True)
    say(str(result.job.id) if quiet else
               f"job {result.job.id} queued: {result.job.spec.command_line()} (code of job {job})")


@cli.command(context_settings=CONTEXT)
@click.option("--restore", is_flag=True,
              help="Move each tampered job ref back to the record git tq last wrote.")
@click.option("--adopt", "adopt", metavar="JOB", multiple=True,
              help="Vouch for a job an older git tq queued here (it shows as fetched).")
@json_option
def doctor(restore: bool, adopt: tuple[str, ...], as_json: bool) -> None:
    """Explain job records that are tampered, unreadable, or not yours."""
    from git_tq import output, service

    ctx = open_context()
    for token in adopt:
        first = service.adopt(ctx, token)
        say(f"job {first.id} adopted: it is yours again and runs {first.spec.command_line()}")
    if adopt:
        return
    found = service.doctor(ctx, restore=restore)
    if as_json:
        output.print_json([{"job": f.job, "problem": f.problem, "explanation": f.explanation,
                            "fix": f.fix} for f in found])
        return
    if not found:
        output.echo("all job records are readable, and yours are as git tq wrote them")
        return
    for f in found:
        output.echo(f"job {f.job}: {f.problem}: {f.explanation}")
        if f.fix:
            output.echo(f"  fix: {f.fix}")
    if any(f.problem in ("tampered", "unreadable") for f in found):
        sys.exit(1)


@cli.command(context_settings=CONTEXT)
@click.option("--outputs", "--kept", "kept", is_flag=True,
              help="Also remove worktrees kept because their jobs wrote files that are not "
                   "recorded in git (over the tq.outputs limits).")
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
def gc(kept: bool, jobs: tuple[str, ...]) -> None:
    """Remove worktrees left by finished jobs (only JOBS', if given)."""
    from git_tq import service

    done = service.gc(open_context(), kept=kept, tokens=jobs)
    n = len(done.removed)
    click.echo(f"removed {n} worktree{'s' if n != 1 else ''}")
    for job_id, record in done.kept:
        say(f"job {job_id}: {record.path} {record.reason}")
    if done.kept:
        say(f"(git tq gc --outputs{' ' + ' '.join(jobs) if jobs else ''} removes "
            f"{'them' if len(done.kept) > 1 else 'it'})")
    from git_tq.errors import broken_ref_text

    for u in done.broken:
        say(f"job {u.name} is broken: {broken_ref_text(u.name, u.tip)}")


# --- sharing ---------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.argument("remote", required=False)
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be pushed; change nothing.")
def push(remote: Optional[str], dry_run: bool) -> None:
    """Push this machine's jobs, notes and stored logs to REMOTE (default: the current
    branch's remote, else origin), as refs/tq/origins/USER@HOST/jobs/ID."""
    from git_tq import service

    say(service.push_jobs(open_context(), remote, dry_run=dry_run).summary())


@cli.command(context_settings=CONTEXT)
@click.argument("remote", required=False)
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be fetched; change "
              "nothing.")
def fetch(remote: Optional[str], dry_run: bool) -> None:
    """Fetch everyone else's jobs from REMOTE (named USER@HOST:ID here, read-only) and
    merge its notes into ours."""
    from git_tq import service

    say(service.fetch_jobs(open_context(), remote, dry_run=dry_run).summary())


# --- entry point -------------------------------------------------------------------


def _crash(exc: BaseException) -> int:
    try:
        import traceback

        from git_tq.home import Home, default_home, open_private

        path = Home(default_home({}, os.environ)).crash_log()
        # 0600 (tightened if older): tracebacks show arguments and paths
        with open(open_private(path), "a", encoding="utf-8") as fh:
            fh.write(f"--- git tq {__version__} {sys.argv!r}\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        where = f"details in {path}"
    except OSError:
        where = "no crash log could be written"
    sys.stderr.write(visible(f"git tq: internal error: {type(exc).__name__}: {exc} ({where})")
                     + "\n")
    return EXIT_CRASH


_DOING = {"run": "submitting the job", "note": "writing the note", "rm": "removing jobs",
          "edit": "editing jobs", "requeue": "requeueing jobs", "kill": "killing jobs"}


def _doing(args: Sequence[str]) -> str:
    """What a command line was doing, for a message (`submitting the job`)."""
    name = next((a for a in args if not a.startswith("-")), "")
    return _DOING.get(name, f"running git tq {name}".rstrip())


def _no_space(args: Sequence[str]) -> NoReturn:
    # Every write of ours is a compare-and-swap or a temp file + rename: nothing is left
    # half-written, and the same command can simply be run again.
    sys.stderr.write(f"git tq: no space left on device while {_doing(args)}: free some "
                     "space and retry\n")
    sys.exit(EXIT_USER)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the CLI; every failure becomes one line on stderr and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(args=args, prog_name="git tq", standalone_mode=False,
                        complete_var="_GIT_TQ_COMPLETE")
        sys.exit(code if isinstance(code, int) else 0)
    except NoSpace:
        _no_space(args)
    except TqError as exc:
        sys.stderr.write(visible(f"git tq: {exc}") + "\n")
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        from git_tq import snapshot

        snapshot.abandon()  # a head start removes its temporary index before we exit
        sys.stderr.write("git tq: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        where: Optional[click.Context] = getattr(exc, "ctx", None)
        name = where.info_name if where is not None else None
        hint = f" (see git tq {name} -h)" if name and name != "git tq" else " (see git tq -h)"
        sys.stderr.write(visible(f"git tq: {exc.format_message()}{hint}") + "\n")
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except BrokenPipeError:
        # `git tq ls | head`: the reader left; that is not an error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            sys.exit(_crash(exc))
        _no_space(args)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are caught
        sys.exit(_crash(exc))
