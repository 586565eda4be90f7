"""Job records: the commit format, the lifecycle, id allocation, notes, secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git, tq, tq_json

from git_tq import recordfmt
from git_tq.errors import InvalidTransition
from git_tq.lifecycle import EVENTS, TRANSITIONS, apply_event
from git_tq.model import ChangeSummary, GpuRequest, Job, JobSpec, State

NOW = "2026-01-02T03:04:05+00:00"
LATER = "2026-01-02T04:04:05+00:00"


def make_job(**changes: object) -> Job:
    spec = JobSpec(command=("python", "train.py", "--lr", "3e-4"), shell=False, priority=10,
                   grace=60, tag="lr", env="torch", gpus=GpuRequest.exact((0, 1)), cwd="src",
                   submitted_at=NOW, user="ana", host="box")
    job = Job(id=7, spec=spec, state=State.PENDING, event="submitted", attempt=0,
              snapshot="a" * 40, source="b" * 40, changes=ChangeSummary(2, 1, 0), tip="a" * 40)
    return job.evolve(**changes)


# --- format ----------------------------------------------------------------------


def test_record_round_trips_through_the_message() -> None:
    job = make_job()
    assert recordfmt.decode(recordfmt.encode(job), "a" * 40) == job
    running = apply_event(job, "started", LATER, assigned_gpus=(0, 1))
    again = recordfmt.decode(recordfmt.encode(running), "c" * 40)
    assert again == running.evolve(tip="c" * 40)


def test_message_reads_well_and_is_versioned() -> None:
    msg = recordfmt.encode(make_job())
    subject, blank, *_ = msg.splitlines()
    assert subject == "tq job 7 submitted: python train.py --lr 3e-4" and blank == ""
    assert "Tq-Format: 1" in msg and "Tq-Priority: 10" in msg
    failed = apply_event(apply_event(make_job(), "started", NOW), "finished", LATER, exit_code=3)
    assert recordfmt.encode(failed).startswith("tq job 7 failed (exit 3):")


def test_unknown_fields_are_ignored_and_newer_formats_refused() -> None:
    msg = recordfmt.encode(make_job()).replace("Tq-Format: 1", "Tq-Format: 1\nTq-Future: x")
    assert recordfmt.decode(msg, "a" * 40).id == 7
    with pytest.raises(recordfmt.RecordFormatError, match="newer"):
        recordfmt.decode(msg.replace("Tq-Format: 1", "Tq-Format: 9"), "a" * 40)
    with pytest.raises(recordfmt.RecordFormatError):
        recordfmt.decode("just a commit\n", "a" * 40)


# --- lifecycle (pure) ------------------------------------------------------------


def test_lifecycle_of_a_preempted_job() -> None:
    job = make_job()
    job = apply_event(job, "started", NOW, assigned_gpus=(0, 1))
    assert (job.state, job.attempt, job.started_at) == (State.RUNNING, 1, NOW)
    job = apply_event(job, "stopping", NOW, detail="preempted by job 9")
    assert job.state is State.STOPPING
    job = apply_event(job, "preempted", NOW, detail="preempted by job 9")
    assert job.state is State.PENDING and job.assigned_gpus is None
    job = apply_event(job, "resumed", LATER, assigned_gpus=(0, 1))
    assert job.attempt == 2
    job = apply_event(job, "finished", LATER, exit_code=0)
    assert job.state is State.DONE and job.ended_at == LATER and job.exit_code == 0


def test_finished_by_signal_is_failed() -> None:
    job = apply_event(make_job(), "started", NOW)
    job = apply_event(job, "finished", LATER, exit_code=None, signal=9)
    assert job.state is State.FAILED and job.signal == 9


@pytest.mark.parametrize("state", list(State))
def test_only_listed_transitions_are_allowed(state: State) -> None:
    job = make_job(state=state)
    for name, event in EVENTS.items():
        if state in event.sources:
            fields = {"exit_code": 0} if name == "finished" else {}
            assert apply_event(job, name, NOW, **fields).state in TRANSITIONS[state]
        else:
            with pytest.raises(InvalidTransition):
                apply_event(job, name, NOW)


def test_finished_states_are_final() -> None:
    for state in (State.DONE, State.FAILED, State.CANCELLED):
        assert TRANSITIONS[state] == frozenset()


# --- records in a real repository --------------------------------------------------


def test_lifecycle_reads_in_git_log(repo: Path) -> None:
    tq(repo, "run", "-q", "--cpu", "-t", "base", "python", "train.py")
    tq(repo, "rm", "1")
    log = git(repo, "log", "--format=%s", "refs/tq/jobs/1")
    assert log.splitlines()[:3] == [
        "tq job 1 cancelled: python train.py",
        "tq job 1 submitted: python train.py",
        "initial",
    ]
    # every lifecycle commit keeps the snapshot's tree
    trees = git(repo, "log", "--format=%T", "-n2", "refs/tq/jobs/1").split()
    assert trees[0] == trees[1]
    history = tq_json(repo, "show", "1")
    assert isinstance(history, dict)
    assert [e["event"] for e in history["lifecycle"]] == ["submitted", "cancelled"]


def test_concurrent_submissions_get_distinct_ids(repo: Path) -> None:
    """8 processes x 50 submissions at once: 400 jobs, 400 ids, nothing lost (800 and
    more through the real executable: tests/soak)."""
    # Each worker process submits in a loop through the service layer (what
    # `git tq run` calls), so the test measures the race, not interpreter start-up.
    script = (
        "import sys\n"
        "from git_tq import service\n"
        "ctx = service.Context.open()\n"
        "for i in range(int(sys.argv[1])):\n"
        "    service.submit(ctx, service.SubmitRequest(command=('echo', str(i)), cpu=True,"
        " tag=sys.argv[2]))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, "50", f"w{w}"], cwd=repo)
             for w in range(8)]
    assert [p.wait(timeout=240) for p in procs] == [0] * 8
    refs = git(repo, "for-each-ref", "--format=%(refname:lstrip=3)", "refs/tq/jobs").split()
    assert sorted(map(int, refs)) == list(range(1, 401))
    jobs = tq_json(repo, "ls", "--all")
    assert isinstance(jobs, list) and len(jobs) == 400
    per_worker = {f"w{w}": sorted(int(j["command"][1]) for j in jobs if j["tag"] == f"w{w}")
                  for w in range(8)}
    assert all(v == list(range(50)) for v in per_worker.values())
    # each submission was recorded locally exactly once, with the commit that won its id
    tqhome = Path(os.environ["TQ_HOME"])
    local = {p.stem for p in tqhome.glob("jobs/*/*.json")}
    assert local == {j["snapshot"] for j in jobs}


def test_environment_never_reaches_git_objects(repo: Path) -> None:
    secret = "s3cr3t-token-value-123"
    tq(repo, "run", "--cpu", "echo", "hi", env={"MY_API_TOKEN": secret})
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo,
                             capture_output=True, check=True).stdout
    assert secret.encode() not in objects and b"MY_API_TOKEN" not in objects
    # ... but it is kept locally for the daemon, private to the user
    files = list(Path(os.environ["TQ_HOME"]).glob("jobs/*/*.json"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert files[0].parent.stat().st_mode & 0o777 == 0o700
    assert json.loads(files[0].read_text())["environ"]["MY_API_TOKEN"] == secret


def test_captured_environment_drops_repository_variables(repo: Path) -> None:
    gitdir = str(repo / ".git")
    tq(repo, "run", "--cpu", "true", env={"GIT_DIR": gitdir, "GIT_WORK_TREE": str(repo)})
    saved = json.loads(next(Path(os.environ["TQ_HOME"]).glob("jobs/*/*.json")).read_text())
    assert "GIT_DIR" not in saved["environ"] and "GIT_WORK_TREE" not in saved["environ"]


def test_notes_interoperate_with_git_notes(repo: Path) -> None:
    tq(repo, "run", "-q", "--cpu", "true")
    snapshot = git(repo, "rev-parse", "refs/tq/jobs/1").strip()
    tq(repo, "note", "1", "best", "so", "far")
    assert git(repo, "notes", "--ref=tq", "show", snapshot).strip() == "best so far"
    git(repo, "notes", "--ref=tq", "add", "-f", "-m", "written by git", snapshot)
    assert tq_json(repo, "show", "1")["note"] == "written by git"  # type: ignore[index]
    tq(repo, "note", "--append", "1", "more")
    assert tq_json(repo, "show", "1")["note"] == "written by git\n\nmore"  # type: ignore[index]
    # the note stays on the submission commit when the job changes state
    tq(repo, "rm", "1")
    assert tq_json(repo, "show", "1")["note"] == "written by git\n\nmore"  # type: ignore[index]
    tq(repo, "note", "--remove", "1")
    assert tq_json(repo, "show", "1")["note"] is None  # type: ignore[index]


def test_concurrent_notes_all_land(repo: Path) -> None:
    for _ in range(8):
        tq(repo, "run", "-q", "--cpu", "true")
    procs = [subprocess.Popen(["git", "tq", "note", str(i), f"note {i}"], cwd=repo,
                              stdout=subprocess.DEVNULL) for i in range(1, 9)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 8
    notes = {j["id"]: j["note"] for j in tq_json(repo, "ls", "--all")}  # type: ignore[union-attr]
    assert notes == {i: f"note {i}" for i in range(1, 9)}
    assert "tq-scratch" not in git(repo, "for-each-ref", "refs/notes")  # none left behind
    # The same text again changes nothing, and a note can go and come back.
    tq(repo, "note", "1", "note 1")
    tq(repo, "note", "--remove", "2")
    tq(repo, "note", "--remove", "2")  # already gone: nothing to change
    tq(repo, "note", "2", "back")
    notes = {j["id"]: j["note"] for j in tq_json(repo, "ls", "--all")}  # type: ignore[union-attr]
    assert notes[1] == "note 1" and notes[2] == "back" and notes[3] == "note 3"
    assert "tq-scratch" not in git(repo, "for-each-ref", "refs/notes")


def test_foreign_record_is_skipped_with_a_warning(repo: Path) -> None:
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    bogus = git(repo, "commit-tree", tree, "-m", "not a tq record").strip()
    git(repo, "update-ref", "refs/tq/jobs/5", bogus)
    tq(repo, "run", "-q", "--cpu", "true")
    p = tq(repo, "ls", "--all", "--json")
    assert [j["id"] for j in json.loads(p.stdout)] == [6]
    assert "1 job record is unreadable" in p.stderr
    text = tq(repo, "ls", "--all").stdout
    assert "5" in text and "(unreadable: not a valid tq job record (no Tq-Format))" in text


def test_record_cache_is_only_a_cache(repo: Path) -> None:
    for _ in range(3):
        tq(repo, "run", "-q", "--cpu", "true")
    first = tq_json(repo, "ls", "--all")
    caches = list((repo / ".git" / "tq" / "cache").glob("*.marshal"))
    assert caches
    for cache in caches:
        cache.write_bytes(b"\x00garbage")
    assert tq_json(repo, "ls", "--all") == first  # rebuilt from the refs
    tq(repo, "rm", "2")
    states = [j["state"] for j in tq_json(repo, "ls", "--all")]  # type: ignore[union-attr]
    assert states == ["pending", "cancelled", "pending"]
    for cache in caches:
        cache.unlink(missing_ok=True)
    assert [j["state"] for j in tq_json(repo, "ls", "--all")] == states  # type: ignore[union-attr]
