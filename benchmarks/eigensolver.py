#!/usr/bin/env python
r"""Cost and accuracy of a refresh's eigendecomposition: the exact ``torch.linalg.eigh`` against
the warm start of ``eigensolver="warm"`` (:class:`curvkit.linalg.basis.WarmEigensolver`:
orthogonal iteration from the previous eigenbasis, checked, falling back to ``eigh``).

This is a script, not a test: it prints tables and ratios and asserts nothing. One process,
one CPU thread, float32 factors.

The factors: an EMA ``F ← 0.95 F + 0.05 XᵀX/n`` (``n = 2d`` rows per step) of data whose
covariance has a heavy-tailed spectrum (``d`` scales from 1 down to 1e-3) and whose
eigenvectors rotate by a random angle of size ``--drift`` per step (``exp`` of a random
skew matrix); a refresh every ``--period`` steps. Each refresh pair ``(F_old, F_new)`` is
decomposed by both solvers from the same exact basis of ``F_old``:

* ``eigh``: :func:`curvkit.linalg.symmetric_eigh` of ``F_new`` (float32; what the exact
  solver runs);
* ``warm``: :meth:`WarmEigensolver.decompose` of ``F_new`` from ``F_old``'s basis at
  ``--tolerance`` and ``--iterations``; the path it took is shown (``kept``: the old basis
  passed the check, one product ``FQ``; ``iter``: one or more QR steps passed; ``eigh``:
  the check failed and the exact decomposition ran after the attempt).

Columns: ``ε_old`` the reconstruction error ``‖F − Q diag(QᵀFQ) Qᵀ‖_F / ‖F‖_F`` of the old
basis on the new factor (how far the factor moved); the milliseconds of each solver (median
of ``--repeats`` interleaved repeats, order alternating) and their ratio; ``ε`` the
reconstruction error of the warm result (in float64 against the factor); ``dir`` the
relative error of the damped inverse ``(F + 0.01 λ_max I)^{-1}`` applied to 4 random
vectors, warm against float64 ``eigh``. Then the cost of each path over ``eigh`` at every
size: what a warm start saves when the check passes at once, after one QR step, and what it
costs when it falls back.

Usage::

    python benchmarks/eigensolver.py                           # sizes 64 128 256 512 785
    python benchmarks/eigensolver.py --sizes 256 512 --drift 0.003 0.01 --repeats 7
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import Tensor

from curvkit.linalg import symmetric_eigh
from curvkit.linalg.basis import WarmEigensolver, _orthogonal_iteration


def drifting_pair(d: int, drift: float, period: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(F_old, F_new)``: the EMA factor at two refreshes ``period`` steps apart (after a
    burn-in of ``3 * period`` steps), in float32."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    f: Tensor | None = None
    out = []
    for step in range(4 * period + 1):
        skew = torch.randn(d, d, generator=gen, dtype=torch.float64) * drift / math.sqrt(d)
        basis = basis @ torch.linalg.matrix_exp(skew - skew.T)
        x = torch.randn(2 * d, d, generator=gen, dtype=torch.float64) * scales @ basis.T
        batch = x.T @ x / x.shape[0]
        f = batch if f is None else 0.95 * f + 0.05 * batch
        if step in (3 * period, 4 * period):
            out.append(f.to(torch.float32))
    return out[0], out[1]


def reconstruction_error(f: Tensor, evals: Tensor, evecs: Tensor) -> float:
    f, q = f.double(), evecs.double()
    return float(torch.linalg.matrix_norm(f - (q * evals.double()) @ q.T) / torch.linalg.matrix_norm(f))


def direction_error(f: Tensor, evals: Tensor, evecs: Tensor) -> float:
    true_evals, true_evecs = torch.linalg.eigh(f.double())
    shift = 0.01 * float(true_evals[-1])
    g = torch.randn(f.shape[0], 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def solve(lam: Tensor, q: Tensor) -> Tensor:
        q = q.double()
        return q @ ((q.T @ g) / (lam.double().clamp_min(0) + shift).unsqueeze(1))

    exact = solve(true_evals, true_evecs)
    return float(torch.linalg.matrix_norm(solve(evals, evecs) - exact) / torch.linalg.matrix_norm(exact))


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 785])
    parser.add_argument("--drift", type=float, nargs="+", default=[0.003, 0.01], help="rotation per step")
    parser.add_argument("--period", type=int, default=10, help="steps between the two refreshes (T_inv)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="warm_tolerance")
    parser.add_argument("--iterations", type=int, default=1, help="warm_iterations")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# eigensolver refresh: torch {torch.__version__}, 1 thread, float32, EMA 0.95, period {args.period}, "
        f"tolerance {args.tolerance}, iterations {args.iterations}, {args.repeats} repeats; load average {load:.1f}"
    )
    print(
        f"{'d':>4} {'drift':>6} {'ε_old':>7} {'eigh ms':>8} {'warm ms':>8} {'warm/eigh':>9} {'path':>5} "
        f"{'ε':>7} {'dir':>7}"
    )
    paths: dict[int, dict[str, float]] = {}
    for d in args.sizes:
        for drift in args.drift:
            f_old, f_new = drifting_pair(d, drift, args.period)
            q_old = torch.linalg.eigh(f_old.double())[1].float()
            eps_old = reconstruction_error(f_new, (q_old * (f_new @ q_old)).sum(0), q_old)
            solver = WarmEigensolver(args.tolerance, args.iterations)
            t_eigh: list[float] = []
            t_warm: list[float] = []
            for r in range(args.repeats + 1):  # the first round warms up
                pair = [
                    (t_eigh, lambda f=f_new: symmetric_eigh(f)),
                    (t_warm, lambda s=solver, f=f_new, q=q_old: s.decompose(f, q)),
                ]
                for store, fn in pair if r % 2 else pair[::-1]:
                    sec = _once(fn)
                    if r:
                        store.append(sec)
            warm = solver.decompose(f_new, q_old)
            assert warm is not None
            kept, warm_n = solver.kept, solver.warm
            path = "eigh" if warm_n == 0 else ("kept" if kept == warm_n else "iter")
            ms_e, ms_w = 1e3 * statistics.median(t_eigh), 1e3 * statistics.median(t_warm)
            print(
                f"{d:>4} {drift:>6.3f} {eps_old:>7.3f} {ms_e:>8.2f} {ms_w:>8.2f} {ms_w / ms_e:>9.2f} {path:>5} "
                f"{reconstruction_error(f_new, *warm):>7.4f} {direction_error(f_new, *warm):>7.4f}"
            )
        # the cost of each path, on the last pair: check only, one QR step, a failed attempt + eigh
        one = torch.linalg.eigh(f_old.double())[1].float()

        fns = {
            "eigh": lambda f=f_new: symmetric_eigh(f),
            "kept": lambda f=f_new, q=one: _orthogonal_iteration(f, q, 1.0, 0),
            "iter": lambda f=f_new, q=one: _orthogonal_iteration(f, q, 1e-9, 1),
            "fallback": lambda f=f_new, q=one: WarmEigensolver(1e-9, 1).decompose(f, q),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.repeats + 1):
            order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
            for k in order:
                sec = _once(fns[k])
                if r:
                    times[k].append(sec)
        paths[d] = {k: statistics.median(v) for k, v in times.items()}
    print("\n# cost of each warm path over eigh (median of interleaved repeats)")
    print(f"{'d':>4} {'eigh ms':>8} {'kept':>6} {'1 QR':>6} {'fallback':>8}")
    for d, t in paths.items():
        print(
            f"{d:>4} {1e3 * t['eigh']:>8.2f} {t['kept'] / t['eigh']:>6.2f} {t['iter'] / t['eigh']:>6.2f} "
            f"{t['fallback'] / t['eigh']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
