"""The daemon itself (`Daemon`): its lock and socket, the select loop (requests,
signals, children's exits, deadlines, the safety rescan, the GPU probe), the socket's
requests (`handle`), and one scheduling cycle: read what changed, reconcile, ask
`scheduler.plan`, preempt and start, record endings, then the worktrees' work off the
critical path. `run_foreground` runs it (`python -m git_tq.daemon HOME`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional

from git_tq import __version__, client, gpus, scheduler
from git_tq import pause as pausing
from git_tq.daemon.base import DaemonBase, log
from git_tq.daemon.hooks import Hooks
from git_tq.daemon.launch import Launching
from git_tq.daemon.reconcile import Reconciling
from git_tq.daemon.repostate import Reading, RepoState
from git_tq.daemon.slurm import SlurmJobs
from git_tq.daemon.worktrees import Worktrees
from git_tq.errors import TqError
from git_tq.home import Home, RunFiles, ensure_private_dir, tighten_home, write_private_file
from git_tq.model import Job, State
from git_tq.procs import become_subreaper, group_alive, reap_group, zombie_children
from git_tq.server import BadRequest, RequestServer, check_request
from git_tq.store import file_stamp, settled

RESCAN_SECONDS = 3.0  # the safety rescan; TQ_RESCAN_SECONDS overrides it (tests, diagnosis)


def rescan_seconds() -> float:
    try:
        return min(max(float(os.environ.get("TQ_RESCAN_SECONDS", RESCAN_SECONDS)), 0.2), 60.0)
    except ValueError:
        return RESCAN_SECONDS
PROBE_SECONDS = 0.5
PREPARE_AHEAD = 2  # waiting jobs whose worktrees are checked out before their turn


class AlreadyRunning(TqError):
    pass


def setting(repos: list[RepoState], name: str) -> Optional[str]:
    """A daemon-wide setting: from the first registered repository that sets it."""
    for rs in repos:
        if name in rs.config:
            return rs.config[name]
    return None


class Daemon(SlurmJobs, Reconciling, Launching, Worktrees, Reading, Hooks, DaemonBase):
    """One per tq home; its parts are the classes it is made of, one file each."""

    # --- lifecycle of the daemon itself ---------------------------------------

    def acquire(self) -> None:
        ensure_private_dir(self.home.path)
        tighten_home(self.home.path)
        fd = os.open(self.home.daemon_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AlreadyRunning(f"a git tq daemon already runs for {self.home.path}") from None
        self.lock_fd = fd
        path = self.home.make_socket_path()  # in the home, or a private folder it records
        self.socket_file = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # we hold the lock, so no live daemon listens there
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        server.listen(256)  # room for a burst; RequestServer caps what is held open
        server.setblocking(False)
        self.server = server
        write_private_file(self.home.daemon_info, json.dumps({
            "pid": os.getpid(), "started": self.started_at, "socket": path,
            "version": __version__, "protocol": client.PROTOCOL,
        }).encode())

    def serve(self) -> None:
        self.acquire()
        assert self.server is not None
        # A job whose supervisor dies (the OOM killer, a kill -9) comes to us, not to
        # init: its exit status is then ours to reap and record (`adopt_orphan`).
        become_subreaper()
        log.info("daemon %s started, pid %d, home %s", __version__, os.getpid(), self.home.path)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        sel = selectors.DefaultSelector()
        # The socket's connections live in this loop, non-blocking, each with a deadline.
        requests = RequestServer(self.server, sel, self.handle, client.PROTOCOL)
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        last_scan = 0.0
        rescan = rescan_seconds()
        last_probe = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if self.dirty or now - last_scan >= rescan:
                    timer = now - last_scan >= rescan
                    self.dirty = False
                    last_scan = now
                    last_probe = now
                    self.safe_cycle(timer)
                elif self.gpus_in_use and now - last_probe >= PROBE_SECONDS:
                    last_probe = now
                    if self.foreign_changed():
                        self.dirty = True
                        continue
                timeout = rescan - (time.monotonic() - last_scan)
                if self.gpus_in_use:
                    timeout = min(timeout, PROBE_SECONDS - (time.monotonic() - last_probe))
                if self.next_deadline is not None:
                    timeout = min(timeout, self.next_deadline - time.time())
                conn_deadline = requests.next_deadline()
                if conn_deadline is not None:
                    timeout = min(timeout, conn_deadline - time.monotonic())
                for key, events in sel.select(max(timeout, 0.0)):
                    if requests.owns(key):
                        requests.ready(key, events)  # requests are handled here, on this thread
                    else:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(wake_r, 4096):
                                pass
                        self.reap()
                requests.expire()
                if self.next_deadline is not None and time.time() >= self.next_deadline:
                    self.dirty = True
        finally:
            log.info("daemon stopping; running jobs keep running")
            for repo in self.told:  # its word on waiting jobs goes with it
                with contextlib.suppress(OSError):
                    os.unlink(self.home.waiting_file(repo))
            requests.close_all()
            self.server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_file)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.home.daemon_info)

    def _on_stop_signal(self, *_: Any) -> None:
        self.stopping = True

    def reap(self) -> None:
        """Collect exited supervisors we forked (not other children: a Popen must keep
        its own exit status), jobs whose supervisor died (`adopt_orphan`) and what their
        process groups left, and finished hooks."""
        for pid in list(self.supervisors) + list(self.removals):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.supervisors.discard(pid)
                self.removals.pop(pid, None)
                self.dirty = True
        self.reap_orphans()
        self.reap_concluding()
        for pgid in list(self.orphan_groups):  # what their groups left comes to us too
            reap_group(pgid)
            if not group_alive(pgid):
                self.orphan_groups.discard(pgid)
        self.hooks = [h for h in self.hooks if h.poll() is None]
        for spare in self.spares.values():
            spare.proc.poll()  # reaped now (no zombie); its status kept for `take_spare`
        self.packing = {c: p for c, p in self.packing.items() if p.poll() is None}
        self.reap_pushes()
        declined = []
        for path, checkout in self.preparing.items():
            if path in self.abandoned:
                if checkout.proc.poll() is not None:
                    self.dirty = True  # its job was cancelled: the next cycle removes it
            elif checkout.proc.poll() == 0:  # reaped; the status stays for ensure_worktree
                self.finish_checkout(path, checkout)
            elif checkout.recycled_from and checkout.proc.poll() is not None:
                declined.append(path)
        for path in declined:  # prepared the usual way by the next cycle
            del self.preparing[path]
            self.dirty = True
        self.reap_strays()

    def reap_strays(self) -> None:
        """Reap the exited children that nobody waits for. As child subreaper the daemon
        inherits every orphan below it: what a tq-* hook or a push left running (`sleep
        60 &`), what a job left when its supervisor died, what a killed git left. Each
        would stay a zombie. The children whose status someone reads are left to them:
        supervisors, stand-ins, checkouts, spares, removals, hooks, pushes, `pack-refs`,
        and followed orphans; so is every running job's main process, a group leader
        whose supervisor may just have died (its status is `adopt_orphan`'s)."""
        zombies = zombie_children()
        if not zombies:
            return
        owned = {*self.supervisors, *self.removals, *self.orphans, *self.concluding,
                 *(p.pid for p in self.hooks), *(p.pid for p in self.packing.values()),
                 *(p.pid for p, _, _ in self.pushing.values()),
                 *(c.proc.pid for c in self.preparing.values()),
                 *(s.proc.pid for s in self.spares.values())}
        jobs: Optional[set[int]] = None
        for pid in zombies:
            if pid in owned:
                continue
            try:
                leader = os.getpgid(pid) == pid
            except OSError:
                continue
            if leader:
                jobs = self.running_job_pids() if jobs is None else jobs
                if pid in jobs:
                    continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def running_job_pids(self) -> set[int]:
        """The main processes of the running and stopping jobs, from their `.ident`."""
        pids: set[int] = set()
        for rs in self.repos.values():
            for job in rs.active.values():
                if job.state in (State.RUNNING, State.STOPPING):
                    rf = RunFiles(self.home, rs.key, job.id)
                    with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
                        pids.add(int((rf.read(rf.ident) or {})["job"][0]))
        return pids

    # --- the socket -------------------------------------------------------------

    # Connections, limits, deadlines and the request schema: git_tq/server.py.

    def handle(self, request: object) -> dict[str, Any]:
        """Answer one request, on the loop's thread. A request that breaks the schema
        gets an error, never an exception."""
        try:
            req = check_request(request, client.PROTOCOL)
        except BadRequest as exc:
            return {"error": str(exc)}
        cmd = req["cmd"]
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(), "version": __version__}
        if cmd == "nudge":
            # A nudge that names its repository and jobs (a submission, a supervisor) makes
            # the cycle read just those refs; any other reads everything.
            repo, named = req.get("repo"), req.get("jobs")
            if isinstance(repo, str) and isinstance(named, list):
                self.named.setdefault(os.path.realpath(repo), set()).update(named)
            else:
                self.read_everything = True
            log.debug("nudged")
            self.dirty = True
            return {"ok": True}
        if cmd == "stop":
            self.stopping = True
            return {"ok": True}
        if cmd == "status":
            return {"ok": True, "pid": os.getpid(), "version": __version__,
                    "started": self.started_at, "socket": self.socket_file,
                    "home": self.home.path, "repos": self.home.registered_repos(),
                    "counts": self.counts, "stats": self.stats, "foreign": {str(k): v for k, v in
                                                       self.last_foreign.items()},
                    "paused": self.pause.to_json()}
        if cmd == "kill":
            try:
                done = self.kill_jobs(req["repo"], list(req["jobs"]), req.get("now", False))
            except TqError as exc:
                return {"error": str(exc)}
            except Exception as exc:  # the loop must outlive any one request
                log.exception("kill failed")
                return {"error": f"kill failed: {exc}"}
            self.dirty = True
            self.read_everything = True
            return {"ok": True, "jobs": done}
        return {"error": f"unknown request {cmd!r}"}

    # --- one scheduling cycle -------------------------------------------------------

    def safe_cycle(self, timer: bool = False) -> None:
        t0 = time.monotonic()
        try:
            self.cycle(timer)
            log.debug("cycle took %.1f ms", (time.monotonic() - t0) * 1000)
        except Exception:  # the daemon must outlive any one bad repository or race
            log.exception("scheduling cycle failed; retrying on the next one")
            self.dirty = False
            self.read_everything = True

    def cycle(self, timer: bool = True) -> None:
        self.stats["cycles"] += 1
        repos = self.load(timer)
        self.next_deadline = None
        holding: list[scheduler.Holding] = []
        waiting: list[scheduler.Waiting] = []
        jobs: dict[scheduler.JobKey, tuple[RepoState, Job]] = {}
        self.endings = []
        ending: dict[str, int] = {}  # by repository: attempts over, not yet recorded
        # Jobs Slurm runs, by repository, and those of them whose dependencies are met.
        elsewhere: dict[str, tuple[RepoState, list[Job]]] = {}
        slurm_ready: set[scheduler.JobKey] = set()
        pending_keys: set[scheduler.JobKey] = set()
        held_for_room: dict[scheduler.JobKey, tuple[RepoState, Job]] = {}
        for rs in repos:
            verdicts = self.follow_dependencies(rs)
            for job_id in sorted(rs.tampered - rs.active.keys()):
                # Ours by the ledger, but someone moved the record (it says it ended).
                self.warn_once(rs, rs.tips[job_id], f"job {job_id}'s record was moved by "
                               "someone else (a fetch or a hand edit): it is tampered and is "
                               "neither run nor written; see git tq doctor")
                held = self.live_run_gpus(rs, job_id)
                if held is not None:
                    holding.append(scheduler.Holding((rs.key, job_id), -(10**9), held, True))
            for job in rs.jobs:
                key = (rs.key, job.id)
                if rs.ours(job) is None:
                    # Fetched or tampered: never run, written or hooked. A run of ours
                    # that is still alive keeps its GPUs, and is never a victim.
                    self.report_foreign_record(rs, job)
                    held = self.live_run_gpus(rs, job.id)
                    if held is not None:
                        holding.append(scheduler.Holding(key, -(10**9), held, True))
                    continue
                if job.spec.backend == "slurm":  # Slurm schedules it: not in our plan
                    elsewhere.setdefault(rs.key, (rs, []))[1].append(job)
                    verdict = verdicts.get(job.id)
                    if verdict is None or (verdict.broken is None and not verdict.waiting_for):
                        slurm_ready.add(key)
                    if job.state is State.PENDING and job.attempt == 0:
                        self.announce(rs, job)
                    continue
                if job.state in (State.RUNNING, State.STOPPING):
                    job = self.reconcile(rs, job)  # may record an ending
                if job.state is State.RUNNING and not (self.endings and
                                                       self.endings[-1][1] is job):
                    job = self.enforce_time_limit(rs, job)
                if job.state in (State.RUNNING, State.STOPPING) and (
                        self.endings and self.endings[-1][1] is job
                        or os.path.exists(RunFiles(self.home, rs.key, job.id).ended)):
                    # Its processes are gone (the supervisor killed what was left): its
                    # GPUs are free while the supervisor records what it produced.
                    jobs[key] = (rs, job)
                    if key in self.made_with:  # its worktree may be recycled
                        ending[rs.key] = ending.get(rs.key, 0) + 1
                elif job.state in (State.RUNNING, State.STOPPING):
                    holding.append(scheduler.Holding(key, job.spec.priority,
                                                     job.assigned_gpus or (),
                                                     job.state is State.STOPPING))
                    jobs[key] = (rs, job)
                elif job.state is State.PENDING:
                    pending_keys.add(key)
                    room = self.no_room.get(key)
                    if room is not None and not room.room_again():
                        held_for_room[key] = (rs, job)  # its last start found no space
                        continue
                    verdict = verdicts.get(job.id)
                    # One still here with a broken dependency (its cancellation lost a
                    # race) waits for the next cycle's judgement, never starts.
                    blocked = () if verdict is None else verdict.waiting_for if \
                        verdict.broken is None else (verdict.broken,)
                    waiting.append(scheduler.Waiting(key, job.spec.priority,
                                                     job.spec.submitted_at, job.spec.gpus,
                                                     blocked))
                    jobs[key] = (rs, job)
                    if job.attempt == 0:
                        self.announce(rs, job)
        machine = self.machine_gpus(repos)
        self.gpus_in_use = bool(machine) and (bool(holding) or bool(waiting))
        foreign = self.find_foreign(machine, holding, jobs)
        self.last_foreign = foreign
        cpu_slots = int(setting(repos, "tq.cpuslots") or max(1, (os.cpu_count() or 2) // 2))
        per_gpu = int(setting(repos, "tq.jobspergpu") or 1)
        self.read_pause()
        plan = scheduler.plan(waiting, holding, machine, foreign=foreign, cpu_slots=cpu_slots,
                              jobs_per_gpu=per_gpu, paused=frozenset(self.pause.gpus),
                              all_paused=self.pause.everything)
        reasons = dict(plan.reasons)
        for rs in repos:
            if rs.key not in elsewhere and rs.key not in self.slurm_repos:
                continue
            rs, slurm_jobs = elsewhere.get(rs.key, (rs, []))
            why: dict[int, str] = {}
            pending = {j.id for j in slurm_jobs if (rs.key, j.id) in slurm_ready}
            if self.pause.everything:
                why.update({i: "paused" for i in pending if not self.slurm_submitted(rs, i)})
                pending = set()
            self.follow_slurm(rs, slurm_jobs, pending, why)
            for job_id, text in why.items():
                if job_id in rs.active:
                    key = (rs.key, job_id)
                    jobs[key] = (rs, rs.active[job_id])
                    reasons[key] = scheduler.Reason("paused" if text == "paused" else "slurm",
                                                    text)
        for p in plan.preempts:
            rs, job = jobs[p.victim]
            self.request_stop(rs, job, "preempt", p.reason, now=False)
        for s in plan.starts:
            rs, job = jobs[s.key]
            self.start(rs, job, s.gpus)
        # Jobs whose start found no space wait for room, and say so (`ls`).
        jobs.update(held_for_room)
        for key in list(self.no_room):
            if key not in pending_keys and key[0] in {rs.key for rs in repos}:
                del self.no_room[key]  # it left the queue
            elif key in jobs and jobs[key][1].state is State.PENDING:
                reasons[key] = scheduler.Reason("space", self.no_room[key].reason)
        # Endings are recorded after the starts they made room for: storing the log and
        # writing the record take a dozen milliseconds the next job need not wait.
        endings, self.endings = self.endings, []
        for rs, job, rf, outcome, stop in endings:
            self.finish(rs, job, rf, outcome, stop)
        if endings:
            self.dirty = True  # a preempted job is waiting again: plan with it at once
        self.counts = {"running": len(holding) + len(plan.starts), "pending":
                       len(waiting) - len(plan.starts) + len(held_for_room), "repos": len(repos),
                       "held": sum(1 for r in plan.reasons.values() if r.kind == "paused")}
        self.update_deadline(repos)
        self.tell_reasons(repos, reasons, jobs)
        # Work that is not on anyone's critical path: remove finished jobs' worktrees,
        # and check out the next waiting jobs' worktrees so that starting them is a fork.
        started = {s.key for s in plan.starts}
        # The next jobs that can start (their dependencies met): their worktrees first.
        ready = [w for w in scheduler.queue_order(waiting) if not w.waiting_for]
        ahead = [jobs[w.key] for w in ready[:PREPARE_AHEAD] if w.key not in started]
        cleanup, self.cleanup = self.cleanup, []
        for rs, ended in cleanup:
            target = self.recycle_target(rs, ended, ahead)
            if target is not None:
                self.recycle(rs, ended, *target)
            else:
                self.remove_in_background(rs, ended.id, record=ended)
        for rs in repos:
            self.sweep_worktrees(rs)
        for rs in repos:
            if rs.ledger_changed:  # its check reads the ledger's new lines
                with contextlib.suppress(OSError):
                    rs.local.compact_if_sparse()
        for rs, job in self.leave_for_recycling(ahead, ending):
            with contextlib.suppress(TqError, OSError):
                self.prepare_worktree(rs, job)
        for rs in repos:
            self.make_spare(rs)

    def tell_reasons(self, repos: list[RepoState],
                     reasons: Mapping[scheduler.JobKey, scheduler.Reason],
                     jobs: Mapping[scheduler.JobKey, tuple[RepoState, Job]]) -> None:
        """Write why each waiting job waits where `ls` reads it (`Home.waiting_file`),
        for each repository whose reasons changed:
        {"pid": daemon, "jobs": {id: [tip, kind, text]}}."""
        by_repo: dict[str, dict[str, list[str]]] = {rs.key: {} for rs in repos}
        for key, why in reasons.items():
            rs, job = jobs[key]
            by_repo[rs.key][str(job.id)] = [job.tip, why.kind, why.text]
        for rs in repos:
            told = by_repo[rs.key]
            if self.told.get(rs.key) == told:
                continue
            with contextlib.suppress(OSError):
                path = self.home.waiting_file(rs.key)
                ensure_private_dir(os.path.dirname(path))
                write_private_file(path, json.dumps({"pid": os.getpid(),
                                                     "jobs": told}).encode())
                self.told[rs.key] = told

    def read_pause(self) -> None:
        """The pause as `git tq pause` left it in the tq home; read again only when the
        file's stat data changed (an idle cycle costs one stat)."""
        stamp = settled((file_stamp(pausing.pause_file(self.home.path)),))
        if stamp is None or stamp != self.pause_stamp:
            paused = pausing.read(self.home.path)
            if paused != self.pause:
                log.info("%s", paused.describe() if paused.active else "queue resumed")
            self.pause, self.pause_stamp = paused, stamp

    def machine_gpus(self, repos: list[RepoState]) -> tuple[int, ...]:
        declared = setting(repos, "tq.gpus")
        if declared is not None:
            return gpus.machine_gpus({"tq.gpus": declared})
        return gpus.machine_gpus({})


def main() -> None:
    """`python -m git_tq.daemon HOME`: run a daemon in the foreground."""
    home = Home(sys.argv[1] if len(sys.argv) > 1 else os.environ["TQ_HOME"])
    run_foreground(home)


class SafeFormatter(logging.Formatter):
    """Log lines quote record text (paths, ids, reasons): control characters are shown
    as escapes, since `daemon --foreground` may log to a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        from git_tq.safetext import visible

        return visible(super().format(record), newlines=True)


def run_foreground(home: Home) -> None:
    # A daemon started from a shell with GIT_DIR (or GIT_CONFIG_*, ...) set would point
    # every git process of every repository at that one: start from a clean slate.
    from git_tq.gitrepo import clean_git_env

    for name in set(os.environ) - set(clean_git_env(os.environ)):
        del os.environ[name]
    level = logging.DEBUG if os.environ.get("TQ_DEBUG") else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    daemon = Daemon(home)
    try:
        daemon.serve()
    except AlreadyRunning as exc:
        log.info("%s", exc)
        sys.exit(0)
