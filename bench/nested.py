"""Submit latency with submodules: `git tq run -q --cpu -- true` in a repository with
3 submodules (200 files each), clean and with a few modified files in each, against
the same files in one repository without submodules.

Each dirty submodule costs a snapshot of its own (index copy, git add -A,
write-tree, commit-tree, update-ref); a clean one costs the snapshot without the
commit.

    python bench/nested.py [--rounds 15]
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
import common  # noqa: E402
from common import git, machine, make_repo, settle, which_git_tq  # noqa: E402

TQ = ["git", "tq", "run", "-q", "--cpu", "--", "true"]
STASH = ["git", "stash", "create"]
SUBMODULES = 3
MODIFIED = 3  # files modified in each submodule (or its folder) for the dirty case


def with_submodules(root: Path) -> tuple[Path, list[Path]]:
    """An outer repository of 200 files with 3 submodules of 200 files each."""
    outer = make_repo(root / "outer", folders=10, per_folder=20)
    git(outer, "config", "tq.autostart", "false")
    for i in range(SUBMODULES):
        lib = make_repo(root / f"lib{i}", folders=10, per_folder=20)
        git(outer, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib),
            f"lib{i}")
    git(outer, "commit", "-qm", "submodules")
    inner = [outer / f"lib{i}" for i in range(SUBMODULES)]
    for repo in (outer, *inner):
        settle(repo)
    return outer, inner


def without_submodules(root: Path, libs: list[Path]) -> Path:
    """The same files, the submodules' folders as plain folders of one repository."""
    flat = make_repo(root / "flat", folders=10, per_folder=20)
    git(flat, "config", "tq.autostart", "false")
    for lib in libs:
        shutil.copytree(lib, flat / lib.name, ignore=shutil.ignore_patterns(".git"))
    git(flat, "add", "-A")
    git(flat, "commit", "-qm", "same files, no submodules")
    settle(flat)
    return flat


def modify(folders: list[Path]) -> None:
    for folder in folders:
        for f in range(MODIFIED):
            with open(folder / "pkg0000" / f"mod{f:02d}.py", "a") as fh:
                fh.write("# edited\n")


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=common.ENV, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # (the "daemon is not running" hint)
    return time.perf_counter() - t0


def side_by_side(cmds: dict[str, tuple[list[str], Path]], rounds: int) -> dict[str, float]:
    """Median seconds per (command, repository), interleaved round by round."""
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    for cmd, cwd in cmds.values():  # warm the caches once
        timed(cmd, cwd)
    for _ in range(rounds):
        for name, (cmd, cwd) in cmds.items():
            samples[name].append(timed(cmd, cwd))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # A private tq home: the benchmark's jobs never reach the user's queue.
        common.ENV["TQ_HOME"] = str(root / "tqhome")
        os.environ["TQ_HOME"] = common.ENV["TQ_HOME"]
        outer, inner = with_submodules(root)
        flat = without_submodules(root, inner)
        results = {}
        for state in ("clean", "dirty"):
            if state == "dirty":
                modify(inner)
                modify([flat / p.name for p in inner])
                for repo in (outer, *inner, flat):
                    settle(repo)
            r = side_by_side({"tq sub": (TQ, outer), "tq flat": (TQ, flat),
                              "stash sub": (STASH, outer), "stash flat": (STASH, flat)},
                             rounds)
            results[state] = ({"tq": r["tq sub"], "stash": r["stash sub"]},
                              {"tq": r["tq flat"], "stash": r["stash flat"]})
        snapshots = subprocess.run(["git", "for-each-ref", "refs/tq/snapshots"], cwd=inner[0],
                                   capture_output=True, text=True).stdout.count("\n")
        print(f"800 files: 200 in the outer repository + {SUBMODULES} x 200, "
              f"median of {rounds}:")
        print(f"{'':38s}{'3 submodules':>14s}{'no submodules':>15s}{'ratio':>8s}")
        for state, (sub, plain) in results.items():
            what = "clean" if state == "clean" else f"{MODIFIED} modified in each"
            for name, key in (("git tq run", "tq"), ("git stash create", "stash")):
                print(f"  {name + ', ' + what:36s}{sub[key] * 1000:11.1f} ms"
                      f"{plain[key] * 1000:12.1f} ms{sub[key] / plain[key]:7.2f}x")
        print(f"  (snapshot commits kept in lib0 after the dirty rounds: {snapshots})")


if __name__ == "__main__":
    main()
