"""Human output for the CLI: tables and text through rich on a terminal, plain text off it.

rich is imported only when stdout is a terminal, so scripted use stays fast.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from git_tq.safetext import json_safe, visible

STATE_STYLES = {
    "pending": "yellow",
    "running": "bold green",
    "stopping": "magenta",
    "done": "green",
    "failed": "bold red",
    "cancelled": "dim",
}


def is_tty() -> bool:
    return sys.stdout.isatty()


def print_json(data: Any) -> None:
    """Indented on a terminal; compact otherwise (the C encoder: 10,000 jobs in ~0.1 s).

    Non-ASCII text stays readable, but C1 and bidi controls are \\u escapes: JSON
    with every string intact that a terminal cannot act on."""
    indent = 2 if is_tty() else None
    sys.stdout.write(json_safe(json.dumps(data, indent=indent, ensure_ascii=False)) + "\n")


def echo(text: str = "") -> None:
    """Print a line (or several), control characters shown as escapes (safetext)."""
    sys.stdout.write(visible(text, newlines=True) + "\n")


def parse_time(stamp: Optional[str]) -> Optional[dt.datetime]:
    if not stamp:
        return None
    try:
        return dt.datetime.fromisoformat(stamp)
    except ValueError:
        return None


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def since(stamp: Optional[str], until: Optional[str] = None) -> str:
    start = parse_time(stamp)
    if start is None:
        return "-"
    end = parse_time(until) or dt.datetime.now(start.tzinfo)
    return duration((end - start).total_seconds())


def shorten(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                styles: Optional[Sequence[Optional[str]]] = None,
                title: Optional[str] = None) -> None:
    """A table: rich on a terminal (colour unless NO_COLOR), aligned plain text otherwise.

    Every cell is shown with its control characters as escapes (safetext.visible)."""
    rows = [[visible(c) for c in row] for row in rows]
    headers = [visible(h) for h in headers]
    title = visible(title) if title is not None else None
    if is_tty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, box=None, header_style="bold", pad_edge=False)
        for h in headers:
            table.add_column(h, overflow="fold" if h in ("COMMAND", "NOTE") else "ellipsis")
        for i, row in enumerate(rows):
            # Text, not str: user content ("[red]" in a tag) is never read as markup.
            table.add_row(*(Text(c) for c in row), style=(styles[i] if styles else None))
        Console(no_color=bool(os.environ.get("NO_COLOR"))).print(table)
        return
    if title:
        echo(title)
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    for line in [headers, *rows]:
        echo("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def styled(text: str, style: str) -> str:
    """Rich markup on a terminal, the bare text off it."""
    if not is_tty() or os.environ.get("NO_COLOR"):
        return text
    return f"[{style}]{text}[/{style}]"


def print_markup(text: str) -> None:
    """Print rich markup on a terminal, the text off it; either way control characters
    are shown as escapes (user fields must also go through `esc`)."""
    text = visible(text, newlines=True)
    if is_tty():
        from rich.console import Console

        Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False,
                soft_wrap=True).print(text)
    else:
        echo(text)


def esc(text: str) -> str:
    """User text made safe: control characters (newlines too) shown as escapes, and
    escaped for rich markup on a terminal (off it nothing is parsed)."""
    text = visible(text)
    if not is_tty():
        return text
    from rich.markup import escape

    return escape(text)
