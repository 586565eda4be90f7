"""The `git-tq` command line: click wiring from arguments to `service`, and printing.

No logic lives here: each command parses, calls one service function, prints.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

import click

from git_tq import __version__
from git_tq.errors import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_USAGE, TqError

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
ALIASES = {"st": "ls"}


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
    from git_tq.service import Context

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
        if str(v.job.id).startswith(incomplete):
            items.append(CompletionItem(str(v.job.id),
                                        help=f"{v.job.state.value}: {v.job.spec.command_line()}"))
    return items


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
              help="Seconds between SIGTERM and SIGKILL when preempted [180].")
@click.option("-t", "--tag", help="A short label (also used in the log file name).")
@click.option("-e", "--env", "env_name", help="Conda env name, or a virtualenv/conda prefix path.")
@click.option("--gpu", "gpu_ids", metavar="IDS", help="Exactly these GPUs, e.g. 0 or 0,1.")
@click.option("--gpus", "gpu_count", type=click.IntRange(min=0), metavar="N",
              help="Any N free GPUs.")
@click.option("--cpu", is_flag=True, help="No GPU: run in a CPU slot.")
@click.option("--sh", "shell", flag_value=True, default=None,
              help="Run the command through `sh -c` (automatic for one quoted string).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the job id.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run(priority: Optional[int], grace: Optional[int], tag: Optional[str],
        env_name: Optional[str], gpu_ids: Optional[str], gpu_count: Optional[int], cpu: bool,
        shell: Optional[bool], quiet: bool, command: tuple[str, ...]) -> None:
    """Snapshot the work tree and queue COMMAND as a job.

    Options end at the first word that is not an option (or at `--`).
    """
    from git_tq import service
    from git_tq.model import DEFAULT_GRACE, DEFAULT_PRIORITY

    ctx = open_context()
    req = service.SubmitRequest(
        command=command,
        priority=DEFAULT_PRIORITY if priority is None else priority,
        grace=DEFAULT_GRACE if grace is None else grace,
        tag=tag, env=env_name, gpu_ids=gpu_ids, gpu_count=gpu_count, cpu=cpu, shell=shell,
    )
    result = service.submit(ctx, req)
    for w in result.warnings:
        click.echo(f"git tq: warning: {w}", err=True)
    if result.daemon_hint:
        click.echo(f"git tq: {result.daemon_hint}", err=True)
    job = result.job
    if quiet:
        click.echo(str(job.id))
        return
    src = job.source[:10] if job.source else "no commit yet"
    click.echo(f"job {job.id} queued (priority {job.spec.priority}, gpus "
               f"{job.spec.gpus.describe()}): {job.spec.command_line()}")
    click.echo(f"  code: {src} + {job.changes.describe()}; snapshot {job.snapshot[:10]}")


# --- listing and showing ---------------------------------------------------------------


@cli.command("ls", context_settings=CONTEXT)
@click.option("-a", "--all", "show_all", is_flag=True, help="Every job, finished ones too.")
@click.option("-s", "--state", "states", multiple=True,
              help="Only jobs in this state (pending, running, stopping, done, failed, "
                   "cancelled, active); repeat or comma-separate.")
@click.option("-t", "--tag", "tags", multiple=True, help="Only jobs with this tag.")
@json_option
def ls_cmd(show_all: bool, states: tuple[str, ...], tags: tuple[str, ...],
           as_json: bool) -> None:
    """List jobs: the active queue by default (alias: st)."""
    from git_tq import output, service

    views = service.list_jobs(open_context(), include_finished=show_all, states=states,
                              tags=tags)
    if as_json:
        output.print_json([v.to_json() for v in views])
        return
    if not views:
        output.echo("no jobs" if show_all or states or tags else
                    "no active jobs (git tq ls --all shows finished ones)")
        return
    rows, styles = [], []
    for v in views:
        j = v.job
        if j.state.value in ("running", "stopping"):
            when = output.since(j.started_at)
        elif j.state.finished:
            when = output.since(j.started_at, j.ended_at) if j.started_at else "-"
        else:
            when = output.since(j.spec.submitted_at) + " ago"
        state = j.state.value
        if j.state.value == "failed":
            state += f" ({j.exit_code})" if j.signal is None else f" (sig {j.signal})"
        gpus = ",".join(map(str, j.assigned_gpus)) if j.assigned_gpus else \
            j.spec.gpus.describe()
        rows.append([str(j.id), state, str(j.spec.priority), gpus, j.spec.tag or "",
                     output.shorten(j.spec.command_line(), 60), when,
                     output.shorten(v.note or "", 40)])
        styles.append(output.STATE_STYLES.get(j.state.value))
    output.print_table(["ID", "STATE", "PRI", "GPUS", "TAG", "COMMAND", "TIME", "NOTE"],
                       rows, styles)


@cli.command(context_settings=CONTEXT)
@click.argument("job", shell_complete=complete_jobs)
@json_option
def show(job: str, as_json: bool) -> None:
    """Show a job's whole record: spec, code, lifecycle, note, log."""
    from git_tq import output, service

    detail = service.show_job(open_context(), job)
    data = detail.view.to_json()
    if as_json:
        data["lifecycle"] = [
            {"commit": c, "event": r.event, "state": r.state.value, "detail": r.detail,
             "at": (r.ended_at or r.started_at or r.spec.submitted_at)
             if r.event != "submitted" else r.spec.submitted_at}
            for c, r in detail.lifecycle
        ]
        output.print_json(data)
        return
    j, s = detail.view.job, detail.view.job.spec
    e = output.esc
    lines = [
        f"{output.styled(f'job {j.id}', 'bold')}  "
        f"{output.styled(j.state.value, output.STATE_STYLES[j.state.value])}"
        + (f"  (exit {j.exit_code})" if j.exit_code is not None else "")
        + (f"  (signal {j.signal})" if j.signal is not None else ""),
        f"command    {e(s.command_line())}" + ("   [sh -c]" if s.shell else ""),
        f"priority   {s.priority}    grace {s.grace}s    gpus {s.gpus.describe()}"
        + (f" (holding {','.join(map(str, j.assigned_gpus))})" if j.assigned_gpus else ""),
        f"tag        {e(s.tag or '-')}    env {e(s.env or '-')}    cwd {e(s.cwd or '.')}",
        f"submitted  {s.submitted_at} by {e(s.user)}@{e(s.host)}",
        f"source     {j.source or '(unborn branch)'}",
        f"snapshot   {j.snapshot}  ({j.changes.describe()} vs source)",
        f"attempts   {j.attempt}"
        + (f"    started {j.started_at}" if j.started_at else "")
        + (f"    ended {j.ended_at}" if j.ended_at else ""),
        f"log        {e(detail.view.log)}"
        + (f"  [{e(detail.view.category)}]" if detail.view.category else ""),
        f"restore    git tq checkout {j.id}   (or -b BRANCH, --worktree PATH)",
    ]
    if detail.view.note:
        lines.append("note       " + output.styled(e(detail.view.note), "cyan"))
    lines.append("lifecycle")
    for commit, rec in detail.lifecycle:
        at = rec.spec.submitted_at if rec.event == "submitted" else \
            (rec.ended_at if rec.state.finished else rec.started_at) or ""
        if rec.event in ("preempted", "cancelled", "stopping"):
            at = ""
        extra = f"  {e(rec.detail)}" if rec.detail else ""
        lines.append(f"  {commit[:10]}  {rec.event:<12} -> {rec.state.value:<9} {at}{extra}")
    output.print_markup("\n".join(lines))


@cli.command("log", context_settings=CONTEXT)
@click.argument("revisions", nargs=-1)
@json_option
def log_cmd(revisions: tuple[str, ...], as_json: bool) -> None:
    """History with the jobs run on each commit (commits without jobs are folded)."""
    from git_tq import output, service

    entries = service.history(open_context(), revisions)
    if as_json:
        output.print_json([
            {"commit": en.commit, "subject": en.subject, "jobs": [v.to_json() for v in en.jobs]}
            for en in entries
        ])
        return
    e = output.esc
    lines: list[str] = []
    folded = 0

    def flush() -> None:
        nonlocal folded
        if folded:
            lines.append(output.styled(f"  ⋮ {folded} commit{'s' if folded > 1 else ''} "
                                       "without jobs", "dim"))
            folded = 0

    for en in entries:
        if not en.jobs:
            folded += 1
            continue
        flush()
        lines.append(f"{output.styled(en.short, 'yellow')} {e(en.subject)}"
                     + (output.styled(f" ({en.when})", "dim") if en.when else ""))
        for v in sorted(en.jobs, key=lambda v: v.job.id):
            j = v.job
            status = j.state.value
            if j.exit_code is not None:
                status += f" exit {j.exit_code}"
            elif j.signal is not None:
                status += f" signal {j.signal}"
            runtime = output.since(j.started_at, j.ended_at) if j.started_at else "-"
            bits = [f"  #{j.id:<5}", output.styled(f"{status:<14}",
                                                   output.STATE_STYLES[j.state.value]),
                    f"{runtime:>8}"]
            if j.spec.tag:
                bits.append(output.styled(f"[{e(j.spec.tag)}]", "blue"))
            bits.append(e(output.shorten(j.spec.command_line(), 50)))
            if j.changes.total:
                bits.append(output.styled(f"(+{j.changes.total} files differ)", "magenta"))
            if v.note:
                bits.append(output.styled("— " + e(output.shorten(v.note, 60)), "cyan"))
            lines.append(" ".join(bits))
    flush()
    output.print_markup("\n".join(lines) if lines else "no commits")


# --- code ----------------------------------------------------------------------


@cli.command(cls=PathspecCommand, context_settings=CONTEXT)
@click.argument("job")
@click.argument("job2", required=False)
@click.option("--stat", is_flag=True, help="Only a summary of changed files.")
@click.pass_context
def diff(ctx: click.Context, job: str, job2: Optional[str], stat: bool) -> None:
    """Code difference between JOB and the work tree, or between JOB and JOB2.

    Limit it to some paths after `--`: git tq diff 12 15 -- src/
    """
    from git_tq import service

    paths = ctx.meta.get("pathspec", [])
    sys.exit(service.run_diff(open_context(), job, job2, stat, paths))


@cli.command(context_settings=CONTEXT)
@click.argument("job")
@click.option("-b", "--branch", help="Create this branch at the job's snapshot.")
@click.option("--worktree", type=click.Path(), help="Check out into a new worktree here.")
@click.option("-f", "--force", is_flag=True, help="Overwrite uncommitted changes.")
def checkout(job: str, branch: Optional[str], worktree: Optional[str], force: bool) -> None:
    """Bring back the code a job ran: into the work tree, a new branch, or a worktree."""
    from git_tq import service

    click.echo(service.checkout(open_context(), job, branch=branch, worktree=worktree,
                                force=force))


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
    click.echo(f"note {'removed from' if remove else 'saved on'} job {j.id}")


@cli.command(context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@click.option("--forget", is_flag=True, help="Delete the records of finished jobs instead.")
@click.option("--log", "logs", is_flag=True, help="Delete the jobs' log files instead "
              "(records stay).")
@click.option("-y", "--yes", is_flag=True, help="With --log: do not ask for confirmation.")
def rm(jobs: tuple[str, ...], forget: bool, logs: bool, yes: bool) -> None:
    """Remove pending jobs from the queue (JOBS: `1 3 5` or `1,3,5`)."""
    from git_tq import service
    from git_tq.errors import TqError, UsageError

    ctx = open_context()
    if logs:
        if forget:
            raise UsageError("give --log or --forget, not both")
        tokens = service.parse_job_tokens(jobs)
        if not yes:
            if not sys.stdin.isatty():
                raise TqError("refusing to delete logs without -y (no terminal to ask on)")
            if not click.confirm(f"Delete the log of job {', '.join(tokens)}? "
                                 "(the job records stay)"):
                click.echo("nothing deleted")
                return
        for token in tokens:
            click.echo(f"deleted {service.remove_log(ctx, token)}")
        return
    for r in service.remove(ctx, jobs, forget=forget):
        click.echo(f"job {r.job_id} {r.outcome}")


@cli.command(context_settings=CONTEXT)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(yes: bool) -> None:
    """Remove every pending job from the queue."""
    from git_tq import service
    from git_tq.errors import TqError

    ctx = open_context()
    pending = service.pending_jobs(ctx)
    if not pending:
        click.echo("no pending jobs")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise TqError(f"refusing to purge {len(pending)} pending jobs without -y")
        if not click.confirm(f"Remove {len(pending)} pending jobs from the queue?"):
            click.echo("nothing removed")
            return
    ids = service.purge(ctx)
    click.echo(f"{len(ids)} pending jobs removed: {', '.join(map(str, ids))}")


# --- logs ------------------------------------------------------------------------------


def page(path: str) -> None:
    """Show a file in the pager on a terminal ($GIT_PAGER, $PAGER, else less -R); else print."""
    import shlex
    import subprocess

    if not sys.stdout.isatty():
        with open(path, "rb") as fh:
            sys.stdout.buffer.write(fh.read())
        return
    pager = os.environ.get("GIT_PAGER") or os.environ.get("PAGER") or "less -R"
    with open(path, "rb") as fh:
        subprocess.call(shlex.split(pager), stdin=fh)


@cli.command(context_settings=CONTEXT)
@click.argument("job", shell_complete=complete_jobs)
@click.option("-f", "--follow", is_flag=True,
              help="Follow the log as it grows, until the job ends (Ctrl-C stops).")
@click.option("-n", "--tail", "tail", type=click.IntRange(min=0), metavar="N",
              help="Only the last N lines (then follow, with -f).")
def view(job: str, follow: bool, tail: Optional[int]) -> None:
    """Show a job's log: in the pager, or followed live with -f."""
    from git_tq import service

    ctx = open_context()
    j, path = service.job_log(ctx, job)
    if not os.path.exists(path) and not follow:
        raise TqError(f"job {j.id} has no log yet ({j.state.value}); "
                      f"`git tq view -f {j.id}` waits for it")
    if tail is not None and os.path.exists(path):
        with open(path, "rb") as fh:
            lines = fh.read().splitlines(keepends=True)
        sys.stdout.buffer.write(b"".join(lines[-tail:] if tail else []))
        sys.stdout.flush()
        if not follow:
            return
    elif not follow:
        page(path)
        return
    try:
        for chunk in service.follow_log(ctx, job, from_start=tail is None):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
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
    lines = [output.styled(f"logs/{tree.folder}" if tree.folder else "logs/", "bold")]
    lines += [output.styled(f"  {e(name)}/", "blue") for name in tree.folders]
    for entry in tree.entries:
        j = entry.view.job
        state = output.styled(f"{j.state.value:<9}", output.STATE_STYLES[j.state.value])
        note = output.styled(" — " + e(output.shorten(entry.view.note, 60)), "bold cyan") \
            if entry.view.note else ""
        tag = f" [{e(j.spec.tag)}]" if j.spec.tag else ""
        lines.append(f"  {entry.number:>3}. #{j.id:<5} {state} {j.spec.submitted_at[:16]}"
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

    click.echo(f"filed: {service.file_log(open_context(), job, folder)}")


@cli.command(context_settings=CONTEXT)
@click.option("--once", is_flag=True, help="Print one frame and exit (the default off a "
              "terminal).")
def top(once: bool) -> None:
    """Live dashboard: GPUs, running jobs, the queue, recent finishes (q quits)."""
    from git_tq import top as dashboard

    try:
        dashboard.run(open_context(), once=once)
    except KeyboardInterrupt:
        return


# --- the daemon ---------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
def start() -> None:
    """Start the scheduler daemon in the background (`git tq run` does it by itself)."""
    from git_tq import service

    home = service.home_for()
    started = service.start_daemon(home)
    click.echo(("daemon started" if started else "the daemon is already running")
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
    if as_json:
        output.print_json(status or {"running": False, "home": home.path})
        return
    if status is None:
        click.echo(f"daemon: not running (home {home.path}); start it with `git tq start`")
        sys.exit(1)
    counts = status.get("counts", {})
    click.echo(f"daemon: running, pid {status['pid']}, version {status['version']}, up "
               f"{output.duration(time.time() - status['started'])}")
    click.echo(f"home:   {status['home']}")
    click.echo(f"socket: {status['socket']}")
    click.echo(f"jobs:   {counts.get('running', 0)} running, {counts.get('pending', 0)} "
               f"pending, in {counts.get('repos', 0)} repositories")
    for gpu, who in sorted(status.get("foreign", {}).items()):
        click.echo(f"GPU {gpu}: held by a {who}; nothing of ours runs there")


@cli.command("kill", context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@click.option("--now", is_flag=True, help="SIGKILL at once, without the grace period.")
def kill_cmd(jobs: tuple[str, ...], now: bool) -> None:
    """Stop running jobs (SIGTERM, grace, SIGKILL) and mark them cancelled."""
    from git_tq import service

    ids = service.kill_jobs(open_context(), jobs, now=now)
    click.echo(f"stopping job{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}")


@cli.command(context_settings=CONTEXT)
@click.argument("job")
@click.option("-q", "--quiet", is_flag=True, help="Print only the new job id.")
def requeue(job: str, quiet: bool) -> None:
    """Submit a finished job's code and command again, as a new job."""
    from git_tq import service

    result = service.requeue(open_context(), job)
    if result.daemon_hint:
        click.echo(f"git tq: {result.daemon_hint}", err=True)
    click.echo(str(result.job.id) if quiet else
               f"job {result.job.id} queued: {result.job.spec.command_line()} (code of job {job})")


@cli.command(context_settings=CONTEXT)
def gc() -> None:
    """Remove worktrees left by finished jobs."""
    from git_tq import service

    removed = service.gc(open_context())
    click.echo(f"removed {len(removed)} worktree{'s' if len(removed) != 1 else ''}")


# --- entry point -------------------------------------------------------------------


def _crash(exc: BaseException) -> int:
    try:
        from git_tq.home import Home, default_home

        path = Home(default_home({}, os.environ)).crash_log()
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- git tq {__version__} {sys.argv!r}\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        where = f"details in {path}"
    except OSError:
        where = "no crash log could be written"
    sys.stderr.write(f"git tq: internal error: {type(exc).__name__}: {exc} ({where})\n")
    return EXIT_CRASH


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the CLI; every failure becomes one line on stderr and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(args=args, prog_name="git tq", standalone_mode=False,
                        complete_var="_GIT_TQ_COMPLETE")
        sys.exit(code if isinstance(code, int) else 0)
    except TqError as exc:
        sys.stderr.write(f"git tq: {exc}\n")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.stderr.write("git tq: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        where: Optional[click.Context] = getattr(exc, "ctx", None)
        name = where.info_name if where is not None else None
        hint = f" (see git tq {name} -h)" if name and name != "git tq" else " (see git tq -h)"
        sys.stderr.write(f"git tq: {exc.format_message()}{hint}\n")
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except KeyboardInterrupt:
        sys.stderr.write("git tq: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `git tq ls | head`: the reader left; that is not an error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are caught
        sys.exit(_crash(exc))
