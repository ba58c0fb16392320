#!/usr/bin/env python
r"""A Laplace approximation from a trained optimizer vs a fresh fit: agreement and time.

This is a script, not a test. In one process, on one CPU thread (``--threads``), in
float64, on sklearn's digits (1,347 training images, the 64-128-10 ReLU MLP of
``curvkit.bench``), for K-FAC and EKFAC:

* **exact setting**: train ``--steps`` mini-batch steps (batch 64, ``fisher="type-2"``,
  ``ema_decay=0``, ``T_inv=1``), then one statistics step on the whole training set whose
  update is undone, so the optimizer holds the curvature of the final parameters over the
  data; print the relative difference of the log marginal likelihood and the largest
  relative difference of the GLM predictive (450 test images) between
  ``KroneckerLaplace.from_optimizer(opt, ..., data)`` and ``KroneckerLaplace.fit(data)``
  (``separate_bias=False``, EKFAC: ``correct_eigenvalues=True``);
* **ordinary training** (``ema_decay=0.95``, the method's ``T_inv``, no full-data step): the
  same differences, i.e. how far the optimizer's moving-average curvature is from a fresh
  fit at the final parameters;
* the median wall time of ``from_optimizer`` (its one forward pass over the data for the
  loss included) and of ``fit`` (``--repeats`` rounds, the two interleaved), and their ratio.

Usage::

    python benchmarks/laplace_from_optimizer.py
    python benchmarks/laplace_from_optimizer.py --repeats 3 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit.optim
from curvkit.demo import build_model, digits_split
from curvkit.laplace import KroneckerLaplace

DT = torch.float64


def train(method: str, X, y, steps: int, exact: bool):
    model = build_model(0).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    options = dict(fisher="type-2", ema_decay=0.0, T_inv=1) if exact else dict(fisher="type-2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.CurvatureOptimizer(model, method=method, loss_fn=loss_fn, lr=0.03, **options)

    def step(xb, yb):
        opt.zero_grad()
        out = model(xb)
        opt.curvature_backward(out, yb)
        loss_fn(out, yb).backward()
        opt.step()

    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    for i in range(steps):
        idx = perm[(i * 64) % len(y) :][:64]
        step(X[idx], y[idx])
    if exact:
        saved = [p.detach().clone() for p in model.parameters()]
        step(X, y)
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X, y, X_test, _ = digits_split()
    X, X_test = X.to(DT), X_test.to(DT)
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    print(f"digits MLP 64-128-10, N={len(y)}, float64, {args.threads} thread(s), {args.steps} training steps")
    print(
        f"{'method':7} {'setting':9} {'LML rel diff':>13} {'pred max rel':>13} {'from_opt s':>11} {'fit s':>8} "
        f"{'ratio':>6}"
    )
    for method in ("kfac", "ekfac"):
        for exact in (True, False):
            model, opt = train(method, X, y, args.steps, exact)

            def ours(opt=opt):
                return KroneckerLaplace.from_optimizer(opt, "classification", loader)

            def fresh(model=model, ekfac=method == "ekfac"):
                la = KroneckerLaplace(model, "classification", separate_bias=False, correct_eigenvalues=ekfac)
                la.fit(loader, progress=False)
                return la

            a, b = ours(), fresh()
            lml = float(
                (a.log_marginal_likelihood() - b.log_marginal_likelihood()).abs() / b.log_marginal_likelihood().abs()
            )
            pa, pb = a.predictive(X_test), b.predictive(X_test)
            pred = float(((pa - pb).abs() / pb).max())
            times: dict[str, list[float]] = {"ours": [], "fresh": []}
            for _ in range(args.repeats):
                for name, fn in (("ours", ours), ("fresh", fresh)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            t_ours, t_fresh = statistics.median(times["ours"]), statistics.median(times["fresh"])
            setting = "exact" if exact else "ordinary"
            print(
                f"{method:7} {setting:9} {lml:13.2e} {pred:13.2e} {t_ours:11.4f} {t_fresh:8.4f} "
                f"{t_fresh / t_ours:5.1f}x"
            )


if __name__ == "__main__":
    main()
