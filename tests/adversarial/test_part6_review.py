"""Adversarial review of Part 6 (the daemon's incremental state, early `.ended`, the spare
worktree, the id counter, background ref packing, the supervisor's signal handling).

Real repositories, the real `git tq` and daemon, real processes and signals. Two of these
found bugs, since fixed: the spare worktree ignored attributes and config outside the
commits, and a daemon killed while taking it left the job a worktree of the previous
job's code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest
from conftest import git, show, submit, tq, tq_json, wait_state, wait_until

pytestmark = pytest.mark.usefixtures("autostart")


def tqhome() -> Path:
    return Path(os.environ["TQ_HOME"])


def run_file(job_id: int, suffix: str) -> Path:
    found = list((tqhome() / "run").glob(f"*/{job_id}.{suffix}"))
    return found[0] if found else tqhome() / "run" / "none" / f"{job_id}.{suffix}"


def ident(job_id: int) -> dict[str, object]:
    path = run_file(job_id, "ident")
    wait_until(path.exists)
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def log_text(repo: Path, job_id: int) -> str:
    path = Path(show(repo, job_id)["log"])
    return path.read_text() if path.exists() else ""


def daemon_pid() -> int:
    return int(json.loads((tqhome() / "daemon.json").read_text())["pid"])


def spare_ready() -> bool:
    """A spare worktree is checked out (its files are there)."""
    return any((p / "README").exists() for p in (tqhome() / "spare").glob("*"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- the supervisor's signals ----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_job_gets_the_default_action_of_signals_the_supervisor_catches(
        repo: Path, sig: signal.Signals) -> None:
    j = submit(repo, "--cpu", "sleep", "100")
    wait_state(repo, j, "running")
    pid = int(ident(j)["job"][0])  # type: ignore[index]
    os.kill(pid, sig)
    data = wait_state(repo, j, "failed")
    assert data["signal"] == int(sig)


def test_stopping_the_daemon_or_signalling_the_supervisor_leaves_the_job_running(
        repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    j = submit(repo, "--cpu", "python", "-c",
               "import os, time\n"
               f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n")
    wait_state(repo, j, "running")
    who = ident(j)
    sup, job = int(who["supervisor"][0]), int(who["job"][0])  # type: ignore[index]
    tq(repo, "stop")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(sup, sig)
    # Both outlive the signals (a signal to a dead process would fail here).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(sup, sig)
    assert alive(sup) and alive(job)
    gate.write_text("")
    tq(repo, "start")
    data = wait_state(repo, j, "done")
    assert data["exit_code"] == 0


# --- processes a job leaves behind, and GPU exclusivity -----------------------------------


ESCAPER = """\
import os, subprocess, sys
# A child in a session of its own (out of the job's group) ...
a = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                     start_new_session=True)
# ... and a daemonised grandchild (double fork: its parent exits at once).
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid:
        os.write(w, str(pid).encode())
        os._exit(0)
    os.execvp(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)"])
os.close(w)
b = int(os.read(r, 32))
open(sys.argv[1], "w").write(f"{a.pid} {b}")
"""

CHECKER = """\
import os, sys
alive = []
for pid in open(sys.argv[1]).read().split():
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        continue
    if state != "Z":
        alive.append(pid)
open(sys.argv[2], "w").write(" ".join(alive) or "none")
"""


def test_the_next_gpu_job_starts_only_once_what_the_last_one_left_is_dead(
        repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    (repo / "escape.py").write_text(ESCAPER)
    (repo / "check.py").write_text(CHECKER)
    pids, seen = tmp_path / "pids", tmp_path / "seen"
    first = submit(repo, "python", "escape.py", str(pids))
    second = submit(repo, "python", "check.py", str(pids), str(seen))
    wait_state(repo, second, "done")
    assert seen.read_text() == "none"  # nothing of job 1 was alive when job 2 started
    assert show(repo, first)["gpus"] == show(repo, second)["gpus"] == [0]
    for pid in pids.read_text().split():
        assert not alive(int(pid))


def test_two_gpu_jobs_back_to_back_never_overlap_on_the_one_gpu(
        repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    spans = tmp_path / "spans"
    script = (
        "import os, sys, time\n"
        f"open({str(spans)!r}, 'a').write(f'start {{time.time()}}\\n')\n"
        "time.sleep(0.3)\n"
        f"open({str(spans)!r}, 'a').write(f'end {{time.time()}}\\n')\n")
    (repo / "span.py").write_text(script)
    ids = [submit(repo, "python", "span.py") for _ in range(3)]
    for j in ids:
        wait_state(repo, j, "done")
    events = [line.split() for line in spans.read_text().splitlines()]
    kinds = [e[0] for e in events]
    assert kinds == ["start", "end"] * 3  # never two at once on GPU 0


# --- stale state: refs changed without a nudge ---------------------------------------------


def _waiting_behind_a_blocker(repo: Path, tmp_path: Path) -> tuple[Path, Path, int]:
    """GPU 0 held by a job that ends when `gate` appears, and a job waiting behind it
    that would create `ran`: (gate, ran, the waiting job)."""
    git(repo, "config", "tq.gpus", "0")
    gate = tmp_path / "gate"
    ran = tmp_path / "ran"
    blocker = submit(repo, "python", "-c",
                     f"import os, time\nwhile not os.path.exists({str(gate)!r}): "
                     "time.sleep(0.02)\n")
    wait_state(repo, blocker, "running")
    victim = submit(repo, "python", "-c", f"open({str(ran)!r}, 'w').write('ran')")
    return gate, ran, victim


def test_a_pending_job_deleted_by_hand_without_a_nudge_never_runs(
        repo: Path, tmp_path: Path) -> None:
    gate, ran, victim = _waiting_behind_a_blocker(repo, tmp_path)
    git(repo, "update-ref", "-d", f"refs/tq/jobs/{victim}")  # no nudge
    after = submit(repo, "python", "-c", "print('after')")
    gate.write_text("")
    wait_state(repo, after, "done")
    assert not ran.exists()


def test_a_pending_record_replaced_by_a_fetch_without_a_nudge_is_not_run(
        repo: Path, make_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A fetch moves a waiting job of ours to someone else's record: tampered, not run."""
    gate, ran, victim = _waiting_behind_a_blocker(repo, tmp_path)
    # Someone else's record of the same id, fetched over ours (forced, no nudge).
    other = make_repo("other")
    git(other, "config", "tq.autostart", "false")
    git(other, "fetch", "-q", str(repo), "+refs/tq/jobs/*:refs/tq/jobs/*")
    tip = git(other, "rev-parse", f"refs/tq/jobs/{victim}").strip()
    tree = git(other, "rev-parse", f"{tip}^{{tree}}").strip()
    message = git(other, "log", "-1", "--format=%B", tip).replace(
        "Tq-Priority: 100", "Tq-Priority: 99")
    forged = git(other, "commit-tree", tree, "-m", message).strip()
    git(other, "update-ref", f"refs/tq/jobs/{victim}", forged)
    git(repo, "fetch", "-q", str(other), f"+refs/tq/jobs/{victim}:refs/tq/jobs/{victim}")
    wait_until(lambda: show(repo, victim)["tip"] == forged if "tip" in show(repo, victim)
               else True)
    after = submit(repo, "python", "-c", "print('after')")
    gate.write_text("")
    wait_state(repo, after, "done")
    assert not ran.exists()


# --- the spare worktree ---------------------------------------------------------------


def settle_spare(repo: Path) -> None:
    first = submit(repo, "--cpu", "python", "train.py")
    wait_state(repo, first, "done")
    wait_until(spare_ready)


def spare_uses() -> int:
    data = json.loads(tq(Path(os.environ["HOME"]), "daemon", "status", "--json").stdout)
    return int(data["stats"]["spare_worktrees_used"])


def test_spare_worktree_gives_exactly_the_submission(repo: Path) -> None:
    """Deleted, changed, re-moded files, symlinks and a submodule: what the job sees is its
    submission, not the spare's commit."""
    (repo / "gone.txt").write_text("gone\n")
    (repo / "mode.sh").write_text("#!/bin/sh\n")
    os.symlink("README", repo / "link")
    (repo / "dir").mkdir()
    (repo / "dir" / "f").write_text("in dir\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "more")
    settle_spare(repo)
    used = spare_uses()
    (repo / "gone.txt").unlink()
    (repo / "train.py").write_text("print('v2')\n")
    (repo / "mode.sh").chmod(0o755)
    (repo / "link").unlink()
    os.symlink("train.py", repo / "link")
    shutil.rmtree(repo / "dir")
    (repo / "dir").write_text("now a file\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "changed")
    probe = (
        "import os, stat\n"
        "print('gone', os.path.exists('gone.txt'))\n"
        "print('mode', oct(stat.S_IMODE(os.stat('mode.sh').st_mode) & 0o111))\n"
        "print('link', os.readlink('link'))\n"
        "print('dir', open('dir').read().strip())\n"
        "exec(open('train.py').read())\n")
    j = submit(repo, "--cpu", "python", "-c", probe)
    wait_state(repo, j, "done")
    assert spare_uses() == used + 1  # the spare was taken
    text = log_text(repo, j)
    assert "gone False" in text and "mode 0o111" in text and "link train.py" in text
    assert "dir now a file" in text and "v2" in text


def test_spare_worktree_honours_attributes_outside_the_commit(repo: Path) -> None:
    settle_spare(repo)
    used = spare_uses()
    info = repo / ".git" / "info"
    info.mkdir(exist_ok=True)
    (info / "attributes").write_text("* text eol=crlf\n")
    j = submit(repo, "--cpu", "python", "-c",
               "print('README', repr(open('README', 'rb').read()))")
    wait_state(repo, j, "done")
    assert spare_uses() == used  # the spare was checked out under other attributes: unused
    # What `git worktree add` gives for this submission:
    reference = Path(os.environ["HOME"]) / "reference"
    git(repo, "worktree", "add", "-q", "--detach", str(reference), show(repo, j)["snapshot"])
    assert (reference / "README").read_bytes() == b"hello\r\n"
    assert "README b'hello\\r\\n'" in log_text(repo, j)


def test_daemon_killed_while_taking_the_spare_never_runs_the_wrong_code(
        repo: Path, tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    smudge = tmp_path / "smudge.sh"
    # A smudge filter that, once armed, SIGKILLs the daemon in the middle of the spare's
    # checkout (as a Ctrl-C of a foreground daemon or an OOM kill of its group would).
    smudge.write_text("#!/bin/sh\n"
                      f"if [ -e {armed} ]; then kill -9 $(cat {armed}); rm -f {armed}; "
                      "exit 1; fi\nexec cat\n")
    smudge.chmod(0o755)
    git(repo, "config", "filter.slow.smudge", str(smudge))
    git(repo, "config", "filter.slow.clean", "cat")
    git(repo, "config", "filter.slow.required", "true")
    (repo / ".gitattributes").write_text("train.py filter=slow\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "attributes")
    first = submit(repo, "--cpu", "python", "train.py")
    wait_state(repo, first, "done")
    wait_until(spare_ready)
    pid = daemon_pid()
    armed.write_text(str(pid))
    (repo / "train.py").write_text("print('v2')\n")
    j = submit(repo, "--cpu", "python", "train.py")
    # The daemon died in the spare's checkout (the filter removes `armed` right after
    # its kill, so the daemon may be seen dead a moment before).
    wait_until(lambda: not alive(pid) and not armed.exists())
    tq(repo, "start")  # a new daemon
    wait_until(lambda: show(repo, j)["state"] in ("done", "failed"), timeout=20)
    # The job must run its own submission (it printed v2), not job 1's worktree state
    # (it was: HEAD at job 1's submission, train.py missing, "can't open file").
    assert show(repo, j)["state"] == "done"
    assert "v2" in log_text(repo, j)


# --- the id counter ------------------------------------------------------------------------


def counter_file() -> Path:
    found = list((tqhome() / "jobs").glob("*/last-id"))
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("content", ["", "garbage\n", "3\n", "999999999999999999\n",
                                     "1000000000000000000000\n", "-5\n"])
def test_a_corrupt_or_stale_counter_never_reuses_or_skips_badly(
        repo: Path, content: str) -> None:
    git(repo, "config", "tq.autostart", "false")
    ids = [submit(repo, "--cpu", "true") for _ in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    counter_file().write_text(content)
    new = submit(repo, "--cpu", "true")
    assert new == 6
    assert [j["id"] for j in tq_json(repo, "ls", "--all")] == [1, 2, 3, 4, 5, 6]  # type: ignore


def test_a_missing_counter_falls_back_to_the_refs(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    for _ in range(3):
        submit(repo, "--cpu", "true")
    counter_file().unlink()
    assert submit(repo, "--cpu", "true") == 4


def test_a_sweep_near_the_highest_id_gets_only_valid_ids(repo: Path) -> None:
    """A fetched ref at the second highest id: a sweep of three must not go past the
    highest one (19-digit ids are no job's)."""
    git(repo, "config", "tq.autostart", "false")
    submit(repo, "--cpu", "true")
    near = "999999999999999998"
    git(repo, "update-ref", f"refs/tq/jobs/{near}", "HEAD")
    tq(repo, "run", "-q", "--cpu", "--sweep", "x=1,2,3", "echo", "{x}")
    names = git(repo, "for-each-ref", "--format=%(refname:lstrip=3)", "refs/tq/jobs/").split()
    assert all(len(n) <= 18 for n in names), names


# --- packing refs while jobs are written ----------------------------------------------------


@pytest.mark.slow  # packing under load, ~13 s (test_history packs refs quickly)
def test_packing_refs_while_jobs_are_written_loses_none(repo: Path) -> None:
    git(repo, "config", "tq.packRefsAfter", "4")
    ids = [submit(repo, "--cpu", "true") for _ in range(12)]
    for j in ids:
        wait_state(repo, j, "done")
    # Packing is started by a cycle that reads every ref (a rescan within ~3 s).
    wait_until((repo / ".git" / "packed-refs").exists, timeout=15)
    more = [submit(repo, "--cpu", "true") for _ in range(4)]
    for j in more:
        wait_state(repo, j, "done")
    states = {j["id"]: j["state"] for j in tq_json(repo, "ls", "--all")}  # type: ignore
    assert states == {j: "done" for j in ids + more}
    for j in ids + more:
        events = [e["event"] for e in show(repo, j)["lifecycle"]]
        assert events == ["submitted", "started", "finished"]  # each ran once
