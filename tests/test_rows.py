"""The cached rows of `ls` and `log` (git_tq/rows.py): a cached row is used only while
everything it was made from is unchanged, and any cache file may be garbage."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from conftest import git, tq

VIEWS = (("ls", "--all", "--json"), ("log",), ("log", "--json"), ("ls", "--all"), ("ls",),
         ("ls", "-s", "cancelled", "--json"))


def cache_dir(repo: Path) -> Path:
    return repo / ".git" / "tq" / "cache"


def views(repo: Path) -> list[str]:
    """What each listing prints (times relative to now left out)."""
    return [re.sub(r" +", " ", re.sub(r"\d+\w*( \w+)? ago", "AGO", tq(repo, *args).stdout))
            for args in VIEWS]


def assert_same_as_uncached(repo: Path) -> list[str]:
    """What every listing prints with the caches as they are (twice: the first run may
    refresh them) equals what it prints with no cache at all."""
    cached = views(repo)
    assert views(repo) == cached
    shutil.rmtree(cache_dir(repo), ignore_errors=True)
    assert views(repo) == cached
    return cached


def listed(repo: Path) -> dict[int, dict[str, Any]]:
    return {j["id"]: j for j in json.loads(tq(repo, "ls", "--all", "--json").stdout)}


def finished_jobs(repo: Path, count: int = 3) -> None:
    for i in range(count):
        tq(repo, "run", "-q", "--cpu", "-t", f"t{i}", "--", "echo", str(i))
    tq(repo, "rm", f"1-{count - 1}")  # cancelled: finished records; the last one waits
    views(repo)  # the rows are cached from here on


def ledger(repo: Path) -> Path:
    found = list(Path(os.environ["TQ_HOME"]).glob("jobs/*/ledger"))
    assert len(found) == 1
    return found[0]


def test_a_note_reaches_cached_rows(repo: Path) -> None:
    finished_jobs(repo)
    tq(repo, "note", "2", "lr 3e-4 diverged")
    assert listed(repo)[2]["note"] == "lr 3e-4 diverged"
    assert "lr 3e-4 diverged" in tq(repo, "log").stdout
    tq(repo, "note", "2", "second thoughts")
    assert listed(repo)[2]["note"] == "second thoughts"
    assert_same_as_uncached(repo)


def test_a_log_filed_in_a_folder_reaches_cached_rows(repo: Path) -> None:
    finished_jobs(repo)
    old = Path(listed(repo)[1]["log"])
    folder = old.parent / "archived" / "bad"
    folder.mkdir(parents=True)
    (folder / old.name).write_text("log\n")
    row = listed(repo)[1]
    assert row["category"] == "archived/bad" and row["log"] == str(folder / old.name)
    (folder / old.name).unlink()
    assert listed(repo)[1]["category"] is None
    assert_same_as_uncached(repo)


def test_the_ledger_decides_trust_of_cached_rows(repo: Path) -> None:
    finished_jobs(repo)
    assert listed(repo)[1]["trust"] == "local"
    with open(ledger(repo), "a") as fh:  # as if job 1 had been forgotten here
        fh.write("1 -\n")
    assert listed(repo)[1]["trust"] == "fetched"
    assert "fetched: cancelled" in tq(repo, "ls", "--all").stdout
    assert_same_as_uncached(repo)
    # A compacted (rewritten) ledger is read whole again.
    lines = ledger(repo).read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.startswith(("1 ", "2 "))]
    tmp = ledger(repo).with_name("ledger.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, ledger(repo))
    rows = listed(repo)
    assert (rows[1]["trust"], rows[2]["trust"], rows[3]["trust"]) == \
        ("fetched", "fetched", "local")
    assert_same_as_uncached(repo)


def test_a_tip_moved_by_hand_is_a_new_row(repo: Path) -> None:
    finished_jobs(repo)
    tip = git(repo, "rev-parse", "refs/tq/jobs/2").strip()
    message = git(repo, "cat-file", "commit", tip).partition("\n\n")[2]
    edited = message.replace("Tq-Tag: t1", "Tq-Tag: \u202eevil")  # records refuse C0/C1
    assert edited != message
    forged = git(repo, "commit-tree", f"{tip}^{{tree}}", "-p", tip, "-m", edited).strip()
    git(repo, "update-ref", "refs/tq/jobs/2", forged)
    row = listed(repo)[2]
    assert row["trust"] == "tampered" and row["tag"] == "\u202eevil"
    raw = tq(repo, "ls", "--all", "--json").stdout
    assert "\u202e" not in raw and "\\u202e" in raw  # bidi escaped in the JSON
    text = tq(repo, "ls", "--all").stdout + tq(repo, "log").stdout
    assert "\u202e" not in text and "\\u202eevil" in text and "tampered: cancelled" in text
    assert_same_as_uncached(repo)
    git(repo, "update-ref", "refs/tq/jobs/2", tip)
    assert listed(repo)[2]["trust"] == "local"


def test_unreadable_refs_are_reported_with_a_warm_cache(repo: Path) -> None:
    finished_jobs(repo)
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    bogus = git(repo, "commit-tree", tree, "-m", "not a tq record").strip()
    git(repo, "update-ref", "refs/tq/jobs/9", bogus)
    for _ in range(2):
        p = tq(repo, "ls", "--all", "--json")
        assert "1 job record is unreadable" in p.stderr
        assert 9 not in {j["id"] for j in json.loads(p.stdout)}
        assert "(unreadable: not a valid tq job record" in tq(repo, "ls", "--all").stdout
        assert "1 job record is unreadable" in tq(repo, "ls").stderr
    assert_same_as_uncached(repo)


def test_garbage_caches_are_rebuilt(repo: Path) -> None:
    finished_jobs(repo)
    tq(repo, "note", "1", "kept")
    good = assert_same_as_uncached(repo)
    names = sorted(p.name for p in cache_dir(repo).iterdir())
    assert "rows-v1.marshal" in names and "json-v1.marshal" in names
    for garbage in (b"", b"\x00garbage", b"\xe9" * 100):
        for name in names:
            (cache_dir(repo) / name).write_bytes(garbage)
        assert views(repo) == good  # read past the garbage, and the caches written again
    assert views(repo) == good  # ...and the rewritten caches read back
    # Files from two different writes do not mix.
    saved = (cache_dir(repo) / "json-v1.marshal").read_bytes()
    tq(repo, "note", "1", "changed")
    (cache_dir(repo) / "json-v1.marshal").write_bytes(saved)
    assert listed(repo)[1]["note"] == "changed"


def test_plain_ls_reads_no_finished_row(repo: Path) -> None:
    finished_jobs(repo)
    for name in ("rows-v1.marshal", "json-v1.marshal"):
        (cache_dir(repo) / name).write_bytes(b"\x00garbage")
    os.chmod(cache_dir(repo), 0o500)  # nothing can be rewritten either
    try:
        out = tq(repo, "ls").stdout
        assert out.splitlines()[1].split()[:2] == ["3", "pending"]
        assert len(out.splitlines()) == 2
    finally:
        os.chmod(cache_dir(repo), 0o700)


def test_plain_ls_lists_no_ref_while_none_changed(repo: Path) -> None:
    """Once the refs, the notes and the ledger have settled, plain `ls` takes the active
    jobs from active-v1.marshal; any change to them is seen at once."""
    from conftest import wait_until

    finished_jobs(repo)
    tq(repo, "run", "-q", "--cpu", "-t", "second", "--", "echo", "x")
    snapshot = cache_dir(repo) / "active-v1.marshal"

    def settled_ls() -> str:
        def saved() -> bool:
            if snapshot.exists():
                snapshot.unlink()
            tq(repo, "ls", "--json")
            return snapshot.exists()
        wait_until(saved, timeout=10)
        out = tq(repo, "ls", "--json").stdout  # from the snapshot
        shutil.rmtree(cache_dir(repo))
        assert tq(repo, "ls", "--json").stdout == out  # as with no cache at all
        return out

    jobs = json.loads(settled_ls())
    assert [j["id"] for j in jobs] == [3, 4]
    # A record moved by hand (no git tq command, no nudge): seen by the next `ls`.
    tip = git(repo, "rev-parse", "refs/tq/jobs/4").strip()
    message = git(repo, "cat-file", "commit", tip).partition("\n\n")[2]
    forged = git(repo, "commit-tree", f"{tip}^{{tree}}", "-p", tip, "-m",
                 message.replace("Tq-Tag: second", "Tq-Tag: moved")).strip()
    settled_ls()
    git(repo, "update-ref", "refs/tq/jobs/4", forged)
    row = json.loads(tq(repo, "ls", "--json").stdout)[1]
    assert row["tag"] == "moved" and row["trust"] == "tampered"
    git(repo, "update-ref", "refs/tq/jobs/4", tip)
    settled_ls()
    tq(repo, "note", "3", "a note")  # the notes ref moves
    assert json.loads(tq(repo, "ls", "--json").stdout)[0]["note"] == "a note"
    settled_ls()
    tq(repo, "rm", "4")  # the record and the ledger move
    assert [j["id"] for j in json.loads(tq(repo, "ls", "--json").stdout)] == [3]
    for garbage in (b"", b"\x00garbage"):
        snapshot.write_bytes(garbage)
        assert [j["id"] for j in json.loads(tq(repo, "ls", "--json").stdout)] == [3]


def test_listings_of_ended_jobs_are_read_whole_and_see_every_change(repo: Path) -> None:
    """With every job ended, `ls --all --json` and `log` print from one file each
    (all-json-v1, log-v1) once the refs, notes, ledger and log folders have settled;
    any change to what they show is seen by the next call."""
    from conftest import wait_until

    finished_jobs(repo)
    tq(repo, "rm", "3")  # every job ended
    whole = [cache_dir(repo) / "all-json-v1.marshal", cache_dir(repo) / "log-v1.marshal"]

    def settled_views() -> list[str]:
        def saved() -> bool:
            for path in whole:
                path.unlink(missing_ok=True)
            tq(repo, "ls", "--all", "--json")
            tq(repo, "log")
            return all(path.exists() for path in whole)
        wait_until(saved, timeout=10)
        return [tq(repo, "ls", "--all", "--json").stdout, tq(repo, "log").stdout]

    first = settled_views()
    tq(repo, "note", "2", "a note")  # the notes ref moves
    assert listed(repo)[2]["note"] == "a note" and "a note" in tq(repo, "log").stdout
    settled_views()
    tip = git(repo, "rev-parse", "refs/tq/jobs/1").strip()  # a fetched job arrives
    git(repo, "update-ref", "refs/tq/origins/bob@box/jobs/1", tip)
    names = {j["name"] for j in json.loads(tq(repo, "ls", "--all", "--json").stdout)}
    assert "bob@box:1" in names
    assert "#bob@box:1" in tq(repo, "log").stdout
    git(repo, "update-ref", "-d", "refs/tq/origins/bob@box/jobs/1")
    old = Path(listed(repo)[1]["log"])  # a log filed into a folder
    settled_views()
    folder = old.parent / "archived"
    folder.mkdir(parents=True)
    (folder / old.name).write_text("log\n")
    assert listed(repo)[1]["category"] == "archived"
    settled_views()
    (folder / old.name).unlink()
    assert listed(repo)[1]["category"] is None
    settled_views()
    tq(repo, "run", "-q", "--cpu", "--", "echo", "new")  # an active job: never kept whole
    for path in whole:
        path.unlink(missing_ok=True)
    assert len(listed(repo)) == 4 and not whole[0].exists()
    tq(repo, "rm", "4")
    assert settled_views() != first
    assert_same_as_uncached(repo)
