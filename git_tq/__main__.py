"""Allows `python -m git_tq`."""

from git_tq.cli import main

main()
