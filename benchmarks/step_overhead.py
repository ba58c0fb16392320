#!/usr/bin/env python
r"""Per-layer Python overhead of a plain curvature step, against ``torch.optim.SGD(foreach=True)``.

A *plain* step collects no statistics and refreshes no inverse: only the capture check,
the preconditioning products and the update run. On a deep, narrow MLP (64 layers of
width 32, batch 8) the products are tiny, so the time per step is dominated by the
library's Python work per layer — what this script measures:

* ``µs/step`` of ``optimizer.step()`` alone (the forward and backward are the same for
  every contender and are not timed), median over ``--rounds`` rounds of ``--steps``
  steps, contenders interleaved within each round;
* ``µs/layer over SGD``: (step − SGD's step) / number of layers;
* ``calls/step``: Python function calls into curvkit (``curvkit/`` and ``plugins/``) during
  one plain step, counted with ``cProfile``.

Also printed: the calls into curvkit of one plain K-FAC step on a 2-layer MLP (the issue's
first count). Usage (``benchmarks/step.py --overhead`` runs this script)::

    python benchmarks/step.py --overhead                # ~1 min
    python benchmarks/step.py --overhead --methods kfac,singd,ekfac --rounds 15
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time
from typing import Any

import torch
from torch import nn

import curvkit.optim

LAYERS, WIDTH, BATCH = 64, 32, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    layers.append(nn.Linear(WIDTH, 10))
    return nn.Sequential(*layers)


def _make(name: str, model: nn.Module) -> Any:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    period = {"singd": "T", "ikfac": "T", "ingd": "T"}.get(name, "T_stats")
    options: dict[str, Any] = {period: 10**9}  # statistics on step 0 only
    if "T_inv" in {f for f in curvkit.optim.create(name, _model()).config.__dataclass_fields__}:
        options["T_inv"] = 10**9
    return curvkit.optim.create(name, model, lr=1e-4, momentum=0.9, **options)


def _backward(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    nn.functional.cross_entropy(model(X), y).backward()


def _curvkit_calls(opt: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> int:
    _backward(model, X, y)
    prof = cProfile.Profile()
    prof.enable()
    opt.step()
    prof.disable()
    roots = (os.sep + "curvkit" + os.sep, os.sep + "plugins" + os.sep, os.sep + "curvkit_")
    stats = pstats.Stats(prof)
    return sum(
        int(ncalls)
        for (filename, _, _), (_, ncalls, *_rest) in stats.stats.items()  # type: ignore[attr-defined]
        if any(r in filename for r in roots)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="kfac,ekfac,singd,rs-kfac", help="comma-separated curvkit methods")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(BATCH, WIDTH, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    names = ["sgd", *[m for m in args.methods.split(",") if m]]
    models = {n: _model() for n in names}
    opts = {n: _make(n, models[n]) for n in names}
    for n in names:  # step 0: statistics and the first refresh, untimed
        _backward(models[n], X, y)
        opts[n].step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            total = 0.0
            for _ in range(args.steps):
                _backward(models[n], X, y)
                t0 = time.perf_counter()
                opts[n].step()
                total += time.perf_counter() - t0
            times[n].append(total / args.steps * 1e6)
    sgd = statistics.median(times["sgd"])
    rows = []
    print(f"# {LAYERS}-layer width-{WIDTH} MLP, batch {BATCH}, plain steps (no statistics, no refresh), 1 thread")
    print(f"{'contender':12s} {'µs/step':>9s} {'µs/layer over SGD':>18s} {'calls/step':>11s}")
    for n in names:
        med = statistics.median(times[n])
        calls = 0 if n == "sgd" else _curvkit_calls(opts[n], models[n], X, y)
        over = (med - sgd) / LAYERS
        rows.append({"contender": n, "us_per_step": med, "us_per_layer_over_sgd": over, "curvkit_calls": calls})
        print(f"{n:12s} {med:9.0f} {over:18.1f} {calls:11d}")
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 10))
    small_opt = _make("kfac", small)
    _backward(small, X, y)
    small_opt.step()
    small_calls = _curvkit_calls(small_opt, small, X, y)
    print(f"kfac on a 2-layer MLP: {small_calls} calls into curvkit per plain step")
    print(f"# load average {[round(v, 2) for v in os.getloadavg()]} (a shared machine inflates every figure)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "two_layer_calls": small_calls, "torch": torch.__version__}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
