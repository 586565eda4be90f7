"""A real single-node Slurm cluster for the tests (the `slurm_cluster` fixture of conftest.py).

It installs Slurm and munge with apt-get where they are missing (root only), writes a config,
and runs munged, slurmctld and `slurmd -N localhost` as plain background processes (no
systemd). Config, state, logs, pid files, the munge key and socket and the fake GPUs all lie
under one folder, BASE; `SLURM_CONF` names the config there, so nothing under /etc is written
and a Slurm of the machine's own (on its default ports) is left alone.

One cluster per machine, shared by the pytest workers (xdist) and by concurrent runs, through
file locks in BASE:

- start.lock: held while a process checks, starts or stops the cluster;
- users.lock: every process that uses the cluster holds it shared until its session ends; the
  teardown takes it exclusively without waiting, so it never stops a cluster still in use;
- tests.lock: one test at a time (two fake GPUs and the machine's CPUs are all there is);
- started-by-tests: marks a cluster a fixture started; the teardown stops only those.

The teardown stops each daemon by the pid in its pid file, then any slurmstepd or job process
left of this cluster (found by the SLURM_CONF in its environment), never by name.

For a developer: `python tests/slurm_cluster.py start|stop|status` (as root).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Callable, Optional

BASE = Path(tempfile.gettempdir()) / "git-tq-slurm"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# The programs the packages bring that the cluster needs.
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo",
            "munged", "munge", "unmunge")
CTLD_PORT = 16817  # not Slurm's 6817/6818: a machine's own Slurm may be using those
SLURMD_PORT = 16818
INSTALL_TIMEOUT = 300.0  # apt-get update + install; ~12 s with a network
START_TIMEOUT = 30.0
STARTED_MARK = "started-by-tests"
STATE_FILE = "cluster.json"
# Where apt and the daemons look for programs, whatever PATH the tests were given.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """No cluster can be had here; the message is one line saying what is missing."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: where its files are and what it offers."""

    base: Path  # the state dir: config, state, logs, pid files, munge socket, fake GPUs
    conf: Path  # slurm.conf (SLURM_CONF)
    low: str  # default partition, preemptible (PreemptMode=REQUEUE, GraceTime=grace)
    high: str  # PriorityTier=2: its jobs preempt those of `low`
    gpus: int  # fake GPUs (GRES gpu, character devices)
    grace: int  # GraceTime of `low`, seconds
    cpus: int
    version: tuple[int, int]  # (major, minor), e.g. (22, 5)
    start_seconds: float = 0.0  # how long the start took (0 when it was already up)
    install_seconds: float = 0.0  # how long apt-get took (0 when nothing was installed)

    @property
    def state_dir(self) -> Path:
        return self.base

    @property
    def partitions(self) -> tuple[str, str]:
        return (self.low, self.high)

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point Slurm's tools at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    def to_json(self) -> str:
        data = asdict(self)
        data.update(base=str(self.base), conf=str(self.conf), version=list(self.version))
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> SlurmCluster:
        data = json.loads(text)
        data.update(base=Path(data["base"]), conf=Path(data["conf"]),
                    version=tuple(data["version"]))
        return cls(**data)


# ---------------------------------------------------------------- small helpers


def poll(pred: Callable[[], object], timeout: float, what: str,
         detail: Callable[[], str] = lambda: "") -> None:
    """Wait for a condition with a deadline; Unavailable naming `what` when it never holds."""
    deadline = time.monotonic() + timeout
    interval = 0.02
    while not pred():
        if time.monotonic() > deadline:
            extra = detail()
            raise Unavailable(f"{what} within {timeout:.0f}s" + (f": {extra}" if extra else ""))
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def system_env(conf: Optional[Path] = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = SYSTEM_PATH + os.pathsep + env.get("PATH", "")
    if conf is not None:
        env["SLURM_CONF"] = str(conf)
    return env


def run(args: Sequence[str], conf: Optional[Path] = None, timeout: float = 30.0,
        input: Optional[str] = None,
        extra_env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess[str]:
    env = system_env(conf)
    env.update(extra_env or {})
    try:
        return subprocess.run(list(args), capture_output=True, text=True, env=env,
                              timeout=timeout, input=input, check=False, cwd="/")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(args), 124, "", f"timed out after {timeout}s")
    except OSError as e:
        return subprocess.CompletedProcess(list(args), 127, "", str(e))


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def read_pid(pid_file: Path) -> Optional[int]:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: Optional[int]) -> bool:
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (a daemon that died while we are its parent) is not alive.
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields and fields[0] == "Z":
            return False
    return True


@contextlib.contextmanager
def flocked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[IO[bytes]]:
    """Hold a flock on `path` (created if missing) for the block."""
    f = open(path, "ab")  # noqa: SIM115 - closed below, with the lock
    try:
        fcntl.flock(f.fileno(), mode)
        yield f
    finally:
        f.close()


def which(program: str) -> Optional[str]:
    return shutil.which(program, path=SYSTEM_PATH + os.pathsep + os.environ.get("PATH", ""))


# ---------------------------------------------------------------- install


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if which(p) is None]


def unavailable_reason() -> Optional[str]:
    """Why no cluster can be brought up here (one line), or None when one can."""
    if sys.platform != "linux":
        return f"slurm tests need Linux (this is {sys.platform})"
    missing = missing_programs()
    if os.geteuid() != 0:
        if missing:
            return "slurm tests need root and apt-get (not root)"
        return "slurm tests need root to start slurmd (not root)"
    if missing and which("apt-get") is None:
        return f"slurm tests need root and apt-get (no apt-get; missing {', '.join(missing)})"
    return None


def install(timeout: float = INSTALL_TIMEOUT) -> float:
    """apt-get install the packages where a program is missing; the seconds it took (0.0
    when nothing was missing). Unavailable when apt-get fails or runs out of time."""
    missing = missing_programs()
    if not missing:
        return 0.0
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    t0 = time.monotonic()
    deadline = t0 + timeout
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    # Packages' postinst scripts must not try to start services (there is no systemd).
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    apt_opts = ["-o", "DPkg::Lock::Timeout=60", "-o", "Acquire::Retries=1",
                "-o", "Acquire::http::Timeout=20", "-o", "Acquire::https::Timeout=20"]
    try:
        steps = [["apt-get", *apt_opts, "update", "-qq"],
                 ["apt-get", *apt_opts, "install", "-y", "-qq", "--no-install-recommends",
                  *PACKAGES]]
        for step in steps:
            left = deadline - time.monotonic()
            p = run(step, timeout=max(left, 1.0), extra_env=env)
            if p.returncode != 0:
                err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                raise Unavailable(f"slurm tests need {' '.join(PACKAGES)}: "
                                  f"`apt-get {step[len(apt_opts) + 1]}` failed ({err})")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = missing_programs()
    if still:
        raise Unavailable(f"slurm tests need {', '.join(still)}: not found after apt-get install")
    return time.monotonic() - t0


def slurm_version() -> tuple[int, int]:
    p = run(["slurmd", "-V"])
    m = re.search(r"(\d+)\.(\d+)", p.stdout)
    if p.returncode != 0 or not m:
        raise Unavailable(f"cannot read the Slurm version from `slurmd -V` ({p.stdout.strip()}"
                          f"{p.stderr.strip()})")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------- config


def node_hardware() -> tuple[int, int]:
    """(CPUs, MB of memory to offer) as slurmd sees the machine (`slurmd -C`): a node whose
    config claims more than slurmd finds at registration is drained."""
    out = run(["slurmd", "-C"]).stdout
    cpus = re.search(r"\bCPUs=(\d+)", out)
    mem = re.search(r"RealMemory=(\d+)", out)
    return (int(cpus.group(1)) if cpus else os.cpu_count() or 1,
            int(mem.group(1)) * 9 // 10 if mem else 1024)


def slurm_conf(base: Path, version: tuple[int, int], cpus: int, memory: int, gpus: int,
               grace: int) -> str:
    """slurm.conf for one node, two partitions (`low` preemptible, `high`) and fake GPUs."""
    # The preemption signal (sbatch --signal=B:SIG@N) reaches the batch script only with
    # this option, which 23.02 moved to PreemptParameters.
    send_user_signal = ("PreemptParameters=send_user_signal" if version >= (23, 2)
                        else "SlurmctldParameters=preempt_send_user_signal")
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    log = base / "log"
    return f"""\
# Written by git tq's tests/slurm_cluster.py: a single-node cluster for tests.
ClusterName=tqtest
SlurmctldHost=localhost
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s; the job becomes eligible cred_expire + 1 s after its requeue).
AuthInfo=socket={base / "munge" / "munge.socket"},cred_expire=10
StateSaveLocation={base / "ctld"}
SlurmdSpoolDir={base / "d"}
SlurmctldPidFile={base / "slurmctld.pid"}
SlurmdPidFile={base / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={base / "etc" / "plugstack.conf"}
# No cgroups in CI containers: processes are tracked by their tree, nothing is isolated.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd (so no sacct): ends are in the jobcomp file, and squeue -t all /
# scontrol show job keep finished jobs for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={log / "jobcomp.txt"}
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
# Start jobs at once (the defaults delay a batch job by up to 3 s, and backfill runs every 30 s).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# Preemption: a job of the higher PriorityTier partition requeues jobs of the lower one.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{send_user_signal}
JobRequeue=1
# A job that exits 75 (EX_TEMPFAIL) is requeued: a batch script that traps the preemption
# SIGTERM saves, exits 75 inside GraceTime and is requeued (not FAILED).
RequeueExit=75
KillWait=5
SlurmdTimeout=30
InactiveLimit=0
MpiDefault=none
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory}{gres} State=UNKNOWN
PartitionName=low Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 \
PreemptMode=REQUEUE GraceTime={grace}
PartitionName=high Nodes=localhost Default=NO MaxTime=INFINITE State=UP PriorityTier=2 \
PreemptMode=OFF
"""


def gres_conf(base: Path, gpus: int) -> str:
    if not gpus:
        return "AutoDetect=off\n"
    return (f"AutoDetect=off\n"
            f"NodeName=localhost Name=gpu File={base / 'dev' / 'fakegpu'}[0-{gpus - 1}]\n")


def make_fake_gpus(base: Path, gpus: int) -> None:
    """Character devices (1,3: a /dev/null twin): gres.conf File= must name devices, and
    with one per GPU each job gets CUDA_VISIBLE_DEVICES and SLURM_JOB_GPUS."""
    dev = base / "dev"
    dev.mkdir(exist_ok=True)
    for i in range(gpus):
        path = dev / f"fakegpu{i}"
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISCHR(path.lstat().st_mode):
                continue
            path.unlink()
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as e:  # a container without CAP_MKNOD
            raise Unavailable(f"slurm tests need fake GPU devices: mknod {path}: "
                              f"{e.strerror}") from None
        path.chmod(0o666)


# ---------------------------------------------------------------- start


def munge_works(base: Path) -> bool:
    sock = str(base / "munge" / "munge.socket")
    cred = run(["munge", "-S", sock, "-n"], timeout=5)
    if cred.returncode != 0:
        return False
    return run(["unmunge", "-S", sock], input=cred.stdout, timeout=5).returncode == 0


def ctld_up(conf: Path) -> bool:
    p = run(["scontrol", "ping"], conf=conf, timeout=10)
    return p.returncode == 0 and " is UP" in p.stdout


def node_state(conf: Path) -> str:
    p = run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"], conf=conf, timeout=10)
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else ""


def node_ready(conf: Path) -> bool:
    st = node_state(conf)
    if st.startswith(("down", "drain", "fail")):
        # An unclean restart can leave the node down: resume it.
        run(["scontrol", "update", "nodename=localhost", "state=resume"], conf=conf)
        return False
    return st.rstrip("*") in ("idle", "mixed", "allocated")


def daemon_pid_files(base: Path) -> dict[str, Path]:
    return {"slurmd": base / "slurmd.pid", "slurmctld": base / "slurmctld.pid",
            "munged": base / "munge" / "munged.pid"}


def is_up(base: Path = BASE) -> bool:
    """All three daemons of the cluster at `base` run, and its node takes jobs."""
    conf = base / "etc" / "slurm.conf"
    if not conf.exists() or not (base / STATE_FILE).exists():
        return False
    if not all(alive(read_pid(f)) for f in daemon_pid_files(base).values()):
        return False
    return ctld_up(conf) and node_ready(conf)


def spawn(args: Sequence[str], conf: Path, log: Path) -> None:
    """Start a daemon that forks itself into the background; its own pid file tells its pid.
    close_fds (the default) keeps our lock files out of it."""
    with open(log, "ab") as err:
        p = subprocess.run(list(args), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                           env=system_env(conf), cwd=str(conf.parent), timeout=30, check=False)
    if p.returncode != 0:
        raise Unavailable(f"`{' '.join(args)}` exited {p.returncode}: {tail(log, 3)}")


def start(base: Path = BASE, grace: int = 5, gpus: int = 2) -> SlurmCluster:
    """Bring a cluster up at `base` from nothing (installing the packages if needed), after
    stopping whatever is left of an earlier one there. Call with start.lock held."""
    install_s = install()
    t0 = time.monotonic()
    stop(base)
    version = slurm_version()
    cpus, memory = node_hardware()
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    base.chmod(0o755)  # munged wants its socket's folders searchable by all
    for sub in ("ctld", "d", "log", "etc", "munge", "munge-key"):
        if sub in ("ctld", "d", "log"):
            shutil.rmtree(base / sub, ignore_errors=True)  # no jobs of an earlier cluster
        (base / sub).mkdir(exist_ok=True)
    (base / "munge").chmod(0o755)
    (base / "munge-key").chmod(0o700)
    key = base / "munge-key" / "munge.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
    make_fake_gpus(base, gpus)
    etc = base / "etc"
    conf = etc / "slurm.conf"
    (etc / "gres.conf").write_text(gres_conf(base, gpus))
    (etc / "plugstack.conf").write_text("")
    conf.write_text(slurm_conf(base, version, cpus, memory, gpus, grace))
    log = base / "log"

    spawn(["munged", f"--socket={base / 'munge' / 'munge.socket'}", f"--key-file={key}",
           f"--pid-file={base / 'munge' / 'munged.pid'}",
           f"--seed-file={base / 'munge-key' / 'munged.seed'}",
           f"--log-file={log / 'munged.log'}"], conf, log / "munged.out")
    poll(lambda: munge_works(base), 10, "munged did not answer",
         lambda: tail(log / "munged.log"))
    spawn(["slurmctld"], conf, log / "slurmctld.out")
    poll(lambda: ctld_up(conf), START_TIMEOUT, "slurmctld did not answer `scontrol ping`",
         lambda: tail(log / "slurmctld.log"))
    spawn(["slurmd", "-N", "localhost"], conf, log / "slurmd.out")
    poll(lambda: node_ready(conf), START_TIMEOUT, "node localhost did not become idle",
         lambda: f"state {node_state(conf)!r}; " + tail(log / "slurmd.log"))
    cluster = SlurmCluster(base=base, conf=conf, low="low", high="high", gpus=gpus, grace=grace,
                           cpus=cpus, version=version, start_seconds=time.monotonic() - t0,
                           install_seconds=install_s)
    (base / STATE_FILE).write_text(cluster.to_json())
    return cluster


# ---------------------------------------------------------------- stop


def stop_pid(pid_file: Path, timeout: float = 10.0) -> Optional[int]:
    """SIGTERM the process of a pid file, SIGKILL it if it outlives `timeout`; its pid."""
    pid = read_pid(pid_file)
    if not alive(pid):
        pid_file.unlink(missing_ok=True)
        return None
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(Unavailable):
        poll(lambda: not alive(pid), timeout, "")
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Unavailable):
            poll(lambda: not alive(pid), 5, "")
    pid_file.unlink(missing_ok=True)
    return pid


def leftover_pids(conf: Path, steps: bool = True) -> list[int]:
    """Job processes of this cluster (those with its SLURM_CONF and a SLURM_JOB_ID in their
    environment: a job's orphans escape proctrack/linuxproc), and with `steps` its
    slurmstepd processes."""
    found = []
    want = f"SLURM_CONF={conf}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if want not in environ:
            continue
        if (steps and comm == "slurmstepd") or (
                comm != "slurmstepd" and any(v.startswith(b"SLURM_JOB_ID=") for v in environ)):
            found.append(int(entry.name))
    return found


def active_jobs(conf: Path) -> list[str]:
    p = run(["squeue", "-h", "-o", "%i %T"], conf=conf, timeout=10)
    return p.stdout.split() if p.returncode == 0 else []


def cancel_all(conf: Path, timeout: float = 15.0) -> None:
    """Cancel every job of the cluster and wait until none holds resources any more."""
    run(["scancel", "--full", "--signal=KILL", "--state=RUNNING"], conf=conf)
    run(["scancel", "--user=root"], conf=conf)
    p = run(["squeue", "-h", "-o", "%i"], conf=conf)
    ids = p.stdout.split()
    if ids:  # jobs of other users, if any test submitted as one
        run(["scancel", *ids], conf=conf)
    with contextlib.suppress(Unavailable):
        poll(lambda: not active_jobs(conf), timeout, "jobs did not end")


def stop(base: Path = BASE) -> list[str]:
    """Stop the cluster at `base` (its jobs, then slurmd, slurmctld, munged): by pid files,
    then any slurmstepd or job process left with its SLURM_CONF. What it stopped."""
    conf = base / "etc" / "slurm.conf"
    stopped = []
    pid_files = daemon_pid_files(base)
    if alive(read_pid(pid_files["slurmctld"])) and alive(read_pid(pid_files["slurmd"])):
        cancel_all(conf, timeout=10)
    for name, pid_file in pid_files.items():
        pid = stop_pid(pid_file)
        if pid is not None:
            stopped.append(f"{name} {pid}")
    for pid in leftover_pids(conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            stopped.append(f"leftover {pid}")
    (base / STATE_FILE).unlink(missing_ok=True)
    (base / STARTED_MARK).unlink(missing_ok=True)
    return stopped


# ---------------------------------------------------------------- sharing


class Share:
    """This process's use of the machine's cluster: open() brings it up or joins it, and
    holds users.lock shared until close()."""

    def __init__(self, base: Path = BASE) -> None:
        self.base = base
        self.users: Optional[IO[bytes]] = None
        self.cluster: Optional[SlurmCluster] = None

    def open(self, grace: int = 5, gpus: int = 2, mark: bool = True,
             run_id: Optional[str] = None) -> SlurmCluster:
        """The cluster, started if it is not up (and then, with `mark`, marked as one the
        teardown stops). `run_id` names the test run (xdist's testrunuid): where a start
        failed in this run, the other workers are told at once instead of trying again."""
        if self.cluster is not None:
            return self.cluster
        reason = unavailable_reason()
        if reason:
            raise Unavailable(reason)
        self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
        failed = self.base / "start-failed"
        with flocked(self.base / "start.lock"):
            if run_id:
                with contextlib.suppress(OSError):
                    said_run, _, said = failed.read_text().partition("\n")
                    if said_run == run_id:
                        raise Unavailable(said.strip())
            cluster = None
            if is_up(self.base):
                cluster = SlurmCluster.from_json((self.base / STATE_FILE).read_text())
                if (cluster.grace, cluster.gpus) == (grace, gpus):
                    cluster = replace(cluster, start_seconds=0.0, install_seconds=0.0)
                else:  # up, but not as asked: start it again, unless it is in use
                    with open(self.base / "users.lock", "ab") as users:
                        try:
                            fcntl.flock(users.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            raise Unavailable(
                                f"the machine's test cluster is in use with grace "
                                f"{cluster.grace}, {cluster.gpus} GPUs (asked: {grace}, "
                                f"{gpus})") from None
                    cluster = None
            if cluster is None:
                try:
                    cluster = start(self.base, grace=grace, gpus=gpus)
                except Unavailable as e:
                    stop(self.base)
                    if run_id:
                        failed.write_text(f"{run_id}\n{e}\n")
                    raise
                if mark:
                    (self.base / STARTED_MARK).write_text(f"{os.getpid()}\n")
            users = open(self.base / "users.lock", "ab")  # noqa: SIM115 - held until close()
            fcntl.flock(users.fileno(), fcntl.LOCK_SH)
            self.users = users
        self.cluster = cluster
        return cluster

    def close(self) -> None:
        if self.users is not None:
            self.users.close()  # releases the shared lock
            self.users = None
        self.cluster = None


@dataclass(frozen=True)
class Teardown:
    """What a teardown stopped, and how long the cluster's install, start and stop took."""

    stopped: list[str]
    stop_seconds: float
    start_seconds: float
    install_seconds: float

    def summary(self) -> str:
        install = f"installed in {self.install_seconds:.1f}s, " if self.install_seconds else ""
        return (f"slurm test cluster: {install}started in {self.start_seconds:.1f}s, "
                f"stopped in {self.stop_seconds:.1f}s ({', '.join(self.stopped) or 'nothing'})")


def teardown_if_unused(base: Path = BASE) -> Optional[Teardown]:
    """Stop the cluster if a fixture started it and no process uses it any more; None when
    it was left as it was."""
    if not (base / STARTED_MARK).exists():
        return None
    with flocked(base / "start.lock"):
        if not (base / STARTED_MARK).exists():
            return None
        with open(base / "users.lock", "ab") as users:
            try:
                fcntl.flock(users.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # another session still uses it; the last one stops it
            try:
                cluster: Optional[SlurmCluster] = SlurmCluster.from_json(
                    (base / STATE_FILE).read_text())
            except (OSError, ValueError, TypeError, KeyError):
                cluster = None
            t0 = time.monotonic()
            stopped = stop(base)
            return Teardown(stopped=stopped, stop_seconds=time.monotonic() - t0,
                            start_seconds=cluster.start_seconds if cluster else 0.0,
                            install_seconds=cluster.install_seconds if cluster else 0.0)


@contextlib.contextmanager
def exclusive(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """One test at a time on the cluster; its jobs are cancelled after it."""
    with flocked(cluster.base / "tests.lock"):
        try:
            yield cluster
        finally:
            cancel_all(cluster.conf)
            for pid in leftover_pids(cluster.conf, steps=False):  # orphans of ended jobs
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def main(argv: Sequence[str]) -> int:
    cmd = argv[0] if argv else "status"
    if cmd == "start":
        share = Share()
        cluster = share.open(mark=False)  # a developer's cluster: no test run stops it
        share.close()
        print(f"up: SLURM_CONF={cluster.conf} (install {cluster.install_seconds:.1f}s, "
              f"start {cluster.start_seconds:.1f}s, Slurm {cluster.version})")
        return 0
    if cmd == "stop":
        with flocked(BASE / "start.lock"):
            t0 = time.monotonic()
            stopped = stop(BASE)
        print(f"stopped {', '.join(stopped) or 'nothing'} in {time.monotonic() - t0:.1f}s")
        return 0
    if cmd == "status":
        print("up" if is_up(BASE) else "down")
        return 0
    print("usage: python tests/slurm_cluster.py start|stop|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
