"""Submit latency of `git tq run -q -- true` against `git stash create`, side by side.

Also shows how the snapshot's cost moves with the number of changed files
and with the size of the repository.

    python bench/submit.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    ENV,
    dirty,
    git,
    machine,
    make_repo,
    side_by_side,
    which_git_tq,
)

TQ = ["git", "tq", "run", "-q", "--cpu", "--", "true"]
STASH = ["git", "stash", "create"]


def quiet(repo: Path, tmp: Path) -> None:
    """Measure the submission alone: no daemon starts and runs the jobs meanwhile (each
    would check out 20,000 files on the same 2 cores); a tq home of the benchmark's own."""
    git(repo, "config", "tq.autostart", "false")
    git(repo, "config", "tq.home", str(tmp / "tqhome"))


def _seconds(line: str) -> float:
    clock = line.split()[0]  # GIT_TRACE's HH:MM:SS.micro
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def traced(repo: Path, rounds: int) -> tuple[float, int, list[str]]:
    """Median delay from `git` handing over to git-tq (its `exec` trace line: the
    interpreter starts) to the first git process git-tq starts, and the git processes
    one run starts (GIT_TRACE of each; the median run)."""
    delays, counts, commands = [], [], []
    for _ in range(rounds):
        with tempfile.NamedTemporaryFile(mode="r", suffix=".trace") as fh:
            subprocess.run(TQ, cwd=repo, env={**ENV, "GIT_TRACE": fh.name}, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lines = fh.read().splitlines()
        start = next(_seconds(ln) for ln in lines if "trace: exec: git-tq" in ln)
        gits = [ln for ln in lines if "trace: built-in: git " in ln]
        delays.append(_seconds(gits[0]) - start)
        counts.append(len(gits))
        commands = [ln.partition("built-in: git ")[2][:60] for ln in gits]
    return statistics.median(delays), statistics.median_low(counts), commands


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_repo(Path(tmp) / "tiny", folders=5)  # 100 files
        quiet(tiny, Path(tmp))
        dirty(tiny, modified=5, untracked=5)
        small_r = side_by_side({"tq": TQ, "stash": STASH}, tiny, rounds)
        print(f"100 files, 5 modified + 5 untracked, median of {rounds}:")
        print(f"  git tq run -q -- true   {small_r['tq'] * 1000:7.1f} ms  (aim: < 60 ms)")
        print(f"  git stash create        {small_r['stash'] * 1000:7.1f} ms")
        delay, count, commands = traced(tiny, rounds)
        print(f"  interpreter start -> first git process {delay * 1000:5.1f} ms (aim: <= 15 ms)")
        print(f"  git processes per run   {count:7d}")
        for command in commands:
            print(f"    git {command}")

        big = make_repo(Path(tmp) / "big")  # 20,000 files in 1,000 folders
        quiet(big, Path(tmp))
        dirty(big, modified=10, untracked=5)
        r = side_by_side({"git tq run": TQ, "git stash create": STASH}, big, rounds)
        ratio = r["git tq run"] / r["git stash create"]
        print(f"20,000 files, 10 modified + 5 untracked, median of {rounds}:")
        print(f"  git tq run -q -- true   {r['git tq run'] * 1000:7.1f} ms")
        print(f"  git stash create        {r['git stash create'] * 1000:7.1f} ms")
        print(f"  ratio                   {ratio:7.2f}x  (aim: <= 1.5x)")
        delay, count, _ = traced(big, max(5, rounds // 3))
        print(f"  interpreter start -> first git process {delay * 1000:5.1f} ms; "
              f"{count} git processes per run")

        print("snapshot cost against changes (same 20,000-file repository):")
        git(big, "stash", "-u", "-q")
        for modified in (0, 10, 100, 1000):
            git(big, "checkout", "-q", "--", ".")
            dirty(big, modified=modified, untracked=0)
            t = side_by_side({"tq": TQ}, big, max(5, rounds // 3))["tq"]
            print(f"  {modified:5d} modified files  {t * 1000:7.1f} ms")
        git(big, "checkout", "-q", "--", ".")

        small = make_repo(Path(tmp) / "small", folders=100)  # 2,000 files
        quiet(small, Path(tmp))
        dirty(small, modified=10, untracked=5)
        ts = side_by_side({"tq": TQ, "stash": STASH}, small, max(5, rounds // 3))
        print("repository size, 10 modified + 5 untracked:")
        print(f"   2,000 files: git tq run {ts['tq'] * 1000:6.1f} ms, "
              f"git stash create {ts['stash'] * 1000:6.1f} ms")
        print(f"  20,000 files: git tq run {r['git tq run'] * 1000:6.1f} ms, "
              f"git stash create {r['git stash create'] * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
