"""Dependencies and edits without processes: the pure judgement, the record fields, the
edit transition, the store's row cache."""

from __future__ import annotations

import dataclasses

import pytest

from git_tq import recordfmt
from git_tq.deps import Needs, Verdict, doomed_order, judge, would_cycle
from git_tq.errors import InvalidTransition
from git_tq.lifecycle import apply_edit, apply_event
from git_tq.model import ChangeSummary, GpuRequest, Job, JobSpec, State
from git_tq.store import _job_from_row, _job_to_row

P, R, D, F, C = State.PENDING, State.RUNNING, State.DONE, State.FAILED, State.CANCELLED
NOW = "2026-01-02T03:04:05+00:00"


def make_job(**spec_changes: object) -> Job:
    spec = JobSpec(command=("python", "a.py"), shell=False, priority=100, grace=180, tag=None,
                   env=None, gpus=GpuRequest.any(1), cwd="", submitted_at=NOW, user="u",
                   host="h")
    spec = dataclasses.replace(spec, **spec_changes)  # type: ignore[arg-type]
    return Job(id=7, spec=spec, state=State.PENDING, event="submitted", attempt=0,
               snapshot="a" * 40, source=None, changes=ChangeSummary(), tip="a" * 40)


def test_dependencies_met_waiting_and_broken() -> None:
    waiting = {5: Needs(after=(1, 2)), 6: Needs(after_any=(3, 4)), 7: Needs(after=(1,)),
               8: Needs()}
    verdicts = judge(waiting, {1: D, 2: R, 3: F, 4: C})
    assert verdicts[5] == Verdict(waiting_for=(2,))
    assert verdicts[5].reason == "waiting for 2"
    assert verdicts[6].ready and verdicts[7].ready  # after-any: any ending will do
    assert 8 not in verdicts  # no dependencies, no verdict
    broken = judge({5: Needs(after=(1, 2)), 6: Needs(after=(9,))}, {1: D, 2: F})
    assert broken[5] == Verdict(broken=2, why="failed")
    assert broken[5].detail == "dependency 2 failed"
    assert broken[5].reason == "after 2 (failed)"
    assert broken[6].detail == "dependency 9 no longer exists"
    assert broken[6].reason == "after 9 (gone)"


def test_a_failure_cancels_the_whole_chain_in_order() -> None:
    # 1 failed; 2 after 1; 3 after 2; 4 after 3 and any 2; 5 after-any 3 (waits only)
    waiting = {4: Needs(after=(3,), after_any=(2,)), 3: Needs(after=(2,)), 2: Needs(after=(1,)),
               5: Needs(after_any=(3,))}
    states = {1: F, 2: P, 3: P, 4: P, 5: P}
    verdicts = judge(waiting, states)
    assert verdicts[2].detail == "dependency 1 failed"
    assert verdicts[3].detail == "dependency 2 was cancelled"
    assert verdicts[4].detail == "dependency 3 was cancelled"
    assert verdicts[4].reason == "after 3 (cancelled)"
    assert verdicts[5] == Verdict(waiting_for=(3,))  # it runs once 3 is cancelled
    assert doomed_order(verdicts) == [2, 3, 4]
    # a restarted daemon that finds 2 cancelled already finishes the rest
    again = judge({3: waiting[3], 4: waiting[4], 5: waiting[5]}, {**states, 2: C})
    assert doomed_order(again) == [3, 4]


def test_a_long_chain_does_not_recurse() -> None:
    n = 5000
    waiting = {i: Needs(after=(i - 1,)) for i in range(2, n)}
    states = {i: P for i in range(2, n)} | {1: F}
    verdicts = judge(waiting, states)
    assert doomed_order(verdicts) == list(range(2, n))


def test_cycles_are_found() -> None:
    deps_of = {2: (1,), 3: (2,), 4: ()}
    assert would_cycle(1, (3,), deps_of) == 3  # 3 -> 2 -> 1
    assert would_cycle(1, (1,), deps_of) == 1
    assert would_cycle(1, (4,), deps_of) is None
    assert would_cycle(4, (3,), deps_of) is None


def test_dependencies_round_trip_as_ranges() -> None:
    ids = (3, 4, 5, 9, 11, 12)
    assert recordfmt.encode_ids(ids) == "3-5,9,11-12"
    assert recordfmt.decode_ids("3-5,9,11-12") == ids
    job = make_job(after=tuple(range(10, 10_010)), after_any=(2,))
    message = recordfmt.encode(job)
    assert "Tq-After: 10-10009\n" in message and "Tq-After-Any: 2\n" in message
    assert recordfmt.decode(message, "a" * 40) == job
    assert _job_from_row(_job_to_row(job)) == job


@pytest.mark.parametrize("text", ["", "0", "01", "5-3", "3,3", "4,2", "1-", "a", "1,,2",
                                  "1-100001", "1 2"])
def test_bad_dependency_fields_are_unreadable(text: str) -> None:
    message = recordfmt.encode(make_job()).rstrip("\n") + f"\nTq-After: {text}\n"
    with pytest.raises(recordfmt.RecordFormatError):
        recordfmt.decode(message, "a" * 40)


def test_a_record_without_the_fields_has_no_dependencies() -> None:
    message = recordfmt.encode(make_job())
    assert "Tq-After" not in message
    job = recordfmt.decode(message, "a" * 40)
    assert job.spec.after == () and job.spec.after_any == () and job.spec.dependencies == ()


def test_edits_by_state() -> None:
    job = make_job()
    new = dataclasses.replace(job.spec, priority=10, gpus=GpuRequest.exact((1,)), after=(3,))
    edited = apply_edit(job, new, "priority 100 → 10")
    assert edited.state is State.PENDING and edited.event == "edited"
    assert edited.spec == new and edited.detail == "priority 100 → 10"
    assert recordfmt.decode(recordfmt.encode(edited), "b" * 40) == edited.evolve(tip="b" * 40)
    running = apply_event(job, "started", NOW, assigned_gpus=(0,))
    kept = apply_edit(running, dataclasses.replace(running.spec, priority=1, grace=5), "x")
    assert kept.state is State.RUNNING and kept.assigned_gpus == (0,)
    with pytest.raises(InvalidTransition, match="gpus can no longer change"):
        apply_edit(running, dataclasses.replace(running.spec, gpus=GpuRequest.any(2)), "x")
    with pytest.raises(InvalidTransition, match="after can no longer change"):
        apply_edit(running, dataclasses.replace(running.spec, after=(1,)), "x")
    done = apply_event(running, "finished", NOW, exit_code=0)
    with pytest.raises(InvalidTransition, match="only a pending or running job"):
        apply_edit(done, dataclasses.replace(done.spec, priority=1), "x")
