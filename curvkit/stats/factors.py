r"""Factor arithmetic shared by every backend.

Given the ``(N, R, d)`` features of a layer (``R`` the weight-sharing axis):

* expand: :math:`A = \frac{1}{NR}\sum_{n,r}\bar a_{n,r}\bar a_{n,r}^\top`,
  :math:`G = \frac{1}{Z}\sum_{m,n,r} g_{m,n,r}g_{m,n,r}^\top`;
* reduce: :math:`\hat a_n = \frac1R\sum_r \bar a_{n,r}`, :math:`\hat g_{m,n} = \sum_r g_{m,n,r}`,
  :math:`A = \frac1N\sum_n \hat a_n\hat a_n^\top`, :math:`G = \frac1Z\sum_{m,n}\hat g_{m,n}\hat g_{m,n}^\top`;

where ``ā = [a; 1]`` when the layer has a bias and ``Z`` is the loss normaliser of
:mod:`curvkit.stats.losses`.

Performance notes. Features often arrive as a transposed view — a convolution's unfolded
patches and output gradients are stored ``(N, d, R)`` with ``R`` contiguous — and
flattening such a view to ``(N·R, d)`` rows would copy it. :func:`sum_gram` contracts that
layout directly with batched GEMMs instead. For stride-1 convolutions,
:func:`conv_patch_gram` forms the Gram matrix of the patches without unfolding them at all.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from curvkit.config import KFACApprox

__all__ = ["assemble_gram", "conv_patch_gram", "gram", "input_factor", "output_gram", "sum_gram"]

#: Elements of the ``(chunk, d, d)`` temporary of :func:`sum_gram`'s batched GEMM.
_BMM_BUDGET = 1 << 21
#: Cost-model constants of :func:`conv_patch_gram` (in multiply-adds, one thread).
_FLOAT_COST = 20
_CALL_COST = 100_000
#: Kernels with more offsets than this are always unfolded.
_MAX_KERNEL_OFFSETS = 9
#: Feature dimension from which :func:`gram` exploits symmetry (measured: ~20% faster at
#: d = 512, no gain below a few hundred).
_SYMMETRIC_MIN_DIM = 256


def gram(rows: Tensor, append_one: bool = False, product_dtype: torch.dtype | None = None) -> Tensor:
    """``XᵀX`` of ``rows`` ``(n, d)``; with ``append_one`` the Gram matrix of ``[X 1]``,
    assembled blockwise so no ``(n, d + 1)`` copy of the rows is made. With
    ``product_dtype`` (e.g. ``torch.bfloat16``) the product takes its inputs in that dtype
    and accumulates and returns at least float32 (the column sums likewise).

    For wide enough ``X`` only the blocks on and above the diagonal of a 2×2 split are
    multiplied (three GEMMs with a quarter of the outputs each, 3/4 of the work) and the
    remaining block is mirrored (so the off-diagonal blocks are exact transposes; the
    diagonal blocks are symmetric up to rounding, as any GEMM's ``XᵀX``)."""
    if product_dtype is None:
        xtx = _xtx(rows)
    else:
        cast = rows.to(product_dtype)
        xtx = (cast.t() @ cast).to(torch.promote_types(rows.dtype, torch.float32))
    if not append_one:
        return xtx
    return assemble_gram(xtx, rows.sum(0, dtype=xtx.dtype), rows.shape[0])


def _xtx(rows: Tensor) -> Tensor:
    n, d = rows.shape
    if d < _SYMMETRIC_MIN_DIM or 4 * n < d:
        return rows.t() @ rows  # small, or so few rows that writing the output dominates
    h = d // 2
    left, right = rows[:, :h], rows[:, h:]
    out = rows.new_empty(d, d)
    out[:h, :h].addmm_(left.t(), left, beta=0)
    out[:h, h:].addmm_(left.t(), right, beta=0)
    out[h:, h:].addmm_(right.t(), right, beta=0)
    out[h:, :h] = out[:h, h:].t()
    return out


def assemble_gram(xtx: Tensor, col_sum: Tensor, count: int | float) -> Tensor:
    """The Gram matrix of ``[X 1]`` from ``XᵀX`` ``(d, d)``, the column sums ``1ᵀX`` and
    the number of rows."""
    d = xtx.shape[0]
    out = xtx.new_empty(d + 1, d + 1)
    out[:d, :d] = xtx
    out[:d, d] = col_sum
    out[d, :d] = col_sum
    out[d, d] = count
    return out


def sum_gram(features: Tensor, product_dtype: torch.dtype | None = None) -> Tensor:
    r""":math:`\sum_{n,r} f_{n,r} f_{n,r}^\top` of ``(N, R, d)`` features, whatever their layout.

    Row-contiguous features are one GEMM over the ``N·R`` rows. Features that are a
    transposed view of an ``(N, d, R)`` tensor (``R`` contiguous, as a convolution's unfold
    or output gradient) are contracted per datum with batched GEMMs, in chunks, instead of
    being copied to rows first; that copy costs more than the GEMM for such shapes.
    ``product_dtype``: as :func:`gram` (one GEMM over the rows).
    """
    n, r, d = features.shape
    if product_dtype is not None or r == 1 or features.stride(1) != 1 or 4 * r < d:
        return gram(features.reshape(n * r, d), product_dtype=product_dtype)
    cols = features.transpose(1, 2)  # (N, d, R), R contiguous
    out = features.new_zeros(d, d)
    chunk = max(1, _BMM_BUDGET // (d * d))
    for start in range(0, n, chunk):
        block = cols[start : start + chunk]
        if block.shape[0] == 1:
            out.addmm_(block[0], block[0].t())
        else:
            out += torch.bmm(block, block.transpose(1, 2)).sum(0)
    return out


def input_factor(features: Tensor, approx: KFACApprox, append_one: bool) -> Tensor:
    """``A`` of one batch from ``(N, R, d_in)`` input features, normalised per datum."""
    n, r, d = features.shape
    if approx is KFACApprox.EXPAND or r == 1:
        if append_one:
            col_sum = features.sum((0, 1))
            return assemble_gram(sum_gram(features), col_sum, n * r).div_(n * r)
        return sum_gram(features).div_(n * r)
    return gram(features.mean(1), append_one).div_(n)


def output_gram(features: Tensor, approx: KFACApprox, product_dtype: torch.dtype | None = None) -> Tensor:
    r"""Unnormalised ``G`` contribution :math:`\sum g g^\top` of ``(M·N, R, d_out)``
    backpropagated output gradients (summed over ``R`` first for reduce); divide by the
    loss normaliser ``Z`` for ``G``."""
    if approx is KFACApprox.EXPAND or features.shape[1] == 1:
        return sum_gram(features, product_dtype)
    return gram(features.sum(1), product_dtype=product_dtype)


# --- convolution patches without unfolding ---------------------------------------------------


def _ranges_outside(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """The parts of ``[0, size)`` outside ``[start, stop) ∩ [0, size)``."""
    lo, hi = max(start, 0), min(stop, size)
    if lo >= hi:
        return [(0, size)]
    return [rng for rng in ((0, lo), (hi, size)) if rng[0] < rng[1]]


def conv_patch_gram(
    x: Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    max_cost_ratio: float = 0.8,
) -> tuple[Tensor, Tensor, int] | None:
    r"""Gram matrix of the patches of a stride-1 convolution, without unfolding them.

    With patches :math:`p_{n,t}` (the ``F.unfold`` columns, features ordered like
    ``weight.flatten(1)``), returns :math:`\sum_{n,t} p_{n,t}p_{n,t}^\top`,
    :math:`\sum_{n,t} p_{n,t}` and the number ``N·T`` of patches — or ``None`` when the
    unfold-based computation is estimated to be cheaper (large kernels, tiny inputs).

    The entry for input channels ``(c, c')`` at kernel offsets ``(κ, κ')`` is a
    correlation of the zero-padded input with itself at displacement ``δ = dil·(κ' − κ)``,
    summed over the window of positions that offset ``κ`` visits. That correlation over
    the *whole* input is one GEMM per displacement — ``∏(2k−1)`` of them (half, by
    symmetry) instead of a GEMM with ``(C·∏k)²`` outputs — on a channel-major copy of the
    input whose zero margins absorb the shifts; the few border rows/columns outside a
    window are then subtracted by inclusion–exclusion. The result equals the unfold-based
    Gram matrix up to floating-point rounding.

    Args:
        x: Input ``(N, C, *spatial)`` with 1 to 3 spatial dimensions, not padded.
        kernel_size, dilation: Per spatial dimension.
        padding: ``(before, after)`` zero padding per spatial dimension.
        max_cost_ratio: Use this method only if its estimated cost is below this fraction
            of the unfold-based one (kernels with more than 9 offsets are always unfolded).
    """
    n, c, *spatial = x.shape
    nd = len(spatial)
    outs = [s + lo + hi - d * (k - 1) for s, k, d, (lo, hi) in zip(spatial, kernel_size, dilation, padding)]
    if min(outs) < 1:
        return None
    margins = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    padded = [s + 2 * m for s, m in zip(spatial, margins)]
    length = n * math.prod(padded)
    offsets = list(itertools.product(*(range(k) for k in kernel_size)))
    num_offsets = len(offsets)
    if num_offsets > _MAX_KERNEL_OFFSETS:
        return None  # the border corrections grow like (∏k)²; unfolding is cheaper
    # excluded border ranges per dimension and kernel offset
    excluded = [
        [_ranges_outside(i * dil - lo, i * dil - lo + o, s) for i in range(k)]
        for s, k, dil, (lo, _), o in zip(spatial, kernel_size, dilation, padding, outs)
    ]
    # which border slabs the corrections need: (ranges per dimension, displacement)
    slab_keys: set[tuple[tuple[tuple[int, int] | None, ...], tuple[int, ...]]] = set()
    for kappa in offsets:
        for kappa2 in offsets:
            e = tuple(b - a for a, b in zip(kappa, kappa2))
            for dims in itertools.product((False, True), repeat=nd):
                if any(dims):
                    choices = [excluded[i][kappa[i]] if dims[i] else [None] for i in range(nd)]
                    slab_keys.update((ranges, e) for ranges in itertools.product(*choices))
    # cost estimate in multiply-adds; moving one float counts as _FLOAT_COST of them, one
    # tensor operation issued from Python as _CALL_COST
    t = math.prod(outs)
    d = c * num_offsets
    unfold_cost = d * d * n * t + _FLOAT_COST * d * n * t
    num_full = math.prod(2 * k - 1 for k in kernel_size) // 2 + 1
    slab_cost = 0
    for ranges, _ in slab_keys:
        size = math.prod(r[1] - r[0] if r is not None else s for r, s in zip(ranges, spatial))
        slab_cost += (c * c + _FLOAT_COST * c) * n * size
    trick_cost = (
        num_full * (c * c + _FLOAT_COST * c) * length
        + slab_cost
        + _FLOAT_COST * c * length
        + _CALL_COST * (num_full + 2 * len(slab_keys) + 2 * num_offsets * num_offsets)
    )
    if trick_cost > max_cost_ratio * unfold_cost:
        return None

    # channel-major zero-padded copy: (C, N, *padded), flattened per channel
    buf = x.new_zeros(c, n, *padded)
    interior = (slice(None), slice(None), *(slice(m, m + s) for m, s in zip(margins, spatial)))
    buf[interior] = x.transpose(0, 1)
    flat = buf.view(c, length)
    strides = buf.stride()[2:]

    full: dict[tuple[int, ...], Tensor] = {}  # displacement (kernel units) -> C×C correlation
    for e in itertools.product(*(range(-(k - 1), k) for k in kernel_size)):
        if e < tuple(-v for v in e):
            continue  # the mirrored displacement gives the transpose
        off = sum(v * d * st for v, d, st in zip(e, dilation, strides))
        lo, hi = max(0, -off), length - max(0, off)
        full[e] = flat[:, lo:hi] @ flat[:, lo + off : hi + off].t()

    def correlation(e: tuple[int, ...]) -> Tensor:
        if e in full:
            return full[e]
        return full[tuple(-v for v in e)].t()

    slabs: dict[tuple, Tensor] = {}

    def slab(ranges: tuple, e: tuple[int, ...]) -> Tensor:
        key = (ranges, e)
        if key not in slabs:
            left = [slice(None), slice(None)]
            right = [slice(None), slice(None)]
            for r, s, m, v, d in zip(ranges, spatial, margins, e, dilation):
                a, b = r if r is not None else (0, s)
                left.append(slice(m + a, m + b))
                right.append(slice(m + a + v * d, m + b + v * d))
            slabs[key] = buf[tuple(left)].reshape(c, -1) @ buf[tuple(right)].reshape(c, -1).t()
        return slabs[key]

    blocks = []
    for kappa in offsets:
        for kappa2 in offsets:
            e = tuple(b - a for a, b in zip(kappa, kappa2))
            block = correlation(e)
            corrected = False
            for dims in itertools.product((False, True), repeat=nd):
                if not any(dims):
                    continue
                sign = (-1) ** sum(dims)
                choices = [excluded[i][kappa[i]] if dims[i] else [None] for i in range(nd)]
                for ranges in itertools.product(*choices):
                    if not corrected:
                        block = block.clone()
                        corrected = True
                    block.add_(slab(ranges, e), alpha=sign)
            blocks.append(block)
    # blocks[(κ, κ')][c, c'] -> A[(c, κ), (c', κ')]
    xtx = torch.stack(blocks).view(num_offsets, num_offsets, c, c).permute(2, 0, 3, 1)
    xtx = xtx.reshape(c * num_offsets, c * num_offsets)

    # column sums: window sums of the input, per channel and kernel offset
    total = x.sum(0)  # (C, *spatial)
    col = []
    for kappa in offsets:
        window = [slice(None)]
        for i, (s, d, (lo, _), o) in enumerate(zip(spatial, dilation, padding, outs)):
            start = kappa[i] * d - lo
            first = max(start, 0)
            # clamp, or a window lying wholly in the padding gives a negative stop, which
            # slicing would wrap around to the end of the input
            window.append(slice(first, max(first, min(start + o, s))))
        col.append(total[tuple(window)].sum(tuple(range(1, nd + 1))))
    col_sum = torch.stack(col, 1).reshape(-1)  # (C, P) -> C·P, channel major
    return xtx, col_sum, n * t
