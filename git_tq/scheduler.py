"""The scheduling policy: a pure function from queue and machine state to actions.

No processes, files or git here: `plan` takes what is pending, what runs, the
GPUs and which of them a foreign process sits on, and says what to start,
whom to preempt, and why each other waiting job waits. The daemon carries the
actions out. What a job's dependencies wait for is decided before (`deps`) and
comes in as `Waiting.waiting_for`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from git_tq.model import GpuRequest, describe_ids

JobKey = tuple[str, int]  # (repository key, job id): unique across the daemon's repositories


@dataclass(frozen=True)
class Waiting:
    """A pending job as the policy sees it."""

    key: JobKey
    priority: int
    submitted_at: str  # ISO 8601; within a priority, earlier first (a preempted job keeps it)
    gpus: GpuRequest
    waiting_for: tuple[int, ...] = ()  # dependencies not yet ended (ids in its repository)


@dataclass(frozen=True)
class Holding:
    """A running (or stopping) job and the GPUs it holds."""

    key: JobKey
    priority: int
    gpus: tuple[int, ...]
    stopping: bool = False  # already asked to stop: its GPUs free up soon


@dataclass(frozen=True)
class Start:
    key: JobKey
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class Preempt:
    victim: JobKey
    reason: str  # "preempted by job 9" / "yield to a foreign process on GPU 0"
    for_job: Optional[JobKey] = None


@dataclass(frozen=True)
class Reason:
    """Why a waiting job was not started. `kind` says what holds it, for whoever shows
    it (more kinds may come: a paused queue, a time window): "dependency", "gpu" (our
    jobs hold it), "foreign" (someone else's process), "preempting" (a victim is being
    stopped for it), "cpu" (no slot), "machine" (it asks for GPUs this machine lacks),
    "paused" (`git tq pause` holds the queue or the GPUs it would get)."""

    kind: str
    text: str  # "waiting for 12", "GPU 0 busy", "yielding to pid 4242 on GPU 0"


@dataclass(frozen=True)
class Plan:
    starts: list[Start] = field(default_factory=list)
    preempts: list[Preempt] = field(default_factory=list)
    # Why each waiting job that is not started waits.
    reasons: dict[JobKey, Reason] = field(default_factory=dict)


_QUEUE_KEY = operator.attrgetter("priority", "submitted_at", "key")


def paused_reason(gpus: GpuRequest, paused: frozenset[int] | set[int],
                  all_paused: bool) -> Optional[str]:
    """Why a pause holds a job asking for `gpus` outright: every job while the whole
    queue is paused; one asking for a paused GPU by its id. (A job asking for any N
    GPUs is only kept off the paused ones: `plan` says when that held it.)"""
    if all_paused:
        return "queue paused"
    held = [g for g in gpus.ids or () if g in paused]
    return f"GPU {','.join(map(str, held))} paused" if held else None


def queue_order(waiting: Sequence[Waiting]) -> list[Waiting]:
    """Smallest priority number first; within a priority, submission order."""
    return sorted(waiting, key=_QUEUE_KEY)


def plan(waiting: Sequence[Waiting], holding: Sequence[Holding], gpus: Sequence[int], *,
         foreign: Mapping[int, str] | None = None, cpu_slots: int = 1,
         jobs_per_gpu: int = 1, paused: frozenset[int] = frozenset(),
         all_paused: bool = False) -> Plan:
    """What to do now. `foreign` maps a GPU to a description of the foreign process on it.

    `paused` GPUs take no new job, and with `all_paused` nothing starts at all (`git tq
    pause`): a job held by that neither starts nor preempts; running and stopping jobs
    are left as they are, and so are the yields to foreign processes."""
    foreign = foreign or {}
    result = Plan()
    reasons = result.reasons
    load: dict[int, list[Holding]] = {g: [] for g in gpus}
    cpu_used = 0
    for h in holding:
        if not h.gpus:
            cpu_used += 1
        for g in h.gpus:
            load.setdefault(g, []).append(h)
    # Yield: our jobs leave GPUs where someone else's process runs.
    preempted: set[JobKey] = set()
    for g, who in foreign.items():
        for h in load.get(g, []):
            if not h.stopping and h.key not in preempted:
                preempted.add(h.key)
                result.preempts.append(Preempt(h.key, f"yield to {who} on GPU {g}"))
    # GPUs being vacated for a waiting job (which one): nobody else takes them.
    reserved: dict[int, JobKey] = {}

    def free(g: int, even_paused: bool = False) -> bool:
        return g not in foreign and g not in reserved and len(load.get(g, [])) < jobs_per_gpu \
            and (even_paused or g not in paused)

    def reclaimable(g: int, priority: int, even_paused: bool = False) -> bool:
        """GPU g could be freed for a job of `priority` by preempting lower-priority jobs."""
        if g in foreign or g in reserved or (g in paused and not even_paused):
            return False
        occupants = load.get(g, [])
        return all(o.stopping or o.priority > priority for o in occupants)

    def busy(g: int) -> Reason:
        """Why GPU g cannot be had: who sits on it."""
        if g in foreign:
            return Reason("foreign", f"yielding to {foreign[g]} on GPU {g}")
        if g in reserved:
            return Reason("preempting", f"GPU {g} kept for job {reserved[g][1]}")
        return Reason("gpu", f"GPU {g} busy")

    def place(w: Waiting) -> Optional[Reason]:
        """Start w, or preempt for it (None); else why it waits, having changed nothing."""
        nonlocal cpu_used
        req = w.gpus
        held = paused_reason(req, paused, all_paused)
        if held is not None:
            return Reason("paused", held)
        if req.cpu_only:
            if cpu_used < cpu_slots:
                cpu_used += 1
                result.starts.append(Start(w.key, ()))
                return None
            return Reason("cpu", "no CPU slot free")
        if req.ids is not None:
            wanted = [g for g in req.ids if g in load]
            if len(wanted) != len(req.ids):
                gone = next(g for g in req.ids if g not in load)
                return Reason("machine", f"GPU {gone} is not on this machine")
            if all(free(g) for g in wanted):
                _take(load, w, tuple(wanted), result)
                return None
            if all(free(g) or reclaimable(g, w.priority) for g in wanted):
                _preempt_for(w, [g for g in wanted if not free(g)], load, reserved,
                             preempted, result)
                return None
            return busy(next(g for g in wanted if not free(g)))
        candidates = sorted((g for g in load if free(g)), key=lambda g: (len(load[g]), g))
        if len(candidates) >= req.count:
            _take(load, w, tuple(sorted(candidates[: req.count])), result)
            return None
        # Not enough free GPUs: reclaim the ones whose jobs matter least.
        extra = [g for g in load if not free(g) and reclaimable(g, w.priority)]
        extra.sort(key=lambda g: (-max((o.priority for o in load[g]), default=0), g))
        if len(candidates) + len(extra) >= req.count:
            need = extra[: req.count - len(candidates)]
            for g in candidates:
                reserved[g] = w.key
            _preempt_for(w, need, load, reserved, preempted, result)
            return None
        # It waits, kept off the paused GPUs: say so when one of them would have served it.
        would = [g for g in sorted(paused) if g in load
                 and (free(g, True) or reclaimable(g, w.priority, True))]
        if would:
            return Reason("paused", f"GPU {','.join(map(str, would))} paused")
        return _short_of(req.count, len(candidates), [g for g in load if not free(g)],
                         foreign, busy)

    # A job that only waits changes nothing, so the next one asking the same at the same
    # priority waits for the same reason: a long queue costs a lookup per job.
    told: dict[tuple[GpuRequest, int], Reason] = {}
    for w in queue_order(waiting):
        if w.waiting_for:
            reasons[w.key] = Reason("dependency", "waiting for " + describe_ids(w.waiting_for))
            continue
        reason = told.get((w.gpus, w.priority))
        if reason is None:
            reason = place(w)
            if reason is None:
                told.clear()  # something started or is being vacated: ask afresh
                continue
            told[(w.gpus, w.priority)] = reason
        reasons[w.key] = reason
    return result


def _short_of(count: int, free_count: int, blockers: list[int], foreign: Mapping[int, str],
              busy: Callable[[int], Reason]) -> Reason:
    """Why a job asking for any `count` GPUs waits, when only `free_count` are free."""
    if count > free_count + len(blockers):
        return Reason("machine",
                      f"needs {count} GPUs, this machine has {free_count + len(blockers)}")
    if len(blockers) == 1 or all(g in foreign for g in blockers):
        return busy(blockers[0])  # the one GPU it waits for, or the foreign process
    if count == 1:
        return Reason("gpu", "every GPU busy")
    return Reason("gpu", f"{free_count} of the {count} GPUs it needs free")


def _take(load: dict[int, list[Holding]], w: Waiting, chosen: tuple[int, ...],
          result: Plan) -> None:
    for g in chosen:
        load[g].append(Holding(w.key, w.priority, chosen))
    result.starts.append(Start(w.key, chosen))


def _preempt_for(w: Waiting, gpus: list[int], load: dict[int, list[Holding]],
                 reserved: dict[int, JobKey], preempted: set[JobKey], result: Plan) -> None:
    victims: list[str] = []
    for g in gpus:
        reserved[g] = w.key
        for o in load[g]:
            if not o.stopping and o.key not in preempted:
                preempted.add(o.key)
                result.preempts.append(Preempt(o.key, f"preempted by job {w.key[1]}", w.key))
            victims.append(str(o.key[1]))
    result.reasons[w.key] = Reason(
        "preempting", "waiting for job " + ", ".join(dict.fromkeys(victims)) + " to stop")
