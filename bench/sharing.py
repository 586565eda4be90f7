"""Sharing 10,000 jobs: `git tq fetch` against `git fetch` of the same refs, then
`git tq ls --all --json` and `git tq log` of the fetched jobs against
`git for-each-ref` of them.

The other machine's jobs are written with git fast-import in the real record format
(bench/listing.py) and published on a bare remote under refs/tq/origins/bob@box/jobs/.
Each fetch is timed once into a fresh clone (a fetch is not repeatable: the second
would move nothing); the listings are medians.

    python bench/sharing.py [--jobs 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import ENV, git, machine, make_repo, side_by_side, which_git_tq  # noqa: E402
from listing import write_jobs  # noqa: E402

ORIGIN = "refs/tq/origins/bob@box/jobs/"


def clone(remote: Path, path: Path) -> Path:
    git(remote.parent, "clone", "-q", str(remote), str(path))
    git(path, "config", "tq.origin", "alice@desk")
    git(path, "config", "tq.home", str(path.parent / f"tqhome-{path.name}"))
    return path


def once(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bob = make_repo(root / "bob", folders=10)
        write_jobs(bob, args.jobs)
        remote = root / "remote.git"
        git(root, "init", "-q", "--bare", str(remote))
        git(bob, "push", "-q", str(remote), "HEAD:refs/heads/main",
            f"refs/tq/jobs/*:{ORIGIN}*")
        plain, tq = clone(remote, root / "plain"), clone(remote, root / "tq")
        t_git = once(["git", "fetch", "-q", "--no-tags", "origin",
                      "refs/tq/origins/*:refs/tq/origins/*"], plain)
        t_tq = once(["git", "tq", "fetch"], tq)
        print(f"fetch of {args.jobs} jobs (one run each, fresh clones):")
        print(f"  {'git fetch':<26}{t_git * 1000:8.1f} ms")
        print(f"  {'git tq fetch':<26}{t_tq * 1000:8.1f} ms  {t_tq / t_git:5.2f}x")
        r = side_by_side({
            "for-each-ref": ["git", "for-each-ref", "--format=%(contents)", "refs/tq/origins"],
            "git tq ls --all --json": ["git", "tq", "ls", "--all", "--json"],
            "git tq log": ["git", "tq", "log"],
        }, tq, args.rounds)
        base = r["for-each-ref"]
        print(f"{args.jobs} fetched jobs, median of {args.rounds} (warm caches):")
        for name, t in r.items():
            extra = "" if name == "for-each-ref" else f"  {t / base:5.2f}x  (aim <= 3x)"
            print(f"  {name:<26}{t * 1000:8.1f} ms{extra}")


if __name__ == "__main__":
    main()
