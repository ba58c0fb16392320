#!/usr/bin/env python
r"""Time and peak memory of laplace-torch's ``KronLaplace.fit`` with curvkit's backend and its own.

This is a script, not a test. It runs in one process, on one CPU thread (``--threads``),
in float32, and prints one table per case: the median wall time of ``Laplace.fit`` for each
backend, its ratio to the fastest peer, the peak memory above the baseline during the
fit, and the relative difference of the log marginal likelihood to the curvlinops backend
(checked once, untimed, so that no wrong answer is benchmarked unnoticed).

Cases (``--quick`` shrinks them for a smoke run):

* ``mlp``: MLP 784-256-256-10 (ReLU), 2,048 data in batches of 256, classification;
* ``cnn``: Conv2d(3→16, k3, p1)-ReLU-Conv2d(16→32, k3, p1)-ReLU-AvgPool(4)-Flatten-Linear(512→10),
  input 3×16×16, 1,024 data in batches of 128, classification.

Backends (all ``hessian_structure="kron"``, ``subset_of_weights="all"``, exact GGN):

* ``curvkit``: :class:`curvkit.laplace.CurvkitGGN` (statistics backend ``hooks``);
* ``backpack``: laplace-torch's ``BackPackGGN`` (KFLR). Its Conv2d factors follow BackPACK's
  own convention, so its marginal likelihood differs on the CNN (a known peer deviation,
  not an error of the timing);
* ``asdl``: laplace-torch's ``AsdlGGN`` (asdfghjkl 0.1a4);
* ``curvlinops``: laplace-torch's ``CurvlinopsGGN`` (curvlinops 3.0.1), the default.

Timing: each backend runs once as warm-up and once untimed (the memory figure and the check); then ``--repeats``
rounds, each running every backend once in a rotated order; the table shows medians. Every
run gets a fresh copy of the model (BackPACK and ASDL leave marks on modules).

Peak memory: a sampling thread reads the process's resident set size every 0.5 ms; the
figure is the peak during the fit minus the size just before it (after ``malloc_trim`` has
returned freed memory to the OS). It includes every allocation of the fit — data loading,
autograd buffers, the factors and their eigendecomposition.

Usage::

    python benchmarks/laplace.py                     # full run
    python benchmarks/laplace.py --quick --repeats 1  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# This file is named like laplace-torch's import package; run as a script, its directory
# would come first on sys.path and shadow the real ``laplace``.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

SEED = 1234
CASES = ("mlp", "cnn")


@dataclass
class Case:
    name: str
    description: str
    model: nn.Module
    loader: DataLoader


def make_case(name: str, quick: bool) -> Case:
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    if name == "mlp":
        width, n, bs = (64, 256, 64) if quick else (256, 2048, 256)
        model = nn.Sequential(
            nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )
        X = torch.randn(n, 784, generator=g)
        desc = f"MLP 784-{width}-{width}-10 ReLU, {n} data, batch {bs}"
    elif name == "cnn":
        c1, c2, n, bs = (4, 8, 128, 32) if quick else (16, 32, 1024, 128)
        model = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(4),
            nn.Flatten(),
            nn.Linear(c2 * 16, 10),
        )
        X = torch.randn(n, 3, 16, 16, generator=g)
        desc = (
            f"Conv(3→{c1},k3,p1)-ReLU-Conv({c1}→{c2},k3,p1)-ReLU-AvgPool(4)-Linear({c2 * 16}→10), {n} data, batch {bs}"
        )
    else:
        raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    y = torch.randint(0, 10, (X.shape[0],), generator=g)
    return Case(name, desc, model, DataLoader(TensorDataset(X, y), batch_size=bs))


def backends() -> dict[str, type]:
    from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN

    from curvkit.laplace import CurvkitGGN

    return {"curvkit": CurvkitGGN, "backpack": BackPackGGN, "asdl": AsdlGGN, "curvlinops": CurvlinopsGGN}


def fit(case: Case, backend: type) -> object:
    from laplace import Laplace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(
            copy.deepcopy(case.model),
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            backend=backend,
        )
        la.fit(case.loader)
    return la


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak resident memory (bytes) above the baseline while ``fn`` runs."""
    _trim()
    base = _rss()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, _rss()) - base


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def run_case(case: Case, repeats: int) -> list[dict]:
    contenders = backends()
    lml: dict[str, float] = {}
    memory: dict[str, int] = {}
    for backend in contenders.values():
        fit(case, backend)  # warm-up (first-use imports and caches stay out of the figures)
    for name, backend in contenders.items():
        holder: dict[str, object] = {}

        def run(b: type = backend, store: dict[str, object] = holder) -> None:
            store["la"] = fit(case, b)

        memory[name] = peak_memory(run)
        with torch.no_grad():
            lml[name] = float(holder["la"].log_marginal_likelihood())  # type: ignore[attr-defined]
        del holder
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            fit(case, contenders[name])
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    fastest_peer = min(v for k, v in medians.items() if k != "curvkit")
    rows = []
    for name in names:
        rel = abs(lml[name] - lml["curvlinops"]) / abs(lml["curvlinops"])
        rows.append(
            {
                "backend": name,
                "time_s": medians[name],
                "ratio": medians[name] / fastest_peer,
                "peak_mb": memory[name] / 2**20,
                "lml": lml[name],
                "lml_rel_diff": rel,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import laplace

    print(
        f"torch {torch.__version__}, laplace-torch {getattr(laplace, '__version__', '0.3')}, python "
        f"{platform.python_version()}, {platform.machine()}, {args.threads} thread(s), float32, "
        f"{args.repeats} repeats (median)"
    )
    for name in args.cases:
        case = make_case(name, args.quick)
        print(f"\n{case.name}: {case.description}")
        print(
            f"{'backend':<12}{'time [s]':>10}{'/fastest peer':>15}{'peak [MB]':>11}{'log marglik':>16}{'rel. diff':>11}"
        )
        for row in run_case(case, args.repeats):
            print(
                f"{row['backend']:<12}{row['time_s']:>10.3f}{row['ratio']:>15.2f}{row['peak_mb']:>11.1f}"
                f"{row['lml']:>16.4f}{row['lml_rel_diff']:>11.1e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
