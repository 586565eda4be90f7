"""The tq home: the per-user directory beside the daemon that holds local state.

It holds what must never go into git (each job's captured environment), the
list of repositories that submitted jobs, and later the daemon's lock, socket
and exit statuses. Private to the user: directories 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any, Optional


def default_home(config: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """`git config tq.home`, else $TQ_HOME, else $XDG_STATE_HOME/git-tq."""
    if config.get("tq.home"):
        return os.path.abspath(os.path.expanduser(config["tq.home"]))
    if environ.get("TQ_HOME"):
        return os.path.abspath(os.path.expanduser(environ["TQ_HOME"]))
    state = environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state, "git-tq")


def repo_key(common_dir: str) -> str:
    """A stable file name for a repository: its common git dir's path, escaped.

    Readable (`%2Fhome%2Fana%2Fproj%2F.git`) and collision-free; hashed only
    when too long for a file name.
    """
    path = os.path.realpath(common_dir)
    key = path.replace("%", "%25").replace("/", "%2F")
    if len(key) > 200:
        import hashlib

        key = key[:100] + "-" + hashlib.sha1(path.encode()).hexdigest()
    return key


def ensure_private_dir(path: str) -> str:
    """Create `path` and any missing parents, each 0700 (makedirs gives parents 0777)."""
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent and parent != path:
            ensure_private_dir(parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    return path


def write_private_file(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + rename), mode 0600."""
    fd, tmp = create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_temp_beside(path: str, mode: int = 0o600) -> tuple[int, str]:
    """A new file next to `path` (same filesystem, for an atomic rename), opened O_EXCL.

    (tempfile would do, but importing it costs the submit path ~10 ms.)
    """
    directory, name = os.path.split(path)
    while True:
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp
        except FileExistsError:
            continue


class Home:
    """Paths and local records inside one tq home."""

    def __init__(self, path: str) -> None:
        self.path = path

    def register_repo(self, common_dir: str) -> str:
        """Remember that `common_dir` has jobs, for the daemon; returns its key."""
        key = repo_key(common_dir)
        entry = os.path.join(self.path, "repos", key)
        if not os.path.exists(entry):
            ensure_private_dir(os.path.join(self.path, "repos"))
            write_private_file(entry, os.path.realpath(common_dir).encode() + b"\n")
        return key

    def registered_repos(self) -> list[str]:
        """Common git dirs of the repositories that submitted jobs, in registration order."""
        root = os.path.join(self.path, "repos")
        entries = []
        for name in os.listdir(root) if os.path.isdir(root) else []:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
                entries.append((os.stat(path).st_mtime, fh.read().strip()))
        return [p for _, p in sorted(entries)]

    def job_file(self, common_dir: str, snapshot: str) -> str:
        return os.path.join(self.path, "jobs", repo_key(common_dir), f"{snapshot}.json")

    def save_local_job(self, common_dir: str, snapshot: str, data: Mapping[str, Any]) -> str:
        """Record that this user submitted `snapshot` here, with its environment (0600)."""
        path = self.job_file(common_dir, snapshot)
        ensure_private_dir(os.path.dirname(path))
        write_private_file(path, json.dumps(dict(data)).encode())
        return path

    def load_local_job(self, common_dir: str, snapshot: str) -> Optional[dict[str, Any]]:
        """The local record of a job, or None if it was not submitted here by this user."""
        try:
            with open(self.job_file(common_dir, snapshot), encoding="utf-8") as fh:
                data: dict[str, Any] = json.load(fh)
                return data
        except FileNotFoundError:
            return None

    def drop_local_job(self, common_dir: str, snapshot: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.job_file(common_dir, snapshot))

    def drop_repo(self, common_dir: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, "repos", repo_key(common_dir)))

    @property
    def daemon_lock(self) -> str:
        return os.path.join(self.path, "daemon.lock")

    @property
    def daemon_info(self) -> str:
        return os.path.join(self.path, "daemon.json")

    @property
    def daemon_log(self) -> str:
        return os.path.join(self.path, "daemon.log")

    def socket_path(self) -> str:
        """The daemon's socket: in the (0700) home, or a private /tmp folder when the
        home's path is too long for a unix socket (108 bytes)."""
        path = os.path.join(self.path, "daemon.sock")
        if len(path.encode()) <= 100:
            return path
        import hashlib

        folder = os.path.join("/tmp", f"git-tq-{os.getuid()}")
        ensure_private_dir(folder)
        st = os.stat(folder)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{folder} is not private to this user; remove it")
        digest = hashlib.sha1(os.path.realpath(self.path).encode()).hexdigest()[:16]
        return os.path.join(folder, f"{digest}.sock")

    def worktree_dir(self, key: str, job_id: int) -> str:
        return os.path.join(self.path, "worktrees", key, str(job_id))

    def crash_log(self) -> str:
        ensure_private_dir(self.path)
        return os.path.join(self.path, "crash.log")


class RunFiles:
    """The files in the tq home that describe one job's current run.

    `<home>/run/<repo key>/<id>.*`: `.launch` what the supervisor must do
    (0600: it holds the environment), `.lock` held by the supervisor for its
    whole life, `.ident` the supervisor's and the job's process identities,
    `.exit` the exit status, `.stop` a pending stop (deadline and why).
    """

    def __init__(self, home: Home, key: str, job_id: int) -> None:
        self.folder = os.path.join(home.path, "run", key)
        base = os.path.join(self.folder, str(job_id))
        self.launch = base + ".launch"
        self.lock = base + ".lock"
        self.ident = base + ".ident"
        self.exit = base + ".exit"
        self.stop = base + ".stop"
        self.announced = base + ".submitted"  # the tq-submit hook has run for it

    def read(self, path: str) -> Optional[dict[str, Any]]:
        try:
            with open(path, encoding="utf-8") as fh:
                data: dict[str, Any] = json.load(fh)
                return data
        except (FileNotFoundError, ValueError):
            return None

    def write(self, path: str, data: Mapping[str, Any]) -> None:
        ensure_private_dir(self.folder)
        write_private_file(path, json.dumps(dict(data)).encode())

    def clear(self) -> None:
        """Forget the run (after its outcome is recorded on the job's ref)."""
        for path in (self.launch, self.ident, self.exit, self.stop, self.lock, self.announced):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
