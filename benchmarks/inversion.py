#!/usr/bin/env python
r"""Time of one inverse refresh of a ``d×d`` Kronecker factor vs. its width ``d``, for the
inverters of K-FAC (dense ``eigh``, Cholesky), RS-KFAC (randomized SVD), SRE-KFAC
(randomized eigendecomposition), B-KFAC (Brand's online update) and SKFAC (Woodbury), with
the fitted growth exponent of each; plus (``--steps``) milliseconds per optimizer step of
each lowrank method (RS-KFAC, SRE-KFAC, SKFAC, B-KFAC, B-R-KFAC, B-KFAC-c) beside K-FAC on the
wide MLP 2048-2048-2048-10, batch 256.

This is a script, not a test: it prints tables and side-by-side ratios, and asserts nothing.

The factor is an EMA-like ``A = Σ_k ρ^k X_kᵀX_k / n + 1e-3 I`` of 8 random batches of ``n =
256`` rows whose features have a decaying spectrum (``d`` columns scaled by ``i^{-1}``), in
float32. What one refresh costs:

* ``eigh``: ``torch.linalg.eigh(A)`` (``O(d³)``);
* ``cholesky``: ``cholesky_inverse(cholesky(A + λI))`` (``O(d³)``, smaller constant);
* ``rsvd`` / ``sre``: :func:`curvkit_lowrank.randomized_svd` / ``randomized_eigh`` at rank
  220, oversampling 10, 3 power iterations (Puiu's defaults; ``O(q d² ℓ)``);
* ``brand``: one :func:`curvkit_lowrank.brand_update` of a rank-220 representation with a
  batch of ``n = 256`` columns (``O(d (r + n)²)``; the ``d×d`` factor is never formed);
* ``woodbury``: SKFAC's ``n×n`` Cholesky of ``R Rᵀ + sI`` for the ``n = 256`` batch rows
  (``O(n² d)``).

The growth exponent is the least-squares slope of ``log t`` on ``log d``. Expected from the
operation counts: about 3 for eigh and Cholesky, about 2 for RS/SRE (matrix products with a
``d×ℓ`` sketch), about 1 for Brand and Woodbury. Small widths are latency-bound, so measured
slopes fall below these until ``d`` is large.

Usage::

    python benchmarks/inversion.py                    # widths 512 1024 2048 4096
    python benchmarks/inversion.py --widths 512 1024 2048 --repeats 3
    python benchmarks/inversion.py --steps            # also ms/step on the wide MLP
    python benchmarks/inversion.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from curvkit_lowrank import LowRankFactor, WoodburyFactor, brand_update, randomized_eigh, randomized_svd
from torch import nn

import curvkit.optim

RANK, OVERSAMPLING, NITER, BATCH = 220, 10, 3, 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _factor(d: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.arange(1, d + 1, dtype=torch.float32) ** -1.0
    A = torch.zeros(d, d)
    rows = torch.empty(0)
    for k in range(8):
        rows = torch.randn(BATCH, d, generator=gen) * scale
        A += 0.95**k * 0.05 * rows.t() @ rows / BATCH
    A += 1e-3 * torch.eye(d)
    return A.to(device), (rows / math.sqrt(BATCH)).to(device)


def _refreshes(A: torch.Tensor, R: torch.Tensor) -> dict[str, Callable[[], object]]:
    """One refresh of each inverter for the factor ``A`` and the batch rows ``R``."""
    sketch_gen = torch.Generator().manual_seed(1)
    eye = torch.eye(A.shape[0], device=A.device)
    start = randomized_eigh(A, RANK, oversampling=OVERSAMPLING, niter=NITER, generator=sketch_gen)
    low = LowRankFactor(start.U, start.d)
    batch = R.t()  # d × n
    return {
        "eigh": lambda: torch.linalg.eigh(A),
        "cholesky": lambda: torch.cholesky_inverse(torch.linalg.cholesky(A + 1e-3 * eye)),
        "rsvd": lambda: randomized_svd(A, RANK, oversampling=OVERSAMPLING, niter=NITER, generator=sketch_gen),
        "sre": lambda: randomized_eigh(A, RANK, oversampling=OVERSAMPLING, niter=NITER, generator=sketch_gen),
        "brand": lambda: brand_update(low, batch, 0.95, rank=RANK),
        "woodbury": lambda: WoodburyFactor.build(R, 0.03),
    }


def refresh_times(widths: list[int], device: torch.device, repeats: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {}
    for d in widths:
        A, R = _factor(d, device, gen)
        for name, fn in _refreshes(A, R).items():
            out.setdefault(name, []).append(_timed(fn, device, repeats))
        print(f"  d={d}: done", flush=True)
    return out


def exponent(widths: list[int], times: list[float]) -> float:
    xs, ys = [math.log(w) for w in widths], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def step_times(device: torch.device, rounds: int, T_inv: int) -> dict[str, float]:
    """ms per step (amortised over blocks of ``T_inv`` steps) on MLP 2048-2048-2048-10."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(BATCH, 2048, generator=gen).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(device)
    common: dict[str, Any] = {"T_stats": 1, "T_inv": T_inv, "ema_decay": 0.95}
    contenders: dict[str, tuple[str, dict[str, Any]]] = {
        "kfac (cholesky, π)": ("kfac", {**common, "damping": 1e-3}),
        "kfac (eigh, relative)": (
            "kfac",
            {**common, "inverter": "eigh", "damping": curvkit.linalg.RelativeDamping(value=0.1, on="factors")},
        ),
        "rs-kfac": ("rs-kfac", {**common, "damping": 0.1}),
        "sre-kfac": ("sre-kfac", {**common, "damping": 0.1}),
        "skfac": ("skfac", {"T_inv": T_inv, "damping": 0.03}),
        # Brand updates every step (T_stats = 1) on the 2048-wide factors (220 + 256 < 2049);
        # B-R / B-c also keep the exact EMA factor (d² per step) for their RSVD / correction
        "b-kfac": ("b-kfac", {**common, "damping": 0.1}),
        "b-r-kfac": ("b-r-kfac", {**common, "damping": 0.1, "B_R_period": 5}),
        "b-kfac-c": ("b-kfac-c", {**common, "damping": 0.1, "B_R_period": 5, "correction_period": 5}),
    }
    loss_fn = nn.CrossEntropyLoss()
    out: dict[str, float] = {}
    for label, (method, options) in contenders.items():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
        ).to(device)
        opt = curvkit.optim.CurvatureOptimizer(model, method=method, lr=1e-4, momentum=0.9, **options)

        def block(n: int, model: nn.Module = model, opt: curvkit.optim.CurvatureOptimizer = opt) -> None:
            for _ in range(n):
                opt.zero_grad()
                loss_fn(model(X), y).backward()
                opt.step()

        block(1)
        per = [_timed(lambda: block(T_inv), device, 1) / T_inv for _ in range(rounds)]
        out[label] = 1e3 * statistics.median(per)
        print(f"  {label}: {out[label]:.1f} ms/step", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", action="store_true", help="also time optimizer steps on the wide MLP")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--T-inv", dest="T_inv", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(True)
    print(f"one inverse refresh of a d×d float32 factor on {device} (median of {args.repeats})", flush=True)
    times = refresh_times(args.widths, device, args.repeats)
    header = "inverter   " + "".join(f"{f'd={w}':>12}" for w in args.widths) + f"{'exponent':>10}{'vs eigh':>10}"
    print(header)
    for name, ts in times.items():
        ratio = times["eigh"][-1] / ts[-1]
        cells = "".join(f"{1e3 * t:>10.2f}ms" for t in ts)
        print(f"{name:<11}{cells}{exponent(args.widths, ts):>10.2f}{ratio:>9.1f}×")
    print(f"('vs eigh': eigh's time over the row's time at d={args.widths[-1]})")
    if args.steps:
        print(f"\nms per step, MLP 2048-2048-2048-10, batch {BATCH}, T_inv={args.T_inv} (amortised)", flush=True)
        steps = step_times(device, args.rounds, args.T_inv)
        base = steps["kfac (cholesky, π)"]
        for label, ms in steps.items():
            print(f"{label:<24}{ms:>10.1f} ms{base / ms:>8.2f}× vs kfac (cholesky)")


if __name__ == "__main__":
    main()
