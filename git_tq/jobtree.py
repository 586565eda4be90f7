"""A job's worktree: everything the job must see beyond `git worktree add` of its commit.

`git worktree add` gives the submission commit's files. This module adds what
the user had on disk that a plain checkout would miss, so the job sees exactly
the code on disk at submission:

- submodules and nested repositories, at the commits their snapshots made
  (uncommitted changes included), checked out as plain files;
- in a sparse checkout, every file the user had on disk outside the cone (the
  rest stays sparse);
- symlinks whose relative target leaves the repository (`data -> ../data`):
  the worktree lives elsewhere, so they get the absolute target the user's
  link resolved to; the record keeps the link as written;
- links to the source tree's ignored top-level entries (empty folders too) and
  `tq.link` paths, kept out of the job's `git status` by an excludes file of its own.

When the job has finished, `unsaved` tells whether it wrote files there that are
not ignored (or committed on its detached HEAD); such a worktree is kept, with a
record of why (`Kept`).

Every git process here runs none of the repository's hooks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq.errors import TqError
from git_tq.gitrepo import run_git, without_repo_vars
from git_tq.localjobs import LocalSpec, is_oid
from git_tq.model import Outputs

NO_HOOKS = ("-c", "core.hooksPath=/dev/null")


def _git(args: Sequence[str], cwd: str, env: Optional[Mapping[str, str]] = None,
         input: Optional[bytes] = None, check: bool = True) -> bytes:
    base = without_repo_vars(os.environ) if env is None else dict(env)
    return run_git([*NO_HOOKS, *args], cwd, env=base, input=input, check=check).stdout


def complete(common: str, path: str, spec: LocalSpec, config: Mapping[str, str]) -> None:
    """Make the checked-out worktree at `path` what the job must see."""
    checkout_nested(path, spec.nested)
    if spec.present:
        checkout_present(path, spec.present)
    absolute_outside_links(path, spec.source_dir)
    for rel, git_dir, commit in spec.nested:  # and the links of nested repositories
        absolute_outside_links(path, spec.source_dir, rel, git_dir, commit)
    link_ignored(common, path, spec.source_dir, config)


COMPLETE_MARK = "tq-complete"  # in the worktree's admin folder: the commit it holds whole


def admin_dir(path: str) -> Optional[str]:
    """The worktree's admin folder in the repository (`gitdir:` of its `.git` file)."""
    try:
        with open(os.path.join(path, ".git"), encoding="utf-8") as fh:
            line = fh.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not line.startswith("gitdir: "):
        return None
    found = line[len("gitdir: "):]
    return found if os.path.isabs(found) else os.path.normpath(os.path.join(path, found))


def mark_complete(path: str, submission: str) -> None:
    """Say that the worktree at `path` is the whole of `submission`, completed: written
    last, so a checkout or completion cut short (a killed daemon) is never taken for a
    job's worktree."""
    admin = admin_dir(path)
    if admin is not None:
        from git_tq.home import write_private_file

        write_private_file(os.path.join(admin, COMPLETE_MARK), submission.encode())


def _read(path: Optional[str], name: str) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(os.path.join(path, name), encoding="ascii") as fh:
            return fh.read(200).strip()
    except (OSError, UnicodeDecodeError):
        return None


def completed(path: str) -> Optional[str]:
    """The commit the worktree at `path` was marked a complete checkout of (None: no mark,
    a checkout cut short or one made by an older git tq)."""
    return _read(admin_dir(path), COMPLETE_MARK)


def head(path: str) -> Optional[str]:
    """The worktree's HEAD as its admin folder holds it (an object id when detached)."""
    return _read(admin_dir(path), "HEAD")


def checkout_nested(path: str, nested: Sequence[tuple[str, str, str]]) -> None:
    """Write each nested repository's snapshot into its folder, outer ones first."""
    for rel, git_dir, commit in nested:
        target = os.path.join(path, rel)
        real_root = os.path.realpath(path)
        if os.path.commonpath([os.path.realpath(target), real_root]) != real_root:
            raise TqError(f"the nested repository {rel} would land outside the worktree")
        os.makedirs(target, exist_ok=True)
        index = os.path.join(os.path.dirname(path), f".tq-nested.{os.getpid()}."
                                                   f"{os.urandom(4).hex()}")
        env = {**without_repo_vars(os.environ), "GIT_INDEX_FILE": index}
        try:
            p = run_git([*NO_HOOKS, "--git-dir", git_dir, "--work-tree", target, "read-tree",
                         "--end-of-options", commit], target, env=env, check=False)
            if p.returncode != 0:
                raise TqError(f"the nested repository {rel} lacks its snapshot commit "
                              f"{commit[:12]} (was {git_dir} moved or cleaned?)")
            _git(["--git-dir", git_dir, "--work-tree", target, "checkout-index", "-a", "-f"],
                 target, env=env)
        finally:
            for leftover in (index, index + ".lock"):
                if os.path.exists(leftover):
                    os.unlink(leftover)


def checkout_present(path: str, present: Sequence[str]) -> None:
    """Check out the files the user had on disk that the worktree's sparsity leaves out."""
    listing = _git(["ls-files", "-t", "-z"], path).decode(errors="surrogateescape")
    wanted = set(present)
    missing = [e[2:] for e in listing.split("\0") if e.startswith("S ") and e[2:] in wanted]
    if not missing:
        return
    data = "".join(f"{m}\0" for m in missing).encode(errors="surrogateescape")
    _git(["update-index", "--no-skip-worktree", "-z", "--stdin"], path, input=data)
    _git(["checkout-index", "-f", "-z", "--stdin"], path, input=data)


def outside_links(git_dir_args: Sequence[str], cwd: str, commit: str,
                  prefix: str = "") -> list[tuple[str, str]]:
    """(path, target as written) of every symlink in `commit` whose relative target
    leaves the repository."""
    listing = run_git([*git_dir_args, "ls-tree", "-r", "-z", "--end-of-options", commit], cwd,
                      env=without_repo_vars(os.environ)).stdout.decode(errors="surrogateescape")
    links = []
    for entry in listing.split("\0"):
        if entry.startswith("120000 "):
            meta, rel = entry.split("\t", 1)
            links.append((rel, meta.split()[2]))
    if not links:
        return []
    batch = run_git([*git_dir_args, "cat-file", "--batch"], cwd, env=without_repo_vars(
        os.environ), input="".join(f"{blob}\n" for _, blob in links).encode()).stdout
    found = []
    pos = 0
    for rel, _ in links:
        header_end = batch.index(b"\n", pos)
        size = int(batch[pos:header_end].split()[2])
        target = batch[header_end + 1: header_end + 1 + size].decode(errors="surrogateescape")
        pos = header_end + 1 + size + 1
        if os.path.isabs(target):
            continue
        resolved = os.path.normpath(os.path.join(prefix, os.path.dirname(rel), target))
        if resolved == ".." or resolved.startswith("../"):
            found.append((rel, target))
    return found


def absolute_outside_links(path: str, source_dir: str, prefix: str = "",
                           git_dir: str = "", commit: str = "HEAD") -> None:
    """Point each link that leaves the repository where the user's link pointed (with
    `prefix`: those of the nested repository there, leaving the outer one)."""
    if not source_dir:
        return
    args = ["--git-dir", git_dir] if git_dir else []
    found = outside_links(args, path, commit, os.path.normpath(prefix) if prefix else "")
    for rel, target in found:
        rel = os.path.join(prefix, rel) if prefix else rel
        link = os.path.join(path, rel)
        if not os.path.islink(link):
            continue
        os.unlink(link)
        os.symlink(os.path.normpath(os.path.join(source_dir, os.path.dirname(rel), target)),
                   link)
        # The job's `git status` should not report the rewritten link as modified.
        if not prefix:  # nested files are not in the outer index
            _git(["update-index", "--assume-unchanged", "--", rel], path, check=False)


def link_ignored(common: str, path: str, source: str, config: Mapping[str, str]) -> list[str]:
    """Symlink the source tree's top-level ignored entries (data, checkpoints, .env)
    and every `tq.link` path into the job's worktree; the names linked."""
    if not source or not os.path.isdir(source):
        return []
    names: list[str] = []
    if config.get("tq.linkignored", "true").lower() not in ("false", "no", "0"):
        # Empty ignored folders too (a `results/` the job is to fill): git lists an
        # ignored folder as `name/` whether or not it holds anything.
        out = _git(["ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
                   source, check=False)
        for line in out.decode(errors="replace").splitlines():
            top = line.rstrip("/")
            if top and "/" not in top:
                names.append(top)
    # Every tq.link value, one per line (gitrepo.REPEATABLE): read with the settings.
    names += [n.strip().strip("/") for n in config.get("tq.link", "").split("\n") if n.strip()]
    linked = []
    for name in names:
        src, dst = os.path.join(source, name), os.path.join(path, name)
        if os.path.realpath(src).startswith(os.path.realpath(source) + os.sep) and \
                os.path.lexists(src) and not os.path.lexists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(src, dst)
            linked.append(name)
    if linked:
        write_excludes(path, source, linked)
    return linked


def excludes_file(path: str) -> Optional[str]:
    """The job's own excludes file, in its worktree's admin folder (gone with it)."""
    try:
        with open(os.path.join(path, ".git"), encoding="utf-8") as fh:
            first = fh.readline().strip()
    except OSError:
        return None
    if not first.startswith("gitdir: "):
        return None
    admin = os.path.join(path, first[len("gitdir: "):])
    return os.path.join(admin, "tq-exclude")


def write_excludes(path: str, source: str, linked: Sequence[str]) -> None:
    """An excludes file for the job's git: the user's own global excludes, plus the
    links we placed (a `data/` pattern does not match a symlink named `data`).
    Per-worktree excludes do not exist in git (info/exclude is shared), so the job
    gets it through its environment (see `job_git_config`)."""
    target = excludes_file(path)
    if target is None:
        return
    own = _git(["config", "--path", "core.excludesFile"], source, check=False).decode().strip()
    if not own:
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        own = os.path.join(xdg, "git", "ignore")
    try:
        with open(own, encoding="utf-8", errors="surrogateescape") as fh:
            base = fh.read()
    except OSError:
        base = ""
    text = base + ("\n" if base and not base.endswith("\n") else "") + \
        "# git tq: links to the source tree's ignored paths\n" + \
        "".join(f"/{name}\n" for name in linked)
    with open(target, "w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(text)


def job_git_config(path: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment entries that make git in the job use its excludes file, appended to
    any GIT_CONFIG_COUNT settings the job already has."""
    target = excludes_file(path)
    if target is None or not os.path.exists(target):
        return {}
    try:
        count = int(environ.get("GIT_CONFIG_COUNT", "0"))
    except ValueError:
        count = 0
    return {"GIT_CONFIG_COUNT": str(count + 1), f"GIT_CONFIG_KEY_{count}": "core.excludesFile",
            f"GIT_CONFIG_VALUE_{count}": target}


# --- what a finished job leaves in its worktree ------------------------------------------

KEPT_LISTED = 20  # files named in a kept worktree's record (the count is exact)


@dataclass(frozen=True)
class Unsaved:
    """What removing a finished job's worktree would lose."""

    files: list[str]  # changed or created, not ignored
    head: Optional[str] = None  # a detached HEAD the job moved (its commits)
    error: Optional[str] = None  # git status failed: what it holds cannot be told


def unsaved(path: str, submission: str = "") -> Unsaved:
    """The files a job changed or created in its worktree that are not ignored (by the
    repository's rules, the user's excludes, or as links git tq placed), from `git
    status`; and its detached HEAD if the job moved it off `submission` (commits made
    there are held by nothing else).

    A file the job only deleted is not listed: keeping the worktree would save nothing.
    Files inside nested repositories' folders are not seen (git does not look there).
    """
    args = [*NO_HOOKS, "-c", "core.fsmonitor=false"]
    excludes = excludes_file(path)
    if excludes is not None and os.path.exists(excludes):
        args += ["-c", f"core.excludesFile={excludes}"]
    p = run_git([*args, "--no-optional-locks", "status", "--porcelain=v2", "--branch", "-z",
                 "--untracked-files=all"], path, env=without_repo_vars(os.environ), check=False)
    if p.returncode != 0:
        lines = p.stderr.decode(errors="replace").strip().splitlines()
        return Unsaved([], error="git status failed: "
                       + (lines[-1] if lines else f"exit {p.returncode}"))
    entries = p.stdout.decode(errors="surrogateescape").split("\0")
    files: list[str] = []
    oid = detached = None
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        kind = entry[:2]
        if entry.startswith("# branch.oid "):
            oid = entry[len("# branch.oid "):]
        elif entry == "# branch.head (detached)":
            detached = True
        elif kind == "? ":
            files.append(entry[2:])
        elif kind in ("1 ", "2 ", "u "):
            fields = entry.split(" ", {"1 ": 8, "2 ": 9, "u ": 10}[kind])
            if kind == "2 ":
                i += 1  # a staged rename or copy: its source path follows
            if len(fields) > 2 and fields[1].replace("D", ".") != "..":
                files.append(fields[-1])
    moved = oid if detached and submission and oid and oid != submission else None
    # Python's bytecode caches are rebuilt from the code: never worth keeping a worktree.
    files = [f for f in files
             if "__pycache__" not in f.split("/") and not f.endswith((".pyc", ".pyo"))]
    return Unsaved(files, moved)


@dataclass(frozen=True)
class Kept:
    """A finished job's worktree kept because removing it would lose what the job wrote."""

    path: str
    submission: str  # the job's submission commit: which job (ids can be reused)
    count: int
    files: tuple[str, ...]  # the first KEPT_LISTED of them
    error: Optional[str] = None  # what the job wrote could not be told
    head: Optional[str] = None  # the detached HEAD the job committed on
    # The files are outputs the job's record names as not recorded in git (over the
    # tq.outputs limits); otherwise they were not recorded at all (older records).
    over_limits: bool = False

    @property
    def reason(self) -> str:
        if self.error:
            return f"kept: what the job wrote could not be checked ({self.error})"
        n = self.count
        names = ", ".join(self.files[:3]) + (", ..." if n > 3 else "")
        if self.over_limits:
            parts = [f"{n} output{'s' if n != 1 else ''} over the tq.outputs limits "
                     f"{'were' if n != 1 else 'was'} not recorded in git"
                     + (f": {names}" if self.files else "")] if n else []
        else:
            parts = [f"the job wrote {n} file{'s' if n != 1 else ''} that "
                     f"{'are' if n != 1 else 'is'} not ignored: {names}"] if n else []
        if self.head:
            parts.append(f"it moved the worktree's detached HEAD to {self.head[:12]} "
                         "(commits nothing else holds)")
        return "kept: " + "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "submission": self.submission, "count": self.count,
                "files": list(self.files), "error": self.error, "head": self.head,
                "over_limits": self.over_limits}


def kept_record(home: str, key: str, job_id: int) -> str:
    """`<tq home>/kept/<repo key>/<id>.json`: why a job's worktree was kept."""
    return os.path.join(home, "kept", key, f"{job_id}.json")


def keep(home: str, key: str, job_id: int, kept: Kept) -> None:
    """Record (atomically, privately) that a job's worktree is kept and why."""
    import json

    from git_tq.home import ensure_private_dir, write_private_file

    record = kept_record(home, key, job_id)
    ensure_private_dir(os.path.dirname(record))
    write_private_file(record, json.dumps(kept.to_json()).encode())


def read_kept(home: str, key: str, job_id: int) -> Optional[Kept]:
    """The kept-worktree record of a job, or None (none, or unreadable)."""
    import json

    try:
        with open(kept_record(home, key, job_id), encoding="utf-8") as fh:
            data = json.load(fh)
        files = data["files"]
        error, head = data.get("error"), data.get("head")
        kept = Kept(data["path"], data["submission"], data["count"], tuple(files), error,
                    head, data.get("over_limits") is True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(kept.path, str) and isinstance(kept.submission, str)
            and isinstance(kept.count, int) and all(isinstance(f, str) for f in files)
            and all(v is None or isinstance(v, str) for v in (error, head))):
        return None
    return kept


def unkeep(home: str, key: str, job_id: int) -> None:
    import contextlib

    with contextlib.suppress(FileNotFoundError):
        os.unlink(kept_record(home, key, job_id))


def check_kept(path: str, submission: str, recorded: Optional[Outputs] = None) \
        -> Optional[Kept]:
    """A Kept for the worktree at `path` if removing it would lose what its job wrote
    (or if that cannot be told); None when removing it loses nothing.

    `recorded`: what the job's last ending recorded of its outputs. Those in git are
    safe; the ones it left out (over the limits) keep the worktree."""
    if recorded is not None and recorded.error is None:
        # What the job wrote is in git, as its supervisor's `git status` found it once the
        # job was gone: only a HEAD moved off the submission (commits held by nothing
        # else) is left to look for, and the admin folder's HEAD file says it.
        now = head(path)
        moved = now if now and is_oid(now) and submission and now != submission else None
        if not recorded.skipped_count and moved is None:
            return None
        return Kept(path, submission, recorded.skipped_count,
                    tuple(p for p, _, _ in recorded.skipped), None, moved, True)
    found = unsaved(path, submission)
    if not found.files and found.head is None and found.error is None:
        return None
    return Kept(path, submission, len(found.files), tuple(found.files[:KEPT_LISTED]),
                found.error, found.head)
