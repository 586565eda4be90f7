"""Sharing runs between machines: `git tq push` and `git tq fetch`, and the notes merge.

Both run git's own `push` and `fetch` with explicit refspecs (never a `+` for
job refs, so a push or fetch that would rewind a job's history is refused by
git), and touch only git tq's refs: this machine's jobs go to
`refs/tq/origins/<origin>/jobs/<id>` on the remote; everyone else's come back
under the same names; `refs/notes/tq`, `refs/notes/tq-logs` and `refs/notes/tq-series`
(metric series) travel both ways. The remote's notes are first fetched into tracking refs
(`refs/tq/remotes/<remote>/notes/...`) and merged into ours with
`git notes merge -s cat_sort_uniq` (both sides' text kept) on a scratch copy,
landed by compare-and-swap like every other notes write (`JobStore._edit_notes`);
then ours are pushed, a fast-forward of the remote's.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq import origins
from git_tq.errors import GitFailed, RefRace, ShareRefused, TqError, UnknownRemote
from git_tq.gitrepo import Repo
from git_tq.localjobs import is_oid
from git_tq.model import ORIGINS_PREFIX
from git_tq.series import SERIES_REF
from git_tq.store import CAS_ATTEMPTS, JOBS_PREFIX, LOGS_REF, NOTES_REF, JobStore, _canonical

NOTES_REFS = (NOTES_REF, LOGS_REF, SERIES_REF)  # series travel as logs do
TRACKING_PREFIX = "refs/tq/remotes/"
PUSH_ROUNDS = 3  # a notes push that lost to another pusher is fetched, merged, pushed again
# Options that keep a push or fetch to our refs: no hooks, no tags, no submodules, no
# FETCH_HEAD, no pruning (fetch.prune would delete fetched jobs the remote lacks).
PUSH_OPTIONS = ("--porcelain", "--no-verify", "--no-follow-tags", "--no-recurse-submodules")
FETCH_OPTIONS = ("--no-tags", "--no-write-fetch-head", "--no-prune",
                 "--no-recurse-submodules", "--no-auto-maintenance")
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Remote:
    """What git is given (a remote's name, a URL or a path) and the folder of its tracking
    refs under refs/tq/remotes/."""

    target: str
    key: str

    @property
    def tracking(self) -> dict[str, str]:
        """Our notes refs -> where the remote's are kept here."""
        return {ref: f"{TRACKING_PREFIX}{self.key}/{ref[len('refs/'):]}" for ref in NOTES_REFS}


@dataclass(frozen=True)
class Shared:
    """What a push or fetch moved (or, in a dry run, would move)."""

    verb: str  # pushed, fetched
    remote: str
    jobs: int
    notes: int
    logs: int
    dry_run: bool = False

    def summary(self) -> str:
        def count(n: int, what: str) -> str:
            return f"{n} {what}{'' if n == 1 else 's'}"

        done = f"would be {self.verb}" if self.dry_run else self.verb
        return (f"{count(self.jobs, 'job')}, {count(self.notes, 'note')}, "
                f"{count(self.logs, 'log')} {done} "
                f"({'to' if self.verb == 'pushed' else 'from'} {self.remote})")


def find_remote(repo: Repo, given: Optional[str]) -> Remote:
    """The remote to use: `given` (a remote's name, a URL, a path), else the current
    branch's remote, else `origin`; a one-line error when there is no such remote."""
    if given is not None and (not given.strip() or given.startswith("-")):
        raise UnknownRemote(f"bad remote {given!r}")
    names = set(repo.out("remote").split())
    if given is None:
        branch = repo.git("symbolic-ref", "-q", "--short", "HEAD", check=False) \
            .stdout.decode(errors="replace").strip()
        configured = repo.git("config", "--get", f"branch.{branch}.remote", check=False) \
            .stdout.decode(errors="replace").strip() if branch else ""
        given = configured if configured in names else "origin"
        if given not in names:
            raise UnknownRemote("no remote to use: the current branch has none and there is "
                                "no `origin` (name one: git tq push REMOTE)")
    if given in names:
        key = given if _KEY.fullmatch(given) and ".." not in given \
            and not given.endswith((".", ".lock")) else _hashed(given)
        return Remote(given, key)
    if "/" in given or ":" in given or os.path.isdir(given):
        return Remote(given, _hashed(given))  # a URL or a path
    raise UnknownRemote(f"no remote {given[:60]!r} (git remote lists them; a URL or a path "
                        "works too)")


def _hashed(target: str) -> str:
    return "url-" + hashlib.sha1(target.encode(errors="surrogateescape")).hexdigest()[:16]


def remote_refs(repo: Repo, remote: Remote) -> dict[str, str]:
    """The remote's job refs and notes refs (ref -> object id), one `git ls-remote`."""
    p = repo.git("ls-remote", "--end-of-options", remote.target,
                 f"{ORIGINS_PREFIX}*", *NOTES_REFS, check=False)
    if p.returncode != 0:
        raise GitFailed(_message("ls-remote", p.stderr))
    found = {}
    for line in p.stdout.decode(errors="replace").splitlines():
        oid, _, ref = line.partition("\t")
        if is_oid(oid) and (ref.startswith(ORIGINS_PREFIX) or ref in NOTES_REFS):
            found[ref] = oid
    return found


def _message(what: str, stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    shown = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))), None)
    return f"git {what}: {shown or (lines[-1] if lines else 'failed')}"


def _local_tips(repo: Repo, *patterns: str) -> dict[str, str]:
    out = repo.out("for-each-ref", "--format=%(objectname) %(refname)", *patterns)
    return {ref: oid for oid, _, ref in (ln.partition(" ") for ln in out.splitlines()) if ref}


def _notes_changed(repo: Repo, old: Optional[str], new: Optional[str]) -> int:
    """How many notes differ between two notes commits (all of `new`'s when `old` is
    None or not here)."""
    if new is None or old == new:
        return 0
    if old is None or not _present(repo, old):
        return len([ln for ln in repo.out("ls-tree", "-r", "--name-only", "--end-of-options",
                                          new).splitlines() if ln])
    return len([ln for ln in repo.out("diff-tree", "-r", "--name-only", "--end-of-options",
                                      old, new).splitlines() if ln])


def _would_change(repo: Repo, ours: Optional[str], theirs: Optional[str]) -> int:
    if theirs is None or theirs == ours or not _present(repo, theirs):
        return 0 if theirs is None or theirs == ours else 1
    if ours is not None and repo.git("merge-base", "--is-ancestor", theirs, ours,
                                     check=False).returncode == 0:
        return 0
    return _notes_changed(repo, ours, theirs)


def _present(repo: Repo, oid: str) -> bool:
    return repo.git("cat-file", "-e", "--end-of-options", f"{oid}^{{commit}}",
                    check=False).returncode == 0


# --- notes -------------------------------------------------------------------------


def merge_notes(store: JobStore, ref: str, theirs_ref: str) -> bool:
    """Merge the notes at `theirs_ref` into `ref` (both sides' text kept: git's
    cat_sort_uniq), on a scratch copy of `ref` moved in by compare-and-swap, retried
    when a local note write got there first. True when `ref` moved."""
    repo = store.repo
    scratch = f"refs/notes/tq-scratch/merge-{os.getpid()}-{id(store):x}"
    try:
        for _ in range(CAS_ATTEMPTS):
            theirs, ours = repo.resolve_ref(theirs_ref), repo.resolve_ref(ref)
            if theirs is None or theirs == ours:
                return False
            if ours is None:  # none here yet: theirs as they are
                if repo.update_ref(ref, theirs, "0" * len(theirs), "tq: notes fetched"):
                    return True
                continue
            if repo.git("merge-base", "--is-ancestor", theirs, ours,
                        check=False).returncode == 0:
                return False  # nothing of theirs that we lack
            repo.git("update-ref", scratch, ours)
            p = repo.git("notes", f"--ref={scratch}", "merge", "-q", "-s", "cat_sort_uniq",
                         theirs_ref, env=store.commit_env, check=False)
            if p.returncode != 0:
                raise GitFailed(_message("notes merge", p.stderr))
            new = repo.resolve_ref(scratch)
            if new is None or not is_oid(new):
                raise GitFailed("git notes merge: left no result")
            script = f"update {ref} {new} {ours}\ndelete {scratch}\n"
            if repo.git("update-ref", "--stdin", "-m", "tq: notes merged",
                        input=script.encode(), check=False).returncode == 0:
                return True
        raise RefRace("notes kept changing under us; try again")
    finally:
        repo.git("update-ref", "-d", scratch, check=False)


def _fetch_notes(store: JobStore, remote: Remote, theirs: Mapping[str, str],
                 dry_run: bool) -> tuple[int, int]:
    """Bring the remote's notes into their tracking refs and merge them into ours; the
    number of notes and of logs that changed here."""
    repo = store.repo
    tracking = remote.tracking
    specs = [f"+{ref}:{tracking[ref]}" for ref in NOTES_REFS if ref in theirs]
    before = {ref: repo.resolve_ref(ref) for ref in NOTES_REFS}
    if not specs or dry_run:
        # Their notes are not fetched in a dry run: counted against ours when their
        # commit is already here, else every one of theirs (at most what would change).
        return (_would_change(repo, before[NOTES_REF], theirs.get(NOTES_REF)),
                _would_change(repo, before[LOGS_REF], theirs.get(LOGS_REF)))
    _run_fetch(repo, remote, specs)
    for ref in NOTES_REFS:
        merge_notes(store, ref, tracking[ref])
    after = {ref: repo.resolve_ref(ref) for ref in NOTES_REFS}
    return (_notes_changed(repo, before[NOTES_REF], after[NOTES_REF]),
            _notes_changed(repo, before[LOGS_REF], after[LOGS_REF]))


def _run_fetch(repo: Repo, remote: Remote, specs: Sequence[str]) -> list[str]:
    """`git fetch` of `specs`; the refs git refused (non-fast-forward), by local name."""
    p = repo.git("-c", "fetch.output=full", "fetch", *FETCH_OPTIONS, "--end-of-options",
                 remote.target, *specs, check=False)
    err = p.stderr.decode(errors="replace")
    refused = [line.split("->")[-1].split()[0] for line in err.splitlines()
               if "[rejected]" in line and "->" in line]
    if p.returncode != 0 and not refused:
        raise GitFailed(_message("fetch", p.stderr))
    return refused


# --- push and fetch ----------------------------------------------------------------


def push(store: JobStore, origin: str, remote: Remote, *, dry_run: bool = False) -> Shared:
    """Push this machine's jobs (the ones the ledger says we wrote, at the tips we wrote)
    to refs/tq/origins/<origin>/jobs/ on the remote, after merging the remote's notes
    into ours, then our notes. A job whose remote ref has history ours lacks is refused
    by git (no `+`): the others still go, and the refusal is a one-line error."""
    repo = store.repo
    origins.check_origin(origin)
    local = store.local
    if local is None:
        raise TqError("git tq push needs this user's tq home")
    prefix = origins.origin_jobs_prefix(origin)
    for _ in range(PUSH_ROUNDS):
        theirs = remote_refs(repo, remote)
        if not dry_run:
            _fetch_notes(store, remote, theirs, dry_run=False)
        tips = store.ref_tips()[0]
        entries = local.entries()
        ours = []
        for oid, name in tips:
            job_id = _canonical(name)
            entry = entries.get(job_id) if job_id is not None else None
            if entry is not None and entry.trusts(oid):  # fetched or tampered: not ours to push
                ours.append((name, oid))
        moving = [(name, oid) for name, oid in ours if theirs.get(prefix + name) != oid]
        specs = [f"{JOBS_PREFIX}{name}:{prefix}{name}" for name, _ in moving]
        mine = {ref: repo.resolve_ref(ref) for ref in NOTES_REFS}
        specs += [f"{ref}:{ref}" for ref in NOTES_REFS
                  if mine[ref] and mine[ref] != theirs.get(ref)]
        notes = _notes_changed(repo, theirs.get(NOTES_REF), mine[NOTES_REF])
        logs = _notes_changed(repo, theirs.get(LOGS_REF), mine[LOGS_REF])
        if not specs:
            return Shared("pushed", remote.target, 0, 0, 0, dry_run)
        p = repo.git("push", *PUSH_OPTIONS, *(["--dry-run"] if dry_run else []),
                     "--end-of-options", remote.target, *specs, check=False)
        refused: dict[str, str] = {}
        for line in p.stdout.decode(errors="replace").splitlines():
            flag, _, rest = line.partition("\t")
            if flag == "!":
                spec, _, why = rest.partition("\t")
                refused[spec.partition(":")[0]] = why
        if p.returncode != 0 and not refused:
            raise GitFailed(_message("push", p.stderr))
        jobs_refused = sorted((_canonical(ref[len(JOBS_PREFIX):]) or 0, why)
                              for ref, why in refused.items() if ref.startswith(JOBS_PREFIX))
        if any(ref in NOTES_REFS for ref in refused) and not jobs_refused and not dry_run:
            continue  # someone pushed notes since we fetched theirs: merge again
        shared = Shared("pushed", remote.target, len(moving) - len(jobs_refused),
                        0 if NOTES_REF in refused else notes,
                        0 if LOGS_REF in refused else logs, dry_run)
        if jobs_refused:
            first, why = jobs_refused[0]
            more = f" (and {len(jobs_refused) - 1} more)" if len(jobs_refused) > 1 else ""
            raise ShareRefused(
                f"{shared.summary()}; but job {first}{more} was refused ({why.strip()}): "
                f"{remote.target} has a {prefix}{first} whose history this one lacks, and "
                "pushing would rewind it (another clone with the same tq.origin? give this "
                "one its own: git config tq.origin user@host)")
        return shared
    raise RefRace("the remote's notes kept changing while we pushed; try again")


def fetch(store: JobStore, origin: str, remote: Remote, *, dry_run: bool = False) -> Shared:
    """Fetch every other machine's jobs (refs/tq/origins/*, never our own origin's) under
    the same names here, and merge the remote's notes into ours. A job whose history
    would be rewound here is refused by git (no `+`): a one-line error names it."""
    repo = store.repo
    origins.check_origin(origin)
    theirs = remote_refs(repo, remote)
    own = origins.origin_jobs_prefix(origin)
    before = _local_tips(repo, ORIGINS_PREFIX)
    wanted = {ref: oid for ref, oid in theirs.items()
              if ref.startswith(ORIGINS_PREFIX) and not ref.startswith(own)
              and before.get(ref) != oid}
    if dry_run:
        notes, logs = _fetch_notes(store, remote, theirs, dry_run=True)
        return Shared("fetched", remote.target, len(wanted), notes, logs, True)
    refused: list[str] = []
    if wanted:
        # Our own origin's refs are ours, at refs/tq/jobs/: never fetched over there.
        refused = _run_fetch(repo, remote, [f"{ORIGINS_PREFIX}*:{ORIGINS_PREFIX}*",
                                            f"^{own}*"])
    notes, logs = _fetch_notes(store, remote, theirs, dry_run=False)
    after = _local_tips(repo, ORIGINS_PREFIX)
    moved = sum(1 for ref, oid in after.items() if before.get(ref) != oid)
    shared = Shared("fetched", remote.target, moved, notes, logs)
    if refused:
        names = [_job_name(ref) for ref in refused]
        raise ShareRefused(f"{shared.summary()}; but {names[0]}"
                           + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                           + " was refused: the remote's record does not continue the one "
                           "fetched before (its history was rewritten); it was left as it was")
    return shared


def _job_name(ref: str) -> str:
    split = origins.split_origin_ref(ref[len(ORIGINS_PREFIX):]) \
        if ref.startswith(ORIGINS_PREFIX) else None
    return f"job {split[0]}:{split[1]}" if split else ref
