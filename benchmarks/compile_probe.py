#!/usr/bin/env python
r"""Does ``torch.compile`` pay for K-FAC's per-step hot path on this machine?

This is a script, not a test (issue #18's lever "compiled hot path"). It times, in one
process on one CPU thread, the per-layer work of a plain K-FAC step — the preconditioning
products :math:`\tilde G^{-1}[\nabla W \mid \nabla b]\tilde A^{-1}`, the inner product the
direction guard and the KL clip read, SGD's momentum and the parameter update — written as
one plain-torch function, eager against ``torch.compile`` of the same function (inductor,
default mode), for several layer widths, and prints the compile time and the ratio. Blocks
of calls alternate between the two; the minimum over blocks is reported (robust to the
load of a shared machine).

Usage::

    python benchmarks/compile_probe.py                 # widths 32, 128, 512; ~1 min + compiles
    python benchmarks/compile_probe.py --widths 64,256 --blocks 30
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor


def hot_path(
    gw: Tensor, gb: Tensor, g_inv: Tensor, a_inv: Tensor, w: Tensor, b: Tensor, mw: Tensor, mb: Tensor
) -> Tensor:
    """One layer of a plain K-FAC step: direction, ``⟨Δ, ∇⟩``, momentum, update (lr 1e-3, μ 0.9)."""
    grad = torch.cat([gw, gb.unsqueeze(1)], dim=1)
    d = g_inv @ grad @ a_inv
    dot = (d * grad).sum()
    mw.mul_(0.9).add_(d[:, :-1])
    mb.mul_(0.9).add_(d[:, -1])
    w.add_(mw, alpha=-1e-3)
    b.add_(mb, alpha=-1e-3)
    return dot


def case(width: int, blocks: int, calls: int) -> dict[str, float]:
    torch.manual_seed(0)
    d_in, d_out = width, width
    gw, gb = torch.randn(d_out, d_in), torch.randn(d_out)
    g_inv = torch.linalg.inv(torch.eye(d_out) + 0.1 * torch.ones(d_out, d_out) / d_out)
    a_inv = torch.linalg.inv(torch.eye(d_in + 1) + 0.1 * torch.ones(d_in + 1, d_in + 1) / d_in)
    state = [torch.zeros(d_out, d_in), torch.zeros(d_out), torch.zeros(d_out, d_in), torch.zeros(d_out)]
    torch._dynamo.reset()  # each width compiles afresh (no shape-generic graph from the last one)
    compiled = torch.compile(hot_path, dynamic=False)
    t0 = time.perf_counter()
    compiled(gw, gb, g_inv, a_inv, *state)
    compile_s = time.perf_counter() - t0

    def block(fn: object) -> float:
        t = time.perf_counter()
        for _ in range(calls):
            fn(gw, gb, g_inv, a_inv, *state)  # type: ignore[operator]
        return (time.perf_counter() - t) / calls

    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(blocks):
        best["eager"] = min(best["eager"], block(hot_path))
        best["compiled"] = min(best["compiled"], block(compiled))
    return {"width": width, "compile_s": compile_s, **{k: v * 1e6 for k, v in best.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="32,128,512", help="comma-separated layer widths (d_in = d_out)")
    parser.add_argument("--blocks", type=int, default=20, help="alternating timing blocks per contender")
    parser.add_argument("--calls", type=int, default=50, help="calls per block")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| layer width | eager (µs/call) | torch.compile (µs/call) | compiled / eager | compile time (s) |")
    print("|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        r = case(width, args.blocks, max(1, args.calls if width <= 128 else args.calls // 10))
        print(
            f"| {width} | {r['eager']:.1f} | {r['compiled']:.1f} | {r['compiled'] / r['eager']:.2f} | "
            f"{r['compile_s']:.1f} |"
        )
    print(f"\n(torch {torch.__version__}, one thread, minimum over {args.blocks} alternating blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
