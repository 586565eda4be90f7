"""Every kind of repository the suite builds, and the checks it makes on each.

A builder makes a repository (and whatever it needs around it: upstreams of
submodules, an outside data folder, ...) in a temp folder and returns a Scene:
the user's work tree, the directory `git tq run` is typed in, the nested
repositories inside it, and the other work trees of the same repository.
Nothing here is mocked: real git, the real `git tq`, the real daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import git, tq, tq_json, wait_until

from repos.dump_tree import manifest

DUMP = "tq_dump.py"
DUMP_SOURCE = (Path(__file__).parent / "dump_tree.py").read_text()
HOOKS = ("post-index-change", "post-checkout", "reference-transaction")
NEVER_FIRED = ("post-index-change", "post-checkout")
# The reference computation: what the issue defines as the snapshot, with none of the
# user's hooks and no split index (neither changes the tree it writes).
REF_OPTS = ("-c", "core.hooksPath=/dev/null", "-c", "core.splitIndex=false",
            "-c", "advice.addEmbeddedRepo=false")
READ_ONLY = {"GIT_OPTIONAL_LOCKS": "0"}  # our own inspection never rewrites an index


@dataclass
class Scene:
    top: Path  # the user's work tree
    cwd: Path  # where `git tq run` is typed
    nested: list[Path] = field(default_factory=list)  # repositories inside top, outer first
    others: list[Path] = field(default_factory=list)  # other work trees that must stay put
    warns: tuple[str, ...] = ()  # each: a text one warning line of the submit contains


# --- git with bytes ---------------------------------------------------------------------


def gitb(cwd: Path | str, *args: str, env: dict[str, str] | None = None,
         input: bytes | None = None, check: bool = True) -> bytes:
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, input=input,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} in {cwd} failed: "
                             f"{p.stderr.decode(errors='replace')}")
    return p.stdout


def out(cwd: Path | str, *args: str, env: dict[str, str] | None = None) -> str:
    return os.fsdecode(gitb(cwd, *args, env={**READ_ONLY, **(env or {})})).strip()


def git_path(top: Path, what: str) -> Path:
    return Path(out(top, "rev-parse", "--path-format=absolute", "--git-path", what))


def head(top: Path) -> str | None:
    p = subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=top,
                       capture_output=True, text=True, env={**os.environ, **READ_ONLY})
    return p.stdout.strip() or None


def ls_tree(cwd: Path, tree: str) -> dict[bytes, tuple[str, str]]:
    """{path: (mode, object)} of a tree, recursively."""
    entries = {}
    for entry in gitb(cwd, "ls-tree", "-r", "-z", tree, env=READ_ONLY).split(b"\0"):
        if entry:
            meta, path = entry.split(b"\t", 1)
            mode, _, obj = meta.decode().split()
            entries[path] = (mode, obj)
    return entries


# --- files --------------------------------------------------------------------------------


def write(path: Path | bytes, data: str | bytes, mode: int | None = None) -> None:
    raw = os.fsencode(path)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(raw, mode)


def new_repo(path: Path, fmt: str, files: dict[str, str] | None = None, *,
             commit: bool = True, dump: bool = True) -> Path:
    """A repository at `path` in object format `fmt`, its files committed."""
    path.mkdir(parents=True)
    git(path, "init", "-q", f"--object-format={fmt}")
    base = {"train.py": "print('v1')\n", "README": "hello\n", "src/model.py": "W = 1\n",
            "src/old.py": "old\n", **({DUMP: DUMP_SOURCE} if dump else {}), **(files or {})}
    for name, text in base.items():
        write(path / name, text)
    if commit:
        git(path, "add", "-A")
        git(path, "commit", "-qm", "base")
    return path


def dirty(top: Path, tag: str = "") -> None:
    """Staged, unstaged, untracked and deleted changes (the files new_repo made)."""
    write(top / "train.py", f"print('v2{tag}')\n")  # unstaged
    write(top / f"staged{tag}.txt", "staged\n")
    git(top, "add", f"staged{tag}.txt")  # staged new file
    write(top / "src/model.py", "W = 2\n")
    git(top, "add", "src/model.py")
    write(top / "src/model.py", "W = 3\n")  # staged, then changed again
    write(top / f"untracked{tag}.txt", "u\n")
    write(top / "newdir/deep/u.py", "deep\n")  # untracked, in new folders
    (top / "README").unlink()  # deleted, unstaged
    git(top, "rm", "-q", "src/old.py")  # deleted, staged


def mutate(scene: Scene, delete: bool = False) -> None:
    """Change the user's tree after a submission (the job must not see it): append to
    every file (nested repositories' included, links not followed), and optionally
    delete one and add one."""
    first = None
    for dirpath, dirnames, filenames in os.walk(os.fsencode(scene.top)):
        dirnames[:] = sorted(d for d in dirnames if d != b".git"
                             and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if name == b".git" or os.path.islink(full):
                continue
            with open(full, "ab") as fh:
                fh.write(b"# changed after the submission\n")
            if first is None and name != DUMP.encode():
                first = full
    if delete and first is not None:
        os.unlink(first)
    if not delete:
        write(scene.top / "after_submission.txt", "new\n")


# --- builders ---------------------------------------------------------------------------------


def k_plain(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt)
    dirty(top)
    return Scene(top, top)


ODD_COMMITTED = [b"caf\xe9-latin1.txt", b"new\nline.txt", b"tab\there.txt",
                 b"-leading-dash.txt", b"--", "caf\u00e9-nfc.txt".encode(),
                 "cafe\u0301-nfd.txt".encode(), b" spaced .txt", b'quo"te.txt',
                 b"back\\slash.txt", b"glob*?[x].txt", b"dir with space/f.txt",
                 b"\xff\xfe dir/inner.txt"]
ODD_UNTRACKED = [b"un\xe9tracked.txt", b"un\ntracked.txt", b"-untracked", b"\t",
                 "\u00e9t\u00e9-nfc".encode(), "e\u0301te\u0301-nfd".encode(),
                 b"new \xff dir/x.txt"]


def k_odd_names(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt)
    for i, name in enumerate(ODD_COMMITTED):
        write(os.path.join(os.fsencode(top), name), f"committed {i}\n")
    git(top, "add", "-A")
    git(top, "commit", "-qm", "odd names")
    for i, name in enumerate(ODD_UNTRACKED):
        write(os.path.join(os.fsencode(top), name), f"untracked {i}\n")
    write(os.path.join(os.fsencode(top), b"new\nline.txt"), "modified\n")
    write(os.path.join(os.fsencode(top), "cafe\u0301-nfd.txt".encode()), "modified nfd\n")
    os.unlink(os.path.join(os.fsencode(top), b"tab\there.txt"))
    return Scene(top, top)


def _autocrlf(top: Path) -> None:
    """core.autocrlf=true, and the committed files checked out again with it (CRLF)."""
    git(top, "config", "core.autocrlf", "true")
    for name in git(top, "ls-files", "-z").split("\0"):
        if name:
            (top / name).unlink()
    git(top, "checkout", "--", ".")
    assert (top / "README").read_bytes() == b"hello\r\n"


def k_crlf(root: Path, fmt: str) -> Scene:
    """core.autocrlf=true with CRLF files on disk, as on a Windows-style checkout."""
    top = new_repo(root / "proj", fmt)
    _autocrlf(top)
    write(top / "win.txt", b"one\r\ntwo\r\n")
    write(top / "binary.dat", b"\x00\x01\r\n\x02\r\n")
    git(top, "add", "-A")
    git(top, "commit", "-qm", "crlf")
    write(top / "win.txt", b"one\r\ntwo\r\nthree\r\n")
    write(top / "new-win.txt", b"a\r\nb\r\n")
    return Scene(top, top)


def k_crlf_lf_on_disk(root: Path, fmt: str) -> Scene:
    """core.autocrlf=true and a new file with LF endings on disk: git stores LF and
    would write CRLF on checkout."""
    top = new_repo(root / "proj", fmt)
    _autocrlf(top)
    write(top / "unix.txt", b"lf\nonly\n")
    return Scene(top, top, warns=("LF will be replaced by CRLF",))


def k_exec_bit(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt, {"bin/tool": "#!/bin/sh\necho tool\n"})
    (top / "bin/tool").chmod(0o755)
    git(top, "add", "-A")
    git(top, "commit", "-qm", "tool")
    (top / "train.py").chmod(0o755)  # mode change, unstaged
    (top / "bin/tool").chmod(0o644)  # exec bit removed
    write(top / "run.sh", "#!/bin/sh\necho run\n", 0o755)  # untracked executable
    write(top / "staged.sh", "#!/bin/sh\necho staged\n", 0o755)
    git(top, "add", "staged.sh")
    return Scene(top, top)


def k_symlinks(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt)
    write(root / "outside-abs.txt", "absolute target\n")
    os.symlink("train.py", top / "link.py")
    os.symlink("../README", top / "src" / "readme-link")
    git(top, "add", "-A")
    git(top, "commit", "-qm", "links")
    (top / "link.py").unlink()
    os.symlink("README", top / "link.py")  # retargeted
    os.symlink("src", top / "dirlink")  # untracked link to a folder
    os.symlink("nowhere.txt", top / "dangling")
    os.symlink(str(root / "outside-abs.txt"), top / "abs-link")
    return Scene(top, top)


def k_outside_link(root: Path, fmt: str) -> Scene:
    write(root / "datasets/train.csv", "1,2,3\n")
    write(root / "datasets/sub/x.bin", b"\x00data\x01")
    top = new_repo(root / "proj", fmt)
    os.symlink("../datasets", top / "datasets")
    git(top, "add", "datasets")
    git(top, "commit", "-qm", "datasets link")
    os.symlink("../../datasets/sub", top / "src" / "sub-data")  # untracked, from a folder
    os.symlink("../datasets/train.csv", top / "train.csv")
    git(top, "add", "train.csv")  # staged file link
    return Scene(top, top)


def _lib(root: Path, fmt: str, name: str = "lib") -> Path:
    return new_repo(root / "upstream" / name, fmt,
                    {"lib.py": f"NAME = {name!r}\n", "pkg/util.py": "def f(): pass\n",
                     "pkg/other.py": "def g(): pass\n"},
                    dump=False)


def _add_submodule(top: Path, url: Path, path: str) -> None:
    git(top, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(url), path)
    git(top, "commit", "-qm", f"add {path}")


def _dirty_inner(inner: Path, tag: str) -> None:
    write(inner / "lib.py", f"NAME = 'changed in {tag}'\n")  # unstaged
    write(inner / "untracked_inner.py", f"new in {tag}\n")
    write(inner / "staged_inner.py", "staged\n")
    git(inner, "add", "staged_inner.py")
    (inner / "pkg/util.py").unlink()


def k_submodule_clean(root: Path, fmt: str) -> Scene:
    lib = _lib(root, fmt)
    top = new_repo(root / "proj", fmt)
    _add_submodule(top, lib, "lib")
    return Scene(top, top, nested=[top / "lib"])


def k_submodule_dirty(root: Path, fmt: str) -> Scene:
    scene = k_submodule_clean(root, fmt)
    _dirty_inner(scene.top / "lib", "lib")
    write(scene.top / "train.py", "print('outer changed')\n")
    return scene


def k_submodule_in_submodule(root: Path, fmt: str) -> Scene:
    deep = _lib(root, fmt, "deep")
    lib = _lib(root, fmt, "lib")
    _add_submodule(lib, deep, "deep")
    top = new_repo(root / "proj", fmt)
    _add_submodule(top, lib, "lib")
    git(top, "-c", "protocol.file.allow=always", "submodule", "update", "-q", "--init",
        "--recursive")
    _dirty_inner(top / "lib/deep", "deep")
    write(top / "lib/lib.py", "NAME = 'middle changed'\n")
    return Scene(top, top, nested=[top / "lib", top / "lib/deep"])


def k_nested_clone(root: Path, fmt: str) -> Scene:
    lib = _lib(root, fmt)
    top = new_repo(root / "proj", fmt)
    git(top, "clone", "-q", str(lib), "vendor/lib")  # embedded, never registered
    _dirty_inner(top / "vendor/lib", "clone")
    write(top / "outer-untracked.txt", "outer\n")
    return Scene(top, top, nested=[top / "vendor/lib"])


def k_nested_clone_odd_path(root: Path, fmt: str) -> Scene:
    """A dirty nested clone in a folder whose name has a space and a non-UTF-8 byte."""
    lib = _lib(root, fmt)
    top = new_repo(root / "proj", fmt)
    where = os.path.join(os.fsencode(top), b"vendor", b"odd \xe9 name")
    subprocess.run(["git", "clone", "-q", str(lib), where], check=True, capture_output=True)
    inner = Path(os.fsdecode(where))
    _dirty_inner(inner, "odd")
    return Scene(top, top, nested=[inner])


def k_outside_link_in_submodule(root: Path, fmt: str) -> Scene:
    """A submodule holding a link that leaves the whole repository."""
    write(root / "datasets/train.csv", "1,2,3\n")
    scene = k_submodule_clean(root, fmt)
    os.symlink("../../datasets", scene.top / "lib" / "data")  # untracked, in the submodule
    return scene


def k_uninitialised_submodule(root: Path, fmt: str) -> Scene:
    lib = _lib(root, fmt)
    origin = new_repo(root / "upstream" / "origin", fmt)
    _add_submodule(origin, lib, "lib")
    git(root, "clone", "-q", str(origin), "proj")  # without --recurse-submodules
    top = root / "proj"
    assert (top / "lib").is_dir() and not any((top / "lib").iterdir())
    write(top / "train.py", "print('changed')\n")
    return Scene(top, top, warns=("not checked out",))


def _sparse_base(root: Path, fmt: str) -> Path:
    top = new_repo(root / "proj", fmt, {"dir1/a.py": "a\n", "dir1/sub/b.py": "b\n",
                                        "dir2/b.py": "b2\n", "dir2/other.py": "o\n",
                                        "dir3/c.py": "c\n"})
    git(top, "sparse-checkout", "set", "--cone", "dir1")
    assert not (top / "dir2").exists()
    write(top / "dir1/a.py", "a changed\n")
    return top


def k_sparse_modified_outside(root: Path, fmt: str) -> Scene:
    top = _sparse_base(root, fmt)
    write(top / "dir2/b.py", "b2 changed outside the cone\n")
    return Scene(top, top)


def k_sparse_untracked_outside(root: Path, fmt: str) -> Scene:
    top = _sparse_base(root, fmt)
    write(top / "dir2/new.py", "new outside the cone\n")
    write(top / "dir4/n.py", "new folder outside the cone\n")
    return Scene(top, top)


def k_separate_git_dir(root: Path, fmt: str) -> Scene:
    top = root / "proj"
    root.mkdir(parents=True)
    git(root, "init", "-q", f"--object-format={fmt}", "--separate-git-dir",
        str(root / "proj.git"), str(top))
    for name, text in {"train.py": "print('v1')\n", "README": "hello\n",
                       "src/model.py": "W = 1\n", "src/old.py": "old\n",
                       DUMP: DUMP_SOURCE}.items():
        write(top / name, text)
    git(top, "add", "-A")
    git(top, "commit", "-qm", "base")
    assert (top / ".git").is_file()
    dirty(top)
    return Scene(top, top)


def k_linked_worktree(root: Path, fmt: str) -> Scene:
    main = new_repo(root / "proj", fmt)
    wt = root / "wt"
    git(main, "worktree", "add", "-q", "-b", "exp", str(wt))
    dirty(wt)
    write(main / "main-only.txt", "only in the main work tree\n")
    return Scene(wt, wt, others=[main])


def k_mid_merge(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt, {"conflict.py": "x = 1\n", "merged.py": "a\nb\nc\n"})
    git(top, "checkout", "-q", "-b", "other")
    write(top / "conflict.py", "x = 2\n")
    write(top / "merged.py", "a\nb\nc\nd\n")
    write(top / "theirs.py", "theirs\n")
    git(top, "add", "-A")
    git(top, "commit", "-qm", "other")
    git(top, "checkout", "-q", "main")
    write(top / "conflict.py", "x = 3\n")
    git(top, "commit", "-qam", "ours")
    git(top, "merge", "-q", "other", check=False)  # stops with a conflict
    assert (git_path(top, "MERGE_HEAD")).exists()
    assert git(top, "ls-files", "-u").strip()
    write(top / "untracked.txt", "u\n")
    return Scene(top, top, warns=("conflict",))


def k_split_index(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt)
    git(top, "config", "core.splitIndex", "true")
    git(top, "update-index", "--split-index")
    dirty(top)
    return Scene(top, top)


def k_index_v4(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt)
    git(top, "update-index", "--index-version", "4")
    dirty(top)
    assert git_path(top, "index").read_bytes()[4:8] == b"\0\0\0\4"
    return Scene(top, top)


def k_subdirectory(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt, {"src/models/net.py": "net = 1\n"})
    dirty(top)
    write(top / "src/models/net.py", "net = 2\n")
    write(top / "src/models/untracked_here.py", "here\n")
    return Scene(top, top / "src" / "models")


def k_unborn(root: Path, fmt: str) -> Scene:
    top = new_repo(root / "proj", fmt, commit=False)
    git(top, "add", "train.py", DUMP)  # staged; the rest untracked
    write(top / "train.py", "print('changed after staging')\n")
    assert head(top) is None
    return Scene(top, top)


KINDS: dict[str, Callable[[Path, str], Scene]] = {
    "plain": k_plain,
    "odd-names": k_odd_names,
    "crlf": k_crlf,
    "crlf-lf-on-disk": k_crlf_lf_on_disk,
    "exec-bit": k_exec_bit,
    "symlinks": k_symlinks,
    "outside-link": k_outside_link,
    "submodule-clean": k_submodule_clean,
    "submodule-dirty": k_submodule_dirty,
    "submodule-in-submodule": k_submodule_in_submodule,
    "nested-clone": k_nested_clone,
    "nested-clone-odd-path": k_nested_clone_odd_path,
    "outside-link-in-submodule": k_outside_link_in_submodule,
    "uninitialised-submodule": k_uninitialised_submodule,
    "sparse-modified-outside": k_sparse_modified_outside,
    "sparse-untracked-outside": k_sparse_untracked_outside,
    "separate-git-dir": k_separate_git_dir,
    "linked-worktree": k_linked_worktree,
    "mid-merge": k_mid_merge,
    "split-index": k_split_index,
    "index-v4": k_index_v4,
    "subdirectory": k_subdirectory,
    "unborn": k_unborn,
}
# Kinds whose files git itself normalises: the snapshot is what `git add -A` records
# (check (a) holds) but the checkout cannot give back the bytes the user had.
NOT_BYTE_EXACT = {
    "crlf-lf-on-disk": "core.autocrlf=true: git stores an LF file on disk as LF and "
                       "checks it out with CRLF (git add warns, and git tq passes the "
                       "warning on); the job and checkouts get CRLF",
}
BOTH_FORMATS = {"plain", "submodule-dirty", "nested-clone", "subdirectory", "unborn"}
PARAMS = [pytest.param(kind, fmt, id=f"{kind}-{fmt}") for kind in KINDS
          for fmt in (("sha1", "sha256") if kind in BOTH_FORMATS else ("sha1",))]


def build(kind: str, fmt: str, tmp_path: Path) -> Scene:
    return KINDS[kind](tmp_path / "k", fmt)


# --- submitting and waiting ---------------------------------------------------------------


def submit(scene: Scene, *command: str, options: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Submit a CPU job from the scene's cwd; the job id and the warning lines."""
    p = tq(scene.cwd, "run", "-q", "--cpu", *options, "--", *command)
    warnings = [ln for ln in p.stderr.splitlines() if "warning" in ln]
    return int(p.stdout.strip()), warnings


def dump_command(scene: Scene, target: Path) -> list[str]:
    """The job that writes the manifest of its worktree (the snapshot's copy of the
    script, found from the job's cwd)."""
    return ["python", os.path.relpath(scene.top / DUMP, scene.cwd), str(target)]


def job(cwd: Path, job_id: int) -> dict[str, Any]:
    data = tq_json(cwd, "show", str(job_id))
    assert isinstance(data, dict)
    return data


def wait_finished(cwd: Path, job_id: int, timeout: float = 60) -> dict[str, Any]:
    """Wait for the job to end; it must have succeeded (its log is shown if not)."""
    wait_until(lambda: job(cwd, job_id)["state"] in ("done", "failed", "cancelled"),
               timeout=timeout, interval=0.1)
    data = job(cwd, job_id)
    if data["state"] != "done":
        log = Path(data["log"]).read_text() if data["log"] and Path(data["log"]).exists() \
            else "(no log)"
        raise AssertionError(f"job {job_id} ended {data['state']}: {data['detail']}\n{log}")
    return data


# --- (a) the reference tree ---------------------------------------------------------------------


def reference_tree(top: Path, gitlinks: dict[bytes, str] | None = None) -> str:
    """`GIT_INDEX_FILE=<copy of the index, mtime kept> git add -A --sparse && git
    write-tree`, with each gitlink in `gitlinks` pointed at the given commit."""
    index = git_path(top, "index")
    copy = index.parent / f"reference-index.{os.getpid()}"
    if index.exists():
        shutil.copy2(index, copy)
    env = {"GIT_INDEX_FILE": str(copy)}
    try:
        gitb(top, *REF_OPTS, "add", "-A", "--sparse", env=env)
        for path, commit in (gitlinks or {}).items():
            gitb(top, *REF_OPTS, "update-index", "-z", "--index-info", env=env,
                 input=b"160000 " + commit.encode() + b"\t" + path + b"\0")
        return gitb(top, *REF_OPTS, "write-tree", env=env).decode().strip()
    finally:
        for leftover in (copy, Path(str(copy) + ".lock")):
            if leftover.exists():
                leftover.unlink()


def check_snapshot_tree(top: Path, tree: str, where: str = "") -> None:
    """The snapshot `tree` of the work tree `top` is what git add -A records, except
    that each gitlink to a checked-out repository names that repository's own
    snapshot: its HEAD when clean, else a new commit (parent HEAD, kept under
    refs/tq/snapshots/) whose tree is, recursively, the same kind of snapshot."""
    links: dict[bytes, str] = {}
    for path, (mode, commit) in ls_tree(top, tree).items():
        inner = Path(os.fsdecode(os.path.join(os.fsencode(top), path)))
        if mode != "160000" or not (inner / ".git").exists():
            continue
        label = f"{where}{os.fsdecode(path)}"
        inner_tree = out(inner, "rev-parse", f"{commit}^{{tree}}")
        check_snapshot_tree(inner, inner_tree, label + "/")
        inner_head = head(inner)
        if inner_head and out(inner, "rev-parse", f"{inner_head}^{{tree}}") == inner_tree:
            assert commit == inner_head, f"{label} is clean: its gitlink must be its HEAD"
        else:
            parents = out(inner, "rev-list", "--parents", "-n1", commit).split()[1:]
            assert parents == ([inner_head] if inner_head else []), \
                f"{label}'s snapshot commit must have its HEAD as parent"
            assert out(inner, "rev-parse", f"refs/tq/snapshots/{commit}") == commit, \
                f"{label}'s snapshot commit is not kept under refs/tq/snapshots/"
        links[path] = commit
    expected = reference_tree(top, links)
    assert tree == expected, (
        f"snapshot tree of {where or 'the work tree'} differs from git add -A's:\n"
        + gitb(top, "diff", "--stat", "--no-renames", expected, tree, env=READ_ONLY).decode(
            errors="replace"))


def check_warnings(scene: Scene, warnings: list[str]) -> None:
    for text in scene.warns:
        hits = [w for w in warnings if text in w]
        assert len(hits) == 1, f"expected one warning about {text!r}, got {warnings}"
    stray = [w for w in warnings if not any(t in w for t in scene.warns)]
    assert stray == [], f"unexpected warnings: {stray}"


# --- (c) the user's repository, as git and hooks see it -----------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logs(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not _ours(p.relative_to(folder).as_posix())}


def _ours(ref_path: str) -> bool:
    """git tq's own refs: the jobs, the snapshots, the logs kept in git."""
    return "refs/tq/" in ref_path + "/" or ref_path.endswith("refs/notes/tq-logs")


def repo_state(top: Path) -> dict[str, Any]:
    """What git records of a work tree, read without writing anything: index bytes,
    HEAD, refs but ours, reflogs, the git dir's files (MERGE_HEAD, config, shared
    indexes, leftovers of ours), and the files on disk."""
    gitdir = Path(out(top, "rev-parse", "--absolute-git-dir"))
    common = Path(out(top, "rev-parse", "--path-format=absolute", "--git-common-dir"))
    index = git_path(top, "index")
    refs = [ln for ln in out(top, "for-each-ref", "--format=%(refname) %(objectname)")
            .splitlines() if not _ours(ln.split()[0])]
    files = {}
    for folder in {gitdir, common}:
        for p in sorted(folder.iterdir()):
            if p.is_file() and p != index:
                files[str(p)] = _digest(p)
    return {
        "index": _digest(index) if index.exists() else None,
        "HEAD": (gitdir / "HEAD").read_text(),
        "head": head(top),
        "refs": refs,
        "stash": out(top, "stash", "list"),
        "reflogs": {**_logs(common / "logs"), **{"wt:" + k: v
                                                for k, v in _logs(gitdir / "logs").items()}},
        "gitdir-files": files,
        "work tree": manifest(top),
    }


def states(scene: Scene) -> dict[str, Any]:
    return {str(p): repo_state(p) for p in [scene.top, *scene.nested, *scene.others]}


def state_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two `states`, one readable line per difference."""
    lines = []
    for repo, old in before.items():
        new = after[repo]
        for key, value in old.items():
            if new[key] == value:
                continue
            if isinstance(value, dict):
                for sub in sorted(set(value) | set(new[key])):
                    if value.get(sub) != new[key].get(sub):
                        what = ("appeared" if sub not in value else "vanished"
                                if sub not in new[key] else "changed")
                        lines.append(f"{repo}: {key}: {sub} {what}")
            else:
                lines.append(f"{repo}: {key} changed: {value!r} -> {new[key]!r}")
    return lines


def hooks_that_must_not_fire(marks: Path) -> list[str]:
    return [f"{name} fired: {text.strip()}" for name, text in fired(marks).items()
            if name in NEVER_FIRED]


def install_hooks(repos: Iterable[Path], marks: Path) -> None:
    """post-index-change, post-checkout and reference-transaction hooks in every
    repository, each appending a line to marks/<hook>."""
    marks.mkdir(exist_ok=True)
    for repo in repos:
        hooks = git_path(repo, "hooks")
        hooks.mkdir(parents=True, exist_ok=True)
        for name in HOOKS:
            write(hooks / name, f"#!/bin/sh\necho \"$PWD $*\" >> '{marks / name}'\n", 0o755)


def fired(marks: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="backslashreplace") for p in sorted(marks.iterdir())}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
