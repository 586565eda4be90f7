"""Helpers shared by the benchmarks: synthetic repositories and side-by-side timing."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
}


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=ENV, input=input, check=True,
                          capture_output=True).stdout.decode()


def make_repo(root: Path, folders: int = 1000, per_folder: int = 20) -> Path:
    """A committed repository of folders x per_folder small files, with tq.gpus set."""
    root.mkdir(parents=True)
    git(root, "init", "-q")
    git(root, "config", "tq.gpus", "0,1")
    for d in range(folders):
        folder = root / f"pkg{d:04d}"
        folder.mkdir()
        for f in range(per_folder):
            (folder / f"mod{f:02d}.py").write_text(f"# module {d}.{f}\nVALUE = {d * f}\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "synthetic tree")
    settle(root)
    return root


def settle(repo: Path) -> None:
    """Make the index's stat data trustworthy, as in a repository whose files are not
    all seconds old: git re-reads files modified in the same second as the index
    ("racily clean"), which would charge every command for re-hashing them."""
    time.sleep(1.1)
    git(repo, "update-index", "-q", "--refresh")


def dirty(repo: Path, modified: int, untracked: int) -> None:
    for i in range(modified):
        with open(repo / f"pkg{i:04d}" / "mod00.py", "a") as fh:
            fh.write("# edited\n")
    for i in range(untracked):
        (repo / f"untracked{i}.py").write_text("new\n")
    settle(repo)


def timed(cmd: Sequence[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def side_by_side(cmds: dict[str, Sequence[str]], cwd: Path, rounds: int) -> dict[str, float]:
    """Median seconds per command, the commands interleaved round by round."""
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    for cmd in cmds.values():  # warm the caches once
        timed(cmd, cwd)
    for _ in range(rounds):
        for name, cmd in cmds.items():
            samples[name].append(timed(cmd, cwd))
    return {k: statistics.median(v) for k, v in samples.items()}


def machine() -> str:
    cpus = os.cpu_count()
    git_version = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout
    return f"{cpus} cores, {git_version.strip()}"


def which_git_tq() -> str:
    """The git-tq these numbers are for: an editable (development) install starts
    ~40 ms slower than the one setup.sh makes, so benchmark the latter."""
    import shutil

    path = shutil.which("git-tq") or "(not on PATH)"
    site = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    finder = Path(path).resolve().parent.parent.glob("lib/python*/site-packages/__editable__*")
    kind = "editable install" if any(finder) else "regular install"
    return f"{path} ({site}, {kind})"


# A job's first instruction: the wall-clock time it ran, into a file.
STAMP = "date +%s.%N > {}"


def wait_file(path: Path, timeout: float = 60.0) -> float:
    """The time a STAMP wrote into `path`, once it has."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text().strip()
            if text:
                return float(text)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.001)


def successor(queue: Callable[[str], object], tmp: Path, name: str) -> float:
    """One slot: queue (`queue(shell script)`) a job that waits for a gate, then one that
    stamps its start; open the gate. Seconds from the first job's last instruction to
    the second's first."""
    gate, a_end, b_start = tmp / f"g{name}", tmp / f"ae{name}", tmp / f"bs{name}"
    queue(f"while [ ! -e {gate} ]; do sleep 0.005; done; " + STAMP.format(a_end))
    queue(STAMP.format(b_start))
    gate.touch()
    return wait_file(b_start) - wait_file(a_end)
