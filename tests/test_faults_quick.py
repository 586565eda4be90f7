"""Part 10, the quick part of the soak (tests/soak/ runs the long one with `pytest -m slow`):
the daemon killed during a preemption, concurrent submissions, and hostile records that
are malformed, huge, hold control characters or `../` paths, through every command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from adversarial.test_fetched import tree_digest
from adversarial.test_terminal import assert_inert
from conftest import git, tq, wait_until
from soak import faults


def test_daemon_killed_three_times_during_a_preemption_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the daemon just after an urgent job is submitted (the preemption under
    way), once the victim has checkpointed, and while the urgent job runs: every job ends
    once, with its exit code and every line it printed."""
    t = faults.make_repo(tmp_path / "r", os.environ, {"job.py": faults.JOB})
    markers = tmp_path / "markers"
    markers.mkdir()
    expected: dict[int, int] = {}

    gate = tmp_path / "gate"

    def job(code: int, steps: int, *args: str, gated: bool = False) -> int:
        jid = int(t.submit(*args, "--", "python", "job.py", str(markers), str(code),
                           str(steps), "0.05", *([str(gate)] if gated else [])))
        expected[jid] = code
        return jid

    def kill_and_restart() -> None:
        os.kill(t.daemon_pid(), signal.SIGKILL)
        t.start()

    victim = job(0, 4, "--gpus", "1", "-p", "50", "-g", "60", gated=True)
    for code in (0, 1, 3):
        job(code, 2, "--cpu")
    t.start()
    wait_until(lambda: (markers / f"{victim}.starts").exists(), timeout=30)
    urgent = job(42, 6, "--gpus", "1", "-p", "10", "-g", "60")
    kill_and_restart()
    wait_until(lambda: (markers / f"{victim}.preempted").exists(), timeout=30)
    gate.touch()  # its next attempt finishes
    kill_and_restart()
    job(0, 2, "--cpu")
    job(7, 1, "--cpu")
    wait_until(lambda: (markers / f"{urgent}.starts").exists(), timeout=30)
    kill_and_restart()
    wait_until(lambda: all(j["state"] in faults.END_STATES for i, j in t.jobs().items()
                           if i in expected), timeout=90)
    figures = faults.DaemonFigures(rounds=3, kills=3, jobs=len(expected))
    faults.count_daemon_round(t, markers, expected, figures)
    assert figures.zero(), figures.problems
    assert figures.preemptions >= 1 and figures.log_lines > 0
    assert t.jobs()[victim]["attempt"] == 2
    assert figures.attempts == len(expected) + 1  # the victim's resume, nothing more


def test_concurrent_submissions_give_distinct_jobs(tmp_path: Path) -> None:
    figures = faults.concurrent_runs(tmp_path / "c", 32, 8, env=os.environ)
    assert figures.ok(), (figures.summary(), figures.problems)


# ---------------------------------------------------------------- hostile records


def raw_commit(repo: Path, message: bytes) -> str:
    """A commit object with exactly this message, written as an attacker would."""
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    body = (f"tree {tree}\nauthor M <m@evil> 1700000000 +0000\n"
            "committer M <m@evil> 1700000000 +0000\n\n").encode() + message
    p = subprocess.run(["git", "hash-object", "-t", "commit", "--literally", "-w", "--stdin"],
                       cwd=repo, input=body, capture_output=True, check=True)
    return p.stdout.decode().strip()


def record(job_id: int, marker: Path, **changes: str) -> bytes:
    fields = {
        "Format": "1", "Job": str(job_id), "Event": "submitted", "State": "pending",
        "Command": json.dumps(["sh", "-c", f"touch {marker}"]), "Priority": "1",
        "Grace": "1", "Gpus": "cpu", "Cwd": ".", "Submitted-At": "2026-01-01T00:00:00+00:00",
    }
    fields.update(changes)
    return ("tq job submitted\n\n" + "".join(f"Tq-{k}: {v}\n" for k, v in fields.items())
            ).encode()


def hostile_refs(repo: Path, marker: Path) -> dict[str, str]:
    """Ref name suffix (a job id, or not) -> object: malformed, huge, controls, `../`."""
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo, input=b"blob",
                          capture_output=True, check=True).stdout.decode().strip()
    many = b"tq job\n\nTq-Format: 1\nTq-Job: 24\n" + b"".join(
        b"Tq-X%d: %d\n" % (i, i) for i in range(100_000))
    return {
        "20": raw_commit(repo, b"no trailers at all\n"),
        "21": raw_commit(repo, b"tq job\n\nTq-Format 1\nTq-Job:: 21\n: \nTq-: x\nTq-Job\n"),
        "22": raw_commit(repo, record(22, marker, Command=json.dumps(["x" * 2_000_000]))),
        "23": raw_commit(repo, record(23, marker, Detail="d" * 1_000_000)),
        "24": raw_commit(repo, many),
        "25": raw_commit(repo, record(25, marker, Tag="../../../.bashrc")),
        "26": raw_commit(repo, record(26, marker, Tag="t\x1b]0;pwned\x07\x9b2J")),
        "27": raw_commit(repo, record(27, marker, Cwd="../../..")),
        "28": raw_commit(repo, record(28, marker, Cwd="/etc")),
        "29": raw_commit(repo, record(29, marker, Detail="\x1b[2J\r\u202eevil", State="done",
                                      Event="finished", **{"Exit-Code": "0"},
                                      **{"Ended-At": "2026-01-01T00:01:00+00:00"})),
        "30": raw_commit(repo, record(30, marker) + b"Tq-User: a\x00b\nTq-Host: \xff\xfe\n"),
        "31": raw_commit(repo, record(31, marker, Job="../31")),
        "32": raw_commit(repo, record(32, marker, Command="not json \x1b[31m")),
        "33": tree,
        "34": blob,
        "0035": raw_commit(repo, record(35, marker)),
        "x/y": raw_commit(repo, record(36, marker)),
    }


def assert_safe(p: subprocess.CompletedProcess[bytes], args: tuple[str, ...]) -> None:
    assert p.returncode in (0, 1), (args, p.returncode, p.stderr)
    err = assert_inert(p.stderr)
    assert "Traceback" not in err and "internal error" not in err, (args, err)
    assert len(err.strip().splitlines()) <= 1, (args, err)
    assert_inert(p.stdout)


def run_bytes(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "tq", *args], cwd=repo, capture_output=True, timeout=60)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files a hostile record or a symlink would like to reach: HOME's, and a folder."""
    home = Path(os.environ["HOME"])
    (home / ".bashrc").write_text("# the user's bashrc\n")
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "decoy").write_text("precious\n")
    return folder


def untouched(outside: Path, before: dict[str, str]) -> None:
    assert tree_digest(outside) == before
    assert (Path(os.environ["HOME"]) / ".bashrc").read_text() == "# the user's bashrc\n"


def test_hostile_local_records_are_shown_or_refused(repo: Path, outside: Path) -> None:
    """Refs under refs/tq/jobs/ (a hand edit, a plain `git fetch` of someone's refs) that
    are no records, or malformed, huge, with controls or `../`: every command lists them
    as unreadable or refuses them in one line, runs nothing and writes nothing outside."""
    marker = outside / "evil-ran"
    before = tree_digest(outside)
    for name, oid in hostile_refs(repo, marker).items():
        git(repo, "update-ref", f"refs/tq/jobs/{name}", oid)
    own = int(tq(repo, "run", "-q", "--cpu", "--", "true").stdout)
    listing = run_bytes(repo, "ls", "--all")
    assert_safe(listing, ("ls", "--all"))
    text = listing.stdout.decode()
    for name in ("20", "21", "22", "23", "24", "25", "26", "27", "28", "30", "31", "32", "33",
                 "34", "0035", "x/y"):
        assert any(ln.split()[:1] == [name] and "unreadable" in ln
                   for ln in text.splitlines()), (name, text)
    assert "x" * 1000 not in text and "d" * 1000 not in text
    cmds: list[tuple[str, ...]] = [("ls",), ("ls", "--json"), ("ls", "--all", "--json"),
                                   ("log",), ("hist",), ("top", "--once"), ("doctor",),
                                   ("gc",), ("show", str(own))]
    for name in ("20", "21", "24", "29", "30", "0035"):
        cmds.append(("show", name))
    for name in ("22", "26", "34"):  # huge, controls, no commit: every command
        cmds += [("show", name, "--json"), ("view", name), ("rm", name),
                 ("rm", "--log", "-y", name), ("gc", name), ("kill", name)]
    cmds += [("rm", "--forget", "23"), ("catg", "25", "x"), ("note", "26", "n"),
             ("requeue", "29"), ("show", "x/y"), ("view", "x/y")]
    for args in cmds:
        assert_safe(run_bytes(repo, *args), args)
    # Started, the daemon reads them all, runs only ours, and writes none of them.
    tips = git(repo, "for-each-ref", "refs/tq/jobs/")
    tq(repo, "start")
    wait_until(lambda: json.loads(tq(repo, "show", str(own), "--json").stdout)["state"]
               == "done", timeout=30)
    tq(repo, "stop")
    after = git(repo, "for-each-ref", "refs/tq/jobs/")
    assert [ln for ln in after.splitlines() if not ln.endswith(f"refs/tq/jobs/{own}")] == \
        [ln for ln in tips.splitlines() if not ln.endswith(f"refs/tq/jobs/{own}")]
    assert not marker.exists()
    untouched(outside, before)
    crash = Path(os.environ["TQ_HOME"]) / "crash.log"
    assert not crash.exists(), crash.read_text()


@pytest.mark.slow  # (~7 s); adversarial/test_shared covers crafted fetched records: pytest -m slow
def test_hostile_fetched_records_are_shown_or_refused(make_repo: object, tmp_path: Path,
                                                     outside: Path) -> None:
    """The same records pushed under another origin and taken with `git tq fetch`."""
    assert callable(make_repo)
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    alice: Path = make_repo("alice")
    git(alice, "config", "tq.origin", "alice@gpu1")
    git(alice, "remote", "add", "origin", str(remote))
    git(alice, "push", "-q", "origin", "main")
    mallory = tmp_path / "mallory"
    git(tmp_path, "clone", "-q", str(remote), str(mallory))
    marker = outside / "evil-ran"
    refs = hostile_refs(mallory, marker)
    pushes = [f"{oid}:refs/tq/origins/mallory@box/jobs/{name}" for name, oid in refs.items()]
    git(mallory, "push", "-q", "origin", *pushes)
    before = tree_digest(outside)
    assert_safe(run_bytes(alice, "fetch"), ("fetch",))
    assert_safe(run_bytes(alice, "fetch", "-n"), ("fetch", "-n"))
    listing = run_bytes(alice, "ls", "--all")
    assert_safe(listing, ("ls", "--all"))
    assert "mallory@box" in listing.stdout.decode()
    cmds: list[tuple[str, ...]] = [("ls", "--all", "--json"), ("log",), ("top", "--once"),
                                   ("doctor",), ("gc",), ("hist",)]
    for name in ("20", "24", "25", "29", "30", "34"):
        cmds.append(("show", f"mallory@box:{name}"))
    for name in ("22", "26"):
        job = f"mallory@box:{name}"
        cmds += [("show", job, "--json"), ("view", job), ("rm", job),
                 ("rm", "--log", "-y", job), ("kill", job), ("requeue", job)]
    for args in cmds:
        assert_safe(run_bytes(alice, *args), args)
    assert not marker.exists()
    untouched(outside, before)
    assert not (alice / ".git" / "tq" / "logs" / ".bashrc").exists()


def test_log_symlinks_are_not_followed_out_of_the_log_folder(repo: Path, outside: Path) -> None:
    """A log file that is a symlink, a category folder that is one: `rm --log` removes the
    link and never its target, the log search does not walk into the folder, and `catg`
    refuses to file into it."""
    tq(repo, "start")
    job = int(tq(repo, "run", "-q", "--cpu", "--", "echo", "hello").stdout)
    other = int(tq(repo, "run", "-q", "--cpu", "--", "echo", "again").stdout)
    wait_until(lambda: all(json.loads(tq(repo, "show", str(j), "--json").stdout)["state"]
                           == "done" for j in (job, other)), timeout=30)
    tq(repo, "stop")
    log = Path(json.loads(tq(repo, "show", str(job), "--json").stdout)["log"])
    other_log = Path(json.loads(tq(repo, "show", str(other), "--json").stdout)["log"])
    log.unlink()
    log.symlink_to(outside / "decoy")
    # the other job's log moved out, and a folder of the log root that leads there
    other_log.rename(outside / other_log.name)
    (log.parent / "evil").symlink_to(outside)
    before = tree_digest(outside)
    for args in (("view", str(job)), ("view", str(other)), ("hist",), ("ls", "--all"),
                 ("show", str(other)), ("gc",), ("top", "--once"), ("log",)):
        assert_safe(run_bytes(repo, *args), args)
    p = run_bytes(repo, "catg", str(job), "evil")
    assert p.returncode == 2 and b"leave the log root" in p.stderr
    assert_safe(run_bytes(repo, "rm", "--log", "-y", str(other)), ("rm", "--log", str(other)))
    assert_safe(run_bytes(repo, "rm", "--log", "-y", str(job)), ("rm", "--log", str(job)))
    assert not log.is_symlink()  # the link went, its target stayed
    untouched(outside, before)
