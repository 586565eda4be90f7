"""The record decoder and the ledger under hostile input: typed values or typed errors."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_tq import recordfmt
from git_tq.lifecycle import EVENTS
from git_tq.localjobs import FETCHED, LOCAL, TAMPERED, LedgerEntry, LocalJobs
from git_tq.model import EVENT_NAMES, Job

TIP = "c" * 40
GOOD = {
    "Format": "1", "Job": "7", "Event": "submitted", "State": "pending",
    "Command": json.dumps(["python", "train.py"]), "Priority": "10", "Grace": "60",
    "Gpus": "0,1", "Cwd": "src", "Submitted-At": "2026-01-02T03:04:05+00:00", "User": "ana",
    "Host": "box", "Source": "b" * 40, "Changes": "M=1 A=0 D=0",
}
FIELDS = sorted(GOOD) + ["Snapshot", "Tag", "Env", "Shell", "Attempt", "Started-At",
                         "Ended-At", "Exit-Code", "Signal", "Assigned-Gpus", "Detail", "After",
                         "After-Any"]


def message(fields: dict[str, str]) -> str:
    return "subject\n\n" + "".join(f"Tq-{k}: {v}\n" for k, v in fields.items())


def test_event_names_match_the_lifecycle() -> None:
    # "edited" changes a job's options, never its state (lifecycle.apply_edit)
    assert set(EVENTS) | {"submitted", "edited"} == EVENT_NAMES


@pytest.mark.parametrize("field,value,reason", [
    ("Job", "0124", "canonical"), ("Job", "-3", "canonical"), ("Job", "1e3", "canonical"),
    ("Snapshot", "--output=/home/u/.bashrc", "object id"),
    ("Snapshot", "-F/home/u/.ssh/id_rsa", "object id"), ("Snapshot", "../../daemon", "object id"),
    ("Snapshot", "a" * 64, "object id"),  # SHA-256 length in a SHA-1 repository
    ("Source", "HEAD", "object id"),
    ("Cwd", "../../../../tmp/x", "relative path"), ("Cwd", "/etc", "relative path"),
    ("Cwd", "a/../../b", "relative path"), ("Cwd", "a//b", "relative path"),
    ("Cwd", ".git/hooks", "relative path"), ("Cwd", "x\x1b]0;t\x07", "relative path"),
    ("Ended-At", "2026-01-01T00:01:00", "offset"), ("Submitted-At", "yesterday", "offset"),
    ("Started-At", "2026-13-01T00:00:00+00:00", "valid time"),
    ("State", "exploded", "state"), ("Event", "rm -rf", "event"),
    ("Command", "[]", "non-empty"), ("Command", '"sh"', "non-empty"),
    ("Command", "[" * 100_000, "64 KiB"), ("Command", "[" * 60_000, "JSON"),
    ("Command", '["a", 1]', "non-empty"),
    ("Tag", "../x", "tag"), ("Tag", "-rf", "tag"), ("Tag", "a\x1bb", "tag"),
    ("Gpus", "0;rm", "Gpus"), ("Assigned-Gpus", "any:2", "GPU ids"),
    ("Priority", "9" * 40, "number"), ("Grace", "-1", "number"), ("Exit-Code", "x", "number"),
    ("Signal", "0", "number"), ("Changes", "M=1", "M=n"), ("Shell", "no", "yes"),
    ("Env", "-c", "conda"), ("User", "a\x9bb", "control"), ("Format", "9", "newer"),
])
def test_each_bad_field_is_a_typed_error(field: str, value: str, reason: str) -> None:
    with pytest.raises(recordfmt.RecordFormatError, match=reason):
        recordfmt.decode(message({**GOOD, field: value}), TIP)


def test_the_good_record_decodes() -> None:
    job = recordfmt.decode(message(GOOD), TIP)
    assert (job.id, job.spec.cwd, job.snapshot, job.spec.gpus.ids) == (7, "src", TIP, (0, 1))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=80), max_size=len(FIELDS)),
       st.booleans())
def test_random_trailers_give_a_record_or_a_typed_error(random: dict[str, str],
                                                        start_good: bool) -> None:
    fields = {**GOOD, **random} if start_good else random
    fields = {k: v.replace("\n", " ").replace("\r", " ") for k, v in fields.items()}
    try:
        job = recordfmt.decode(message(fields), TIP)
    except recordfmt.RecordFormatError:
        return
    assert isinstance(job, Job)
    assert ".." not in job.spec.cwd.split("/") and not job.spec.cwd.startswith("/")
    assert len(job.snapshot) == 40 and all(c in "0123456789abcdef" for c in job.snapshot)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_random_messages_give_a_record_or_a_typed_error(text: str) -> None:
    with contextlib.suppress(recordfmt.RecordFormatError):
        recordfmt.decode(text, TIP)


# --- the ledger -----------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> LocalJobs:
    return LocalJobs(str(tmp_path / "home"), str(tmp_path / "repo" / ".git"))


def test_ledger_trust(ledger: LocalJobs) -> None:
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    with ledger.locked():
        ledger.record(1, LedgerEntry(a, a, b))  # a write in flight: both tips are ours
    assert ledger.trust(1, a) == ledger.trust(1, b) == LOCAL
    assert ledger.trust(1, c) == TAMPERED and ledger.trust(2, a) == FETCHED
    with ledger.locked():
        ledger.record(1, LedgerEntry(a, b, None))
    assert ledger.trust(1, a) == TAMPERED  # an old record of ours, put back: not trusted
    with ledger.locked():
        ledger.record(1, None)
    assert ledger.trust(1, b) == FETCHED
    assert oct(os.stat(ledger.ledger_path).st_mode & 0o777) == "0o600"


def test_ledger_ignores_torn_and_foreign_lines(ledger: LocalJobs) -> None:
    a = "a" * 40
    with ledger.locked():
        ledger.record(1, LedgerEntry(a, a, None))
    with open(ledger.ledger_path, "a") as fh:
        fh.write("2 ../../x a b\n0003 " + a + " " + a + " -\n4 " + a)  # junk, then torn
    assert set(ledger.entries()) == {1}
    with open(ledger.ledger_path, "a") as fh:
        fh.write(" " + a + " -\n")  # the torn line completed
    assert set(ledger.entries()) == {1, 4}


def test_ledger_reads_incrementally_and_compacts(ledger: LocalJobs) -> None:
    oids = [f"{i:040x}" for i in range(1, 4001)]
    with ledger.locked():
        for i, oid in enumerate(oids):  # many writes to a few jobs: superseded lines
            ledger.record(1 + i % 5, LedgerEntry(oids[0], oid, None))
    entries = ledger.entries()
    assert len(entries) == 5 and entries[5].tip == oids[-1]
    assert os.path.getsize(ledger.ledger_path) > 256 * 1024
    assert ledger.compact_if_sparse() and ledger.entries() == entries
    assert os.path.getsize(ledger.ledger_path) < 1024 and not ledger.compact_if_sparse()
    other = LocalJobs(os.path.dirname(os.path.dirname(ledger.folder)), "/x")
    assert other.entries() == {}
    with pytest.raises(ValueError):
        ledger.spec_path("../../etc/passwd")


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_ledger_survives_random_bytes(ledger: LocalJobs, junk: bytes) -> None:
    os.makedirs(ledger.folder, exist_ok=True)
    with open(ledger.ledger_path, "wb") as fh:
        fh.write(junk)
    for job_id, entry in ledger.entries().items():
        assert job_id > 0 and len(entry.submission) in (40, 64)
