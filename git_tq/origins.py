"""Where a job comes from: origins (`user@host`), their ref names, and job names.

Every job has an origin. This machine's is `git config tq.origin`, by default
the user name and the short host name. Local jobs stay at `refs/tq/jobs/<id>`;
on a remote, a machine's jobs are at `refs/tq/origins/<origin>/jobs/<id>`, and
fetched ones are kept locally under that same name. A job is named `7` (local)
or `alice@gpu1:7` (fetched). An origin becomes a ref path component, so it is
validated strictly; one read from a ref name is validated again, never trusted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Optional

from git_tq.errors import BadOrigin
from git_tq.model import ORIGINS_PREFIX

_PART = re.compile(r"[A-Za-z0-9._-]+")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ORIGIN = 100
_ID = re.compile(r"[1-9][0-9]{0,17}")


def origin_problem(text: str) -> Optional[str]:
    """Why `text` cannot be an origin, or None when it can (`user@host`: letters, digits,
    `.`, `_`, `-` on each side; no `..`, no part starting with `.` or `-`, none ending
    with `.` or `.lock`: git's ref-name rules for one path component)."""
    user, at, host = text.partition("@")
    if not at or not user or not host:
        return "it is not user@host"
    if len(text) > MAX_ORIGIN:
        return f"it is longer than {MAX_ORIGIN} characters"
    for part in (user, host):
        if not _PART.fullmatch(part):
            return "only letters, digits, '.', '_' and '-' may appear on each side of '@'"
        if part.startswith((".", "-")) or part.endswith((".", ".lock")) or ".." in part:
            return "a side starts with '.' or '-', ends with '.' or '.lock', or holds '..'"
    return None


def check_origin(text: str, what: str = "origin") -> str:
    """`text` if it is a valid origin; else a one-line error."""
    problem = origin_problem(text)
    if problem is not None:
        raise BadOrigin(f"bad {what} {text[:60]!r}: {problem}")
    return text


def is_origin(text: str) -> bool:
    return origin_problem(text) is None


def _cleaned(part: str) -> str:
    part = _BAD_CHARS.sub("_", part).strip(".-").replace("..", "_")
    return part[:40].rstrip(".")


def default_origin(user: str, nodename: str) -> str:
    """`user@host` from a user name and a host name (its first label), with characters a
    ref name cannot hold replaced by `_`."""
    return f"{_cleaned(user) or 'user'}@{_cleaned(nodename.split('.')[0]) or 'host'}"


def this_origin(config: Mapping[str, str], user: str) -> str:
    """This machine's origin: `tq.origin` (checked), else `default_origin`."""
    given = config.get("tq.origin")
    if given is not None and given.strip():
        return check_origin(given.strip(), "tq.origin")
    return default_origin(user, os.uname().nodename)


def origin_jobs_prefix(origin: str) -> str:
    """`refs/tq/origins/<origin>/jobs/`: where that origin's jobs are kept."""
    return f"{ORIGINS_PREFIX}{origin}/jobs/"


def split_origin_ref(rest: str) -> Optional[tuple[str, str]]:
    """(origin, the name after jobs/) of a ref name after refs/tq/origins/, or None when
    it is not `<origin>/jobs/<name>` with a valid origin."""
    origin, _, tail = rest.partition("/")
    if not tail.startswith("jobs/") or not is_origin(origin):
        return None
    return origin, tail[len("jobs/"):]


def parse_job_name(text: str) -> Optional[tuple[str, int]]:
    """(origin, id) of `alice@gpu1:7`; None when `text` is no such name (a bare id,
    a tag, a commit); a one-line error when it looks like one but is malformed."""
    head, colon, tail = text.rpartition(":")
    if not colon or "@" not in head:
        return None
    check_origin(head, "origin in job name")
    if not _ID.fullmatch(tail):
        raise BadOrigin(f"bad job name {text[:60]!r}: give origin:id, like alice@gpu1:7")
    return head, int(tail)
