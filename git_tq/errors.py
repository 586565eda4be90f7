"""The exceptions git tq raises on purpose, and the one place they become exit codes.

0 success; 1 a user error; 2 usage; 3 an unexpected error (traceback in a crash
log under the tq home); 124 `wait --timeout` ran out; 130 interrupted.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_USER = 1
EXIT_USAGE = 2
EXIT_CRASH = 3
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_INTERRUPTED = 130


class TqError(Exception):
    """An expected failure: shown to the user as one line, exit code 1."""

    exit_code = EXIT_USER


class UsageError(TqError):
    """The command line itself is wrong."""

    exit_code = EXIT_USAGE


class NotARepository(TqError):
    """The current directory is not inside a usable git repository."""


class GitFailed(TqError):
    """A git command we ran failed in a way we did not expect."""


class UnknownJob(TqError):
    """A job reference names no job of this repository."""


class InvalidTransition(TqError):
    """A state change that the job lifecycle does not allow (e.g. cancel a finished job)."""


class RefRace(TqError):
    """A compare-and-swap on a job ref lost to a concurrent writer too many times."""


class BadSpec(TqError):
    """A job specification that cannot run here (no such GPU, empty command, bad tag)."""


class DirtyWorkTree(TqError):
    """An action would overwrite uncommitted changes."""


class NotOurs(TqError):
    """A write to a job record that this user did not write here (fetched or tampered)."""


class UnreadableRecord(TqError):
    """A job ref whose record is not a valid job record."""


class BrokenRef(UnreadableRecord):
    """A job ref that points at an object the repository does not have (a corrupt or
    partial copy): named, with how to repair or forget it."""

    def __init__(self, job_id: int, tip: str, origin: str | None = None) -> None:
        self.job_id, self.tip, self.origin = job_id, tip, origin
        name = f"{origin}:{job_id}" if origin else str(job_id)
        super().__init__(f"job {name} is broken: {broken_ref_text(job_id, tip, origin)}")


def broken_ref_text(name: object, tip: str, origin: str | None = None) -> str:
    """What is wrong with a job ref at a missing object, and how to repair it (one line)."""
    ref = f"refs/tq/origins/{origin}/jobs/{name}" if origin else f"refs/tq/jobs/{name}"
    return (f"{ref} points at {tip[:12]}, an object missing from the repository "
            f"(`git tq rm --forget {name}` removes the ref; or restore the object from a "
            "clone that has it)")


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the errors of a write that found no room


class NoSpace(GitFailed):
    """git could not write for want of space (a full disk or quota); the CLI says what
    was being done. `path`: a folder on the filesystem that is full, and `needed`: the
    bytes the write needs there (0: not known), when the raiser knows them."""

    def __init__(self, message: str, path: str | None = None, needed: int = 0) -> None:
        super().__init__(message)
        self.path, self.needed = path, needed


class WaitTimedOut(TqError):
    """`git tq wait --timeout` ran out while some jobs were still active."""

    exit_code = EXIT_TIMEOUT


class Interrupted(TqError):
    """Ctrl-C, with a word on what was left as it was (`run --wait`: the job stays queued)."""

    exit_code = EXIT_INTERRUPTED


class BadOrigin(UsageError):
    """An origin (`tq.origin`, `--origin`, a `user@host:7` name) that is not `user@host`."""


class UnknownRemote(UsageError):
    """`git tq push/fetch REMOTE` names no remote, URL or path."""


class ShareRefused(TqError):
    """A push or fetch that git refused for some refs (it would rewind a job's history)."""


class MissingDependency(TqError):
    """An optional dependency (the `web` extra of `report` and `serve`) is not installed;
    the message says how to install it."""


class SlurmError(TqError):
    """A Slurm tool is missing, failed or did not answer; the message names it and carries
    the first line of Slurm's own complaint."""
