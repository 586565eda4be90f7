"""`git tq top`: the live full-screen dashboard (rich), redrawn when jobs change.

GPUs with what holds them, running jobs with their last log line, the queue
in order, and recent finishes. `q` or Ctrl-C quits.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from git_tq import output, service
from git_tq.safetext import visible

STYLES = output.STATE_STYLES
MIN_WIDTH = {"ID": 4, "STATE": 9, "PRI": 4, "GPUS": 5, "ELAPSED": 8, "EXIT": 11, "RAN": 7,
             "ENDED": 8, "#": 3, "TAG": 8, "WAITING": 8, "REPO": 6}
RATIO = {"COMMAND": 2, "LAST LOG LINE": 2, "REASON": 1}
EDIT_KEYS = tuple(service.QUICK_EDITS)  # a key that starts an edit line: `p 3 10` Enter


def quick_edit(ctx: service.Context, board: service.Dashboard, line: str) -> str:
    """Carry out an edit line typed in `top` (`p 3 10`: priority 10 for the third
    waiting job); what to show the user."""
    from git_tq.errors import TqError

    words = line.split(maxsplit=2)
    if len(words) != 3 or not (words[1].isascii() and words[1].isdigit()):
        return "edit: p|g|t N VALUE (N: the # of a waiting job)"
    number = int(words[1])
    if not 1 <= number <= len(board.queue):
        return f"edit: no waiting job #{number}"
    chosen = board.queue[number - 1]
    if not chosen.here:
        return f"edit: job {chosen.job.id} is in {chosen.repo}: run top there to edit it"
    try:
        request = service.quick_edit_request(words[0], words[2])
        edited = service.edit(ctx, [str(chosen.job.id)], request)
    except TqError as exc:
        return f"edit: {exc}"
    return f"job {chosen.job.id}: {edited[0].changes or 'unchanged'}"


def render(board: service.Dashboard, title: str, status: str = "") -> Group:
    """The frame. Every cell that holds record data, a log line, a process or GPU
    name is passed through safetext.visible: none may send a raw escape sequence."""
    v = visible
    title = v(title)
    gpus = Table(box=None, expand=True, header_style="bold")
    for col in ("GPU", "NAME", "UTIL", "MEMORY", "HELD BY"):
        gpus.add_column(col)
    for row in board.gpus:
        d = row.details
        mem = f"{int(d['mem_used']) / 2**30:.1f}/{int(d['mem_total']) / 2**30:.0f} GiB" \
            if "mem_total" in d else "-"
        if row.foreign:
            who = Text(v(row.foreign), style="bold red")
        elif row.holders:  # from whichever repository of the tq home holds it
            who = Text(v(", ".join(f"job {b.job.id}{'' if b.here else ' of ' + b.repo} "
                                   f"{b.job.spec.command_line()[:40]}"
                                   for b in row.holders)), style="green")
        elif board.pause.holds_gpus([row.id]):
            who = Text("paused", style="yellow")
        else:
            who = Text("free", style="dim")
        gpus.add_row(str(row.id), Text(v(str(d.get("name", "-")))),
                     f"{d['util']}%" if "util" in d else "-", mem, who)
    # With --all, each job panel starts with the job's repository.
    repo_col = ("REPO",) if board.everywhere else ()

    def where(b: service.BoardJob) -> tuple[Text, ...]:
        return (Text(v(b.repo), style="blue"),) if board.everywhere else ()

    running = Table(box=None, expand=True, header_style="bold")
    for col in (*repo_col, "ID", "STATE", "PRI", "GPUS", "ELAPSED", "COMMAND",
                "LAST LOG LINE"):
        running.add_column(col, overflow="ellipsis", no_wrap=True,
                           min_width=MIN_WIDTH.get(col), ratio=RATIO.get(col))
    for b in board.running:
        job = b.job
        running.add_row(*where(b), str(job.id),
                        Text(job.state.value, style=STYLES[job.state.value]),
                        str(job.spec.priority),
                        ",".join(map(str, job.assigned_gpus or ())) or "cpu",
                        output.since(job.started_at), Text(v(job.spec.command_line())),
                        Text(v(b.last_line), style="dim"))
    queue = Table(box=None, expand=True, header_style="bold")
    for col in ("#", *repo_col, "ID", "PRI", "GPUS", "TAG", "COMMAND", "WAITING", "REASON"):
        queue.add_column(col, overflow="ellipsis", no_wrap=True,
                         min_width=MIN_WIDTH.get(col), ratio=RATIO.get(col))
    for n, b in enumerate(board.queue, 1):
        job = b.job
        queue.add_row(str(n), *where(b), str(job.id), str(job.spec.priority),
                      job.spec.gpus.describe(), Text(v(job.spec.tag or "")),
                      Text(v(job.spec.command_line())), output.since(job.spec.submitted_at),
                      Text(v(b.reason or ""), style="dim"))
    done = Table(box=None, expand=True, header_style="bold")
    for col in (*repo_col, "ID", "STATE", "EXIT", "RAN", "ENDED", "COMMAND"):
        done.add_column(col, overflow="ellipsis", no_wrap=True,
                        min_width=MIN_WIDTH.get(col), ratio=RATIO.get(col))
    for b in board.finished:
        job = b.job
        code = (job.outcome or "").replace("exit ", "").replace("signal ", "sig ")
        done.add_row(*where(b), str(job.id), Text(job.state.value, style=STYLES[job.state.value]),
                     code,
                     output.since(job.started_at, job.ended_at) if job.started_at else "-",
                     Text(v((job.ended_at or "")[11:19])), Text(v(job.spec.command_line())))
    daemon = board.daemon
    head = Text(f"git tq top — {title}{' and every repository' if board.everywhere else ''}"
                " — ", style="bold")
    head.append(f"daemon pid {daemon['pid']}" if daemon else
                "daemon NOT running (git tq start)", style="green" if daemon else "bold red")
    if board.pause.active:
        head.append(f"   {board.pause.short().upper()} (git tq resume)", style="bold yellow")
    head.append("   q: quit   p/g/t N VALUE: edit waiting job #N", style="dim")
    if status:
        head.append(f"\n{v(status)}", style="bold")
    held = f" — {board.pause.short()}" if board.pause.active else ""
    return Group(head, Panel(gpus, title="GPUs"),
                 Panel(running, title=f"running ({len(board.running)})"),
                 Panel(queue, title=v(f"queue ({len(board.queue)}){held}")),
                 Panel(done, title="recent finishes"))


@contextlib.contextmanager
def keys() -> Iterator[Any]:
    """stdin in cbreak mode (single key presses, no echo) while the dashboard runs."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def run(ctx: service.Context, once: bool = False, interval: float = 1.0,
        everywhere: bool = False) -> None:
    title = os.path.basename(ctx.repo.toplevel or ctx.repo.common_dir)

    def board() -> service.Dashboard:
        return service.dashboard(ctx, everywhere=everywhere)

    if once or not sys.stdout.isatty():
        output_console().print(render(board(), title))
        return
    with keys() as fd, Live(render(board(), title), screen=True,
                            auto_refresh=False, console=output_console()) as live:
        signature = service.refs_signature(ctx)
        last_draw = time.monotonic()
        shown = board()
        typing: str | None = None  # an edit line being typed, None when none
        status = ""
        while True:
            typed = False
            if fd is not None:
                ready = select.select([fd], [], [], 0.2)[0]
                key = os.read(fd, 1) if ready else b""
                if typing is None and key in (b"q", b"Q"):
                    return
                if typing is None and key.decode(errors="replace") in EDIT_KEYS:
                    typing, typed = key.decode(), True
                elif typing is not None and key in (b"\r", b"\n"):
                    status, typing, typed = quick_edit(ctx, shown, typing), None, True
                elif typing is not None and key == b"\x1b":
                    status, typing, typed = "", None, True
                elif typing is not None and key in (b"\x7f", b"\b"):
                    typing, typed = typing[:-1] or None, True
                elif typing is not None and key and 32 <= key[0] < 127:
                    typing, typed = typing + key.decode(), True
            else:
                time.sleep(0.2)
            now_sig = service.refs_signature(ctx)
            if typed or now_sig != signature or time.monotonic() - last_draw >= interval:
                if now_sig != signature or time.monotonic() - last_draw >= interval:
                    shown = board()
                signature = now_sig
                last_draw = time.monotonic()
                line = f"edit: {typing}_" if typing is not None else status
                live.update(render(shown, title, line), refresh=True)


def output_console() -> Any:
    from rich.console import Console

    return Console(no_color=bool(os.environ.get("NO_COLOR")))
