#!/usr/bin/env python
r"""SINGD: milliseconds per step and optimizer-state bytes for every structure, curvkit's
``curvkit.optim.SINGD`` beside the ``singd`` package's ``singd.optim.optimizer.SINGD``
(0.0.5) with equal settings, and beside ``torch.optim.SGD`` and ``torch.optim.AdamW`` —
in one run, one process, one CPU thread, float32.

This is a script, not a test: it prints side-by-side figures and whether the targets of
issue 5 are met; it asserts nothing.

Settings (equal for both SINGD implementations): ``lr = 1e-4`` (tiny, so nothing diverges
while timing; the time of a step does not depend on it), ``momentum = 0.9``, no weight
decay, ``damping λ = 1e-3``, ``alpha1 = 0.5``, ``lr_cov = 1e-2``, ``loss_average =
"batch"``, ``kfac_approx = "expand"``, the same structure for ``K`` and ``C``, ``T = 1``
(every step updates ``K`` and ``C``) and ``T = 10``. SGD: ``momentum = 0.9``; AdamW: torch
defaults (``foreach`` implementation).

Cases:

* ``mlp``: MLP 784-512-512-10 (ReLU), batch 256, cross-entropy;
* ``seq``: Linear layers on sequences (a transformer-style MLP block): Linear(128→512),
  GELU, Linear(512→128), mean over the sequence, Linear(128→10); input (32, 64, 128).

Structures: the package's six (``dense``, ``diagonal``, ``block30diagonal``,
``hierarchical15_15``, ``triltoeplitz``, ``triutoeplitz``), its four rank-1 triangular
classes (registered into a subclass of its optimizer, as the package's own tests do), and
curvkit's dense ``tril``/``triu`` (no package counterpart). ``--structures dense-bf16``:
curvkit's ``dense`` with ``precondition_dtype=torch.bfloat16``, against the package's
float32 ``dense``; ``dense-bf16-all``: also ``stats_dtype=torch.bfloat16`` (the update's
Gram products over the batch's rows in bf16 too).

Clock (``--clock``): ``cpu`` (default) is this thread's CPU time (``time.thread_time``):
with one torch thread, forward, backward and step all run on it, and time spent waiting
for a core that other processes hold is not counted, so figures taken on a shared machine
stay comparable; ``wall`` is ``time.perf_counter``.

Timing: each contender runs ``T`` (at least 2) untimed warm-up steps; then ``--rounds``
rounds in which every contender runs one block of steps (``T = 1``: 3 steps; ``T = 10``: 10
steps, so a block holds exactly one ``K``/``C`` update and its mean is the amortised cost),
in a rotated order so that background load hits all alike. Reported: ms/step, the median
over rounds of the per-step mean; *overhead*, the median over rounds of (ms/step − SGD's
ms/step in the same round), paired so that a change of load between rounds cancels;
``ours/pkg`` = our overhead / the package's overhead. Overheads of 1–2 ms on a 10–20 ms
step need many rounds (``--rounds 31``) on a shared machine.

State bytes: every tensor reachable from ``optimizer.state_dict()`` (the package's
``Ks``, ``Cs``, ``m_Ks``, ``m_Cs``, ``H_Ks``, ``H_Cs`` structured matrices included;
curvkit's curvature state included), each storage counted once.

Targets (issue 5): ours ≤ 0.7 × the package's overhead for every structure and never slower
than it; the Toeplitz structures ≤ 2 × AdamW's step; diagonal SINGD's state ≤ AdamW's.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/singd.py                 # full run
    OMP_NUM_THREADS=1 python benchmarks/singd.py --quick         # smoke run
    OMP_NUM_THREADS=1 python benchmarks/singd.py --cases mlp --T 1 --structures diagonal triltoeplitz
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# this script's name shadows the ``singd`` package: drop its folder from the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

PACKAGE_STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz"]
RANK1 = ["triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag", "triubottomrightdiag"]
OURS_ONLY = ["tril", "triu"]
#: ``dense`` with ``precondition_dtype=torch.bfloat16`` (its products in bf16, the factors in
#: float32), compared with the package's float32 ``dense``; not in the default list.
BF16_PRODUCTS = "dense-bf16"
#: ``dense-bf16`` with ``stats_dtype=torch.bfloat16`` as well (the update's grams in bf16).
BF16_ALL = "dense-bf16-all"
LOWERED = (BF16_PRODUCTS, BF16_ALL)
ALL_STRUCTURES = PACKAGE_STRUCTURES + RANK1 + OURS_ONLY

CLOCK: list[Callable[[], float]] = [time.thread_time]
HYPER: dict[str, Any] = {"lr": 1e-4, "momentum": 0.9, "damping": 1e-3, "alpha1": 0.5, "lr_cov": 1e-2}


class SeqMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor


def make_case(name: str, quick: bool) -> Case:
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        d, h, n = (784, 512, 256) if not quick else (196, 128, 64)

        def build() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))

        x = torch.randn(n, d, generator=gen)
    elif name == "seq":
        d, h, n, r = (128, 512, 32, 64) if not quick else (32, 128, 16, 16)

        def build() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d), SeqMean(), nn.Linear(d, 10))

        x = torch.randn(n, r, d, generator=gen)
    else:
        raise SystemExit(f"unknown case {name!r}: choose mlp or seq")
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    return Case(name, build, x, y)


def _package_class() -> type:
    import singd.optim.optimizer as so
    from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix
    from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix
    from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix
    from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix

    class PackageSINGD(so.SINGD):  # type: ignore[misc]
        SUPPORTED_STRUCTURES = {
            **so.SINGD.SUPPORTED_STRUCTURES,
            "triltopleftdiag": TrilTopLeftDiagonalMatrix,
            "trilbottomrightdiag": TrilBottomRightDiagonalMatrix,
            "triutopleftdiag": TriuTopLeftDiagonalMatrix,
            "triubottomrightdiag": TriuBottomRightDiagonalMatrix,
        }

    return PackageSINGD


def make_optimizer(kind: str, structure: str | None, T: int, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=HYPER["lr"], momentum=HYPER["momentum"])
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=HYPER["lr"])
    if kind == "ours":
        from curvkit.optim import SINGD

        # the raw update, as the package's (recommended=False: no trust region, no factor-step bound)
        if structure in LOWERED:
            lowered = {"precondition_dtype": torch.bfloat16}
            if structure == BF16_ALL:
                lowered["stats_dtype"] = torch.bfloat16
            return SINGD(model, structure="dense", T=T, recommended=False, **lowered, **HYPER)
        return SINGD(model, structure=structure, T=T, recommended=False, **HYPER)
    if kind == "pkg":
        return _package_class()(  # type: ignore[no-any-return]
            model, structures=(structure, structure), T=T, warn_unsupported=False, **HYPER
        )
    raise ValueError(kind)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif hasattr(obj, "named_tensors"):  # the package's StructuredMatrix
            for _, t in obj.named_tensors():
                walk(t)
        elif hasattr(obj, "tensors"):  # a curvkit FactorStructure
            walk(obj.tensors())

    walk(opt.state_dict())
    return total


class Contender:
    def __init__(self, case: Case, kind: str, structure: str | None, T: int) -> None:
        self.label = kind if structure is None else f"{kind}:{structure}"
        self.kind, self.structure, self.T = kind, structure, T
        self.model = case.build()
        self.x, self.y = case.x, case.y
        self.opt = make_optimizer(kind, structure, T, self.model)
        self.times: list[float] = []
        self.error: str | None = None

    def step(self) -> None:
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()

    def block(self, n: int) -> None:
        if self.error:
            return
        try:
            t0 = CLOCK[0]()
            for _ in range(n):
                self.step()
            self.times.append((CLOCK[0]() - t0) / n * 1e3)
        except Exception as err:  # noqa: BLE001 - reported in the table
            self.error = f"{type(err).__name__}: {err}"[:80]

    @property
    def ms(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def run_case(case: Case, T: int, structures: list[str], rounds: int, impls: list[str]) -> dict[str, Any]:
    block = 3 if T == 1 else T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns about its naive (dense) fallbacks
        contenders = [Contender(case, "sgd", None, T), Contender(case, "adamw", None, T)]
        for s in structures:
            for kind in impls:
                if kind == "pkg" and (s in OURS_ONLY or s in LOWERED):
                    continue
                contenders.append(Contender(case, kind, s, T))
        for c in contenders:
            c.block(max(T, 2))  # warm-up
            c.times.clear()
        for r in range(rounds):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for c in order:
                c.block(block if c.structure else 5)
    return {
        c.label: {"ms": c.ms, "times": list(c.times), "state_bytes": state_bytes(c.opt), "error": c.error}
        for c in contenders
    }


def paired(res: dict[str, Any], label: str, base: str) -> float:
    """Median over rounds of ``label``'s ms/step minus ``base``'s in the same round: a load
    change between rounds shifts both (unpaired medians let it show up as overhead)."""
    diffs = [a - b for a, b in zip(res[label]["times"], res[base]["times"])]
    return statistics.median(diffs) if diffs else float("nan")


def report(case: str, T: int, res: dict[str, Any], structures: list[str]) -> list[str]:
    sgd, adamw = res["sgd"]["ms"], res["adamw"]["ms"]
    misses: list[str] = []
    print(
        f"\n## {case}, T = {T}  (SGD {sgd:.2f} ms/step, {res['sgd']['state_bytes'] / 2**20:.2f} MiB state; "
        f"AdamW {adamw:.2f} ms/step, overhead {paired(res, 'adamw', 'sgd'):.2f} ms, "
        f"{res['adamw']['state_bytes'] / 2**20:.2f} MiB)"
    )
    print(
        "| structure | ours ms | pkg ms | ours overhead | pkg overhead | ours/pkg overhead | ours / AdamW step "
        "| ours state MiB | pkg state MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in structures:
        o = res.get(f"ours:{s}")
        ps = "dense" if s in LOWERED else s  # the package's counterpart
        p = res.get(f"pkg:{ps}")
        if o is None:
            continue
        if o["error"]:
            print(f"| {s} | error: {o['error']} | | | | | | | |")
            continue
        o_ov = paired(res, f"ours:{s}", "sgd")
        if p is not None and not p["error"]:
            p_ov = paired(res, f"pkg:{ps}", "sgd")
            ratio = o_ov / p_ov if p_ov > 0 else float("nan")
            p_ms, p_ovs, rs, p_mib = f"{p['ms']:.2f}", f"{p_ov:.2f}", f"{ratio:.2f}", f"{p['state_bytes'] / 2**20:.2f}"
            if not ratio <= 0.7:
                misses.append(f"{case} T={T} {s}: ours/pkg overhead {ratio:.2f} > 0.7")
            slower = paired(res, f"ours:{s}", f"pkg:{ps}")
            if slower > 0:
                misses.append(f"{case} T={T} {s}: ours {slower:.2f} ms/step slower than the package (paired)")
        else:
            p_ms = "—" if p is None else f"error: {p['error']}"
            p_ovs = rs = p_mib = "—"
        if "toeplitz" in s and o["ms"] > 2 * adamw:
            misses.append(f"{case} T={T} {s}: ours {o['ms']:.2f} ms > 2 × AdamW's {adamw:.2f} ms")
        if s == "diagonal" and o["state_bytes"] > res["adamw"]["state_bytes"]:
            misses.append(
                f"{case} T={T} diagonal: state {o['state_bytes']} B > AdamW's {res['adamw']['state_bytes']} B"
            )
        print(
            f"| {s} | {o['ms']:.2f} | {p_ms} | {o_ov:.2f} | {p_ovs} | {rs} | {o['ms'] / adamw:.2f} "
            f"| {o['state_bytes'] / 2**20:.2f} | {p_mib} |"
        )
    return misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["mlp", "seq"])
    ap.add_argument("--T", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--structures", nargs="+", default=ALL_STRUCTURES)
    ap.add_argument("--impls", nargs="+", default=["ours", "pkg"], choices=["ours", "pkg"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small models, 2 rounds")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="thread CPU time (default) or wall time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    CLOCK[0] = time.thread_time if args.clock == "cpu" else time.perf_counter
    rounds = 2 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, median of {rounds} rounds, "
        f"{args.clock} clock"
    )
    out: dict[str, Any] = {}
    misses: list[str] = []
    for name in args.cases:
        case = make_case(name, args.quick)
        for T in args.T:
            res = run_case(case, T, args.structures, rounds, args.impls)
            out[f"{name}/T={T}"] = res
            misses += report(name, T, res, args.structures)
    print("\n## targets")
    print("all met" if not misses else "\n".join(f"MISSED: {m}" for m in misses))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
