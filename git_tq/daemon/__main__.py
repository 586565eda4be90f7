"""`python -m git_tq.daemon HOME`: run a daemon in the foreground."""

from git_tq.daemon.loop import main

main()
