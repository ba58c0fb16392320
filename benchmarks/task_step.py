#!/usr/bin/env python
r"""The optimizer step inside the training loop of ``benchmarks/tta.py``'s tasks: SGD and
AdamW beside K-FAC, in one process.

``benchmarks/step_overhead.py`` times ``step()`` in a tight loop of its own; here each step
follows a forward and a backward on a fresh batch, as in training, so the step also pays
for bringing its tensors back into the caches. For every task:

* ``sgd`` (lr 0.1, momentum 0.9) and ``adamw`` (lr 0.01), ``torch.optim``'s multi-tensor
  implementations;
* ``kfac plain``: K-FAC at its recommended settings for the task, statistics and refresh on
  the first step only: every timed step is a *plain* step (the products, the guards, the
  update);
* ``kfac T10/T50``: statistics every 10 steps and refreshes every 50 (the tuned amortised
  setting of ``docs/benchmarks-tta.md``), so statistics and refreshes are in the average.

Printed per contender: ``step`` (µs of ``optimizer.step()``), ``whole`` (µs of the whole
iteration: ``zero_grad``, forward, ``curvature_backward``, backward, step), both medians of
``--rounds`` interleaved rounds of 100 iterations (the first round is a warm-up), and their
ratios to SGD's. One thread.

``--tree PATH`` runs another checkout's curvkit (its ``curvkit/`` and ``plugins/``) in place
of the installed one, for before/after comparisons: run the script twice, once with it.

Usage::

    python benchmarks/task_step.py                        # digits-mlp, sequence, charlm; ~2 min
    python benchmarks/task_step.py --tasks digits-mlp --rounds 9
    python benchmarks/task_step.py --tree /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any


def _use_tree(tree: str) -> None:
    """Import curvkit and its plugins from ``tree`` rather than the (editable) install."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path[:0] = [tree, os.path.join(tree, "plugins")]


def measure(task_names: list[str], rounds: int) -> list[dict[str, Any]]:
    import torch
    from torch import nn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tta

    from curvkit.plugins import default_registry

    torch.set_num_threads(1)
    registry = default_registry()
    rows: list[dict[str, Any]] = []
    for name in task_names:
        task = tta.tasks()[name]
        X, y = task.data()[:2]
        contenders = {
            "sgd": tta.Contender("sgd", "sgd", {"lr": 0.1}, "first-order"),
            "adamw": tta.Contender("adamw", "adamw", {"lr": 0.01}, "first-order"),
            "kfac plain": tta.Contender("kfac", "kfac", {"T_stats": 10**9, "T_inv": 10**9}, "K-FAC"),
            "kfac T10/T50": tta.Contender(
                "kfac", "kfac", {"T_stats": 10, "T_inv": 50, "lr": 0.3, "damping": 0.03, "kl_clip": 0.001}, "K-FAC"
            ),
        }
        runs = {}
        for label, c in contenders.items():
            torch.manual_seed(0)
            model = task.model()
            opt = tta.make_optimizer(c, task, model, registry, 0)
            runs[label] = (model, opt, getattr(opt, "curvature_backward", None))
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(0)
        step_us: dict[str, list[float]] = {k: [] for k in runs}
        whole_us: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(rounds + 1):
            for label, (model, opt, cb) in runs.items():
                in_step = whole = 0
                for _ in range(100):
                    idx = torch.randint(0, len(X), (task.batch_size,), generator=gen)
                    t0 = time.perf_counter_ns()
                    opt.zero_grad()
                    logits = task.logits(model(X[idx]))
                    if cb is not None:
                        cb(logits, y[idx])
                    loss_fn(logits, y[idx]).backward()
                    t1 = time.perf_counter_ns()
                    opt.step()
                    t2 = time.perf_counter_ns()
                    in_step += t2 - t1
                    whole += t2 - t0
                if r:  # the first round warms up
                    step_us[label].append(in_step / 100 / 1e3)
                    whole_us[label].append(whole / 100 / 1e3)
        sgd_step, sgd_whole = statistics.median(step_us["sgd"]), statistics.median(whole_us["sgd"])
        for label in runs:
            s, w = statistics.median(step_us[label]), statistics.median(whole_us[label])
            rows.append(
                {
                    "task": name,
                    "contender": label,
                    "step_us": s,
                    "whole_us": w,
                    "step_x": s / sgd_step,
                    "whole_x": w / sgd_whole,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits-mlp,sequence,charlm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", metavar="PATH", help="run the curvkit of another checkout")
    args = parser.parse_args(argv)
    if args.tree:
        _use_tree(os.path.abspath(args.tree))
    import curvkit

    rows = measure(args.tasks.split(","), args.rounds)
    print(f"# curvkit from {os.path.dirname(os.path.dirname(curvkit.__file__))}; medians of {args.rounds} rounds")
    print(f"{'task':<11} {'contender':<13} {'step µs':>8} {'whole µs':>9} {'step/SGD':>9} {'whole/SGD':>10}")
    for r in rows:
        print(
            f"{r['task']:<11} {r['contender']:<13} {r['step_us']:>8.1f} {r['whole_us']:>9.1f} "
            f"{r['step_x']:>9.2f} {r['whole_x']:>10.2f}"
        )
    if hasattr(os, "getloadavg"):
        print(f"# load average {[round(x, 2) for x in os.getloadavg()]} (a shared machine inflates every figure)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
