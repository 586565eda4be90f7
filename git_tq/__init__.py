"""git tq: a preemptive GPU job queue for one research machine, built into git."""

__version__ = "0.1.0"
