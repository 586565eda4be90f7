"""Hostile text never reaches a terminal raw: records, notes, commit subjects, logs.

Job records and notes can come from a teammate's fetched refs and logs hold
whatever a job printed, so an OSC 52 (clipboard write) or OSC 0 (window title)
sequence, a C1 CSI or a bidi override in them must be shown as text, never
sent to the terminal, both through rich (on a terminal) and as plain text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pexpect
import pytest
from conftest import git, tq, tq_json, wait_until
from hypothesis import given
from hypothesis import strategies as st

from git_tq.safetext import json_safe, visible, visible_bytes, visible_stream

OSC52 = "\x1b]52;c;SGVsbG8=\x1b\\"  # ST-terminated: rich does not strip it
OSC0 = "\x1b]0;pwned\x07"
C1 = "\x9b31m"
BIDI = "\u202egnp.exe"
NOTE = f"clip {OSC52} title {OSC0} csi {C1} bidi {BIDI} end"
COMMAND = ["printf", "\x1b]0;x\x07 \x9b2J \u2066"]
SUBJECT = "fix \x1b]0;pwned\x07 \x9b1;1H"

BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's own styling (bold, dim) on a terminal


def unsafe_chars(text: str, allowed: str = "\n\t") -> list[str]:
    """Characters a terminal would act on: C0 (but `allowed`), DEL, C1, bidi controls."""
    return [c for c in text if (ord(c) < 0x20 and c not in allowed) or 0x7f <= ord(c) <= 0x9f
            or c in BIDI_CONTROLS]


def assert_inert(out: bytes, *, tty: bool = False) -> str:
    """`out` holds no raw control sequence (a terminal's own \\r\\n and, with `tty`,
    rich's SGR styling aside); returns it decoded."""
    assert b"\x07" not in out
    text = out.decode("utf-8")  # strict: valid UTF-8 too
    if tty:
        text = SGR.sub("", text.replace("\r\n", "\n"))
    assert "\x1b" not in text, text
    assert not unsafe_chars(text), (unsafe_chars(text), text)
    return text


@pytest.fixture
def hostile(repo: Path) -> Path:
    """A repository whose job 1 has a hostile command, note and source commit subject."""
    (repo / "train.py").write_text("print('v2')\n")
    git(repo, "commit", "-qam", SUBJECT)
    tq(repo, "run", "-q", "--cpu", "--", *COMMAND)
    tq(repo, "note", "1", NOTE)
    log = Path(tq_json(repo, "show", "1")["log"])  # type: ignore[index]
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()  # hist lists the jobs that have a log
    return repo


def run_bytes(repo: Path, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "tq", *args], cwd=repo, capture_output=True, check=False,
                          env={**os.environ, **(env or {})})


def run_tty(repo: Path, *args: str, term: str = "xterm", env: dict[str, str] | None = None,
            check: bool = True) -> bytes:
    """`git tq ARGS` in a pseudo-terminal (so the rich path runs); all it printed."""
    child = pexpect.spawn("git", ["tq", *args], cwd=str(repo), timeout=30,
                          env={**os.environ, "TERM": term, "NO_COLOR": "1", **(env or {})},
                          dimensions=(60, 400))
    try:
        child.expect(pexpect.EOF)
        out = child.before
    finally:
        child.close()
    assert isinstance(out, bytes)
    assert child.exitstatus == 0 or not check, out
    return out


LISTINGS = [("show", "1"), ("ls",), ("ls", "--all"), ("log",), ("hist",)]


@pytest.mark.parametrize("args", LISTINGS, ids=" ".join)
def test_listings_off_a_terminal_show_escapes(hostile: Path, args: tuple[str, ...]) -> None:
    p = run_bytes(hostile, *args)
    assert p.returncode == 0, p.stderr
    text = assert_inert(p.stdout)
    assert_inert(p.stderr)
    if args[0] in ("show", "ls", "log"):
        assert "\\x1b]0;x\\x07" in text  # the command, visibly
    if args[0] in ("show", "hist"):
        assert visible(NOTE)[:60] in text  # hist shortens notes
    if args[0] == "show":
        assert visible(NOTE) in text
        assert "\\x1b]52;c;SGVsbG8=\\x1b\\" in text and "\\x9b31m" in text
        assert "\\u202egnp.exe" in text
    if args[0] == "log":
        assert visible(SUBJECT) in text


@pytest.mark.parametrize("args", LISTINGS, ids=" ".join)
def test_listings_on_a_terminal_show_escapes(hostile: Path, args: tuple[str, ...]) -> None:
    # a plain terminal: nothing but text may come out, not even rich's styling
    text = assert_inert(run_tty(hostile, *args, term="dumb"), tty=True)
    if args[0] in ("show", "hist"):
        assert visible(NOTE)[:60] in text
    # a colour terminal: rich's own SGR styling only
    text = assert_inert(run_tty(hostile, *args), tty=True)
    if args[0] in ("show", "ls", "log"):
        assert "\\x1b]0;x\\x07" in text


@pytest.mark.parametrize("args", [("show", "1"), ("ls", "--all"), ("log",), ("hist",)],
                         ids=" ".join)
def test_json_keeps_the_exact_text_and_is_inert(hostile: Path, args: tuple[str, ...]) -> None:
    tq(hostile, "run", "-q", "--cpu", "true")  # a second job, to have two in the list
    for out in (run_bytes(hostile, *args, "--json").stdout,
                run_tty(hostile, *args, "--json").replace(b"\r\n", b"\n")):
        assert_inert(out)  # \u escapes only
        data = json.loads(out)
        if args[0] == "show":
            jobs = [data]
        elif args[0] == "log":
            jobs = [j for entry in data for j in entry["jobs"]]
            assert SUBJECT in [entry["subject"] for entry in data]
        elif args[0] == "hist":
            jobs = data["logs"]
        else:
            jobs = data
        one = next(j for j in jobs if j["id"] == 1)
        assert one["note"] == NOTE and one["command"] == COMMAND


def test_a_crafted_record_is_shown_inert(hostile: Path) -> None:
    """A record written by hand (as a fetched one could be) with controls in its fields:
    whether it is read or refused, nothing raw reaches the output or the errors."""
    tip = git(hostile, "rev-parse", "refs/tq/jobs/1").strip()
    tree = git(hostile, "rev-parse", f"{tip}^{{tree}}").strip()
    original = git(hostile, "log", "-1", "--format=%B", tip)

    def craft(job_id: int, message: str) -> None:
        message = re.sub(r"(?m)^Tq-Job: .*$", lambda _: f"Tq-Job: {job_id}", message)
        crafted = subprocess.run(["git", "commit-tree", tree, "-p", tip, "-m", message],
                                 cwd=hostile, capture_output=True, text=True, check=True)
        git(hostile, "update-ref", f"refs/tq/jobs/{job_id}", crafted.stdout.strip())

    # a well-formed record: the command is JSON, its escapes decode to raw controls
    command = ["sh", "-c", f"echo {OSC52}{OSC0}{C1}{BIDI}"]
    craft(2, re.sub(r"(?m)^Tq-Command: .*$",
                    lambda _: "Tq-Command: " + json.dumps(command), original))
    # raw controls in plain fields (a reader may refuse the record: then its error)
    bad = re.sub(r"(?m)^Tq-User: .*$", lambda _: f"Tq-User: me{OSC0}", original)
    bad = re.sub(r"(?m)^Tq-Host: .*$", lambda _: f"Tq-Host: h{C1}{BIDI}", bad)
    craft(3, bad.replace("Tq-State: pending", f"Tq-State: pending\nTq-Detail: {OSC52}"))
    for args in (("ls", "--all"), ("show", "2"), ("show", "3"), ("log",), ("hist",)):
        p = run_bytes(hostile, *args)
        assert_inert(p.stdout)
        assert_inert(p.stderr)
        assert_inert(run_tty(hostile, *args, term="dumb", check=False), tty=True)
        assert_inert(run_tty(hostile, *args, check=False), tty=True)
    text = assert_inert(run_bytes(hostile, "show", "2").stdout)
    assert visible(command[2]) in text
    assert tq_json(hostile, "show", "2")["command"] == command  # type: ignore[index]


def test_errors_are_inert(hostile: Path) -> None:
    for args in (("show", f"x{OSC0}"), ("hist", f"no{C1}such"), (f"bogus{OSC52}",),
                 ("catg", "1", f"/abs{OSC0}")):
        p = run_bytes(hostile, *args)
        assert p.returncode != 0
        assert_inert(p.stdout)
        assert_inert(p.stderr)
        assert b"\\x" in p.stderr or b"\\u" in p.stderr, p.stderr  # shown, escaped


def test_view_shows_escapes_and_raw_gives_the_bytes(hostile: Path) -> None:
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")
    tq(hostile, "start")
    wait_until(lambda: tq_json(hostile, "show", "1")["state"] == "done",  # type: ignore[index]
               timeout=30)
    log = Path(tq_json(hostile, "show", "1")["log"])  # type: ignore[index]
    raw = log.read_bytes()
    assert b"\x1b]0;x\x07" in raw  # the job printed the sequence itself
    with log.open("ab") as fh:
        fh.write(b"bad utf-8 \xff, euro \xe2\x82\xac, cr\r\n")
    raw = log.read_bytes()
    for args in (("view", "1"), ("view", "-n", "3", "1"), ("view", "-f", "1")):
        out = assert_inert(run_bytes(hostile, *args).stdout)
        assert "\\x1b]0;x\\x07" in out and "\\x9b2J" in out and "\\u2066" in out
        assert "bad utf-8 \\xff, euro €, cr\\r\n" in out
        text = assert_inert(run_tty(hostile, *args, env={"PAGER": "cat"}), tty=True)
        assert "\\x1b]0;x\\x07" in text
    assert run_bytes(hostile, "view", "--raw", "1").stdout == raw
    assert run_bytes(hostile, "view", "--raw", "-n", "1", "1").stdout == \
        raw.splitlines(keepends=True)[-1]
    assert b"\x1b]0;x\x07" in run_tty(hostile, "view", "--raw", "1", env={"PAGER": "cat"})


def test_top_is_inert(hostile: Path, tmp_path: Path) -> None:
    """The dashboard: the queue's commands and a running job's last log line."""
    git(Path(os.environ["HOME"]), "config", "--global", "tq.autostart", "true")
    gate = tmp_path / "gate"
    tq(hostile, "run", "-q", "--gpu", "0", "sh", "-c",
       f"printf 'step 1 \\033]0;pwned\\007 \\302\\233 done\\n'; while [ ! -e {gate} ]; do "
       "sleep 0.05; done")
    tq(hostile, "run", "-q", "--gpu", "0", "--", *COMMAND)  # waits behind it: in the queue
    wait_until(lambda: tq_json(hostile, "show", "2")["state"] == "running",  # type: ignore[index]
               timeout=30)
    log = Path(tq_json(hostile, "show", "2")["log"])  # type: ignore[index]
    wait_until(lambda: log.exists() and b"done" in log.read_bytes())
    try:
        wide = {"COLUMNS": "400", "LINES": "60"}  # rich's size on a dumb terminal: 80x25
        for out in (run_bytes(hostile, "top", "--once", env=wide).stdout,
                    run_tty(hostile, "top", "--once", term="dumb", env=wide)):
            text = assert_inert(out, tty=True)
            assert "\\x1b]0;pwned\\x07 \\x9b done" in text  # the last log line
            assert "\\x1b]0;x\\x07" in text  # a queued command
        assert_inert(run_tty(hostile, "top", "--once"), tty=True)
    finally:
        gate.touch()


def test_console_queue_and_logs_modes_are_inert(hostile: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "NO_COLOR": "1",
           "PAGER": "cat"}
    child = pexpect.spawn("git", ["tq"], cwd=str(hostile), env=env, timeout=20,
                          dimensions=(50, 300))
    seen = b""
    try:
        prompt = rb"\(tq:any\|(ON|OFF)\)( \[[A-Z:/]+\])? >"
        child.expect(prompt)
        for line in ("q", "back", "hist", "view 1"):
            # type the line, wait until the console took it, then for the next prompt
            child.send(line)
            child.expect_exact(line)
            child.send("\r")
            child.expect("\r\n")
            child.expect(prompt)
            seen += bytes(child.before)
        child.sendline("exit")
        child.expect(pexpect.EOF)
        seen += bytes(child.before)
    finally:
        child.close()
    # prompt_toolkit draws with escape sequences of its own; none of the hostile ones
    for raw in (b"\x1b]52", b"\x1b]0;", b"\x07", "\x9b".encode(), "\u202e".encode(),
                "\u2066".encode()):
        assert raw not in seen, raw
    text = seen.decode()
    assert "waiting in queue any: 1" in text and "you are here" in text
    assert "\\x1b]0;x\\x07" in text  # the command in Queue mode
    assert "\\x1b]52;c;SGVsbG8=" in text  # the note in Logs mode


# --- the sanitiser itself ---------------------------------------------------------------


def test_visible_rules() -> None:
    assert visible(OSC52) == "\\x1b]52;c;SGVsbG8=\\x1b\\"
    assert visible(OSC0) == "\\x1b]0;pwned\\x07"
    assert visible("a\rb\nc\td\x00\x7f\x85\x9b") == "a\\rb\\nc\td\\x00\\x7f\\x85\\x9b"
    assert visible("a\nb", newlines=True) == "a\nb"
    assert visible("\u202a\u202e\u2066\u2069") == "\\u202a\\u202e\\u2066\\u2069"
    assert visible("é € 日本 \\x1b [red]") == "é € 日本 \\x1b [red]"
    assert visible("\udcff") == "\\xff"  # a byte that was not UTF-8 (surrogateescape)
    assert visible_bytes(b"ok\n\t\x1b[2J\xff\xe2\x82\xac\r\n") == \
        b"ok\n\t\\x1b[2J\\xff\xe2\x82\xac\\r\n"
    # a UTF-8 character split between two reads is decoded whole
    assert b"".join(visible_stream([b"\xe2\x82", b"\xac\x1b", b"\xe2"])) == \
        "€".encode() + b"\\x1b\\xe2"
    encoded = json_safe(json.dumps(["\x9b\u202e\x7f é"], ensure_ascii=False))
    assert encoded == '["\\u009b\\u202e\\u007f é"]' and json.loads(encoded) == ["\x9b\u202e\x7f é"]


@given(st.text(), st.booleans())
def test_visible_never_lets_a_control_through(text: str, newlines: bool) -> None:
    out = visible(text, newlines=newlines)
    assert not unsafe_chars(out, "\t\n" if newlines else "\t")
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in out)
    out.encode("utf-8")  # always printable to a UTF-8 terminal
    assert visible(out, newlines=newlines) == out  # idempotent


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs"))
               .filter(lambda c: c not in BIDI_CONTROLS) | st.just("\t")))
def test_visible_is_the_identity_on_printable_text(text: str) -> None:
    """Everything but the controls passes unchanged: any script, emoji, spaces, marks,
    backslashes, rich markup."""
    assert visible(text) == text
    assert visible(text + "\n", newlines=True) == text + "\n"
    assert visible(text + "\n") == text + "\\n"


@given(st.binary())
def test_visible_bytes_never_lets_a_control_through(data: bytes) -> None:
    out = visible_bytes(data)
    assert not unsafe_chars(out.decode("utf-8"))
    halves = [data[: len(data) // 2], data[len(data) // 2:]]
    assert b"".join(visible_stream(halves)) == out  # pieces change nothing


@given(st.recursive(st.none() | st.text() | st.integers(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)))
def test_json_output_is_inert_and_exact(data: object) -> None:
    encoded = json_safe(json.dumps(data, ensure_ascii=False))
    assert not unsafe_chars(encoded, "")
    assert json.loads(encoded) == data
