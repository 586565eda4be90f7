"""`git tq report`: one self-contained HTML file with the jobs' compare table and their
curves, interactive (zoom, hover values, runs toggled from the legend) with no network.

plotly's offline bundle (plotly.min.js from the `plotly` package, ~4.8 MB) is embedded,
with our script and style, so the file opens anywhere, attached to an email or a paper's
supplement. A Content-Security-Policy in the page allows exactly those two inline scripts
(by their SHA-256), inline styles (plotly sets them), images from data: URLs, and nothing
else: no connection, no other script, even if something escaped the escaping."""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from markupsafe import Markup

from git_tq import __version__, service
from git_tq.home import create_temp_beside
from git_tq.web import pages, render


@dataclass(frozen=True)
class Written:
    path: str  # where the report is ("-": standard output)
    jobs: int
    metrics: int
    size: int  # bytes


def build(ctx: service.Context, tokens: Sequence[str],
          metrics: Optional[Sequence[str]] = None) -> tuple[str, int, int]:
    """The report's HTML, with how many jobs and metrics it shows."""
    from git_tq import series

    found = service.compare(ctx, tokens, least=1)
    table = pages.compare_table(found)
    curves = service.job_curves(ctx, [v.job for v in found.views], metrics)
    plotly = Markup(render.inline_script(render.static_text("plotly.min.js")))
    script = Markup(render.inline_script(render.static_text("tq.js")))
    csp = ("default-src 'none'; "
           f"script-src {render.script_hash(str(plotly))} {render.script_hash(str(script))}; "
           "style-src 'unsafe-inline'; img-src data:; font-src data:; base-uri 'none'; "
           "form-action 'none'")
    names = [v.job.name for v in found.views]
    title = f"git tq report: job{'s' if len(names) > 1 else ''} " + \
        (", ".join(names) if len(names) <= 8 else f"{names[0]} ... {names[-1]} "
         f"({len(names)} jobs)")
    now = dt.datetime.now().astimezone().replace(microsecond=0).isoformat()
    html = render.page(
        "report.html", title=title, repo=service.repo_name(ctx.repo.common_dir),
        written=now, version=__version__, csp=csp, table=table, links=False,
        views=found.views, style=Markup(render.static_text("tq.css")), plotly=plotly,
        script=script, live=False,
        data={"kind": "report", "curves": series.to_json(curves)})
    shown = {name for c in curves for name in c.series}
    return html, len(names), len(shown)


def write(ctx: service.Context, tokens: Sequence[str], path: str,
          metrics: Optional[Sequence[str]] = None) -> Written:
    """Write the report to `path` (temp file + rename: a reader never sees half of it;
    "-": standard output)."""
    html, jobs, shown = build(ctx, tokens, metrics)
    data = html.encode("utf-8")
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return Written(path, jobs, shown, len(data))
    target = os.path.abspath(path)
    fd, temp = create_temp_beside(target, 0o666)  # as any file written: the umask decides
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(temp, target)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return Written(target, jobs, shown, len(data))


def open_in_browser(path: str) -> bool:
    """Open the report in the default browser (the webbrowser module: $BROWSER, then the
    desktop's); False when none could be started."""
    import pathlib
    import webbrowser

    return webbrowser.open(pathlib.Path(path).as_uri())
