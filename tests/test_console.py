"""The interactive console, driven through a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pexpect
import pytest
from conftest import git, tq, tq_json, wait_until

from git_tq.console import split_submission


def test_console_lines_become_run_arguments() -> None:
    assert split_submission(["python", "train.py", "-p", "5", "-t", "x"]) == \
        ["-p", "5", "-t", "x", "--", "python", "train.py"]
    assert split_submission(["-g", "30", "--cpu", "python", "a.py", "-e", "env1"]) == \
        ["-g", "30", "--cpu", "-e", "env1", "--", "python", "a.py"]
    assert split_submission(["--", "python", "a.py", "-p", "5"]) == \
        ["--", "python", "a.py", "-p", "5"]
    assert split_submission(["python", "-p"]) == ["--", "python", "-p"]
    assert split_submission(["--sweep", "lr=1,2", "python", "a.py", "{lr}"]) == \
        ["--sweep", "lr=1,2", "--", "python", "a.py", "{lr}"]


class Screen:
    """A console in a pseudo-terminal: type a line, read what it printed up to the prompt."""

    def __init__(self, cwd: Path, tmp_path: Path, color: bool = False) -> None:
        env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "NO_COLOR": "1",
               "PAGER": "cat"}
        if color:
            del env["NO_COLOR"]
        self.log = open(tmp_path / "screen.log", "w")  # noqa: SIM115 - closed in close()
        self.child = pexpect.spawn("git", ["tq"], cwd=str(cwd), env=env, encoding="utf-8",
                                   timeout=20, dimensions=(50, 160))
        self.child.logfile_read = self.log
        self.prompt = r"\(tq:any\|(ON|OFF)\) >"

    def wait(self, pattern: str) -> str:
        self.child.expect(pattern)
        return str(self.child.before)

    def run(self, line: str, prompt: str | None = None) -> str:
        """Type `line`; everything printed until the (new) prompt."""
        if prompt is not None:
            self.prompt = prompt
        self.send(line)
        return self.wait(self.prompt)

    def ask(self, line: str, question: str) -> str:
        self.send(line)
        return self.wait(question)

    def send(self, line: str) -> None:
        """Type a line and wait until the console has taken it (the redraw of the
        line being edited repeats the prompt, which must not count as the next one)."""
        self.child.send(line)
        if line:
            self.child.expect_exact(line)
        self.child.send("\r")
        self.child.expect("\r\n")

    def leave(self, how: str = "exit") -> None:
        if how == "eof":
            self.child.sendeof()
        else:
            self.child.sendline(how)
        self.child.expect(pexpect.EOF)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.log.close()


@pytest.fixture
def screen(repo: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    git(repo, "config", "tq.autostart", "true")
    s = Screen(repo, tmp_path)
    s.wait(s.prompt)
    yield s
    s.close()


def show(repo: Path, job_id: int) -> dict[str, object]:
    data = tq_json(repo, "show", str(job_id))
    assert isinstance(data, dict)
    return data


def test_home_mode(screen: Screen, repo: Path) -> None:
    assert "started" in screen.run("start", r"work \(tq:any\|ON\) >")
    screen.run("use 1", r"work \(tq:1\|ON\) >")
    assert "bad GPU list" in screen.run("use 9,x")  # errors never leave the console
    screen.run("env myenv", r"\(myenv\) [^\n]*work \(tq:1\|ON\) >")
    screen.run("env -", r"\n[^(\n]*work \(tq:1\|ON\) >")
    out = screen.run("python -c print(42) -p 7 -t answer")
    assert "job 1 queued (priority 7, gpus 1)" in out
    wait_until(lambda: show(repo, 1)["state"] == "done")
    data = show(repo, 1)
    assert data["tag"] == "answer" and data["gpus"] == [1]
    assert data["command"] == ["python", "-c", "print(42)"]
    out = screen.run("st --all")
    assert "answer" in out and "done" in out
    assert '"state": "done"' in screen.run("wait --json 1")  # a command, not a job
    assert "needs at least 2 jobs" in screen.run("compare 1")  # a command, not a job
    assert "Queue mode" in screen.run("man")
    assert "(logs)" in screen.run("help lcd")
    assert "rm works in Queue mode" in screen.run("rm 1")
    (repo / "sub").mkdir()
    screen.run("cd sub", r"work/sub \(tq:1\|ON\) >")
    assert "work/sub" in screen.run("pwd")
    screen.ask("back", r"Leave the git tq console\? \[y/N\]")
    screen.run("n")
    assert "daemon stopped" in screen.run("stop", r"work/sub \(tq:1\|OFF\) >")
    screen.leave("exit")


def test_queue_mode(screen: Screen, repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    for i in range(3):
        assert "queued" in screen.run(f"echo job{i} -t t{i}")
    out = screen.run("q", r"\[QUEUE\] >")
    assert "waiting in queue any: 3" in out and "t2" in out
    screen.run("rm 1,3")
    states = {j["id"]: j["state"] for j in tq_json(repo, "ls", "--all")}  # type: ignore[union-attr]
    assert states == {1: "cancelled", 2: "pending", 3: "cancelled"}
    assert "no number 7 here" in screen.run("rm 7")
    assert "not a Queue command" in screen.run("frobnicate")
    screen.ask("purge", r"Remove 1 pending jobs")
    assert "1 pending jobs removed" in screen.run("y")
    screen.run("back", r"work \(tq:any\|OFF\) >")
    screen.leave("eof")  # Ctrl-D leaves


def test_logs_mode(screen: Screen, repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    screen.run("echo first -t one")
    wait_until(lambda: show(repo, 1)["state"] == "done")
    (repo / "wait.sh").write_text(f"echo waiting\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n")
    screen.run("sh wait.sh")
    wait_until(lambda: show(repo, 2)["state"] == "running")
    out = screen.run("hist", r"\[LOGS:/\] >")
    assert "<- you are here" in out and "1. #1" in out and "[one]" in out
    out = screen.run("view 1")
    assert "first" in out and "exited with code 0" in out
    assert "loss: no points" in screen.run("plot 1 -m loss")  # git tq plot 1 -m loss
    screen.ask("view 2 -f", r"waiting")
    screen.child.sendintr()  # Ctrl-C ends following, and we stay in Logs mode
    screen.wait(screen.prompt)
    gate.touch()
    assert "note saved on job 1" in screen.run("note 1 a fine run")
    assert "filed: " in screen.run("catg 1 archived/ok")
    out = screen.run("lcd archived/ok", r"\[LOGS:archived/ok\] >")
    assert "a fine run" in out
    assert "would leave the log root" in screen.run("lcd ../../..")
    screen.run("lcd /", r"\[LOGS:/\] >")
    wait_until(lambda: show(repo, 2)["state"] == "done")
    screen.run("ls")
    screen.ask("rm 1", r"Delete log 1 \(job 2\)\?")
    assert "deleted " in screen.run("y")
    assert not Path(str(show(repo, 2)["log"])).exists()
    assert show(repo, 2)["state"] == "done"
    screen.run("back", r"work \(tq:any\|ON\) >")
    screen.leave("exit")


def test_git_tq_alone_off_a_terminal_prints_help(repo: Path) -> None:
    assert "Usage: git tq" in tq(repo).stdout


def test_top_is_live_and_quits_on_q(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.autostart", "true")
    gate = tmp_path / "gate"
    tq(repo, "run", "-q", "--gpu", "0", "sh", "-c",
       f"echo busy; while [ ! -e {gate} ]; do sleep 0.05; done")
    env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn("git", ["tq", "top"], cwd=str(repo), env=env, encoding="utf-8",
                          timeout=20, dimensions=(40, 140))
    try:
        child.expect("running \\(1\\)")  # the job started: redrawn on the event
        gate.touch()
        child.expect("running \\(0\\)")
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_queue_mode_purges_the_selected_queue_only_and_renumbers(screen: Screen,
                                                                 repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    for gpu in ("0", "1", "0"):
        tq(repo, "run", "-q", "--gpu", gpu, "true")
    tq(repo, "run", "-q", "--cpu", "true")
    screen.run("use 0", r"work \(tq:0\|OFF\) >")
    out = screen.run("q", r"\[QUEUE\] >")
    assert "waiting in queue 0: 2" in out
    screen.ask("purge", r"Remove 2 pending jobs from GPU queue 0\?")
    out = screen.run("y")
    assert "2 pending jobs removed: 1, 3" in out
    assert "waiting in queue 0: 0" in out  # listed again: the numbers follow the change
    assert "no number 1 here" in screen.run("rm 1")
    states = {j["id"]: j["state"] for j in tq_json(repo, "ls", "--all")}  # type: ignore[union-attr]
    assert states == {1: "cancelled", 2: "pending", 3: "cancelled", 4: "pending"}
    screen.leave("exit")


def test_use_is_checked_and_run_options_override_it(screen: Screen, repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    out = screen.run("use 5")  # the machine has GPUs 0 and 1 (tq.gpus): refused as run is
    assert "no GPU 5 on this machine (GPUs: 0,1)" in out
    screen.run("use 0", r"work \(tq:0\|OFF\) >")
    # --gpus after the command is the command's own: the job goes to the queue
    assert "gpus 0" in screen.run("python a.py --gpus 2")
    # before it, a run option: it wins, and the console says so
    out = screen.run("--gpus 2 python a.py")
    assert "note: --gpus given: this job does not go to the selected queue 0" in out
    out = screen.run("--cpu python a.py")
    assert "note: --cpu given: this job does not go to the selected queue 0" in out
    jobs = {j["id"]: j for j in tq_json(repo, "ls")}  # type: ignore[union-attr]
    assert jobs[1]["gpus"] == [0] and jobs[1]["command"] == ["python", "a.py", "--gpus", "2"]
    assert jobs[2]["gpus"] is None and jobs[2]["gpu_count"] == 2
    assert jobs[3]["gpu_count"] == 0
    screen.leave("exit")


def test_refused_lcd_hist_and_env_change_nothing(screen: Screen, repo: Path) -> None:
    any_logs = r"\[LOGS:[^\]]*\] >"
    out = screen.run("hist nowhere", r"\(tq:any\|(ON|OFF)\)( \[LOGS:[^\]]*\])? >")
    assert "no log folder 'nowhere'" in out and "[LOGS" not in str(screen.child.after)
    screen.run("hist", any_logs)
    for bad in ("/etc", "nowhere", "../../.."):
        out = screen.run(f"lcd {bad}", any_logs)
        assert "git tq:" in out and str(screen.child.after) == "[LOGS:/] >", bad
    screen.run("back", r"work \(tq:any\|(ON|OFF)\) >")
    out = screen.run("env ./no-such-venv")
    assert "is not a directory" in out
    assert "jobs from here run in" not in out
    out = screen.run("env no-such-conda-env", r"\(no-such-conda-env\) [^\n]*work \(tq:")
    assert "warning: conda environment 'no-such-conda-env' not found" in out
    (repo / "venv").mkdir()
    out = screen.run("env ./venv", r"\(venv\) [^\n]*work \(tq:")
    assert f"jobs from here run in {repo / 'venv'}" in out
    screen.leave("exit")


def test_console_colours_like_the_cli_unless_no_color(repo: Path, tmp_path: Path) -> None:
    tq(repo, "run", "-q", "--cpu", "-t", "t1", "true")
    tq(repo, "note", "1", "a fine run")
    tq(repo, "catg", "1", "kept")  # a log (empty) for Logs mode to list
    s = Screen(repo, tmp_path, color=True)
    try:
        def sgr(colour: int) -> str:  # a "select graphic rendition" that sets `colour`
            return rf"\x1b\[(?:[0-9]+;)*{colour}(?:;[0-9]+)*m"

        s.wait(sgr(31) + "OFF")  # the daemon's state in the prompt: red OFF
        s.run("hist kept", sgr(35) + r" \[LOGS:kept\][^>]*>")
        out = s.run("ls", r"\[LOGS:kept\][^>]*>")
        assert re.search(sgr(36) + " *— a fine run", out), out  # the note, highlighted
        assert re.search(sgr(33) + "pending", out), out  # the state in its colour
    finally:
        s.close()


def test_queue_mode_edits_a_waiting_job_by_its_number(screen: Screen, repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    for i in range(3):
        assert "queued" in screen.run(f"echo job{i} -t t{i}")
    screen.run("q", r"\[QUEUE\] >")
    out = screen.run("p 3 10")
    assert "job 3: priority 100 → 10" in out
    assert re.search(r"1\s+3\s+10\s", out)  # listed again: job 3 now comes first
    assert show(repo, 3)["priority"] == 10 and show(repo, 3)["event"] == "edited"
    assert "grace 180s → 5s" in screen.run("g 1 5")  # number 1 is job 3 now
    assert "tag t1 → best" in screen.run("t 3 best")  # number 3 is job 2
    out = screen.run("edit 1 --after 1")  # job 3 (number 1) after job 1 (an id)
    assert "job 3: after none → 1" in out and "(waiting for 1)" in out
    assert "is not a valid integer" in screen.run("p 1 x")
    assert "no number 9 here" in screen.run("p 9 1")
    assert "give a job's number and the new value" in screen.run("p 1")


def test_top_edits_a_waiting_job(repo: Path) -> None:
    for i in range(2):
        tq(repo, "run", "-q", "-t", f"t{i}", "true")
    env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1"}
    child = pexpect.spawn("git", ["tq", "top"], cwd=str(repo), env=env, encoding="utf-8",
                          timeout=20, dimensions=(40, 140))
    try:
        child.expect("queue \\(2\\)")
        child.send("p 2 5")
        child.expect("edit: p 2 5_")
        child.send("\r")
        child.expect("job 2: priority 100 → 5")
        child.send("g 9 1\r")
        child.expect("no waiting job #9")
        child.send("p 1 x\r")
        child.expect("is not a whole number")
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
    assert show(repo, 2)["priority"] == 5
