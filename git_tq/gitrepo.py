"""The only module that talks to git: running the git CLI and locating a repository.

The git CLI is used rather than dulwich on the command paths because it is
faster there (one process beats importing dulwich, ~110 ms) and it handles
every index format, filter and worktree correctly.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq.errors import GitFailed, NotARepository

ZERO_OID = "0" * 40

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
        return run_git(args, self.cwd, env=env, input=input, check=check)

    def out(self, *args: str, env: Optional[Mapping[str, str]] = None) -> str:
        """stdout of a git command, decoded, trailing newline removed."""
        return self.git(*args, env=env).stdout.decode(errors="surrogateescape").rstrip("\n")

    def require_worktree(self, what: str) -> str:
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

    def resolve_ref(self, ref: str) -> Optional[str]:
        """The object a full ref name points at, or None if it does not exist."""
        p = self.git("rev-parse", "-q", "--verify", "--end-of-options", ref, check=False)
        return p.stdout.decode().strip() if p.returncode == 0 else None

    def head_commit(self) -> Optional[str]:
        """The commit HEAD points at, or None on an unborn branch."""
        return self.resolve_commit("HEAD")

    def update_ref(self, ref: str, new: str, old: str, reason: str) -> bool:
        """Compare-and-swap `ref` from `old` (ZERO_OID: must not exist) to `new`.

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
    p = run_git(
        ["rev-parse", "--is-bare-repository", "--absolute-git-dir", "--git-common-dir",
         "--git-path", "index", "--show-prefix", "--show-toplevel", "--verify", "-q", "HEAD"],
        cwd,
        check=False,
    )
    lines = p.stdout.decode(errors="surrogateescape").split("\n")
    if len(lines) < 4 or not lines[1]:
        raise NotARepository(
            f"not a git repository: {cwd} (run git tq inside a repository, or `git init` one)"
        )
    bare = lines[0] == "true"
    git_dir = lines[1]
    common = os.path.normpath(os.path.join(cwd, lines[2]))
    index = os.path.normpath(os.path.join(cwd, lines[3]))
    toplevel = None
    prefix = ""
    head = None
    # Inside a .git directory there is no work tree: rev-parse stops before the prefix.
    if not bare and len(lines) >= 6 and lines[5]:
        prefix = lines[4].rstrip("/")
        toplevel = lines[5]
        head = lines[6] if len(lines) > 6 and len(lines[6]) >= 40 else None
    return Repo(toplevel=toplevel, git_dir=git_dir, common_dir=common, prefix=prefix,
                index_path=index, head=head)
