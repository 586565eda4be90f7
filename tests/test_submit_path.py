"""The submit path stays short: `git tq run` starts git before heavy imports, locates the
repository once, and spawns only the git processes it needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import git, tq

HEAVY = {"click", "dataclasses", "subprocess", "threading", "typing", "inspect",
         "git_tq.model", "git_tq.recordfmt", "git_tq.service", "git_tq.cli", "git_tq.store"}

# Runs the real entry point with os.posix_spawnp spied on: what was imported when the
# first git process was started.
PROBE = """
import json, os, sys
first = []
real = os.posix_spawnp
def spy(*args, **kwargs):
    if not first:
        first.append(sorted(sys.modules))
    return real(*args, **kwargs)
os.posix_spawnp = spy
sys.argv = ["git-tq", "run", "-q", "--cpu", "--", "true"]
from git_tq.entry import main
try:
    main()
except SystemExit as exc:
    code = exc.code
sys.stderr.write(json.dumps({"code": code, "first": first[0] if first else None}) + "\\n")
"""


def git_commands(trace: Path) -> list[str]:
    """The git processes a GIT_TRACE file shows, as 'subcommand args...'."""
    found = []
    for line in trace.read_text().splitlines():
        _, marker, command = line.partition("trace: built-in: git ")
        if marker:
            found.append(command)
    return found


def test_first_git_process_starts_before_heavy_imports(repo: Path) -> None:
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=repo, capture_output=True, text=True)
    report = json.loads(p.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), p.stderr
    assert report["first"] is not None
    assert HEAVY & set(report["first"]) == set(), "imported before the first git process"
    assert git(repo, "rev-parse", "--verify", "-q", "refs/tq/jobs/1").strip()


def test_the_head_start_imports_no_regular_expressions() -> None:
    """`re` (with enum and functools) costs a few ms of start-up: the modules that start
    `run`'s first git processes import it only when they need it. (Without site: an
    editable install's finder imports it at start-up.)"""
    root = Path(__file__).resolve().parent.parent
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import git_tq.entry, "
            "git_tq.snapshot; print(sorted({'re', 'enum'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_run_locates_the_repository_once(repo: Path, tmp_path: Path) -> None:
    (repo / "train.py").write_text("changed\n")
    (repo / "new.py").write_text("new\n")
    trace = tmp_path / "trace"
    tq(repo, "run", "-q", "--cpu", "--", "true", env={"GIT_TRACE": str(trace)})
    commands = git_commands(trace)
    names = [c.split()[0] for c in commands]
    assert names.count("rev-parse") == 1, commands  # discovery, once
    assert names.count("config") == 1, commands  # every setting, once (sparse checkout too)
    assert "ls-files -s -z" not in commands  # no gitlink in the index: not listed
    assert {"add", "write-tree", "diff-tree", "commit-tree", "update-ref"} <= set(names)
    assert len(commands) <= 10, commands


def test_submodules_are_still_listed(repo: Path, tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    git(inner, "init", "-q")
    (inner / "lib.py").write_text("v1\n")
    git(inner, "add", "lib.py")
    git(inner, "commit", "-qm", "inner")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(inner), "lib")
    (repo / "lib" / "lib.py").write_text("v2, uncommitted\n")
    trace = tmp_path / "trace"
    job = tq(repo, "run", "-q", "--cpu", "--", "true", env={"GIT_TRACE": str(trace)})
    assert "ls-files -s -z" in git_commands(trace)
    commit = git(repo, "rev-parse", f"refs/tq/jobs/{job.stdout.strip()}:lib").strip()
    assert git(repo / "lib", "show", f"{commit}:lib.py") == "v2, uncommitted\n"


def test_an_early_exit_waits_for_the_head_start(repo: Path) -> None:
    """A usage error ends the process while the head start may still run git add: the
    exit waits for it, and it removes its temporary index."""
    for i in range(50):
        (repo / f"f{i}.py").write_text(f"{i}\n")
    p = tq(repo, "run", "--cpu", "--no-such-option", "true", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert [n.name for n in (repo / ".git").iterdir() if n.name.startswith("tq-index")] == []
