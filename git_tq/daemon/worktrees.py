"""The jobs' worktrees: checked out ahead in the background for the next waiting
jobs (`prepare_worktree`), made sure of at a start (`ensure_worktree`), a spare
checked out ahead for the next start, a finished job's worktree recycled into a
waiting job's, and removal (kept when the job left files there) and sweeps of the
worktrees of jobs that ended without the daemon. Slow work runs in background git
processes or forked children (`in_child`); the loop never waits for them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from git_tq import jobtree
from git_tq.daemon.base import log
from git_tq.daemon.repostate import Reading, RepoState, config_stamp
from git_tq.errors import NO_SPACE, NoSpace, TqError
from git_tq.gitrepo import free_space, out_of_space, run_git, without_repo_vars
from git_tq.home import ensure_private_dir
from git_tq.localjobs import LocalSpec
from git_tq.model import Job, State
from git_tq.results import human_size
from git_tq.store import file_stamp, settled

# Parallel checkout (one worker per core) pays for big trees; below 1,000 files its two
# worker processes cost more than they save (14 against 13 ms for 100 files here).
CHECKOUT_OPTIONS = ("-c", "checkout.workers=0", "-c", "checkout.thresholdForParallelism=1000",
                    *jobtree.NO_HOOKS)


class Forked:
    """A forked child of the loop, polled like a Popen (which only runs programs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = self.pid, 70 << 8  # reaped elsewhere: its result is unknown
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = 70
        return self.returncode


class Waitable(Protocol):
    pid: int

    def poll(self) -> Optional[int]: ...
    def wait(self) -> int: ...


RECYCLE_DECLINED = 10  # a recycling child removed (or kept) the old worktree instead


@dataclass
class Spare:
    """A worktree checked out ahead for the next job that finds a free slot."""

    proc: subprocess.Popen[bytes]
    path: str
    commit: str
    written_by: Optional[tuple[Any, ...]]  # checkout_settings when it was checked out


@dataclass
class Checkout:
    """A waiting job's worktree being checked out in the background: a `git worktree
    add`, or a finished job's worktree recycled into it (`Daemon.recycle`)."""

    proc: Waitable
    rs: RepoState
    spec: LocalSpec
    linked: bool = False
    error: Optional[str] = None  # completing the worktree failed: the start will say why
    no_space: bool = False  # ...for want of space: the start waits for room
    recycled_from: Optional[str] = None  # the finished job's worktree being recycled


class Worktrees(Reading):
    """Checking out, recycling and removing the jobs' worktrees."""

    def finish_checkout(self, path: str, checkout: Checkout) -> None:
        """Complete a checked-out worktree (nested repositories, links...), once."""
        if not checkout.linked:
            checkout.linked = True
            if checkout.recycled_from:
                self.stats["worktrees_recycled"] += 1
            try:
                jobtree.complete(checkout.rs.common, path, checkout.spec, checkout.rs.config)
                jobtree.mark_complete(path, checkout.spec.submission)
            except (OSError, TqError) as exc:
                checkout.error = str(exc)
                checkout.no_space = isinstance(exc, NoSpace) or \
                    isinstance(exc, OSError) and exc.errno in NO_SPACE

    def prepare_worktree(self, rs: RepoState, job: Job) -> None:
        """Begin checking out a waiting job's worktree in the background (a `git worktree
        add` process the loop does not wait for), so the daemon stays responsive."""
        path = self.home.worktree_dir(rs.key, job.id)
        entry = rs.ours(job)
        if entry is None or path in self.preparing or (os.path.isdir(path) and os.listdir(path)) \
                or os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
            return
        spec = rs.local.load_spec(entry.submission)
        if spec is None:
            return
        ensure_private_dir(os.path.dirname(path))
        if self.take_spare(rs, path, entry.submission, spec):
            try:  # a few ms here, where a checkout would take the CPU the next start needs
                jobtree.complete(rs.common, path, spec, rs.config)
                jobtree.mark_complete(path, entry.submission)
            except (OSError, TqError):
                self.discard_worktree(rs, path)  # its start checks it out the long way
            return
        proc = subprocess.Popen(
            ["git", *CHECKOUT_OPTIONS, "--git-dir", rs.common, "worktree", "add", "--detach",
             "-f", "--", path, entry.submission], cwd=rs.common,
            env=without_repo_vars(os.environ),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.preparing[path] = Checkout(proc, rs, spec)

    def ensure_worktree(self, rs: RepoState, job: Job, submission: str,
                        spec: LocalSpec) -> str:
        """The job's worktree: a checkout of our own submission commit."""
        path = self.home.worktree_dir(rs.key, job.id)
        if os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
            # Only a finished job's worktree is kept: this id was a forgotten job's.
            raise TqError(f"{path} holds the kept worktree of an earlier job {job.id}, with "
                          f"files it wrote; `git tq gc --outputs {job.id}` removes it")
        early = self.preparing.pop(path, None)
        if early is not None:
            if early.proc.wait() == 0:
                self.finish_checkout(path, early)
                if early.no_space:  # half-completed: gone, and the job waits for room
                    self.discard_worktree(rs, path)
                    raise self.no_room_for(rs, path, submission, early.error or "")
                if early.error:
                    raise TqError(f"preparing the worktree failed: {early.error}")
                return path
            self.discard_worktree(rs, path)  # a failed checkout: tried again below
        elif os.path.isdir(path) and os.listdir(path):
            mark, ran = jobtree.completed(path), job.attempt > 1
            if mark == submission or (mark is None and ran and jobtree.head(path) == submission):
                return path  # a resumed job: same worktree, checkpoints and all
            if mark is None and ran:
                # Maybe its checkpoints, maybe a checkout cut short: never run, never deleted.
                raise TqError(f"{path} is not a complete checkout of the job's code (a daemon "
                              "killed while making it?); it is left for you to look at, "
                              f"`git tq gc --outputs {job.id}` removes it")
            # A checkout or completion cut short, of a job that never ran: made again.
            log.warning("job %d: %s is not a complete checkout of its code; checked out "
                        "again", job.id, path)
            self.discard_worktree(rs, path)
        ensure_private_dir(os.path.dirname(path))
        rs.last_submission = submission  # the next spare worktree starts from it
        if not self.take_spare(rs, path, submission, spec):
            p = run_git([*CHECKOUT_OPTIONS, "--git-dir", rs.common, "worktree", "add",
                         "--detach", "-f", "--", path, submission], rs.common,
                        env=without_repo_vars(os.environ), check=False)
            if p.returncode != 0:
                said = (p.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
                # git removes what it made of a checkout that failed, unless it was killed.
                self.discard_worktree(rs, path)
                room = self.no_room_for(rs, path, submission, said)
                # ("unable to write file" is a checkout's write that failed: a full disk,
                # which may have been freed by the time it is measured)
                if out_of_space(p.stderr) or b"unable to write file" in p.stderr or \
                        room.needed > (free_space(path) or 0):
                    raise room
                raise TqError("git worktree add failed: " + said)
        try:
            jobtree.complete(rs.common, path, spec, rs.config)
            jobtree.mark_complete(path, submission)
        except (OSError, NoSpace) as exc:
            if not isinstance(exc, NoSpace) and exc.errno not in NO_SPACE:
                raise
            self.discard_worktree(rs, path)  # never left half-completed
            raise self.no_room_for(rs, path, submission, str(exc)) from None
        return path

    def no_room_for(self, rs: RepoState, path: str, submission: str, said: str) -> NoSpace:
        """The error for a worktree that could not be made for want of space: how much
        its checkout needs (the sizes of its files), how much is free where it goes."""
        p = run_git(["--git-dir", rs.common, "ls-tree", "-r", "-l", "-z", "--end-of-options",
                     submission], rs.common, env=without_repo_vars(os.environ), check=False)
        needed = 0
        for entry in p.stdout.split(b"\0"):
            size = entry.partition(b"\t")[0].split()[-1:] if entry else []
            if size and size[0].isdigit():
                needed += int(size[0])
        free = free_space(path) or 0
        return NoSpace(f"no space left on device for its worktree {path} (it needs "
                       f"{human_size(needed)}, {human_size(free)} free): {said}",
                       path=os.path.dirname(path), needed=needed)

    # --- the spare worktree -------------------------------------------------------

    def spare_path(self, rs: RepoState) -> str:
        return os.path.join(self.home.path, "spare", rs.key)

    def make_spare(self, rs: RepoState) -> None:
        """Check out, in the background, a worktree no job has run in, for the next job
        that finds a free slot: moving it into place and checking out only the files
        that differ (`take_spare`) costs a quarter of a `git worktree add`."""
        if rs.key in self.spares or rs.last_submission is None or \
                any(c.proc.poll() is None for c in self.preparing.values()):
            return  # the waiting jobs' checkouts first
        path = self.spare_path(rs)
        if os.path.lexists(path):  # left by an earlier daemon: never trusted as pristine
            self.discard_worktree(rs, path)
        ensure_private_dir(os.path.dirname(path))
        with contextlib.suppress(OSError):
            proc = subprocess.Popen(
                ["git", *CHECKOUT_OPTIONS, "--git-dir", rs.common, "worktree", "add",
                 "--detach", "-f", "--", path, rs.last_submission], cwd=rs.common,
                env=without_repo_vars(os.environ), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.spares[rs.key] = Spare(proc, path, rs.last_submission,
                                        self.checkout_settings(rs))

    def checkout_settings(self, rs: RepoState) -> Optional[tuple[Any, ...]]:
        """Stamps of what, besides the commits, decides the bytes a checkout writes: the
        config files (core.autocrlf, core.eol, filters, core.attributesFile...), the
        repository's info/attributes and the user's attributes files. None when one
        changed too recently to tell."""
        config = config_stamp(rs.common)
        if config is None:
            return None
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".config")
        files = [os.path.join(rs.common, "info", "attributes"),
                 os.path.join(xdg, "git", "attributes")]
        own = rs.config.get("core.attributesfile")
        if own:
            files.append(os.path.expanduser(own))
        stamps = settled(tuple(file_stamp(f) for f in files))
        return None if stamps is None else (config, stamps)

    def take_spare(self, rs: RepoState, path: str, submission: str, spec: LocalSpec) -> bool:
        """Make `path` a checkout of `submission` from the spare worktree, if one is ready
        and the result is exactly what `git worktree add` would give: no job ran in it,
        and the attributes (which decide how files are written) are the same in both
        commits. Jobs with nested repositories or sparse files take the long way."""
        spare = self.spares.get(rs.key)
        if spare is None or spare.proc.poll() != 0 or spec.nested or spec.present:
            return False
        del self.spares[rs.key]
        env = without_repo_vars(os.environ)
        try:
            if spare.written_by != self.checkout_settings(rs) or spare.written_by is None:
                raise TqError("the attributes or config that decide how files are written "
                              "changed since it was checked out")
            if spare.commit != submission:
                changed = run_git(["--git-dir", rs.common, "diff-tree", "-r", "--name-only",
                                   spare.commit, submission, "--", ":(glob)**/.gitattributes"],
                                  rs.common, env=env).stdout
                if changed.strip():
                    raise TqError("the attributes differ")
                # In the spare's own place first: a daemon killed here leaves a spare,
                # which the next daemon never uses, and no job folder.
                run_git([*jobtree.NO_HOOKS, "checkout", "-q", "--detach", "-f",
                         "--no-recurse-submodules", submission, "--"], spare.path, env=env)
            run_git([*jobtree.NO_HOOKS, "--git-dir", rs.common, "worktree", "move",
                     spare.path, path], rs.common, env=env)
            self.stats["spare_worktrees_used"] += 1
            return True
        except (TqError, OSError) as exc:
            log.debug("spare worktree not used: %s", exc)
            for leftover in (spare.path, path):
                if os.path.lexists(leftover):
                    self.discard_worktree(rs, leftover)
            return False

    def discard_worktree(self, rs: RepoState, path: str) -> None:
        from git_tq.gitrepo import remove_worktree

        with contextlib.suppress(TqError, OSError):
            remove_worktree(rs.common, path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)

    # --- recycling a finished job's worktree ------------------------------------------

    def recycling(self) -> set[str]:
        """Finished jobs' worktrees that a child is recycling right now."""
        return {c.recycled_from for c in self.preparing.values()
                if c.recycled_from and c.proc.poll() is None}

    def leave_for_recycling(self, ahead: list[tuple[RepoState, Job]],
                            ending: Mapping[str, int]) -> list[tuple[RepoState, Job]]:
        """The waiting jobs of `ahead` to check out now: in a repository where attempts
        are over but not yet recorded, the last of them (as many) are left for those
        attempts' worktrees to be recycled into once their endings are recorded."""
        left = dict(ending)
        keep: list[tuple[RepoState, Job]] = []
        for rs, job in reversed(ahead):
            if left.get(rs.key, 0) > 0:
                left[rs.key] -= 1
                continue
            keep.append((rs, job))
        return keep[::-1]

    def recycle_target(self, rs: RepoState, ended: Job, ahead: list[tuple[RepoState, Job]]) \
            -> Optional[tuple[Job, str, LocalSpec]]:
        """A waiting job (one of `ahead`, taken from it) whose worktree can be made from
        `ended`'s: ours, started by this daemon in a worktree checked out under the same
        settings as now, and neither job with nested repositories or sparse files."""
        made = self.made_with.pop((rs.key, ended.id), None)
        if made is None or made != self.checkout_settings(rs) or ended.outputs is None:
            return None
        for i, (wrs, job) in enumerate(ahead):
            path = self.home.worktree_dir(rs.key, job.id)
            if wrs is not rs or path in self.preparing or os.path.lexists(path) or \
                    os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
                continue
            entry = rs.ours(job)
            spec = rs.local.load_spec(entry.submission) if entry is not None else None
            if entry is None or spec is None or spec.nested or spec.present:
                continue
            del ahead[i]
            return job, entry.submission, spec
        return None

    def recycle(self, rs: RepoState, ended: Job, job: Job, submission: str,
                spec: LocalSpec) -> None:
        """Make `job`'s worktree out of `ended`'s in a forked child (`recycle_worktree`):
        a `git clean` and a checkout of the files that differ cost a fraction of
        removing one worktree and adding another. The child's exit wakes the loop."""
        old = self.home.worktree_dir(rs.key, ended.id)
        new = self.home.worktree_dir(rs.key, job.id)
        entry = rs.entries.get(ended.id) or rs.local.entry(ended.id)
        ensure_private_dir(os.path.dirname(new))
        pid = in_child(lambda: self.recycle_worktree(
            rs, ended, old, new, entry.submission if entry else "", submission),
            f"recycling {old}")
        self.preparing[new] = Checkout(Forked(pid), rs, spec, recycled_from=old)

    def recycle_worktree(self, rs: RepoState, ended: Job, old: str, new: str,
                         old_submission: str, submission: str) -> int:
        """In the child: turn the worktree at `old` into a checkout of `submission` at
        `new`, exactly what `git worktree add` would give, or else remove (or keep) it as
        `remove_worktree` does and return RECYCLE_DECLINED.

        It is recycled only when what the job left is all expendable: nothing unsaved
        (`check_kept`), no index entry marked assume-unchanged or skip-worktree (a
        checkout would trust such a file as it is), and the same .gitattributes in both
        commits. Then `git clean -ffdx` removes every untracked and ignored file and
        `git checkout -f` rewrites every tracked file that differs from `submission`."""
        from git_tq.gitrepo import registered_worktree

        env = without_repo_vars(os.environ)
        if registered_worktree(rs.common, old) is None or not old_submission:
            self.remove_worktree(rs, ended.id, True, ended)
            return RECYCLE_DECLINED
        kept = jobtree.check_kept(old, old_submission, ended.outputs)
        if kept is not None:
            jobtree.keep(self.home.path, rs.key, ended.id, kept)
            log.info("job %d in %s: worktree %s %s", ended.id, rs.common, old, kept.reason)
            return RECYCLE_DECLINED
        flags = run_git(["ls-files", "-v", "-z"], old, env=env).stdout.split(b"\0")
        changed = b""
        if old_submission != submission:
            changed = run_git(["--git-dir", rs.common, "diff-tree", "-r", "--name-only",
                               old_submission, submission, "--", ":(glob)**/.gitattributes"],
                              rs.common, env=env).stdout
        if changed.strip() or any(f and not f.startswith(b"H ") for f in flags):
            log.info("job %d in %s: worktree not recycled (%s)", ended.id, rs.common,
                     "the attributes differ" if changed.strip() else
                     "index entries marked assume-unchanged or skip-worktree")
            self.remove_worktree(rs, ended.id, False)  # `check_kept` found nothing to keep
            return RECYCLE_DECLINED
        run_git([*jobtree.NO_HOOKS, "clean", "-ffdxq"], old, env=env)
        admin = jobtree.admin_dir(old)
        for name in (jobtree.COMPLETE_MARK, "tq-exclude"):
            if admin is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(admin, name))
        run_git([*CHECKOUT_OPTIONS, "checkout", "-q", "--detach", "-f",
                 "--no-recurse-submodules", submission, "--"], old, env=env)
        run_git([*jobtree.NO_HOOKS, "--git-dir", rs.common, "worktree", "move", old, new],
                rs.common, env=env)
        log.debug("job %d in %s: worktree recycled for %s", ended.id, rs.common, new)
        return 0

    def remove_in_background(self, rs: RepoState, job_id: int, ran: bool = True,
                             record: Optional[Job] = None) -> None:
        """`remove_worktree` in a forked child: checking what a job wrote (`git status`)
        and deleting a big worktree take long, and the loop must keep serving the socket
        and starting jobs meanwhile. The child's exit wakes the loop (SIGCHLD)."""
        path = self.home.worktree_dir(rs.key, job_id)
        self.made_with.pop((rs.key, job_id), None)
        if path in self.removals.values() or path in self.recycling():
            return
        def remove() -> int:
            self.remove_worktree(rs, job_id, ran, record)
            return 0

        self.removals[in_child(remove, f"removing {path}")] = path

    def remove_worktree(self, rs: RepoState, job_id: int, ran: bool = True,
                        record: Optional[Job] = None) -> None:
        """Remove a finished job's worktree, unless the job wrote files there that are not
        ignored (nothing records them yet): that worktree is kept, and the reason recorded
        in the tq home for `git tq show` and `git tq gc`. `ran`: False for a job that never
        started (a prepared worktree), which has nothing of its own to keep."""
        from git_tq.gitrepo import registered_worktree, remove_worktree

        path = self.home.worktree_dir(rs.key, job_id)
        if ran and registered_worktree(rs.common, path) is not None:
            entry = rs.entries.get(job_id) or rs.local.entry(job_id)
            try:  # the ending this daemon just recorded, else the record as it is now
                outputs = (record or rs.store.load(job_id)).outputs
            except TqError:
                outputs = None
            kept = jobtree.check_kept(path, entry.submission if entry else "", outputs)
            if kept is not None:
                jobtree.keep(self.home.path, rs.key, job_id, kept)
                log.info("job %d in %s: worktree %s %s", job_id, rs.common, path, kept.reason)
                return
        if os.path.lexists(path):
            # Never `git worktree remove` a path the job may have replaced by a symlink:
            # only the registered real directory goes; a link is only unlinked.
            outcome = remove_worktree(rs.common, path)
            if outcome != "removed":
                log.warning("job %d's worktree %s was not a registered worktree; %s", job_id,
                            path, "only the link was removed" if outcome == "unlinked"
                            else "it was left alone")

    def sweep_worktrees(self, rs: RepoState) -> None:
        """Remove the worktrees of our jobs that ended without the daemon recording it:
        waiting jobs cancelled by `rm`, `purge` or `kill` (their prepared worktrees, or
        checkouts still under way), and jobs that ended while no daemon ran. A kept
        worktree, and a failed job's under tq.keepWorktrees, stay."""
        root = os.path.join(self.home.path, "worktrees", rs.key)
        try:
            names = set(os.listdir(root))
        except OSError:
            names = set()
        prepared = {p for p, c in self.preparing.items() if c.rs.key == rs.key}
        if not names and not prepared:
            return
        keep_failed = rs.config.get("tq.keepworktrees", "false").lower() in ("true", "yes", "1")
        for path in prepared:
            job = self.ended_job(rs, int(os.path.basename(path)))
            if job is not None and not job.state.finished:
                continue
            if job is not None and rs.ours(job) is None:
                continue  # not ours to judge: its record may say anything
            checkout = self.preparing[path]
            if checkout.proc.poll() is None:
                if path not in self.abandoned:
                    log.debug("%s: its job left the queue; removed once checked out", path)
                self.abandoned.add(path)  # removed once `git worktree add` is done
                continue
            del self.preparing[path]
            self.abandoned.discard(path)
            names.discard(os.path.basename(path))
            self.remove_worktree(rs, int(os.path.basename(path)), ran=False)  # never ran: quick
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)  # a failed checkout git never knew
        busy = set(self.removals.values()) | self.recycling()
        for name in names:
            path = os.path.join(root, name)
            if path in busy or path in self.left_alone:
                continue  # being removed right now, or not ours to remove
            job = self.ended_job(rs, int(name)) if name.isascii() and name.isdigit() \
                and len(name) < 19 else None
            if job is None or not job.state.finished or rs.ours(job) is None or \
                    (keep_failed and job.state is State.FAILED) or path in self.left_alone or \
                    os.path.exists(jobtree.kept_record(self.home.path, rs.key, job.id)):
                continue
            self.remove_worktree(rs, job.id, ran=job.attempt > 0)
            if os.path.lexists(path) and not os.path.exists(
                    jobtree.kept_record(self.home.path, rs.key, job.id)):
                self.left_alone.add(path)  # not a registered worktree: `git tq gc` decides


def in_child(work: Callable[[], int], what: str) -> int:
    """Run `work` in a forked child of the loop, whose exit status is what it returns
    (70 if it raised); the child's pid. The child leaves the loop's signal handling
    and closes every descriptor above stderr, above all the daemon's lock."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        code = work()
    except BaseException:  # noqa: BLE001 - a child must never return into the loop
        log.exception("%s failed", what)
    finally:
        os._exit(code)
