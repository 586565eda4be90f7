"""HTML from templates: the Jinja2 environment, which escapes every value it prints and
first makes its control and bidi characters visible (safetext); JSON safe inside a
page; the static files (our script and style, plotly's bundle).

A page's data travels as JSON in a `<script type="application/json">` block written
with Jinja's `tojson`, which escapes `<`, `>`, `&` and `'`: a `</script>` inside a
note cannot end the block. Pages hold no inline script of ours except in the report,
whose scripts a Content-Security-Policy names by their hashes."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from typing import Any

import jinja2
from markupsafe import Markup

from git_tq import output
from git_tq.safetext import visible

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")
OWN_STATIC = ("tq.js", "tq.css")  # files of ours in static/


def _visible(value: Any) -> Any:
    """Every printed string with its control characters shown as escapes (a Markup
    value, already HTML, is left alone); then autoescape escapes it."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return visible(value)
    return value


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, finalize=_visible,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["metric"] = output.metric_text
    env.filters["duration"] = output.duration
    env.filters["since"] = output.since
    env.filters["size"] = output.size_text
    # Series hold finite numbers only (series.py); a nan would make JSON.parse fail.
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "allow_nan": False}
    return env


def page(template: str, **values: Any) -> str:
    """A template rendered with `values`."""
    return environment().get_template(template).render(**values)


def static_path(name: str) -> str:
    """Where a static file lies: plotly.min.js in the plotly package, ours beside us;
    "" for any other name."""
    if name == "plotly.min.js":
        from git_tq.web import plotly_bundle

        return plotly_bundle()
    return os.path.join(STATIC, name) if name in OWN_STATIC else ""


@functools.lru_cache(maxsize=4)
def static_text(name: str) -> str:
    with open(static_path(name), encoding="utf-8") as fh:
        return fh.read()


def script_hash(text: str) -> str:
    """The CSP source that allows one inline script: 'sha256-...'."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def inline_script(text: str) -> str:
    """Script text that can stand inside `<script>...</script>`: a `</script` (any case)
    or `<!--` in it is broken up as JavaScript allows (`<\\/script`), which changes no
    string or regular expression in plotly's bundle or ours."""
    lowered = text.lower()
    if "</script" not in lowered and "<!--" not in lowered:
        return text
    import re

    text = re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)
    return text.replace("<!--", "<\\!--")
