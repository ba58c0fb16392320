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

``--steps`` adds the milliseconds per optimizer step on the MLP 784-512-512-10 (ReLU, batch
256, float32) of ``benchmarks/step.py``, whose factors are 785², 513², 512² and 10²: K-FAC
with the Cholesky inverter (its default), with ``inverter="eigh"`` exact and warm, and EKFAC
exact and warm, all with refreshes every 10 steps (``T_inv=10``), lr 0.01, momentum 0.9,
damping 1e-3 (K-FAC: π-split; EKFAC: exact). Each step takes the next of 16 fixed batches of
inputs with a heavy-tailed covariance and a random teacher's labels, so the factors move
between refreshes with the EMA's sampling noise, as in training. Every contender runs blocks
of 10 steps (one refresh each) in a rotated order, ``--rounds`` times after one untimed
block; the median over rounds of the per-step mean is shown, with the warm and exact
decompositions counted over the timed blocks.

Usage::

    python benchmarks/eigensolver.py                           # sizes 64 128 256 512 785
    python benchmarks/eigensolver.py --sizes 256 512 --drift 0.003 0.01 --repeats 7
    python benchmarks/eigensolver.py --sizes --steps --rounds 5  # only the step timing
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any

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


#: ``--steps`` contenders: (label, method, options).
STEP_CONTENDERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("kfac (cholesky)", "kfac", {}),
    ("kfac eigh exact", "kfac", {"inverter": "eigh"}),
    ("kfac eigh warm", "kfac", {"inverter": "eigh", "eigensolver": "warm"}),
    ("kfac eigh warm, 0 iterations", "kfac", {"inverter": "eigh", "eigensolver": "warm", "warm_iterations": 0}),
    ("kfac eigh warm, tolerance 0.2", "kfac", {"inverter": "eigh", "eigensolver": "warm", "warm_tolerance": 0.2}),
    ("ekfac exact", "ekfac", {}),
    ("ekfac warm", "ekfac", {"eigensolver": "warm"}),
    ("ekfac warm, 0 iterations", "ekfac", {"eigensolver": "warm", "warm_iterations": 0}),
    ("ekfac warm, tolerance 0.2", "ekfac", {"eigensolver": "warm", "warm_tolerance": 0.2}),
)


def step_benchmark(rounds: int) -> None:
    import curvkit.optim

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(784, 784, generator=gen) * torch.logspace(0, -2, 784).unsqueeze(1)
    teacher = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    batches = []
    for _ in range(16):
        x = torch.randn(256, 784, generator=gen) @ mix
        with torch.no_grad():
            batches.append((x, teacher(x).argmax(1)))
    loss_fn = torch.nn.CrossEntropyLoss()

    class Contender:
        def __init__(self, method: str, options: dict[str, Any]) -> None:
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(
                torch.nn.Linear(784, 512),
                torch.nn.ReLU(),
                torch.nn.Linear(512, 512),
                torch.nn.ReLU(),
                torch.nn.Linear(512, 10),
            )
            damping = 1e-3 if method == "ekfac" else options.pop("damping", 1e-3)
            self.opt = curvkit.optim.create(
                method, self.model, lr=0.01, momentum=0.9, damping=damping, T_inv=10, **options
            )
            self.i = 0

        def block(self) -> float:
            start = time.perf_counter()
            for _ in range(10):
                x, y = batches[self.i % len(batches)]
                self.i += 1
                self.opt.zero_grad()
                loss_fn(self.model(x), y).backward()
                self.opt.step()
            return (time.perf_counter() - start) / 10

        def counts(self) -> tuple[int, int, int]:
            solvers = [getattr(b, "eigensolver", None) for b in self.opt.preconditioner.blocks.values()]
            solvers = [s for s in solvers if s is not None]
            return sum(s.warm for s in solvers), sum(s.kept for s in solvers), sum(s.exact for s in solvers)

    runners = [(label, Contender(method, dict(options))) for label, method, options in STEP_CONTENDERS]
    for _, r in runners:
        r.block()
    start_counts = {label: r.counts() for label, r in runners}
    times: dict[str, list[float]] = {label: [] for label, _ in runners}
    for rnd in range(rounds):
        k = rnd % len(runners)
        for label, r in runners[k:] + runners[:k]:
            times[label].append(r.block())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n# ms/step, MLP 784-512-512-10, batch 256, T_inv 10, {rounds} rounds (median of block means); "
        f"load average {load:.1f}"
    )
    ref = statistics.median(times["kfac eigh exact"])
    ref_e = statistics.median(times["ekfac exact"])
    print(f"{'contender':<30} {'ms/step':>8} {'x exact':>8}  warm (kept) / exact decompositions in the timed blocks")
    for label, r in runners:
        ms = statistics.median(times[label])
        base = ref_e if label.startswith("ekfac") else ref
        w0, k0, e0 = start_counts[label]
        w, k, e = r.counts()
        counts = f"{w - w0} ({k - k0}) / {e - e0}" if "warm" in label else ""
        print(f"{label:<30} {1e3 * ms:>8.2f} {ms / base:>8.2f}  {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512, 785])
    parser.add_argument("--drift", type=float, nargs="+", default=[0.003, 0.01], help="rotation per step")
    parser.add_argument("--period", type=int, default=10, help="steps between the two refreshes (T_inv)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="warm_tolerance")
    parser.add_argument("--iterations", type=int, default=1, help="warm_iterations")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", action="store_true", help="also ms/step of K-FAC and EKFAC on the MLP")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of --steps")
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
    if args.steps:
        step_benchmark(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
