#!/usr/bin/env python
r"""Kronecker factors of an ``nn.Embedding``: curvkit beside ASDL and curvlinops, one process.

The model is ``Linear(D, C)(mean_t Embedding(V, D)(ids))`` with ``N`` sequences of ``T``
tokens (empirical Fisher, cross-entropy). For each vocabulary size ``V`` the script times
(median of ``--repeats``, contenders interleaved) and sizes the input factor ``A``:

* ``curvkit``: :func:`curvkit.kronecker_factors` — ``A`` as its ``V`` diagonal entries,
  counted from the ids;
* ``asdl``: ASDL 0.1a4's own embedding K-FAC (``SHAPE_KRON``), whose ``A`` is a dense
  ``V × V`` matrix (per-datum token counts ``Σ_n c_n c_nᵀ``, a different convention);
* ``curvlinops``: ``KFACLinearOperator`` on the equivalent model with the embedding as a
  bias-free ``Linear(V, D)`` fed one-hot rows (the inputs are ``N·T·V`` floats; ``A`` dense).

Peers are skipped where their dense ``V × V`` factor (or one-hot inputs) would exceed
``--dense-limit`` bytes; the table says so. Ratios are peer time / curvkit time.

Usage::

    python benchmarks/embedding.py                  # V = 1024, 8192, 50257; about a minute
    python benchmarks/embedding.py --vocab 1024,4096 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

import curvkit

D, C, N, T = 64, 10, 16, 64


class Net(nn.Module):
    def __init__(self, vocab: int, one_hot: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.one_hot = one_hot
        self.emb = nn.Linear(vocab, D, bias=False) if one_hot else nn.Embedding(vocab, D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


def _ours(model: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), ids, y, fisher="empirical")["emb"].A


def _asdl(model: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import asdl

    config = asdl.FisherConfig(
        fisher_type=asdl.FISHER_EMP,
        fisher_shapes=[asdl.SHAPE_KRON],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        fisher_attr="bench_fisher",
        fvp_attr="bench_fvp",
        data_size=ids.shape[0],
    )
    maker = asdl.get_fisher_maker(model, config)
    dummy = maker.setup_model_call(model, ids)
    maker.setup_loss_call(nn.CrossEntropyLoss(), dummy, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maker.forward_and_backward(data_size=ids.shape[0])
    return model.emb.bench_fisher.kron.A  # type: ignore[union-attr]


def _curvlinops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from curvlinops import KFACLinearOperator

    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        [p for p in model.parameters()],
        [(x, y)],
        fisher_type="empirical",
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    return op._input_covariances["emb"]


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", default="1024,8192,50257", help="comma-separated vocabulary sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-limit", type=float, default=2e9, help="largest dense peer tensor, bytes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"N={N} sequences × T={T} tokens, D={D}, C={C}; empirical Fisher; float32; 1 thread")
    header = f"{'V':>7}{'curvkit ms':>12}{'A bytes':>12}{'asdl ms':>10}{'×':>7}{'A bytes':>14}"
    print(header + f"{'curvlinops ms':>15}{'×':>7}{'A bytes':>14}")
    for vocab in (int(v) for v in args.vocab.split(",")):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (N, T), generator=g)
        y = torch.randint(0, C, (N,), generator=g)
        model = Net(vocab)
        twin = Net(vocab, one_hot=True)
        with torch.no_grad():
            twin.emb.weight.copy_(model.emb.weight.t())  # type: ignore[operator]
            twin.head.load_state_dict(model.head.state_dict())
        dense_ok = 4 * vocab * vocab <= args.dense_limit and 4 * N * T * vocab <= args.dense_limit
        contenders: dict[str, Callable[[], Any]] = {"curvkit": partial(_ours, model, ids, y)}
        if dense_ok:
            one_hot = torch.nn.functional.one_hot(ids, vocab).float()
            contenders["asdl"] = partial(_asdl, model, ids, y)
            contenders["curvlinops"] = partial(_curvlinops, twin, one_hot, y)
        sizes = {name: fn().numel() * 4 for name, fn in contenders.items()}  # warm-up, and the A's size
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                times[name].append(_time(fn))
        med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
        row = f"{vocab:>7}{med['curvkit']:>12.2f}{sizes['curvkit']:>12,}"
        for name in ("asdl", "curvlinops"):
            if name in med:
                width = 10 if name == "asdl" else 15
                row += f"{med[name]:>{width}.2f}{med[name] / med['curvkit']:>7.1f}{sizes[name]:>14,}"
            else:
                row += f"{'skipped (dense V×V)':>{31 if name == 'asdl' else 36}}"
        print(row)


if __name__ == "__main__":
    main()
