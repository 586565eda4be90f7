"""Job dependencies (`run --after`, `--after-any`): which waiting jobs may start, which
wait, and which never can.

Pure: `judge` takes each waiting job's dependencies and what the records say of
every job's state, and returns a verdict per job. The daemon cancels the jobs
it finds broken (transitively, in `doomed_order`), the scheduler is told what
the others wait for, and `ls` says why a job waits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from git_tq.model import State, describe_ids


@dataclass(frozen=True)
class Needs:
    """A waiting job's dependencies: `after` must end done, `after_any` end at all."""

    after: tuple[int, ...] = ()
    after_any: tuple[int, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """Where a waiting job's dependencies stand."""

    waiting_for: tuple[int, ...] = ()  # dependencies that have not ended yet
    broken: Optional[int] = None  # an `after` dependency that will never end done
    why: str = ""  # how it ended: "failed", "was cancelled", "no longer exists"

    @property
    def ready(self) -> bool:
        return not self.waiting_for and self.broken is None

    @property
    def detail(self) -> str:
        """The reason a cancellation records: "dependency 12 failed"."""
        return f"dependency {self.broken} {self.why}"

    @property
    def reason(self) -> str:
        """Why the job waits, as `ls` says it: "after 12 (failed)", "waiting for 12"."""
        if self.broken is not None:
            word = {"was cancelled": "cancelled", "no longer exists": "gone"}.get(self.why,
                                                                                self.why)
            return f"after {self.broken} ({word})"
        return "waiting for " + describe_ids(self.waiting_for) if self.waiting_for else ""


_ENDED_BADLY = {State.FAILED: "failed", State.CANCELLED: "was cancelled"}


def judge(waiting: Mapping[int, Needs], states: Mapping[int, State]) -> dict[int, Verdict]:
    """A verdict for each job of `waiting` that has dependencies. `states` holds every
    job's state as recorded; a dependency missing from it no longer exists. A job
    `after` one that is itself broken (so about to be cancelled) is broken too."""
    verdicts: dict[int, Verdict] = {}
    dependents: dict[int, list[int]] = {}
    broken: list[int] = []
    for job_id, needs in waiting.items():
        if not needs.after and not needs.after_any:
            continue
        unmet: list[int] = []
        verdict: Optional[Verdict] = None
        for dep in needs.after:
            state = states.get(dep)
            if state is None:
                verdict = verdict or Verdict(broken=dep, why="no longer exists")
            elif state in _ENDED_BADLY:
                verdict = verdict or Verdict(broken=dep, why=_ENDED_BADLY[state])
            elif state is not State.DONE:
                unmet.append(dep)
                if dep in waiting:
                    dependents.setdefault(dep, []).append(job_id)
        for dep in needs.after_any:
            state = states.get(dep)
            if state is not None and state.active:
                unmet.append(dep)
        if verdict is not None:
            broken.append(job_id)
        verdicts[job_id] = verdict or Verdict(waiting_for=tuple(sorted(set(unmet))))
    # The cascade: whoever waits to follow a broken job is broken as well.
    for job_id in broken:
        for follower in dependents.get(job_id, ()):
            if verdicts[follower].broken is None:
                verdicts[follower] = Verdict(broken=job_id, why="was cancelled")
                broken.append(follower)
    return verdicts


def doomed_order(verdicts: Mapping[int, Verdict]) -> list[int]:
    """The broken jobs, each after the broken dependency that dooms it (the order in
    which to cancel them, so every recorded reason is already true when written)."""
    doomed = {i for i, v in verdicts.items() if v.broken is not None}
    order: list[int] = []
    placed: set[int] = set()

    def place(job_id: int) -> None:
        # Iterative: a chain of thousands must not hit the recursion limit.
        chain = []
        while job_id in doomed and job_id not in placed:
            chain.append(job_id)
            placed.add(job_id)
            parent = verdicts[job_id].broken
            assert parent is not None
            job_id = parent
        order.extend(reversed(chain))

    for job_id in sorted(doomed):
        place(job_id)
    return order


def would_cycle(job_id: int, new_deps: tuple[int, ...],
                deps_of: Mapping[int, tuple[int, ...]]) -> Optional[int]:
    """A dependency among `new_deps` that already (transitively) depends on `job_id`
    (so giving them to it would make a cycle); None when there is none."""
    for start in new_deps:
        if start == job_id:
            return start
        seen = {start}
        stack = [start]
        while stack:
            for dep in deps_of.get(stack.pop(), ()):
                if dep == job_id:
                    return start
                if dep not in seen:
                    seen.add(dep)
                    stack.append(dep)
    return None
