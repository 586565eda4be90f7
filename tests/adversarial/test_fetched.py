"""Records written by someone else never run, never steer a command, never touch a file.

A "teammate" repository crafts job records the way an attacker would (raw
commit objects with arbitrary trailers, `git hash-object --literally`), and
the victim fetches them with the plain refspec while the daemon runs. Then
every command of the CLI is run against them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import git, tq, tq_json, wait_until

FETCH = ["fetch", "-q", "teammate", "refs/tq/*:refs/tq/*", "refs/notes/tq:refs/notes/tq"]
SECRET = "ghp_victim_secret_token_123"


def craft(repo: Path, fields: dict[str, str], parent: Optional[str] = None,
          subject: str = "tq job 1 submitted: train") -> str:
    """A raw commit object with exactly these trailers, as an attacker would write it."""
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    body = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "") + \
        "author Mallory <m@evil> 1700000000 +0000\n" \
        "committer Mallory <m@evil> 1700000000 +0000\n\n" + subject + "\n\n" + \
        "".join(f"Tq-{k}: {v}\n" for k, v in fields.items())
    p = subprocess.run(["git", "hash-object", "-t", "commit", "--literally", "-w", "--stdin"],
                       cwd=repo, input=body.encode(), capture_output=True, check=True)
    return p.stdout.decode().strip()


def record(job_id: int | str, marker: Path, **changes: str) -> dict[str, str]:
    fields = {
        "Format": "1", "Job": str(job_id), "Event": "submitted", "State": "pending",
        "Command": json.dumps(["sh", "-c", f"touch {marker}; env > {marker}.env"]),
        "Priority": "1", "Grace": "1", "Gpus": "cpu", "Cwd": ".",
        "Submitted-At": "2026-01-01T00:00:00+00:00", "User": "mallory", "Host": "evil",
        "Source": "none", "Changes": "M=0 A=0 D=0",
    }
    fields.update(changes)
    return fields


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes (and every symlink's target)."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """The victim's HOME with what an attacker would like to overwrite or steal."""
    home = Path(os.environ["HOME"])
    (home / ".bashrc").write_text("# victim's bashrc\n")
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----\nvictim\n")
    (home / "victim.json").write_text('{"precious": true}\n')
    return home


class Scene:
    """A victim repository with its own jobs, a teammate clone that crafts records."""

    def __init__(self, make_repo: Any, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.victim = make_repo("victim")
        (self.victim / "wait.py").write_text(
            "import os, sys, time\nopen(sys.argv[1], 'w').write(os.environ.get('GITHUB_TOKEN',"
            " ''))\n")
        git(self.victim, "add", "-A")
        git(self.victim, "commit", "-qm", "waiter")
        self.teammate = tmp_path / "teammate"
        git(tmp_path, "clone", "-q", str(self.victim), str(self.teammate))
        git(self.victim, "remote", "add", "teammate", str(self.teammate))

    def marker(self, name: str) -> Path:
        return self.markers / name

    def crafted_markers(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir() if p.name.startswith("evil"))

    def plant(self, ref: str, oid: str) -> None:
        git(self.teammate, "update-ref", ref, oid)

    def fetch(self) -> None:
        has_notes = git(self.teammate, "rev-parse", "-q", "--verify", "refs/notes/tq",
                        check=False).strip()
        git(self.victim, *(FETCH if has_notes else FETCH[:-1]))


@pytest.fixture
def scene(make_repo: Any, tmp_path: Path) -> Scene:
    return Scene(make_repo, tmp_path)


def start_daemon(repo: Path) -> None:
    tq(repo, "start", env={"GITHUB_TOKEN": SECRET})


def own_job_runs(scene: Scene, name: str) -> int:
    """Submit a job of the victim's own and wait until it has run (the daemon has cycled)."""
    marker = scene.marker(name)
    job_id = int(tq(scene.victim, "run", "-q", "--cpu", "python", "wait.py", str(marker),
                    env={"GITHUB_TOKEN": SECRET}).stdout)
    wait_until(lambda: tq_json(scene.victim, "show", str(job_id))["state"] == "done",  # type: ignore[index]
               timeout=30)
    assert marker.read_text() == SECRET  # the victim's own job gets the victim's environment
    return job_id


def test_fetched_records_never_run_steer_or_touch(scene: Scene, decoy: Path) -> None:
    victim, mate = scene.victim, scene.teammate
    before = tree_digest(decoy)
    hooks = victim / ".git" / "hooks"
    hook_log = scene.tmp / "hooks.log"
    for event in ("submit", "start", "resume", "preempt", "finish"):
        hook = hooks / f"tq-{event}"
        hook.write_text(f"#!/bin/sh\necho \"{event} $TQ_JOB_ID $TQ_COMMAND\" >> {hook_log}\n")
        hook.chmod(0o755)

    # The victim's own queue before the fetch: job 1 pending (no daemon yet), job 2 done later.
    own1 = int(tq(victim, "run", "-q", "--cpu", "python", "wait.py", str(scene.marker("own1")),
                  env={"GITHUB_TOKEN": SECRET}).stdout)
    git(mate, "fetch", "-q", "origin", "refs/tq/*:refs/tq/*")
    own1_tip = git(mate, "rev-parse", f"refs/tq/jobs/{own1}").strip()
    own1_submission = own1_tip

    # Finding 1: a record whose snapshot names the victim's own job; one appended to the
    # victim's own job ref (a fast-forward); Tq-Snapshot pointing into the tq home.
    scene.plant("refs/tq/jobs/50", craft(mate, record(50, scene.marker("evil-snapshot"),
                                                      Snapshot=own1_submission)))
    scene.plant(f"refs/tq/jobs/{own1}", craft(
        mate, record(own1, scene.marker("evil-ff"), Snapshot=own1_submission,
                     Event="preempted", Attempt="1"), parent=own1_tip))
    scene.plant("refs/tq/jobs/51", craft(mate, record(51, scene.marker("evil-home"),
                                                      Snapshot="../../daemon")))
    # Finding 2: option injection through the snapshot field.
    scene.plant("refs/tq/jobs/52", craft(mate, record(
        52, scene.marker("evil-diff"), Snapshot=f"--output={decoy / '.bashrc'}")))
    scene.plant("refs/tq/jobs/53", craft(mate, record(
        53, scene.marker("evil-note"), Snapshot=f"-F{decoy / '.ssh' / 'id_rsa'}")))
    # Finding 3: paths from records.
    scene.plant("refs/tq/jobs/54", craft(mate, record(54, scene.marker("evil-cwd"),
                                                      Cwd="../../../../tmp/x")))
    scene.plant("refs/tq/jobs/59", craft(mate, record(
        59, scene.marker("evil-forget"), State="done", Event="finished",
        Snapshot=f"../../../../..{decoy}/victim", **{"Ended-At": "2026-01-01T00:01:00+00:00",
                                                     "Exit-Code": "0"})))
    # Finding 4: a running record (the daemon must not preempt or finish it) and a done one.
    scene.plant("refs/tq/jobs/55", craft(mate, record(
        55, scene.marker("evil-running"), State="running", Event="started", Attempt="1",
        Priority="900", **{"Started-At": "2026-01-01T00:00:30+00:00", "Assigned-Gpus": "0"})))
    scene.plant("refs/tq/jobs/56", craft(mate, record(
        56, scene.marker("evil-requeue"), State="done", Event="finished", Attempt="1",
        **{"Started-At": "2026-01-01T00:00:30+00:00", "Ended-At": "2026-01-01T00:01:00+00:00",
           "Exit-Code": "0"})))
    # Finding 5: one bad time stamp must not hide the others; an unknown format.
    scene.plant("refs/tq/jobs/57", craft(mate, record(
        57, scene.marker("evil-naive"), State="done", Event="finished",
        **{"Ended-At": "2026-01-01T00:01:00", "Exit-Code": "0"})))
    scene.plant("refs/tq/jobs/58", craft(mate, record(58, scene.marker("evil-format"),
                                                      Format="7")))
    # Finding 6: a zero-padded ref name claiming an existing id.
    scene.plant("refs/tq/jobs/0124", craft(mate, record(124, scene.marker("evil-dup"))))
    ended = {"Exit-Code": "0", "Ended-At": "2026-01-01T00:01:00+00:00"}
    scene.plant("refs/tq/jobs/124", craft(mate, record(124, scene.marker("evil-124"),
                                                       State="done", Event="finished", **ended)))
    # A note on a crafted record, shared through refs/notes/tq.
    git(mate, "notes", "--ref=tq", "add", "-m", "\x1b]0;pwned\x07 note", "refs/tq/jobs/56")
    scene.fetch()  # plain, non-forced: job own1 is fast-forwarded to the crafted commit

    start_daemon(victim)
    own2 = own_job_runs(scene, "own2")

    # Listing: everything readable is listed, every bad record once, nothing crashes.
    p = tq(victim, "ls", "--all")
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr
    lines = p.stdout.splitlines()
    for bad in ("51", "52", "53", "54", "57", "58", "0124"):
        assert sum(1 for ln in lines if ln.split()[:1] == [bad] and "unreadable" in ln) == 1, bad
    listed = {j["id"]: j for j in tq_json(victim, "ls", "--all")}  # type: ignore[union-attr]
    assert listed[own1]["trust"] == "tampered"
    assert listed[own2]["trust"] == "local" and listed[own2]["state"] == "done"
    assert listed[50]["trust"] == listed[55]["trust"] == listed[56]["trust"] == "fetched"
    assert list(listed).count(124) == 1 and listed[124]["state"] == "done"
    for cmd in (["ls"], ["ls", "-s", "done"], ["log"], ["ls", "--all", "--json"], ["hist"],
                ["doctor"]):
        p = tq(victim, *cmd, check=False)
        assert p.returncode in (0, 1) and "Traceback" not in p.stderr + p.stdout, cmd

    # Every command against the crafted records: one-line refusals or harmless reads.
    for args in (["show", "50"], ["show", "55"], ["show", "56"], ["show", str(own1)],
                 ["diff", "52"], ["diff", "50", "56"], ["diff", "56", "--stat"],
                 ["note", "53", "x"], ["note", "56", "mine"], ["note", "50", "-a", "more"],
                 ["rm", "50"], ["rm", "--forget", "59"], ["rm", "--forget", "56"],
                 ["kill", "55"], ["kill", str(own1)], ["requeue", "56"], ["requeue", "59"],
                 ["view", "56"], ["view", "52"], ["catg", "56", "x"], ["rm", "--log", "-y", "56"],
                 ["checkout", "56", "--worktree", str(scene.tmp / "wt56")], ["purge", "-y"],
                 ["show", "0124"], ["show", "57"], ["note", "58", "y"]):
        p = tq(victim, *args, check=False)
        assert "Traceback" not in p.stderr and "internal error" not in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) <= 1, (args, p.stderr)
    assert tq(victim, "rm", "50", check=False).returncode == 1
    assert "read-only" in tq(victim, "rm", "--forget", "56", check=False).stderr
    assert "not trusted" in tq(victim, "requeue", "56", check=False).stderr
    assert tq(victim, "show", "55").returncode == 0

    # Requeue of a fetched job: its code, the caller's command and environment, said so.
    p = tq(victim, "requeue", "-q", "56", "--", "python", "wait.py",
           str(scene.marker("own-requeue")), env={"GITHUB_TOKEN": "current-env"})
    assert "runs its code with your command and your environment" in p.stderr
    again = int(p.stdout)
    wait_until(lambda: tq_json(victim, "show", str(again))["state"] == "done",  # type: ignore[index]
               timeout=30)
    assert scene.marker("own-requeue").read_text() == "current-env"

    # The daemon wrote nothing onto fetched records, ran no hook for them, ran nothing of them.
    assert git(victim, "rev-parse", "refs/tq/jobs/55").strip() == \
        git(mate, "rev-parse", "refs/tq/jobs/55").strip()
    assert listed[55]["state"] == "running"
    hook_lines = hook_log.read_text().splitlines() if hook_log.exists() else []
    assert all(ln.split()[1] in (str(own2), str(again)) for ln in hook_lines), hook_lines
    assert scene.crafted_markers() == []
    assert tree_digest(decoy) == before
    notes = git(victim, "log", "-p", "refs/notes/tq", check=False)
    assert "PRIVATE KEY" not in notes

    # The tampered job: explained, restorable, and then it runs its own command.
    p = tq(victim, "doctor", check=False)
    assert p.returncode == 1 and f"job {own1}: tampered" in p.stdout
    p = tq(victim, "doctor", "--restore", check=False)
    assert f"job {own1}: restored" in p.stdout
    wait_until(lambda: tq_json(victim, "show", str(own1))["state"] == "done",  # type: ignore[index]
               timeout=30)
    assert scene.marker("own1").read_text() == SECRET
    assert scene.crafted_markers() == []
    assert tree_digest(decoy) == before


def test_private_records_are_deleted_when_jobs_end(repo: Path, tmp_path: Path) -> None:
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")
    job_id = int(tq(repo, "run", "-q", "--cpu", "true", env={"GITHUB_TOKEN": SECRET}).stdout)
    folder = Path(os.environ["TQ_HOME"]) / "jobs"
    assert any(SECRET in p.read_text() for p in folder.glob("*/*.json"))
    wait_until(lambda: tq_json(repo, "show", str(job_id))["state"] == "done",  # type: ignore[index]
               timeout=30)
    wait_until(lambda: not list(folder.glob("*/*.json")), timeout=10)
    # The ledger keeps only object ids: what `requeue`, `rm --forget` and `doctor` need.
    ledger = next(folder.glob("*/ledger")).read_text()
    assert SECRET not in ledger and ledger.split()[0] == str(job_id)
    assert tq_json(repo, "show", str(job_id))["trust"] == "local"  # type: ignore[index]


def test_unknown_records_are_warned_about_once(scene: Scene) -> None:
    for i in range(60, 160):
        scene.plant(f"refs/tq/jobs/{i}", craft(scene.teammate, record(
            i, scene.marker("evil-many"), Format="9")))
    scene.fetch()
    p = tq(scene.victim, "ls")
    assert p.stderr.count("\n") == 1 and "100 job records are unreadable" in p.stderr
    start_daemon(scene.victim)
    for name in ("own-a", "own-b", "own-c"):  # three jobs: many cycles of the daemon
        own_job_runs(scene, name)
    log = (Path(os.environ["TQ_HOME"]) / "daemon.log").read_text()
    assert log.count("is unreadable") == 100
    assert scene.crafted_markers() == []


def as_an_older_git_tq_left_it() -> dict[str, Any]:
    """Turn the one job's private record into what a git tq older than the ledger left:
    a private file named by the submission (in the old format) and no ledger. The
    record as it was."""
    folder = next((Path(os.environ["TQ_HOME"]) / "jobs").iterdir())
    spec_file = next(folder.glob("*.json"))
    spec: dict[str, Any] = json.loads(spec_file.read_text())
    (folder / "ledger").unlink()
    spec_file.write_text(json.dumps({"repo": "x", "snapshot": spec["submission"],
                                     "worktree": spec["source_dir"], "env": spec["environ"]}))
    return spec


def test_jobs_of_an_older_git_tq_are_adopted_with_their_submitted_command(
        scene: Scene) -> None:
    victim = scene.victim
    own = int(tq(victim, "run", "-q", "--cpu", "python", "wait.py", str(scene.marker("old")),
                 env={"GITHUB_TOKEN": SECRET}).stdout)
    spec = as_an_older_git_tq_left_it()
    # ... and a teammate appended a record with another command to that job's ref.
    git(scene.teammate, "fetch", "-q", "origin", "refs/tq/*:refs/tq/*")
    tip = git(scene.teammate, "rev-parse", f"refs/tq/jobs/{own}").strip()
    scene.plant(f"refs/tq/jobs/{own}", craft(scene.teammate, record(
        own, scene.marker("evil-adopt"), Snapshot=spec["submission"]), parent=tip))
    scene.fetch()
    assert tq_json(victim, "show", str(own))["trust"] == "fetched"  # type: ignore[index]
    p = tq(victim, "doctor", check=False)
    assert f"git tq doctor --adopt {own}" in p.stdout
    p = tq(victim, "doctor", "--adopt", str(own))
    assert "python wait.py" in p.stdout and "touch" not in p.stdout
    assert tq_json(victim, "show", str(own))["trust"] == "local"  # type: ignore[index]
    start_daemon(victim)
    wait_until(lambda: scene.marker("old").exists(), timeout=30)
    assert scene.marker("old").read_text() == SECRET
    assert scene.crafted_markers() == []
    assert "cannot be adopted" in tq(victim, "doctor", "--adopt", "1", check=False).stderr or \
        "nothing to adopt" in tq(victim, "doctor", "--adopt", "1", check=False).stderr
