"""The supervisor: one small process per running job, independent of the daemon.

The daemon starts `python -m git_tq.supervisor <launch file>` in a session of
its own. The supervisor holds the job's lock file for its whole life (so a
restarted daemon knows it is alive), starts the command in a new process group
with the log as stdout and stderr, records both processes' identities, waits,
and writes the exit status where any later daemon can read it (on a full disk it
tries again, lock held, until the write lands: a known status is never lost). While the
job runs, a thread notes when its metrics files grow (metricfiles.Watch: the times of
its points, and where its attempt began in each file). It survives
the daemon's death; it ignores SIGTERM/SIGINT/SIGHUP (signals go to the job).

When the job's main process ends, whatever it left behind is SIGKILLed at
once; except during a stop whose signal went to others than the main process
(a shell's children, the whole group: see procs.plan_stop), whose grace is not
cut short because a wrapper shell exited first: then the supervisor waits for
the group to empty, or the stop's deadline (the daemon's `.stop` run file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

from git_tq.errors import NO_SPACE, TqError
from git_tq.gitrepo import free_space
from git_tq.home import connect_private, ensure_log_folder, open_private, write_private_file
from git_tq.lifecycle import now_iso
from git_tq.procs import ProcessId, become_subreaper, group_alive, kill

EXIT_LOCKED = 75



def nudge(socket_path: str, repo: Optional[str] = None) -> None:
    """Tell the daemon something changed (best effort: it rescans anyway). Nothing is
    sent to a socket that another user serves. Naming the repository with no job says
    that no ref changed: the daemon only looks at its run files."""
    request: dict[str, Any] = {"cmd": "nudge"}
    if repo is not None:
        request.update(repo=repo, jobs=[])
    try:
        with connect_private(socket_path, 0.5) as s:
            s.sendall(json.dumps(request).encode() + b"\n")
            s.recv(64)
    except (OSError, TqError):
        pass


def write_json(path: str, data: dict[str, Any]) -> None:
    write_private_file(path, json.dumps(data).encode())


RETRY_MAX_SECONDS = 5.0  # the longest pause between two tries of a write that must land
ROOM_POLL_SECONDS = 0.1  # how often a pause looks whether space came back


def wait_for_room(folder: str, pause: float) -> None:
    """Sleep `pause` seconds, or less: until the filesystem holding `folder` has more
    room than now (a statfs every ROOM_POLL_SECONDS), so that a write that found no
    space is tried again soon after space returns, and seldom while it does not."""
    before = free_space(folder)
    deadline = time.monotonic() + pause
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, ROOM_POLL_SECONDS))
        now = free_space(folder)
        if before is not None and now is not None and now > before:
            return


def write_until_written(path: str, data: dict[str, Any],
                        again: Optional[Callable[[], None]] = None) -> None:
    """Write a run file that must not be lost (`.ident`, `.exit`): on a full disk, try
    again with a growing pause (cut short when space returns) until it lands (the
    supervisor's lock, held meanwhile, tells the daemon it lives). `again` runs before
    each retry (results collected again). Other errors are raised."""
    pause = 0.05
    while True:
        try:
            write_json(path, data)
            return
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
        wait_for_room(os.path.dirname(path), pause)
        pause = min(pause * 2, RETRY_MAX_SECONDS)
        if again is not None:
            again()


class Log:
    """The job's log as the supervisor writes its own lines to it: a line that cannot be
    written (a full disk) is dropped, never fatal."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh  # None: no log could be opened

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.fh.write(data)

    def fileno(self) -> int:
        return -1 if self.fh is None else int(self.fh.fileno())


# Told of a signal sent to the supervisor itself, with the job's identity (main process,
# process group) once it has started: a Slurm batch job forwards Slurm's stop signal.
SignalHandler = Callable[[int, Optional[ProcessId], int], None]


def run(launch: dict[str, Any], forward: Optional[SignalHandler] = None,
        forwarded: Sequence[int] = ()) -> int:
    """Run the job of a launch file to its end and write its exit status. Signals
    SIGTERM, SIGINT and SIGHUP are outlived; with `forward`, those in `forwarded` are
    handed to it (the job's identity comes once the job has started)."""
    lock_fd = os.open(launch["lock"], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return EXIT_LOCKED  # another supervisor runs this job: never run it twice
    started: list[tuple[ProcessId, int]] = []

    def handed_on(signum: int, _frame: object) -> None:
        if forward is not None:
            job, pgid = started[0] if started else (None, 0)
            forward(signum, job, pgid)

    for sig in {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *forwarded}:
        # Caught by a handler that does nothing, not ignored: exec gives caught signals
        # their default action back, so the job needs no preexec_fn (which would cost
        # ~1.7 ms a start: subprocess could not use vfork).
        signal.signal(sig, handed_on if sig in forwarded else _survive)
    become_subreaper()
    me = ProcessId.of(os.getpid())
    # The log holds whatever the job prints, secrets included: 0600 in 0700 folders.
    ensure_log_folder(launch["log"])
    raw = open(open_private(launch["log"]), "ab", buffering=0)  # noqa: SIM115 - job's life
    log = Log(raw)
    log.write(launch["banner"].encode())
    watch = _watch(launch)  # before the job starts: its metrics files as they are now
    try:
        child = subprocess.Popen(
            launch["argv"], cwd=launch["cwd"], env=launch["env"], stdin=subprocess.DEVNULL,
            stdout=raw, stderr=subprocess.STDOUT, start_new_session=True,
        )
    except OSError as exc:
        reason = f"could not start {launch['argv'][0]!r}: {exc.strerror or exc}"
        if isinstance(exc, FileNotFoundError):
            reason += " (not on the PATH the job was submitted with?)"
        log.write(f"\n[git tq] {reason}\n".encode())
        write_until_written(launch["exit"], {"exit_code": 127, "signal": None,
                                             "ended_at": now_iso(), "start_error": reason})
        nudge(launch["socket"], (launch.get("results") or {}).get("common"))
        return 0
    job = ProcessId.of(child.pid) or ProcessId(child.pid, 0.0)
    started.append((job, child.pid))
    assert me is not None
    write_until_written(launch["ident"], {"supervisor": [me.pid, me.started],
                                 "job": [job.pid, job.started], "pgid": child.pid,
                                 **{k: launch[k] for k in ("node", "batch_started")
                                    if launch.get(k)}})
    nudge(launch["socket"], (launch.get("results") or {}).get("common"))
    watching = _start_watching(watch)
    status = _wait_for(child.pid)
    code = os.waitstatus_to_exitcode(status)
    signum = -code if code < 0 else None
    stop = read_json(launch.get("stop"))
    left_at_deadline = False
    if stop is not None and stop.get("target") in ("children", "group"):
        # The signal went to others than the main process: they get their grace too.
        left_at_deadline = _wait_for_group(child.pid, launch["stop"])
    ended = time.time()
    # Whatever the job left behind (workers, background children) goes with it. The
    # sweep of every process's parent (psutil) is skipped when nothing can be left: the
    # group is empty and, as the subreaper every orphan of the job comes to, we have no
    # child left.
    if group_alive(child.pid) or _reap_exited():
        kill(job, child.pid, me)
    _reap_exited()
    if watching is not None:
        watching.set()
    text = f"killed by signal {signum}" if signum else f"exited with code {code}"
    forced = signum == signal.SIGKILL or left_at_deadline
    if stop is not None and isinstance(stop.get("signalled_at"), (int, float)):
        text += (f" ({'forced: SIGKILL' if forced else 'clean stop'} "
                 f"{max(0.0, ended - float(stop['signalled_at'])):.1f} s after "
                 f"{_signal_text(stop.get('signal'))})")
    log.write(f"\n[git tq] job {launch['job_id']} attempt {launch['attempt']} {text} at "
              f"{now_iso()}\n".encode())
    outcome: dict[str, Any] = {"exit_code": None if signum else code, "signal": signum,
                               "ended_at": now_iso(), "ended": ended, "forced": forced}
    conclude(launch, outcome, log, watch)
    # Release the lock before the nudge: the daemon reads "lock free + exit file" as
    # "ended", and must see both when it wakes.
    os.close(lock_fd)
    nudge(launch["socket"], (launch.get("results") or {}).get("common"))
    return 0


def conclude(launch: dict[str, Any], outcome: dict[str, Any], log: Log,
             watch: Any = None) -> None:
    """After the job's processes are gone, its lock held: say so (`.ended`: its GPUs are
    free), collect what the attempt produced, and write its exit status (`.exit`). Also
    what the daemon does for a job whose supervisor died (see daemon/reconcile.py).

    On a full disk nothing known is lost: the exit status is written as soon as it can
    be, and while the outputs cannot be recorded for want of space they are collected
    again until they can (the lock held, so the daemon waits; a supervisor killed
    meanwhile leaves the exit status without them). `watch`: the attempt's metrics
    files as they stood when it began (none for the daemon's stand-in: then every point
    in them counts as this attempt's)."""
    if launch.get("results"):
        if launch.get("ended"):  # from now on the daemon kills nothing of ours
            with contextlib.suppress(OSError):  # (on a full disk, it may: none are left)
                write_json(launch["ended"], {"at": outcome.get("ended", time.time())})
            # ...and the job's GPUs are free: the next job starts while this one's
            # outputs, metrics and log are collected, at a lower priority than its start.
            with contextlib.suppress(OSError):
                os.nice(10)
            nudge(launch["socket"], launch["results"].get("common"))
        outcome["results"] = _collect(launch, log, watch)
        pause = 0.05
        while outcome["results"].get("no_space"):
            if not launch.get("node"):  # (a Slurm job's daemon reads `.exit` at once)
                write_until_written(launch["exit"], outcome)  # the status first, then room
            wait_for_room(os.path.join(launch["results"]["common"], "objects"), pause)
            pause = min(pause * 2, RETRY_MAX_SECONDS)
            outcome["results"] = _collect(launch, log, watch)

    def collect_again() -> None:
        # A full disk made the exit file's write fail, and likely the results' too (git
        # could write no object): collected again, the log blob included, once it lands.
        if (outcome.get("results") or {}).get("error"):
            outcome["results"] = _collect(launch, log, watch)

    # The exit status is known: it is never lost to a full disk.
    write_until_written(launch["exit"], outcome, collect_again)


def _watch(launch: dict[str, Any]) -> Any:
    """The watch over the job's metrics files (metricfiles.Watch), or None; never raises."""
    spec = launch.get("results")
    if not spec:
        return None
    try:
        from git_tq import metricfiles, results

        limits = results.Limits.from_json(spec["limits"])
        return metricfiles.Watch(spec.get("metrics_file"), launch["cwd"],
                                 limits.metrics_files, int(launch["attempt"]), time.time(),
                                 spec.get("series"))
    except Exception:  # noqa: BLE001 - the job runs whatever happens here
        return None


def _start_watching(watch: Any) -> Any:
    """A thread polling the metrics files while the job runs; the Event that stops it."""
    if watch is None:
        return None
    import threading

    done = threading.Event()
    threading.Thread(target=watch.run, args=(done,), daemon=True, name="tq-watch").start()
    return done


def _collect(launch: dict[str, Any], log: Log, watch: Any = None) -> dict[str, Any]:
    """What the attempt produced (outputs, metrics, the log as a blob), for the daemon to
    record; never raises (a job's end is recorded whatever happens here)."""
    from git_tq import results

    spec = launch["results"]
    try:
        limits = results.Limits.from_json(spec["limits"])
        # The log is read through our own descriptor: `catg` may have moved the file.
        log_path = f"/proc/self/fd/{log.fileno()}" if log.fileno() >= 0 else launch["log"]
        if not os.path.exists(log_path):
            log_path = launch["log"]
        def collect() -> results.Collected:
            return results.collect(spec["common"], spec["worktree"], spec["submission"],
                                   launch["cwd"], limits, spec.get("metrics_file"), watch)

        collected = collect()
        if collected.outputs.error is not None and not collected.no_space:
            # Once more: a stop's SIGKILL sent just before `.ended` appeared may have hit
            # our own git processes.
            collected = collect()
        if not collected.no_space:  # (collected again once there is room: said then)
            for line in results.left_out_lines(collected):
                log.write(f"[git tq] {line}\n".encode())
            collected = results.with_log(collected, spec["common"], log_path, limits.max_log)
        return collected.to_json()
    except Exception as exc:  # noqa: BLE001 - the exit status must be written regardless
        return {"tree": None, "files": 0, "bytes": 0, "error": f"{type(exc).__name__}: {exc}"}


def read_json(path: Optional[str]) -> Optional[dict[str, Any]]:
    """A run file's object (the daemon's `.stop`, an `.exit`), or None: missing, unreadable
    or not an object."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _signal_text(number: object) -> str:
    try:
        return signal.Signals(number).name if isinstance(number, int) else "the stop signal"
    except ValueError:
        return f"signal {number}"


def _wait_for_group(pgid: int, stop_path: str) -> bool:
    """Wait, reaping, until the job's process group is empty or the stop's deadline (read
    again each time: `kill --now` moves it) has passed; True if something was left."""
    while group_alive(pgid):
        _reap_exited()
        if not group_alive(pgid):
            return False
        stop = read_json(stop_path) or {}
        try:
            deadline = float(stop["deadline"])
        except (KeyError, TypeError, ValueError):
            return True  # no deadline any more: the stop is over, the rest goes
        if time.time() >= deadline:
            return True
        time.sleep(0.02)  # group members are not all our children: no wait() covers them
    return False


def _survive(*_: object) -> None:
    """The supervisor outlives SIGTERM, SIGINT and SIGHUP (see `run`)."""


def _wait_for(pid: int) -> int:
    """Wait for `pid`, reaping adopted orphans on the way; its wait status."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if got == pid:
            return status


def _reap_exited() -> bool:
    """Reap every exited child (orphans of the job come to us); whether one still lives."""
    while True:
        try:
            got, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        except InterruptedError:
            continue
        if got == 0:
            return True


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as fh:
        launch = json.load(fh)
    sys.exit(run(launch))


if __name__ == "__main__":
    main()
