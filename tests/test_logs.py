"""Logs (view, follow, hist, catg, rm --log), the dashboard and shell completion."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import git, show, submit, tq, tq_json, wait_state, wait_until

# Here `git tq run` starts the daemon, as it does for users.
pytestmark = pytest.mark.usefixtures("autostart")


def test_view_tail_and_follow(repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    (repo / "talk.py").write_text(
        "import os, time\nfor i in range(5): print('line', i, flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\nprint('last', flush=True)\n")
    j = submit(repo, "--cpu", "python", "talk.py")
    follower = subprocess.Popen(["git", "tq", "view", "-f", str(j)], cwd=repo,
                                stdout=subprocess.PIPE, text=True)
    wait_until(lambda: "line 4" in Path(show(repo, j)["log"]).read_text()
               if Path(show(repo, j)["log"]).exists() else False)
    gate.touch()
    out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0  # it stopped by itself when the job ended
    assert "[git tq] job 1" in out and "line 0" in out and "last" in out
    assert "exited with code 0" in out
    tail = tq(repo, "view", "--tail", "2", str(j)).stdout.splitlines()
    assert len(tail) == 2 and "exited with code 0" in tail[-1]
    full = tq(repo, "view", str(j)).stdout  # not a terminal: printed, no pager
    assert full.startswith("[git tq] job 1") and "line 3" in full


def test_follow_across_a_preemption(repo: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    train = str(Path(__file__).resolve().parent.parent / "examples" / "train.py")
    victim = submit(repo, "-p", "50", "python", train, "--steps", "40", "--step-seconds",
                    "0.05")
    follower = subprocess.Popen(["git", "tq", "view", "-f", str(victim)], cwd=repo,
                                stdout=subprocess.PIPE, text=True)
    wait_until(lambda: show(repo, victim)["state"] == "running")
    submit(repo, "-p", "1", "true")
    out, _ = follower.communicate(timeout=60)
    assert "SIGTERM: checkpoint saved" in out and "RESUMED: attempt 2" in out
    assert "finished 40 steps" in out


def test_view_errors(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    j = submit(repo, "--cpu", "true")
    p = tq(repo, "view", str(j), check=False)
    assert p.returncode == 1 and "has no log" in p.stderr
    p = tq(repo, "view", "42", check=False)
    assert p.returncode == 1 and "no job 42" in p.stderr


def test_hist_and_catg(repo: Path) -> None:
    a = submit(repo, "--cpu", "-t", "alpha", "true")
    b = submit(repo, "--cpu", "python", "-c", "raise SystemExit(2)")
    wait_state(repo, a, "done")
    wait_state(repo, b, "failed")
    tq(repo, "note", str(b), "diverged at step 3")
    out = tq(repo, "hist").stdout
    assert "1. #1" in out and "[alpha]" in out and "2. #2" in out
    assert "diverged at step 3" in out
    tq(repo, "catg", str(b), "archived/failed")
    root = repo / ".git" / "tq" / "logs"
    assert (root / "archived" / "failed").is_dir()
    out = tq(repo, "hist").stdout
    assert "archived/" in out and "#2" not in out
    data = tq_json(repo, "hist", "archived/failed")
    assert isinstance(data, dict) and [e["id"] for e in data["logs"]] == [b]
    assert show(repo, b)["category"] == "archived/failed"
    tq(repo, "catg", str(b), "kept")  # moving again prunes the empty folders it left
    assert not (root / "archived").exists()
    for bad in ("..", "../outside", "/etc", "a/../../b", "a/-x", "x\\y"):
        p = tq(repo, "catg", str(a), bad, check=False)
        assert p.returncode == 2 and "bad folder" in p.stderr, bad
    p = tq(repo, "hist", "nosuch", check=False)
    assert p.returncode == 2 and "no log folder" in p.stderr


def test_a_running_job_can_be_filed_and_keeps_writing(repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    (repo / "slow.py").write_text(
        "import os, time\nprint('before', flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\nprint('after', flush=True)\n")
    j = submit(repo, "--cpu", "python", "slow.py")
    wait_until(lambda: Path(show(repo, j)["log"]).exists() and
               "before" in Path(show(repo, j)["log"]).read_text())
    tq(repo, "catg", str(j), "live")
    gate.touch()
    data = wait_state(repo, j, "done")
    text = Path(data["log"]).read_text()
    assert data["category"] == "live" and "before" in text and "after" in text


def test_a_pending_job_can_be_filed(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    j = submit(repo, "--cpu", "echo", "filed early")
    tq(repo, "catg", str(j), "early")
    tq(repo, "start")
    data = wait_state(repo, j, "done")
    assert data["category"] == "early" and "filed early" in Path(data["log"]).read_text()


def test_rm_log_keeps_the_record(repo: Path) -> None:
    j = submit(repo, "--cpu", "true")
    wait_state(repo, j, "done")
    p = tq(repo, "rm", "--log", str(j), check=False)  # no terminal to confirm on
    assert p.returncode == 1 and "without -y" in p.stderr
    log = Path(show(repo, j)["log"])
    assert log.exists()
    tq(repo, "rm", "--log", "-y", str(j))
    assert not log.exists() and show(repo, j)["state"] == "done"
    p = tq(repo, "rm", "--log", "-y", str(j), check=False)
    assert p.returncode == 1 and "has no log" in p.stderr


def test_top_prints_a_frame_off_a_terminal(repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    j = submit(repo, "--gpu", "1", "sh", "-c",
               f"echo working hard; while [ ! -e {gate} ]; do sleep 0.05; done")
    wait_until(lambda: show(repo, j)["state"] == "running")
    wait_until(lambda: "working hard" in tq(repo, "top").stdout)
    out = tq(repo, "top").stdout
    assert "GPUs" in out and "job 1" in out and "running (1)" in out and "free" in out
    gate.touch()
    wait_state(repo, j, "done")
    assert "recent finishes" in tq(repo, "top", "--once").stdout


@pytest.mark.skipif(not Path("/usr/share/bash-completion/completions/git").exists(),
                    reason="git's bash completion is not installed")
def test_bash_completion_through_git(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    submit(repo, "--cpu", "true")
    script = Path(__file__).resolve().parent.parent / "git_tq" / "completion" / "git-tq.bash"
    probe = f"""
source /usr/share/bash-completion/completions/git
source {script}
complete_line() {{
  read -ra COMP_WORDS <<< "$1"; [ "${{1: -1}}" = " " ] && COMP_WORDS+=("")
  COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMP_LINE="$1"; COMP_POINT=${{#1}}; COMPREPLY=()
  if [ "${{COMP_WORDS[0]}}" = git ]; then __git_wrap__git_main; else _git_tq_command; fi
  echo "${{COMPREPLY[*]}}"
}}
complete_line "git tq vi"
complete_line "git tq show "
complete_line "git-tq pu"
complete_line "git tq pause --gpu "
complete_line "git-tq resume --gpu 0,"
complete_line "git tq run --gpu 1"
"""
    out = subprocess.run(["bash", "-c", probe], cwd=repo, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["view", "1", "purge push", "0 1", "0,1", "1"]


def test_completion_files_are_installed_by_setup() -> None:
    text = (Path(__file__).resolve().parent.parent / "setup.sh").read_text()
    for name in ("git-tq.bash", "_git-tq", "git-tq.fish"):
        assert name in text
    assert shutil.which("git-tq")


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    submit(repo, "--cpu", "true")
    script = Path(__file__).resolve().parent.parent / "git_tq" / "completion" / "git-tq.fish"
    out = subprocess.run(["fish", "-c", f"source {script}; complete -C 'git tq pu'; "
                          "complete -C 'git-tq show '"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith("purge") and out[1].startswith("1\t")


def test_view_of_a_fetched_job_says_its_log_is_elsewhere(repo: Path, tmp_path: Path) -> None:
    j = submit(repo, "--cpu", "echo", "hi")
    wait_state(repo, j, "done")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "fetch", "-q", "origin", "refs/tq/*:refs/tq/*")
    for args in (["view"], ["view", "-f"], ["view", "-n", "5"]):
        p = tq(clone, *args, str(j), check=False)
        assert p.returncode == 1 and "log is not on this machine: the job is fetched" in \
            p.stderr, (args, p.stderr)
    assert "(not on this machine" in tq(clone, "show", str(j)).stdout
    assert "(not on this machine" not in tq(repo, "show", str(j)).stdout


def test_top_shows_what_holds_each_gpu_whichever_repository(make_repo: Any,
                                                            tmp_path: Path) -> None:
    here, there = make_repo("here"), make_repo("there")  # one tq home, one daemon
    gate = tmp_path / "gate"
    j = submit(there, "--gpu", "1", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    wait_state(there, j, "running")
    wide = {"COLUMNS": "200"}
    try:
        out = tq(here, "top", env=wide).stdout
        assert f"job {j} of there" in out and out.count("free") == 1  # GPU 0 only
        assert "running (0)" in out  # this repository's jobs: none
        out = tq(here, "top", "--all", env=wide).stdout
        assert "running (1)" in out and "REPO" in out
        assert any(line.split()[1:4] == ["there", str(j), "running"]
                   for line in out.splitlines() if len(line.split()) > 4), out
    finally:
        gate.touch()
