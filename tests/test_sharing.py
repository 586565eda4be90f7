"""Sharing runs: two "machines" on one host (two tq homes, two tq.origin values, two
clones of one bare remote) push and fetch each other's jobs, notes, logs and results."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import git, tq, wait_until

pytestmark = pytest.mark.usefixtures("autostart")

JOB = ('echo "hello from $(git config tq.origin)"; echo \'{"loss": %s}\' > "$TQ_METRICS"; '
       'echo result > out.txt')


class Machine:
    """One clone with its own tq home and origin."""

    def __init__(self, path: Path, home: Path, origin: str) -> None:
        self.path, self.origin = path, origin
        self.env = {"TQ_HOME": str(home)}
        git(path, "config", "tq.origin", origin)
        git(path, "config", "tq.gpus", "0,1")

    def tq(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return tq(self.path, *args, check=check, env=self.env)

    def json(self, *args: str) -> Any:
        return json.loads(self.tq(*args, "--json").stdout)

    def run_done(self, loss: str) -> int:
        job_id = int(self.tq("run", "-q", "--cpu", "sh", "-c", JOB % loss).stdout)
        wait_until(lambda: self.json("show", str(job_id))["state"] == "done", timeout=40)
        # the ending and the log note are written before `done` shows; nothing else moves
        return job_id


@pytest.fixture
def lab(make_repo: Any, tmp_path: Path) -> Any:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    a_path = make_repo("alice")
    git(a_path, "remote", "add", "origin", str(remote))
    git(a_path, "push", "-q", "origin", "main")
    git(a_path, "branch", "-q", "--set-upstream-to=origin/main")
    b_path = tmp_path / "bob"
    git(tmp_path, "clone", "-q", str(remote), str(b_path))
    alice = Machine(a_path, tmp_path / "tqhome", "alice@gpu1")
    bob = Machine(b_path, tmp_path / "tqhome-bob", "bob@gpu2")
    yield alice, bob, remote
    bob.tq("stop", check=False)


def refs(path: Path, prefix: str = "refs/") -> dict[str, str]:
    out = git(path, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
    return dict(line.split() for line in out.splitlines())


def test_two_machines_share_jobs_logs_outputs_metrics_and_notes(lab: Any) -> None:
    alice, bob, remote = lab
    a1, b1 = alice.run_done("0.5"), bob.run_done("0.25")
    assert a1 == b1 == 1  # the same id on both machines

    branches = refs(alice.path, "refs/heads/")
    assert alice.tq("push").stdout.startswith("1 job, 0 notes, 1 log pushed (to origin)")
    assert "refs/tq/origins/alice@gpu1/jobs/1" in refs(remote, "refs/tq/")
    assert "1 job," in bob.tq("push").stdout
    assert refs(alice.path, "refs/heads/") == branches

    # Each fetches the other's: job 1 of each, side by side, never overwriting.
    # (bob's push merged alice's stored log into his notes already)
    assert bob.tq("fetch").stdout.startswith("1 job, 0 notes, 0 logs fetched")
    assert alice.tq("fetch").stdout.startswith("1 job, 0 notes, 1 log fetched")
    assert "refs/tq/origins/alice@gpu1/jobs/1" not in refs(alice.path, "refs/tq/")  # ours
    listed = {j["name"]: j for j in alice.json("ls", "--all")}
    assert set(listed) == {"1", "bob@gpu2:1"}
    theirs = listed["bob@gpu2:1"]
    assert theirs["origin"] == "bob@gpu2" and listed["1"]["origin"] is None
    assert theirs["trust"] == "fetched" and theirs["metrics"] == {"loss": 0.25}
    assert theirs["outputs"]["files"] >= 1 and theirs["log"] == ""
    text = alice.tq("ls", "--all").stdout
    assert "bob@gpu2:1" in text
    assert [j["name"] for j in alice.json("ls", "--all", "--mine")] == ["1"]
    assert [j["name"] for j in alice.json("ls", "--all", "--origin", "bob@gpu2")] == \
        ["bob@gpu2:1"]
    assert [j["name"] for j in alice.json("ls", "--all", "--origin", "alice@gpu1")] == ["1"]

    # Metric series travel in refs/notes/tq-series: both jobs' notes, read by plot.
    assert len(git(alice.path, "notes", "--ref=tq-series", "list").split()) == 4
    plotted = json.loads(alice.tq("plot", "bob@gpu2:1", "--json").stdout)["jobs"][0]
    assert plotted["job"] == "bob@gpu2:1" and plotted["series"]["loss"]["total"] == 1
    # view: the log came in refs/notes/tq-logs; show, log, compare, diff, checkout read it.
    assert "hello from bob@gpu2" in alice.tq("view", "bob@gpu2:1").stdout
    assert "hello from alice@gpu1" in alice.tq("view", "1").stdout
    assert alice.tq("show", "bob@gpu2:1").stdout.startswith("job bob@gpu2:1")
    log = alice.tq("log").stdout
    assert "#1 " in log and "#bob@gpu2:1" in log
    commits = alice.json("log")
    assert {j["name"] for c in commits for j in c["jobs"]} == {"1", "bob@gpu2:1"}
    compared = alice.json("compare", "1", "bob@gpu2:1")
    loss = next(r for r in compared["rows"] if r["name"] == "loss")
    assert loss["values"] == [0.5, 0.25] and loss["best"] == 1
    assert "out.txt" in alice.tq("diff", "bob@gpu2:1", "--outputs", "--stat").stdout
    wt = alice.path.parent / "bobs-code"
    alice.tq("checkout", "bob@gpu2:1", "--worktree", str(wt))
    assert (wt / "train.py").exists()

    # Read-only: no kill, rm, note-less edits in place; requeue makes a local job.
    for args in (["kill", "bob@gpu2:1"], ["rm", "--forget", "bob@gpu2:1"]):
        p = alice.tq(*args, check=False)
        assert p.returncode == 1 and "fetched from bob@gpu2" in p.stderr
        assert "Traceback" not in p.stderr
    new = alice.tq("requeue", "bob@gpu2:1", "--", "true").stdout
    assert "job 2" in new
    for bad in ("bob@gpu2:0", "bob@gpu2:x", "bad..origin@x:1", "nobody@nowhere:1"):
        p = alice.tq("show", bad, check=False)
        assert p.returncode in (1, 2) and p.stderr.count("\n") == 1, p.stderr

    # Both annotate bob's job; a push and fetches merge the notes (both texts kept).
    alice.tq("note", "bob@gpu2:1", "alice: looks good")
    bob.tq("note", "1", "bob: lr too high")
    assert "1 note" in bob.tq("push").stdout
    assert "1 note" in alice.tq("push").stdout  # fetched bob's notes first, merged them
    bob.tq("fetch")
    for m, name in ((alice, "bob@gpu2:1"), (bob, "1")):
        note = m.json("show", name)["note"]
        assert "alice: looks good" in note and "bob: lr too high" in note


def test_rewinding_push_is_refused_and_fast_forward_works(lab: Any, tmp_path: Path) -> None:
    alice, bob, remote = lab
    alice.run_done("1")
    alice.tq("push")
    # A second clone on the same machine with the same origin: its job 1 is another job.
    twin = tmp_path / "twin"
    git(tmp_path, "clone", "-q", str(remote), str(twin))
    other = Machine(twin, tmp_path / "tqhome-twin", "alice@gpu1")
    try:
        other.run_done("2")
        p = other.tq("push", check=False)
        assert p.returncode == 1 and "job 1" in p.stderr and "rewind" in p.stderr
        assert p.stderr.count("\n") == 1
        assert refs(remote, "refs/tq/")["refs/tq/origins/alice@gpu1/jobs/1"] == \
            refs(alice.path, "refs/tq/jobs/")["refs/tq/jobs/1"]
    finally:
        other.tq("stop", check=False)
    # New lifecycle commits on a pushed job fast-forward the remote's ref.
    gate = tmp_path / "go"
    job = int(alice.tq("run", "-q", "--cpu", "sh", "-c",
                       f"while [ ! -e {gate} ]; do sleep 0.05; done").stdout)
    wait_until(lambda: alice.json("show", str(job))["state"] == "running", timeout=30)
    alice.tq("push")
    gate.write_text("")
    wait_until(lambda: alice.json("show", str(job))["state"] == "done", timeout=30)
    assert alice.tq("push").stdout.startswith("1 job,")
    assert refs(remote, "refs/tq/")[f"refs/tq/origins/alice@gpu1/jobs/{job}"] == \
        refs(alice.path, "refs/tq/jobs/")[f"refs/tq/jobs/{job}"]


def test_dry_run_changes_nothing_and_bad_remotes_are_one_line(lab: Any, tmp_path: Path) -> None:
    alice, bob, remote = lab
    alice.run_done("1")
    alice.tq("note", "1", "hi")
    before_remote, before_local = refs(remote), refs(alice.path)
    out = alice.tq("push", "--dry-run").stdout
    assert out.startswith("1 job, 1 note, 1 log would be pushed")
    assert refs(remote) == before_remote and refs(alice.path) == before_local
    alice.tq("push")
    before_bob = refs(bob.path)
    assert bob.tq("fetch", "-n").stdout.startswith("1 job, 1 note, 1 log would be fetched")
    assert refs(bob.path) == before_bob
    for args, word in ((["push", "nosuch"], "no remote 'nosuch'"),
                       (["fetch", "-x"], "No such option"),
                       (["push", str(tmp_path / "missing.git")], "git ls-remote")):
        p = alice.tq(*args, check=False)
        assert p.returncode in (1, 2) and word in p.stderr and p.stderr.count("\n") == 1, \
            p.stderr
    git(alice.path, "config", "tq.origin", "../evil@x")
    p = alice.tq("push", check=False)
    assert p.returncode == 2 and "bad tq.origin" in p.stderr and p.stderr.count("\n") == 1


def test_file_url_and_path_remotes(lab: Any) -> None:
    alice, bob, remote = lab
    alice.run_done("1")
    assert alice.tq("push", f"file://{remote}").stdout.startswith("1 job")
    assert bob.tq("fetch", str(remote)).stdout.startswith("1 job")
    assert bob.json("show", "alice@gpu1:1")["metrics"] == {"loss": 1}
    assert bob.tq("fetch", f"file://{remote}").stdout.startswith("0 jobs")


def test_auto_push_after_each_job(lab: Any) -> None:
    alice, bob, remote = lab
    git(alice.path, "config", "tq.autoPush", "true")
    job = alice.run_done("3")
    ref = f"refs/tq/origins/alice@gpu1/jobs/{job}"
    wait_until(lambda: refs(remote, "refs/tq/").get(ref) ==
               refs(alice.path, "refs/tq/jobs/").get(f"refs/tq/jobs/{job}"), timeout=30)
    wait_until(lambda: "refs/notes/tq-logs" in refs(remote, "refs/notes/"), timeout=30)
    # A failing push (the remote gone) is logged by the daemon, never affects the job.
    os.rename(remote, str(remote) + ".gone")
    job2 = alice.run_done("4")
    assert alice.json("show", str(job2))["state"] == "done"
    daemon_log = Path(alice.env["TQ_HOME"]) / "daemon.log"
    wait_until(lambda: "tq.autoPush failed (not retried)" in daemon_log.read_text(),
               timeout=30)
    assert alice.json("show", str(job2))["state"] == "done"
