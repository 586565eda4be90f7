"""Review of part 11 (series, plot, report, serve): hostile series notes and careless
input give one line or a drawing, never an internal error or invalid JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import git, submit, tq, wait_state

pytestmark = pytest.mark.usefixtures("autostart")

HOSTILE = ('{"v":1,"attempt":1,"t0":1.7976e308,"series":{"loss":{"n":2,"step":[1,2],'
           '"value":[1e308,-1e308],"dt":[0,1.79e308]}}}\n'
           '{"v":1,"attempt":2,"t0":0,"series":{"loss":{"n":2,"step":[-1e308,1e308],'
           '"value":[1e308,-1e308],"dt":[0,1]}}}\n')


def no_constant(name: str) -> None:
    raise AssertionError(f"{name} in JSON")


def test_zeros_on_a_log_axis_and_a_hostile_series_note(repo: Path, tmp_path: Path) -> None:
    job = submit(repo, "--", "sh", "-c",
                 'for i in 1 2 3; do echo "{\\"loss\\": 0, \\"step\\": $i}" >> "$TQ_METRICS"; done')
    wait_state(repo, job, "done")
    # a careless user: --log on a metric that is never above 0 (was: internal error)
    drawn = tq(repo, "plot", str(job), "--log", check=False)
    assert drawn.returncode == 0 and "internal error" not in drawn.stderr, drawn.stderr
    # a hostile teammate's note: values and times at the edge of a float
    commit = git(repo, "notes", "--ref", "tq-series", "list").split()[1]
    git(repo, "notes", "--ref", "tq-series", "add", "-f", "-m", HOSTILE, commit)
    for args in (["plot", str(job)], ["plot", str(job), "--smooth", "2"],
                 ["plot", str(job), "--x", "time"], ["plot", str(job), "--log"]):
        done = tq(repo, *args, check=False)
        assert done.returncode in (0, 2) and "internal error" not in done.stderr, \
            (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) <= 3, done.stderr
    raw = tq(repo, "plot", str(job), "--json").stdout
    json.loads(raw, parse_constant=no_constant)  # no Infinity: valid JSON
    out = tmp_path / "r.html"
    written = tq(repo, "report", str(job), "-o", str(out), check=False)
    assert written.returncode == 0, written.stderr
    assert "Infinity" not in out.read_text()


def test_the_token_redirect_stays_on_this_server(repo: Path) -> None:
    import http.client
    import os
    import subprocess

    server = subprocess.Popen(["git", "tq", "serve", "--port", "0"], cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=os.environ.copy())
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]  # git tq serve: http://...?token=T
        host, port = url.split("//")[1].split("/")[0].split(":")
        token = url.split("token=")[1]
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", f"//evil.example/?token={token}")
        answer = conn.getresponse()
        where = answer.getheader("location") or ""
        assert answer.status == 303 and where.startswith("/") and not where.startswith("//"), where
    finally:
        server.terminate()
        server.wait(timeout=10)
