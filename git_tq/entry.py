"""The `git-tq` executable's entry point: the console, or a head start for `run`, then the CLI.

For `git tq run`, discovery and the settings (two git processes) start before
click and the service layers are imported, and a background thread goes on to
snapshot the work tree, so git's work and Python's imports overlap; every other
command goes straight to the CLI.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        _main(sys.argv[1:])
    except KeyboardInterrupt:
        # Ctrl-C while Python is still importing: one line, not a traceback. (A head
        # start's thread is joined at exit and removes its temporary index itself.)
        from git_tq import snapshot

        snapshot.abandon()
        sys.stderr.write("git tq: interrupted\n")
        sys.exit(130)


def _main(args: list[str]) -> None:
    if not args and sys.stdin.isatty() and sys.stdout.isatty():
        from git_tq import console

        console.run()
        return
    if args[:1] == ["run"] and not {"-h", "--help"} & set(args):
        from git_tq import snapshot

        snapshot.start_early()
    from git_tq.cli import main as cli_main

    cli_main()
