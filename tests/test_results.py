"""What every run produced is kept in git beside its code: outputs, metrics, the log.

Real jobs write files and metrics; the tests read them back with plain git
(`git show refs/tq/jobs/N:path`, `git diff ...^{/submitted}..`) and through git tq.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import git, show, submit, tq, tq_json, wait_state, wait_until

# Here `git tq run` starts the daemon, as it does for users.
pytestmark = pytest.mark.usefixtures("autostart")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_outputs_and_metrics_are_recorded_with_the_job(repo: Path) -> None:
    (repo / ".gitignore").write_text("cache/\n")
    (repo / "src").mkdir()
    (repo / "src" / "run.sh").write_text(
        "mkdir -p ../results ../cache\n"
        "echo '{\"acc\": 0.5}' > ../results/metrics.json\n"
        "echo preds > ../results/preds.csv\n"
        "echo big > ../cache/blob\n"
        "echo v2 > ../README\n"
        "echo '{\"loss\": 0.25, \"val\": {\"loss\": 0.5, \"name\": \"best\"}, \"list\": [1]}'"
        " > \"$TQ_METRICS\"\n"
        "echo '{\"acc\": 0.75, \"top\": 3}' > metrics.json\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "script")
    git(repo, "config", "tq.metrics", "metrics.json,../results/metrics.json")
    sub = repo / "src"
    j = int(tq(sub, "run", "-q", "--cpu", "sh", "run.sh").stdout)
    data = wait_state(repo, j, "done")
    # Metrics: flattened, numbers and short texts; the last file written wins key by key;
    # a file outside the job's cwd (../results/metrics.json) is never read.
    assert data["metrics"] == {"loss": 0.25, "val.loss": 0.5, "val.name": "best", "acc": 0.75,
                               "top": 3}
    # Outputs: the tip's tree is the code plus what the job wrote (not ignored ones).
    ref = f"refs/tq/jobs/{j}"
    changed = git(repo, "diff", "--name-only", f"{ref}^{{/submitted}}", ref).split()
    assert changed == ["README", "results/metrics.json", "results/preds.csv",
                       "src/metrics.json"]
    assert git(repo, "show", f"{ref}:results/preds.csv") == "preds\n"
    assert git(repo, "show", f"{ref}^{{/submitted}}:README") == "hello\n"  # the code
    assert data["outputs"] == {"files": 4, "bytes": 46, "not_recorded": [],
                               "not_recorded_count": 0, "not_recorded_bytes": 0, "error": None}
    out = tq(repo, "diff", str(j), "--outputs", "--stat").stdout
    assert "results/preds.csv" in out and "cache" not in out
    text = tq(repo, "show", str(j)).stdout
    assert "metrics    loss=0.25" in text and "outputs    4 files" in text
    # The commit shapes: every record commit's first parent is the previous record.
    shapes = git(repo, "log", "--first-parent", "--format=%s", ref).splitlines()
    assert [s.split(":")[0] for s in shapes[:3]] == [f"tq job {j} done", f"tq job {j} started",
                                                      f"tq job {j} submitted"]
    assert git(repo, "rev-parse", f"{ref}~1^{{tree}}") == \
        git(repo, "rev-parse", f"{ref}^{{/submitted}}^{{tree}}")
    # Checkout brings back the code, or with --outputs the code and what the run wrote.
    tq(repo, "checkout", "--worktree", str(repo.parent / "code"), str(j))
    assert not (repo.parent / "code" / "results").exists()
    tq(repo, "checkout", "--outputs", "--worktree", str(repo.parent / "both"), str(j))
    assert (repo.parent / "both" / "results" / "preds.csv").read_text() == "preds\n"
    assert (repo.parent / "both" / "README").read_text() == "v2\n"
    # A requeue runs the code, not the outputs.
    again = int(tq(repo, "requeue", "-q", str(j)).stdout)
    wait_state(repo, again, "done")
    assert git(repo, "rev-parse", f"refs/tq/jobs/{again}^{{/submitted}}^{{tree}}") == \
        git(repo, "rev-parse", f"{ref}^{{/submitted}}^{{tree}}")


def test_a_preempted_job_records_partial_outputs_then_final_ones(repo: Path) -> None:
    git(repo, "config", "tq.gpus", "0")
    train = str(EXAMPLES / "train.py")
    victim = submit(repo, "-p", "50", "-g", "30", "python", train, "--steps", "60",
                    "--step-seconds", "0.05")
    wait_until(lambda: (show(repo, victim)["metrics"] or {}).get("step", 0) >= 0
               and "starts at step 0" in Path(show(repo, victim)["log"]).read_text()
               if Path(show(repo, victim)["log"]).exists() else False)
    urgent = submit(repo, "-p", "10", "true")
    wait_state(repo, urgent, "done")
    done = wait_state(repo, victim, "done", timeout=30)
    stops = [e for e in done["lifecycle"] if e["event"] == "preempted"]
    assert len(stops) == 1
    preempted = stops[0]["commit"]
    partial = json.loads(git(repo, "show", f"{preempted}:checkpoint.json"))
    final = json.loads(git(repo, "show", f"refs/tq/jobs/{victim}:checkpoint.json"))
    assert 0 < partial["step"] < 60 and final["step"] == 60
    assert git(repo, "cat-file", "-t", f"{preempted}:results", check=False) == ""
    assert json.loads(git(repo, "show", f"refs/tq/jobs/{victim}:results/summary.json")) == \
        {"steps": 60, "final_step": 60}
    assert done["metrics"]["step"] == 60 and done["metrics"]["loss"] == round(1 / 61, 4)
    assert git(repo, "show", f"{preempted}", "--format=%B", "-s").count("Tq-Metrics:") == 1


def test_the_log_is_kept_in_git(repo: Path, make_repo: Any) -> None:
    git(repo, "config", "tq.logs.maxStored", "1k")
    small = submit(repo, "--cpu", "sh", "-c", "echo hello from the job")
    big = submit(repo, "--cpu", "sh", "-c",
                 "echo FIRST; i=0; while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); done; "
                 "echo LAST")
    wait_state(repo, small, "done")
    wait_state(repo, big, "done")
    log_file = Path(show(repo, small)["log"])
    log_file.unlink()  # gone from disk: the copy in git is shown
    assert "hello from the job" in tq(repo, "view", str(small)).stdout
    assert "exited with code 0" in tq(repo, "view", "-n", "1", str(small)).stdout
    stored = tq(repo, "view", str(big)).stdout  # the file is there: it is read whole
    assert "line 200" in stored
    Path(show(repo, big)["log"]).unlink()
    cut = tq(repo, "view", str(big)).stdout
    assert "FIRST" in cut and "LAST" in cut and "line 200" not in cut
    assert "bytes of this log were not stored (over tq.logs.maxStored)" in cut
    # It travels: a clone that fetches the records and the logs can read it.
    other = repo.parent / "other"
    git(repo.parent, "clone", "-q", str(repo), str(other))
    git(other, "fetch", "-q", "--no-tags", "origin", "refs/tq/*:refs/tq/*",
        "refs/notes/tq-logs:refs/notes/tq-logs")
    assert "hello from the job" in tq(other, "view", str(small)).stdout
    # rm --log removes both copies.
    tq(repo, "rm", "--log", "-y", str(small))
    p = tq(repo, "view", str(small), check=False)
    assert p.returncode != 0 and "no log" in p.stderr


def test_a_sweep_is_one_snapshot_and_many_jobs(repo: Path) -> None:
    out = tq(repo, "run", "-q", "--cpu", "--sweep", "lr=1e-3,1e-4,1e-5", "--sweep", "bs=32,64",
             "--sweep-name", "lrbs", "--", "sh", "-c",
             'echo "{\\"lr\\": $TQ_PARAM_lr}" > "$TQ_METRICS"; echo {lr} {bs} {{lr}}').stdout
    ids = [int(x) for x in out.split()]
    assert len(ids) == 6 and ids == list(range(ids[0], ids[0] + 6))
    for j in ids:
        wait_state(repo, j, "done")
    rows = {r["id"]: r for r in tq_json(repo, "ls", "--all")}  # type: ignore[union-attr]
    params = [rows[j]["params"] for j in ids]
    assert params == [{"lr": lr, "bs": bs} for lr in ("1e-3", "1e-4", "1e-5")
                      for bs in ("32", "64")]
    assert {rows[j]["sweep"] for j in ids} == {"lrbs"}
    assert {rows[j]["source"] for j in ids} == {git(repo, "rev-parse", "HEAD").strip()}
    trees = {git(repo, "rev-parse", f"refs/tq/jobs/{j}^{{/submitted}}^{{tree}}") for j in ids}
    assert len(trees) == 1  # one snapshot
    log = tq(repo, "view", str(ids[3])).stdout
    assert "1e-4 64 {lr}" in log
    assert rows[ids[3]]["metrics"] == {"lr": 0.0001}
    assert rows[ids[0]]["command"] == ["sh", "-c",
                                       'echo "{\\"lr\\": $TQ_PARAM_lr}" > "$TQ_METRICS"; '
                                       "echo 1e-3 32 {lr}"]
    # A requeued point of the sweep gets its values again.
    again = int(tq(repo, "requeue", "-q", str(ids[3])).stdout)
    assert show(repo, again)["params"] == {"lr": "1e-4", "bs": "64"}
    assert wait_state(repo, again, "done")["metrics"] == {"lr": 0.0001}
    # The sweep's name is a job list: waited for, compared in one table.
    assert tq(repo, "wait", "lrbs").returncode == 0
    table = tq_json(repo, "compare", "lrbs")
    assert [j["id"] for j in table["jobs"]] == ids + [again]  # type: ignore[index]
    lr = next(r for r in table["rows"] if r["name"] == "lr")  # type: ignore[index]
    assert lr["values"] == [0.001, 0.001, 0.0001, 0.0001, 1e-05, 1e-05, 0.0001]
    # Bad sweeps queue nothing.
    before = len(tq_json(repo, "ls", "--all"))  # type: ignore[arg-type]
    for args, message in [
        (["--sweep", "lr=1,2", "echo", "{lrr}"], "unknown placeholder {lrr}"),
        (["--sweep", "lr=", "echo", "{lr}"], "parameter lr has no values"),
        (["--sweep", "l r=1", "echo"], "is not an identifier"),
        (["--sweep", "lr=1", "--sweep", "lr=2", "echo"], "given twice"),
        (["--sweep", "lr=a\x85b", "echo"], "holds control characters"),  # C1 too
        (["--sweep", "lr=1", "--sweep-name", "401", "echo"], "would read as a job id"),
        (["--sweep", "lr=1", "--sweep-name", "4-9", "echo"], "would read as a job id"),
        (["--sweep-name", "x", "echo"], "--sweep-name needs --sweep"),
        (["--sweep", "lr=1", "--sweep-name", "a/b", "echo"], "bad tag"),
    ]:
        p = tq(repo, "run", "--cpu", *args, check=False)
        assert p.returncode in (1, 2) and message in p.stderr and p.stderr.count("\n") == 1, args
    assert len(tq_json(repo, "ls", "--all")) == before  # type: ignore[arg-type]


def test_outputs_of_a_failed_and_a_cancelled_job_are_recorded(repo: Path, tmp_path: Path) -> None:
    failed = submit(repo, "--cpu", "sh", "-c", "echo partial > out.txt; exit 3")
    wait_state(repo, failed, "failed")
    assert git(repo, "show", f"refs/tq/jobs/{failed}:out.txt") == "partial\n"
    release = tmp_path / "never"
    killed = submit(repo, "--cpu", "sh", "-c",
                    f"echo started > out.txt; while [ ! -e {release} ]; do sleep 0.05; done")
    wait_until(lambda: show(repo, killed)["state"] == "running")
    worktrees = Path(os.environ["TQ_HOME"]) / "worktrees"
    wait_until(lambda: any(worktrees.glob(f"*/{killed}/out.txt")))
    tq(repo, "kill", "--now", str(killed))
    data = wait_state(repo, killed, "cancelled")
    assert data["outputs"]["files"] == 1, (data["outputs"], Path(data["log"]).read_text())
    assert git(repo, "show", f"refs/tq/jobs/{killed}:out.txt") == "started\n"


def test_odd_metrics_files_never_hang_or_break_the_end_of_a_job(repo: Path) -> None:
    j = submit(repo, "--cpu", "sh", "-c",
               'rm -f "$TQ_METRICS"; mkfifo "$TQ_METRICS"; mkfifo metrics.json; echo done')
    data = wait_state(repo, j, "done")
    assert data["metrics"] == {} and data["outputs"]["error"] is None
    bad = submit(repo, "--cpu", "sh", "-c",
                 'printf "[1, 2]" > "$TQ_METRICS"; printf "{\\"a\\": NaN, \\"b\\": 1e999, '
                 '\\"c\\": \\"x\\\\u001b[31m\\", \\"d e\\": 2, \\"f\\": null}" > metrics.json')
    assert wait_state(repo, bad, "done")["metrics"] == {"d_e": 2}


def test_concurrent_sweeps_and_runs_keep_every_job_theirs(repo: Path) -> None:
    import subprocess

    git(repo, "config", "tq.autostart", "false")
    procs = [subprocess.Popen(["git", "tq", "run", "-q", "--cpu", "--sweep-name", f"s{n}",
                               "--sweep", "a=" + ",".join(map(str, range(40))), "true", "{a}"],
                              cwd=repo, stdout=subprocess.PIPE, text=True) for n in range(3)]
    singles = [subprocess.Popen(["git", "tq", "run", "-q", "--cpu", "true"], cwd=repo,
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    ids = []
    for p in procs + singles:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        ids += [int(x) for x in out.split()]
    assert len(ids) == len(set(ids)) == 3 * 40 + 4
    rows = tq_json(repo, "ls", "--all")
    assert isinstance(rows, list) and len(rows) == len(ids)
    assert {r["trust"] for r in rows} == {"local"}
    assert tq(repo, "doctor").returncode == 0


def test_odd_names_never_make_a_record_unreadable(repo: Path) -> None:
    git(repo, "config", "tq.outputs.maxFileSize", "10")
    j = submit(repo, "--cpu", "sh", "-c",
               'printf "{\\"+lr\\": 1, \\"/val\\": 2, \\"@s\\": 3}" > metrics.json; '
               'printf "0123456789abcdef" > "$(printf "big\\033[2Jfile.bin")"')
    data = wait_state(repo, j, "done")
    assert data["metrics"] == {"_lr": 1, "_val": 2, "_s": 3}
    outputs = data["outputs"]  # both over 10 bytes; the odd name is counted, not listed
    assert outputs["not_recorded_count"] == 2
    assert [f["path"] for f in outputs["not_recorded"]] == ["metrics.json"]
    assert "big\\x1b[2Jfile.bin" in tq(repo, "view", str(j)).stdout


def test_compare_and_wait_refuse_what_they_cannot_do(repo: Path) -> None:
    git(repo, "config", "tq.autostart", "false")
    tq(repo, "run", "-q", "--cpu", "--sweep-name", "wide", "--sweep",
       "i=" + ",".join(map(str, range(101))), "true")
    p = tq(repo, "compare", "wide", check=False)
    assert p.returncode == 2 and "at most 100 jobs" in p.stderr and p.stderr.count("\n") == 1
    for bad in ("nan", "inf"):
        p = tq(repo, "wait", "--timeout", bad, "1", check=False)
        assert p.returncode == 2 and "--timeout" in p.stderr and p.stderr.count("\n") == 1
