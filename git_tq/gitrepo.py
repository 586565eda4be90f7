"""The only module that talks to git: running the git CLI and locating a repository.

The git CLI is used rather than dulwich because it is faster: on the command
paths one process beats importing dulwich (~110 ms), and in the daemon, where
the import would be paid once, `git for-each-ref` and `git cat-file --batch`
still beat reading refs and commits in Python (bench/daemon_cycle.py). It also
handles every index format, filter and worktree correctly.
"""

from __future__ import annotations

import os
import stat

from git_tq.errors import GitFailed, NoSpace, NotARepository

TYPE_CHECKING = False  # (typing.TYPE_CHECKING: typing costs ~5 ms to import)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, Optional

# `git tq run` starts its snapshot's first git process before anything heavy is
# imported (see entry.py): this module imports no subprocess, threading, dataclasses
# or typing at run time, and runs git with os.posix_spawn.

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


class GitResult:
    """A finished git process: its arguments, exit status and output (the fields of
    subprocess.CompletedProcess)."""

    __slots__ = ("args", "returncode", "stdout", "stderr")

    def __init__(self, args: list[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.args = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def _pipe() -> tuple[int, int]:
    """A pipe whose ends are not 0, 1 or 2 (a closed stdin/stdout would hand those out,
    and a child's dup2 onto the same number would keep it close-on-exec)."""
    r, w = os.pipe()
    if r > 2 and w > 2:
        return r, w
    import fcntl

    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (r, w)]
    os.close(r)
    os.close(w)
    return moved[0], moved[1]


class GitProcess:
    """A running `git ARGS` in `cwd` (stdout and stderr captured, `input` on stdin, else
    stdin inherited); `wait()` collects it. Started with os.posix_spawnp: importing
    subprocess costs more than the git process that `git tq run` starts first."""

    def __init__(self, args: Sequence[str], cwd: str, *,
                 env: Optional[Mapping[str, str]] = None,
                 input: Optional[bytes] = None) -> None:
        self.args = list(args)
        self.input = input
        if not os.path.isdir(cwd):  # as subprocess's chdir would fail
            import errno

            code = errno.ENOENT if not os.path.lexists(cwd) else errno.ENOTDIR
            raise (FileNotFoundError if code == errno.ENOENT else NotADirectoryError)(
                code, os.strerror(code), cwd)
        self.out_r, out_w = _pipe()
        self.err_r, err_w = _pipe()
        in_r, self.in_w = _pipe() if input is not None else (-1, -1)
        actions = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        if input is not None:
            actions.append((os.POSIX_SPAWN_DUP2, in_r, 0))
        # `git -C DIR` is git's own chdir (posix_spawn has none); SIGPIPE and SIGXFSZ,
        # which Python ignores, are given back their default action as subprocess does.
        signals = _signals()
        try:
            self.pid = os.posix_spawnp(
                "git", ["git", "-C", cwd, *self.args],
                os.environ if env is None else env, file_actions=actions,
                setsigdef=(signals.SIGPIPE, signals.SIGXFSZ))
        except BaseException:
            for fd in (self.out_r, self.err_r, self.in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                if fd >= 0:
                    os.close(fd)

    def wait(self, check: bool = True) -> GitResult:
        """Feed the input, read both outputs to the end, reap the process; GitFailed
        (git's own message) on a non-zero exit if `check`."""
        import select

        chunks: dict[int, list[bytes]] = {self.out_r: [], self.err_r: []}
        data = memoryview(self.input or b"")
        pos = 0
        poller = select.poll()
        poller.register(self.out_r, select.POLLIN)
        poller.register(self.err_r, select.POLLIN)
        if self.in_w >= 0:
            if data:
                os.set_blocking(self.in_w, False)
                poller.register(self.in_w, select.POLLOUT)
            else:
                os.close(self.in_w)
                self.in_w = -1
        try:
            while self.out_r >= 0 or self.err_r >= 0 or self.in_w >= 0:
                for fd, _ in poller.poll():
                    if fd == self.in_w:
                        try:
                            pos += os.write(fd, data[pos:pos + 65536])
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # git stopped reading: its exit says why
                            pos = len(data)
                        if pos >= len(data):
                            poller.unregister(fd)
                            os.close(fd)
                            self.in_w = -1
                        continue
                    chunk = os.read(fd, 65536)
                    if chunk:
                        chunks[fd].append(chunk)
                        continue
                    poller.unregister(fd)
                    os.close(fd)
                    if fd == self.out_r:
                        self.out_r = -1
                    else:
                        self.err_r = -1
            status = os.waitpid(self.pid, 0)[1]
        except BaseException:  # Ctrl-C: do not leave git running (subprocess.run kills too)
            self.kill()
            raise
        outputs = list(chunks.values())
        result = GitResult(self.args, os.waitstatus_to_exitcode(status),
                           b"".join(outputs[0]), b"".join(outputs[1]))
        if check and result.returncode != 0:
            raise git_failure(self.args, result.stderr)
        return result

    def kill(self) -> None:
        """Stop the process, reap it and close our ends of its pipes."""
        try:
            os.kill(self.pid, _signals().SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        for fd in (self.out_r, self.err_r, self.in_w):
            if fd >= 0:
                os.close(fd)
        self.out_r = self.err_r = self.in_w = -1


def _signals() -> Any:
    # The C module: `signal` itself builds enums at import (a few ms on the submit path).
    return __import__("_signal")


def run_git(
    args: Sequence[str],
    cwd: str,
    *,
    env: Optional[Mapping[str, str]] = None,
    input: Optional[bytes] = None,
    check: bool = True,
) -> GitResult:
    """Run `git ARGS` in `cwd`, capturing output; raise GitFailed on failure if `check`."""
    return GitProcess(args, cwd, env=env, input=input).wait(check)


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
    import contextlib
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


def out_of_space(stderr: bytes) -> bool:
    """Whether a git failure came from a full disk: git says so, or says only that it
    "couldn't write" a file (a ref's lock file: a few bytes, which only a full disk or
    quota refuses; the space may be back by the time we look, so none is measured)."""
    if b"No space left on device" in stderr or b"Disk quota exceeded" in stderr:
        return True
    import re  # here: `git tq run` starts git before `re` is imported

    return re.search(rb"couldn't write '[^']+'", stderr) is not None


def free_space(path: str) -> Optional[int]:
    """Bytes free to us on the filesystem holding `path` (or its nearest existing
    folder); None when none can be read."""
    while True:
        try:
            fs = os.statvfs(path)
            return fs.f_bavail * fs.f_frsize
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if not parent or parent == path:
                return None
            path = parent
        except OSError:
            return None


def git_failure(args: Sequence[str], stderr: bytes) -> GitFailed:
    """The error for a git command that failed: NoSpace when the disk was full."""
    if out_of_space(stderr):
        return NoSpace(git_message(args, stderr))
    return GitFailed(git_message(args, stderr))


def git_message(args: Sequence[str], stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    msg = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))), None)
    msg = msg or (lines[-1] if lines else "failed")
    return f"git {subcommand(args)}: {msg}"


def subcommand(args: Sequence[str]) -> str:
    """The git command in `args`, past git's own options (`-c NAME=VALUE`, `--git-dir
    DIR`, `-C DIR`...)."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("-c", "-C", "--git-dir", "--work-tree", "--namespace") else 1
    return args[i] if i < len(args) else (args[0] if args else "")


class FrozenValue:
    """The part of a frozen dataclass that this package's values on the submit path
    need: set once in __init__ (`_set`), compared, hashed and shown by their
    __slots__. Written out because `dataclasses` costs ~10 ms to import there."""

    __slots__: tuple[str, ...] = ()

    def _set(self, **fields: object) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FrozenValue) and other.__class__ is self.__class__ and \
            self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")


class Repo(FrozenValue):
    """A located repository: where its work tree, git dirs and index are."""

    __slots__ = ("toplevel", "git_dir", "common_dir", "prefix", "index_path", "head",
                 "object_format", "inside_git_dir")
    toplevel: Optional[str]  # None for a bare repository
    git_dir: str  # this worktree's git dir
    common_dir: str  # shared by all worktrees: refs, objects, tq/logs
    prefix: str  # cwd relative to toplevel, '' at the top, '/'-separated
    index_path: str
    head: Optional[str]  # the commit HEAD pointed at when the repository was located
    object_format: str  # "sha1" or "sha256"
    inside_git_dir: bool  # located from inside its .git directory

    def __init__(self, toplevel: Optional[str], git_dir: str, common_dir: str, prefix: str,
                 index_path: str, head: Optional[str] = None, object_format: str = "sha1",
                 inside_git_dir: bool = False) -> None:
        self._set(toplevel=toplevel, git_dir=git_dir, common_dir=common_dir, prefix=prefix,
                  index_path=index_path, head=head, object_format=object_format,
                  inside_git_dir=inside_git_dir)

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
    ) -> GitResult:
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
        if out_of_space(p.stderr):
            raise git_failure(["update-ref"], p.stderr)
        if "cannot lock ref" in err or "but expected" in err or "already exists" in err \
                or "unable to resolve reference" in err or "is at" in err:
            return False
        raise GitFailed(git_message(["update-ref"], p.stderr))

    def delete_ref(self, ref: str, old: str, reason: str) -> bool:
        p = self.git("update-ref", "-m", reason, "-d", ref, old, check=False)
        return p.returncode == 0

    def config(self, pattern: str = r"^tq\.") -> dict[str, str]:
        """Settings whose names match `pattern` (repository over global over system),
        keys lowercased; one git process whatever their number."""
        p = self.git("config", "-z", "--get-regexp", pattern, check=False)
        return settings_dict(_config_items(p.stdout))


SETTINGS = r"^(tq|user)\."  # what a command's context reads: the tq settings and the identity


REPEATABLE = frozenset({"tq.slurm.args", "tq.link"})  # given many times: every value counts


def settings_dict(items: list[tuple[str, Optional[str]]]) -> dict[str, str]:
    """Settings by lowercased name, the last value winning, as git's own `--get` does;
    a REPEATABLE setting's values are all kept, one per line, in git's order."""
    settings: dict[str, str] = {}
    for key, value in items:
        if key in REPEATABLE and key in settings:
            settings[key] += "\n" + (value or "")
        else:
            settings[key] = value or ""
    return settings


def _config_items(out: bytes) -> list[tuple[str, Optional[str]]]:
    """`git config -z --get-regexp` output as (lowercased key, value) in git's order;
    value None for a key written without `=` (a boolean true)."""
    items: list[tuple[str, Optional[str]]] = []
    for item in out.decode(errors="replace").split("\0"):
        if item:
            key, nl, value = item.partition("\n")
            items.append((key.lower(), value if nl else None))
    return items


def config_bool(value: Optional[str]) -> bool:
    """A setting's truth as `git config --bool` gives it (None: written without `=`)."""
    if value is None:
        return True
    text = value.strip().lower()
    if text in ("true", "yes", "on"):
        return True
    number = text[:-1] if text[-1:] in ("k", "m", "g") else text
    try:
        return int(number) != 0
    except ValueError:
        return False


class Located:
    """What one discovery found: the repository, its context settings (SETTINGS) and
    whether core.sparseCheckout is on, from one `git rev-parse` and one `git config`
    run side by side."""

    __slots__ = ("repo", "config", "sparse")

    def __init__(self, repo: Repo, config: dict[str, str], sparse: bool) -> None:
        self.repo = repo
        self.config = config
        self.sparse = sparse


class Locating:
    """`locate` begun: its two git processes (discovery and settings) started at once,
    `finish()` waits for them. `git tq run` starts them before any other import."""

    def __init__(self, cwd: str) -> None:
        _check_path(cwd)
        self.cwd = cwd
        self.settings = GitProcess(["config", "-z", "--get-regexp",
                                    SETTINGS + r"|^core\.sparsecheckout$"], cwd)
        try:
            self.discovery = GitProcess(_DISCOVERY, cwd)
        except BaseException:
            self.settings.kill()
            raise

    def finish(self) -> Located:
        """What was found; NotARepository as `discover` raises it."""
        try:
            repo = _discovered(self.cwd, self.discovery.wait(check=False))
        finally:
            out = self.settings.wait(check=False).stdout
        items = _config_items(out)
        sparse = any(config_bool(v) for k, v in items if k == "core.sparsecheckout")
        settings = settings_dict([(k, v) for k, v in items if k != "core.sparsecheckout"])
        return Located(repo, settings, sparse)


def locate(cwd: Optional[str] = None) -> Located:
    """`discover(cwd)` and the repository's settings at once (two git processes started
    together); NotARepository as discover raises it."""
    return Locating(cwd or os.getcwd()).finish()


def _check_path(cwd: str) -> None:
    if "\n" in cwd:
        raise NotARepository(f"the path {cwd!r} contains a newline: git tq cannot work there "
                             "(git's plumbing output is line-based); move the repository")


_DISCOVERY = ["rev-parse", "--show-object-format", "--is-inside-git-dir",
              "--is-bare-repository", "--absolute-git-dir", "--git-common-dir", "--git-path",
              "index", "--show-prefix", "--show-toplevel", "--verify", "-q", "HEAD"]


def discover(cwd: Optional[str] = None) -> Repo:
    """Locate the repository containing `cwd` (default: the current directory)."""
    cwd = cwd or os.getcwd()
    _check_path(cwd)
    return _discovered(cwd, run_git(_DISCOVERY, cwd, check=False))


def _discovered(cwd: str, p: GitResult) -> Repo:
    lines = p.stdout.decode(errors="surrogateescape").split("\n")
    if len(lines) < 6 or not lines[3]:
        reason = git_message(["rev-parse"], p.stderr)[len("git rev-parse: "):]
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
