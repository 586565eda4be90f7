"""What `git tq run --backend slurm` adds to plain `sbatch`, on the same real cluster.

Three figures, each the median of --rounds jobs, with plain sbatch in the same run:
- submit: `git tq run -q --backend slurm --cpu -- true` against `sbatch --parsable
  --wrap true` (both return once the job is queued; git tq's daemon then calls sbatch);
- start: from the submitting command's return to the payload's first line, for both
  (git tq adds its daemon's sbatch, the batch job's interpreter, the worktree and the
  environment); and the part of it spent on the node, from the batch job's start to
  the payload (`batch_started` in the attempt's `.ident`);
- record: from the payload's last line to the job's ref saying it ended.

Needs root: it starts the tests' single-node cluster (tests/slurm_cluster.py) when
none is up, and stops it again.

    python bench/slurm.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import slurm_cluster  # noqa: E402
from common import ENV, git, machine  # noqa: E402

PAYLOAD = """\
import sys, time
open(sys.argv[1], "w").write(repr(time.time()))
open(sys.argv[2], "w").write(repr(time.time()))
"""


def wait_for(pred, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.005)


def ref_ended(repo: Path, job: int) -> bool:
    out = subprocess.run(["git", "cat-file", "-p", f"refs/tq/jobs/{job}"], cwd=repo,
                         capture_output=True, text=True, env=ENV).stdout
    return "Tq-State: done" in out or "Tq-State: failed" in out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    started_here = not slurm_cluster.is_up()
    cluster = slurm_cluster.start(grace=5, gpus=2)
    os.environ.update(cluster.env)
    env = {**ENV, **cluster.env}
    try:
        with tempfile.TemporaryDirectory() as tmp_text:
            tmp = Path(tmp_text)
            repo = tmp / "repo"
            repo.mkdir()
            git(repo, "init", "-q")
            (repo / "payload.py").write_text(PAYLOAD)
            for i in range(100):
                (repo / f"f{i}.py").write_text(f"X = {i}\n")
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", "bench")
            git(repo, "config", "tq.home", str(tmp / "tqhome"))
            git(repo, "config", "tq.backend", "slurm")
            subprocess.run(["git", "tq", "start"], cwd=repo, env=env, check=True,
                           capture_output=True)
            tq_submit, tq_start, node, record = [], [], [], []
            sb_submit, sb_start = [], []
            for r in range(args.rounds):
                first, last = tmp / f"first{r}", tmp / f"last{r}"
                t0 = time.time()
                out = subprocess.run(["git", "tq", "run", "-q", "--cpu", "--", "python",
                                      "payload.py", str(first), str(last)], cwd=repo, env=env,
                                     check=True, capture_output=True, text=True).stdout
                t1 = time.time()
                job = int(out.strip())
                wait_for(lambda last=last, job=job: last.exists() and ref_ended(repo, job))
                t_ref = time.time()
                tq_submit.append(t1 - t0)
                tq_start.append(float(first.read_text()) - t1)
                record.append(t_ref - float(last.read_text()))
                idents = list((tmp / "tqhome" / "run").glob(f"*/{job}.ident.1"))
                if idents:
                    batch = json.loads(idents[0].read_text()).get("batch_started")
                    if isinstance(batch, float):
                        node.append(float(first.read_text()) - batch)
                # the peer: plain sbatch of the same payload
                pfirst, plast = tmp / f"pfirst{r}", tmp / f"plast{r}"
                t0 = time.time()
                subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--chdir",
                                str(repo), "--wrap",
                                f"python payload.py {pfirst} {plast}"], env=env, check=True,
                               capture_output=True)
                t1 = time.time()
                wait_for(plast.exists)
                sb_submit.append(t1 - t0)
                sb_start.append(float(pfirst.read_text()) - t1)
            subprocess.run(["git", "tq", "stop"], cwd=repo, env=env, capture_output=True)
    finally:
        if started_here:
            slurm_cluster.stop()

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:8.1f} ms" if values else "     n/a"

    print(f"# {machine()}; Slurm {'.'.join(map(str, cluster.version))}; "
          f"{args.rounds} rounds, medians")
    print(f"submit (command returns)      git tq {ms(tq_submit)}   sbatch {ms(sb_submit)}")
    print(f"returned -> payload runs      git tq {ms(tq_start)}   sbatch {ms(sb_start)}")
    print(f"  of it on the node (batch job start -> payload): {ms(node)}")
    print(f"payload ends -> ref says ended  git tq {ms(record)}")


if __name__ == "__main__":
    main()
