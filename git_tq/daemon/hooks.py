"""The daemon's hooks: the repository's tq-* hooks (tq-submit once per new job,
tq-start, tq-resume, tq-preempt, tq-finish), started in the background with the
job's TQ_* variables, and tq.autoPush (a background `git tq push` after a job ends).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from git_tq.daemon.base import DaemonBase, log
from git_tq.daemon.repostate import RepoState
from git_tq.gitrepo import without_repo_vars
from git_tq.home import RunFiles
from git_tq.model import Job

AUTO_PUSH_TIMEOUT = 600.0  # seconds a background `git tq push` (tq.autoPush) may take


class Hooks(DaemonBase):
    """Running hooks and automatic pushes; the loop never waits for them."""

    def announce(self, rs: RepoState, job: Job) -> None:
        """Run the tq-submit hook once per new job (a marker in its run files says so)."""
        rf = RunFiles(self.home, rs.key, job.id)
        if os.path.exists(rf.announced):
            return
        try:
            rf.write(rf.announced, {"snapshot": job.snapshot})
        except OSError as exc:
            if self.short_of_space(rs, job.id, "note its tq-submit hook", exc):
                return  # run once there is room to remember it ran
            raise
        self.space_again(rs, job.id, "note its tq-submit hook")
        self.run_hook(rs, job, "submit")

    # --- tq.autoPush ----------------------------------------------------------------

    def auto_push(self, rs: RepoState) -> None:
        """Start a best-effort `git tq push` of the repository in the background (its own
        process and session; the loop never waits for it). One at a time per repository:
        a job that ends while one runs gets one more push after it, never a retry."""
        if rs.common in self.pushing:
            self.push_again.add(rs.common)
            return
        err_path = os.path.join(self.home.path, f"push-{rs.key}.err")
        try:
            with open(err_path, "wb") as err:  # in the 0700 home: git's words, no secrets
                proc = subprocess.Popen(
                    [sys.executable, "-m", "git_tq", "push"], cwd=rs.common,
                    env={**without_repo_vars(os.environ), "GIT_TERMINAL_PROMPT": "0"},
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True)
        except OSError as exc:
            log.warning("%s: tq.autoPush could not start git tq push: %s", rs.common, exc)
            return
        self.pushing[rs.common] = (proc, time.monotonic(), err_path)

    def reap_pushes(self) -> None:
        """Log the pushes that failed, give up on any that ran too long (killed, not
        retried), and start the one more push a job's ending asked for meanwhile."""
        for common, (proc, started, err_path) in list(self.pushing.items()):
            code = proc.poll()
            if code is None and time.monotonic() - started > AUTO_PUSH_TIMEOUT:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
                log.warning("%s: tq.autoPush: git tq push took over %d s; stopped",
                            common, AUTO_PUSH_TIMEOUT)
            if code is None:
                continue
            del self.pushing[common]
            if code != 0:
                try:
                    with open(err_path, "rb") as fh:
                        why = fh.read(4096).decode(errors="replace").strip().splitlines()
                except OSError:
                    why = []
                log.warning("%s: tq.autoPush failed (not retried): %s", common,
                            why[-1] if why else f"exit {code}")
            with contextlib.suppress(OSError):
                os.unlink(err_path)
            rs = self.repos.get(common)
            if common in self.push_again and rs is not None:
                self.push_again.discard(common)
                self.auto_push(rs)

    # --- hooks ---------------------------------------------------------------------

    def run_hook(self, rs: RepoState, job: Job, event: str) -> None:
        configured = rs.config.get("core.hookspath")
        if configured:
            hooks_dir = os.path.expanduser(configured)
            if not os.path.isabs(hooks_dir):  # relative to the work tree's top, as in git
                hooks_dir = os.path.join(os.path.dirname(rs.common), hooks_dir)
        else:
            hooks_dir = os.path.join(rs.common, "hooks")
        path = os.path.join(hooks_dir, f"tq-{event}")
        if not os.access(path, os.X_OK):
            return
        env = {**without_repo_vars(os.environ), **hook_env(job, event, rs.common)}
        try:
            proc = subprocess.Popen([path], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True, cwd=rs.common)
        except OSError as exc:
            log.warning("hook %s failed to start: %s", path, exc)
            return
        self.hooks.append(proc)


def hook_env(job: Job, event: str, common: str) -> dict[str, str]:
    s = job.spec
    values = {
        "TQ_EVENT": event, "TQ_JOB_ID": job.id, "TQ_STATE": job.state.value,
        "TQ_COMMAND": s.command_line(), "TQ_PRIORITY": s.priority, "TQ_TAG": s.tag or "",
        "TQ_EXIT_CODE": "" if job.exit_code is None else job.exit_code,
        "TQ_SIGNAL": "" if job.signal is None else job.signal, "TQ_ATTEMPT": job.attempt,
        "TQ_GPUS": ",".join(map(str, job.assigned_gpus or ())), "TQ_DETAIL": job.detail or "",
        "TQ_SNAPSHOT": job.snapshot, "TQ_SOURCE": job.source or "",
        "TQ_SUBMITTED_AT": s.submitted_at, "TQ_STARTED_AT": job.started_at or "",
        "TQ_ENDED_AT": job.ended_at or "", "TQ_REPO": common,
    }
    return {k: str(v) for k, v in values.items()}
