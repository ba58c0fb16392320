"""What the guard on every write costs in a K-FAC step (target: < 2 %).

The guard (see ``docs/robustness.md``, :mod:`curvkit.optim.guards`) is a reduction per
tensor: ``‖∇_l‖²`` and ``⟨Δ_l, ∇_l⟩`` per layer (the checks of gradient and direction), the
norms of every increment and parameter (the check of the update), the traces of the batch
factors (the check and outlier gate of the statistics), plus the step-time checks of the
hyperparameters, the outlier gates and the divergence monitor. This script times
``KFAC.step()`` — statistics, refresh every ``T_inv``, preconditioning, update — with the
guard as shipped (``guard``) and with the checks a step made before it (``before``: the
non-finite test of each gradient and batch factor; patched in, in this process only), in
alternating rounds so that a load change on the machine hits both alike. The trust region
(KL clip, ‖Δ_l‖ ≤ 100‖∇_l‖) is off in both and timed on its own as a third variant.
Reported: the median of the per-round medians of ms per step and the paired overhead.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guard.py
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import curvkit.blocks as blocks_module
import curvkit.optim.guards as guards_module
import curvkit.optim.monitor as monitor_module
import curvkit.optim.optimizer as optimizer_module
import curvkit.optim.preconditioner as preconditioner_module
import curvkit.optim.update as update_module
from curvkit.numerics import all_finite
from curvkit.optim import KFAC


@contextlib.contextmanager
def checks_before() -> Iterator[None]:
    """The checks a step made before the guard (patched in): the non-finite test of each
    gradient and of each batch factor (``all_finite``: a sum, an elementwise test only if the
    sum is not finite); no direction, update, hyperparameter or outlier checks, no monitor."""
    O, B, G, M = (
        optimizer_module.CurvatureOptimizer,
        blocks_module.CurvatureBlock,
        guards_module.OutlierGates,
        monitor_module.DivergenceMonitor,
    )
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    def old_factor_check(self: Any, stats: Any) -> tuple[float, ...]:
        factors = self._batch_factors_once(stats)
        ok = all_finite(factors[0]) and all_finite(factors[1])
        return (1.0,) if ok else (math.nan,)

    patch(
        preconditioner_module,
        "gradient_squares",
        lambda step: {n: 0.0 if all_finite(m) else math.nan for n, m in step.mats.items()},
    )
    patch(preconditioner_module, "direction_reductions", lambda step, out, want: ({n: 0.0 for n in out}, {}))
    patch(G, "gradient_outlier", lambda self, total: (False, False))
    patch(G, "track_gradient", lambda self, total: None)
    patch(G, "statistics_outliers", lambda self, magnitudes: ([], False))
    patch(G, "track_statistics", lambda self, name, magnitudes: None)
    patch(B, "batch_magnitudes", old_factor_check)
    patch(update_module, "update_bound", lambda group, ps, ds, states: True)
    patch(update_module, "updates_fit", lambda plans: True)
    patch(O, "_check_step_hyperparameters", lambda self: None)
    patch(M, "applied", lambda self, grad_norms_sq, params: None)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _case(widths: list[int], batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(1)
    X = torch.randn(batch * 8, widths[0], generator=g)
    y = torch.randint(0, widths[-1], (batch * 8,), generator=g)
    return model, X, y


def _time(variant: str, widths: list[int], batch: int, steps: int) -> float:
    model, X, y = _case(widths, batch)
    trust = variant == "guard + trust region"
    opt = KFAC(model, **({} if trust else {"kl_clip": None, "grad_ratio_clip": None}))
    times = []
    ctx = checks_before() if variant == "before" else contextlib.nullcontext()
    with ctx:
        for i in range(steps + 5):
            j = (i % 8) * batch
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[j : j + batch]), y[j : j + batch]).backward()
            t0 = time.perf_counter()
            opt.step()
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {
        "digits MLP 64-128-10, batch 64": ([64, 128, 10], 64),
        "MLP 256-256-256-10, batch 128": ([256, 256, 256, 10], 128),
        "MLP 512-512-512-10, batch 128": ([512, 512, 512, 10], 128),
    }
    variants = ["before", "guard", "guard + trust region"]
    print("| model | " + " | ".join(f"{v} (ms/step)" for v in variants) + " | guard overhead | + trust region |")
    print("|---|" + "---|" * (len(variants) + 2))
    for label, (widths, batch) in cases.items():
        per: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                per[v].append(_time(v, widths, batch, args.steps))
        base = per["before"]
        guard = [100 * (g / b - 1) for g, b in zip(per["guard"], base)]
        trust = [100 * (t / b - 1) for t, b in zip(per["guard + trust region"], base)]
        cells = [f"{statistics.median(per[v]):.3f}" for v in variants]
        print(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {statistics.median(guard):+.1f} % | {statistics.median(trust):+.1f} % |",
            flush=True,
        )
    print(f"\n(median over {args.rounds} rounds of the median of {args.steps} steps; overheads paired per round)")


if __name__ == "__main__":
    main()
