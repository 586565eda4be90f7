"""Listing 10,000 finished jobs: `git tq ls --all --json` and `git tq log` against
`git for-each-ref --format='%(contents)' refs/tq/jobs`, side by side.

The jobs are written with git fast-import in the real record format (what
10,000 `git tq run`s followed by their runs would leave), with loose refs as
submissions leave them, then again after `git pack-refs`.

    python bench/listing.py [--jobs 10000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import git, machine, make_repo, side_by_side, which_git_tq  # noqa: E402

from git_tq import recordfmt  # noqa: E402
from git_tq.lifecycle import apply_event  # noqa: E402
from git_tq.localjobs import LedgerEntry, LocalJobs  # noqa: E402
from git_tq.model import ChangeSummary, GpuRequest, Job, JobSpec, State  # noqa: E402


def write_jobs(repo: Path, count: int) -> None:
    head = git(repo, "rev-parse", "HEAD").strip()
    stream = []
    mark = 0
    for i in range(1, count + 1):
        spec = JobSpec(command=("python", "train.py", "--seed", str(i)), shell=False,
                       priority=100, grace=180, tag=f"seed{i % 10}", env=None,
                       gpus=GpuRequest.any(1), cwd="", submitted_at="2026-11-01T10:00:00+00:00",
                       user="bench", host="box")
        job = Job(id=i, spec=spec, state=State.PENDING, event="submitted", attempt=0,
                  snapshot="", source=head, changes=ChangeSummary(1, 0, 0))
        records = [job]
        records.append(apply_event(job, "started", "2026-11-01T10:00:01+00:00",
                                   assigned_gpus=(i % 2,)))
        records.append(apply_event(records[-1], "finished", "2026-11-01T11:00:01+00:00",
                                   exit_code=0 if i % 7 else 1))
        parent = head
        for n, rec in enumerate(records):
            mark += 1
            if n:
                rec = rec.evolve(snapshot="0" * 40)  # a placeholder; listing does not care
            msg = recordfmt.encode(rec).encode()
            origin = f"from {parent}\n" if n == 0 else f"from :{mark - 1}\n"
            stream.append(
                f"commit refs/tq/jobs/{i}\nmark :{mark}\n"
                f"committer bench <b@example.com> 1790000000 +0000\n"
                f"data {len(msg)}\n".encode() + msg + origin.encode() + b"\n"
            )
    git(repo, "fast-import", "--quiet", input=b"".join(stream))
    # fast-import writes packed refs; explode them into loose refs as submissions leave them
    refs = git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/tq/jobs")
    for line in refs.splitlines():
        oid, ref = line.split()
        path = repo / ".git" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(oid + "\n")
    packed = repo / ".git" / "packed-refs"
    if packed.exists():
        kept = [ln for ln in packed.read_text().splitlines() if "refs/tq/jobs/" not in ln]
        packed.write_text("\n".join(kept) + "\n")
    # The user's own jobs: each in the tq home's ledger, as `git tq run` leaves it.
    ledger = LocalJobs(tq_home(repo), str(repo / ".git"))
    with ledger.locked():
        for line in refs.splitlines():
            oid, ref = line.split()
            ledger.record(int(ref.rsplit("/", 1)[1]), LedgerEntry(oid, oid, None))


def tq_home(repo: Path) -> str:
    return str(repo.parent / "tqhome")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo", folders=10)
        git(repo, "config", "tq.home", tq_home(repo))
        write_jobs(repo, args.jobs)
        cmds = {
            "for-each-ref": ["git", "for-each-ref", "--format=%(contents)", "refs/tq/jobs"],
            "git tq ls --all --json": ["git", "tq", "ls", "--all", "--json"],
            "git tq log": ["git", "tq", "log"],
            "git tq ls (active only)": ["git", "tq", "ls"],
        }
        cold = [
            "sh", "-c", "rm -rf .git/tq/cache && git tq ls --all --json",
        ]
        for label in ("loose refs", "packed refs"):
            if label == "packed refs":
                git(repo, "pack-refs", "--all")
            # The cold runs apart: each removes every cache, the whole listings' too.
            r = side_by_side(cmds, repo, args.rounds)
            r.update(side_by_side({"ls, cold cache": cold}, repo, args.rounds))
            base = r["for-each-ref"]
            print(f"{args.jobs} finished jobs, {label}, median of {args.rounds}"
                  " (cold cache: every listing cache removed before each run):")
            for name, t in r.items():
                extra = "" if name == "for-each-ref" else f"  {t / base:5.2f}x  (aim <= 2x)"
                print(f"  {name:<24}{t * 1000:8.1f} ms{extra}")


if __name__ == "__main__":
    main()
