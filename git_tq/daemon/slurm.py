"""Jobs that Slurm runs (`tq.backend slurm`): the Slurm executor under the daemon's loop.

Slurm, not `scheduler.plan`, decides when and where they run. The daemon submits a
job with sbatch once its dependencies are met (and the queue is not paused), then
follows it: one `squeue` for all of a repository's Slurm jobs a cycle, and the run
files each attempt's batch job writes (`git_tq.slurmjob`: `.ident` when the job
started on its node, `.exit` when it ended). Starts, requeues and ends become
lifecycle commits as for local jobs; Slurm's account is the cross-check, so a job
that Slurm ended without an exit status (an `scancel` outside git tq, a node
failure) is recorded with Slurm's reason, after a short patience for the exit file
to appear on a shared filesystem.

Nothing is lost: the sbatch call is announced in `<id>.slurm` before it is made
(with the job's Slurm name), so a daemon killed in between finds the job in Slurm
by name and adopts it instead of submitting it twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional

from git_tq import results, slurm
from git_tq.daemon.base import log
from git_tq.daemon.launch import banner, safe_join
from git_tq.daemon.reconcile import Reconciling
from git_tq.daemon.repostate import RepoState, advance
from git_tq.errors import InvalidTransition, NotOurs, RefRace, TqError
from git_tq.home import RunFiles, ensure_log_folder
from git_tq.lifecycle import now_iso
from git_tq.model import Job, State, launch_stop_signal
from git_tq.procs import shell_argv

SLURM_POLL_SECONDS = 1.0  # how often the daemon asks Slurm while it has Slurm jobs
EXIT_PATIENCE = 10.0  # seconds an exit file may lag behind Slurm's word that a job ended
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED",
           "RESIZING", "SPECIAL_EXIT"}
ENDED_BY_SLURM = {"CANCELLED", "NODE_FAIL", "PREEMPTED", "DEADLINE", "BOOT_FAIL",
                  "OUT_OF_MEMORY"}
LIVE = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "STOPPED"}


class SlurmJobs(Reconciling):
    """Submitting, following and stopping the jobs that Slurm runs."""

    def follow_slurm(self, rs: RepoState, jobs: list[Job], ready: set[int],
                     reasons: dict[int, str]) -> None:
        """One cycle for a repository's active Slurm jobs: submit those `ready` (their
        dependencies met, the queue not paused), record starts and ends, cancel in Slurm
        what was taken out of the queue here. `reasons` gets why each waiting one
        waits (Slurm's state and reason)."""
        files = {job.id: RunFiles(self.home, rs.key, job.id) for job in jobs}
        known = {job.id: rf.read(rf.slurm) or {} for job, rf in
                 ((j, files[j.id]) for j in jobs)}
        ids = [str(k["id"]) for k in known.values() if k.get("id")]
        try:
            states = slurm.states(ids) if ids else {}
        except TqError as exc:
            log.warning("%s: squeue failed: %s", rs.common, exc)
            return  # nothing is decided without Slurm's word; the next cycle asks again
        for job in jobs:
            rf, info = files[job.id], known[job.id]
            sid = str(info.get("id") or "")
            try:
                self.follow_one(rs, job, rf, info, states.get(sid) if sid else None,
                                job.id in ready, reasons)
            except (TqError, OSError) as exc:
                log.warning("job %d (Slurm %s): %s", job.id, sid or "-", exc)
        self.slurm_repos.add(rs.key)
        if jobs:
            due = time.time() + SLURM_POLL_SECONDS
            self.next_deadline = due if self.next_deadline is None else \
                min(self.next_deadline, due)
        self.cancel_forgotten(rs, {job.id for job in jobs})

    def follow_one(self, rs: RepoState, job: Job, rf: RunFiles, info: Mapping[str, Any],
                   state: Optional[slurm.SlurmJobState], ready: bool,
                   reasons: dict[int, str]) -> None:
        sid = str(info.get("id") or "")
        if job.state is State.PENDING:
            if not sid:
                if info.get("name"):  # an sbatch whose answer a killed daemon never wrote
                    found = slurm.find_by_name(str(info["name"]))
                    if found is not None:
                        rf.write(rf.slurm, {**info, "id": found})
                        return
                if ready:
                    self.submit_to_slurm(rs, job, rf)
                return
            attempt = job.attempt + 1
            af = rf.of_attempt(attempt)
            ident = af.read(af.ident)
            if ident is not None or os.path.exists(af.exit):
                job = self.slurm_started(rs, job, sid, ident, state)
                if job.state is State.PENDING:
                    return
            elif state is not None and state.state in WAITING | LIVE:
                reasons[job.id] = f"Slurm job {sid}: {state.state.lower()}" + (
                    f" ({state.reason})" if state.reason and state.reason != "None" else "")
                return
            elif job.event == "retry" and info.get("retried") != job.retried:
                if ready:
                    self.submit_to_slurm(rs, job, rf)  # its next attempt: a new batch job
                return
            else:
                if not self.patient(rs, job, state):
                    return
                what = slurm_words(state)
                self.record(rs, job, "cancelled", af, detail=f"Slurm {what} before it started")
                self.forget_slurm(rf)
                return
        af = rf.of_attempt(job.attempt)
        # The attempt's run of its batch job (a retried job's next attempt is a new one,
        # whose SLURM_RESTART_COUNT starts again at 0).
        run = job.attempt - batch_base(rf, info)
        outcome, stop = af.read(af.exit), af.read(af.stop)
        if outcome is not None:
            self.slurm_ended(rs, job, af, rf, outcome, stop, state, run)
            return
        escalated = stop.get("escalated") if stop is not None else None
        if isinstance(escalated, (int, float)) and time.time() >= escalated + 1:
            # SIGKILLed by us a second ago, batch job and all: no exit file will come, and
            # Slurm's cleanup (COMPLETING, its own patience) need not be waited for.
            self.record(rs, job, "cancelled", af, detail="killed by the user", stop="forced",
                        stop_seconds=round(time.time() - float(stop["signalled_at"]), 1)
                        if stop is not None and isinstance(stop.get("signalled_at"),
                                                           (int, float)) else None)
            self.forget_slurm(rf)
            return
        if state is not None and state.state in LIVE:
            self.enforce_slurm_kill(af, sid, stop)
            return
        if state is not None and state.state in WAITING and state.restart_count >= run:
            # Requeued with no exit status of ours (a node failure, an admin's requeue).
            self.record(rs, job, "preempted", af, detail=f"requeued by Slurm ({state.reason})")
            return
        if not self.patient(rs, job, state):
            return
        what = slurm_words(state)
        if stop is not None and stop.get("kind") == "kill":
            self.record(rs, job, "cancelled", af, detail=f"killed by the user ({what})",
                        stop="forced")
        else:
            self.record(rs, job, "finished", af, detail=f"Slurm {what}; its exit status is lost")
        self.forget_slurm(rf)

    def patient(self, rs: RepoState, job: Job, state: Optional[slurm.SlurmJobState]) -> bool:
        """Whether Slurm's word that a job ended without our exit file has stood long
        enough (a file written on a node may show here a little later)."""
        key = (rs.key, job.id, job.attempt)
        first = self.slurm_gone.setdefault(key, time.time())
        if time.time() - first < EXIT_PATIENCE:
            due = first + EXIT_PATIENCE
            self.next_deadline = due if self.next_deadline is None else \
                min(self.next_deadline, due)
            return False
        del self.slurm_gone[key]
        return True

    def slurm_started(self, rs: RepoState, job: Job, sid: str,
                      ident: Optional[Mapping[str, Any]],
                      state: Optional[slurm.SlurmJobState]) -> Job:
        event = "resumed" if job.attempt > 0 and job.event != "retry" else "started"
        node = (ident or {}).get("node") or (state.node if state else None) or "its node"
        try:
            new = advance(rs, job, event, now_iso(), detail=f"Slurm job {sid} on {node}")
        except (InvalidTransition, RefRace, NotOurs) as exc:
            log.info("job %d: %s not recorded: %s", job.id, event, exc)
            self.read_everything = True
            return job
        self.remember(rs, new)
        log.info("job %d in %s: %s (Slurm job %s)", job.id, rs.common, event, sid)
        self.run_hook(rs, new, "resume" if event == "resumed" else "start")
        return new

    def slurm_ended(self, rs: RepoState, job: Job, af: RunFiles, rf: RunFiles,
                    outcome: Mapping[str, Any], stop: Optional[Mapping[str, Any]],
                    state: Optional[slurm.SlurmJobState], run: int) -> None:
        if stop is not None and stop.get("kind") in ("slurm", "timeout"):
            # Slurm's signal: a preemption (it is requeued), its time limit (the node took
            # it for the one before the limit: kind timeout), or someone's scancel. Slurm's
            # next word says which.
            if state is not None and state.state in LIVE and state.restart_count < run:
                return
            requeued = state is not None and (state.state in WAITING or
                                              state.restart_count >= run)
            if requeued:
                self.finish(rs, job, af, outcome, {**stop, "kind": "preempt",
                                                   "reason": "preempted (slurm)"})
                return
            if state is not None and state.state == "TIMEOUT":
                self.finish(rs, job, af, outcome, {**stop, "kind": "timeout",
                                                   "reason": "Slurm time limit reached"})
                self.forget_slurm(rf)
                return
            if state is not None and state.state in ENDED_BY_SLURM:
                # Cancelled by someone else (an admin's scancel), a node that failed...
                self.finish(rs, job, af, outcome, {**stop, "kind": "kill",
                                                   "reason": f"Slurm {slurm_words(state)}"})
                self.forget_slurm(rf)
                return
        new = self.finish(rs, job, af, outcome, stop)
        if new.state.finished:
            self.forget_slurm(rf)

    def enforce_slurm_kill(self, af: RunFiles, sid: str,
                           stop: Optional[Mapping[str, Any]]) -> None:
        """A `git tq kill` past its grace: SIGKILL to everything of the batch job, and
        Slurm ends it (once: the attempt's `.stop` says it was done)."""
        if stop is None or stop.get("kind") != "kill" or stop.get("escalated"):
            return
        if time.time() >= float(stop.get("deadline", 0)):
            af.write(af.stop, {**stop, "escalated": time.time()})
            slurm.cancel(sid, signal="KILL", full=True)
            slurm.cancel(sid)

    def stop_elsewhere(self, rs: RepoState, job: Job, now: bool) -> bool:
        if job.spec.backend != "slurm":
            return super().stop_elsewhere(rs, job, now)
        self.slurm_kill(rs, job, now)
        return True

    def slurm_kill(self, rs: RepoState, job: Job, now: bool) -> None:
        """`git tq kill` of a running Slurm job: its stop signal through Slurm to the
        batch job (which hands it on to the job), `scancel` at the end of the grace."""
        info = RunFiles(self.home, rs.key, job.id)
        sid = str((info.read(info.slurm) or {}).get("id") or "")
        af = info.of_attempt(job.attempt)
        grace = 0 if now else job.spec.grace
        old = af.read(af.stop) or {}
        af.write(af.stop, {**old, "kind": "kill", "reason": "killed by the user",
                           "deadline": time.time() + grace})
        if job.state is State.RUNNING:
            with contextlib.suppress(InvalidTransition, RefRace, NotOurs):
                self.remember(rs, advance(rs, job, "stopping", now_iso(),
                                          detail="killed by the user"))
        if not sid:
            return
        if now:
            slurm.cancel(sid)
        else:
            launch = info.read(info.launch) or {}
            sig = launch_stop_signal(launch.get("stop_signal"))
            slurm.cancel(sid, signal=sig.removeprefix("SIG"), full=True)
        log.info("job %d in %s: Slurm job %s killed%s", job.id, rs.common, sid,
                 " now" if now else f", {grace} s of grace")

    def submit_to_slurm(self, rs: RepoState, job: Job, rf: RunFiles) -> None:
        """sbatch the job's batch script; `<id>.slurm` says so before and after."""
        entry = rs.ours(job)
        if entry is None:
            return
        spec = rs.local.load_spec(entry.submission)
        logfile = rs.store.log_path(job)
        try:
            if spec is None:
                raise TqError("its private record in the tq home is missing; requeue it")
            workdir = rs.config.get("tq.slurm.workdir", "").strip()
            worktree = os.path.join(os.path.expanduser(workdir), rs.key, str(job.id)) \
                if workdir else self.home.worktree_dir(rs.key, job.id)
            env = self.job_env(job, spec, (), logfile, worktree, rf.metrics)
            del env["CUDA_VISIBLE_DEVICES"]  # Slurm's own, on the node
            argv = shell_argv(spec.command[0]) if spec.shell else list(spec.command)
            launch = {
                "gpus": [], "job_id": job.id, "attempt": job.attempt + 1, "argv": argv,
                "cwd": safe_join(worktree, spec.cwd), "env": env, "log": logfile,
                "banner": banner(job, rs, worktree, ()),
                "lock": rf.lock, "ident": rf.ident, "exit": rf.exit, "stop": rf.stop,
                "ended": rf.ended, "stop_signal": spec.stop_signal,
                "stop_target": spec.stop_target, "time_limit": spec.time_limit,
                "grace": job.spec.grace,
                "retries": spec.retries, "socket": self.home.socket_path(),
                "attempt_base": job.attempt,
                "results": {"common": rs.common, "worktree": worktree,
                            "submission": entry.submission, "metrics_file": rf.metrics,
                            "series": rf.series,
                            "limits": results.Limits.from_config(rs.config).to_json()},
                "slurm": {"common": rs.common, "worktree": worktree,
                          "submission": entry.submission, "spec": spec.to_json(),
                          "config": dict(rs.config)},
            }
            rf.write(rf.launch, launch)
            ensure_log_folder(logfile)
            # Unique to this repository and batch job (a retry's is a new one): a daemon
            # killed mid-sbatch looks for it by this name, and must find no other.
            digest = hashlib.sha256(rs.key.encode()).hexdigest()[:8]
            name = f"tq-{digest}-{job.id}-{job.attempt + 1}"
            signame = spec.stop_signal.removeprefix("SIG")
            script = (f"#!/bin/sh\n# git tq job {job.id} of {rs.common}\n"
                      f"exec {shlex.quote(sys.executable)} -m git_tq.slurmjob "
                      f"{shlex.quote(rf.launch)}\n")
            options = [f"--job-name={name}", "--requeue", "--open-mode=append",
                       f"--output={logfile}", f"--signal=B:{signame}@{max(1, job.spec.grace)}",
                       *spec.slurm_args]
            rf.write(rf.slurm, {"name": name, "at": time.time(), "retried": job.retried,
                                "base": job.attempt})
            sid = slurm.submit(script, options)
        except (TqError, OSError) as exc:
            reason = f"could not submit to Slurm: {exc}"
            with contextlib.suppress(OSError):
                ensure_log_folder(logfile)
                with open(logfile, "a", encoding="utf-8") as fh:
                    fh.write(f"[git tq] {reason}\n")
            self.record(rs, job, "start-failed", rf.of_attempt(job.attempt + 1), detail=reason)
            self.forget_slurm(rf)
            return
        rf.write(rf.slurm, {"name": name, "id": sid, "at": time.time(),
                            "retried": job.retried, "base": job.attempt})
        log.info("job %d in %s: submitted to Slurm as job %s", job.id, rs.common, sid)

    def slurm_submitted(self, rs: RepoState, job_id: int) -> bool:
        rf = RunFiles(self.home, rs.key, job_id)
        return os.path.exists(rf.slurm)

    def forget_slurm(self, rf: RunFiles) -> None:
        """The job is over for Slurm and for us: its job-wide run files go."""
        for path in (rf.slurm, rf.launch):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def cancel_forgotten(self, rs: RepoState, active: set[int]) -> None:
        """A Slurm job whose record ended here (`rm` of a waiting job, a cascade) is
        cancelled in Slurm, and its run files go."""
        folder = RunFiles(self.home, rs.key, 0).folder
        try:
            names = [n for n in os.listdir(folder) if n.endswith(".slurm")]
        except OSError:
            names = []
        if not names and not active:
            self.slurm_repos.discard(rs.key)  # idle cycles need not look again
        for name in names:
            try:
                job_id = int(name[:-len(".slurm")])
            except ValueError:
                continue
            if job_id in active or job_id in rs.active:
                continue
            rf = RunFiles(self.home, rs.key, job_id)
            info = rf.read(rf.slurm) or {}
            sid = str(info.get("id") or "")
            if not sid and info.get("name"):  # an sbatch a killed daemon never heard back
                with contextlib.suppress(TqError):
                    sid = slurm.find_by_name(str(info["name"])) or ""
            if sid:
                with contextlib.suppress(TqError):
                    slurm.cancel(sid)
                    log.info("job %d in %s: cancelled in Slurm (job %s)", job_id, rs.common,
                             sid)
            self.forget_slurm(rf)


def batch_base(rf: RunFiles, info: Mapping[str, Any]) -> int:
    """The attempts a job had before its current batch job (0 unless it was retried)."""
    base = info.get("base")
    if not isinstance(base, int):  # written by an older git tq: its launch file says
        base = (rf.read(rf.launch) or {}).get("attempt_base")
    return base if isinstance(base, int) else 0


def slurm_words(state: Optional[slurm.SlurmJobState]) -> str:
    """What Slurm says of a job that ended: `ended it: CANCELLED (by 0)`."""
    if state is None:
        return "no longer knows the job"
    text = state.state
    if state.reason and state.reason not in ("None", ""):
        text += f" ({state.reason})"
    return f"ended it: {text}"

