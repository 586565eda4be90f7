"""`git tq report` and `git tq serve` in a real headless browser: Debian's chromium driven by
Playwright (launched with executable_path: no browser download), the real `git-tq`, its
daemon and jobs that write metric points.

One repository, daemon and server serve the whole module (their start is most of the
cost), with one browser. Screenshots of every page go to $TQ_TEST_ARTIFACTS, else
tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import BIN_DIR, stop_everything, wait_until

# One worker runs them all (`--dist loadgroup`): the module's site and browser are
# made once.
pytestmark = pytest.mark.xdist_group("web")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("TQ_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
NOTE_SCRIPT = "<script>alert(1)</script> lr too high"
NOTE_IMG = "<img src=x onerror=alert(1)> diverged"

POINTS = """\
import json, os, sys
with open(os.environ["TQ_METRICS"], "a") as f:
    for i in range(int(sys.argv[1])):
        f.write(json.dumps({"step": i, "loss": float(sys.argv[2]) / (i + 1)}) + "\\n")
"""
# Appends a point (and a log line) every 0.1 s until its gate file appears.
LIVE = """\
import json, os, sys, time
with open(os.environ["TQ_METRICS"], "a") as f:
    for i in range(3000):
        if os.path.exists(sys.argv[1]):
            break
        f.write(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\\n")
        f.flush()
        print("step", i, flush=True)
        time.sleep(0.1)
"""


def find_chromium() -> Optional[str]:
    for name in (os.environ.get("TQ_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def hermetic_env(root: Path) -> dict[str, str]:
    """conftest's hermetic environment, as a dict: module-scoped fixtures run before the
    function-scoped one has patched os.environ."""
    home = root / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "TQ_")) and k not in ("XDG_STATE_HOME",
                                                              "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), TQ_HOME=str(root / "tqhome"), GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="Test User", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="Test User", GIT_COMMITTER_EMAIL="test@example.com",
               GIT_EDITOR="false", NO_COLOR="1",
               PATH=BIN_DIR + os.pathsep + os.environ.get("PATH", ""))
    return env


class Site:
    """A repository with three jobs (two done, one running and writing points), its
    daemon, and `git tq serve` on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = hermetic_env(root)
        self.repo = root / "repo"
        self.repo.mkdir()
        self.gate = root / "gate"
        self.server: Optional[subprocess.Popen[str]] = None
        self.url = ""

    def run(self, *args: str) -> str:
        p = subprocess.run(args, cwd=self.repo, env=self.env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, f"{args}: {p.stderr}"
        return p.stdout

    def tq(self, *args: str) -> str:
        return self.run("git", "tq", *args)

    def start(self) -> None:
        self.run("git", "init", "-q")
        self.run("git", "config", "tq.cpuSlots", "4")
        (self.repo / "points.py").write_text(POINTS)
        (self.repo / "live.py").write_text(LIVE)
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", "initial")
        (self.repo / "points.py").write_text(POINTS + "# an uncommitted edit\n")
        self.tq("run", "-q", "--cpu", "-t", "base", "python", "points.py", "40", "2.0")
        self.tq("run", "-q", "--cpu", "--sweep", "lr=0.3", "--", "python", "points.py", "60",
                "{lr}")
        self.tq("run", "-q", "--cpu", "-t", "live", "python", "live.py", str(self.gate))
        self.tq("note", "1", NOTE_SCRIPT)
        self.tq("note", "2", NOTE_IMG)
        self.tq("wait", "1", "2")
        wait_until(lambda: json.loads(self.tq("show", "3", "--json"))["state"] == "running",
                   timeout=30)
        self.server = subprocess.Popen(["git", "tq", "serve", "--port", "0"], cwd=self.repo,
                                       env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        assert line.startswith("git tq serve: http://127.0.0.1:"), line
        self.url = line.split(": ", 1)[1].strip()

    @property
    def base(self) -> str:
        return self.url.split("/?token=")[0]

    def stop(self) -> None:
        self.gate.write_text("")
        if self.server is not None:
            self.server.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
        subprocess.run(["git", "tq", "stop"], cwd=self.repo, env=self.env,
                       capture_output=True, timeout=30)
        stop_everything(self.root)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = find_chromium()
    if path is None:
        reason = ("no chromium found (apt-get install chromium; `bash setup.sh --test` "
                  "installs it when run as root)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    made = Site(tmp_path_factory.mktemp("web"))
    try:
        made.start()
        yield made
    finally:
        made.stop()


class Watched:
    """A page with every console error, uncaught exception and dialog recorded."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def traces(self) -> dict[str, list[int]]:
        """Per plot (metric): the number of points of each trace, once plotly drew."""
        self.page.wait_for_function(
            "() => { const p = [...document.querySelectorAll('.plot')];"
            " return p.length > 0 && p.every((d) => d.data); }")
        found: dict[str, list[int]] = self.page.evaluate(
            "() => Object.fromEntries([...document.querySelectorAll('.plot')].map("
            "(d) => [d.dataset.metric, d.data.map((t) => t.x.length)]))")
        return found

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def assert_clean(self) -> None:
        assert self.dialogs == [], "a note's markup ran"
        assert self.errors == []
        # the notes are text: no element came from them
        assert self.page.evaluate("document.querySelectorAll('img').length") == 0
        assert self.page.evaluate(
            "[...document.scripts].every((s) => !s.textContent.includes('alert(1)')"
            " || s.type === 'application/json')")


def test_report_opens_offline_with_a_trace_per_job(site: Site, browser: Any) -> None:
    out = site.root / "runs.html"
    said = site.tq("report", "1-2", "-o", str(out))
    assert said.startswith(f"wrote {out}: 2 jobs, 1 metric")
    context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
    asked: list[str] = []

    def only_files(route: Any) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            asked.append(route.request.url)
            route.abort()

    context.route("**/*", only_files)
    watched = Watched(context)
    watched.page.goto(out.as_uri())
    assert watched.traces() == {"loss": [40, 60]}  # one trace per job, every point
    text = watched.page.inner_text("body")
    assert NOTE_SCRIPT in text and NOTE_IMG in text  # shown as text
    assert "lr=0.3" in text
    watched.shot("report")
    watched.assert_clean()
    assert asked == []  # nothing but the file itself
    context.close()


def test_pages_need_the_token_then_show_everything_escaped(site: Site, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    watched = Watched(context)
    page = watched.page
    page.goto(site.url)  # the printed URL: the token becomes a cookie, the URL loses it
    assert page.url == site.base + "/"
    assert "GPUs" in page.inner_text("body")
    assert "python live.py" in page.inner_text("#board")  # running
    watched.shot("serve-board")
    page.goto(site.base + "/jobs")
    rows = page.inner_text("table.jobs")
    assert "<script>alert(1)</script>" in rows and "<img src=x onerror=alert(1)>" in rows
    watched.shot("serve-jobs")
    page.check("input[value='1']")
    page.check("input[value='2']")
    page.click("#compare-button")
    page.wait_for_url("**/compare?jobs=2&jobs=1")  # as listed: newest first
    assert watched.traces() == {"loss": [60, 40]}
    table = page.inner_text("table.compare")
    assert "★" in table and NOTE_SCRIPT in table and NOTE_IMG in table
    watched.shot("serve-compare")
    page.goto(site.base + "/job/1")
    assert watched.traces() == {"loss": [40]}
    assert page.inner_text("#note") == NOTE_SCRIPT
    assert "an uncommitted edit" in page.inner_text("pre.diff")  # code vs its source
    page.wait_for_function("() => document.getElementById('log').textContent"
                           ".includes('exited')")
    watched.shot("serve-job")
    watched.assert_clean()
    context.close()


def test_a_live_page_gains_points_and_log_lines(site: Site, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    watched = Watched(context)
    page = watched.page
    page.goto(site.url)
    page.goto(site.base + "/job/3")
    first = watched.traces()["loss"][0]
    # (functions, not expressions: the page's CSP refuses eval, which expressions need)
    page.wait_for_function("(n) => document.querySelector('.plot').data[0].x.length > n",
                           arg=first)
    page.wait_for_function("() => document.getElementById('log').textContent"
                           ".includes('step 1')")
    length = page.evaluate("() => document.getElementById('log').textContent.length")
    page.wait_for_function("(n) => document.getElementById('log').textContent.length > n",
                           arg=length)
    watched.shot("serve-live")
    watched.assert_clean()
    context.close()


def test_every_request_needs_the_token(site: Site) -> None:
    token = site.url.split("token=")[1]

    def get(path: str, headers: Optional[dict[str, str]] = None,
            method: str = "GET") -> tuple[int, bytes]:
        request = urllib.request.Request(site.base + path, headers=headers or {},
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    for path in ("/", "/jobs", "/job/1", "/compare?jobs=1-2", "/api/curves?jobs=1",
                 "/api/log/1", "/api/board", "/static/tq.js", "/static/plotly.min.js",
                 "/nothing", "/?token=wrong"):
        status, body = get(path)
        assert status == 401, path
        assert body.startswith(b"401 Unauthorized") and b"python" not in body, path
    assert get("/jobs", {"Cookie": "tq-token-1=" + token})[0] == 401  # another server's
    bearer = {"Authorization": "Bearer " + token}
    status, body = get("/api/curves?jobs=1", bearer)
    assert status == 200 and json.loads(body)["jobs"][0]["series"]["loss"]["total"] == 40
    assert get("/jobs", bearer, method="POST")[0] == 405  # read-only
    status, body = get("/api/log/1?offset=-1", bearer)
    assert status == 400


def test_a_missing_web_extra_is_one_line(repo: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "jinja2.py").write_text("raise ImportError('not installed')\n")
    for command in (["report", "1"], ["serve"]):
        p = subprocess.run(["git", "tq", *command], cwd=repo, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(shadow)})
        assert p.returncode == 1, p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
        assert "needs jinja2" in p.stderr and "git-tq[web]" in p.stderr


def test_other_commands_import_no_web_stack(repo: Path) -> None:
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "git_tq", "ls"],
                       cwd=repo, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"starlette", "uvicorn", "jinja2", "plotly", "anyio", "markupsafe"}
    assert "git_tq.web" not in p.stderr
