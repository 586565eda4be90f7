"""Stopping jobs (preemption, kill) through the real executable, real daemon and signals.

Every job here counts each delivery of a stop signal at C level: it gives
`signal.set_wakeup_fd` one end of a socket pair, and the C signal handler
writes one byte (the signal's number) per delivery, however Python coalesces
the handlers' calls. The jobs write those counts to files the tests read.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import git, show, submit, tq, wait_state, wait_until

from git_tq import recordfmt
from git_tq.lifecycle import apply_event
from git_tq.model import ChangeSummary, GpuRequest, Job, JobSpec, State

# Here `git tq run` starts the daemon, as it does for users.
pytestmark = pytest.mark.usefixtures("autostart")


def counts(path: Path) -> dict[str, int]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


# Counts the deliveries of the signals it handles; the bytes say which signal.
COUNTER = """\
import json, os, signal, socket

_r, _w = socket.socketpair()
_r.setblocking(False)
_w.setblocking(False)
signal.set_wakeup_fd(_w.fileno(), warn_on_full_buffer=False)


def deliveries(*sigs):
    try:
        data = _r.recv(65536)
    except BlockingIOError:
        data = b""
    return {signal.Signals(s).name: data.count(bytes([s])) for s in sigs}
"""

# A DataLoader-like job: two workers that the main process stops itself, and a SIGCHLD
# handler that raises when a worker dies by a signal (as torch's does). On SIGTERM it
# saves a checkpoint for 0.5 s (atomic), stops its workers, and exits 0. Resumed, it
# reports the checkpoint it found.
LOADER = """\
import json, os, signal, subprocess, sys, time
from counter import deliveries

out = os.environ["OUT"]
if os.path.exists("ckpt.json"):
    with open("ckpt.json") as fh:
        state = json.load(fh)
    with open(os.path.join(out, "resumed"), "w") as fh:
        json.dump({"attempt": os.environ["TQ_ATTEMPT"], "step": state["step"]}, fh)
    sys.exit(0)
WORKER = "import sys\\nsys.stdin.read()\\n"  # exits 0 when its parent closes the pipe
workers = [subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE)
           for _ in range(2)]
stopping_workers = False


def on_sigchld(*_):
    for w in workers:
        info = os.waitid(os.P_PID, w.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info and info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) and not stopping_workers:
            raise RuntimeError(f"DataLoader worker (pid {w.pid}) is killed by signal "
                               f"{info.si_status}")


signal.signal(signal.SIGCHLD, on_sigchld)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
with open(os.path.join(out, "workers"), "w") as fh:
    fh.write(" ".join(str(w.pid) for w in workers))
step = 0
while not stop:
    step += 1
    time.sleep(0.01)
with open("ckpt.json.tmp", "w") as fh:
    fh.write('{"step": ')
    fh.flush()
    time.sleep(0.5)  # a slow save: a dying worker would raise in here
    fh.write(f"{step}}}")
os.replace("ckpt.json.tmp", "ckpt.json")
stopping_workers = True
for w in workers:
    w.stdin.close()
    w.wait()
with open(os.path.join(out, "counts"), "w") as fh:
    json.dump(deliveries(signal.SIGTERM), fh)
print("saved at step", step, flush=True)
"""

# Saves for `seconds` on SIGTERM or SIGUSR1 (atomically), then exits 0.
SAVER = """\
import json, os, signal, sys, time
from counter import deliveries

out, name, seconds = os.environ["OUT"], sys.argv[1], float(sys.argv[2])
got = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(n))
with open(os.path.join(out, name + ".up"), "w") as fh:
    fh.write(str(os.getpid()))
while not got:
    time.sleep(0.01)
with open(os.path.join(out, name + ".tmp"), "w") as fh:
    fh.write("half")
    fh.flush()
    time.sleep(seconds)
    fh.write(" and whole")
os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name + ".saved"))
with open(os.path.join(out, name + ".counts"), "w") as fh:
    json.dump(deliveries(signal.SIGTERM, signal.SIGUSR1), fh)
"""


@pytest.fixture
def scripts(repo: Path, tmp_path: Path) -> dict[str, str]:
    for name, body in (("counter.py", COUNTER), ("loader.py", LOADER), ("saver.py", SAVER)):
        (repo / name).write_text(body)
    out = tmp_path / "out"
    out.mkdir()
    return {"OUT": str(out)}


def test_a_preempted_dataloader_job_saves_once_and_resumes(repo: Path,
                                                           scripts: dict[str, str]) -> None:
    out = Path(scripts["OUT"])
    victim = submit(repo, "-p", "100", "-g", "30", "--gpu", "0", "python", "loader.py",
                    env=scripts)
    wait_until(lambda: (out / "workers").exists())
    urgent = submit(repo, "-p", "1", "--gpu", "0", "python", "-c", "print('urgent')")
    wait_state(repo, urgent, "done", timeout=30)
    done = wait_state(repo, victim, "done", timeout=30)
    # One SIGTERM, to the main process only: the workers lived until it stopped them.
    assert counts(out / "counts") == {"SIGTERM": 1}
    assert json.loads((out / "resumed").read_text())["attempt"] == "2"
    assert json.loads((out / "resumed").read_text())["step"] > 0
    events = [e["event"] for e in done["lifecycle"]]
    assert events == ["submitted", "started", "stopping", "preempted", "resumed", "finished"]
    preempted = next(e for e in done["lifecycle"] if e["event"] == "preempted")
    assert preempted["exit_code"] == 0 and preempted["signal"] is None
    assert preempted["stop"] == "clean" and 0.4 <= preempted["stop_seconds"] < 10
    [stop] = done["stops"]
    assert stop["attempt"] == 1 and stop["stop"] == "clean" and stop["exit_code"] == 0
    assert stop["text"].startswith("attempt 1 preempted: exited 0 after SIGTERM (")
    text = tq(repo, "show", str(victim)).stdout
    assert "attempt 1 preempted: exited 0 after SIGTERM" in text
    # The record itself carries it, for whoever reads the ref.
    tip = git(repo, "rev-list", "-1", "--grep=^Tq-Event: preempted", f"refs/tq/jobs/{victim}")
    body = git(repo, "cat-file", "commit", tip.strip())
    assert "Tq-Exit-Code: 0" in body and "Tq-Stop: clean" in body
    assert "Tq-Stop-Seconds: " in body
    assert "RuntimeError" not in Path(done["log"]).read_text()


@pytest.mark.parametrize("command", ["python saver.py job 1", "python saver.py job 1; true"])
def test_a_shell_string_gets_its_grace_and_one_signal(repo: Path, scripts: dict[str, str],
                                                      command: str) -> None:
    """A simple command runs under `exec` (the program is the main process); in a list
    the shell stays the main process, and its children get the signal."""
    out = Path(scripts["OUT"])
    j = submit(repo, "--gpu", "0", "-g", "30", command, env=scripts)
    assert show(repo, j)["shell"] is True
    wait_until(lambda: (out / "job.up").exists())
    tq(repo, "kill", str(j))
    data = wait_state(repo, j, "cancelled")
    assert (out / "job.saved").read_text() == "half and whole"
    assert counts(out / "job.counts") == {"SIGTERM": 1, "SIGUSR1": 0}
    assert data["exit_code"] == 0 and data["signal"] is None  # not SIGKILLed
    assert data["stop"] == "clean" and data["stop_seconds"] >= 0.9
    assert data["stops"][0]["text"].startswith("attempt 1 cancelled: exited 0 after SIGTERM")
    daemon_log = (Path(os.environ["TQ_HOME"]) / "daemon.log").read_text()
    assert f"job {j}: SIGTERM sent to " + ("the children of its shell" if ";" in command
                                           else "its main process") in daemon_log


def test_signal_option_sends_that_signal_to_the_main_process(repo: Path,
                                                             scripts: dict[str, str]) -> None:
    out = Path(scripts["OUT"])
    j = submit(repo, "--cpu", "--signal", "usr1", "-g", "30", "python", "saver.py", "job", "1",
               env=scripts)
    assert show(repo, j)["stop_signal"] == "SIGUSR1"
    tip = git(repo, "rev-parse", f"refs/tq/jobs/{j}").strip()
    assert "Tq-Stop-Signal: SIGUSR1" in git(repo, "cat-file", "commit", tip)
    wait_until(lambda: (out / "job.up").exists())
    tq(repo, "kill", str(j))
    tq(repo, "kill", str(j), check=False)  # a second kill of a stopping job sends nothing
    data = wait_state(repo, j, "cancelled")
    assert counts(out / "job.counts") == {"SIGTERM": 0, "SIGUSR1": 1}
    assert data["stops"][0]["text"].startswith("attempt 1 cancelled: exited 0 after SIGUSR1")
    assert "stop SIGUSR1" in tq(repo, "show", str(j)).stdout


def test_stop_target_group_signals_every_process_of_the_group_once(
        repo: Path, scripts: dict[str, str]) -> None:
    """tq.stopTarget group: the shell dies of the signal first, and the program it ran
    still gets its whole save (the grace is not cut short by the shell's exit)."""
    out = Path(scripts["OUT"])
    git(repo, "config", "tq.stopSignal", "SIGUSR1")
    git(repo, "config", "tq.stopTarget", "group")
    j = submit(repo, "--cpu", "-g", "30", "python saver.py job 1; true", env=scripts)
    assert (show(repo, j)["stop_signal"], show(repo, j)["stop_target"]) == ("SIGUSR1", "group")
    wait_until(lambda: (out / "job.up").exists())
    tq(repo, "kill", str(j))
    data = wait_state(repo, j, "cancelled")
    assert (out / "job.saved").read_text() == "half and whole"
    assert counts(out / "job.counts") == {"SIGTERM": 0, "SIGUSR1": 1}
    assert data["signal"] == signal.SIGUSR1  # the shell: dash dies of it
    assert data["stop"] == "clean" and data["stop_seconds"] >= 0.9


def test_a_job_that_does_not_stop_is_killed_after_its_grace(repo: Path) -> None:
    (repo / "deaf.py").write_text("import signal, time\nsignal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN)\nprint('up', flush=True)\n"
                                  "while True: time.sleep(0.05)\n")
    j = submit(repo, "--cpu", "-g", "1", "python", "deaf.py")
    wait_until(lambda: "up" in Path(show(repo, j)["log"]).read_text()
               if Path(show(repo, j)["log"]).exists() else False)
    tq(repo, "kill", str(j))
    data = wait_state(repo, j, "cancelled")
    assert data["signal"] == signal.SIGKILL and data["stop"] == "forced"
    assert 0.9 <= data["stop_seconds"] < 10
    assert "attempt 1 cancelled: killed after 1" in tq(repo, "show", str(j)).stdout
    assert "s grace" in data["stops"][0]["text"]


def test_bad_signal_is_a_usage_error(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    for bad in ("KILL", "SIGSTOP", "9", "FOO", "", "999"):
        p = tq(repo, "run", "--cpu", "--signal", bad, "true", check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "signal" in p.stderr, bad
    git(repo, "config", "tq.stopSignal", "NOPE")
    p = tq(repo, "run", "--cpu", "true", check=False)
    assert p.returncode == 1 and "tq.stopSignal" in p.stderr
    assert tq(repo, "ls", "--all").stdout.strip() == "no jobs"


def test_stop_fields_are_parsed_strictly() -> None:
    spec = JobSpec(command=("python", "a.py"), shell=False, priority=1, grace=5, tag=None,
                   env=None, gpus=GpuRequest.any(1), cwd="",
                   submitted_at="2026-01-01T00:00:00+00:00", user="u", host="h",
                   stop_signal="SIGUSR1", stop_target="group")
    job = Job(id=3, spec=spec, state=State.RUNNING, event="started", attempt=1,
              snapshot="a" * 40, source=None, changes=ChangeSummary())
    job = apply_event(job, "preempted", "2026-01-01T00:01:00+00:00", exit_code=0,
                      stop="clean", stop_seconds=1.25)
    message = recordfmt.encode(job)
    assert "Tq-Stop-Signal: SIGUSR1" in message and "Tq-Stop-Target: group" in message
    assert "Tq-Stop: clean" in message and "Tq-Stop-Seconds: 1.2" in message
    back = recordfmt.decode(message, "b" * 40)
    assert (back.stop, back.spec.stop_signal, back.spec.stop_target) == \
        ("clean", "SIGUSR1", "group")
    assert back.stop_seconds is not None and abs(back.stop_seconds - 1.2) < 1e-9
    for field, bad in (("Stop", "maybe"), ("Stop-Seconds", "-1"), ("Stop-Seconds", "1e9"),
                       ("Stop-Seconds", "nan"), ("Stop-Signal", "SIGKILL"),
                       ("Stop-Signal", "USR1"), ("Stop-Target", "children")):
        lines = [ln for ln in message.splitlines() if not ln.startswith(f"Tq-{field}: ")]
        with pytest.raises(recordfmt.RecordFormatError):
            recordfmt.decode("\n".join(lines) + f"\nTq-{field}: {bad}\n", "b" * 40)
    resumed = apply_event(back, "resumed", "2026-01-01T00:02:00+00:00")
    assert resumed.stop is None and resumed.stop_seconds is None and resumed.exit_code is None


def test_only_a_simple_command_string_is_run_with_exec() -> None:
    from git_tq.procs import shell_argv

    assert shell_argv("python train.py --lr 3e-4 'a b'") == \
        ["/bin/sh", "-c", "exec python train.py --lr 3e-4 'a b'"]
    assert shell_argv("python -c 'a; b'")[2] == "exec python -c 'a; b'"
    for kept in ("python a.py; true", "python a.py && b", "a | b", "python a.py > log",
                 "python a.py 2>&1", "(python a.py)", "{ a; }", "python a.py &",
                 "FOO=1 python a.py", "cd x", "echo hi", "exec python a.py",
                 "python $(cat args)", "python `x`", "python a.py\npython b.py",
                 "python a.py # note", "if true", "python 'unbalanced", "$PY a.py"):
        assert shell_argv(kept) == ["/bin/sh", "-c", kept], kept
