"""The scheduling policy, exhaustively and without processes."""

from __future__ import annotations

from git_tq.model import GpuRequest
from git_tq.scheduler import Holding, Plan, Preempt, Reason, Start, Waiting, plan, queue_order

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


# --- dependencies and waiting reasons -----------------------------------------------------


def test_a_job_waiting_for_dependencies_is_skipped_and_says_why() -> None:
    blocked = Waiting(("r", 1), 1, "2026-01-01T00:00:01", ANY1, waiting_for=(7, 9))
    p = plan([blocked, w(2, pri=50)], [h(8, 100, (0,))], [0, 1])
    assert p.starts == [Start(("r", 2), (1,))]
    assert p.preempts == []  # a blocked job preempts nobody, and reserves nothing
    assert p.reasons[("r", 1)] == Reason("dependency", "waiting for 7, 9")
    many = Waiting(("r", 3), 1, "x", ANY1, waiting_for=tuple(range(10, 20)))
    assert plan([many], [], [0]).reasons[("r", 3)].text == "waiting for 10, 11, 12 and 7 more"


def test_every_waiting_job_that_is_not_started_gets_a_reason() -> None:
    cpu = GpuRequest.any(0)
    p = plan([w(1, gpus=GpuRequest.exact((0,))), w(2, gpus=GpuRequest.exact((5,))),
              w(3, gpus=cpu), w(4, gpus=GpuRequest.any(4)), w(5, gpus=GpuRequest.any(2)),
              w(6), w(7, gpus=GpuRequest.any(2))],
             [h(8, 100, (0,)), h(7, 100, (1,)), h(9, 100, ())], [0, 1, 2], cpu_slots=1)
    reasons = {k[1]: r.text for k, r in p.reasons.items()}
    assert p.starts == [Start(("r", 6), (2,))]
    assert reasons == {1: "GPU 0 busy", 2: "GPU 5 is not on this machine",
                       3: "no CPU slot free", 4: "needs 4 GPUs, this machine has 3",
                       5: "1 of the 2 GPUs it needs free", 7: "0 of the 2 GPUs it needs free"}
    assert plan([w(1)], [h(8, 1, (0,)), h(9, 1, (1,))], [0, 1]).reasons[("r", 1)].text == \
        "every GPU busy"


def test_reasons_name_the_foreign_process_and_the_preemption() -> None:
    p = plan([w(1, gpus=GpuRequest.exact((0,)))], [], [0, 1], foreign={0: "pid 4242"})
    assert p.reasons[("r", 1)] == Reason("foreign", "yielding to pid 4242 on GPU 0")
    p = plan([w(1, pri=1), w(2, gpus=GpuRequest.exact((0,)))], [h(9, 100, (0,))], [0])
    assert p.reasons[("r", 1)] == Reason("preempting", "waiting for job 9 to stop")
    assert p.reasons[("r", 2)] == Reason("preempting", "GPU 0 kept for job 1")
    assert ("r", 1) not in plan([w(1)], [], [0]).reasons  # started: no reason


def test_plan_with_ten_thousand_waiting_jobs_is_fast() -> None:
    """The bench (bench/plan.py) measures it; this only keeps it from growing wild."""
    import time

    waiting = [Waiting(("r", i), i % 7, f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}",
                       ANY1 if i % 3 else GpuRequest.exact((i % 8,)),
                       (i - 1,) if i % 4 == 0 else ()) for i in range(1, 10_001)]
    holding = [h(20_000 + g, 3, (g,)) for g in range(8)]
    t0 = time.perf_counter()
    p = plan(waiting, holding, list(range(8)))
    assert time.perf_counter() - t0 < 1.0
    assert len(p.reasons) + len(p.starts) == 10_000

# --- git tq pause ---------------------------------------------------------------------


def paused(p: Plan) -> dict[tuple[str, int], str]:
    """The reasons a pause gave (the others: tests above)."""
    return {k: r.text for k, r in p.reasons.items() if r.kind == "paused"}


def test_a_paused_queue_starts_nothing_and_preempts_nobody() -> None:
    cpu = GpuRequest.any(0)
    p = plan([w(1, pri=1), w(2, gpus=cpu)], [h(9, 100, (0,))], [0, 1], all_paused=True,
             cpu_slots=4)
    assert p.starts == [] and p.preempts == []
    assert paused(p) == {("r", 1): "queue paused", ("r", 2): "queue paused"}


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
    assert paused(p) == {("r", 1): "GPU 0 paused", ("r", 2): "GPU 0 paused"}


def test_any_gpu_jobs_keep_off_paused_gpus_and_say_so_when_that_held_them() -> None:
    p = plan([w(1), w(2)], [], [0, 1], paused=frozenset({1}))
    assert p.starts == [Start(("r", 1), (0,))]
    assert paused(p) == {("r", 2): "GPU 1 paused"}  # GPU 1 was free: the pause held it
    busy = plan([w(1, pri=10)], [h(8, 100, (0,)), h(9, 5, (1,))], [0, 1],
                paused=frozenset({0}))
    assert busy.starts == [] and busy.preempts == []  # its victim would be on GPU 0
    assert paused(busy) == {("r", 1): "GPU 0 paused"}
    unrelated = plan([w(1)], [h(8, 100, (0,))], [0, 1], paused=frozenset({1}),
                     jobs_per_gpu=1)
    assert unrelated.starts == [] and paused(unrelated) == {("r", 1): "GPU 1 paused"}
    two = plan([w(1, gpus=GpuRequest.any(2))], [], [0, 1, 2], paused=frozenset({2}))
    assert two.starts == [Start(("r", 1), (0, 1))] and paused(two) == {}


def test_without_a_pause_plans_are_as_before() -> None:
    p = plan([w(1), w(2)], [h(9, 100, (0,))], [0, 1])
    assert p.starts == [Start(("r", 1), (1,))] and paused(p) == {}
