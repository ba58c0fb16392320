#!/usr/bin/env python
r"""Normalisation layers' unit-wise blocks: curvkit beside ASDL, and what they add to a step.

Two measurements, both on CPU in float32, contenders interleaved within each round and
the median over ``--rounds`` reported:

1. **statistics** — the exact per-unit type-2 Fisher of every normalisation layer of a
   model whose other parameters are frozen (so both libraries compute exactly the same
   thing and nothing else): :func:`curvkit.kronecker_factors` against ASDL 0.1a4's
   ``FisherMaker`` with ``SHAPE_UNIT_WISE``, on a CNN with ``BatchNorm2d`` (training mode)
   and an MLP with ``LayerNorm`` on ``(N, d)`` inputs (where ASDL is exact; both results
   are compared and the relative difference printed);
2. **step** — one K-FAC step (statistics every step, refresh every 10) on the same models
   with every parameter trainable, the normalisation layers preconditioned by their
   unit-wise blocks, against the same model whose normalisation layers are equivalent
   modules without a handler (the same ``F.layer_norm`` / ``F.batch_norm`` calls, moved by
   the first-order rule): the cost of preconditioning them, as a ratio.

Usage::

    python benchmarks/unitwise.py               # ~1 min on one thread
    python benchmarks/unitwise.py --rounds 9 --batch 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import curvkit
import curvkit.optim


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.LayerNorm(256),
        nn.Tanh(),
        nn.Linear(256, 256),
        nn.LayerNorm(256),
        nn.Tanh(),
        nn.Linear(256, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn-batchnorm": (_cnn, (3, 16, 16)),
    "mlp-layernorm": (_mlp, (64,)),
}
NORMS = (nn.BatchNorm2d, nn.LayerNorm)


class _PlainNorm(nn.Module):
    """A normalisation layer no handler serves (the same functional call and parameters)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if isinstance(n, nn.LayerNorm):
            return nn.functional.layer_norm(x, n.normalized_shape, self.weight, self.bias, n.eps)
        return nn.functional.batch_norm(
            x, n.running_mean, n.running_var, self.weight, self.bias, n.training, n.momentum, n.eps
        )


def _first_order(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_children()):
        if isinstance(m, NORMS):
            setattr(model, name, _PlainNorm(m))
    return model


def _only_norms(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if not isinstance(m, NORMS):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    return model


def _asdl_unit_wise(model: nn.Module, X: torch.Tensor) -> dict[str, torch.Tensor]:
    import asdl

    config = asdl.FisherConfig(
        fisher_type=asdl.FISHER_EXACT,
        fisher_shapes=[asdl.SHAPE_UNIT_WISE],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        data_size=X.shape[0],
        fisher_attr="_bench_fisher",
        fvp_attr="_bench_fvp",
    )
    maker = asdl.get_fisher_maker(model, config)
    maker.setup_model_call(model, X)
    maker.forward_and_backward(data_size=X.shape[0])
    out = {}
    for name, m in model.named_modules():
        unit = getattr(getattr(m, "_bench_fisher", None), "unit", None)
        if unit is not None and unit.data is not None:
            out[name] = unit.data
            del m._bench_fisher
    return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def statistics_rows(rounds: int, batch: int) -> list[dict[str, Any]]:
    rows = []
    for label, (build, shape) in MODELS.items():
        torch.manual_seed(0)
        model = _only_norms(build())
        X, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        asdl_model = copy.deepcopy(model)

        def ours(model: nn.Module = model, X: torch.Tensor = X, y: torch.Tensor = y) -> dict[str, Any]:
            return curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2")

        def theirs(model: nn.Module = asdl_model, X: torch.Tensor = X) -> dict[str, Any]:
            return _asdl_unit_wise(model, X)

        a, b = ours(), theirs()  # warm-up, and the agreement
        diff = max(float((a[n].F - b[n]).norm() / a[n].F.norm()) for n in a)
        times: dict[str, list[float]] = {"curvkit": [], "asdl": []}
        for _ in range(rounds):
            times["curvkit"].append(_timed(ours))
            times["asdl"].append(_timed(theirs))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "model": label,
                "curvkit_ms": 1e3 * med["curvkit"],
                "asdl_ms": 1e3 * med["asdl"],
                "asdl/curvkit": med["asdl"] / med["curvkit"],
                "max_rel_diff": diff,
            }
        )
    return rows


def step_rows(rounds: int, batch: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    for label, (build, shape) in MODELS.items():
        torch.manual_seed(0)
        base = build()
        X, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        contenders = {}
        for kind in ("preconditioned", "first_order"):
            model = copy.deepcopy(base)
            if kind == "first_order":
                model = _first_order(model)
            opt = curvkit.optim.KFAC(model, lr=1e-3, damping=1e-2, T_inv=10, unsupported="skip")
            contenders[kind] = (model, opt)

        def run(kind: str, contenders: dict[str, Any] = contenders, X: torch.Tensor = X, y: torch.Tensor = y) -> None:
            model, opt = contenders[kind]
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
                opt.step()

        for kind in contenders:  # warm-up
            run(kind)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(rounds):
            for kind in contenders:
                times[kind].append(_timed(lambda k=kind, r=run: r(k)) / steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "model": label,
                "preconditioned_ms": 1e3 * med["preconditioned"],
                "first_order_ms": 1e3 * med["first_order"],
                "ratio": med["preconditioned"] / med["first_order"],
            }
        )
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="K-FAC steps per timed round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, float32")
    print("\nstatistics: exact per-unit type-2 Fisher of the normalisation layers only (ms, median)")
    _print(statistics_rows(args.rounds, args.batch))
    print(
        f"\nK-FAC step incl. forward and backward ({args.steps} steps per round; ms per step, median): "
        "normalisation layers preconditioned vs moved by the first-order rule"
    )
    _print(step_rows(args.rounds, args.batch, args.steps))


if __name__ == "__main__":
    main()
