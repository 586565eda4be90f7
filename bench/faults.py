"""Fault injection: the daemon and supervisors killed with SIGKILL at random moments, and
hundreds of concurrent submissions. Prints what was lost.

    python bench/faults.py [--daemon-rounds 100] [--supervisor-rounds 30]
                           [--concurrent 800] [--parallel 16] [--seed N]

Each part runs in its own temporary tq home and repository (a hermetic HOME, no system
git config, no GPU: `tq.gpus 0` is one pretend GPU), with the real `git-tq` on PATH.
A count of 0 skips a part. tests/soak/test_soak.py runs the same functions and asserts
the zeros; tests/test_faults_quick.py runs small versions of them.

Jobs are small Python scripts that keep their own account in a markers folder: one line
per attempt started (TQ_ATTEMPT), one per line they printed, one when their work was
done, their checkpoint. From those and the records (`git tq ls --all --json`) and the
log files, afterwards:

- jobs lost: submitted, but never recorded as ended, or ended without its work done;
- run twice: an attempt number started twice, or the work of one job done twice;
- exit codes lost: an ended record whose exit code is not the one the job exited with;
- log lines lost: lines a job printed that its log file does not hold.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# The job of the daemon rounds: ARGV markers exit-code steps step-seconds [gate]. With a
# gate, it waits before its last step until that file exists (a test's preemption comes
# while it runs, however loaded the machine). It checkpoints
# on SIGTERM (the step it reached) and exits 0; a resumed attempt goes on from there. A
# job whose work is done says so once and, if run again (stopped just after its last
# step: a preemption requeues it whatever its exit code), only exits with its code.
JOB = """\
import os, signal, sys, time
markers, code, steps, step_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    float(sys.argv[4])
gate = sys.argv[5] if len(sys.argv) > 5 else None
jid, attempt = os.environ["TQ_JOB_ID"], os.environ["TQ_ATTEMPT"]
base = os.path.join(markers, jid)


def note(name, text):
    fd = os.open(f"{base}.{name}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (text + "\\n").encode())
    os.close(fd)


def checkpoint(step):
    with open(base + ".ckpt.part", "w") as fh:
        fh.write(str(step))
    os.replace(base + ".ckpt.part", base + ".ckpt")


def say(text):
    print(text, flush=True)
    note("lines", text)


note("starts", attempt)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
step = int(open(base + ".ckpt").read()) if os.path.exists(base + ".ckpt") else 0
say(f"job {jid} attempt {attempt} from step {step}")
if step >= steps:
    say(f"job {jid} attempt {attempt} already done, exits {code}")
    sys.exit(code)
while step < steps:
    if stop:
        checkpoint(step)
        say(f"job {jid} attempt {attempt} checkpoint at step {step}")
        note("preempted", attempt)
        sys.exit(0)
    if gate and step == steps - 1 and not os.path.exists(gate):
        time.sleep(0.02)
        continue
    time.sleep(step_s)
    step += 1
    say(f"job {jid} step {step}")
checkpoint(step)
note("done", attempt)
say(f"job {jid} attempt {attempt} exits {code}")
sys.exit(code)
"""

END_STATES = ("done", "failed", "cancelled")


# ---------------------------------------------------------------- environment


def hermetic_env(root: Path) -> dict[str, str]:
    """The environment of one part: its own HOME and tq home, a fixed identity, no system
    config, autostart off (the parts start and kill the daemon themselves)."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "TQ_")) and k not in ("XDG_STATE_HOME",
                                                             "XDG_CONFIG_HOME")}
    bin_dir = os.path.dirname(sys.executable)
    env.update({
        "HOME": str(home), "TQ_HOME": str(root / "tqhome"), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "faults", "GIT_AUTHOR_EMAIL": "faults@example.com",
        "GIT_COMMITTER_NAME": "faults", "GIT_COMMITTER_EMAIL": "faults@example.com",
        "GIT_EDITOR": "false", "NO_COLOR": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    })
    (home / ".gitconfig").write_text(
        "[init]\n\tdefaultBranch = main\n[tq]\n\tautostart = false\n")
    return env


class Tq:
    """The real `git tq` in one repository, with one environment."""

    def __init__(self, repo: Path, env: Mapping[str, str]) -> None:
        self.repo = repo
        self.env = dict(env)
        self.home = Path(self.env["TQ_HOME"])

    def git(self, *args: str) -> str:
        p = subprocess.run(["git", *args], cwd=self.repo, env=self.env, capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return p.stdout

    def tq(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["git", "tq", *args], cwd=self.repo, env=self.env,
                           capture_output=True, text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"git tq {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return p

    def submit(self, *args: str) -> int:
        return int(self.tq("run", "-q", *args).stdout.strip())

    def jobs(self) -> dict[int, dict[str, Any]]:
        """Every local job's record (`ls --all --json`), by id."""
        listed = json.loads(self.tq("ls", "--all", "--json").stdout)
        return {int(j["id"]): j for j in listed if j.get("trust") == "local"}

    def start(self) -> int:
        """`git tq start`; the new daemon's pid."""
        self.tq("start")
        return self.daemon_pid()

    def daemon_pid(self) -> int:
        info = json.loads((self.home / "daemon.json").read_text())
        return int(info["pid"])

    def stop(self) -> None:
        self.tq("stop", check=False)


def make_repo(path: Path, env: Mapping[str, str], files: Mapping[str, str]) -> Tq:
    path.mkdir(parents=True)
    t = Tq(path, env)
    t.git("init", "-q")
    t.git("config", "tq.gpus", "0")
    t.git("config", "tq.cpuSlots", "2")
    for name, text in files.items():
        (path / name).write_text(text)
    t.git("add", "-A")
    t.git("commit", "-qm", "fault injection jobs")
    return t


def wait_until(pred: Callable[[], object], timeout: float, what: str = "condition",
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def kill_leftovers(root: Path) -> None:
    """Every process whose command line or cwd lies under `root` (supervisors, jobs)."""
    import psutil

    mine = str(root)
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            cwd = proc.info["cwd"] or ""
            if proc.pid != os.getpid() and (mine in cmd or cwd.startswith(mine)):
                proc.kill()
        except (psutil.Error, TypeError):
            continue


# ---------------------------------------------------------------- the daemon killed


@dataclass
class DaemonFigures:
    rounds: int = 0
    jobs: int = 0
    attempts: int = 0
    preemptions: int = 0
    kills: int = 0
    jobs_lost: list[int] = field(default_factory=list)
    run_twice: list[int] = field(default_factory=list)
    exit_codes_lost: list[int] = field(default_factory=list)
    log_lines_lost: int = 0
    log_lines: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def zero(self) -> bool:
        return not (self.jobs_lost or self.run_twice or self.exit_codes_lost
                    or self.log_lines_lost)

    def summary(self) -> str:
        return (f"daemon killed {self.kills} times ({self.rounds} rounds, {self.seconds:.0f} s):"
                f" {self.jobs} jobs, {self.attempts} attempts, {self.preemptions} preemptions;"
                f" jobs lost {len(self.jobs_lost)}, run twice {len(self.run_twice)},"
                f" exit codes lost {len(self.exit_codes_lost)},"
                f" log lines lost {self.log_lines_lost} of {self.log_lines}")


def daemon_rounds(root: Path, rounds: int, seed: int = 1, env: Optional[Mapping[str, str]] = None,
                  max_wait: float = 1.0, drain_timeout: float = 600.0) -> DaemonFigures:
    """`rounds` times: submit a GPU job (a random priority, so that some preempt others)
    and now and then a CPU job, wait a random moment (up to `max_wait` s), SIGKILL the
    daemon, maybe submit while none runs, start a new one. Then wait for every job to end
    and count what was lost."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    env = env if env is not None else hermetic_env(root)
    markers = root / "markers"
    markers.mkdir(parents=True)
    t = make_repo(root / "daemon-repo", env, {"job.py": JOB})
    figures = DaemonFigures(rounds=rounds)
    expected: dict[int, int] = {}

    def job(kind: str) -> None:
        code = rng.choice((0, 0, 0, 1, 3, 42))
        if kind == "gpu":
            steps, step_s = rng.randint(5, 30), 0.05
            args = ["--gpus", "1", "-p", str(rng.choice((10, 50, 90))), "-g", "60"]
        else:
            steps, step_s = rng.randint(1, 4), 0.02
            args = ["--cpu"]
        jid = t.submit(*args, "--", "python", "job.py", str(markers), str(code), str(steps),
                       str(step_s))
        expected[jid] = code

    try:
        t.start()
        for _ in range(rounds):
            job("gpu")
            if rng.random() < 0.5:
                job("cpu")
            time.sleep(rng.uniform(0, max_wait))  # the random moment of the kill
            try:
                os.kill(t.daemon_pid(), signal.SIGKILL)
                figures.kills += 1
            except ProcessLookupError:
                figures.problems.append("the daemon had died by itself")
            if rng.random() < 0.3:  # a submission while no daemon runs
                job(rng.choice(("gpu", "cpu")))
            t.start()
        figures.jobs = len(expected)

        def all_ended() -> bool:
            jobs = t.jobs()
            return all(jobs.get(i, {}).get("state") in END_STATES for i in expected)

        try:
            wait_until(all_ended, drain_timeout, "every job ended", interval=0.2)
        except TimeoutError as e:
            figures.problems.append(str(e))
        count_daemon_round(t, markers, expected, figures)
    finally:
        t.stop()
        kill_leftovers(root)
    figures.seconds = time.monotonic() - t0
    return figures


def count_daemon_round(t: Tq, markers: Path, expected: Mapping[int, int],
                       figures: DaemonFigures) -> None:
    jobs = t.jobs()
    for jid, code in sorted(expected.items()):
        record = jobs.get(jid)
        starts = lines(markers / f"{jid}.starts")
        done = lines(markers / f"{jid}.done")
        figures.attempts += len(starts)
        figures.preemptions += len(lines(markers / f"{jid}.preempted"))
        if record is None or record.get("state") not in END_STATES or not done:
            figures.jobs_lost.append(jid)
            figures.problems.append(f"job {jid} lost: {record and record.get('state')}, "
                                    f"{record and record.get('detail')}, work done {len(done)}")
        if len(set(starts)) != len(starts) or len(done) > 1:
            figures.run_twice.append(jid)
            figures.problems.append(f"job {jid} run twice: attempts {starts}, done {done}")
        if record is not None and record.get("state") in END_STATES and \
                record.get("exit_code") != code:
            figures.exit_codes_lost.append(jid)
            figures.problems.append(f"job {jid} exit code {record.get('exit_code')} recorded,"
                                    f" {code} expected ({record.get('detail')})")
        printed = lines(markers / f"{jid}.lines")
        figures.log_lines += len(printed)
        log = Path(record["log"]) if record and record.get("log") else None
        logged = set(lines(log)) if log is not None else set()
        missing = [x for x in printed if x not in logged]
        if missing:
            figures.log_lines_lost += len(missing)
            figures.problems.append(f"job {jid}: {len(missing)} log lines lost, "
                                    f"first {missing[0]!r}")


# ---------------------------------------------------------------- a supervisor killed


# ARGV markers exit-code seconds: notes its start, prints, exits with the code.
SUPERVISED = """\
import os, sys, time
markers, code, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
jid = os.environ["TQ_JOB_ID"]
with open(os.path.join(markers, jid + ".started"), "a") as fh:
    fh.write(os.environ["TQ_ATTEMPT"] + "\\n")
end = time.monotonic() + seconds
while time.monotonic() < end:
    print(f"job {jid} working", flush=True)
    time.sleep(0.05)
with open(os.path.join(markers, jid + ".exited"), "a") as fh:
    fh.write(str(code) + "\\n")
sys.exit(code)
"""


@dataclass
class SupervisorFigures:
    rounds: int = 0
    killed: int = 0
    recovered: int = 0
    lost: int = 0
    wrong: int = 0
    too_late: int = 0
    not_ended: int = 0
    details: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        why = "; ".join(f"{n}x {d!r}" for d, n in sorted(self.details.items()))
        return (f"supervisor killed {self.killed} times ({self.rounds} rounds, "
                f"{self.seconds:.0f} s): exit status recovered {self.recovered}, "
                f"lost {self.lost}, wrong {self.wrong}, not ended {self.not_ended}, "
                f"job over before the kill {self.too_late}" + (f" [{why}]" if why else ""))


def supervisor_rounds(root: Path, rounds: int, seed: int = 2,
                      env: Optional[Mapping[str, str]] = None,
                      seconds: float = 0.6, end_timeout: float = 60.0) -> SupervisorFigures:
    """`rounds` times: a CPU job that runs `seconds` and exits with a random code; once its
    supervisor has written `.ident`, SIGKILL the supervisor at a random moment of the run.
    Then: was the job's exit status recorded (recovered) or recorded lost?"""
    import psutil

    rng = random.Random(seed)
    t0 = time.monotonic()
    env = env if env is not None else hermetic_env(root)
    markers = root / "markers"
    markers.mkdir(parents=True)
    t = make_repo(root / "supervisor-repo", env, {"job.py": SUPERVISED})
    figures = SupervisorFigures(rounds=rounds)
    try:
        t.start()
        for _ in range(rounds):
            code = rng.choice((0, 1, 3, 42))
            jid = t.submit("--cpu", "--", "python", "job.py", str(markers), str(code),
                           str(seconds))
            ident: dict[str, Any] = {}

            def has_ident(jid: int = jid, ident: dict[str, Any] = ident) -> bool:
                for path in (t.home / "run").glob(f"*/{jid}.ident"):
                    try:
                        ident.update(json.loads(path.read_text()))
                    except (OSError, ValueError):
                        return False
                return "supervisor" in ident

            wait_until(has_ident, 30, f"job {jid} started")
            time.sleep(rng.uniform(0, seconds))  # the random moment of the kill
            pid, started = ident["supervisor"]
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - started) >= 0.01:
                    raise psutil.NoSuchProcess(pid)
                proc.send_signal(signal.SIGKILL)
                figures.killed += 1
            except psutil.Error:
                figures.too_late += 1
                continue
            try:
                wait_until(lambda jid=jid: t.jobs()[jid]["state"] in END_STATES, end_timeout,
                           f"job {jid} ended", interval=0.1)
            except TimeoutError:
                figures.not_ended += 1
                figures.problems.append(f"job {jid} never ended after its supervisor died")
                continue
            record = t.jobs()[jid]
            detail = str(record.get("detail") or "")
            if record.get("exit_code") == code:
                figures.recovered += 1
            elif record.get("exit_code") is None:
                figures.lost += 1
                figures.details[detail] = figures.details.get(detail, 0) + 1
            else:
                figures.wrong += 1
                figures.problems.append(f"job {jid}: exit code {record.get('exit_code')}, "
                                        f"{code} expected ({detail})")
    finally:
        t.stop()
        kill_leftovers(root)
    figures.seconds = time.monotonic() - t0
    return figures


# ---------------------------------------------------------------- concurrent submissions


@dataclass
class ConcurrentFigures:
    runs: int = 0
    parallel: int = 0
    failed: int = 0
    distinct: int = 0
    refs: int = 0
    records: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return self.failed == 0 and self.distinct == self.refs == self.records == self.runs

    def summary(self) -> str:
        return (f"{self.runs} concurrent `git tq run` ({self.parallel} at a time, "
                f"{self.seconds:.0f} s): {self.distinct} distinct ids, {self.refs} refs, "
                f"{self.records} records, {self.failed} failed")


def concurrent_runs(root: Path, runs: int, parallel: int,
                    env: Optional[Mapping[str, str]] = None) -> ConcurrentFigures:
    """`runs` processes `git tq run -q --cpu -- true` in one repository, `parallel` at a
    time, no daemon: every one must get its own id, ref and readable record."""
    t0 = time.monotonic()
    env = env if env is not None else hermetic_env(root)
    t = make_repo(root / "concurrent-repo", env, {"README": "concurrent submissions\n"})
    figures = ConcurrentFigures(runs=runs, parallel=parallel)

    def one(_: int) -> Optional[int]:
        p = subprocess.run(["git", "tq", "run", "-q", "--cpu", "--", "true"], cwd=t.repo,
                           env=t.env, capture_output=True, text=True)
        if p.returncode != 0 or not p.stdout.strip().isdigit():
            figures.problems.append(f"exit {p.returncode}: {p.stderr.strip()[:200]}")
            return None
        return int(p.stdout.strip())

    try:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            ids = list(pool.map(one, range(runs)))
        got = [i for i in ids if i is not None]
        figures.failed = runs - len(got)
        figures.distinct = len(set(got))
        refs = t.git("for-each-ref", "--format=%(refname)", "refs/tq/jobs/").split()
        figures.refs = len(refs)
        records = t.jobs()
        figures.records = sum(1 for i in set(got) if records.get(i, {}).get("state")
                              == "pending")
        if sorted(refs) != sorted(f"refs/tq/jobs/{i}" for i in set(got)):
            figures.problems.append("the refs are not the ids given")
    finally:
        kill_leftovers(root)
    figures.seconds = time.monotonic() - t0
    return figures


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--daemon-rounds", type=int, default=100)
    ap.add_argument("--supervisor-rounds", type=int, default=30)
    ap.add_argument("--concurrent", type=int, default=800)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    from common import machine, which_git_tq

    print(f"machine: {machine()}, Python {sys.version.split()[0]}")
    print(f"git-tq: {which_git_tq()}")
    root = Path(tempfile.mkdtemp(prefix="tq-faults-"))
    bad = False
    try:
        if args.concurrent:
            c = concurrent_runs(root / "concurrent", args.concurrent, args.parallel)
            print(c.summary(), flush=True)
            for line in c.problems[:10]:
                print("  ", line)
            bad |= not c.ok()
        if args.daemon_rounds:
            d = daemon_rounds(root / "daemon", args.daemon_rounds, seed=args.seed)
            print(d.summary(), flush=True)
            for line in d.problems[:20]:
                print("  ", line)
            bad |= not d.zero()
        if args.supervisor_rounds:
            s = supervisor_rounds(root / "supervisor", args.supervisor_rounds,
                                  seed=args.seed + 1)
            print(s.summary(), flush=True)
            for line in s.problems[:10]:
                print("  ", line)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
