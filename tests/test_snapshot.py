"""Snapshots equal `GIT_INDEX_FILE=<copy> git add -A && git write-tree`, and touch nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import git, tq, tq_json


def reference_tree(repo: Path) -> str:
    """The tree the issue defines as correct, computed with plain git."""
    gitdir = Path(git(repo, "rev-parse", "--absolute-git-dir").strip())
    tmp = gitdir / "ref-index"
    if (gitdir / "index").exists():
        shutil.copyfile(gitdir / "index", tmp)
    env = {"GIT_INDEX_FILE": str(tmp)}
    git(repo, "add", "-A", env=env)
    tree = git(repo, "write-tree", env=env).strip()
    tmp.unlink()
    return tree


def snapshot_tree(repo: Path, cwd: Path | None = None) -> str:
    job_id = tq(cwd or repo, "run", "-q", "--cpu", "--", "true").stdout.strip()
    return git(repo, "rev-parse", f"refs/tq/jobs/{job_id}^{{tree}}").strip()


def user_state(repo: Path) -> dict[str, object]:
    gitdir = Path(git(repo, "rev-parse", "--absolute-git-dir").strip())
    index = gitdir / "index"
    return {
        "index": index.read_bytes() if index.exists() else None,
        "status": git(repo, "status", "--porcelain=v2", "--untracked-files=all"),
        "stash": git(repo, "stash", "list"),
        "refs": [ln for ln in git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
                 .splitlines() if not ln.startswith("refs/tq/")],
        "head": git(repo, "symbolic-ref", "-q", "HEAD", check=False),
        "files": sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                        if ".git" not in p.parts),
    }


def test_modified_staged_untracked_deleted(repo: Path) -> None:
    (repo / "train.py").write_text("print('v2')\n")  # unstaged change
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")  # staged new file
    (repo / "untracked.txt").write_text("u\n")  # untracked
    (repo / "README").unlink()  # unstaged deletion
    before = user_state(repo)
    tree = snapshot_tree(repo)
    assert user_state(repo) == before
    assert tree == reference_tree(repo)
    files = git(repo, "ls-tree", "-r", "--name-only", tree).split()
    assert "untracked.txt" in files and "staged.txt" in files and "README" not in files
    assert git(repo, "show", f"{tree}:train.py") == "print('v2')\n"


def test_staged_deletion_and_rename(repo: Path) -> None:
    git(repo, "rm", "-q", "README")
    git(repo, "mv", "train.py", "model.py")
    before = user_state(repo)
    tree = snapshot_tree(repo)
    assert user_state(repo) == before
    assert tree == reference_tree(repo)
    assert git(repo, "ls-tree", "--name-only", tree).split() == ["model.py"]


def test_executable_bit_and_symlink(repo: Path) -> None:
    script = repo / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    os.symlink("train.py", repo / "link.py")
    (repo / "train.py").chmod(0o755)
    tree = snapshot_tree(repo)
    assert tree == reference_tree(repo)
    entries = {ln.split("\t")[1]: ln.split()[0] for ln in git(repo, "ls-tree", tree).splitlines()}
    assert entries["run.sh"] == "100755"
    assert entries["train.py"] == "100755"
    assert entries["link.py"] == "120000"


def test_filemode_false_is_respected(repo: Path) -> None:
    git(repo, "config", "core.fileMode", "false")
    (repo / "train.py").chmod(0o755)
    tree = snapshot_tree(repo)
    assert tree == reference_tree(repo)
    assert git(repo, "ls-tree", tree, "train.py").split()[0] == "100644"


def test_ignore_rules(repo: Path, tmp_path: Path) -> None:
    (repo / ".gitignore").write_text("*.ckpt\ndata/\n")
    (repo / "model.ckpt").write_text("weights")
    (repo / "data").mkdir()
    (repo / "data" / "big.bin").write_text("x")
    (repo / ".git" / "info" / "exclude").write_text("secret.env\n")
    (repo / "secret.env").write_text("TOKEN=1")
    excludes = tmp_path / "global-excludes"
    excludes.write_text("*.log\n")
    git(repo, "config", "core.excludesFile", str(excludes))
    (repo / "out.log").write_text("log")
    (repo / "kept.txt").write_text("kept")
    tree = snapshot_tree(repo)
    assert tree == reference_tree(repo)
    files = git(repo, "ls-tree", "-r", "--name-only", tree).split()
    assert "kept.txt" in files and ".gitignore" in files
    for ignored in ("model.ckpt", "data/big.bin", "secret.env", "out.log"):
        assert ignored not in files


def test_submodule_is_captured_with_its_changes(repo: Path, make_repo) -> None:  # type: ignore[no-untyped-def]
    lib = make_repo("lib")
    git(repo, "submodule", "add", "-q", str(lib), "lib")
    git(repo, "commit", "-qm", "add lib")
    sub_head = git(repo / "lib", "rev-parse", "HEAD").strip()
    p = tq(repo, "run", "--cpu", "true")
    assert "warning" not in p.stderr
    tree = git(repo, "rev-parse", "refs/tq/jobs/1^{tree}").strip()
    assert git(repo, "ls-tree", tree, "lib").split()[:3] == ["160000", "commit", sub_head]
    assert tree == reference_tree(repo)
    (repo / "lib" / "train.py").write_text("dirty\n")
    p = tq(repo, "run", "--cpu", "true")
    assert "warning" not in p.stderr
    tree = git(repo, "rev-parse", "refs/tq/jobs/2^{tree}").strip()
    mode, kind, inner = git(repo, "ls-tree", tree, "lib").split()[:3]
    assert (mode, kind) == ("160000", "commit") and inner != sub_head
    # The submodule's snapshot is a commit of its own repository, kept reachable there.
    assert git(repo / "lib", "show", f"{inner}:train.py") == "dirty\n"
    assert git(repo / "lib", "rev-parse", f"{inner}^").strip() == sub_head
    assert git(repo / "lib", "rev-parse", f"refs/tq/snapshots/{inner}").strip() == inner
    assert git(repo / "lib", "status", "--porcelain") == " M train.py\n"  # untouched


def test_nested_repository(repo: Path, make_repo) -> None:  # type: ignore[no-untyped-def]
    nested = repo / "vendor"
    nested.mkdir()
    git(nested, "init", "-q")
    (nested / "x").write_text("x")
    git(nested, "add", "x")
    git(nested, "commit", "-qm", "n")
    assert snapshot_tree(repo) == reference_tree(repo)


def test_from_subdirectory_remembers_cwd(repo: Path) -> None:
    sub = repo / "src" / "models"
    sub.mkdir(parents=True)
    (sub / "net.py").write_text("net\n")
    job = tq_json(sub, "show", tq(sub, "run", "-q", "--cpu", "python", "net.py").stdout.strip())
    assert isinstance(job, dict)
    assert job["cwd"] == "src/models"
    assert git(repo, "show", f"{job['snapshot']}:src/models/net.py") == "net\n"


def test_linked_worktree(repo: Path, tmp_path: Path) -> None:
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "exp", str(wt))
    (wt / "train.py").write_text("print('exp')\n")
    before = user_state(wt)
    main_before = user_state(repo)
    job_id = tq(wt, "run", "-q", "--cpu", "python", "train.py").stdout.strip()
    assert user_state(wt) == before and user_state(repo) == main_before
    # The job is stored in the shared repository, visible from both worktrees.
    assert git(repo, "show", f"refs/tq/jobs/{job_id}:train.py") == "print('exp')\n"
    assert git(repo, "rev-parse", f"refs/tq/jobs/{job_id}^").strip() == \
        git(wt, "rev-parse", "HEAD").strip()


def test_unborn_branch_has_no_parent(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(commit=False)
    (repo / "a.py").write_text("a\n")
    before = user_state(repo)
    tree = snapshot_tree(repo)
    assert user_state(repo) == before
    assert tree == reference_tree(repo)
    assert git(repo, "rev-list", "--parents", "-n1", "refs/tq/jobs/1").split()[1:] == []
    job = tq_json(repo, "show", "1")
    assert isinstance(job, dict) and job["source"] is None


def test_bare_repository_and_outside_git_are_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    p = tq(bare, "run", "--cpu", "true", check=False)
    assert p.returncode == 1 and "bare repository" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    outside = tmp_path / "plain"
    outside.mkdir()
    p = tq(outside, "run", "--cpu", "true", check=False)
    assert p.returncode == 1 and "not a git repository" in p.stderr
    assert "Traceback" not in p.stderr


def test_snapshot_leaves_no_temp_files(repo: Path) -> None:
    (repo / "x.txt").write_text("x")
    snapshot_tree(repo)
    leftovers = [p.name for p in (repo / ".git").iterdir() if p.name.startswith("tq-index")]
    assert leftovers == []


def test_summary_counts_changed_and_new_files(repo: Path) -> None:
    (repo / "train.py").write_text("changed\n")
    (repo / "n1").write_text("1")
    (repo / "n2").write_text("2")
    (repo / "README").unlink()
    out = tq(repo, "run", "--cpu", "true").stdout
    assert "1 modified, 2 added, 1 deleted" in out
    data = tq_json(repo, "show", "1")
    assert isinstance(data, dict)
    assert data["changes"] == {"modified": 1, "added": 2, "deleted": 1}
    assert json.dumps(data)  # serialisable


@pytest.mark.parametrize("index_version", ["2", "4"])
def test_other_index_formats(repo: Path, index_version: str) -> None:
    git(repo, "update-index", "--index-version", index_version)
    (repo / "train.py").write_text("x\n")
    assert snapshot_tree(repo) == reference_tree(repo)


def test_split_index(repo: Path) -> None:
    git(repo, "update-index", "--split-index")
    (repo / "new.txt").write_text("x\n")
    before = user_state(repo)
    assert snapshot_tree(repo) == reference_tree(repo)
    assert user_state(repo) == before
