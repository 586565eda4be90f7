"""The web views of the queue: `git tq report` (one self-contained HTML file) and `git tq
serve` (a live, read-only local site), drawn from Jinja2 templates (autoescaped) and
plotly's JavaScript bundle.

Only those two commands import this package, so the web stack costs the rest of git tq
nothing; `require` turns a missing optional dependency into one line that says how to
install it.

    pages.py    what each page shows, from `service` and `rows` (no HTTP)
    render.py   the template environment, the static files, JSON safe inside a page
    report.py   `git tq report`: one HTML file with the compare table and the curves
    app.py      `git tq serve`: the Starlette application, its token, uvicorn
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from git_tq.errors import MissingDependency

REPORT_NEEDS = ("jinja2", "plotly")
SERVE_NEEDS = ("jinja2", "plotly", "starlette", "uvicorn")


def plotly_bundle() -> str:
    """The path of plotly's offline JavaScript bundle (plotly.min.js, shipped in the
    `plotly` package), found without importing plotly's Python side; "" when absent."""
    try:
        spec = importlib.util.find_spec("plotly")
    except (ImportError, ValueError):
        return ""
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "package_data", "plotly.min.js")
        if os.path.isfile(path):
            return path
    return ""


def require(command: str, modules: tuple[str, ...]) -> None:
    """Import `modules` (plotly: find its bundle), or raise MissingDependency naming what
    is missing and how to get it (the `web` extra, which setup.sh installs)."""
    missing = []
    for name in modules:
        try:
            if name == "plotly":
                if not plotly_bundle():
                    missing.append(name)
            else:
                importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependency(
            f"git tq {command} needs {', '.join(missing)}, which this installation lacks: "
            "run `bash setup.sh` again from the git tq checkout, or "
            "`pip install 'git-tq[web]'` into the environment git-tq runs from")
