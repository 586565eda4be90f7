"""The scheduler daemon: one per tq home, serving every repository registered there.

It owns the machine's GPUs. Each cycle it reads every repository's job refs,
records what ended (from the supervisors' exit files), enforces stop
deadlines, asks the pure `scheduler.plan` what to do, and does it: preempt
(its stop signal, once, to the victim's main process; SIGKILL to its whole
tree when that has ended or after the victim's grace) and
start (worktree, environment, supervisor). A cycle runs at once on a nudge
(submit, job exit, kill), on a GPU change, and every few seconds as a safety
net. Killing the daemon loses nothing: supervisors keep running jobs and write
their exit statuses; the next daemon adopts them through their lock files.

Its parts, one file each (a mixin class of `Daemon`, bottom up):

- base: `DaemonBase`, every instance attribute of the daemon, and its logger;
- repostate: what it knows of each repository, and reading only what changed;
- hooks: the tq-* hooks and tq.autoPush;
- worktrees: the jobs' worktrees (checked out ahead, spare, recycled, removed);
- launch: a job's processes (its supervisor started, checked, its stop sent);
- reconcile: records brought up to date with the processes (adoption included),
  endings, dependencies, time limits, stops, GPUs that others use;
- loop: `Daemon`, its lock and socket, the select loop and the cycle.

`python -m git_tq.daemon HOME` runs one in the foreground.
"""

from git_tq.daemon.loop import AlreadyRunning, Daemon, main, run_foreground

__all__ = ["AlreadyRunning", "Daemon", "main", "run_foreground"]
