"""The job runs exactly the code on disk, in every kind of repository.

For each kind of repository (tests/repos/kit.py builds them):

(a) the snapshot tree is what `git add -A --sparse` records into a copy of the
    index that keeps its mtime; a dirty submodule or nested repository is a
    snapshot commit of its own, kept under its refs/tq/snapshots/;
(b) the job, run by the real daemon, sees byte for byte the files the user had
    on disk at submission (nested repositories included), not later edits;
(c) the user's index, HEAD, refs, stash, reflogs and git dir are untouched by
    the submission and by the job, and no post-index-change or post-checkout
    hook fires;
(d) `git tq checkout JOB --worktree PATH` and `git tq checkout -f JOB` bring the
    files back (nested repositories' included), after the user changed them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import git, tq

from repos.kit import (
    NOT_BYTE_EXACT,
    PARAMS,
    build,
    check_snapshot_tree,
    check_warnings,
    dump_command,
    head,
    hooks_that_must_not_fire,
    install_hooks,
    job,
    manifest,
    mutate,
    out,
    read_json,
    state_changes,
    states,
    submit,
    wait_finished,
)


def known_limit(request: pytest.FixtureRequest, kind: str) -> None:
    if kind in NOT_BYTE_EXACT:
        request.applymarker(pytest.mark.xfail(strict=True, reason=NOT_BYTE_EXACT[kind]))


@pytest.fixture
def daemon() -> None:
    """`git tq run` starts the real daemon, as it does for users."""
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")


@pytest.mark.parametrize(("kind", "fmt"), PARAMS)
def test_snapshot_tree(kind: str, fmt: str, tmp_path: Path) -> None:
    scene = build(kind, fmt, tmp_path)
    source = head(scene.top)
    job_id, warnings = submit(scene, "true")
    tree = out(scene.top, "rev-parse", f"refs/tq/jobs/{job_id}^{{tree}}")
    check_snapshot_tree(scene.top, tree)
    submission = job(scene.cwd, job_id)["snapshot"]
    assert out(scene.top, "rev-list", "--parents", "-n1", submission).split()[1:] == \
        ([source] if source else [])
    check_warnings(scene, warnings)


@pytest.mark.parametrize(("kind", "fmt"), PARAMS)
def test_job_sees_the_files_on_disk(kind: str, fmt: str, tmp_path: Path, daemon: None,
                                   request: pytest.FixtureRequest) -> None:
    known_limit(request, kind)
    scene = build(kind, fmt, tmp_path)
    expected = manifest(scene.top, scene.cwd)
    target = tmp_path / "job-manifest.json"
    job_id, _ = submit(scene, *dump_command(scene, target))
    mutate(scene)  # later edits must not reach the job
    wait_finished(scene.cwd, job_id)
    assert read_json(target) == expected


@pytest.mark.parametrize(("kind", "fmt"), PARAMS)
def test_user_repository_untouched(kind: str, fmt: str, tmp_path: Path, daemon: None) -> None:
    scene = build(kind, fmt, tmp_path)
    marks = tmp_path / "hooks-fired"
    install_hooks([scene.top, *scene.nested, *scene.others], marks)
    before = states(scene)
    job_id, _ = submit(scene, "true")
    problems = state_changes(before, states(scene)) + hooks_that_must_not_fire(marks)
    assert not problems, "after the submission:\n" + "\n".join(problems)
    wait_finished(scene.cwd, job_id)
    problems = state_changes(before, states(scene)) + hooks_that_must_not_fire(marks)
    assert not problems, "after the job ran:\n" + "\n".join(problems)


@pytest.mark.parametrize(("kind", "fmt"), PARAMS)
def test_checkout_into_a_new_worktree(kind: str, fmt: str, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    known_limit(request, kind)
    scene = build(kind, fmt, tmp_path)
    expected = manifest(scene.top)
    job_id, _ = submit(scene, "true")
    mutate(scene, delete=True)
    restored = scene.top.parent / "restored"  # a sibling: `../x` links reach the same
    tq(scene.cwd, "checkout", str(job_id), "--worktree", str(restored))
    assert manifest(restored) == expected


@pytest.mark.parametrize(("kind", "fmt"), PARAMS)
def test_checkout_force_in_place(kind: str, fmt: str, tmp_path: Path,
                                 request: pytest.FixtureRequest) -> None:
    known_limit(request, kind)
    scene = build(kind, fmt, tmp_path)
    expected = manifest(scene.top)
    job_id, _ = submit(scene, "true")
    mutate(scene, delete=True)
    tq(scene.cwd, "checkout", "-f", str(job_id))
    assert manifest(scene.top) == expected
