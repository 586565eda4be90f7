"""Launching a job and its processes: a start (the record, the worktree, the
environment, the launch file, a supervisor forked in a session of its own), whether
that supervisor lives (its lock), and a stop sent to the job's processes (the stop
signal once, SIGKILL at the deadline). This is the local supervisor's way of running
a job; what a job's record and its run files say is `reconcile`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Mapping
from typing import Any, Optional

from git_tq import jobtree, results, supervisor
from git_tq.daemon.base import NoRoom, log
from git_tq.daemon.hooks import Hooks
from git_tq.daemon.repostate import RepoState, advance
from git_tq.daemon.worktrees import Worktrees
from git_tq.errors import NO_SPACE, InvalidTransition, NotOurs, RefRace, TqError
from git_tq.gitrepo import free_space, without_repo_vars
from git_tq.home import RunFiles
from git_tq.lifecycle import apply_event, now_iso
from git_tq.localjobs import LocalSpec
from git_tq.model import Job, launch_stop_signal, stop_signal_number
from git_tq.procs import ProcessId, kill, plan_stop, shell_argv


class Launching(Worktrees, Hooks):
    """Starting a job's supervisor, checking it lives, and stopping the job's processes."""

    # --- starting a job ---------------------------------------------------------------

    def start(self, rs: RepoState, job: Job, assigned: tuple[int, ...]) -> None:
        """Run one of our pending jobs: what runs (command, cwd, environment, code) comes
        from the private record named by the ledger, never from the job's record.

        Everything a start writes besides the record (the worktree, the launch file) is
        made while the record still says pending, and the record moves only then: a
        start that finds no space (a full disk) leaves the job pending, its attempt not
        used, with nothing half-made left (`no_room_to_start`); it starts by itself once
        there is room."""
        entry = rs.ours(job)
        if entry is None:
            return
        spec = rs.local.load_spec(entry.submission)
        # A retry's next attempt is a start again; after a preemption it is a resume.
        event = "resumed" if job.attempt > 0 and job.event != "retry" else "started"
        when = now_iso()
        try:
            attempt = apply_event(job, event, when, assigned_gpus=assigned)  # not stored yet
        except InvalidTransition as exc:
            log.info("job %d not started: %s", job.id, exc)
            self.read_everything = True
            return
        rf = RunFiles(self.home, rs.key, job.id)
        logfile = rs.store.log_path(attempt)
        failure: Optional[str] = None
        launch: dict[str, Any] = {}
        at = os.path.dirname(self.home.worktree_dir(rs.key, job.id))  # what is written where
        try:
            if spec is None:
                raise TqError("its private record in the tq home is missing (submitted by an "
                              "older git tq, or deleted); requeue it")
            worktree = self.ensure_worktree(rs, attempt, entry.submission, spec)
            env = self.job_env(attempt, spec, assigned, logfile, worktree, rf.metrics)
            argv = shell_argv(spec.command[0]) if spec.shell else list(spec.command)
            cwd = safe_join(worktree, spec.cwd)
            at = rf.folder
            rf.clear_attempt()  # what an earlier attempt left
            launch = {
                "gpus": list(assigned),
                "job_id": job.id, "attempt": attempt.attempt, "argv": argv, "cwd": cwd,
                "env": env, "log": logfile,
                "banner": banner(attempt, rs, worktree, assigned),
                "lock": rf.lock, "ident": rf.ident, "exit": rf.exit, "stop": rf.stop,
                "ended": rf.ended,
                "stop_signal": spec.stop_signal, "stop_target": spec.stop_target,
                "time_limit": spec.time_limit, "retries": spec.retries,
                "socket": self.home.socket_path(),
                "results": {"common": rs.common, "worktree": worktree,
                            "submission": entry.submission, "metrics_file": rf.metrics,
                            "series": rf.series,
                            "limits": results.Limits.from_config(rs.config).to_json()},
            }
            rf.write(rf.launch, launch)
        except (TqError, OSError) as exc:
            if self.no_room_to_start(rs, job, rf, exc, at):
                return
            failure = f"could not start: {exc}"
        try:
            job = advance(rs, job, event, when, assigned_gpus=assigned)
        except (InvalidTransition, RefRace, NotOurs) as exc:
            log.info("job %d not started: %s", job.id, exc)
            self.read_everything = True  # someone else wrote it: read it again
            with contextlib.suppress(OSError):
                os.unlink(rf.launch)
            return
        except (TqError, OSError) as exc:
            if self.no_room_to_start(rs, job, rf, exc, rs.common):
                return  # still pending: started when there is room
            raise
        self.space_again(rs, job.id, "start")
        self.no_room.pop((rs.key, job.id), None)
        self.remember(rs, job)
        with contextlib.suppress(OSError):
            os.unlink(rf.announced)  # the tq-submit hook ran: it never runs again
        if failure is None:
            settings = self.checkout_settings(rs)
            if settings is not None and spec is not None and not spec.nested \
                    and not spec.present:
                self.made_with[(rs.key, job.id)] = settings
            try:
                self.supervisors.add(fork_supervisor(launch))
            except OSError as exc:
                failure = f"could not start: {exc}"
        if failure is not None:
            from git_tq.home import ensure_log_folder, open_private

            with contextlib.suppress(OSError):  # a full disk, say: the record still says why
                ensure_log_folder(logfile)  # 0600 in 0700 folders, as the supervisor's
                with open(open_private(logfile), "a", encoding="utf-8") as fh:
                    fh.write(banner(job, rs, "", assigned) + f"\n[git tq] {failure}\n")
            self.record(rs, job, "start-failed", rf, detail=failure)
            return
        log.info("job %d in %s: %s on GPUs %s", job.id, rs.common, event, assigned or "cpu")
        self.run_hook(rs, job, "resume" if event == "resumed" else "start")

    def no_room_to_start(self, rs: RepoState, job: Job, rf: RunFiles, exc: BaseException,
                         at: str) -> bool:
        """Whether a start failed for want of space (then the job stays pending: logged
        once, its launch file removed, and `NoRoom` holds it out of the plan until the
        filesystem of `at`, the folder being written, has room again). False for any
        other error."""
        if not self.short_of_space(rs, job.id, "start", exc):
            return False
        with contextlib.suppress(OSError):
            os.unlink(rf.launch)
        path = getattr(exc, "path", None) or at
        where = {os.path.dirname(self.home.worktree_dir(rs.key, job.id)): "for its worktree",
                 rf.folder: "for its run files", rs.common: "to record its start"}
        self.no_room[(rs.key, job.id)] = NoRoom(
            path, free_space(path) or 0, int(getattr(exc, "needed", 0) or 0),
            f"no space left on device {where.get(path, 'to start it')}")
        return True

    def job_env(self, job: Job, spec: LocalSpec, assigned: tuple[int, ...], logfile: str,
                worktree: str, metrics_file: str) -> dict[str, str]:
        from git_tq import envs

        env = without_repo_vars(spec.environ)
        if spec.env_name:
            env = envs.activate(spec.env_name, env)
        env.update({
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, assigned)),
            "TQ_JOB_ID": str(job.id), "TQ_ATTEMPT": str(job.attempt),
            "TQ_RESUMED": "1" if job.attempt > 1 else "0", "TQ_LOG": logfile,
            "TQ_SOURCE_DIR": spec.source_dir, "TQ_WORKTREE": worktree,
            "TQ_PRIORITY": str(job.spec.priority), "TQ_TAG": job.spec.tag or "",
            "TQ_METRICS": metrics_file,
        })
        env.update(jobtree.job_git_config(worktree, env))
        return env

    # --- a job's processes ---------------------------------------------------------

    def supervisor_alive(self, rf: RunFiles) -> bool:
        try:
            fd = os.open(rf.lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops our lock, if we got it
        return False

    def enforce_stop(self, rf: RunFiles, job: Job, stop: Mapping[str, Any],
                     ident: Mapping[str, Any]) -> None:
        """Send the stop signal once (to the main process, or as the job's private record
        says), then SIGKILL to the group and every descendant at the deadline."""
        if os.path.exists(rf.ended):
            return  # the job is gone; the supervisor's own git processes are not the job
        target, pgid = ProcessId(*ident["job"]), int(ident["pgid"])
        reaper = ProcessId(*ident["supervisor"])
        if not stop.get("signalled"):
            # How to stop it comes from the launch file, written from the private record.
            launch = rf.read(rf.launch) or {}
            sig = stop_signal_number(launch_stop_signal(launch.get("stop_signal")))
            plan = plan_stop(target, pgid, whole_group=launch.get("stop_target") == "group")
            # Recorded before it is sent: a stop is signalled once, even across a crash
            # (the deadline's SIGKILL is the safety net), and the supervisor learns whom
            # it went to if the main process ends at once.
            stop = {**stop, "signalled": True, "signalled_at": time.time(), "signal": sig,
                    "target": plan.target}
            said = (rf.folder, job.id, "send its stop signal")
            try:
                rf.write(rf.stop, stop)
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise
                if said not in self.no_space:  # sent once recorded; SIGKILL at the deadline
                    self.no_space.add(said)
                    log.warning("job %d: its stop signal waits for room to record it (%s)",
                                job.id, exc)
                stop = {**stop, "signalled": False}
            else:
                self.no_space.discard(said)
                plan.send(sig)
                log.info("job %d: %s sent to %s", job.id, signal.Signals(sig).name,
                         {"main": "its main process", "children": "the children of its shell",
                          "group": "its process group", "none": "nobody (it had ended)"}
                         [plan.target])
        if time.time() >= float(stop["deadline"]):
            kill(target, pgid, reaper)


def safe_join(worktree: str, cwd: str) -> str:
    """The job's working directory: `cwd` (relative, checked) inside its worktree, and
    never outside it, even through a symlink in the snapshot."""
    from git_tq.recordfmt import RecordFormatError, relative_path

    try:
        rel = relative_path(cwd)
    except RecordFormatError:
        raise TqError(f"bad working directory {cwd!r}") from None
    path = os.path.join(worktree, rel) if rel else worktree
    real_root = os.path.realpath(worktree)
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise TqError(f"the working directory {cwd!r} leaves the job's worktree")
    return path


def fork_supervisor(launch: Mapping[str, Any]) -> int:
    """Start the job's supervisor as a forked copy of the daemon, in a session of its own.

    A fork costs a millisecond where a fresh interpreter (`python -m
    git_tq.supervisor`) costs ~100 ms of start-up and imports. The child keeps
    no descriptor of the daemon's: above all not the daemon's lock, which would
    keep a restarted daemon out for as long as the job runs.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        code = supervisor.run(dict(launch))
    finally:
        os._exit(code)


def banner(job: Job, rs: RepoState, worktree: str, assigned: tuple[int, ...]) -> str:
    s = job.spec
    when = now_iso()
    if job.attempt > 1:
        what = "RETRIED" if job.event == "started" else "RESUMED"
        return (f"\n{'=' * 72}\n[git tq] job {job.id} {what}: attempt {job.attempt} at {when}"
                f" on GPUs {','.join(map(str, assigned)) or 'none (cpu)'}\n{'=' * 72}\n")
    lines = [
        f"[git tq] job {job.id}" + (f" [{s.tag}]" if s.tag else ""),
        f"  command   {s.command_line()}",
        f"  priority  {s.priority}   grace {s.grace}s   gpus "
        f"{','.join(map(str, assigned)) or 'none (cpu)'} (asked: {s.gpus.describe()})",
        f"  env       {s.env or '-'}",
        f"  source    {job.source or '(unborn branch)'}",
        f"  snapshot  {job.snapshot}",
        f"  repo      {rs.common}",
        f"  worktree  {worktree}",
        f"  restore   git tq checkout {job.id}",
        f"  started   {when} (attempt {job.attempt})",
    ]
    return "\n".join(lines) + f"\n{'-' * 72}\n"
