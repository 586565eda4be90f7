"""`git tq report` and `git tq serve` measured (part 11), a soak of `serve`, and the
report's screenshot for the README.

- report: a sweep of --jobs (100) jobs, each reporting --points (1,000) points of two
  metrics, run by the real daemon; then `git tq report SWEEP -o FILE`, median of
  --rounds (aim: under 3 s);
- serve: --listing (10,000) finished jobs written as bench/listing.py writes them;
  `git-tq serve` started, then the first request of each page, and each again (median of
  --rounds): `/` (GPUs and queue), `/jobs` (the job list's first page), `/jobs?page=50`,
  `/job/ID`; and, where chromium is, the job list opened in it (navigation to the `load`
  event); aim: the first view under 1 s;
- --soak SECONDS: `git-tq serve` on a repository with 1,000 finished jobs and one running
  job that appends --rate points (and log lines) a second, polled as --pages open job
  pages poll it (tq.js: the log every second, the curves every 2 s) plus the board every
  2 s and the job list every 30 s; serve's RSS is printed every --every seconds;
- --screenshot PATH: a sweep of three jobs on two GPUs, one of them preempted by an
  urgent job and resumed; their report rendered by headless chromium, saved as PNG.

    python bench/web.py [--jobs 100] [--points 1000] [--listing 10000] [--rounds 5]
    python bench/web.py --soak 3600 [--pages 3] [--rate 5] [--every 60]
    python bench/web.py --screenshot docs/report.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import ENV, git, machine, make_repo, which_git_tq  # noqa: E402
from listing import tq_home, write_jobs  # noqa: E402

POINTS = """\
import json, os, sys
n = int(sys.argv[2])
with open(os.environ["TQ_METRICS"], "a") as f:
    for i in range(n):
        f.write(json.dumps({"step": i, "loss": float(sys.argv[1]) / (i + 1),
                            "acc": i / n}) + "\\n")
"""
LIVE = """\
import json, os, sys, time
rate, gate = float(sys.argv[1]), sys.argv[2]
with open(os.environ["TQ_METRICS"], "a") as f:
    i = 0
    while not os.path.exists(gate):
        f.write(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\\n")
        f.flush()
        print("step", i, "loss", 1.0 / (i + 1), flush=True)
        i += 1
        time.sleep(1.0 / rate)
"""
TRAIN = """\
import json, math, os, random, signal, sys, time
lr, steps = float(sys.argv[1]), int(sys.argv[2])
start = json.load(open("checkpoint.json"))["step"] if os.path.exists("checkpoint.json") else 0
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
noise = random.Random(int(lr * 1000) + start)
with open(os.environ["TQ_METRICS"], "a") as f:
    for step in range(start, steps):
        if stopping:
            json.dump({"step": step}, open("checkpoint.json", "w"))
            print("checkpoint at step", step, flush=True)
            sys.exit(0)
        loss = 2.3 * math.exp(-lr * step / 12) + 0.15 + noise.gauss(0, 0.03)
        f.write(json.dumps({"step": step, "loss": round(loss, 4),
                            "acc": round(min(1.0, 1.05 - loss / 2.5), 4)}) + "\\n")
        f.flush()
        print(f"step {step} loss {loss:.3f}", flush=True)
        time.sleep(0.04)
"""


def tq(repo: Path, *args: str, check: bool = True) -> str:
    p = subprocess.run(["git", "tq", *args], cwd=repo, env=ENV, capture_output=True,
                       text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"git tq {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def new_repo(root: Path, **files: str) -> Path:
    repo = make_repo(root, folders=10)
    git(repo, "config", "tq.home", tq_home(repo))
    for name, text in files.items():
        (repo / f"{name}.py").write_text(text)
    if files:
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "scripts")
    return repo


class Server:
    """`git-tq serve --port 0` in `repo` (the executable itself: its pid is the server's)."""

    def __init__(self, repo: Path) -> None:
        exe = shutil.which("git-tq") or "git-tq"
        began = time.perf_counter()
        self.proc = subprocess.Popen([exe, "serve", "--port", "0"], cwd=repo, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.started = time.perf_counter() - began  # to the URL: the rows cache is made
        if not line.startswith("git tq serve: "):
            raise RuntimeError(f"git tq serve said {line!r}")
        self.url = line.split(": ", 1)[1].strip()
        self.base, self.token = self.url.split("/?token=")

    def get(self, path: str) -> tuple[float, int]:
        """Seconds to the whole answer, and its size."""
        request = urllib.request.Request(self.base + path,
                                         headers={"Authorization": "Bearer " + self.token})
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = answer.read()
        return time.perf_counter() - began, len(body)

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def find_chromium() -> Optional[str]:
    for name in (os.environ.get("TQ_CHROMIUM"), "chromium", "chromium-browser"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def bench_report(root: Path, jobs: int, points: int, rounds: int) -> None:
    repo = new_repo(root / "report", points=POINTS)
    git(repo, "config", "tq.cpuSlots", "8")
    values = ",".join(str(1 + i / 100) for i in range(jobs))
    began = time.perf_counter()
    tq(repo, "run", "-q", "--cpu", "--sweep", f"scale={values}", "--sweep-name", "bench",
       "--", "python", "points.py", "{scale}", str(points))
    tq(repo, "wait", "bench", check=False)
    ran = time.perf_counter() - began
    out = root / "report.html"
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tq(repo, "report", "bench", "-o", str(out))
        times.append(time.perf_counter() - t0)
    tq(repo, "stop", check=False)
    print(f"report: {jobs} jobs x {points} points x 2 metrics (run in {ran:.1f} s), "
          f"`git tq report`, median of {rounds}: {statistics.median(times) * 1000:.0f} ms "
          f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}), "
          f"{out.stat().st_size / 2**20:.1f} MiB (aim < 3 s)")


def bench_serve(root: Path, listing: int, rounds: int) -> None:
    repo = new_repo(root / "serve")
    write_jobs(repo, listing)
    git(repo, "pack-refs", "--all")
    subprocess.run(["rm", "-rf", str(repo / ".git" / "tq" / "cache")], check=True)
    server = Server(repo)
    try:
        print(f"serve: {listing} finished jobs (packed refs, cold caches): started and its "
              f"rows cache made in {server.started * 1000:.0f} ms")
        paths = ["/", "/jobs", f"/jobs?page={listing // 200}", f"/job/{listing // 2}",
                 f"/api/curves?jobs={listing // 2}"]
        for path in paths:
            first, size = server.get(path)
            again = statistics.median(server.get(path)[0] for _ in range(rounds))
            print(f"  GET {path:<22} first {first * 1000:7.1f} ms, then {again * 1000:7.1f} ms"
                  f" (median of {rounds}), {size / 1024:.0f} KiB")
        chromium = find_chromium()
        if chromium is None:
            print("  (no chromium: the browser's load time is not measured)")
            return
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium)
            page = browser.new_page()
            page.goto(server.url)  # the token becomes a cookie
            loads = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                page.goto(server.base + "/jobs", wait_until="load")
                loads.append(time.perf_counter() - t0)
            browser.close()
        print(f"  chromium: /jobs to its load event, median of {rounds}: "
              f"{statistics.median(loads) * 1000:.0f} ms (max {max(loads) * 1000:.0f}; aim < 1 s)")
    finally:
        server.stop()


def soak(root: Path, seconds: float, pages: int, rate: float, every: float) -> None:
    repo = new_repo(root / "soak", live=LIVE)
    write_jobs(repo, 1000)
    gate = root / "gate"
    job = tq(repo, "run", "-q", "--cpu", "-t", "soak", "python", "live.py", str(rate),
             str(gate)).strip()
    deadline = time.monotonic() + 60
    while json.loads(tq(repo, "show", job, "--json"))["state"] != "running":
        if time.monotonic() > deadline:
            raise RuntimeError("the soak's job did not start")
        time.sleep(0.2)
    server = Server(repo)
    offsets: list[Optional[int]] = [None] * pages
    due = {"log": 0.0, "curves": 0.0, "board": 0.0, "jobs": 0.0}
    period = {"log": 1.0, "curves": 2.0, "board": 2.0, "jobs": 30.0}
    requests = errors = 0
    samples: list[tuple[float, int]] = []
    began = time.monotonic()
    next_sample = began
    print(f"soak: {seconds:.0f} s, {pages} job pages polling job {job} ({rate:g} points/s), "
          "the board and the job list; serve's RSS:")
    try:
        while time.monotonic() - began < seconds:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - began, server.rss()))
                print(f"  {now - began:7.0f} s  {samples[-1][1] / 2**20:7.1f} MiB  "
                      f"{requests} requests, {errors} errors", flush=True)
                next_sample += every
            for kind, when in due.items():
                if now < when:
                    continue
                due[kind] = now + period[kind]
                for p in range(pages if kind in ("log", "curves") else 1):
                    try:
                        if kind == "log":
                            at = offsets[p]
                            answer = _get_json(server, f"/api/log/{job}" + (
                                "" if at is None else f"?offset={at}"))
                            offsets[p] = int(answer["end"])
                        else:
                            server.get({"curves": f"/api/curves?jobs={job}", "board": "/api/board",
                                        "jobs": "/jobs"}[kind])
                        requests += 1
                    except (OSError, ValueError, KeyError):
                        errors += 1
            time.sleep(0.05)
        samples.append((time.monotonic() - began, server.rss()))
    finally:
        server.stop()
        gate.write_text("")
        tq(repo, "wait", job, check=False)
        tq(repo, "stop", check=False)
    settled = [rss for t, rss in samples if t >= min(60.0, seconds / 4)] or [samples[-1][1]]
    print(f"soak done: {requests} requests, {errors} errors; RSS first {samples[0][1] / 2**20:.1f}"
          f" MiB, after warm-up {settled[0] / 2**20:.1f} MiB, max {max(settled) / 2**20:.1f} MiB,"
          f" last {samples[-1][1] / 2**20:.1f} MiB")


def _get_json(server: Server, path: str) -> Any:
    request = urllib.request.Request(server.base + path,
                                     headers={"Authorization": "Bearer " + server.token})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def screenshot(root: Path, path: Path) -> None:
    """A sweep of three learning rates on two GPUs; the job on GPU 0 is preempted by an
    urgent job once job 1 has run a while, and resumes from its checkpoint: the report of
    all four."""
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("--screenshot needs chromium (apt-get install chromium)")
    repo = new_repo(root / "demo", train=TRAIN)
    git(repo, "config", "tq.gpus", "0,1")
    tq(repo, "run", "-q", "-g", "5", "--sweep", "lr=0.6,0.3,0.15", "--sweep-name", "lr-sweep",
       "--", "python", "train.py", "{lr}", "160")
    deadline = time.monotonic() + 60
    while "step 60" not in _log(repo, "1"):
        if time.monotonic() > deadline:
            raise RuntimeError("job 1 did not reach step 60")
        time.sleep(0.2)
    tq(repo, "run", "-q", "-p", "10", "--gpu", "0", "-t", "urgent", "--", "python", "train.py",
       "1.2", "80")
    tq(repo, "wait", "lr-sweep", "urgent", check=False)
    for job in ("1", "2", "3"):
        record = json.loads(tq(repo, "show", job, "--json"))
        if record["attempt"] > 1:
            tq(repo, "note", job, "preempted by the urgent run (job 4); resumed from its "
               "checkpoint")
    out = root / "demo.html"
    tq(repo, "report", "1-4", "-o", str(out))
    tq(repo, "stop", check=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(out.as_uri())
        page.wait_for_function("() => [...document.querySelectorAll('.plot')].length > 0 &&"
                               " [...document.querySelectorAll('.plot')].every((d) => d.data)")
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    print(f"wrote {path}")


def _log(repo: Path, job: str) -> str:
    p = subprocess.run(["git", "tq", "view", job], cwd=repo, env=ENV, capture_output=True,
                       text=True)
    return p.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--listing", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--soak", type=float, metavar="SECONDS")
    parser.add_argument("--pages", type=int, default=3)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--every", type=float, default=60.0)
    parser.add_argument("--screenshot", type=Path, metavar="PATH")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"git-tq: {which_git_tq()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.screenshot:
            screenshot(root, args.screenshot.resolve())
        elif args.soak:
            soak(root, args.soak, args.pages, args.rate, args.every)
        else:
            bench_report(root, args.jobs, args.points, args.rounds)
            bench_serve(root, args.listing, args.rounds)


if __name__ == "__main__":
    main()
