"""Queueing a sweep: `git tq run --sweep` of 100 and 1,000 jobs against as many `tsp`
submissions (task-spooler) and as many single `git tq run` calls, in one run.

Only queueing is measured: no daemon runs the jobs (tq.autostart false), and tsp's
one slot is held by a job that never ends, so neither spends CPU running them.

    python bench/sweep.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ENV, git, machine, make_repo, which_git_tq  # noqa: E402


def values(n: int) -> str:
    return ",".join(str(i) for i in range(n))


def tq_sweep(repo: Path, n: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["git", "tq", "run", "-q", "--cpu", "--sweep", f"i={values(n)}", "--",
                    "echo", "{i}"], cwd=repo, env=ENV, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def tq_singles(repo: Path, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        subprocess.run(["git", "tq", "run", "-q", "--cpu", "--", "echo", str(i)], cwd=repo,
                       env=ENV, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def tsp_many(env: dict[str, str], n: int) -> float:
    """n submissions to a fresh tsp server whose one slot a never-ending job holds (each
    queued tsp job keeps a client process waiting, so every round starts empty)."""
    subprocess.run(["tsp", "-S", "1"], env=env, check=True)
    subprocess.run(["tsp", "sleep", "100000"], env=env, check=True, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    for i in range(n):
        subprocess.run(["tsp", "echo", str(i)], env=env, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    subprocess.run(["tsp", "-K"], env=env, check=False)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    tsp = shutil.which("tsp")
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo", folders=5)  # 100 files
        git(repo, "config", "tq.autostart", "false")
        git(repo, "config", "tq.home", str(Path(tmp) / "tqhome"))
        tsp_env = {**os.environ, "TS_SOCKET": str(Path(tmp) / "ts.sock"),
                   "TMPDIR": tmp, "TS_MAXFINISHED": "100000"}
        for n in (100, 1000):
            rows: dict[str, list[float]] = {"git tq run --sweep (1 call)": []}
            # tsp 1.0.1 keeps a client process and a connection per queued job, and its
            # server takes 1,000 connections: a 1,000th submission blocks for ever.
            tsp_n = min(n, 900)
            if tsp:
                rows[f"tsp x {tsp_n}"] = []
            if n <= 100:
                rows[f"git tq run x {n}"] = []
            for _ in range(rounds):
                rows["git tq run --sweep (1 call)"].append(tq_sweep(repo, n))
                if tsp:
                    rows[f"tsp x {tsp_n}"].append(tsp_many(tsp_env, tsp_n))
                if n <= 100:
                    rows[f"git tq run x {n}"].append(tq_singles(repo, n))
            print(f"queueing {n} jobs, median of {rounds}:")
            for name, times in rows.items():
                med = statistics.median(times)
                count = tsp_n if name.startswith("tsp") else n
                print(f"  {name:<30} {med * 1000:9.1f} ms  ({med / count * 1000:.2f} ms/job)")


if __name__ == "__main__":
    main()
