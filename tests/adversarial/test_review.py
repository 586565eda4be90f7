"""Holes a review of part 4a found, each closed and kept closed.

Records crafted by a teammate point at the victim's own commits (another job's
submission, an old commit of a nested repository), take or block job ids, and
put shell text in ref names; none of it may reach the victim's private records,
notes, files or id allocation.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import git, tq, tq_json

from adversarial.test_fetched import Scene, as_an_older_git_tq_left_it, craft, record


@pytest.fixture
def scene(make_repo: Any, tmp_path: Path) -> Scene:
    return Scene(make_repo, tmp_path)


def submit(scene: Scene, *args: str) -> int:
    return int(tq(scene.victim, "run", "-q", "--cpu", *args).stdout)


def teammate_has_victims_jobs(scene: Scene) -> None:
    git(scene.teammate, "fetch", "-q", "origin", "refs/tq/*:refs/tq/*")


def submission_of(scene: Scene, job_id: int) -> str:
    return tq_json(scene.victim, "show", str(job_id))["snapshot"]  # type: ignore[index,no-any-return]


def test_adopt_never_reaches_another_jobs_private_record(scene: Scene) -> None:
    own = submit(scene, "python", "wait.py", str(scene.marker("own")))
    folder = next((Path(os.environ["TQ_HOME"]) / "jobs").iterdir())
    private = {p: p.read_bytes() for p in folder.glob("*.json")}
    teammate_has_victims_jobs(scene)
    first = submission_of(scene, own)
    # Job 20 builds on job 1's submission and names it as its own.
    scene.plant("refs/tq/jobs/20", craft(scene.teammate, record(
        20, scene.marker("evil-adopt"), Snapshot=first), parent=first))
    scene.fetch()
    assert "--adopt 20" not in tq(scene.victim, "doctor", check=False).stdout
    p = tq(scene.victim, "doctor", "--adopt", "20", check=False)
    assert p.returncode != 0 and "cannot be adopted" in p.stderr
    assert "Traceback" not in p.stderr
    assert {p: p.read_bytes() for p in folder.glob("*.json")} == private
    assert tq_json(scene.victim, "show", str(own))["trust"] == "local"  # type: ignore[index]


def test_adopted_job_is_scheduled_by_its_submission_not_by_later_records(
        scene: Scene) -> None:
    own = submit(scene, "-p", "50", "python", "wait.py", str(scene.marker("old")))
    spec = as_an_older_git_tq_left_it()
    teammate_has_victims_jobs(scene)
    tip = git(scene.teammate, "rev-parse", f"refs/tq/jobs/{own}").strip()
    scene.plant(f"refs/tq/jobs/{own}", craft(scene.teammate, record(
        own, scene.marker("evil"), Snapshot=spec["submission"], Priority="1"), parent=tip))
    scene.fetch()
    tq(scene.victim, "doctor", "--adopt", str(own))
    shown = tq_json(scene.victim, "show", str(own))
    assert shown["trust"] == "local"  # type: ignore[index]
    assert shown["priority"] == 50  # type: ignore[index]
    assert "wait.py" in " ".join(shown["command"])  # type: ignore[index]


def test_doctor_advice_quotes_ref_names(scene: Scene, tmp_path: Path) -> None:
    evil_name = "$(touch${IFS}pwned)"
    blob = craft(scene.teammate, record(1, scene.marker("evil-q")))
    scene.plant(f"refs/tq/jobs/{evil_name}", blob)
    scene.fetch()
    out = tq(scene.victim, "doctor", check=False).stdout
    fix = next(ln for ln in out.splitlines() if "delete:" in ln).split("delete:", 1)[1]
    assert f"refs/tq/jobs/{evil_name}" in shlex.split(fix)
    subprocess.run(["sh", "-c", fix], cwd=scene.victim, check=True, capture_output=True)
    assert not (scene.victim / "pwned").exists()
    assert git(scene.victim, "for-each-ref", "refs/tq/jobs/").strip() == ""


def test_ids_taken_or_blocked_by_fetched_refs_never_stop_submission(scene: Scene) -> None:
    blob = craft(scene.teammate, record(999999999999999999, scene.marker("evil-id")))
    scene.plant("refs/tq/jobs/999999999999999999", blob)
    for n in (1, 2, 3):  # refs that make refs/tq/jobs/N impossible to create
        scene.plant(f"refs/tq/jobs/{n}/x", blob)
    scene.fetch()
    git(scene.victim, "update-ref", "refs/tags/refs/tq/jobs/4", blob)  # a fetched tag
    ids = [submit(scene, "true") for _ in range(3)]
    assert ids == [4, 5, 6]  # the highest id is taken: the lowest free ones; a tag blocks none
    for job_id in ids:
        assert tq_json(scene.victim, "show", str(job_id))["trust"] == "local"  # type: ignore[index]
    ledger = next((Path(os.environ["TQ_HOME"]) / "jobs").iterdir()) / "ledger"
    assert len(ledger.read_text().splitlines()) <= 2 * len(ids)
    for token in ("²", "١٢", "99999999999999999999999"):  # digits int() refuses, a huge id
        p = tq(scene.victim, "show", token, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_a_fetched_job_naming_anothers_submission_gets_none_of_its_note(scene: Scene) -> None:
    own = submit(scene, "true")
    tq(scene.victim, "note", str(own), "precious result")
    teammate_has_victims_jobs(scene)
    first = submission_of(scene, own)
    scene.plant("refs/tq/jobs/20", craft(scene.teammate, record(
        20, scene.marker("evil-note"), Snapshot=first), parent=first))
    scene.fetch()
    assert tq_json(scene.victim, "show", "20")["note"] is None  # type: ignore[index]
    tq(scene.victim, "note", "20", "theirs")
    assert tq_json(scene.victim, "show", str(own))["note"] == "precious result"  # type: ignore[index]
    assert tq_json(scene.victim, "show", "20")["note"] == "theirs"  # type: ignore[index]
    rows = {r["id"]: r["note"] for r in tq_json(scene.victim, "ls", "--all")}  # type: ignore[union-attr]
    assert rows == {own: "precious result", 20: "theirs"}


def nested_repo(outer: Path, tracked: bool = False) -> tuple[Path, str]:
    """A nested repository with one commit, ignored by the outer one (or committed
    there as a gitlink whose dirt the outer status ignores); its commit."""
    inner = outer / "inner"
    inner.mkdir()
    git(inner, "init", "-q")
    (inner / "data.txt").write_text("v1\n")
    git(inner, "add", "-A")
    git(inner, "commit", "-qm", "one")
    if tracked:
        git(outer, "add", "inner")
        git(outer, "commit", "-qm", "inner")
        git(outer, "config", "diff.ignoreSubmodules", "dirty")
    else:
        with open(outer / ".git" / "info" / "exclude", "a") as fh:
            fh.write("inner/\n")
    return inner, git(inner, "rev-parse", "HEAD").strip()


def test_checkout_of_a_fetched_job_never_resets_a_nested_repository(scene: Scene) -> None:
    inner, first = nested_repo(scene.victim)
    (inner / "data.txt").write_text("uncommitted work\n")
    # The teammate's job tree puts a gitlink at inner/ -> the victim's old commit.
    base = git(scene.teammate, "rev-parse", "HEAD^{tree}").strip()
    listing = git(scene.teammate, "ls-tree", base)
    tree = subprocess.run(["git", "mktree"], cwd=scene.teammate, check=True,
                          capture_output=True, text=True,
                          input=listing + f"160000 commit {first}\tinner\n").stdout.strip()
    fields = record(20, scene.marker("evil-nested"))
    commit = craft(scene.teammate, fields)
    body = git(scene.teammate, "cat-file", "commit", commit).replace(
        f"tree {base}", f"tree {tree}", 1)
    commit = subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--stdin"],
                            cwd=scene.teammate, input=body, capture_output=True, text=True,
                            check=True).stdout.strip()
    scene.plant("refs/tq/jobs/20", commit)
    scene.fetch()
    tq(scene.victim, "checkout", "20")
    assert (inner / "data.txt").read_text() == "uncommitted work\n"


def test_checkout_refuses_to_overwrite_uncommitted_work_in_a_nested_repository(
        scene: Scene) -> None:
    inner, _ = nested_repo(scene.victim, tracked=True)
    own = submit(scene, "true")
    (inner / "data.txt").write_text("later work\n")
    p = tq(scene.victim, "checkout", str(own), check=False)
    assert p.returncode != 0 and "inner/data.txt" in p.stderr and "--force" in p.stderr
    assert (inner / "data.txt").read_text() == "later work\n"
    tq(scene.victim, "checkout", "--force", str(own))
    assert (inner / "data.txt").read_text() == "v1\n"


def test_logs_of_fetched_jobs_are_neither_filed_nor_removed(scene: Scene) -> None:
    scene.plant("refs/tq/jobs/20", craft(scene.teammate, record(
        20, scene.marker("evil-log"), Tag="evil", State="done", Event="finished",
        **{"Exit-Code": "0"})))
    scene.fetch()
    log_root = scene.victim / ".git" / "tq" / "logs"
    log_root.mkdir(parents=True, exist_ok=True)
    ours = log_root / "20-20260101-000000.log"
    ours.write_text("a log of an earlier job 20 of ours\n")
    for args in (("catg", "20", "folder"), ("rm", "--log", "-y", "20")):
        p = tq(scene.victim, *args, check=False)
        assert p.returncode != 0 and "not submitted here by you" in p.stderr, args
    assert ours.read_text() == "a log of an earlier job 20 of ours\n"
    assert sorted(p.name for p in log_root.iterdir()) == [ours.name]
