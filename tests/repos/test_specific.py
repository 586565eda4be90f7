"""What particular kinds of repository promise beyond the four checks of test_kinds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import git, tq

from repos.kit import (
    git_path,
    job,
    k_outside_link,
    k_sparse_untracked_outside,
    k_split_index,
    k_uninitialised_submodule,
    new_repo,
    read_json,
    submit,
    wait_finished,
    write,
)


@pytest.fixture
def daemon() -> None:
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")


def test_show_lists_links_that_leave_the_repository(tmp_path: Path) -> None:
    scene = k_outside_link(tmp_path, "sha1")
    job_id, _ = submit(scene, "true")
    tree = f"refs/tq/jobs/{job_id}"
    assert git(scene.top, "cat-file", "-p", f"{tree}:datasets") == "../datasets"  # as written
    data = job(scene.top, job_id)
    assert sorted((x["path"], x["target"]) for x in data["outside_links"]) == [
        ("datasets", "../datasets"), ("src/sub-data", "../../datasets/sub"),
        ("train.csv", "../datasets/train.csv")]
    text = tq(scene.top, "show", str(job_id)).stdout
    for path, target in (("datasets", "../datasets"), ("train.csv", "../datasets/train.csv")):
        assert any(ln.startswith("link") and f"{path} -> {target}" in ln
                   for ln in text.splitlines()), text


def test_split_index_submits_leave_no_shared_index(tmp_path: Path) -> None:
    scene = k_split_index(tmp_path, "sha1")
    folder = git_path(scene.top, "index").parent
    before = sorted(p.name for p in folder.glob("sharedindex.*"))
    index = git_path(scene.top, "index").read_bytes()
    for i in range(3):
        write(scene.top / f"more{i}.txt", f"{i}\n")
        submit(scene, "true")
    assert sorted(p.name for p in folder.glob("sharedindex.*")) == before
    assert git_path(scene.top, "index").read_bytes() == index


def test_uninitialised_submodule_warns_in_one_line(tmp_path: Path) -> None:
    scene = k_uninitialised_submodule(tmp_path, "sha1")
    p = tq(scene.cwd, "run", "--cpu", "true")
    warnings = [ln for ln in p.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "lib" in warnings[0] and "not checked out" in warnings[0]
    tree = git(scene.top, "rev-parse", "refs/tq/jobs/1^{tree}").strip()
    recorded = git(scene.top, "ls-files", "-s", "lib").split()[1]
    assert git(scene.top, "ls-tree", tree, "lib").split()[:3] == ["160000", "commit", recorded]


def test_unresolved_conflicts_warn_in_one_line(tmp_path: Path) -> None:
    """Several conflicted files: still one warning line (naming them)."""
    names = ("a.py", "b.py", "c.py")
    top = new_repo(tmp_path / "proj", "sha1", {n: "base\n" for n in names})
    git(top, "checkout", "-q", "-b", "other")
    for n in names:
        write(top / n, "theirs\n")
    git(top, "commit", "-qam", "theirs")
    git(top, "checkout", "-q", "main")
    for n in names:
        write(top / n, "ours\n")
    git(top, "commit", "-qam", "ours")
    git(top, "merge", "-q", "other", check=False)
    assert len(git(top, "ls-files", "-u").splitlines()) == 9
    p = tq(top, "run", "--cpu", "true")
    warnings = [ln for ln in p.stderr.splitlines() if "conflict" in ln]
    assert len(warnings) == 1, warnings
    assert all(n in warnings[0] for n in names)


def test_sparse_job_worktree_stays_sparse(tmp_path: Path, daemon: None) -> None:
    scene = k_sparse_untracked_outside(tmp_path, "sha1")
    report = tmp_path / "report.json"
    job_id, _ = submit(scene, "python", "-c", f"""
import json, os, subprocess
run = lambda *a: subprocess.run(a, capture_output=True, text=True).stdout
json.dump({{"on disk": sorted(os.path.join(d, f)[2:] for d, _, fs in os.walk('.')
                        for f in fs if '.git' not in d and f != '.git'),
           "sparse": run('git', 'config', '--bool', 'core.sparseCheckout').strip(),
           "skipped": sorted(e[2:] for e in run('git', 'ls-files', '-t').splitlines()
                             if e.startswith('S '))}}, open({str(report)!r}, 'w'))
""")
    wait_finished(scene.top, job_id)
    seen = read_json(report)
    assert "dir2/new.py" in seen["on disk"] and "dir4/n.py" in seen["on disk"]
    assert "dir2/other.py" not in seen["on disk"] and "dir3/c.py" not in seen["on disk"]
    assert seen["sparse"] == "true"
    assert {"dir2/other.py", "dir3/c.py"} <= set(seen["skipped"])


def test_embedded_repository_without_commits(tmp_path: Path) -> None:
    """A folder the user `git init`ed inside the repository and has not committed in:
    git add -A refuses it; the submission fails with git's reason naming the folder
    (not just "adding files failed")."""
    top = new_repo(tmp_path / "proj", "sha1")
    (top / "scratch").mkdir()
    git(top / "scratch", "init", "-q")
    write(top / "scratch" / "notes.txt", "wip\n")
    p = tq(top, "run", "--cpu", "true", check=False)
    if p.returncode == 0:  # accepted: then the job must get the folder's files
        job_id = int(json.loads(tq(top, "ls", "--json").stdout)[0]["id"])
        assert git(top, "show", f"refs/tq/jobs/{job_id}:scratch/notes.txt") == "wip\n"
        return
    assert p.returncode == 1
    assert "scratch" in p.stderr, p.stderr
