"""A first job for git tq: prints where it runs and what it was given."""

import os
import sys
import time

print(f"hello from git tq job {os.environ.get('TQ_JOB_ID', '?')} in {os.getcwd()}")
print(f"arguments: {sys.argv[1:]}, GPUs: {os.environ.get('CUDA_VISIBLE_DEVICES', '(not set)')}")
for step in range(3):
    print(f"step {step}", flush=True)
    time.sleep(0.1)
print("done")
