"""The daemon's per-cycle read of a repository with 10,000 finished jobs: the git CLI
(what `store.JobStore.listing` does: `git for-each-ref`, the record cache, and `git
cat-file --batch` for tips not in it) against dulwich in-process (its import paid
once, as in the long-running daemon), both feeding the same cache and
`recordfmt.decode`. Then the CPU an idle daemon spends per cycle on that repository.

    pip install dulwich   # not a dependency of git tq: this measurement is why
    python bench/daemon_cycle.py [--jobs 10000] [--cycles 20] [--rounds 7]

Each round times --cycles consecutive listings per path (the paths interleaved round
by round); medians of the rounds are reported per cycle: wall time, and CPU (this
process plus the git processes it waited for). First with loose refs (as
submissions leave them), then after `git pack-refs --all`. "warm" is a cycle of
the daemon (every tip in the record cache); "cold" decodes every tip's message
(a first cycle, or a cache lost).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import ENV, git, machine, make_repo  # noqa: E402
from listing import tq_home, write_jobs  # noqa: E402

from git_tq import recordfmt  # noqa: E402
from git_tq.gitrepo import Repo  # noqa: E402
from git_tq.model import Job  # noqa: E402
from git_tq.store import JOBS_PREFIX, JobStore, RecordCache, _canonical  # noqa: E402


def git_listing(common: str, use_cache: bool) -> int:
    """The daemon's read today (`JobStore.listing`), or without its cache."""
    repo = Repo(toplevel=None, git_dir=common, common_dir=common, prefix="",
                index_path=os.path.join(common, "index"))
    store = JobStore(repo, ENV)
    if not use_cache:
        out = repo.out("for-each-ref", "--format=%(objectname) %(refname:lstrip=3)",
                       JOBS_PREFIX)
        tips = [line.partition(" ")[0] for line in out.splitlines()]
        messages = store._messages(tips)
        return sum(1 for oid in tips if _decodes(messages.get(oid), oid))
    return len(store.listing().jobs)


def dulwich_listing(common: str, use_cache: bool) -> int:
    """The same read in-process: refs (loose and packed) and tip messages by dulwich,
    through the same record cache, every record decoded by recordfmt.decode."""
    from dulwich.objects import Commit
    from dulwich.repo import Repo as DulwichRepo

    repo = DulwichRepo(common)  # a fresh one per cycle: refs are re-read from disk
    prefix = JOBS_PREFIX.encode()
    # as_dict(base) reads loose and packed refs under base, named relative to it
    tips = [(sha.decode(), name.decode())
            for name, sha in repo.refs.as_dict(prefix[:-1]).items()]
    cache = RecordCache(os.path.join(common, "tq", "cache"))
    known, known_bad = cache.load() if use_cache else ({}, {})
    decoded = 0
    for oid, name in tips:
        if _canonical(name) is None:
            continue
        if oid in known or oid in known_bad:
            decoded += oid in known
            continue
        obj = repo.object_store[oid.encode()]
        message = obj.message.decode("utf-8", errors="replace") \
            if isinstance(obj, Commit) else None
        decoded += _decodes(message, oid)
    return decoded


def _decodes(message: str | None, oid: str) -> bool:
    if message is None:
        return False
    try:
        job: Job = recordfmt.decode(message, oid)
    except recordfmt.RecordFormatError:
        return False
    return job.id > 0


def refs_git(common: str) -> int:
    out = subprocess.run(["git", "--git-dir", common, "for-each-ref",
                          "--format=%(objectname) %(refname:lstrip=3)", JOBS_PREFIX],
                         capture_output=True, check=True).stdout
    return out.count(b"\n")


def refs_dulwich(common: str) -> int:
    from dulwich.repo import Repo as DulwichRepo

    return len(DulwichRepo(common).refs.as_dict(JOBS_PREFIX.encode()[:-1]))


def cpu_now() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def compare(paths: dict[str, Callable[[], int]], cycles: int, rounds: int) \
        -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per cycle of each path, interleaved round by round."""
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    counts = {k: f() for k, f in paths.items()}  # warm up, and check they agree
    assert len(set(counts.values())) == 1, counts
    for _ in range(rounds):
        for name, f in paths.items():
            c0, t0 = cpu_now(), time.perf_counter()
            for _ in range(cycles):
                f()
            wall[name].append((time.perf_counter() - t0) / cycles)
            cpu[name].append((cpu_now() - c0) / cycles)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in paths}


def idle_daemon(repo: Path, cycles: int) -> tuple[float, float]:
    """(median cycle ms from the daemon's own log, CPU ms per cycle) of a real daemon
    serving the repository, nudged `cycles` times, each nudge one cycle."""
    import psutil

    from git_tq import client
    from git_tq.home import Home

    home = Home(tq_home(repo))
    home.register_repo(str(repo / ".git"))
    log = repo.parent / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["TQ_DEBUG"] = "1"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "git_tq.daemon", home.path],
                                stdout=fh, stderr=fh, env=env)
    try:
        def done() -> list[str]:
            return [ln for ln in log.read_text().splitlines() if "cycle took" in ln]

        deadline = time.monotonic() + 60
        while not done() or not client.is_running(home):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        me = psutil.Process(proc.pid)

        def cpu() -> float:
            t = me.cpu_times()
            return t.user + t.system + t.children_user + t.children_system

        before, first = cpu(), len(done())
        seen = first
        for _ in range(cycles):
            client.request(home, "nudge")
            while len(done()) <= seen:
                time.sleep(0.005)
            seen = len(done())
        ran = done()[first:]  # the nudged cycles, and any 3-second rescan among them
        per_cycle = (cpu() - before) / len(ran)
        took = [float(ln.split("cycle took ")[1].split()[0]) for ln in ran]
        return statistics.median(took), per_cycle * 1000
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {machine()}, {os.cpu_count()} cpus")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dulwich.repo"], check=True)
    t1 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    t2 = time.perf_counter()
    print(f"importing dulwich.repo: {((t1 - t0) - (t2 - t1)) * 1000:.0f} ms (paid once by the "
          "daemon)")
    import dulwich.repo  # noqa: F401  (paid once here too, outside the timings)

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo", folders=10)
        write_jobs(repo, args.jobs)
        common = str(repo / ".git")
        git_listing(common, True)  # fills the record cache
        for label in ("loose refs", "packed refs"):
            if label == "packed refs":
                git(repo, "pack-refs", "--all")
            r = compare({
                "refs only: git for-each-ref": lambda: refs_git(common),
                "refs only: dulwich": lambda: refs_dulwich(common),
                "warm: git CLI (listing today)": lambda: git_listing(common, True),
                "warm: dulwich": lambda: dulwich_listing(common, True),
            }, args.cycles, args.rounds)
            cold = compare({
                "cold: git CLI": lambda: git_listing(common, False),
                "cold: dulwich": lambda: dulwich_listing(common, False),
            }, max(1, args.cycles // 10), args.rounds)
            print(f"{args.jobs} finished jobs, {label}: per cycle, median of {args.rounds} "
                  f"rounds of {args.cycles} (cold: {max(1, args.cycles // 10)})")
            for name, (wall, cpu) in {**r, **cold}.items():
                print(f"  {name:<32}{wall * 1000:8.1f} ms wall {cpu * 1000:8.1f} ms CPU")
        took, cpu_ms = idle_daemon(repo, args.cycles * 2)
        print(f"idle daemon (git CLI), packed refs: a cycle takes {took:.1f} ms (its log), "
              f"{cpu_ms:.1f} ms CPU per cycle (daemon and its git processes)")


if __name__ == "__main__":
    main()
