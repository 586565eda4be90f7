"""Where a job runs: the backend a submission chooses, and for Slurm the sbatch options
fixed at submission.

Pure: settings and the request in, a choice or options out. `git config tq.backend`
(per repository or global) or `run --backend` pick "local" (this machine's daemon
and its GPUs) or "slurm" (a batch job on a cluster). Slurm's options come from
`tq.slurm.partition`, `.account`, `.qos`, `.time` and the repeatable `.args`, then
`run --slurm-arg`; the job's GPU count becomes `--gres=gpu:N`, its time limit
`--time`, its priority `--nice` (ordering among one's own jobs only).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Optional

from git_tq.errors import BadSpec, UsageError
from git_tq.model import BACKENDS, GpuRequest

MAX_NICE = 2_000_000_000  # Slurm's own bound is 2147483645
# Options git tq sets itself for every batch job (its log, its requeue and stop signal,
# its script): given again, they would break the record of the job.
RESERVED = ("-o", "--output", "-e", "--error", "--open-mode", "--signal", "--requeue",
            "--no-requeue", "--wrap", "--parsable", "-J", "--job-name", "--array", "-a")


def check_option(arg: str, where: str) -> str:
    """One sbatch option given by the user, refused when git tq owns it."""
    if not arg.startswith("-") or "\n" in arg:
        raise UsageError(f"{where} {arg[:40]!r}: give one sbatch option, e.g. "
                         "--slurm-arg=--constraint=a100")
    name = arg.split("=", 1)[0]
    if not name.startswith("--"):
        name = name[:2]  # -ofile is -o file
    if name.startswith("--") and len(name) > 2:
        # sbatch takes any unambiguous prefix of a long option: --open=truncate is
        # --open-mode=truncate.
        name = next((r for r in RESERVED if r.startswith(name)), name)
    if name in RESERVED:
        raise UsageError(f"{where} {arg[:40]!r}: git tq sets {name} itself for every "
                         "Slurm job")
    return arg


def choose(config: Mapping[str, str], given: Optional[str]) -> str:
    """The backend of a new job: --backend, else tq.backend, else local."""
    if given is not None:
        name = given.strip().lower()
        if name not in BACKENDS:
            raise UsageError(f"--backend {given[:20]!r}: use {' or '.join(BACKENDS)}")
        return name
    name = config.get("tq.backend", "").strip().lower() or "local"
    if name not in BACKENDS:
        raise BadSpec(f"git config tq.backend is {name[:20]!r}: use {' or '.join(BACKENDS)}")
    return name


def slurm_minutes(seconds: int) -> str:
    """Slurm's `--time` for a limit in seconds: whole minutes, rounded up."""
    return str(max(1, -(-seconds // 60)))


def slurm_options(config: Mapping[str, str], gpus: GpuRequest, time_limit: Optional[int],
                  priority: int, given: Sequence[str] = ()) -> tuple[str, ...]:
    """The sbatch options of a new Slurm job, in the order: settings, the request
    (GPUs, time, priority), then `--slurm-arg` (so a later option wins, as in sbatch).
    `--gpu IDS` is refused: Slurm, not git tq, picks the node and its GPUs."""
    if gpus.ids is not None:
        raise BadSpec("Slurm picks the GPUs of a Slurm job: ask for a count with --gpus N "
                      "(or set tq.gpu to any:N), not for GPU ids")
    options: list[str] = []
    for name in ("partition", "account", "qos"):
        value = config.get(f"tq.slurm.{name}", "").strip()
        if value:
            options.append(f"--{name}={value}")
    configured_time = config.get("tq.slurm.time", "").strip()
    for line in filter(None, (v.strip() for v in config.get("tq.slurm.args", "").split("\n"))):
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise BadSpec(f"git config tq.slurm.args {line[:40]!r}: {exc}") from None
        try:
            options.extend(check_option(w, "git config tq.slurm.args") for w in words)
        except UsageError as exc:
            raise BadSpec(str(exc)) from None
    if gpus.count:
        options.append(f"--gres=gpu:{gpus.count}")
    if time_limit is not None:
        options.append(f"--time={slurm_minutes(time_limit)}")
    elif configured_time:
        options.append(f"--time={configured_time}")
    # Smaller git tq numbers are more urgent; Slurm lets a user only lower their own jobs.
    options.append(f"--nice={min(max(priority, 0), MAX_NICE)}")
    options.extend(check_option(arg, "--slurm-arg") for arg in given)
    return tuple(options)
