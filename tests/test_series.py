"""Metric series: captured from what jobs write, kept in git per attempt, drawn by `git tq plot`.

Real jobs append JSON lines to $TQ_METRICS, log through a CSV file, write TensorBoard event
files; one is preempted and resumed. Everything is read back through the real executable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import git, open_gate, show, submit, tq, wait_state, wait_until

pytestmark = pytest.mark.usefixtures("autostart")

APPENDER = """\
import json, os, signal, sys, time
path, attempt = os.environ["TQ_METRICS"], int(os.environ["TQ_ATTEMPT"])
stopped = []
signal.signal(signal.SIGTERM, lambda *a: stopped.append(1))
first = 0 if attempt == 1 else 5
with open(path, "a") as fh:
    for step in range(first, first + 5):
        fh.write(json.dumps({"step": step, "loss": 1 / (step + 1), "phase": "train"}) + "\\n")
        if step == 1:
            fh.write("oops, not json\\n")
            fh.write("{broken\\n")
print("written", attempt, flush=True)
if attempt == 1:
    while not stopped:
        time.sleep(0.02)
"""

CSV_LOGGER = """\
import os, sys, time
with open("metrics.csv", "w") as fh:
    fh.write("epoch,step,train_loss,val_loss\\n")
    for i in range(6):
        fh.write(f"{i // 3},{i * 10},{2 - i / 10},\\n")
    fh.write("1,60,abc,\\n")
    fh.write("1,60,,0.9\\n")
    fh.flush()
    print("logged", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.02)
    fh.write("2,70,1.3,\\n")
"""

TENSORBOARD = """\
import time
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
w = EventFileWriter("tb")
for step in range(3):
    value = summary_pb2.Summary.Value(tag="train/acc", simple_value=0.5 + step / 10)
    w.add_event(event_pb2.Event(wall_time=time.time(), step=step * 100,
                                summary=summary_pb2.Summary(value=[value])))
w.close()
"""


def curves(repo: Path, *args: str) -> dict[str, Any]:
    data = json.loads(tq(repo, "plot", *args, "--json").stdout)
    return {j["job"]: j for j in data["jobs"]}


def log_of(repo: Path, job: int) -> str:
    return Path(show(repo, job)["log"]).read_text()


def test_series_of_a_resumed_job_a_csv_logger_and_tensorboard(repo: Path, tmp_path: Path) \
        -> None:
    git(repo, "config", "tq.gpus", "0")
    git(repo, "config", "tq.metrics", "metrics.csv,tb/events.out.tfevents.*")
    for name, text in (("append.py", APPENDER), ("csvlog.py", CSV_LOGGER),
                       ("tb.py", TENSORBOARD)):
        (repo / name).write_text(text)
    py = sys.executable
    # A job appending points is preempted (two priorities on one GPU) and resumed.
    victim = submit(repo, "-p", "50", "-g", "20", "-t", "base", py, "append.py")
    wait_until(lambda: "written 1" in log_of(repo, victim), timeout=20)
    urgent = submit(repo, "-p", "10", "true")
    wait_state(repo, urgent, "done")
    wait_state(repo, victim, "done", timeout=30)
    # A job logging through a CSV file: its points are read live while it runs.
    gate = tmp_path / "gate"
    logger = submit(repo, "--cpu", py, "csvlog.py", str(gate))
    wait_until(lambda: "logged" in log_of(repo, logger), timeout=20)
    wait_until(lambda: len(curves(repo, str(logger))[str(logger)]["series"]
                           .get("train_loss", {}).get("points", [])) == 6)
    live = curves(repo, str(logger))[str(logger)]
    assert live["state"] == "running"
    open_gate(gate, "go")
    wait_state(repo, logger, "done")
    board = submit(repo, "--cpu", py, "tb.py")
    wait_state(repo, board, "done")

    got = curves(repo, str(victim), str(logger), str(board))
    loss = got[str(victim)]["series"]["loss"]
    assert [(p[0], p[3]) for p in loss["points"]] == [(s, 1 if s < 5 else 2) for s in range(10)]
    assert loss["points"][9][1] == pytest.approx(0.1) and loss["total"] == 10
    assert got[str(victim)]["resumes"][0]["attempt"] == 2
    assert got[str(victim)]["resumes"][0]["step"] == 5
    assert got[str(victim)]["tag"] == "base" and "phase" not in got[str(victim)]["series"]
    assert show(repo, victim)["metrics"] == {"step": 9, "loss": 0.1, "phase": "train"}
    text = log_of(repo, victim)
    assert text.count("$TQ_METRICS line 3: not a JSON object (and 1 more skipped)") == 1
    csv_series = got[str(logger)]["series"]
    assert [p[:2] for p in csv_series["train_loss"]["points"]][-2:] == [[50, 1.5], [70, 1.3]]
    assert [p[:2] for p in csv_series["val_loss"]["points"]] == [[60, 0.9]]
    assert "metrics.csv line 8: not a number" in log_of(repo, logger)
    assert show(repo, logger)["metrics"]["train_loss"] == 1.3
    acc = got[str(board)]["series"]["train/acc"]["points"]
    assert [(p[0], round(p[1], 2)) for p in acc] == [(0, 0.5), (100, 0.6), (200, 0.7)]
    # The series is one note line per attempt, kept in git.
    note = git(repo, "notes", "--ref=tq-series", "show", f"refs/tq/jobs/{victim}^{{/submitted}}")
    assert [json.loads(ln)["attempt"] for ln in note.splitlines() if ln.strip()] == [1, 2]

    # CSV (long format), plain text off a terminal, --x epoch, log and smoothing.
    rows = tq(repo, "plot", str(victim), "-m", "loss", "--csv").stdout.splitlines()
    assert rows[0] == "job,metric,attempt,step,time,value" and len(rows) == 11
    assert rows[6].startswith(f"{victim},loss,2,5,")
    drawn = tq(repo, "plot", str(victim), str(logger), "-m", "loss,train_loss", "--smooth", "2",
               "--log")
    assert "\x1b" not in drawn.stdout and "loss (smoothed over 2)" in drawn.stdout
    assert f"{victim} base | resumed at 5" in drawn.stdout
    assert "epoch" in tq(repo, "plot", str(logger), "--x", "epoch", "-m",
                         "train_loss").stdout

    # tq.metrics.maxPoints: downsampled evenly, the count kept.
    git(repo, "config", "tq.metrics.maxPoints", "4")
    many = submit(repo, "--cpu", "sh", "-c", 'for i in 1 2 3 4 5 6 7 8 9 10; do '
                  'echo "{\\"x\\": $i}" >> "$TQ_METRICS"; done')
    wait_state(repo, many, "done")
    x = curves(repo, str(many))[str(many)]["series"]["x"]
    assert x["total"] == 10 and [p[1] for p in x["points"]] == [1, 4, 7, 10]


def test_plot_draws_in_a_terminal_and_says_what_is_missing(repo: Path) -> None:
    job = submit(repo, "--cpu", "sh", "-c", 'for i in 1 2 3; do echo "{\\"loss\\": $i, '
                 '\\"acc\\": $i}" >> "$TQ_METRICS"; done')
    wait_state(repo, job, "done")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", COLUMNS="100", LINES="40")
    child = pexpect.spawn("git", ["tq", "plot", str(job)], cwd=str(repo), env=env,
                          encoding="utf-8", timeout=20, dimensions=(40, 100))
    child.expect(pexpect.EOF)
    out = child.before or ""
    assert "\x1b[" in out and "acc" in out and "loss" in out  # colours, one panel each
    none = tq(repo, "plot", str(job), "-m", "nothing", check=False)
    assert none.returncode == 0 and "nothing: no points" in none.stderr
    bad = tq(repo, "plot", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--all" in bad.stderr
