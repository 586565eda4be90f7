"""Fixtures: a hermetic environment, real repositories in temp dirs, the real git-tq."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import slurm_cluster as slurm_kit

BIN_DIR = os.path.dirname(sys.executable)
GIT_TQ = shutil.which("git-tq", path=BIN_DIR) or shutil.which("git-tq")


def wait_until(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Wait for a condition with a deadline (never sleep as synchronisation). The pause
    between checks grows to 0.1 s, so that a long wait leaves the CPUs to the processes
    it waits for."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
        interval = min(interval * 1.5, max(interval, 0.1))


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A temp HOME and TQ_HOME, a fixed git identity, no system config, no GPU."""
    home = tmp_path / "home"
    home.mkdir()
    for var in list(os.environ):
        if var.startswith(("GIT_", "TQ_")) or var in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TQ_HOME", str(tmp_path / "tqhome"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test User")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.com")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test User")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.com")
    monkeypatch.setenv("GIT_EDITOR", "false")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("PATH", BIN_DIR + os.pathsep + os.environ.get("PATH", ""))
    (home / ".gitconfig").write_text(
        "[init]\n\tdefaultBranch = main\n[protocol \"file\"]\n\tallow = always\n"
        # Tests of records and commands run no daemon; tests/test_daemon.py turns it on.
        "[tq]\n\tautostart = false\n"
    )
    yield
    stop_everything(tmp_path)


def stop_everything(root: Path) -> None:
    """After a test: stop its daemon and every process it left (supervisors, jobs)."""
    import psutil

    tqhome = os.environ.get("TQ_HOME", "")
    if tqhome and (Path(tqhome) / "daemon.json").exists():
        subprocess.run(["git", "tq", "stop"], cwd=str(root), capture_output=True, timeout=30)
    mine = str(root)
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            cwd = proc.info["cwd"] or ""
            if proc.pid != os.getpid() and (mine in cmd or cwd.startswith(mine)):
                proc.kill()
        except (psutil.Error, TypeError):
            continue


def git(cwd: Path | str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {p.stderr}")
    return p.stdout


def tq(cwd: Path | str, *args: str, check: bool = True, input: str | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `git tq` (through git, as a user would)."""
    assert GIT_TQ, "git-tq is not installed in this environment"
    p = subprocess.run(["git", "tq", *args], cwd=cwd, capture_output=True, text=True,
                       input=input, env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        raise AssertionError(f"git tq {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def tq_json(cwd: Path | str, *args: str) -> object:
    import json

    return json.loads(tq(cwd, *args, "--json").stdout)


def submit(repo: Path, *args: str, env: dict[str, str] | None = None) -> int:
    """`git tq run -q ARGS`: the new job's id."""
    return int(tq(repo, "run", "-q", *args, env=env).stdout.strip())


def show(repo: Path, job_id: int) -> dict[str, Any]:
    """`git tq show --json` of one job."""
    data = tq_json(repo, "show", str(job_id))
    assert isinstance(data, dict)
    return data


def open_gate(gate: Path, text: str) -> None:
    """Write a gate file whole (a temp file renamed): a job polling for it never reads it
    half-written (an exit code of "" would read as 0)."""
    part = gate.with_name(gate.name + ".part")
    part.write_text(text)
    os.replace(part, gate)


def ref_tip(repo: Path, ref: str) -> str | None:
    """Where a ref points (one `git rev-parse`, a few ms), or None."""
    p = subprocess.run(["git", "rev-parse", "-q", "--verify", ref], cwd=repo,
                       capture_output=True, text=True)
    return p.stdout.strip() or None


def wait_state(repo: Path, job_id: int, wanted: str, timeout: float = 20) -> dict[str, Any]:
    """Wait until the job is in state `wanted`; its record then. A record changes only
    with its ref, so `show` (a whole git-tq) runs only when the tip moved."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        tip = ref_tip(repo, f"refs/tq/jobs/{job_id}")
        if tip is None or tip != last.get("tip"):
            last["tip"], last["record"] = tip, show(repo, job_id)
        return bool(last["record"]["state"] == wanted)

    wait_until(reached, timeout=timeout)
    return dict(last["record"])


@pytest.fixture
def autostart() -> None:
    """`git tq run` starts the daemon, as it does for users (tests turn that off)."""
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")


class RepoFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def __call__(self, name: str | None = None, commit: bool = True, gpus: str = "0,1") -> Path:
        self.count += 1
        path = self.root / (name or f"repo{self.count}")
        path.mkdir(parents=True)
        git(path, "init", "-q")
        if gpus:
            git(path, "config", "tq.gpus", gpus)
        if commit:
            (path / "train.py").write_text("print('v1')\n")
            (path / "README").write_text("hello\n")
            git(path, "add", "-A")
            git(path, "commit", "-qm", "initial")
        return path


@pytest.fixture
def make_repo(tmp_path: Path) -> RepoFactory:
    return RepoFactory(tmp_path / "repos")


@pytest.fixture
def repo(make_repo: RepoFactory) -> Path:
    return make_repo("work")


# ---------------------------------------------------------------- a full disk


class SmallDisk:
    """An 8 MB tmpfs (`path`) holding the tests's repository and tq home, and folders that
    the test fills up and frees again (`full_dir`). Root only: mounting needs it."""

    def __init__(self, path: Path, scratch: Path) -> None:
        self.path = path
        self.scratch = scratch  # off the small disk: the full folders' own filesystems
        self.mounts: list[Path] = []  # to unmount, last first

    def full_dir(self, target: Path, size: str = "1m") -> Filler:
        """Put the folder `target` (made if missing) on a tmpfs of its own, its contents
        copied: a bind mount of a folder of that tmpfs, whose filler file (beside it,
        never inside `target`) fills it up."""
        target.mkdir(parents=True, exist_ok=True)
        store = self.scratch / f"full{len(self.mounts)}"
        store.mkdir()
        mount("-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs", str(store))
        self.mounts.append(store)
        data = store / "data"
        data.mkdir(mode=0o700)
        subprocess.run(["cp", "-a", f"{target}/.", str(data)], check=True)
        os.chmod(data, os.stat(target).st_mode & 0o7777)
        mount("--bind", str(data), str(target))
        self.mounts.append(target)
        return Filler(store / "filler")

    def unmount_all(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class Filler:
    """A file that takes every free byte of its filesystem (`fill`), and gives them back
    (`free`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)

    def free(self) -> None:
        self.path.unlink()


def mount(*args: str) -> None:
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    """An 8 MB tmpfs holding the repository and the tq home (root only; skipped with the
    reason elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt))
    monkeypatch.setenv("TQ_HOME", str(mnt / "tqhome"))
    disk = SmallDisk(mnt, tmp_path)
    try:
        yield disk
    finally:
        stop_everything(tmp_path)
        disk.unmount_all()


# ---------------------------------------------------------------- a real Slurm cluster


@pytest.fixture(scope="session")
def slurm_session(pytestconfig: pytest.Config) -> Iterator[slurm_kit.SlurmCluster]:
    """The machine's test cluster (tests/slurm_cluster.py), started or joined once a process,
    with SLURM_CONF naming its config; the tests that need it are skipped, with the reason,
    where it cannot be had (not root, no apt-get, apt-get failed)."""
    share = slurm_kit.Share()
    workerinput = getattr(pytestconfig, "workerinput", {})
    try:
        cluster = share.open(grace=5, gpus=2, run_id=workerinput.get("testrunuid"))
    except slurm_kit.Unavailable as e:
        pytest.skip(str(e))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        share.close()


@pytest.fixture
def slurm_cluster(slurm_session: slurm_kit.SlurmCluster) -> Iterator[slurm_kit.SlurmCluster]:
    """The test cluster for one test: one test at a time across the xdist workers (two fake
    GPUs are all there is), and the test's jobs cancelled after it."""
    with slurm_kit.exclusive(slurm_session) as cluster:
        yield cluster


_SLURM_SUMMARY = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the xdist controller (or a run without xdist), after every worker has let go of
    the cluster: stop it, if a fixture started it and no other run uses it."""
    if hasattr(session.config, "workerinput") or os.geteuid() != 0:
        return
    try:
        done = slurm_kit.teardown_if_unused()
    except OSError as e:
        session.config.stash[_SLURM_SUMMARY] = f"slurm test cluster: teardown failed: {e}"
        return
    if done is not None:
        session.config.stash[_SLURM_SUMMARY] = done.summary()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    line = config.stash.get(_SLURM_SUMMARY, None)
    if line:
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _sigint_not_ignored() -> None:
    """Children inherit an ignored SIGINT (exec keeps SIG_IGN): a browser or server test
    that left it ignored in this worker would make later Ctrl-C tests hang."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
