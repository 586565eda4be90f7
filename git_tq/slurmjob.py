"""A Slurm batch job's payload: what runs on the node Slurm picked.

The daemon submits `python -m git_tq.slurmjob <launch file>` with sbatch. Here, on
the node, it makes the job's worktree from the job's own submission commit (or
finds the one an earlier attempt used, checkpoints and all), adds what Slurm gives
the job (`SLURM_*`, `CUDA_VISIBLE_DEVICES`) to the environment it was submitted
with, counts the attempt from `SLURM_RESTART_COUNT`, and runs the supervisor, so
the log, the exit status, outputs and metrics are those of a local job. Each
attempt writes its own run files (`RunFiles.of_attempt`): the daemon may read them
long after, and the next attempt may run elsewhere.

Slurm's stop signal (`--signal=B:SIG@grace`: a preemption, a time limit near, or
`git tq kill`'s `scancel --signal`) reaches this process; it is handed on once to
the job as a local stop would be (main process, a shell's children or the whole
group), and written to the attempt's `.stop` file. When the job has ended after a
preemption, the batch job asks Slurm to requeue it at once (`scontrol requeue`),
rather than holding the allocation to the end of the grace time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional

from git_tq import jobtree, slurm, supervisor
from git_tq.errors import TqError
from git_tq.home import ensure_private_dir, write_private_file
from git_tq.lifecycle import now_iso
from git_tq.localjobs import LocalSpec
from git_tq.model import launch_stop_signal, stop_signal_number
from git_tq.procs import ProcessId, plan_stop

# What Slurm tells a job about its allocation, kept over the submitter's environment.
SLURM_VARIABLES = ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES")


def attempt_number(environ: Mapping[str, str]) -> int:
    """The attempt this batch run is of its batch job: Slurm's restart count plus one
    (a job retried after failing is a new batch job: its earlier attempts are added)."""
    try:
        return max(0, int(environ.get("SLURM_RESTART_COUNT", "0"))) + 1
    except ValueError:
        return 1


def job_environment(launch_env: Mapping[str, str], environ: Mapping[str, str],
                    attempt: int) -> dict[str, str]:
    """The job's environment: as submitted, plus Slurm's view of the allocation."""
    env = dict(launch_env)
    for name in list(env):
        if name.startswith(("SLURM_", "SLURMD_")) or name in SLURM_VARIABLES:
            del env[name]  # the submitter's own allocation, if it had one, is not ours
    env.update({k: v for k, v in environ.items()
                if k.startswith(("SLURM_", "SLURMD_")) or k in SLURM_VARIABLES})
    env["TQ_ATTEMPT"] = str(attempt)
    return env


def ensure_worktree(slurm: Mapping[str, Any]) -> str:
    """The job's worktree: the one an earlier attempt made of the same submission, or a
    new checkout of it (with nested repositories and links, as a local job's)."""
    path, common, submission = slurm["worktree"], slurm["common"], slurm["submission"]
    if os.path.isdir(path) and os.listdir(path):
        if jobtree.completed(path) == submission:
            return str(path)
        raise TqError(f"{path} exists but is not a complete checkout of the job's code; it "
                      "is left for you to look at")
    ensure_private_dir(os.path.dirname(path))
    p = subprocess.run(["git", "--git-dir", common, "worktree", "add", "--detach", "-f",
                        "--", path, submission], cwd=common, capture_output=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")})
    if p.returncode != 0:
        lines = p.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
        raise TqError(f"git worktree add failed: {lines[-1]}")
    spec = LocalSpec.from_json(slurm["spec"])
    jobtree.complete(common, path, spec, slurm.get("config") or {})
    jobtree.mark_complete(path, submission)
    return str(path)


class Forwarder:
    """Hands Slurm's stop signal on to the job once, and writes the attempt's `.stop`
    (a `git tq kill` wrote one already, saying so: its kind is kept)."""

    def __init__(self, launch: Mapping[str, Any]) -> None:
        self.stop_path: str = launch["stop"]
        self.signal = stop_signal_number(launch_stop_signal(launch.get("stop_signal")))
        self.whole_group = launch.get("stop_target") == "group"
        self.slurm_id = str(launch.get("slurm_id") or "")
        grace = launch.get("grace")
        self.grace = grace if isinstance(grace, int) else 0
        self.sent = False

    def __call__(self, signum: int, job: Optional[ProcessId], pgid: int) -> None:
        if self.sent or job is None:
            return
        self.sent = True
        stop = supervisor.read_json(self.stop_path) or {
            "kind": "slurm", "reason": "signal from Slurm", "deadline": time.time() + 3600}
        if stop.get("kind") == "slurm" and self.slurm_id and \
                time_limit_near(self.slurm_id, self.grace):
            # `--signal=B:SIG@grace` before the time limit: the job ends timed out, whatever
            # its exit status once it has saved (a preemption says so in PreemptTime).
            stop.update(kind="timeout", reason="Slurm time limit reached")
        plan = plan_stop(job, pgid, whole_group=self.whole_group)
        stop.update(signalled=True, signalled_at=time.time(), signal=self.signal,
                    target=plan.target, received=signum)
        write_private_file(self.stop_path, json.dumps(stop).encode())
        plan.send(self.signal)


def job_fields(slurm_id: str) -> dict[str, str]:
    """`scontrol show job -o` of this job, as KEY -> VALUE ({} when it cannot say)."""
    try:
        p = subprocess.run(["scontrol", "show", "job", "-o", slurm_id], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return slurm.parse_scontrol(p.stdout.strip())


def preempting(fields: Mapping[str, str]) -> bool:
    """Whether Slurm is preempting the job whose `scontrol` fields these are (its
    PreemptTime is set)."""
    return fields.get("PreemptTime", "") not in ("", "None", "Unknown")


def preempted(slurm_id: str) -> bool:
    """Whether Slurm is preempting this job."""
    return preempting(job_fields(slurm_id))


def time_limit_near(slurm_id: str, grace: int) -> bool:
    """Whether a signal from Slurm now is the one it sends `grace` seconds before the
    job's time limit (checked every 30 s or so): not a preemption, and the end is near."""
    fields = job_fields(slurm_id)
    if preempting(fields):
        return False
    # Not EndTime: an scancel sets it to the time of the cancel.
    limit = slurm_duration(fields.get("TimeLimit", ""))
    try:
        start = time.mktime(time.strptime(fields.get("StartTime", ""), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return False
    return limit is not None and start + limit - time.time() <= grace + 60


def slurm_duration(text: str) -> Optional[int]:
    """Slurm's `[D-]HH:MM:SS`, `MM:SS` or `MM` in seconds; None for UNLIMITED or other."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not (days.isdigit() or days == "") or not all(p.isdigit() for p in parts) or \
            not 1 <= len(parts) <= 3:
        return None
    if len(parts) == 1:
        parts = [parts[0], "0"]  # minutes
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds + int(days or 0) * 86400


def run(launch_path: str, environ: Mapping[str, str]) -> int:
    batch_started = time.time()
    with open(launch_path, encoding="utf-8") as fh:
        launch: dict[str, Any] = json.load(fh)
    base = launch.get("attempt_base")
    attempt = attempt_number(environ) + (base if isinstance(base, int) else 0)
    slurm = launch["slurm"]
    for name in ("lock", "ident", "exit", "stop", "ended"):
        launch[name] = f"{launch[name]}.{attempt}"
    launch["attempt"] = attempt
    launch["env"] = job_environment(launch["env"], environ, attempt)
    slurm_id = environ.get("SLURM_JOB_ID", "?")
    launch["node"] = environ.get("SLURMD_NODENAME") or os.uname().nodename
    launch["batch_started"] = batch_started
    launch["banner"] = (launch["banner"].rstrip("\n")
                        + f" (Slurm job {slurm_id}, attempt {attempt}, on {launch['node']})\n")
    try:
        ensure_worktree(slurm)
    except (TqError, OSError, ValueError, KeyError) as exc:
        write_private_file(launch["exit"], json.dumps(
            {"exit_code": 127, "signal": None, "ended_at": now_iso(),
             "start_error": f"could not make its worktree on the node: {exc}"}).encode())
        return 1
    launch["slurm_id"] = slurm_id
    forward = Forwarder(launch)
    supervisor.run(launch, forward, (signal.SIGTERM, forward.signal))
    outcome = supervisor.read_json(launch["exit"]) or {}
    stop = supervisor.read_json(launch["stop"]) or {}
    if stop.get("kind") == "slurm" and preempted(slurm_id):
        # Saved and ended within the grace: back to the queue now, not at its end.
        subprocess.run(["scontrol", "requeue", slurm_id], capture_output=True)
        return 0
    code = outcome.get("exit_code")
    return code if isinstance(code, int) and 0 <= code < 256 else 1


def main() -> None:
    sys.exit(run(sys.argv[1], os.environ))


if __name__ == "__main__":
    main()
