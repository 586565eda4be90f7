"""`git tq plot` of 8 jobs x 10,000 points: the terminal plot, --json and --csv.

8 real jobs each append 10,000 JSON lines (step, loss, acc) to $TQ_METRICS and end; the
series are then read from git (refs/notes/tq-series) by the real `git tq plot`, piped
(plain text: what a terminal gets less the colours).

    python bench/plot.py [--jobs 8] [--points 10000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ENV, git, machine, side_by_side, which_git_tq  # noqa: E402

JOB = """\
import json, os
with open(os.environ["TQ_METRICS"], "a") as fh:
    for step in range({points}):
        fh.write(json.dumps({{"step": step, "loss": 1 / (step + 1), "acc": step / {points}}})
                 + "\\n")
"""


def cpu_seconds(cmd: list[str], cwd: Path, rounds: int) -> float:
    """Median CPU seconds (user + system) of a command: on a machine others load, its
    own cost, where the wall time also counts the wait for a core."""
    samples = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, cwd=cwd, env=ENV, check=True, stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        samples.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**ENV, "TQ_HOME": os.path.join(tmp, "home"), "NO_COLOR": "1"}
        os.environ.update(env)
        repo = Path(tmp, "repo")
        repo.mkdir()
        git(repo, "init", "-q")
        git(repo, "config", "tq.gpus", "0")
        git(repo, "config", "tq.autostart", "true")
        (repo / "log.py").write_text(JOB.format(points=args.points))
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "job")
        tq = ["git", "tq"]
        try:
            for _ in range(args.jobs):
                subprocess.run([*tq, "run", "-q", "--cpu", sys.executable, "log.py"], cwd=repo,
                               env=env, check=True, capture_output=True)
            subprocess.run([*tq, "wait", f"1-{args.jobs}"], cwd=repo, env=env, check=True)
            jobs = f"1-{args.jobs}"
            times = side_by_side({
                "plot (2 panels, piped)": [*tq, "plot", jobs],
                "plot -m loss": [*tq, "plot", jobs, "-m", "loss"],
                "plot --json": [*tq, "plot", jobs, "--json"],
                "plot --csv": [*tq, "plot", jobs, "--csv"],
            }, repo, args.rounds)
            cpu = {name: cpu_seconds(cmd, repo, args.rounds) for name, cmd in (
                ("plot (2 panels, piped)", [*tq, "plot", jobs]),
                ("plot --json", [*tq, "plot", jobs, "--json"]))}
            note = git(repo, "notes", "--ref=tq-series", "list").split()[0]
            size = int(git(repo, "cat-file", "-s", note))
        finally:
            subprocess.run([*tq, "stop"], cwd=repo, env=env, capture_output=True)
    print(f"{args.jobs} jobs x {args.points} points x 2 metrics; {machine()}; {which_git_tq()}")
    print(f"one attempt's series blob: {size / 1024:.0f} KiB")
    print(f"  {'':28s} {'wall':>7s}    {'CPU (user+sys)':>14s}")
    for name, seconds in times.items():
        used = f"{cpu[name] * 1000:7.0f} ms" if name in cpu else ""
        print(f"  {name:28s} {seconds * 1000:7.0f} ms {used}")


if __name__ == "__main__":
    main()
