"""Choosing where a job runs (git_tq/backends.py) and what a Slurm job is submitted with;
refused at submission with one line, whether or not Slurm is installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import GIT_TQ, git, tq

from git_tq import backends, recordfmt
from git_tq.errors import BadSpec, UsageError
from git_tq.localjobs import LocalSpec
from git_tq.model import GpuRequest

# --- pure ---------------------------------------------------------------------------


def test_the_backend_comes_from_the_option_then_the_setting() -> None:
    assert backends.choose({}, None) == "local"
    assert backends.choose({"tq.backend": "Slurm"}, None) == "slurm"
    assert backends.choose({"tq.backend": "slurm"}, "local") == "local"
    with pytest.raises(UsageError, match="--backend 'k8s': use local or slurm"):
        backends.choose({}, "k8s")
    with pytest.raises(BadSpec, match="git config tq.backend is 'pbs'"):
        backends.choose({"tq.backend": "pbs"}, None)


def test_slurm_options_in_order_settings_request_then_given() -> None:
    config = {"tq.slurm.partition": "gpu", "tq.slurm.account": "lab", "tq.slurm.qos": "high",
              "tq.slurm.time": "4:00:00",
              "tq.slurm.args": "--constraint=a100\n--mem=32G --cpus-per-task=8"}
    options = backends.slurm_options(config, GpuRequest.any(2), None, 10,
                                     ("--exclusive",))
    assert options == ("--partition=gpu", "--account=lab", "--qos=high", "--constraint=a100",
                       "--mem=32G", "--cpus-per-task=8", "--gres=gpu:2", "--time=4:00:00",
                       "--nice=10", "--exclusive")
    # --time (seconds, over all attempts) becomes whole minutes, rounded up
    timed = backends.slurm_options({"tq.slurm.time": "1:00"}, GpuRequest.any(0), 90, -5)
    assert timed == ("--time=2", "--nice=0")


@pytest.mark.parametrize("arg", ["-o/tmp/x", "--output=x", "--open-mode=truncate",
                                 "--signal=KILL@1", "--no-requeue", "-Jname", "--wrap=ls",
                                 "--array=1-3", "constraint", "--x\n--y"])
def test_options_git_tq_owns_are_refused(arg: str) -> None:
    with pytest.raises(UsageError):
        backends.slurm_options({}, GpuRequest.any(1), None, 0, (arg,))
    with pytest.raises(BadSpec):
        backends.slurm_options({"tq.slurm.args": arg.replace("\n", " ")}
                               if "\n" not in arg else {"tq.slurm.args": "'unclosed"},
                               GpuRequest.any(1), None, 0)


def test_gpu_ids_are_refused_for_slurm() -> None:
    with pytest.raises(BadSpec, match="Slurm picks the GPUs"):
        backends.slurm_options({}, GpuRequest.exact((0, 1)), None, 0)


def test_the_backend_is_in_the_record_and_the_options_in_the_private_one() -> None:
    spec = LocalSpec("a" * 40, ("true",), False, "", None, "/src", {}, backend="slurm",
                     slurm_args=("--gres=gpu:1", "--nice=3"))
    assert LocalSpec.from_json(spec.to_json()) == spec
    old = spec.to_json()
    del old["backend"], old["slurm_args"]  # written by an older git tq: a local job
    assert LocalSpec.from_json(old).backend == "local"
    assert recordfmt  # the public field: tested end to end below


# --- the command line ---------------------------------------------------------------


def test_bad_slurm_submissions_are_one_line_errors(repo: Path) -> None:
    cases = [
        (["--backend", "slurmx", "true"], 2, "--backend 'slurmx': use local or slurm"),
        (["--slurm-arg=--exclusive", "true"], 2, "--slurm-arg is for jobs run by Slurm"),
        (["--backend", "slurm", "--gpu", "0", "true"], 1, "Slurm picks the GPUs"),
        (["--backend", "slurm", "--slurm-arg=-ofoo", "--cpu", "true"], 2,
         "git tq sets -o itself"),
    ]
    for args, code, message in cases:
        p = tq(repo, "run", *args, check=False)
        assert (p.returncode, p.stderr.count("\n")) == (code, 1), (args, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr
    git(repo, "config", "tq.backend", "pbs")
    p = tq(repo, "run", "--cpu", "true", check=False)
    assert p.returncode == 1 and "git config tq.backend is 'pbs'" in p.stderr
    assert tq(repo, "ls", "--all").stdout.count("\n") <= 1  # nothing was queued


def test_without_sbatch_a_slurm_job_is_refused(repo: Path) -> None:
    bare = Path(os.environ["HOME"]) / "bin"
    bare.mkdir()
    for tool in ("git", "sh"):
        found = next(Path(d) / tool for d in os.environ["PATH"].split(os.pathsep)
                     if (Path(d) / tool).exists())
        (bare / tool).symlink_to(found)
    assert GIT_TQ
    (bare / "git-tq").symlink_to(GIT_TQ)
    env = {"PATH": f"{bare}"}
    p = tq(repo, "run", "--backend", "slurm", "--cpu", "true", check=False, env=env)
    assert p.returncode == 1 and "needs sbatch, which is not on PATH" in p.stderr


def test_what_a_slurm_job_asks_of_slurm_is_not_edited(repo: Path) -> None:
    job = tq(repo, "run", "-q", "--backend", "slurm", "--cpu", "true", check=False)
    if job.returncode != 0:
        pytest.skip("no sbatch here: " + job.stderr.strip())
    p = tq(repo, "edit", job.stdout.strip(), "-p", "3", check=False)
    assert p.returncode == 1 and "runs on Slurm: only its tag and dependencies" in p.stderr
    assert tq(repo, "edit", job.stdout.strip(), "-t", "kept").returncode == 0


def test_the_backend_completes(repo: Path) -> None:
    env = {**os.environ, "COMP_WORDS": "git-tq run --backend s", "COMP_CWORD": "3",
           "_GIT_TQ_COMPLETE": "bash_complete"}
    assert GIT_TQ
    out = subprocess.run([GIT_TQ], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert out.split() == ["plain,slurm"]
