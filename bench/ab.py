"""Two installs of git tq side by side, round by round (this machine's noise moves
absolute latencies by 2x within minutes, so before/after must be interleaved):

- dispatch: `git tq run` returned -> the job's first instruction (free slot);
- successor: a job's last instruction -> the next queued job's first (one slot);
- drain: `--drain` queued jobs (`true`, a sweep) run through two slots: wall time, and
  the CPU time of the daemon and everything it forked, a job.

    python bench/ab.py --before /tmp/old/.venv/bin --after .venv/bin [--rounds 11]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ENV, STAMP, git, machine, make_repo, successor, wait_file  # noqa: E402


class Install:
    def __init__(self, name: str, bin_dir: str, root: Path) -> None:
        self.name = name
        self.repo = make_repo(root / name / "repo", folders=5)
        for key, value in (("tq.gpus", "0"), ("tq.autostart", "false"), ("tq.cpuSlots", "1")):
            git(self.repo, "config", key, value)
        self.env = {**ENV, "TQ_HOME": str(root / name / "tqhome"), "TMPDIR": str(root),
                    "PATH": os.path.abspath(bin_dir) + os.pathsep + ENV.get("PATH", "")}
        self.tmp = root / name

    def tq(self, *args: str, repo: Path | None = None) -> float:
        subprocess.run(["git", "tq", *args], cwd=repo or self.repo, env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.time()

    def active(self, repo: Path) -> int:
        out = subprocess.run(["git", "tq", "ls", "--json"], cwd=repo, env=self.env,
                             capture_output=True, text=True, check=True).stdout
        return len(json.loads(out))


def daemon_cpu(install: Install, repo: Path) -> float:
    """CPU seconds of the daemon and of its children it has reaped (supervisors, the
    jobs, git): on a busy machine a steadier figure than wall time."""
    out = subprocess.run(["git", "tq", "daemon", "status", "--json"], cwd=repo, env=install.env,
                         capture_output=True, text=True, check=True).stdout
    with open(f"/proc/{json.loads(out)['pid']}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def drain(install: Install, count: int) -> tuple[float, float]:
    """Seconds for `count` queued jobs to run through two slots, and the CPU seconds
    the daemon and its children spent on them."""
    repo = make_repo(install.tmp / f"drain{time.monotonic_ns()}", folders=5)
    for key, value in (("tq.gpus", "0"), ("tq.autostart", "false"), ("tq.cpuSlots", "2")):
        git(repo, "config", key, value)
    values = ",".join(str(i) for i in range(count))
    install.tq("stop")
    install.tq("run", "-q", "--cpu", "--sweep", f"i={values}", "--", "true", repo=repo)
    t0 = time.perf_counter()
    install.tq("start", repo=repo)
    while install.active(repo):
        time.sleep(0.05)
    return time.perf_counter() - t0, daemon_cpu(install, repo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--drain", type=int, default=100)
    parser.add_argument("--drain-rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        installs = [Install("before", args.before, tmp), Install("after", args.after, tmp)]
        dispatch: dict[str, list[float]] = {i.name: [] for i in installs}
        next_job: dict[str, list[float]] = {i.name: [] for i in installs}
        try:
            for i in installs:
                i.tq("start")
            for r in range(args.rounds):
                for i in installs:
                    mark = i.tmp / f"d{r}"
                    returned = i.tq("run", "-q", "--cpu", "--", "sh", "-c", STAMP.format(mark))
                    dispatch[i.name].append(max(wait_file(mark) - returned, 0.0))
                    next_job[i.name].append(successor(
                        lambda script, i=i: i.tq("run", "-q", "--cpu", "--", "sh", "-c",
                                                 script),
                        i.tmp, str(r)))
            for name, data in (("dispatch (run returned -> job runs)", dispatch),
                               ("successor (job ends -> next runs)", next_job)):
                print(f"{name}, p50:  " + "   ".join(
                    f"{i.name} {statistics.median(data[i.name]) * 1000:6.1f} ms"
                    for i in installs))
            if args.drain:
                runs: dict[str, list[tuple[float, float]]] = {i.name: [] for i in installs}
                for _ in range(args.drain_rounds):
                    for i in installs:
                        runs[i.name].append(drain(i, args.drain))
                print(f"drain of {args.drain} queued jobs, 2 slots, median of "
                      f"{args.drain_rounds}:  " + "   ".join(
                          f"{n} {statistics.median(w for w, _ in r):5.1f} s "
                          f"({args.drain / statistics.median(w for w, _ in r):5.1f} jobs/s, "
                          f"{statistics.median(c for _, c in r) / args.drain * 1000:5.1f} ms "
                          "CPU a job)" for n, r in runs.items()))
        finally:
            for i in installs:
                subprocess.run(["git", "tq", "stop"], cwd=i.repo, env=i.env,
                               capture_output=True)


if __name__ == "__main__":
    main()
