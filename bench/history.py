"""Does a job's cost grow with the history? The same figures with 10 and with 10,000
finished jobs in the repository, side by side, against task-spooler (`tsp`):

- submit: `git tq run -q --cpu -- true` (100-file repository, no daemon), loose refs as
  10,000 submissions leave them, and packed (after the daemon packed them);
- `git tq ls` (the active jobs) and `git tq ls --all --json`;
- dispatch: `git tq run` returned -> the job's first instruction (free slot);
- successor: a job's last instruction -> the next queued job's first (one slot);
- the idle daemon: CPU and memory over `--idle` seconds;
- drain: `--drain` jobs (`true`), each its own `git tq run`, two slots, from the first
  submission until the last has ended, against `tsp -S 2`.

    python bench/history.py [--jobs 10000] [--rounds 9] [--idle 20] [--drain 1000]

Run it with the git-tq to measure first on PATH (an older install measures "before").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import (  # noqa: E402
    ENV,
    STAMP,
    git,
    machine,
    make_repo,
    successor,
    wait_file,
    which_git_tq,
)
from listing import write_jobs  # noqa: E402


def med(values: list[float]) -> float:
    return statistics.median(values) * 1000


class Setup:
    """One repository of `count` finished jobs, with its own tq home and daemon."""

    def __init__(self, root: Path, count: int) -> None:
        self.count = count
        self.repo = make_repo(root / "repo", folders=5)  # 100 files
        write_jobs(self.repo, count)
        for key, value in (("tq.gpus", "0"), ("tq.autostart", "false"),
                           ("tq.cpuSlots", "1")):
            git(self.repo, "config", key, value)
        self.env = {**ENV, "TQ_HOME": str(root / "tqhome"), "TMPDIR": str(root),
                    "TS_SOCKET": str(root / "tsp.sock"), "TS_SAVELIST": str(root / "tsp.list")}
        self.tmp = root

    def tq(self, *args: str) -> float:
        """Run `git tq ARGS`; the time it returned."""
        subprocess.run(["git", "tq", *args], cwd=self.repo, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        return time.time()

    def timed(self, *args: str) -> float:
        t0 = time.perf_counter()
        self.tq(*args)
        return time.perf_counter() - t0

    def loose_refs(self) -> int:
        folder = self.repo / ".git" / "refs" / "tq" / "jobs"
        return len(os.listdir(folder)) if folder.is_dir() else 0

    def daemon(self) -> psutil.Process:
        info = json.loads((Path(self.env["TQ_HOME"]) / "daemon.json").read_text())
        return psutil.Process(info["pid"])

    def active(self) -> int:
        out = subprocess.run(["git", "tq", "ls", "--json"], cwd=self.repo, env=self.env,
                             capture_output=True, text=True, check=True).stdout
        return len(json.loads(out))

    def wait_idle(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.active():
            if time.monotonic() > deadline:
                raise TimeoutError("jobs still active")
            time.sleep(0.2)


def submit_and_list(setups: list[Setup], rounds: int, label: str) -> None:
    figures: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for s in setups:  # interleaved: the machine's noise hits both alike
            for name, args in (("submit", ("run", "-q", "--cpu", "--", "true")),
                               ("ls", ("ls",)), ("ls --all --json", ("ls", "--all", "--json"))):
                figures.setdefault((s.count, name), []).append(s.timed(*args))
    print(f"{label}:")
    for name in ("submit", "ls", "ls --all --json"):
        small, big = (med(figures[(s.count, name)]) for s in setups)
        print(f"  {name:18} {setups[0].count:>6} jobs {small:7.1f} ms   "
              f"{setups[1].count:>6} jobs {big:7.1f} ms   ratio {big / small:5.2f}")


def dispatch_and_successor(setups: list[Setup], rounds: int, tsp: str | None) -> None:
    dispatch: dict[int, list[float]] = {s.count: [] for s in setups}
    next_job: dict[int, list[float]] = {s.count: [] for s in setups}
    tsp_dispatch: list[float] = []
    tsp_successor: list[float] = []
    for i in range(rounds):
        for s in setups:
            mark = s.tmp / f"d{i}"
            returned = s.tq("run", "-q", "--cpu", "--", "sh", "-c", STAMP.format(mark))
            dispatch[s.count].append(max(wait_file(mark) - returned, 0.0))
            next_job[s.count].append(successor(
                lambda script, s=s: s.tq("run", "-q", "--cpu", "--", "sh", "-c", script),
                s.tmp, str(i)))
        if tsp:
            env, tmp = setups[0].env, setups[0].tmp
            mark = tmp / f"td{i}"
            subprocess.run([tsp, "sh", "-c", STAMP.format(mark)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            returned = time.time()
            tsp_dispatch.append(wait_file(mark) - returned)
            tsp_successor.append(successor(
                lambda script, env=env: subprocess.run([tsp, "sh", "-c", script], env=env,
                                                       check=True, stdout=subprocess.DEVNULL),
                tmp, f"t{i}"))
    print("daemon latencies, p50 (p90):")
    for name, data in (("dispatch (run returned -> job runs)", dispatch),
                       ("successor (job ends -> next runs)", next_job)):
        cells = []
        for s in setups:
            values = data[s.count]
            p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 2 else max(values)
            cells.append(f"{s.count:>6} jobs {med(values):6.1f} ms ({p90 * 1000:.1f})")
        print(f"  {name:38} " + "   ".join(cells))
    if tsp:
        print(f"  {'tsp dispatch (tsp returned -> job runs)':38} "
              f"{med([max(v, 0.0) for v in tsp_dispatch]):6.1f} ms")
        print(f"  {'tsp successor':38} {med(tsp_successor):6.1f} ms")


def idle(setups: list[Setup], seconds: float) -> None:
    procs = {s.count: s.daemon() for s in setups}
    before = {c: p.cpu_times() for c, p in procs.items()}
    time.sleep(seconds)
    print(f"idle daemon over {seconds:.0f} s:")
    for c, p in procs.items():
        after = p.cpu_times()
        cpu = (after.user + after.system) - (before[c].user + before[c].system)
        print(f"  {c:>6} finished jobs: {cpu * 1000:5.0f} ms CPU ({cpu / seconds * 100:.3f}% "
              f"of a core), RSS {p.memory_info().rss / 2**20:.1f} MiB")


def drain(root: Path, count: int, tsp: str | None) -> None:
    """`count` single submissions, two slots, until the last has ended."""
    repo = make_repo(root / "drain", folders=5)
    for key, value in (("tq.gpus", "0"), ("tq.autostart", "false"), ("tq.cpuSlots", "2")):
        git(repo, "config", key, value)
    env = {**ENV, "TQ_HOME": str(root / "drainhome"), "TMPDIR": str(root)}
    subprocess.run(["git", "tq", "start"], cwd=repo, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            subprocess.run(["git", "tq", "run", "-q", "--cpu", "--", "true"], cwd=repo, env=env,
                           check=True, stdout=subprocess.DEVNULL)
        submitted = time.perf_counter() - t0
        while True:
            out = subprocess.run(["git", "tq", "ls", "--json"], cwd=repo, env=env,
                                 capture_output=True, text=True, check=True).stdout
            if not json.loads(out):
                break
            time.sleep(0.05)
        total = time.perf_counter() - t0
    finally:
        subprocess.run(["git", "tq", "stop"], cwd=repo, env=env, capture_output=True)
    print(f"drain: {count} x `git tq run -q --cpu -- true`, 2 slots:")
    print(f"  git tq   submitted in {submitted:6.1f} s, all ended after {total:6.1f} s "
          f"({count / total:5.1f} jobs/s)")
    if tsp:
        tenv = {**env, "TS_SOCKET": str(root / "tsp-drain.sock"), "TS_MAXFINISHED": "2000",
                "TS_SAVELIST": str(root / "tsp-drain.list")}
        subprocess.run([tsp, "-S", "2"], env=tenv, check=True, stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        # task-spooler blocks at ~1,000 queued jobs (one client each): `-n` lets each go
        for _ in range(count):
            subprocess.run([tsp, "-n", "true"], env=tenv, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([tsp, "-w"], env=tenv, check=False, stdout=subprocess.DEVNULL)
        while b"running" in subprocess.run([tsp], env=tenv, capture_output=True).stdout or \
                b"queued" in subprocess.run([tsp], env=tenv, capture_output=True).stdout:
            time.sleep(0.05)
        total = time.perf_counter() - t0
        subprocess.run([tsp, "-K"], env=tenv, capture_output=True)
        print(f"  tsp -S 2 all ended after {total:6.1f} s ({count / total:5.1f} jobs/s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--drain", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    tsp = shutil.which("tsp") or shutil.which("ts")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        setups = [Setup(tmp / "small", 10), Setup(tmp / "big", args.jobs)]
        submit_and_list(setups, args.rounds, f"no daemon, loose refs ({setups[1].loose_refs()} "
                                             "loose job refs in the big repository)")
        for s in setups:
            s.tq("start")
        try:
            for s in setups:
                s.wait_idle()
            deadline = time.monotonic() + 120
            while setups[1].loose_refs() > 300 and time.monotonic() < deadline:
                time.sleep(0.2)  # the daemon packs them in the background
            submit_and_list(setups, args.rounds, "daemon running, refs as the daemon keeps "
                                                 f"them ({setups[1].loose_refs()} loose)")
            for s in setups:
                s.wait_idle()
            if tsp:
                subprocess.run([tsp, "-S", "1"], env=setups[0].env, check=False,
                               stdout=subprocess.DEVNULL)
            dispatch_and_successor(setups, args.rounds, tsp)
            for s in setups:
                s.wait_idle()
            time.sleep(4)  # past the writes' last safety rescan
            idle(setups, args.idle)
        finally:
            for s in setups:
                subprocess.run(["git", "tq", "stop"], cwd=s.repo, env=s.env, capture_output=True)
            if tsp:
                subprocess.run([tsp, "-K"], env=setups[0].env, capture_output=True)
        if args.drain:
            drain(tmp, args.drain, tsp)


if __name__ == "__main__":
    main()
