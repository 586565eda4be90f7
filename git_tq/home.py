"""The tq home: the per-user directory beside the daemon that holds local state.

It holds what must never go into git (each job's captured environment), the
list of repositories that submitted jobs, and later the daemon's lock, socket
and exit statuses. Private to the user: directories 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from git_tq.errors import TqError

if TYPE_CHECKING:
    import socket


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
    """Create `path` and any missing parents, each 0700 (makedirs gives parents 0777).

    Folders that already exist are left as they are: a parent may be /tmp or the
    user's home, and tightening it would break the machine. (A looser tq home
    itself is tightened by `tighten_home`.)"""
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent and parent != path and not os.path.isdir(parent):
            ensure_private_dir(parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    return path


def tighten_home(path: str) -> None:
    """Make an existing tq home 0700 if it is ours and others may read it; never a
    shared folder (sticky, like /tmp) or one that is not ours."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 \
                and not st.st_mode & stat.S_ISVTX:
            os.chmod(path, 0o700)


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


def open_private(path: str) -> int:
    """Open `path` for appending, created 0600 whatever the umask; an existing file is
    tightened to 0600 (it may hold secrets: logs, tracebacks, history). A descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o7077 and st.st_uid == os.getuid():
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_private_tree(top: str, path: str) -> str:
    """Make `path` a folder private to the user, as every folder from `top` down to it:
    missing ones are created 0700 whatever the umask, existing ones tightened to 0700.

    `top`'s parent must exist; `path` must be `top` or inside it. Folders above `top`
    are not touched (`top` is e.g. `<git common dir>/tq`).
    """
    top = os.path.normpath(top)
    path = os.path.normpath(path)
    rel = os.path.relpath(path, top)
    parts = [] if rel == "." else rel.split(os.sep)
    if parts[:1] == [".."]:
        raise ValueError(f"{path} is not inside {top}")
    folder = top
    for part in [None, *parts]:
        if part is not None:
            folder = os.path.join(folder, part)
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        st = os.lstat(folder)  # never chmod through a symlink (it may point at /tmp)
        if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.getuid() \
                and not st.st_mode & stat.S_ISVTX:
            os.chmod(folder, st.st_mode & 0o700)
    return path


def log_root_of(log_path: str) -> Optional[str]:
    """The `<git dir>/tq/logs` folder that holds a log file (in any sub-folder), or
    None when the path is not a job log's."""
    folder = os.path.dirname(os.path.abspath(log_path))
    while True:
        parent = os.path.dirname(folder)
        if os.path.basename(folder) == "logs" and os.path.basename(parent) == "tq" and \
                os.path.exists(os.path.join(os.path.dirname(parent), "HEAD")):
            return folder
        if parent == folder:
            return None
        folder = parent


def ensure_log_folder(log_path: str) -> None:
    """Create the folder of a job's log, private: 0700 from `<git dir>/tq` down."""
    folder = os.path.dirname(os.path.abspath(log_path))
    root = log_root_of(log_path)
    if root is None:
        ensure_private_dir(folder)
    else:
        ensure_private_tree(os.path.dirname(root), folder)


MAX_SOCKET_PATH = 100  # bytes; a unix socket's path must fit in 108


def socket_path_fits(path: str) -> bool:
    return len(path.encode()) <= MAX_SOCKET_PATH


def private_dir_ok(path: str, exact: bool = False) -> bool:
    """Whether `path` is a real folder (not a symlink) owned by this user and closed to
    everyone else (mode & 0o077 == 0; `exact`: mode 0700)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and \
        (mode == 0o700 if exact else not mode & 0o077)


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    import socket
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def connect_private(path: str, timeout: float) -> socket.socket:
    """Connect to the unix socket at `path` and make sure this user serves it
    (SO_PEERCRED), before anything is sent or believed. TqError if another uid does."""
    import socket
    import time

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.connect(path)
                break
            except BlockingIOError:  # its listen queue is full (a flood): wait for room
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
        uid = peer_uid(conn)
        if uid != os.getuid():
            raise TqError(f"the socket {path} is served by uid {uid}, not by you; refusing")
    except BaseException:
        conn.close()
        raise
    return conn


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

    @property
    def socket_dir_record(self) -> str:
        """Where the daemon records the folder of its socket when the home's path is too
        long for one (clients read it; nothing guesses a fixed name in /tmp)."""
        return os.path.join(self.path, "socket-dir")

    def _socket_in_home(self) -> Optional[str]:
        path = os.path.join(self.path, "daemon.sock")
        return path if socket_path_fits(path) else None

    def _socket_name(self) -> str:
        import hashlib

        digest = hashlib.sha1(os.path.realpath(self.path).encode()).hexdigest()[:16]
        return f"git-tq-{digest}.sock"  # $XDG_RUNTIME_DIR may serve several homes

    def _recorded_socket_dir(self) -> Optional[str]:
        try:
            with open(self.socket_dir_record, encoding="utf-8") as fh:
                folder = fh.read().strip()
        except FileNotFoundError:
            return None
        return folder if os.path.isabs(folder) else None

    def socket_path(self) -> str:
        """Where a client finds the daemon's socket; resolves only, creates nothing.

        `<home>/daemon.sock` (0600 in the 0700 home) when short enough for a unix
        socket; otherwise in the folder the daemon recorded in `socket-dir`, which must
        be a real folder (no symlink) of this user closed to others. FileNotFoundError
        when there is none (no daemon); PermissionError when it is not private.
        """
        path = self._socket_in_home()
        if path is not None:
            return path
        folder = self._recorded_socket_dir()
        if folder is None:
            raise FileNotFoundError(f"no daemon socket recorded in {self.socket_dir_record}")
        if not private_dir_ok(folder):
            if not os.path.lexists(folder):
                raise FileNotFoundError(f"the daemon's socket folder {folder} is gone")
            raise PermissionError(f"the daemon's socket folder {folder} is not a private "
                                  "folder of this user; refusing it")
        return os.path.join(folder, self._socket_name())

    def make_socket_path(self) -> str:
        """For the daemon, under its lock, before it binds: choose its socket's path,
        creating and recording a private folder for it when the home's path is too long.

        The folder is $XDG_RUNTIME_DIR when it is a real 0700 folder of this user, else
        the recorded folder when it is still private and ours, else a fresh one from
        `tempfile.mkdtemp` (0700). Never a fixed name in /tmp that another user could
        take first.
        """
        path = self._socket_in_home()
        if path is not None:
            return path
        name = self._socket_name()
        candidates = []
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        if os.path.isabs(runtime) and private_dir_ok(runtime, exact=True):
            candidates.append(runtime)
        recorded = self._recorded_socket_dir()
        if recorded is not None and private_dir_ok(recorded):
            candidates.append(recorded)
        folder = next((c for c in candidates if socket_path_fits(os.path.join(c, name))), None)
        if folder is None:
            import tempfile

            folder = tempfile.mkdtemp(prefix="git-tq-")
            if not socket_path_fits(os.path.join(folder, name)):  # a long $TMPDIR
                os.rmdir(folder)
                folder = tempfile.mkdtemp(prefix="git-tq-", dir="/tmp")
        if folder != recorded:
            write_private_file(self.socket_dir_record, folder.encode() + b"\n")
        return os.path.join(folder, name)

    def waiting_file(self, key: str) -> str:
        """Why each waiting job of a repository waits, as the daemon's last plan said
        (written by the daemon, read by `ls`)."""
        return os.path.join(self.path, "run", key, "waiting.json")

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
        # $TQ_METRICS: written by the job, read at each attempt's end, kept across
        # attempts (the last write wins), removed when the job has finished.
        self.metrics = base + ".metrics"
        # Where the running attempt's series begin in each metrics file, and when their
        # bytes appeared (the supervisor's; read by live views: plot -f, serve).
        self.series = base + ".series"
        # The supervisor has killed what was left of the job and is recording what it
        # produced: its own git processes are not the job's, and must not be killed.
        self.ended = base + ".ended"
        # A Slurm job's batch job: its Slurm id, once sbatch has answered.
        self.slurm = base + ".slurm"
        self.attempt: Optional[int] = None  # set for one attempt's files (of_attempt)

    def of_attempt(self, attempt: int) -> RunFiles:
        """The files of one attempt of a Slurm job (`<id>.exit.2`...): each attempt runs
        on whichever node Slurm picks, maybe while no daemon reads the last one's end, so
        no attempt's files may overwrite another's."""
        files = copy.copy(self)
        for name in ("lock", "ident", "exit", "stop", "ended", "series"):
            setattr(files, name, f"{getattr(self, name)}.{attempt}")
        files.attempt = attempt  # the launch file serves every attempt: clear() keeps it
        return files

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

    def drop_metrics(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.metrics)

    def clear(self) -> None:
        """Forget the run (after its outcome is recorded on the job's ref)."""
        self.clear_attempt()
        for path in (self.announced, *(() if self.attempt else (self.launch,))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def clear_attempt(self) -> None:
        """Forget what an attempt's supervisor wrote (before the next attempt starts)."""
        for path in (self.ident, self.exit, self.stop, self.lock, self.ended,
                     self.series):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
