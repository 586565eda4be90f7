"""Allows `python -m git_tq`."""

from git_tq.entry import main

main()
