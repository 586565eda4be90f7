"""Reconciliation and adoption: each running or stopping job's record brought up
to date with its run files and processes (a supervisor's lock, its exit file, an
orphaned job, a start that never happened), whoever started it, this daemon or an
earlier one; recording how each attempt ended (retries, time limits, preemptions,
kills); waiting jobs whose dependencies can never be met cancelled; stops requested
and their deadlines; and the GPUs that processes not ours use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Mapping
from typing import Any, Optional

from git_tq import deps, gpus, results, scheduler, supervisor
from git_tq.daemon.base import log
from git_tq.daemon.launch import Launching
from git_tq.daemon.repostate import RepoState, advance, open_repo
from git_tq.errors import InvalidTransition, NoSpace, NotOurs, RefRace, TqError
from git_tq.home import RunFiles, open_private
from git_tq.lifecycle import apply_event, now_iso
from git_tq.localjobs import LocalJobs
from git_tq.model import Job, State, format_duration
from git_tq.procs import ProcessId, group_alive, kill, reap_group

LAUNCH_PATIENCE = 15.0  # how long a launched supervisor may take to take its lock


class Reconciling(Launching):
    """Keeping records true to what the jobs' processes did."""

    def follow_dependencies(self, rs: RepoState) -> dict[int, deps.Verdict]:
        """Where our waiting jobs' dependencies stand. The jobs that can never start (a
        dependency failed, was cancelled or is gone, or one of theirs did) are cancelled
        here, each after the one that dooms it, with the reason on its record. All of it
        follows from the records alone, so a daemon killed half-way through a cascade
        leaves nothing a restarted one does not finish."""
        waiting = {j.id: deps.Needs(j.spec.after, j.spec.after_any) for j in rs.jobs
                   if j.state is State.PENDING and (j.spec.after or j.spec.after_any)
                   and rs.ours(j) is not None}
        if not waiting:
            return {}
        states: dict[int, State] = {}
        for needs in waiting.values():
            for dep in (*needs.after, *needs.after_any):
                if dep in states:
                    continue
                known = rs.active.get(dep)
                state = known.state if known is not None else rs.ended.get(dep)
                if dep in rs.tampered:
                    # Someone else moved its record: whatever ending it claims is not
                    # ours to believe, and its real one cannot be recorded. It waits.
                    state = State.PENDING
                if state is None and (dep in rs.tips or rs.read_whole_at != self.stats["cycles"]):
                    # Unreadable, or not seen yet by a read of just the named refs: it
                    # counts as not ended until a whole read says it is gone.
                    state = State.PENDING
                    if dep not in rs.tips:
                        self.read_everything = self.dirty = True
                if state is not None:
                    states[dep] = state
        verdicts = deps.judge(waiting, states)
        for job_id in deps.doomed_order(verdicts):
            job = rs.active.get(job_id)
            if job is None or job.state is not State.PENDING:
                continue
            detail = verdicts[job_id].detail
            try:
                stored = rs.store.write(job, apply_event(job, "cancelled", now_iso(),
                                                         detail=detail),
                                        f"tq: job {job_id} cancelled: {detail}")
            except (InvalidTransition, RefRace, NotOurs) as exc:
                log.warning("job %d: %s", job_id, exc)
                stored = None
            if stored is None:  # its record moved (an edit?): judge it again from there
                self.read_everything = self.dirty = True
                continue
            self.remember(rs, stored)
            log.info("job %d in %s: cancelled (%s)", job_id, rs.common, detail)
            self.run_hook(rs, stored, "finish")
        return verdicts

    def report_foreign_record(self, rs: RepoState, job: Job) -> None:
        if job.id in rs.entries:
            self.warn_once(rs, job.tip, f"job {job.id}'s record was moved by someone else "
                                        "(a fetch or a hand edit): it is tampered and is "
                                        "neither run nor written; see git tq doctor")
        elif job.state.active:
            self.warn_once(rs, job.tip, f"job {job.id} was not submitted here by this user "
                                        "(fetched or pushed?); it will not run")

    def live_run_gpus(self, rs: RepoState, job_id: int) -> Optional[tuple[int, ...]]:
        """The GPUs of a run of ours whose supervisor still lives, from its launch file
        (not from the record, which may be anyone's); None when no run is alive."""
        rf = RunFiles(self.home, rs.key, job_id)
        if not self.supervisor_alive(rf):
            return None
        launch = rf.read(rf.launch) or {}
        gpus_held = launch.get("gpus")
        if isinstance(gpus_held, list) and all(isinstance(g, int) for g in gpus_held):
            return tuple(gpus_held)
        return ()

    # --- GPUs shared with processes that are not ours ---------------------------------

    def our_pids(self, rs_jobs: Mapping[scheduler.JobKey, tuple[RepoState, Job]]) -> set[int]:
        pids: set[int] = set()
        for key, job_id in rs_jobs:
            rf = RunFiles(self.home, key, job_id)
            ident = rf.read(rf.ident)
            if not ident:
                continue
            for who in ("supervisor", "job"):
                proc = ProcessId(*ident[who]).process()
                if proc is not None:
                    pids.add(proc.pid)
                    with contextlib.suppress(Exception):
                        pids.update(c.pid for c in proc.children(recursive=True))
        return pids

    def find_foreign(self, machine: tuple[int, ...], holding: list[scheduler.Holding],
                     jobs: Mapping[scheduler.JobKey, tuple[RepoState, Job]]) -> dict[int, str]:
        if not machine:
            return {}
        on_gpu = gpus.gpu_processes(os.environ)
        if not any(on_gpu.values()):
            return {}
        ours = self.our_pids({k: v for k, v in jobs.items()
                              if v[1].state in (State.RUNNING, State.STOPPING)})
        foreign: dict[int, str] = {}
        for g, pids in on_gpu.items():
            strangers = [p for p in pids if p not in ours and ProcessId.of(p) is not None]
            if g in machine and strangers:
                foreign[g] = f"foreign process {strangers[0]}"
        return foreign

    def foreign_changed(self) -> bool:
        """Whether the processes on the GPUs changed since the last look."""
        on_gpu = gpus.gpu_processes(os.environ)
        seen = {(g, p) for g, pids in on_gpu.items() for p in pids}
        changed = seen != self.last_probe
        self.last_probe = seen
        return changed

    # --- running jobs ------------------------------------------------------------

    def reconcile(self, rs: RepoState, job: Job) -> Job:
        """Bring a running/stopping job's record up to date with its processes."""
        rf = RunFiles(self.home, rs.key, job.id)
        stop = rf.read(rf.stop)
        if self.supervisor_alive(rf):
            ident = rf.read(rf.ident)
            if stop and ident:
                self.enforce_stop(rf, job, stop, ident)
            return job
        outcome = rf.read(rf.exit) or self.reaped.get(rf.exit)
        if outcome is None:
            launch_age = time.time() - os.stat(rf.launch).st_mtime \
                if os.path.exists(rf.launch) else None
            ident = rf.read(rf.ident)
            # A supervisor writes .ident after taking its lock: with .ident there and the
            # lock free, it is not starting any more (it died), so no patience is due.
            if ident is None and launch_age is not None and launch_age < LAUNCH_PATIENCE:
                return job  # the supervisor is still starting
            if ident:
                outcome = self.adopt_orphan(job, rf, ident)
                if outcome is None and self.supervisor_alive(rf):
                    return job  # reaped: its stand-in collects what it produced
        if outcome is None:
            if ident and ProcessId(*ident["job"]).alive():
                if stop:  # orphaned job, supervisor gone: still ours to stop
                    self.enforce_stop(rf, job, stop, ident)
                return job
            if ident:
                outcome = {"exit_code": None, "signal": None, "ended_at": now_iso(),
                           "lost": "its supervisor died; the exit status is lost"}
            else:
                return self.record(rs, job, "preempted", rf,
                                   detail="had not started when its daemon stopped")
        self.endings.append((rs, job, rf, outcome, stop))  # recorded after this cycle's starts
        return job

    # --- jobs whose supervisor died ---------------------------------------------------

    def adopt_orphan(self, job: Job, rf: RunFiles,
                     ident: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """A job whose supervisor died (its lock free, no exit file). The daemon is a
        child subreaper, so a job whose supervisor it forked is now its own child: one
        still running is followed (`reap` waits for it), one that ended is reaped here
        and its exit status written as the supervisor would have (returned). None while
        it runs, or when it is not our child (a daemon restarted since: the status is
        lost, the kernel gave it to another)."""
        try:
            job_id = ProcessId(*ident["job"])
            pgid = int(ident["pgid"])
        except (KeyError, TypeError, ValueError):
            return None
        if job_id.process() is None:  # a zombie is still a process
            return None
        try:
            done, status = os.waitpid(job_id.pid, os.WNOHANG)
        except ChildProcessError:
            return None  # not ours to reap
        if not done:
            if job_id.pid not in self.orphans:
                log.warning("job %d: its supervisor died; the daemon follows the job (pid "
                            "%d) itself", job.id, job_id.pid)
                self.orphans[job_id.pid] = (rf, dict(ident))
                self.orphan_groups.add(pgid)
            return None
        self.orphans.pop(job_id.pid, None)
        return self.orphan_ended(rf, job_id, pgid, status)

    def reap_orphans(self) -> None:
        """Reap the followed jobs that ended (see `adopt_orphan`); run on SIGCHLD."""
        for pid, (rf, ident) in list(self.orphans.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, -1  # reaped elsewhere: its status is not ours
            if done:
                del self.orphans[pid]
                self.dirty = True
                if status >= 0:
                    self.orphan_ended(rf, ProcessId(*ident["job"]), int(ident["pgid"]), status)

    def orphan_ended(self, rf: RunFiles, job: ProcessId, pgid: int,
                     status: int) -> Optional[dict[str, Any]]:
        """Do for a reaped orphan what its supervisor would have: kill what the job left
        in its group, and have a stand-in (`conclude_in_background`) collect its outputs,
        metrics and log and write its exit status to `.exit`, as any ending is recorded
        (None then). Where no stand-in can be started, the exit status alone is written
        here (returned; kept in memory if that write fails)."""
        ended = time.time()
        code = os.waitstatus_to_exitcode(status)
        signum = -code if code < 0 else None
        if group_alive(pgid):
            kill(job, pgid)  # never with a reaper: we are everyone's
            self.orphan_groups.add(pgid)
        reap_group(pgid)
        outcome: dict[str, Any] = {
            "exit_code": None if signum else code, "signal": signum, "ended_at": now_iso(),
            "ended": ended, "forced": signum == signal.SIGKILL,
            "reaped": "its supervisor died; the daemon reaped the job"}
        launch = rf.read(rf.launch) or {}
        text = f"killed by signal {signum}" if signum else f"exited with code {code}"
        with contextlib.suppress(OSError, KeyError, TypeError), \
                open(open_private(str(launch["log"])), "ab", buffering=0) as fh:
            fh.write(f"\n[git tq] job {launch['job_id']} attempt {launch['attempt']} "
                         f"{text} at {now_iso()} (its supervisor had died; reaped by the "
                         "daemon)\n".encode())
        if launch.get("results") and self.conclude_in_background(rf, launch, outcome):
            return None
        try:
            rf.write(rf.exit, outcome)
        except OSError as exc:
            log.warning("%s: %s; the exit status is kept in memory", rf.exit, exc)
            self.reaped[rf.exit] = outcome
        return outcome

    def conclude_in_background(self, rf: RunFiles, launch: dict[str, Any],
                               outcome: dict[str, Any]) -> bool:
        """Finish a reaped orphan's attempt as its supervisor would have
        (`supervisor.conclude`: `.ended`, its outputs, metrics and log collected, `.exit`
        written until it lands) in a forked stand-in that holds the job's lock, taken
        here before the fork: until the stand-in is done every daemon (this one, or one
        restarted meanwhile) sees a live supervisor and waits. False when it cannot be
        started (the lock is held, no fork)."""
        try:
            fd = os.open(rf.lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            pid = os.fork()
        except OSError:
            os.close(fd)
            return False
        if pid:
            os.close(fd)  # the lock stays with the stand-in's copy of the descriptor
            self.concluding[pid] = (rf.exit, outcome)
            return True
        code = 70
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os.closerange(3, fd)  # the daemon's lock and socket above all; the job's stays
            os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
            try:
                fh: Any = open(open_private(str(launch["log"])), "ab", buffering=0)  # noqa: SIM115
            except (OSError, KeyError):
                fh = None
            supervisor.conclude(launch, outcome, supervisor.Log(fh))
            os.close(fd)
            supervisor.nudge(launch["socket"], (launch.get("results") or {}).get("common"))
            code = 0
        except BaseException:  # noqa: BLE001 - a child must never return into the loop
            log.exception("the stand-in supervisor of %s failed", rf.exit)
        finally:
            os._exit(code)

    def reap_concluding(self) -> None:
        """Reap the stand-ins that finished (`conclude_in_background`); one that died
        before writing `.exit` leaves the exit status it was given to be recorded."""
        for pid, (exit_path, outcome) in list(self.concluding.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del self.concluding[pid]
                self.dirty = True
                if not os.path.exists(exit_path):
                    self.reaped[exit_path] = outcome

    def finish(self, rs: RepoState, job: Job, rf: RunFiles, outcome: Mapping[str, Any],
               stop: Optional[Mapping[str, Any]]) -> Job:
        code, sig = outcome.get("exit_code"), outcome.get("signal")
        produced: dict[str, Any] = {}
        if isinstance(outcome.get("results"), dict):
            try:
                tree, outputs, metrics, blob = results.outputs_from_json(outcome["results"])
            except (TypeError, ValueError, KeyError):
                tree, outputs, metrics, blob = None, None, (), None
            produced = {"tree": tree, "outputs": outputs, "log_blob": blob,
                        "series_blob": results.series_blob_of(outcome["results"])}
            if metrics:  # an attempt that reported none keeps the last one's
                produced["metrics"] = metrics
        # Neither a command that could not be started nor one whose supervisor died has an
        # exit status: none is recorded (the event and the detail say which it was).
        if outcome.get("start_error"):
            return self.record(rs, job, "start-failed", rf, detail=outcome["start_error"])
        if outcome.get("lost"):
            return self.record(rs, job, "finished", rf, detail=outcome["lost"])
        # A job that was sent its stop signal to make room goes back to the queue whatever
        # its exit code (a checkpointing job exits 0 after saving); a killed one is
        # cancelled. Both record how the attempt ended, and how the stop went.
        stopped = stop_outcome(stop, outcome)
        used_up = self.time_up(job, rf) if stopped and stop and \
            stop.get("kind") == "preempt" else None
        if used_up:  # preempted with its time used up: a resume would only stop again
            return self.record(rs, job, "timed-out", rf, detail=used_up, exit_code=code,
                               signal=sig, **stopped, **produced)
        if stopped and stop and stop.get("kind") == "preempt":
            return self.record(rs, job, "preempted", rf, detail=stop.get("reason"),
                               exit_code=code, signal=sig, **stopped, **produced)
        if stopped and stop and stop.get("kind") == "kill":
            return self.record(rs, job, "cancelled", rf, detail=stop.get("reason"),
                               exit_code=code, signal=sig, **stopped, **produced)
        if stopped and stop and stop.get("kind") == "timeout":
            return self.record(rs, job, "timed-out", rf, detail=stop.get("reason"),
                               exit_code=code, signal=sig, **stopped, **produced)
        retry = self.retry_reason(job, rf, stop, code, sig)
        if retry is not None:
            return self.record(rs, job, "retry", rf, detail=retry, exit_code=code, signal=sig,
                               **produced)
        return self.record(rs, job, "finished", rf, exit_code=code, signal=sig, **stopped,
                           **produced, **({"detail": outcome["reaped"]}
                                          if isinstance(outcome.get("reaped"), str) else {}))

    def retry_reason(self, job: Job, rf: RunFiles, stop: Optional[Mapping[str, Any]],
                     code: Optional[int], sig: Optional[int]) -> Optional[str]:
        """`retry 1 of 3 after exit 137` when this attempt failed by itself (a non-zero
        exit, or a signal git tq did not send) and the job may be retried (`--retry N`,
        from its launch file) with time left; None otherwise. A stop of ours (a kill, a
        time limit, a preemption under way) is never retried."""
        failed = sig is not None or (code is not None and code != 0)
        if not failed or (stop and (stop.get("signalled") or stop.get("kind") != "preempt")):
            return None
        retries = (rf.read(rf.launch) or {}).get("retries")
        if not isinstance(retries, int) or job.retried >= retries or self.time_up(job, rf):
            return None  # none left, or its time is up: another attempt would only stop
        cause = f"signal {sig}" if sig is not None else f"exit {code}"
        return f"retry {job.retried + 1} of {retries} after {cause}"

    def time_up(self, job: Job, rf: RunFiles) -> Optional[str]:
        """`time limit 2h reached` when the attempt that just ended used up the job's
        time limit (from its launch file); None otherwise."""
        limit = (rf.read(rf.launch) or {}).get("time_limit")
        due = job.time_limit_due(limit if isinstance(limit, int) else None)
        if limit is None or due is None or time.time() < due:
            return None
        return f"time limit {format_duration(limit)} reached"

    def time_limit(self, rs: RepoState, job: Job) -> Optional[int]:
        """The job's time limit in seconds: from its record, which is ours (the callers
        check), as its priority and grace are, so `git tq edit --time` takes effect at
        the next cycle."""
        limit = job.spec.time_limit
        return limit if isinstance(limit, int) and limit > 0 else None

    def enforce_time_limit(self, rs: RepoState, job: Job) -> Job:
        """Begin stopping a running job whose running time, summed over its attempts, has
        reached its time limit: its stop signal, its grace, SIGKILL (a `.stop` of kind
        timeout, so a restarted daemon carries it through). Its end is recorded failed."""
        limit = self.time_limit(rs, job)
        due = job.time_limit_due(limit)
        if limit is None or due is None or time.time() < due or \
                os.path.exists(RunFiles(self.home, rs.key, job.id).ended):
            return job  # not due, or its processes are gone already
        self.request_stop(rs, job, "timeout", f"time limit {format_duration(limit)} reached",
                          now=False)
        return rs.active.get(job.id, job)

    def record(self, rs: RepoState, job: Job, event: str, rf: RunFiles,
               tree: Optional[str] = None, log_blob: Optional[str] = None,
               series_blob: Optional[str] = None, **fields: Any) -> Job:
        """Record an attempt's end (or a start that failed): the event, and what the
        attempt produced (`tree`: the code plus its outputs; its metrics and outputs
        summary in `fields`); then the log is stored, run files go, hooks run."""
        when = now_iso()
        if fields.get("outputs") is None:
            fields.pop("outputs", None)
        if series_blob:
            # Like the log: before the ending, so a crash in between stores it again (a
            # second line for the same attempt, which readers take in place of the first).
            try:
                rs.store.store_series(job, series_blob)
            except (TqError, OSError) as exc:
                if self.short_of_space(rs, job.id, f"record {event}", exc):
                    return job  # its run files stay: the next cycle stores it, then the rest
                log.warning("job %d: its metric series could not be kept in git: %s",
                            job.id, exc)
        if log_blob:
            # Before the ending is recorded: a crash in between leaves the exit file,
            # so the next daemon stores it again (the same blob) and records the end.
            try:
                rs.store.store_log(job, log_blob)
            except (TqError, OSError) as exc:
                if self.short_of_space(rs, job.id, f"record {event}", exc):
                    return job  # its run files stay: the next cycle stores both
                log.warning("job %d: its log could not be kept in git: %s", job.id, exc)
        try:
            new = advance(rs, job, event, when, tree, **fields)
        except (InvalidTransition, RefRace, NotOurs) as exc:
            log.warning("job %d: could not record %s: %s", job.id, event, exc)
            return job
        except (TqError, OSError) as exc:
            if self.short_of_space(rs, job.id, f"record {event}", exc):
                return job  # its run files stay: the next cycle records it
            raise
        self.space_again(rs, job.id, f"record {event}")
        self.remember(rs, new)
        log.info("job %d in %s: %s -> %s", job.id, rs.common, event, new.state.value)
        rf.clear()
        self.reaped.pop(rf.exit, None)
        if new.state.finished:
            rf.drop_metrics()
            # Its environment (secrets included) is kept only while a resume may need it.
            entry = rs.entries.get(job.id) or rs.local.entry(job.id)
            if entry is not None:
                rs.local.drop_spec(entry.submission)
            keep = new.state is State.FAILED and \
                rs.config.get("tq.keepworktrees", "false").lower() in ("true", "yes", "1")
            if not keep:
                self.cleanup.append((rs, new))  # after this cycle's starts
            else:
                self.made_with.pop((rs.key, job.id), None)
            if rs.config.get("tq.autopush", "false").lower() in ("true", "yes", "on", "1"):
                self.auto_push(rs)
        hook = {"preempted": "preempt", "cancelled": "finish", "finished": "finish",
                "start-failed": "finish", "timed-out": "finish"}.get(event)
        if hook:
            self.run_hook(rs, new, hook)
        return new

    def update_deadline(self, repos: list[RepoState]) -> None:
        """The nearest stop deadline of a stopping job, or time limit of a running one (the
        loop wakes for it)."""
        deadlines = []
        for rs in repos:
            for job in rs.active.values():
                if job.state in (State.RUNNING, State.STOPPING):
                    rf = RunFiles(self.home, rs.key, job.id)
                    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                        stop = rf.read(rf.stop)
                        if stop is not None:
                            deadlines.append(float(stop["deadline"]))
                if job.state is State.RUNNING and rs.ours(job) is not None:
                    due = job.time_limit_due(self.time_limit(rs, job))
                    if due is not None:
                        deadlines.append(due)
        self.next_deadline = min(deadlines) + 0.01 if deadlines else None

    def request_stop(self, rs: RepoState, job: Job, kind: str, reason: str,
                     now: bool) -> None:
        """Begin stopping a running job: its stop signal now, SIGKILL after its grace."""
        rf = RunFiles(self.home, rs.key, job.id)
        if rf.read(rf.stop):
            return
        grace = 0 if now else job.spec.grace
        try:
            rf.write(rf.stop, {"kind": kind, "reason": reason,
                               "deadline": time.time() + grace, "signalled": False})
        except OSError as exc:
            if self.short_of_space(rs, job.id, f"stop it ({reason})", exc):
                return  # a stop is never sent unrecorded: asked again next cycle
            raise
        self.space_again(rs, job.id, f"stop it ({reason})")
        if job.state is State.RUNNING:
            try:
                self.remember(rs, advance(rs, job, "stopping", now_iso(), detail=reason))
            except (InvalidTransition, RefRace, NotOurs, NoSpace) as exc:
                log.warning("job %d: %s", job.id, exc)
        ident = rf.read(rf.ident)
        stop = rf.read(rf.stop)
        if ident and stop:
            self.enforce_stop(rf, job, stop, ident)
        log.info("job %d in %s: stopping (%s)", job.id, rs.common, reason)

    def stop_elsewhere(self, rs: RepoState, job: Job, now: bool) -> bool:
        """Stop a job that another executor runs (Slurm: `SlurmJobs`); False for a job
        of this machine's supervisors."""
        return False

    def kill_jobs(self, common: str, ids: list[int], now: bool) -> list[int]:
        if os.path.realpath(common) not in map(os.path.realpath, self.home.registered_repos()):
            raise TqError(f"{common} has no jobs of this daemon")
        local = self.ledgers.setdefault(common, LocalJobs(self.home.path, common))
        rs = open_repo(common, local)
        rs.entries = local.entries()
        done = []
        for job_id in ids:
            job = rs.store.load(job_id)
            rs.store.require_ours(job, "killed")
            if job.state not in (State.RUNNING, State.STOPPING):
                raise TqError(f"job {job_id} is {job.state.value}, not running")
        for job_id in ids:
            job = rs.store.load(job_id)
            if self.stop_elsewhere(rs, job, now):
                done.append(job_id)
                continue
            rf = RunFiles(self.home, rs.key, job_id)
            old = rf.read(rf.stop)
            if old and old.get("kind") in ("preempt", "timeout"):  # a kill outranks them
                rf.write(rf.stop, {**old, "kind": "kill", "reason": "killed by the user",
                                   "deadline": time.time() if now else old["deadline"]})
            elif old is None:
                self.request_stop(rs, job, "kill", "killed by the user", now)
            elif now:
                rf.write(rf.stop, {**old, "deadline": time.time()})
            ident, stop = rf.read(rf.ident), rf.read(rf.stop)
            if ident and stop:
                self.enforce_stop(rf, job, stop, ident)
            done.append(job_id)
        self.update_deadline(list(self.repos.values()))
        return done


def stop_outcome(stop: Optional[Mapping[str, Any]],
                 outcome: Mapping[str, Any]) -> dict[str, Any]:
    """How a signalled stop went, for the record: stop (clean: the job ended by itself
    before its deadline; forced: SIGKILL) and stop_seconds (from the signal to the end).
    Empty when no stop signal was sent."""
    if not stop or not stop.get("signalled"):
        return {}
    forced = bool(outcome.get("forced")) or outcome.get("signal") == signal.SIGKILL
    fields: dict[str, Any] = {"stop": "forced" if forced else "clean"}
    sent, ended = stop.get("signalled_at"), outcome.get("ended")
    if isinstance(sent, (int, float)) and isinstance(ended, (int, float)):
        fields["stop_seconds"] = round(min(max(0.0, ended - sent), 10.0**8), 1)
    return fields
