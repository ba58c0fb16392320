#!/usr/bin/env python
"""bf16 SINGD against float32, seed by seed: the figures of docs/methods/singd.md ("bf16").

Trains the models of ``tests/methods/test_singd_bf16.py`` (its ``_train``: 500 steps,
parameters, gradients and factors in the given dtype) for each seed and prints the test
accuracy gaps in points:

* ``--compare kahan`` (default): bf16 − fp32 with the compensated parameter update on
  (``kahan_sum=True``, the default) and off;
* ``--compare fp64``: float64 − float32, the scatter of the comparison itself.

``--schedule decay`` (default) decays the learning rate linearly to 0 as the tests do;
``constant`` keeps it.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/singd_bf16.py --task sequence --structure dense --seeds 16
    OMP_NUM_THREADS=1 python benchmarks/singd_bf16.py --task digits --compare fp64
    OMP_NUM_THREADS=1 python benchmarks/singd_bf16.py --task digits --schedule constant --seeds 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "methods"))
import test_singd_bf16 as bf16  # noqa: E402  (the tests' training loop, not a copy of it)


def _summary(name: str, gaps: list[float]) -> str:
    shown = " ".join(f"{g:+.2f}" for g in gaps)
    return f"{name}: {shown} | mean {statistics.mean(gaps):+.2f}, worst {min(gaps):+.2f}, best {max(gaps):+.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["digits", "sequence"], default="digits")
    ap.add_argument("--structure", default="dense")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--compare", choices=["kahan", "fp64"], default="kahan")
    ap.add_argument("--schedule", choices=["decay", "constant"], default="decay")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR
        bf16.torch.optim.lr_scheduler.LambdaLR = lambda opt, _: scheduler(opt, lambda _t: 1.0)  # type: ignore[assignment]
    singd = bf16.SINGD
    rows: dict[str, list[float]] = {}
    print(f"{args.task}, {args.structure}, {args.schedule} learning rate, seeds 0–{args.seeds - 1} (points)")
    for seed in range(args.seeds):
        base, _, _ = bf16._train(args.task, torch.float32, args.structure, seed)
        if args.compare == "fp64":
            other, _, _ = bf16._train(args.task, torch.float64, args.structure, seed)
            rows.setdefault("float64 − float32", []).append(100 * (other - base))
        else:
            for on in (True, False):
                bf16.SINGD = lambda *a, _on=on, **k: singd(*a, kahan_sum=_on, **k)  # type: ignore[misc]
                try:
                    acc, _, _ = bf16._train(args.task, torch.bfloat16, args.structure, seed)
                finally:
                    bf16.SINGD = singd
                rows.setdefault(f"bf16 − fp32, kahan_sum={on}", []).append(100 * (acc - base))
        print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1]:+.2f}" for k, v in rows.items()), flush=True)
    for name, gaps in rows.items():
        print(_summary(name, gaps))


if __name__ == "__main__":
    main()
