"""Metrics in listings (`ls -m`, `ls --sort`, `log`) and `git tq compare`.

Real jobs report metrics through $TQ_METRICS; the tests read them back through
the real `git tq` (plain text off a terminal, and once through a pseudo-terminal).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import git, tq, tq_json, wait_until

# A job that reports what its arguments say (`loss:0.5 mode:fast`; `--x` is ignored) and
# writes an output file in its worktree (which a tip's tree may record: compare must not
# take it for code).
REPORT = """\
import json, os, sys
values = {}
for arg in sys.argv[1:]:
    if arg.startswith("-"):
        continue
    name, _, value = arg.partition(":")
    try:
        values[name] = json.loads(value)
    except ValueError:
        values[name] = value
with open(os.environ["TQ_METRICS"], "w") as fh:
    json.dump(values, fh)
with open("out.txt", "w") as fh:
    fh.write(" ".join(sys.argv))
"""


def setup_repo(repo: Path) -> None:
    (repo / "report.py").write_text(REPORT)
    git(repo, "add", "report.py")
    git(repo, "commit", "-qm", "report metrics")


def submit(repo: Path, *args: str) -> int:
    return int(tq(repo, "run", "-q", *args).stdout.strip())


def report(repo: Path, tag: str, *metrics: str) -> int:
    return submit(repo, "--cpu", "-t", tag, "python", "report.py", *metrics)


def finish(repo: Path, *ids: int) -> dict[int, dict[str, Any]]:
    """Start the daemon and wait until every job in `ids` is done."""
    tq(repo, "start")

    def jobs() -> dict[int, dict[str, Any]]:
        listed = tq_json(repo, "ls", "--all")
        assert isinstance(listed, list)
        return {j["id"]: j for j in listed if j["id"] in ids}

    wait_until(lambda: all(j["state"] in ("done", "failed") for j in jobs().values()),
               timeout=30)
    found = jobs()
    assert all(j["state"] == "done" for j in found.values()), found
    return found


def column(out: str, header: str) -> dict[int, str]:
    """One column of a plain-text table, by job id. Metric columns are aligned right:
    their cells end where the header ends."""
    lines = out.splitlines()
    match = re.search(rf"(?<!\S){re.escape(header)}(?!\S)", lines[0])
    assert match, f"no column {header!r} in {lines[0]!r}"
    return {int(line.split()[0]): line[:match.end()].split()[-1] for line in lines[1:]}


def headers(out: str) -> list[str]:
    return out.splitlines()[0].split()


def metric_headers(out: str) -> list[str]:
    """The metric columns: between TIME and NOTE."""
    names = headers(out)
    return names[names.index("TIME") + 1:names.index("NOTE")]


def ids(out: str) -> list[int]:
    return [int(line.split()[0]) for line in out.splitlines()[1:]]


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    return p.stderr


def test_ls_shows_metric_columns(repo: Path) -> None:
    setup_repo(repo)
    a = report(repo, "a", "loss:0.5", "acc:0.8", "epoch:3")
    b = report(repo, "b", "loss:0.25", "epoch:7")
    c = report(repo, "c", "loss:0.123456", "acc:0.9", "epoch:10", "note:ok")
    d = report(repo, "d", "f1:0.7", "acc:0.6")
    finish(repo, a, b, c, d)

    # Default: the first three names every job with metrics shares, in the first's order.
    out = tq(repo, "ls", "--all", "-t", "a", "-t", "b", "-t", "c").stdout
    assert metric_headers(out) == ["loss", "epoch"]  # acc: b has none
    assert column(out, "loss") == {a: "0.5", b: "0.25", c: "0.1235"}  # 4 digits
    assert column(out, "epoch") == {a: "3", b: "7", c: "10"}  # ints as ints
    # None shared by all: the three most common (ties: in order of appearance).
    out = tq(repo, "ls", "--all").stdout
    assert metric_headers(out) == ["loss", "acc", "epoch"]  # 3 jobs each; f1, note: 1
    assert "PARAMS" not in headers(out)  # no sweep here
    assert column(out, "acc") == {a: "0.8", b: "-", c: "0.9", d: "0.6"}

    # -m picks the columns (repeat or comma-separate), '-' where a job has none.
    out = tq(repo, "ls", "--all", "-m", "acc,f1", "--metrics", "note").stdout
    assert metric_headers(out) == ["acc", "f1", "note"]
    assert column(out, "f1") == {a: "-", b: "-", c: "-", d: "0.7"}
    assert column(out, "note") == {a: "-", b: "-", c: "ok", d: "-"}
    assert metric_headers(tq(repo, "ls", "--all", "-m", "").stdout) == []

    # tq.columns is the default when -m is not given.
    git(repo, "config", "tq.columns", "f1, acc")
    assert metric_headers(tq(repo, "ls", "--all").stdout) == ["f1", "acc"]
    assert metric_headers(tq(repo, "ls", "--all", "-m", "loss").stdout) == ["loss"]

    # The active queue (no metrics there) has no metric columns; --json is as before.
    assert "f1" not in tq(repo, "ls").stdout
    listed = tq_json(repo, "ls", "--all", "-m", "loss")
    assert isinstance(listed, list)
    assert {j["id"]: j["metrics"].get("loss") for j in listed} == \
        {a: 0.5, b: 0.25, c: 0.123456, d: None}


def test_ls_sorts_by_a_metric(repo: Path) -> None:
    setup_repo(repo)
    a = report(repo, "a", "loss:0.5", "acc:0.8")
    b = report(repo, "b", "loss:0.25")
    c = report(repo, "c", "loss:0.125", "acc:0.9")
    d = report(repo, "d", "acc:0.85")
    finish(repo, a, b, c, d)

    assert ids(tq(repo, "ls", "--all", "--sort", "loss").stdout) == [c, b, a, d]
    assert ids(tq(repo, "ls", "--all", "--sort", "-loss").stdout) == [a, b, c, d]
    assert ids(tq(repo, "ls", "--all", "--sort", "-acc").stdout) == [c, d, a, b]
    assert ids(tq(repo, "ls", "--all", "--sort=acc").stdout) == [a, d, c, b]
    assert ids(tq(repo, "ls", "--all", "--sort", "-id").stdout) == [d, c, b, a]
    assert ids(tq(repo, "ls", "--all", "--sort", "priority").stdout) == [a, b, c, d]
    listed = tq_json(repo, "ls", "--all", "--sort", "loss")
    assert isinstance(listed, list) and [j["id"] for j in listed] == [c, b, a, d]
    err = one_line_error(tq(repo, "ls", "--all", "--sort", "lsos", check=False))
    assert "no listed job has a metric 'lsos'" in err


def test_log_shows_metrics(repo: Path) -> None:
    setup_repo(repo)
    a = report(repo, "a", "loss:0.31", "acc:0.9", "steps:100")
    b = report(repo, "b", "loss:0.5", "acc:0.75", "steps:100")
    finish(repo, a, b)
    lines = tq(repo, "log").stdout.splitlines()
    line_a = next(ln for ln in lines if ln.lstrip().startswith(f"#{a} "))
    line_b = next(ln for ln in lines if ln.lstrip().startswith(f"#{b} "))
    assert line_a.endswith(" loss:0.31 acc:0.9 steps:100 loss=0.31 acc=0.9 steps=100")
    assert line_b.endswith(" loss:0.5 acc:0.75 steps:100 loss=0.5 acc=0.75 steps=100")
    line_a = next(ln for ln in tq(repo, "log", "-m", "acc").stdout.splitlines()
                  if ln.lstrip().startswith(f"#{a} "))
    assert line_a.endswith(" steps:100 acc=0.9")


def compare_json(repo: Path, *tokens: str) -> dict[str, Any]:
    data = tq_json(repo, "compare", *tokens)
    assert isinstance(data, dict)
    return data


def test_compare_three_jobs(repo: Path) -> None:
    setup_repo(repo)
    a = report(repo, "base", "loss:0.5", "acc:0.8", "epoch_time:12")
    b = report(repo, "base", "loss:0.25", "acc:0.85")
    with open(repo / "train.py", "a") as fh:  # job c runs other code
        fh.write("print('v2')\nprint('v3')\n")
    c = submit(repo, "--cpu", "-p", "7", "-t", "fast", "python", "report.py", "loss:0.75",
               "acc:0.9", "epoch_time:8")
    finish(repo, a, b, c)

    data = compare_json(repo, str(a), str(b), str(c))
    assert set(data) >= {"jobs", "rows", "code"}
    assert [j["id"] for j in data["jobs"]] == [a, b, c]
    rows = {r["name"]: r for r in data["rows"]}
    names = [r["name"] for r in data["rows"]]
    assert names[:1] == ["command"]
    assert names.index("outcome") < names.index("loss")
    assert {"tag", "priority", "gpus", "env", "source", "code", "run time"} <= set(rows)
    assert rows["loss"]["values"] == [0.5, 0.25, 0.75] and rows["loss"]["best"] == 1
    assert rows["acc"]["values"] == [0.8, 0.85, 0.9] and rows["acc"]["best"] == 2
    assert rows["epoch_time"]["values"] == [12, None, 8] and rows["epoch_time"]["best"] == 2
    assert rows["loss"]["kind"] == "metric" and rows["loss"]["lower_is_better"] is True
    assert rows["priority"]["values"] == [100, 100, 7] and rows["priority"]["best"] is None
    assert rows["outcome"]["values"] == ["done (exit 0)"] * 3
    # The words of the commands that differ, each job against the first.
    assert rows["command"]["differing_words"] == [
        ["loss:0.5", "acc:0.8", "epoch_time:12"], ["loss:0.25", "acc:0.85"],
        ["loss:0.75", "acc:0.9", "epoch_time:8"]]
    # Code: the submission trees (a job's outputs are no code): b's is a's, c's is not.
    code = {entry["job"]: entry for entry in data["code"]}
    assert code[b]["files"] == 0 and code[b]["vs"] == a
    assert (code[c]["files"], code[c]["insertions"], code[c]["deletions"]) == (1, 2, 0)
    assert code[c]["paths"] == ["train.py"]
    assert rows["code"]["values"][2] == {"files": 1, "insertions": 2, "deletions": 0}

    out = tq(repo, "compare", str(a), str(b), str(c)).stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:] if ln.strip()}
    assert out.splitlines()[0].split() == [f"#{a}", f"#{b}", f"#{c}"]
    assert lines["loss"].split() == ["loss", "0.5", "0.25", "*", "0.75"]
    assert lines["acc"].split() == ["acc", "0.8", "0.85", "0.9", "*"]
    assert lines["epoch_time"].split() == ["epoch_time", "12", "-", "8", "*"]
    assert lines["code"].split() == ["code", "(base)", "same", "1", "file,", "+2", "-0"]
    assert lines["priority"].split() == ["priority", "100", "100", "7"]
    assert "python report.py loss:0.75" in lines["command"]
    assert lines["outcome"].split()[1:] == ["done", "(exit", "0)"] * 3
    assert "* best; lower is better for loss, epoch_time; higher for acc" in out


def test_compare_by_range_and_tag(repo: Path) -> None:
    setup_repo(repo)
    a = report(repo, "sweep1", "loss:0.5")
    b = report(repo, "sweep1", "loss:0.4")
    c = report(repo, "other", "loss:0.3")
    finish(repo, a, b, c)
    assert [j["id"] for j in compare_json(repo, f"{a}-{c}")["jobs"]] == [a, b, c]
    assert [j["id"] for j in compare_json(repo, "sweep1")["jobs"]] == [a, b]
    assert [j["id"] for j in compare_json(repo, str(c), "sweep1")["jobs"]] == [c, a, b]
    rows = {r["name"]: r for r in compare_json(repo, str(c), "sweep1")["rows"]}
    assert rows["loss"]["values"] == [0.3, 0.5, 0.4] and rows["loss"]["best"] == 0
    same = {"files": 0, "insertions": 0, "deletions": 0}
    assert rows["code"]["values"] == [None, same, same]
    assert rows["tag"]["values"] == ["other", "sweep1", "sweep1"]
    out = tq(repo, "compare", "sweep1").stdout
    assert out.splitlines()[0].split() == [f"#{a}", f"#{b}"]


def test_compare_needs_two_known_jobs(repo: Path) -> None:
    setup_repo(repo)
    a = report(repo, "solo", "loss:0.5")
    b = submit(repo, "--cpu", "true")  # never run: no metrics, no run time
    for tokens in ([str(a)], ["solo"], [f"{a},{a}"]):
        p = tq(repo, "compare", *tokens, check=False)
        assert "at least 2 jobs" in one_line_error(p) and p.returncode == 2
    p = tq(repo, "compare", str(a), "99", check=False)
    assert "99" in one_line_error(p) and p.returncode == 1
    p = tq(repo, "compare", str(a), "nosuchtag", check=False)
    assert "nosuchtag" in one_line_error(p)
    p = tq(repo, "compare", check=False)
    assert "Missing argument" in one_line_error(p) and p.returncode == 2
    # Two pending jobs compare fine: nothing to mark best.
    data = compare_json(repo, str(a), str(b))
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["run time"]["values"] == [None, None]
    assert all(r["best"] is None for r in data["rows"])


def test_compare_wraps_to_the_terminal(repo: Path) -> None:
    """On a terminal the table is rich's, fitted to COLUMNS (long commands wrap)."""
    import pty

    setup_repo(repo)
    long_arg = "--pad=" + "abcdefghij" * 8
    a = report(repo, "t", "loss:0.5", long_arg)
    b = report(repo, "t", "loss:0.25", long_arg + "k")
    finish(repo, a, b)
    master, slave = pty.openpty()
    proc = subprocess.Popen(["git", "tq", "compare", "t"], cwd=repo, stdin=slave,
                            stdout=slave, stderr=slave,
                            env={**os.environ, "COLUMNS": "72", "LINES": "50"})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    lines = text.replace("\r\n", "\n").splitlines()
    assert all(len(line) <= 72 for line in lines), lines
    assert any("0.25 *" in line for line in lines), text
    assert "Traceback" not in text and f"#{a}" in text and f"#{b}" in text


def test_compare_json_is_plain_data(repo: Path) -> None:
    setup_repo(repo)
    a = report(repo, "j", "loss:0.5", "mode:fast")
    b = report(repo, "j", "loss:0.5", "mode:slow")
    finish(repo, a, b)
    data = compare_json(repo, "j")
    json.dumps(data)  # nothing but JSON types
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["loss"]["best"] is None and rows["loss"]["differs"] is False  # a tie
    assert rows["mode"]["values"] == ["fast", "slow"] and rows["mode"]["best"] is None
    assert isinstance(rows["run time"]["values"][0], float)


def test_sweep_params_in_ls_and_compare(repo: Path) -> None:
    if "--sweep" not in tq(repo, "run", "-h").stdout:
        pytest.skip("git tq run --sweep is not there yet")
    setup_repo(repo)
    tq(repo, "run", "--cpu", "--sweep", "lr=1e-3,1e-2", "--sweep", "bs=16",
       "--sweep-name", "sw", "--", "python", "report.py", "--lr={lr}", "--bs={bs}",
       "lr:{lr}")
    listed = tq_json(repo, "ls", "--all")
    assert isinstance(listed, list)
    a, b = (j["id"] for j in listed)
    finish(repo, a, b)
    out = tq(repo, "ls", "--all").stdout
    assert "PARAMS" in headers(out)
    assert [ln for ln in out.splitlines() if "lr=1e-2 bs=16" in ln][0].split()[0] == str(b)
    data = compare_json(repo, "sw")
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["params"]["values"] == [{"lr": "1e-3", "bs": "16"}, {"lr": "1e-2", "bs": "16"}]
    assert rows["params"]["differing_words"] == [["lr=1e-3"], ["lr=1e-2"]]
    assert rows["command"]["differing_words"] == [["--lr=1e-3", "lr:1e-3"],
                                                  ["--lr=1e-2", "lr:1e-2"]]
    assert rows["sweep"]["values"] == ["sw", "sw"]
    assert rows["lr"]["values"] == [0.001, 0.01] and rows["lr"]["best"] == 1
