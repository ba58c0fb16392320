"""The torchrun example of docs/distributed.md runs on two CPU processes and trains."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrun_example_trains_on_two_processes():
    script = os.path.join(ROOT, "docs", "distributed_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    accuracy = [float(a) for a in re.findall(r"accuracy on all digits ([0-9.]+)", done.stdout)]
    assert len(accuracy) == 3 and accuracy[-1] > 0.95, done.stdout
    plans = re.findall(r"rank (\d): plan (\{.*?\})", done.stdout)
    assert sorted(r for r, _ in plans) == ["0", "1"] and plans[0][1] == plans[1][1], done.stdout
