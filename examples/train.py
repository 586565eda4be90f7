"""A preemptible training loop: checkpoints on SIGTERM, resumes from the checkpoint.

git tq sends SIGTERM when a more urgent job needs the GPU, waits for the
job's grace period (-g), then SIGKILLs. The job comes back later in the same
worktree, with TQ_RESUMED=1 and TQ_ATTEMPT raised, and finds its checkpoint.

It reports its metrics by writing a JSON object to $TQ_METRICS (the last write
before an attempt ends is recorded), and writes results/summary.json, which
git tq records in git with the job (`git tq diff N --outputs`).

    git tq run -p 50 -g 60 python examples/train.py --steps 1000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

CHECKPOINT = "checkpoint.json"


def save(state: dict[str, int]) -> None:
    tmp = CHECKPOINT + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, CHECKPOINT)  # a SIGKILL mid-write never leaves half a checkpoint


def report(state: dict[str, int], steps: int) -> None:
    """Metrics for git tq: a made-up loss that falls as training goes on."""
    path = os.environ.get("TQ_METRICS")
    if path:
        loss = round(1.0 / (1 + state["step"]), 4)
        with open(path, "w") as fh:
            json.dump({"loss": loss, "step": state["step"], "progress": state["step"] / steps},
                      fh)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--step-seconds", type=float, default=0.1)
    args = parser.parse_args()

    state = {"step": 0}
    if os.path.exists(CHECKPOINT):
        with open(CHECKPOINT) as fh:
            state = json.load(fh)
    attempt = os.environ.get("TQ_ATTEMPT", "1")
    print(f"attempt {attempt} (resumed={os.environ.get('TQ_RESUMED', '0')}) starts at step "
          f"{state['step']} on GPUs {os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}", flush=True)

    stop = False

    def on_sigterm(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_sigterm)
    while state["step"] < args.steps:
        time.sleep(args.step_seconds)  # one training step
        state["step"] += 1
        if stop:
            save(state)
            report(state, args.steps)
            print(f"SIGTERM: checkpoint saved at step {state['step']}", flush=True)
            return 0
        if state["step"] % 10 == 0:
            save(state)
            report(state, args.steps)
    save(state)
    report(state, args.steps)
    os.makedirs("results", exist_ok=True)
    with open(os.path.join("results", "summary.json"), "w") as fh:
        json.dump({"steps": args.steps, "final_step": state["step"]}, fh)
    print(f"finished {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
