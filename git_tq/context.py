"""The context of every user action: an opened repository with its settings, its job
store and the tq home, and the nudge that tells the daemon what changed.

Kept apart from `service` so that `git tq run` (see `submission`) opens a repository
without importing every other action.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from git_tq.gitrepo import SETTINGS, Repo, locate, without_repo_vars
from git_tq.home import Home, default_home
from git_tq.localjobs import LocalJobs
from git_tq.snapshot import located as early_location
from git_tq.store import JobStore, identity_env


def user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", str(os.getuid()))


@dataclass
class Context:
    """An opened repository with its settings, job store and tq home."""

    repo: Repo
    config: dict[str, str]
    store: JobStore
    home: Home

    @classmethod
    def open(cls, cwd: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) \
            -> Context:
        environ = os.environ if environ is None else environ
        # One `git rev-parse` and one `git config` (the tq settings and the identity), side
        # by side; `git tq run` had them run by its head start before click was imported.
        found = early_location(cwd) or locate(cwd)
        repo, config = found.repo, found.config
        home = Home(default_home(config, environ))
        store = JobStore(repo, identity_env(config, without_repo_vars(environ)),
                         LocalJobs(home.path, repo.common_dir))
        return cls(repo, config, store, home)

    @classmethod
    def at_common_dir(cls, common: str, home: Home) -> Context:
        """Another repository registered in `home`, by its common git dir (no work tree:
        for reading its jobs, as the daemon does)."""
        repo = Repo(toplevel=None, git_dir=common, common_dir=common, prefix="",
                    index_path=os.path.join(common, "index"))
        config = repo.config(SETTINGS)
        store = JobStore(repo, identity_env(config, without_repo_vars(os.environ)),
                         LocalJobs(home.path, common))
        return cls(repo, config, store, home)

    @property
    def local(self) -> LocalJobs:
        assert self.store.local is not None
        return self.store.local


def setting_flag(ctx: Context, name: str, default: bool) -> bool:
    value = ctx.config.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("true", "yes", "on", "1")


def wake_daemon(ctx: Context, jobs: Sequence[int] = ()) -> Optional[str]:
    """Nudge the daemon (starting it unless tq.autostart is false); a hint if it is off.
    `jobs`: the jobs whose refs changed (the daemon then reads just those)."""
    from git_tq import client

    return client.nudge(ctx.home, autostart=setting_flag(ctx, "tq.autostart", True),
                        repo=ctx.repo.common_dir, jobs=jobs)

