"""Daemon latencies against task-spooler (`tsp`), side by side, and the idle daemon's cost.

- dispatch: `git tq run` / `tsp` starts -> the job's first instruction (a free slot);
- successor: a job's last instruction -> the next queued job's first (one slot);
- preemption: urgent `git tq run` starts -> SIGTERM in the victim; victim exit ->
  urgent job running (tsp has no preemption);
- idle: the daemon's CPU time and memory while nothing happens.

    python bench/daemon.py [--rounds 15]
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

import psutil

sys.path.insert(0, str(Path(__file__).parent))
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


def ms(values: list[float]) -> str:
    qs = statistics.quantiles(values, n=10) if len(values) > 2 else values
    return (f"p50 {statistics.median(values) * 1000:6.1f} ms   p90 {qs[-1] * 1000:6.1f} ms   "
            f"(n={len(values)})")


def tq(repo: Path, env: dict[str, str], *args: str) -> float:
    subprocess.run(["git", "tq", *args], cwd=repo, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    tsp = shutil.which("tsp") or shutil.which("ts")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo = make_repo(tmp / "repo", folders=5)
        git(repo, "config", "tq.gpus", "0")
        git(repo, "config", "tq.autostart", "true")
        git(repo, "config", "tq.cpuSlots", "1")
        env = {**ENV, "TQ_HOME": str(tmp / "tqhome"), "TS_SOCKET": str(tmp / "tsp.sock"),
               "TS_SAVELIST": str(tmp / "tsp.list"), "TMPDIR": str(tmp)}
        tq(repo, env, "start")
        try:
            run_all(repo, env, tmp, rounds, tsp)
        finally:
            subprocess.run(["git", "tq", "stop"], cwd=repo, env=env, capture_output=True)
            if tsp:
                subprocess.run([tsp, "-K"], env=env, capture_output=True)


def run_all(repo: Path, env: dict[str, str], tmp: Path, rounds: int, tsp: str | None) -> None:
    # dispatch on a free slot
    tq_from_start, tq_from_return, tsp_from_start = [], [], []
    for i in range(rounds):
        mark = tmp / f"d{i}"
        t0 = time.time()
        t1 = tq(repo, env, "run", "-q", "--cpu", "--", "sh", "-c", STAMP.format(mark))
        t2 = wait_file(mark)
        tq_from_start.append(t2 - t0)
        tq_from_return.append(max(t2 - t1, 0.0))
        if tsp:
            mark = tmp / f"s{i}"
            t0 = time.time()
            subprocess.run([tsp, "sh", "-c", STAMP.format(mark)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            tsp_from_start.append(wait_file(mark) - t0)
    print("dispatch, free slot (submit -> job's first instruction):")
    print(f"  git tq run, from its start       {ms(tq_from_start)}")
    print(f"  git tq run, from its return      {ms(tq_from_return)}  (0 if the job was first)")
    if tsp:
        print(f"  tsp, from its start              {ms(tsp_from_start)}")

    # successor: one slot, job A ends -> job B starts
    tq_next, tsp_next = [], []
    for i in range(rounds):
        tq_next.append(successor(
            lambda script: tq(repo, env, "run", "-q", "--cpu", "--", "sh", "-c", script),
            tmp, str(i)))
        if tsp:
            tsp_next.append(successor(
                lambda script: subprocess.run([tsp, "sh", "-c", script], env=env, check=True,
                                              stdout=subprocess.DEVNULL),
                tmp, f"t{i}"))
    print("successor, one slot (job ends -> next queued job's first instruction):")
    print(f"  git tq                           {ms(tq_next)}")
    if tsp:
        print(f"  tsp                              {ms(tsp_next)}")

    # preemption on GPU 0
    victim_py = tmp / "victim.py"
    victim_py.write_text(
        "import signal, sys, time\n"
        "def term(*_):\n"
        "    open(sys.argv[1], 'w').write(repr(time.time()))\n"
        "    time.sleep(float(sys.argv[4]))  # saving a checkpoint\n"
        "    open(sys.argv[2], 'w').write(repr(time.time()))\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "open(sys.argv[3], 'w').write('up')\n"
        "while True: time.sleep(0.01)\n")
    for save in (0.0, 0.2):
        preemption(repo, env, tmp, rounds, victim_py, save)
    idle(env)


def preemption(repo: Path, env: dict[str, str], tmp: Path, rounds: int, victim_py: Path,
               save: float) -> None:
    reaction, reaction_ret, handover = [], [], []
    for i in range(rounds):
        term, exit_, up, urgent = (tmp / f"{n}{i}-{save}" for n in
                                   ("term", "exit", "up", "urgent"))
        tq(repo, env, "run", "-q", "-p", "100", "-g", "30", "--gpu", "0", "--",
           sys.executable, str(victim_py), str(term), str(exit_), str(up), str(save))
        wait_file_exists(up)
        t0 = time.time()
        t1 = tq(repo, env, "run", "-q", "-p", "1", "--gpu", "0", "--", "sh", "-c",
                STAMP.format(urgent))
        t_term, t_exit, t_urgent = wait_file(term), wait_file(exit_), wait_file(urgent)
        reaction.append(t_term - t0)
        reaction_ret.append(max(t_term - t1, 0.0))
        handover.append(t_urgent - t_exit)
        # let the victim resume and finish its round: kill it for the next one
        subprocess.run(["git", "tq", "purge", "-y"], cwd=repo, env=env, capture_output=True)
        wait_idle(repo, env)
    print(f"preemption (GPU 0; the victim saves for {save * 1000:.0f} ms after SIGTERM; "
          "tsp has no equivalent):")
    print(f"  urgent git tq run start -> SIGTERM in victim   {ms(reaction)}")
    print(f"  urgent git tq run return -> SIGTERM in victim  {ms(reaction_ret)}")
    print(f"  victim exit -> urgent job running              {ms(handover)}")



def idle(env: dict[str, str]) -> None:
    import json

    info = Path(env["TQ_HOME"]) / "daemon.json"
    pid = json.loads(info.read_text())["pid"]
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(20)
    after = proc.cpu_times()
    cpu = (after.user + after.system) - (before.user + before.system)
    print(f"idle daemon over 20 s: {cpu * 1000:.0f} ms CPU ({cpu / 20 * 100:.2f}% of a core), "
          f"RSS {proc.memory_info().rss / 2**20:.1f} MiB")


def wait_file_exists(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.002)


def wait_idle(repo: Path, env: dict[str, str], timeout: float = 30.0) -> None:
    """Until no job runs (the resumed victim is killed at once)."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["git", "tq", "ls", "--json"], cwd=repo, env=env,
                             capture_output=True, text=True).stdout
        jobs = json.loads(out or "[]")
        running = [j["id"] for j in jobs if j["state"] == "running"]
        if not jobs:
            return
        if running:
            subprocess.run(["git", "tq", "kill", "--now", *map(str, running)], cwd=repo,
                           env=env, capture_output=True)
        time.sleep(0.05)
    raise TimeoutError("jobs did not drain")


if __name__ == "__main__":
    os.environ.pop("GIT_DIR", None)
    main()
