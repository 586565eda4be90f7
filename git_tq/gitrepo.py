"""The only module that talks to git: running the git CLI and locating a repository.

The git CLI is used rather than dulwich because it is faster: on the command
paths one process beats importing dulwich (~110 ms), and in the daemon, where
the import would be paid once, `git for-each-ref` and `git cat-file --batch`
still beat reading refs and commits in Python (bench/daemon_cycle.py). It also
handles every index format, filter and worktree correctly.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq.errors import GitFailed, NotARepository

# Variables that point git at a particular repository or index. A job, and the
# git commands we run on a job's behalf in another directory, must not inherit
# them (pre-commit strips the same set in git.no_git_env()).
_REPO_POINTING_VARS = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_PREFIX",
        "GIT_CEILING_DIRECTORIES",
        "GIT_DISCOVERY_ACROSS_FILESYSTEM",
        "GIT_QUARANTINE_PATH",
        "GIT_INTERNAL_SUPER_PREFIX",
    }
)


def without_repo_vars(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the variables that would point git at another repository."""
    return {k: v for k, v in env.items() if k not in _REPO_POINTING_VARS}


# What a user's identity and transport settings may keep; every other GIT_*
# variable (GIT_DIR, GIT_CONFIG*, GIT_NAMESPACE, GIT_REPLACE_REF_BASE, ...)
# changes what git reads or writes, and the daemon serves many repositories.
_GIT_VARS_KEPT = ("GIT_AUTHOR_", "GIT_COMMITTER_", "GIT_SSH", "GIT_ASKPASS",
                  "GIT_TERMINAL_PROMPT", "GIT_TRACE", "GIT_EXEC_PATH", "GIT_PAGER",
                  "GIT_EDITOR")


def clean_git_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for the daemon and every git process it runs: none of GIT_DIR,
    GIT_WORK_TREE, GIT_INDEX_FILE, GIT_OBJECT_DIRECTORY, GIT_NAMESPACE, GIT_CONFIG*
    and the like."""
    return {k: v for k, v in env.items()
            if not k.startswith("GIT_") or k.startswith(_GIT_VARS_KEPT)}


def run_git(
    args: Sequence[str],
    cwd: str,
    *,
    env: Optional[Mapping[str, str]] = None,
    input: Optional[bytes] = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run `git ARGS` in `cwd`, capturing output; raise GitFailed on failure if `check`."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        input=input,
        capture_output=True,
    )
    if check and proc.returncode != 0:
        raise GitFailed(_git_message(args, proc.stderr))
    return proc


def registered_worktree(common_dir: str, path: str) -> Optional[str]:
    """The real path of the worktree at `path` if it is a real directory (not a
    symlink) registered in `common_dir`: its `.git` file names
    `<common_dir>/worktrees/<name>`, whose `gitdir` file names `<path>/.git` back.
    None otherwise (a symlink, a foreign directory, a copied `.git` file)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
        real = os.path.realpath(path)
        dotgit = os.path.join(real, ".git")
        if not stat.S_ISREG(os.lstat(dotgit).st_mode):
            return None
        with open(dotgit, encoding="utf-8", errors="surrogateescape") as fh:
            first = fh.readline().rstrip("\n")
        if not first.startswith("gitdir: "):
            return None
        admin = os.path.join(real, first[len("gitdir: "):])  # absolute, or relative to it
        if not stat.S_ISDIR(os.lstat(admin).st_mode) or not os.path.samefile(
                os.path.dirname(os.path.normpath(admin)), os.path.join(common_dir, "worktrees")):
            return None
        with open(os.path.join(admin, "gitdir"), encoding="utf-8",
                  errors="surrogateescape") as fh:
            back = fh.readline().rstrip("\n")
        # git records the real path; a symlink anywhere on the way now changes `real`.
        if os.path.normpath(os.path.join(admin, back)) != dotgit:
            return None
        return real
    except (OSError, ValueError):
        return None


def remove_worktree(common_dir: str, path: str) -> str:
    """Remove a job's worktree at `path` without ever following a symlink; what was done.

    Only a real directory that is the worktree registered at `path` is deleted
    ("removed"; fd-relative, so nothing is followed even if it changes meanwhile).
    A symlink or other non-directory there is unlinked ("unlinked"), never
    followed; a foreign directory is left alone ("left"); "absent" if nothing is
    there. Then `git worktree prune` unregisters worktrees that are gone.
    """
    import shutil

    outcome = "absent"
    try:
        st: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        outcome = "unlinked"
    elif st is not None:
        real = registered_worktree(common_dir, path)
        if real is None:
            outcome = "left"
        else:
            # shutil.rmtree refuses a symlink and works through directory descriptors
            # (it checks that what it opened is what it looked at): it never follows links.
            shutil.rmtree(real, ignore_errors=True)
            outcome = "removed" if not os.path.lexists(real) else "left"
    run_git(["--git-dir", common_dir, "worktree", "prune"], common_dir,
            env=without_repo_vars(os.environ), check=False)
    return outcome


def _git_message(args: Sequence[str], stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    msg = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))), None)
    msg = msg or (lines[-1] if lines else "failed")
    return f"git {args[0]}: {msg}"


@dataclass(frozen=True)
class Repo:
    """A located repository: where its work tree, git dirs and index are."""

    toplevel: Optional[str]  # None for a bare repository
    git_dir: str  # this worktree's git dir
    common_dir: str  # shared by all worktrees: refs, objects, tq/logs
    prefix: str  # cwd relative to toplevel, '' at the top, '/'-separated
    index_path: str
    head: Optional[str] = None  # the commit HEAD pointed at when the repository was located
    object_format: str = "sha1"  # or "sha256"
    inside_git_dir: bool = False  # located from inside its .git directory

    @property
    def cwd(self) -> str:
        """The directory git commands run in (the work tree top, else the git dir)."""
        return self.toplevel or self.git_dir

    def git(
        self,
        *args: str,
        env: Optional[Mapping[str, str]] = None,
        input: Optional[bytes] = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        if self.toplevel is None:
            # Name the git dir: no discovery, so no "dubious ownership" refusal of a
            # repository the user's git accepts (safe.directory names its work tree).
            args = ("--git-dir", self.git_dir, *args)
        return run_git(args, self.cwd, env=env, input=input, check=check)

    def out(self, *args: str, env: Optional[Mapping[str, str]] = None) -> str:
        """stdout of a git command, decoded, trailing newline removed."""
        return self.git(*args, env=env).stdout.decode(errors="surrogateescape").rstrip("\n")

    def require_worktree(self, what: str) -> str:
        if self.toplevel is None and self.inside_git_dir:
            raise NotARepository(f"{what} needs a work tree, and this is inside the .git "
                                 "directory: run it from the work tree")
        if self.toplevel is None:
            raise NotARepository(
                f"{what} needs a work tree, and {self.git_dir} is a bare repository"
            )
        return self.toplevel

    # --- refs -------------------------------------------------------------

    def resolve_commit(self, rev: str) -> Optional[str]:
        p = self.git("rev-parse", "-q", "--verify", "--end-of-options", f"{rev}^{{commit}}",
                     check=False)
        return p.stdout.decode().strip() if p.returncode == 0 else None

    def resolve_object(self, rev: str) -> Optional[str]:
        """The object `rev` names (e.g. `TREE:path`), or None."""
        p = self.git("rev-parse", "-q", "--verify", "--end-of-options", rev, check=False)
        return p.stdout.decode().strip() if p.returncode == 0 else None

    def resolve_ref(self, ref: str) -> Optional[str]:
        """The object a full ref name points at, or None if it does not exist."""
        p = self.git("rev-parse", "-q", "--verify", "--end-of-options", ref, check=False)
        return p.stdout.decode().strip() if p.returncode == 0 else None

    def head_commit(self) -> Optional[str]:
        """The commit HEAD points at, or None on an unborn branch."""
        return self.resolve_commit("HEAD")

    def update_ref(self, ref: str, new: str, old: str, reason: str) -> bool:
        """Compare-and-swap `ref` from `old` (all zeros: must not exist) to `new`.

        Returns False when another writer got there first.
        """
        p = self.git("update-ref", "-m", reason, ref, new, old, check=False)
        if p.returncode == 0:
            return True
        err = p.stderr.decode(errors="replace")
        if "cannot lock ref" in err or "but expected" in err or "already exists" in err \
                or "unable to resolve reference" in err or "is at" in err:
            return False
        raise GitFailed(_git_message(["update-ref"], p.stderr))

    def delete_ref(self, ref: str, old: str, reason: str) -> bool:
        p = self.git("update-ref", "-m", reason, "-d", ref, old, check=False)
        return p.returncode == 0

    def config(self, pattern: str = r"^tq\.") -> dict[str, str]:
        """Settings whose names match `pattern` (repository over global over system),
        keys lowercased; one git process whatever their number."""
        p = self.git("config", "-z", "--get-regexp", pattern, check=False)
        result: dict[str, str] = {}
        for item in p.stdout.decode(errors="replace").split("\0"):
            if item:
                key, _, value = item.partition("\n")
                result[key.lower()] = value
        return result


def discover(cwd: Optional[str] = None) -> Repo:
    """Locate the repository containing `cwd` (default: the current directory)."""
    cwd = cwd or os.getcwd()
    if "\n" in cwd:
        raise NotARepository(f"the path {cwd!r} contains a newline: git tq cannot work there "
                             "(git's plumbing output is line-based); move the repository")
    p = run_git(
        ["rev-parse", "--show-object-format", "--is-inside-git-dir", "--is-bare-repository",
         "--absolute-git-dir", "--git-common-dir", "--git-path", "index", "--show-prefix",
         "--show-toplevel", "--verify", "-q", "HEAD"],
        cwd,
        check=False,
    )
    lines = p.stdout.decode(errors="surrogateescape").split("\n")
    if len(lines) < 6 or not lines[3]:
        reason = _git_message(["rev-parse"], p.stderr)[len("git rev-parse: "):]
        if "dubious ownership" in reason:
            advice = [ln.strip() for ln in p.stderr.decode(errors="replace").splitlines()
                      if "safe.directory" in ln]
            raise NotARepository(
                f"{reason[len('fatal: '):] if reason.startswith('fatal: ') else reason} "
                f"(another user owns it; if you trust it: "
                f"{advice[-1] if advice else 'git config --global --add safe.directory PATH'})")
        raise NotARepository(
            f"not a git repository: {cwd} (run git tq inside a repository, or `git init` one)"
        )
    object_format = lines[0] if lines[0] in ("sha1", "sha256") else "sha1"
    inside_git_dir = lines[1] == "true" and lines[2] != "true"  # bare: no .git to be in
    bare = lines[2] == "true"
    git_dir = lines[3]
    common = os.path.normpath(os.path.join(cwd, lines[4]))
    index = os.path.normpath(os.path.join(cwd, lines[5]))
    toplevel = None
    prefix = ""
    head = None
    # Inside a .git directory there is no work tree: rev-parse stops before the prefix.
    if not bare and not inside_git_dir and len(lines) >= 8 and lines[7]:
        prefix = lines[6].rstrip("/")
        toplevel = lines[7]
        head = lines[8] if len(lines) > 8 and len(lines[8]) >= 40 else None
    return Repo(toplevel=toplevel, git_dir=git_dir, common_dir=common, prefix=prefix,
                index_path=index, head=head, object_format=object_format,
                inside_git_dir=inside_git_dir)
