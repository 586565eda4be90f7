"""Snapshots: the exact code state of a work tree, as a git tree, without touching it.

The tree is what `GIT_INDEX_FILE=<copy of the index> git add -A && git
write-tree` gives: HEAD plus staged, unstaged and untracked-but-not-ignored
files. Working on a copy of the index keeps the user's index, work tree, stash
and refs untouched, and keeps the index's stat data, so unchanged files are
not read again: the cost grows with the number of changed files.
"""

from __future__ import annotations

import _thread
import os
import sys

from git_tq.errors import TqError
from git_tq.gitrepo import FrozenValue, GitProcess, Located, Locating, Repo, discover

TYPE_CHECKING = False  # (typing.TYPE_CHECKING: typing costs ~5 ms to import)
if TYPE_CHECKING:
    import re
    from collections.abc import Mapping
    from typing import Optional

    from git_tq.model import ChangeSummary

# `git tq run` imports this module before its first git process (entry.py): nothing
# heavy at import (no threading, subprocess, dataclasses, re or the record model).

EMPTY_TREES = {  # the empty tree of each object format, by the length of its ids
    40: "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
    64: "6ef19b41225c5369f1c104d45d8d85efa9b057b53b14b4b9b939dd74decc5321",
}


def empty_tree(like: str) -> str:
    """The empty tree in the object format of the object id `like`."""
    return EMPTY_TREES[len(like)]


class NestedSnapshot(FrozenValue):
    """A submodule or nested repository captured with the job: the commit (in that
    repository) whose tree is its content on disk, uncommitted changes included."""

    __slots__ = ("path", "git_dir", "commit")
    path: str  # relative to the outer repository's top level, '/'-separated
    git_dir: str  # the nested repository's common git dir, which holds the commit
    commit: str

    def __init__(self, path: str, git_dir: str, commit: str) -> None:
        self._set(path=path, git_dir=git_dir, commit=commit)


class Snapshot(FrozenValue):
    __slots__ = ("tree", "source", "changes", "warnings", "nested", "outside_cone")
    tree: str
    source: Optional[str]  # HEAD's commit, None on an unborn branch
    changes: ChangeSummary  # against the source commit
    warnings: tuple[str, ...]  # one line each, for the user
    nested: tuple[NestedSnapshot, ...]  # submodules and nested repositories, outer first
    outside_cone: tuple[str, ...]  # files on disk outside a sparse checkout's cone

    def __init__(self, tree: str, source: Optional[str], changes: ChangeSummary,
                 warnings: tuple[str, ...] = (), nested: tuple[NestedSnapshot, ...] = (),
                 outside_cone: tuple[str, ...] = ()) -> None:
        self._set(tree=tree, source=source, changes=changes, warnings=warnings, nested=nested,
                  outside_cone=outside_cone)


class _HeadStart:
    """Discovery, settings and snapshot computed in a background thread while the CLI
    is still importing.

    A raw `_thread` (threading costs milliseconds to import) with locks as completion
    flags, which a Ctrl-C cannot leave half-set (CPython gh-90882 for Thread.join).
    It is not joined by the interpreter at exit, so `abandon` is registered with
    atexit: every exit waits for it to remove its temporary index.
    """

    def __init__(self, locating: Locating) -> None:
        self.cwd = locating.cwd
        self.locating = locating  # its git processes already run
        self.located: Optional[Located] = None
        self.result: Optional[Snapshot] = None
        self.error: Optional[BaseException] = None
        self.found = _thread.allocate_lock()  # held until discovery is over
        self.running = _thread.allocate_lock()  # held until everything is over
        self.found.acquire()
        self.running.acquire()
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            try:
                self.located = self.locating.finish()
            finally:
                self.found.release()
            if self.located.repo.toplevel is not None:
                self.result = _compute(self.located.repo, sparse=self.located.sparse)
        except BaseException as exc:  # handed to whoever collects it
            self.error = exc
        finally:
            self.running.release()

    def wait(self, lock: _thread.LockType, timeout: float = -1) -> bool:
        if not lock.acquire(timeout=timeout):
            return False
        lock.release()
        return True

    def join(self) -> Snapshot:
        self.wait(self.running)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


_head_start: Optional[_HeadStart] = None
_SWITCH_INTERVAL = 0.0005  # while a head start runs (Python's default is 0.005 s)


def start_early(cwd: Optional[str] = None) -> None:
    """Begin locating the repository at `cwd`, reading its settings and snapshotting
    its work tree now, in the background.

    `git tq run` calls this before importing click and the service layers, so
    git's work overlaps Python's. `located` hands the discovery to the command's
    context (no second rev-parse or config), the next `take_snapshot` of the same
    repository collects the snapshot. Failures are left for the command itself to
    find and report. While it runs, the main thread gives up the interpreter lock
    after 0.5 ms instead of 5 when this thread wants it back to start the next git
    process.
    """
    global _head_start
    import atexit

    try:
        locating = Locating(cwd or os.getcwd())  # the first git processes start here
    except (TqError, OSError):
        return
    _head_start = _HeadStart(locating)
    sys.setswitchinterval(_SWITCH_INTERVAL)
    atexit.register(abandon)


def located(cwd: Optional[str] = None) -> Optional[Located]:
    """The head start's discovery and settings if it located the repository at `cwd`
    (default: the current directory); None when there was none or it failed (the
    caller then locates it itself and reports the failure)."""
    early = _head_start
    if early is None or early.cwd != (cwd or os.getcwd()):
        return None
    early.wait(early.found)  # one rev-parse and one config: milliseconds
    return early.located


def abandon() -> None:
    """On Ctrl-C or exit: let a head start finish and remove its temporary index (its
    git processes got the same SIGINT), rather than exit while it still writes one."""
    global _head_start
    early, _head_start = _head_start, None
    if early is None:
        return
    _done()
    while True:
        try:
            if early.wait(early.running, timeout=30):
                return
        except KeyboardInterrupt:
            continue  # a second Ctrl-C: still let it clean up


def _done() -> None:
    sys.setswitchinterval(0.005)


def take_snapshot(repo: Repo, sparse: Optional[bool] = None) -> Snapshot:
    """The snapshot of `repo`'s work tree (collecting a head start if one was made).
    `sparse`: whether core.sparseCheckout is on, if the caller knows."""
    global _head_start
    early = _head_start
    if early is not None:
        if early.located is not None and early.located.repo == repo:
            snap = early.join()  # still findable by abandon() if Ctrl-C comes meanwhile
            _head_start = None
            _done()
            return snap
        early.wait(early.running)  # a different repository: discard it
        _head_start = None
        _done()
    return _compute(repo, sparse=sparse)


# Internal plumbing runs none of the repository's hooks (post-index-change would fire
# on our temporary index) and never splits our temporary index (each split write
# leaves a new .git/sharedindex.* behind).
PLUMBING = ("-c", "core.hooksPath=/dev/null", "-c", "core.splitIndex=false",
            "-c", "advice.addEmbeddedRepo=false")
SNAPSHOT_REFS = "refs/tq/snapshots/"
MAX_DEPTH = 8


def _sweep_leftovers(folder: str) -> None:
    """Remove temporary indexes that a killed `git tq` left behind (its pid is gone):
    Ctrl-C in the wrong millisecond can end the process while a git it started still
    writes one."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith("tq-index.")]
    except OSError:
        return
    for name in names:
        pid = name.split(".")[1]
        if not (pid.isascii() and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running: its own
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:  # noqa: SIM105 - contextlib is not imported on the submit path
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def _compute(repo: Repo, depth: int = 0, sparse: Optional[bool] = None) -> Snapshot:
    toplevel = repo.require_worktree("taking a snapshot")
    source = repo.head
    _sweep_leftovers(os.path.dirname(repo.index_path))
    tmp_index = os.path.join(
        os.path.dirname(repo.index_path), f"tq-index.{os.getpid()}.{os.urandom(4).hex()}"
    )
    env = dict(os.environ, GIT_INDEX_FILE=tmp_index)
    warnings: list[str] = []
    nested: list[NestedSnapshot] = []
    try:
        try:
            _copy_index(repo.index_path, tmp_index)
        except PermissionError:
            raise TqError(f"cannot write in {os.path.dirname(repo.index_path)}: permission "
                          "denied (git tq needs write access to the repository)") from None
        # Conflicts are listed from the user's index (the same entries as the copy's)
        # while git add works on the copy, not before it.
        listing = GitProcess(["ls-files", "-u", "-z"], toplevel,
                             env=dict(os.environ, GIT_INDEX_FILE=repo.index_path))
        try:
            p = repo.git(*PLUMBING, "add", "-A", "--sparse", env=env, check=False)
        finally:
            unmerged = _unmerged(listing)
        if p.returncode != 0:
            raise TqError("snapshot failed: git add: " + _first_problem(p.stderr))
        warnings += _git_warnings(p.stderr)
        if unmerged:
            shown = ", ".join(unmerged[:3]) + (f" and {len(unmerged) - 3} more"
                                               if len(unmerged) > 3 else "")
            warnings.append(f"{len(unmerged)} file{'s have' if len(unmerged) > 1 else ' has'} "
                            f"unresolved merge conflicts ({shown}): the job gets "
                            f"{'them' if len(unmerged) > 1 else 'it'} with the conflict markers")
        gitlinks = _gitlinks(repo, env) if _may_hold_gitlinks(tmp_index) else []
        for path, recorded in gitlinks:
            captured = _capture_nested(repo, toplevel, path, recorded, depth, warnings)
            if captured is None:
                continue
            inner_commit, inner_nested = captured
            nested.append(NestedSnapshot(path, inner_nested[0], inner_commit))
            nested.extend(NestedSnapshot(f"{path}/{n.path}", n.git_dir, n.commit)
                          for n in inner_nested[1])
            if inner_commit != recorded:
                repo.git(*PLUMBING, "update-index", "--cacheinfo",
                         f"160000,{inner_commit},{path}", env=env)
        outside = _outside_cone(repo, env, sparse)
        tree = repo.out(*PLUMBING, "write-tree", env=env)
    finally:
        for path in (tmp_index, tmp_index + ".lock"):
            if os.path.exists(path):
                os.unlink(path)
    return Snapshot(tree, source, changes_between(repo, source, tree), tuple(warnings),
                    tuple(nested), outside)


def _copy_index(index: str, copy: str) -> None:
    """Copy the index with its modification time: git compares each file's mtime with
    the index's to spot "racily clean" entries (a file changed in the same second as
    the index was written). A copy with a new mtime would hide such an edit, and the
    job would run the old content."""
    try:
        st = os.stat(index)
    except FileNotFoundError:
        return
    # A plain copy (shutil costs ~8 ms to import on the submit path).
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(index, "rb") as src, os.fdopen(fd, "wb") as dst:
        dst.write(src.read())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))


def _first_problem(stderr: bytes) -> str:
    """git's own reason (its first error line, which names the path, else its fatal
    line), not its last hint."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    for prefix in ("error:", "fatal:"):
        for ln in lines:
            if ln.startswith(prefix):
                return ln
    return lines[0] if lines else "failed"


def _git_warnings(stderr: bytes) -> list[str]:
    """git's warnings (a failed clean filter, CRLF conversion, ...): one line each, and
    one line for a warning that git repeats for many files."""
    seen: list[str] = []
    per_file: dict[str, list[str]] = {}
    for ln in stderr.decode(errors="replace").splitlines():
        ln = ln.strip()
        if not ln.startswith(("warning:", "error:")) or "embedded git repository" in ln:
            continue
        kind, _, text = ln.partition(": ")
        m = _per_file().match(text)
        if m:
            per_file.setdefault(m.group(2), []).append(m.group(1))
            continue
        text = f"git: {text}" if kind == "warning" else f"git: {ln}"
        if text not in seen:
            seen.append(text)
    for what, files in per_file.items():
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        seen.append(f"git: {what} ({len(files)} file{'s' if len(files) > 1 else ''}: {shown})")
    return seen


def _per_file() -> re.Pattern[str]:
    import re

    return re.compile(r"in the working copy of '(.*)', (.*)")  # (re caches it)


def _unmerged(listing: GitProcess) -> list[str]:
    out = listing.wait().stdout.decode(errors="surrogateescape")
    paths = []
    for entry in out.split("\0"):
        if "\t" in entry:
            path = entry.split("\t", 1)[1]
            if path not in paths:
                paths.append(path)
    return paths


def _may_hold_gitlinks(index: str) -> bool:
    """False when the index file certainly records no gitlink, so that `git ls-files
    -s` (every entry: 10 ms on 20,000 files) is run only where there may be one.

    Every index entry stores its mode as 4 big-endian bytes at a fixed place in the
    entry (index versions 2 to 4, either object format), and a gitlink's mode
    0160000 is 00 00 e0 00: a file without those bytes has none. Other bytes can
    match too (that only costs the listing). A split index (its `link` extension:
    entries live in the shared index) or a sparse index (`sdir`: a folder entry
    stands for the entries under it) is always listed.
    """
    try:
        with open(index, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return False
    return b"\x00\x00\xe0\x00" in data or b"link" in data or b"sdir" in data


def _gitlinks(repo: Repo, env: dict[str, str]) -> list[tuple[str, str]]:
    """(path, commit) of every submodule and nested repository in the index."""
    out = repo.git("ls-files", "-s", "-z", env=env).stdout.decode(errors="surrogateescape")
    links = []
    for entry in out.split("\0"):
        if entry.startswith("160000 "):
            meta, path = entry.split("\t", 1)
            links.append((path, meta.split()[1]))
    return links


def _capture_nested(repo: Repo, toplevel: str, path: str, recorded: str, depth: int,
                    warnings: list[str]) -> Optional[tuple[str, tuple[str, tuple[
                        NestedSnapshot, ...]]]]:
    """Snapshot the repository at `path` (a gitlink) as a commit of its own; None (with a
    warning) when nothing is checked out there."""
    inner_dir = os.path.join(toplevel, path)
    if not os.path.lexists(os.path.join(inner_dir, ".git")):
        if os.path.isdir(inner_dir) and os.listdir(inner_dir):
            warnings.append(f"{path} is a submodule with files but no repository: the job "
                            f"gets its recorded commit's folder empty")
        else:
            warnings.append(f"submodule {path} is not checked out: the job gets it empty, "
                            "as you have it")
        return None
    if depth >= MAX_DEPTH:
        raise TqError(f"submodules nested more than {MAX_DEPTH} deep at {path}: refusing")
    try:
        inner = discover(inner_dir)
    except TqError as exc:
        raise TqError(f"cannot snapshot the nested repository {path}: {exc}") from None
    if inner.toplevel is None or os.path.realpath(inner.toplevel) != os.path.realpath(inner_dir):
        raise TqError(f"cannot snapshot the nested repository {path}: it is not a work tree")
    snap = _compute(inner, depth + 1)
    warnings.extend(f"in {path}: {w}" for w in snap.warnings)
    head_tree = inner.out("rev-parse", f"{inner.head}^{{tree}}") if inner.head else None
    if inner.head and head_tree == snap.tree:
        commit = inner.head
    else:
        args = ["commit-tree", snap.tree] + (["-p", inner.head] if inner.head else [])
        commit = inner.git(*args, env=_identity(os.environ), input=(
            f"tq snapshot of {path}: its work tree when a job was submitted\n").encode(
            errors="surrogateescape")) \
            .stdout.decode().strip()
    # Keep the commit reachable in its own repository (gc must not take it from the job).
    inner.git("update-ref", f"{SNAPSHOT_REFS}{commit}", commit)
    return commit, (inner.common_dir, snap.nested)


def _identity(base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", env.get("GIT_AUTHOR_NAME", "git-tq"))
        env.setdefault(f"GIT_{role}_EMAIL", env.get("GIT_AUTHOR_EMAIL", "git-tq@localhost"))
    return env


def _outside_cone(repo: Repo, env: dict[str, str], sparse: Optional[bool]) -> tuple[str, ...]:
    """In a sparse checkout: every file the user has on disk (git clears the
    skip-worktree bit of files present on disk). The job's worktree starts with
    the same sparsity; the daemon checks out those of them it leaves out, so the
    job sees every file the user had, and the rest stays sparse. `sparse`: whether
    core.sparseCheckout is on (None: ask git)."""
    if sparse is None:
        p = repo.git("config", "--bool", "core.sparseCheckout", check=False)
        sparse = p.stdout.decode().strip() == "true"
    if not sparse:
        return ()
    out = repo.git("ls-files", "-t", "-z", env=env).stdout.decode(errors="surrogateescape")
    return tuple(e[2:] for e in out.split("\0") if e and not e.startswith("S "))


def changes_between(repo: Repo, source: Optional[str], tree: str) -> ChangeSummary:
    """Counts of files modified, added and deleted from `source` to `tree`."""
    base = f"{source}^{{tree}}" if source else empty_tree(tree)
    out = repo.out("diff-tree", "-r", "--no-renames", "--name-status", "-z", base, tree)
    counts = {"M": 0, "A": 0, "D": 0}
    items = out.split("\0")
    for status in items[0::2]:
        if status:
            key = status[0] if status[0] in counts else "M"
            counts[key] += 1
    from git_tq.model import ChangeSummary  # after git's work: a head start imports it last

    return ChangeSummary(counts["M"], counts["A"], counts["D"])


def nested_in_tree(repo: Repo, tree: str, toplevel: str,
                   prefix: str = "") -> tuple[tuple[str, str, str], ...]:
    """The gitlinks of a snapshot tree whose commits the repositories on disk at those
    paths hold: (path, git dir, commit), outer first. For running an old snapshot
    again (requeue) and for bringing one back (checkout)."""
    out = repo.git("ls-tree", "-r", "-z", "--end-of-options", tree).stdout.decode(
        errors="surrogateescape")
    found: list[tuple[str, str, str]] = []
    for entry in out.split("\0"):
        if not entry.startswith("160000 "):
            continue
        meta, path = entry.split("\t", 1)
        commit = meta.split()[2]
        where = os.path.join(toplevel, path)
        if not os.path.lexists(os.path.join(where, ".git")):
            continue
        try:
            inner = discover(where)
        except TqError:
            continue
        if inner.resolve_commit(commit) != commit:
            continue
        found.append((prefix + path, inner.common_dir, commit))
        sub_tree = inner.out("rev-parse", f"{commit}^{{tree}}")
        found.extend(nested_in_tree(inner, sub_tree, where, f"{prefix}{path}/"))
    return tuple(found)
