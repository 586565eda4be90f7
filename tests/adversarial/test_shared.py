"""A crafted record pushed by "the other machine" and fetched with `git tq fetch`: shown
escaped or refused, never run, never followed as a path, no hook run for it, and never
let into our own origin's namespace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import git, tq, wait_until

from adversarial.test_fetched import craft, record, tree_digest

pytestmark = pytest.mark.usefixtures("autostart")


def test_a_crafted_fetched_record_is_handled_safely(make_repo: Any, tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    alice = make_repo("alice")
    git(alice, "config", "tq.origin", "alice@gpu1")
    git(alice, "remote", "add", "origin", str(remote))
    git(alice, "push", "-q", "origin", "main")
    mallory = tmp_path / "mallory"
    git(tmp_path, "clone", "-q", str(remote), str(mallory))
    home = Path(tmp_path / "home")
    (home / ".bashrc").write_text("# victim's bashrc\n")
    before = tree_digest(home)
    hook_log = tmp_path / "hooks.log"
    for event in ("submit", "start", "finish"):
        hook = alice / ".git" / "hooks" / f"tq-{event}"
        hook.write_text(f"#!/bin/sh\necho \"{event} $TQ_JOB_ID\" >> {hook_log}\n")
        hook.chmod(0o755)
    marker = tmp_path / "evil-ran"

    # Mallory's records: a tag and cwd with ../ and /, control characters, a pending
    # state (never run here), a malformed one, a spoof of alice's own origin, and a ref
    # whose origin is no user@host.
    evil = craft(mallory, record(5, marker, State="running", Event="started", Attempt="1",
                                 **{"Started-At": "2026-01-01T00:00:01+00:00"},
                                 Command=json.dumps(["sh", "-c", f"touch {marker}",
                                                     "\x1b]0;pwned\x07\x1b[2J"])))
    pending = craft(mallory, record(6, marker))
    bad_tag = craft(mallory, record(8, marker, Tag="../../.bashrc"))
    bad_cwd = craft(mallory, record(10, marker, Cwd="../.."))
    broken = craft(mallory, record(7, marker, Priority="lots"))
    spoof = craft(mallory, record(9, marker))
    pushes = [f"{evil}:refs/tq/origins/mallory@box/jobs/5",
              f"{pending}:refs/tq/origins/mallory@box/jobs/6",
              f"{broken}:refs/tq/origins/mallory@box/jobs/7",
              f"{bad_tag}:refs/tq/origins/mallory@box/jobs/8",
              f"{bad_cwd}:refs/tq/origins/mallory@box/jobs/10",
              f"{spoof}:refs/tq/origins/alice@gpu1/jobs/9",
              f"{pending}:refs/tq/origins/nobody/jobs/6"]
    git(mallory, "push", "-q", "origin", *pushes)
    # A huge note on Mallory's job, pushed through the notes ref.
    huge = tmp_path / "huge-note"
    huge.write_text("N" * 1_000_000 + "\x1b[31m")
    git(mallory, "notes", "--ref=tq", "add", "-F", str(huge), evil)
    git(mallory, "push", "-q", "origin", "refs/notes/tq:refs/notes/tq")

    tq(alice, "start")
    out = tq(alice, "fetch").stdout
    assert out.startswith("6 jobs, 1 note, 0 logs fetched")
    tips = git(alice, "for-each-ref", "--format=%(refname)", "refs/tq/")
    assert "alice@gpu1" not in tips  # our own origin is never fetched into origins/
    own = int(tq(alice, "run", "-q", "--cpu", "true").stdout)  # the daemon cycles
    wait_until(lambda: json.loads(tq(alice, "show", str(own), "--json").stdout)["state"]
               == "done", timeout=30)

    listing = tq(alice, "ls", "--all")
    assert "\x1b" not in listing.stdout and "\x07" not in listing.stdout
    assert "mallory@box:5" in listing.stdout
    assert "N" * 100 not in listing.stdout  # the note is shortened in a listing
    for name, why in (("mallory@box:7", "Tq-Priority"), ("mallory@box:8", "Tq-Tag"),
                      ("mallory@box:10", "Tq-Cwd")):  # refused, listed as unreadable
        assert f"{name}" in listing.stdout and why in listing.stdout
    assert "origins/nobody/jobs/6" in listing.stdout
    data = {j["name"]: j for j in json.loads(tq(alice, "ls", "--all", "--json").stdout)}
    assert data["mallory@box:5"]["log"] == "" and data["mallory@box:5"]["category"] is None
    assert data["mallory@box:5"]["trust"] == "fetched"
    shown = tq(alice, "show", "mallory@box:5").stdout
    assert "\x1b" not in shown and "\\x1b]0;pwned" in shown
    p = tq(alice, "view", "mallory@box:5", check=False)
    assert p.returncode == 1 and "not on this machine" in p.stderr
    assert p.stderr.count("\n") == 1
    for args in (["kill", "mallory@box:5"], ["note", "mallory@box:7", "x"],
                 ["requeue", "mallory@box:5"], ["view", "-f", "mallory@box:6"]):
        p = tq(alice, *args, check=False)
        assert p.returncode in (1, 2) and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1, p.stderr

    # Nothing of theirs ran, no hook saw them, no file outside moved.
    assert not marker.exists()
    hooks = hook_log.read_text() if hook_log.exists() else ""
    assert all(line.split()[1] == str(own) for line in hooks.splitlines())
    assert tree_digest(home) == before
    assert not (alice / ".git" / "tq" / "logs" / ".bashrc").exists()
