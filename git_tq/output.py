"""Human output for the CLI: tables and text through rich on a terminal, plain text off it.

rich is imported only when stdout is a terminal, so scripted use stays fast.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Collection, Sequence
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


def json_text(data: Any) -> str:
    """Compact JSON as `print_json` writes it off a terminal (C1 and bidi escaped)."""
    return json_safe(json.dumps(data, ensure_ascii=False))


def print_json_text(text: str) -> None:
    """Print JSON text made by `json_text` (or joined from pieces of it): as it is off a
    terminal, indented on one."""
    if is_tty():
        print_json(json.loads(text))
    else:
        sys.stdout.write(text + "\n")


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
                title: Optional[str] = None, right: Collection[int] = ()) -> None:
    """A table: rich on a terminal (colour unless NO_COLOR), aligned plain text otherwise.
    Columns whose indexes are in `right` (numbers) are aligned right.

    Every cell is shown with its control characters as escapes (safetext.visible)."""
    rows = [[visible(c) for c in row] for row in rows]
    headers = [visible(h) for h in headers]
    title = visible(title) if title is not None else None
    if is_tty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, box=None, header_style="bold", pad_edge=False)
        for i, h in enumerate(headers):
            table.add_column(h, overflow="fold" if h in ("COMMAND", "NOTE") else "ellipsis",
                             justify="right" if i in right else "left")
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
        echo("  ".join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip())


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


def metric_text(value: object, width: int = 24) -> str:
    """A metric as a table shows it: ints as they are, other numbers in 4 significant
    digits (0.3127 -> 0.3127, 1234.56 -> 1235, 1e-05), texts shortened, '-' for none."""
    kind = type(value)  # exact types first: `ls` formats one per job and column
    if kind is float:
        return f"{value:.4g}"
    if kind is int:
        return str(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    return shorten(str(value), width)


Segments = Sequence[tuple[str, Optional[str]]]  # a cell: pieces of text, each with a style


def print_segment_table(headers: Sequence[str], rows: Sequence[Sequence[Segments]],
                        footer: Optional[str] = None) -> None:
    """A table whose cells are styled pieces (a word that differs, a best value): rich on
    a terminal, where long cells wrap to the terminal's width; aligned plain text (the
    pieces' text, unstyled) otherwise. Control characters are shown as escapes."""
    heads = [visible(h) for h in headers]
    cells = [[[(visible(t), s) for t, s in cell] for cell in row] for row in rows]
    if is_tty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold", pad_edge=False, show_lines=False)
        for i, h in enumerate(heads):
            table.add_column(h, overflow="fold", style="bold" if i == 0 else None,
                             no_wrap=i == 0)
        for row in cells:
            table.add_row(*(Text.assemble(*((t, s or "") for t, s in cell)) for cell in row))
        console = Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
        console.print(table)
        if footer:
            console.print(Text(visible(footer), style="dim"))
        return
    plain = [["".join(t for t, _ in cell) for cell in row] for row in cells]
    widths = [len(h) for h in heads]
    for texts in plain:
        widths = [max(w, len(c)) for w, c in zip(widths, texts)]
    for line in [heads, *plain]:
        echo("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    if footer:
        echo(footer)


def size_text(n: int) -> str:
    """12 B, 4.9 KiB, 1.2 GiB."""
    from git_tq.results import human_size

    return human_size(n)
