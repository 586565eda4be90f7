"""Processes: identity that survives pid reuse, stopping jobs, and killing process trees.

A process is named by (pid, start time), never by a bare pid: a restarted
daemon must not signal a stranger that happens to reuse a job's pid.

A stop (preemption, kill) sends ONE signal to the job's main process, as
systemd's KillMode=mixed, Docker and Kubernetes do: its helpers (DataLoader
workers, say) are the main process's to stop, and a signal of their own would
kill them under it mid-save. A main process that is a shell which did not exec
(`sh -c "a; b"`, a shell script) passes no signal on, so its direct children
get it instead. SIGKILL, after the main process ends or the grace, goes to the
whole group and every descendant (`kill`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
from dataclasses import dataclass, field
from typing import Optional

import psutil

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcessId:
    pid: int
    started: float  # psutil create_time()

    @classmethod
    def of(cls, pid: int) -> Optional[ProcessId]:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def alive(self) -> bool:
        try:
            p = psutil.Process(self.pid)
            return bool(abs(p.create_time() - self.started) < 0.01) and \
                p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def process(self) -> Optional[psutil.Process]:
        try:
            p = psutil.Process(self.pid)
            return p if abs(p.create_time() - self.started) < 0.01 else None
        except psutil.Error:
            return None


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to us (Linux), so none escapes the tree."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_group(pgid: int) -> None:
    """Reap the exited children of ours that were in process group `pgid` (a job's
    processes that came to us, as child subreaper, once their parents died). Children
    in other groups (a Popen's, whose status is its own) are never touched."""
    for pid in children():
        try:
            if os.getpgid(pid) == pgid:
                os.waitpid(pid, os.WNOHANG)
        except (ProcessLookupError, ChildProcessError, PermissionError):
            continue


def children() -> list[int]:
    """Our children's pids, from /proc (every thread's list); empty where unreadable."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/self/task/{task}/children", encoding="ascii") as fh:
                pids.extend(int(p) for p in fh.read().split())
    return pids


def zombie_children() -> list[int]:
    """Our children that have exited and wait to be reaped (from /proc)."""
    found = []
    for pid in children():
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                state = fh.read().rpartition(b")")[2].split()[:1]
        except OSError:
            continue
        if state == [b"Z"]:
            found.append(pid)
    return found


def descendants(root: ProcessId) -> list[psutil.Process]:
    proc = root.process()
    if proc is None:
        return []
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False if the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def signal_tree(job: ProcessId, pgid: int, sig: int,
                reaper: Optional[ProcessId] = None) -> None:
    """`sig` to the job's process group, the job, and every descendant of the job
    (and of `reaper`, the supervisor that adopts escaped orphans), even those that
    left the group."""
    signal_group(pgid, sig)
    targets = descendants(job) + (descendants(reaper) if reaper else [])
    jp = job.process()
    if jp is not None:
        targets.append(jp)
    for p in targets:
        if reaper is not None and p.pid == reaper.pid:
            continue
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def group_alive(pgid: int) -> bool:
    """Whether any process (a zombie not yet reaped included) is left in the group."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --- stopping a job: one signal -----------------------------------------------------------

SHELLS = frozenset({"sh", "dash", "bash", "ash", "ksh", "ksh93", "mksh", "pdksh", "zsh",
                    "yash", "posh"})
# First words that `exec` would not run as the shell does: shell keywords, builtins with
# no program behind them, and builtins whose program differs (dash's echo reads
# escapes, /bin/echo does not). Assignments are checked apart.
_NOT_PROGRAMS = frozenset({
    "echo", "printf", "test", "[", "true", "false", "pwd", "kill", "times",
    "!", "{", "}", "[[", "]]", "case", "coproc", "do", "done", "elif", "else", "esac", "fi",
    "for", "function", "if", "in", "select", "then", "time", "until", "while", ".", ":",
    "alias", "bg", "break", "builtin", "cd", "command", "continue", "declare", "eval", "exec",
    "exit", "export", "fg", "getopts", "hash", "jobs", "let", "local", "read", "readonly",
    "return", "set", "shift", "source", "trap", "type", "typeset", "ulimit", "umask",
    "unalias", "unset", "wait",
})
_OPERATOR_CHARS = frozenset("();<>|&")


def is_simple_command(command: str) -> bool:
    """Whether a shell string is, beyond doubt, one simple command: words only (quotes and
    $VAR allowed), no operators, lists, pipes, redirections, subshells, command
    substitution, comments, newlines, assignments, keywords or builtins. Anything unsure
    is not simple."""
    if not command.strip() or any(c in command for c in "\n\r`#") or "$(" in command:
        return False
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        words = list(lexer)
    except ValueError:  # unbalanced quotes
        return False
    if not words or any(w and set(w) <= _OPERATOR_CHARS for w in words):
        return False
    first = command.split(None, 1)[0]
    return first not in _NOT_PROGRAMS and not first.startswith("-") \
        and not set(first) & (_OPERATOR_CHARS | set("=$'\"\\{}*?[]~!"))


def shell_argv(command: str) -> list[str]:
    """How a job's shell string runs: `sh -c 'exec COMMAND'` when it is one simple command
    (so the program is the job's main process and gets the stop signal), else as is."""
    return ["/bin/sh", "-c", f"exec {command}" if is_simple_command(command) else command]


def is_shell(proc: psutil.Process) -> bool:
    """Whether a process is a POSIX shell (which passes no signal on to its children)."""
    try:
        exe = os.path.basename(os.path.realpath(proc.exe())) if proc.exe() else ""
        name = proc.name()
    except psutil.Error:
        return False
    if exe == "busybox":
        return name in SHELLS
    return exe in SHELLS or (not exe and name in SHELLS)


@dataclass
class StopPlan:
    """Who gets a job's stop signal: `target` is "main" (the main process), "children"
    (a shell's direct children), "group" (the whole process group) or "none" (the main
    process has ended)."""

    target: str
    processes: list[psutil.Process] = field(default_factory=list)
    pgid: Optional[int] = None

    def send(self, sig: int) -> None:
        if self.pgid is not None:
            signal_group(self.pgid, sig)
        for p in self.processes:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)  # psutil checks the pid still names the same process


def plan_stop(job: ProcessId, pgid: int, whole_group: bool = False) -> StopPlan:
    """Whom a stop signals, decided before anything is sent (so it can be recorded first)."""
    if whole_group:
        return StopPlan("group", pgid=pgid)
    main = job.process()
    try:
        if main is None or main.status() == psutil.STATUS_ZOMBIE:
            return StopPlan("none")
        if is_shell(main):
            children = [c for c in main.children() if c.status() != psutil.STATUS_ZOMBIE]
            if children:
                return StopPlan("children", children)
    except psutil.Error:
        return StopPlan("none")
    return StopPlan("main", [main])


def kill(job: ProcessId, pgid: int, reaper: Optional[ProcessId] = None) -> None:
    signal_tree(job, pgid, signal.SIGKILL, reaper)
