"""Slurm, through its command-line tools: submit a batch job, read job states, cancel or signal.

This module owns every call git tq makes to Slurm (sbatch, squeue, scontrol, sacct, scancel,
sinfo) and the parsing of their text; nothing else in git tq runs them. It knows nothing of
git tq's jobs: it speaks in Slurm job ids (strings such as "42" or "42_3").

The tools, not pyslurm or slurmrestd: every cluster has them, root may run them, and their
text is stable across the releases in use (22.05 to 24.x), where the two APIs are not. They
find their cluster as they always do (SLURM_CONF, else /etc/slurm/slurm.conf).

Where job states come from, in order (`states`):
- `squeue -t all -j IDS -O ...`: one call for all jobs; it lists pending, running and
  (for MinJobAge seconds, 300 by default) finished ones. `squeue --json` is not used: in
  22.05 it ignores -j.
- `sacct`, where accounting answers (checked once a process): jobs the controller forgot
  (after MinJobAge); it does not count restarts.
- `scontrol show job -o ID`, one call a job, for what is still missing.
A job that none of them knows is left out of the answer.

Every failure is a SlurmError: one line, with the first line of Slurm's own complaint.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq.errors import SlurmError

# Job states, as squeue, scontrol and sacct spell them (sacct adds "CANCELLED by UID").
PENDING_STATES = frozenset({
    "PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "RESV_DEL_HOLD",
})
RUNNING_STATES = frozenset({
    "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
    "RESIZING",
})
# A job in one of these has ended (PREEMPTED: ended by preemption and not requeued).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "OUT_OF_MEMORY", "DEADLINE", "REVOKED",
})

TIMEOUT_S = 30.0  # a tool that takes longer has lost its controller
_CHUNK = 200  # job ids per squeue/sacct call
# squeue -O: "field:|" prints the field whole (no padding, no truncation) followed by "|".
_SQUEUE_FIELDS = ("JobID", "State", "Reason", "RestartCnt", "exit_code", "NodeList", "Partition")
_SACCT_FIELDS = ("JobID", "State", "Reason", "ExitCode", "NodeList", "Partition")
_GONE = ("Invalid job id specified", "already completing or completed")


@dataclass(frozen=True)
class SlurmJobState:
    """What Slurm says of one job.

    state: the base state (PENDING, RUNNING, COMPLETED, CANCELLED, ...), as Slurm names it;
    reason: why it pends or ended (Resources, Priority, BeginTime, NonZeroExitCode, ...),
    "" for none; restart_count: how often it was requeued (SLURM_RESTART_COUNT of its
    current run); exit_code: the batch script's exit status once it has ended, None while it
    is active or when a signal ended it; signal: the signal that ended it, else None;
    node: where it runs or ran (None before it ever started); partition: where it is queued.
    """

    id: str
    state: str
    reason: str
    restart_count: int
    exit_code: Optional[int]
    signal: Optional[int]
    node: Optional[str]
    partition: str

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES

    @property
    def running(self) -> bool:
        """It holds its node: running, suspended, or ending (COMPLETING)."""
        return self.state in RUNNING_STATES

    @property
    def ended(self) -> bool:
        return self.state in FINAL_STATES


# ---------------------------------------------------------------- running the tools


def available() -> bool:
    """Whether Slurm's client tools are on PATH (it says nothing of a controller)."""
    return shutil.which("sbatch") is not None


def _run(args: Sequence[str], input: Optional[str] = None,
         env: Optional[Mapping[str, str]] = None,
         cwd: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    conf = (os.environ if env is None else env).get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # the tools would retry reading it for 60 s
        raise SlurmError(f"SLURM_CONF names no file ({conf}): Slurm has no config to read")
    try:
        return subprocess.run(list(args), input=input, capture_output=True, text=True,
                              env=None if env is None else dict(env), cwd=cwd,
                              timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: Slurm's client tools are not installed "
                         f"here (or not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{args[0]}` did not answer within {TIMEOUT_S:.0f}s: "
                         f"is slurmctld up?") from None
    except OSError as e:
        raise SlurmError(f"cannot run {args[0]}: {e.strerror or e}") from None


def _complaint(p: subprocess.CompletedProcess[str]) -> str:
    """The first line of Slurm's complaint (its first error line, else its first line)."""
    lines = [ln.strip() for ln in (p.stderr or p.stdout or "").splitlines() if ln.strip()]
    # A fatal line says most ("Could not establish a configuration source": no slurm.conf),
    # else the first error line (sbatch: "invalid partition specified: x").
    line = next((ln for ln in lines if "fatal:" in ln),
                next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else ""))
    line = re.sub(r"^\w+: (?:error|fatal): ", "", line)
    return line or f"exit status {p.returncode}"


def _check(args: Sequence[str], p: subprocess.CompletedProcess[str]) -> str:
    if p.returncode != 0:
        raise SlurmError(f"{args[0]} failed: {_complaint(p)}")
    return p.stdout


@functools.lru_cache(maxsize=1)
def version() -> tuple[int, int]:
    """(major, minor) of the installed Slurm, from `sinfo -V` ("slurm 22.05.8" -> (22, 5))."""
    args = ["sinfo", "-V"]
    out = _check(args, _run(args))
    m = re.search(r"(\d+)\.(\d+)", out)
    if not m:
        raise SlurmError(f"cannot read Slurm's version from `sinfo -V`: {out.strip()!r}")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------- submit and cancel


def gpu_request_args(count: int) -> list[str]:
    """sbatch options that ask for `count` GPUs on the job's node (none for 0). GRES works
    on every version and cluster that has GPUs; --gpus needs cons_tres."""
    if count < 0:
        raise ValueError(f"a GPU count cannot be negative ({count})")
    return [f"--gres=gpu:{count}"] if count else []


def submit(script: str, args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
           cwd: Optional[str] = None) -> str:
    """`sbatch --parsable ARGS` of `script` (given on stdin); the new job's id.

    env: variables set on top of this process's environment; sbatch passes that environment
    on to the job (its default --export=ALL). cwd: sbatch's folder, the job's folder unless
    ARGS say --chdir.
    """
    full_env = None if env is None else {**os.environ, **env}
    cmd = ["sbatch", "--parsable", *args]
    out = _check(cmd, _run(cmd, input=script, env=full_env, cwd=cwd))
    # "42" or, on a multi-cluster set-up, "42;cluster"; warnings go to stderr.
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    job_id = lines[-1].split(";", 1)[0].strip() if lines else ""
    if not re.fullmatch(r"\d+(?:_\d+)?", job_id):
        raise SlurmError(f"sbatch answered no job id: {out.strip()!r}")
    return job_id


def cancel(job_id: str, signal: Optional[str] = None, full: bool = False) -> None:
    """`scancel`: without a signal, end the job (it ends CANCELLED; Slurm sends SIGTERM, then
    SIGKILL after KillWait). With `signal` (TERM, USR1, ...), only send it; `full` sends it to
    the batch script too, without which it reaches only the job's steps (srun).
    A job that has ended or that Slurm no longer knows is no error."""
    cmd = ["scancel"]
    if signal is not None:
        cmd.append(f"--signal={signal}")
    if full:
        cmd.append("--full")
    cmd.append(job_id)
    p = _run(cmd)
    if p.returncode != 0 and not any(g in p.stderr for g in _GONE):
        raise SlurmError(f"scancel failed: {_complaint(p)}")


# ---------------------------------------------------------------- states


def parse_state(text: str) -> str:
    """A job state as the tools print it -> its base state: "CANCELLED by 0" (sacct) ->
    CANCELLED; "CANCELLED+" (sacct cut it short) -> CANCELLED; "running" -> RUNNING."""
    words = text.strip().split()
    return words[0].rstrip("+").upper() if words else ""


def _reason(text: str) -> str:
    text = text.strip()
    return "" if text in ("None", "(null)", "") else text


def _node(text: str) -> Optional[str]:
    text = text.strip()
    return None if text in ("", "(null)", "None", "None assigned") else text


def _ended_with(state: str, exit_code: int, sig: int) -> tuple[Optional[int], Optional[int]]:
    """(exit_code, signal) as SlurmJobState keeps them: both None while the job is active."""
    if state not in FINAL_STATES:
        return None, None
    if sig:
        return None, sig
    return exit_code, None


def _colon_status(text: str) -> tuple[int, int]:
    """scontrol's and sacct's ExitCode "3:0" -> (3, 0): exit status, signal."""
    m = re.fullmatch(r"\s*(\d+):(\d+)\s*", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _squeue(ids: Sequence[str]) -> dict[str, SlurmJobState]:
    fmt = ",".join(f"{f}:|" for f in _SQUEUE_FIELDS)
    cmd = ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-O", fmt]
    p = _run(cmd)
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:  # one id asked, and squeue knows it no more
            return {}
        _check(cmd, p)
    found = {}
    for line in p.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < len(_SQUEUE_FIELDS):
            continue
        job_id, state_text, reason, restarts, status, node, partition = (
            parts[:len(_SQUEUE_FIELDS)])
        state = parse_state(state_text)
        raw = int(status) if status.strip().isdigit() else 0  # a wait(2) status: 768 is exit 3
        code, sig = _ended_with(state, raw >> 8 & 0xFF, raw & 0x7F)
        found[job_id.strip()] = SlurmJobState(
            id=job_id.strip(), state=state, reason=_reason(reason),
            restart_count=int(restarts) if restarts.strip().isdigit() else 0,
            exit_code=code, signal=sig, node=_node(node), partition=partition.strip())
    return found


def parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol show job -o` text (KEY=VALUE KEY=VALUE ...) -> {KEY: VALUE}."""
    keys = list(re.finditer(r"(?:^|(?<=\s))([A-Za-z][\w/:]*)=", line))
    fields: dict[str, str] = {}
    for m, nxt in zip(keys, [*keys[1:], None]):
        end = nxt.start() if nxt is not None else len(line)
        fields.setdefault(m.group(1), line[m.end():end].strip())
    return fields


def _scontrol(job_id: str) -> Optional[SlurmJobState]:
    cmd = ["scontrol", "show", "job", "-o", job_id]
    p = _run(cmd)
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:
            return None
        _check(cmd, p)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("JobId=")), None)
    if line is None:
        return None
    f = parse_scontrol(line)
    state = parse_state(f.get("JobState", ""))
    code, sig = _ended_with(state, *_colon_status(f.get("ExitCode", "")))
    restarts = f.get("Restarts", "0")
    return SlurmJobState(
        id=f.get("JobId", job_id), state=state, reason=_reason(f.get("Reason", "")),
        restart_count=int(restarts) if restarts.isdigit() else 0, exit_code=code, signal=sig,
        node=_node(f.get("NodeList", "")), partition=f.get("Partition", ""))


_accounting: dict[str, bool] = {}


def accounting() -> bool:
    """Whether sacct answers here (a cluster with slurmdbd); asked once a process."""
    if "ok" not in _accounting:
        try:
            p = _run(["sacct", "-n", "-P", "-X", "-j", "1", "--format=JobID"])
            _accounting["ok"] = p.returncode == 0
        except SlurmError:
            _accounting["ok"] = False
    return _accounting["ok"]


def _sacct(ids: Sequence[str]) -> dict[str, SlurmJobState]:
    """From accounting, for jobs the controller forgot. sacct does not count restarts (its
    -D would list earlier runs, but also other jobs of the same id after a reset of the ids):
    restart_count is 0 here."""
    cmd = ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), f"--format={','.join(_SACCT_FIELDS)}"]
    try:
        p = _run(cmd)
    except SlurmError:
        return {}
    if p.returncode != 0:
        return {}
    found = {}
    for line in p.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != len(_SACCT_FIELDS):
            continue
        job_id, state_text, reason, exit_text, node, partition = (x.strip() for x in parts)
        state = parse_state(state_text)
        code, sig = _ended_with(state, *_colon_status(exit_text))
        found[job_id] = SlurmJobState(
            id=job_id, state=state, reason=_reason(reason), restart_count=0, exit_code=code,
            signal=sig, node=_node(node), partition=partition)
    return found


def states(ids: Iterable[str]) -> dict[str, SlurmJobState]:
    """What Slurm says of each of these jobs, by id; a job no tool knows is left out."""
    wanted = list(dict.fromkeys(str(i) for i in ids))
    found: dict[str, SlurmJobState] = {}
    for i in range(0, len(wanted), _CHUNK):
        found.update(_squeue(wanted[i:i + _CHUNK]))
    missing = [j for j in wanted if j not in found]
    if missing and accounting():
        for i in range(0, len(missing), _CHUNK):
            found.update(_sacct(missing[i:i + _CHUNK]))
        missing = [j for j in wanted if j not in found]
    for job_id in missing:
        st = _scontrol(job_id)
        if st is not None:
            found[job_id] = st
    return {j: found[j] for j in wanted if j in found}


def find_by_name(name: str) -> Optional[str]:
    """The id of the newest job of this user named `name` that Slurm still knows, or None
    (a submission whose answer was never written down is found again by its name)."""
    cmd = ["squeue", "-h", "-t", "all", "--me", "-n", name, "-o", "%i"]
    p = _run(cmd)
    if p.returncode != 0:
        _check(cmd, p)
    found = [line.strip() for line in p.stdout.splitlines() if line.strip()]
    return max(found, key=lambda i: int(i) if i.isdigit() else -1) if found else None
