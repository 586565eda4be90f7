"""The scheduling policy, exhaustively and without processes."""

from __future__ import annotations

from git_tq.model import GpuRequest
from git_tq.scheduler import Holding, Preempt, Start, Waiting, plan, queue_order

ANY1 = GpuRequest.any(1)


def w(i: int, pri: int = 100, gpus: GpuRequest = ANY1, at: str | None = None) -> Waiting:
    return Waiting(("r", i), pri, at or f"2026-01-01T00:00:{i:02d}", gpus)


def h(i: int, pri: int, gpus: tuple[int, ...], stopping: bool = False) -> Holding:
    return Holding(("r", i), pri, gpus, stopping)


def test_order_is_priority_then_submission() -> None:
    jobs = [w(1, 50), w(2, 10), w(3, 50, at="2026-01-01T00:00:00"), w(4, 10)]
    assert [x.key[1] for x in queue_order(jobs)] == [2, 4, 3, 1]


def test_free_gpus_are_filled_in_order() -> None:
    p = plan([w(1), w(2), w(3)], [], [0, 1])
    assert p.starts == [Start(("r", 1), (0,)), Start(("r", 2), (1,))]
    assert p.preempts == []


def test_exact_gpus_wait_for_their_gpu() -> None:
    p = plan([w(1, gpus=GpuRequest.exact((1,))), w(2)], [h(9, 100, (1,))], [0, 1])
    assert p.starts == [Start(("r", 2), (0,))]


def test_any_n_takes_least_loaded() -> None:
    p = plan([w(1, gpus=GpuRequest.any(2))], [h(9, 100, (0,))], [0, 1, 2], jobs_per_gpu=2)
    assert p.starts == [Start(("r", 1), (1, 2))]


def test_cpu_jobs_use_cpu_slots() -> None:
    cpu = GpuRequest.any(0)
    p = plan([w(1, gpus=cpu), w(2, gpus=cpu), w(3, gpus=cpu)], [h(9, 1, ())], [0], cpu_slots=2)
    assert p.starts == [Start(("r", 1), ())]


def test_higher_priority_preempts_lowest_priority_victim() -> None:
    running = [h(8, 50, (0,)), h(9, 200, (1,))]
    p = plan([w(1, pri=10)], running, [0, 1])
    assert p.starts == []
    assert p.preempts == [Preempt(("r", 9), "preempted by job 1", ("r", 1))]


def test_equal_or_smaller_priority_never_preempts() -> None:
    assert plan([w(1, pri=100)], [h(9, 100, (0,))], [0]).preempts == []
    assert plan([w(1, pri=100)], [h(9, 10, (0,))], [0]).preempts == []


def test_vacating_gpu_is_reserved_for_the_preemptor() -> None:
    running = [h(9, 100, (0,), stopping=True)]
    p = plan([w(1, pri=10), w(2, pri=200)], running, [0])
    assert p.starts == [] and p.preempts == []


def test_exact_request_preempts_only_its_gpus() -> None:
    running = [h(8, 100, (0,)), h(9, 100, (1,))]
    p = plan([w(1, pri=5, gpus=GpuRequest.exact((1,)))], running, [0, 1])
    assert [x.victim for x in p.preempts] == [("r", 9)]


def test_multi_gpu_job_preempts_enough_victims() -> None:
    running = [h(7, 100, (0,)), h(8, 300, (1,)), h(9, 200, (2,))]
    p = plan([w(1, pri=10, gpus=GpuRequest.any(2))], running, [0, 1, 2])
    assert sorted(x.victim for x in p.preempts) == [("r", 8), ("r", 9)]


def test_partly_free_multi_gpu_job_preempts_the_rest_and_reserves() -> None:
    p = plan([w(1, pri=10, gpus=GpuRequest.any(2)), w(2)], [h(9, 100, (1,))], [0, 1])
    assert p.preempts == [Preempt(("r", 9), "preempted by job 1", ("r", 1))]
    assert p.starts == []  # GPU 0 is kept for job 1, not given to job 2


def test_foreign_process_makes_our_job_yield_and_blocks_the_gpu() -> None:
    p = plan([w(1, pri=1)], [h(9, 100, (0,))], [0, 1], foreign={0: "pid 4242"})
    assert p.preempts == [Preempt(("r", 9), "yield to pid 4242 on GPU 0")]
    assert p.starts == [Start(("r", 1), (1,))]
    assert plan([w(2, gpus=GpuRequest.exact((0,)))], [], [0], foreign={0: "x"}).starts == []


def test_jobs_per_gpu_shares_a_gpu() -> None:
    p = plan([w(1), w(2), w(3)], [], [0], jobs_per_gpu=2)
    assert [s.gpus for s in p.starts] == [(0,), (0,)]


def test_a_gpu_that_disappeared_is_not_given() -> None:
    assert plan([w(1, gpus=GpuRequest.exact((5,)))], [], [0, 1]).starts == []


# --- git tq pause ---------------------------------------------------------------------


def test_a_paused_queue_starts_nothing_and_preempts_nobody() -> None:
    cpu = GpuRequest.any(0)
    p = plan([w(1, pri=1), w(2, gpus=cpu)], [h(9, 100, (0,))], [0, 1], all_paused=True,
             cpu_slots=4)
    assert p.starts == [] and p.preempts == []
    assert p.reasons == {("r", 1): "queue paused", ("r", 2): "queue paused"}


def test_decided_preemptions_and_yields_stay_under_a_pause() -> None:
    # A victim already stopping stays so (nothing here undoes it); a foreign process still
    # makes our job there yield.
    p = plan([w(1, pri=1)], [h(8, 100, (0,), stopping=True), h(9, 100, (1,))], [0, 1],
             foreign={1: "foreign process 42"}, all_paused=True)
    assert p.starts == []
    assert p.preempts == [Preempt(("r", 9), "yield to foreign process 42 on GPU 1")]


def test_a_paused_gpu_holds_the_jobs_that_asked_for_it() -> None:
    exact0, exact1 = GpuRequest.exact((0,)), GpuRequest.exact((0, 1))
    p = plan([w(1, gpus=exact0), w(2, gpus=exact1), w(3), w(4, gpus=GpuRequest.any(0))],
             [], [0, 1], paused=frozenset({0}))
    assert p.starts == [Start(("r", 3), (1,)), Start(("r", 4), ())]
    assert p.reasons == {("r", 1): "GPU 0 paused", ("r", 2): "GPU 0 paused"}


def test_any_gpu_jobs_keep_off_paused_gpus_and_say_so_when_that_held_them() -> None:
    p = plan([w(1), w(2)], [], [0, 1], paused=frozenset({1}))
    assert p.starts == [Start(("r", 1), (0,))]
    assert p.reasons == {("r", 2): "GPU 1 paused"}  # GPU 1 was free: the pause held it
    busy = plan([w(1, pri=10)], [h(8, 100, (0,)), h(9, 5, (1,))], [0, 1],
                paused=frozenset({0}))
    assert busy.starts == [] and busy.preempts == []  # its victim would be on GPU 0
    assert busy.reasons == {("r", 1): "GPU 0 paused"}
    unrelated = plan([w(1)], [h(8, 100, (0,))], [0, 1], paused=frozenset({1}),
                     jobs_per_gpu=1)
    assert unrelated.starts == [] and unrelated.reasons == {("r", 1): "GPU 1 paused"}
    two = plan([w(1, gpus=GpuRequest.any(2))], [], [0, 1, 2], paused=frozenset({2}))
    assert two.starts == [Start(("r", 1), (0, 1))] and two.reasons == {}


def test_without_a_pause_plans_are_as_before() -> None:
    p = plan([w(1), w(2)], [h(9, 100, (0,))], [0, 1])
    assert p.starts == [Start(("r", 1), (1,))] and p.reasons == {}
