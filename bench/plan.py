"""The scheduling policy with a long queue: `scheduler.plan` (and `deps.judge`, which
the daemon runs before it) over 10,000 pending jobs, a quarter of them with
dependencies, on 8 GPUs. Pure functions: no git, no processes.

Cases: every GPU busy (nothing starts: each waiting job gets its reason), every GPU
free (8 start), and a queue whose head outranks the running jobs (preemptions).

    python bench/plan.py [--jobs 10000] [--gpus 8] [--rounds 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from git_tq import deps, scheduler  # noqa: E402
from git_tq.model import GpuRequest, State  # noqa: E402

ANY = [GpuRequest.any(1), GpuRequest.any(1), GpuRequest.any(2)]


def queue(n: int, gpus: int) -> tuple[dict[int, deps.Needs], dict[int, State]]:
    """n pending jobs: every 4th after the one before it, every 10th after-any a range of
    five earlier ones (a sweep); ids 1..n. Their dependencies' states: pending."""
    needs: dict[int, deps.Needs] = {}
    for i in range(1, n + 1):
        after = (i - 1,) if i % 4 == 0 and i > 1 else ()
        after_any = tuple(range(max(1, i - 6), i - 1)) if i % 10 == 0 else ()
        needs[i] = deps.Needs(after, after_any)
    return needs, {i: State.PENDING for i in range(1, n + 1)}


def waiting_jobs(n: int, gpus: int, verdicts: dict[int, deps.Verdict],
                 priority: Callable[[int], int]) -> list[scheduler.Waiting]:
    out = []
    for i in range(1, n + 1):
        request = GpuRequest.exact((i % gpus,)) if i % 5 == 0 else ANY[i % 3]
        v = verdicts.get(i)
        out.append(scheduler.Waiting(("repo", i), priority(i),
                                     f"2026-12-03T10:{i // 3600 % 60:02d}:{i % 60:02d}+00:00",
                                     request, v.waiting_for if v is not None else ()))
    return out


def median_ms(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    n, g = args.jobs, args.gpus
    machine_gpus = list(range(g))
    needs, states = queue(n, g)
    print(f"# {machine()}, Python {sys.version.split()[0]}; {n} pending jobs, {g} GPUs, "
          f"{sum(1 for x in needs.values() if x.after or x.after_any)} with dependencies, "
          f"{args.rounds} rounds (median / max)")
    ms, worst = median_ms(lambda: deps.judge(needs, states), args.rounds)
    print(f"deps.judge                          {ms:7.2f} ms  {worst:7.2f} ms")
    verdicts = deps.judge(needs, states)
    busy = [scheduler.Holding(("repo", 100_000 + k), 50, (k,)) for k in range(g)]
    cases = {
        "plan, every GPU busy": (waiting_jobs(n, g, verdicts, lambda i: 100 + i % 7), busy),
        "plan, every GPU free": (waiting_jobs(n, g, verdicts, lambda i: 100 + i % 7), []),
        "plan, head preempts": (waiting_jobs(n, g, verdicts, lambda i: 10 if i < 20 else 100),
                                busy),
    }
    for name, (waiting, holding) in cases.items():
        ms, worst = median_ms(lambda w=waiting, h=holding: scheduler.plan(  # type: ignore[misc]
            w, h, machine_gpus), args.rounds)
        p = scheduler.plan(waiting, holding, machine_gpus)
        print(f"{name:<35} {ms:7.2f} ms  {worst:7.2f} ms   starts {len(p.starts)}, "
              f"preempts {len(p.preempts)}, reasons {len(p.reasons)}")


if __name__ == "__main__":
    main()
