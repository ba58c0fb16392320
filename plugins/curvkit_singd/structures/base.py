"""The base of SINGD's structures, :class:`GroupStructure`, and SINGD's operations on any
structure (curvkit's own dense and diagonal ones included)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvkit.structures.base import DenseStructure, DiagonalStructure, FactorStructure

__all__ = [
    "GroupStructure",
    "s_add_",
    "s_add_identity_",
    "s_added",
    "s_all_finite",
    "s_average_trace",
    "s_clone",
    "s_gram",
    "s_inner",
    "s_max_abs",
    "s_spectral_estimate",
    "s_product",
    "s_scale_",
]

_LOW = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs do not run in half precision: they run in float32 and cast back."""
    return torch.float32 if dtype in _LOW else dtype


def _eye(d: int, dtype: torch.dtype, device: Any) -> Tensor:
    return torch.eye(d, dtype=_compute_dtype(dtype), device=device).to(dtype)


class GroupStructure(FactorStructure):
    """A structure whose matrices form a group (closed under products) and whose
    parameters are linear in the matrix (so sums and scalings act on :meth:`tensors`).

    Subclasses implement :meth:`from_dense`, :meth:`to_dense`, :meth:`tensors`,
    :meth:`from_tensors`, :attr:`dim` and the fast paths; the SINGD operations below fall
    back to dense algebra with a :class:`~curvkit.structures.StructureFallbackWarning`.
    """

    # --- SINGD's operations (dense fallbacks) ------------------------------------------

    def product(self, other: FactorStructure) -> GroupStructure:
        """``self @ other`` (both of this structure), in the structure."""
        self._fallback("product")
        return type(self).from_dense(self.to_dense() @ other.to_dense().to(self.dtype))  # type: ignore[return-value]

    @classmethod
    def gram(cls, S: Tensor) -> GroupStructure:
        """:math:`\\hat\\Pi(S S^\\top)` for ``S`` of shape ``(d, n)``."""
        return cls.from_dense(S @ S.T)  # type: ignore[return-value]

    def inner(self) -> GroupStructure:
        """:math:`\\hat\\Pi(K^\\top K)`."""
        self._fallback("inner")
        k = self.to_dense()
        return type(self).from_dense(k.T @ k)  # type: ignore[return-value]

    def square_right(self, x: Tensor) -> Tensor:
        """``x K Kᵀ`` (``K`` = self) through :meth:`rmatmul` and :meth:`matmul`."""
        return self.matmul(self.rmatmul(x).T).T

    def square_left(self, x: Tensor) -> Tensor:
        """``K Kᵀ x`` through :meth:`rmatmul` and :meth:`matmul`."""
        return self.matmul(self.rmatmul(x.T).T)

    # --- linear algebra on the parameters ------------------------------------------------

    def add_(self, other: FactorStructure, alpha: float = 1.0) -> GroupStructure:
        """In place: ``self ← self + alpha · other`` (same structure)."""
        mine, theirs = self.tensors(), other.tensors()
        for name, t in mine.items():
            t.add_(theirs[name].to(t.dtype), alpha=alpha)
        return self

    def scale_(self, value: float) -> GroupStructure:
        for t in self.tensors().values():
            t.mul_(value)
        return self

    def add_identity_(self, value: float) -> GroupStructure:
        """In place: ``self ← self + value · I``."""
        return self.add_(type(self).identity(self.dim, dtype=self.dtype, device=self.device), alpha=value)

    def frobenius_norm(self) -> Tensor:
        """``‖K‖_F`` (every parameter is one matrix entry unless a subclass says otherwise)."""
        return torch.sqrt(sum((t * t).sum() for t in self.tensors().values()))  # type: ignore[arg-type]

    def max_abs(self) -> Tensor:
        """Largest absolute parameter (SINGD's ``infinity_vector_norm``)."""
        vals = [t.abs().max() for t in self.tensors().values() if t.numel() > 0]
        return torch.stack(vals).max()

    def ema_(self, other: FactorStructure, decay: float) -> GroupStructure:
        return self.scale_(decay).add_(other, alpha=1 - decay)

    def clone(self) -> GroupStructure:
        return type(self).from_tensors({k: v.clone() for k, v in self.tensors().items()})  # type: ignore[return-value]

    @classmethod
    def zeros(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> GroupStructure:
        return cls.identity(dim, dtype=dtype, device=device).scale_(0.0)  # type: ignore[attr-defined, no-any-return]


# --- symmetric products ---------------------------------------------------------------------


def _symmetric_blocks(d: int) -> int:
    """Row/column blocks for a ``d×d`` symmetric product on the CPU (one thread, measured:
    ``KᵀK`` at ``d = 785`` takes 11.5 ms as one GEMM, 9.1 ms in 2×2 blocks, 7.7 ms in 4×4;
    below ``d ≈ 300`` the smaller GEMMs lose what the skipped blocks save)."""
    return 1 if d < 288 else (2 if d < 448 else 4)


def symmetric_mm(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` for a product known to be symmetric (``Fᵀ F``, ``F Fᵀ``, ``Fᵀ (A F)``
    with a symmetric ``A``): on the CPU only the blocks on and above the diagonal are
    multiplied and the ones below are their transposes (up to 10 of 16 blocks: 25–35 % less
    time for ``d`` from 300 to 800); elsewhere, or for small ``d``, one GEMM. The result is
    exactly symmetric off the diagonal blocks."""
    d = left.shape[0]
    n = _symmetric_blocks(d) if left.device.type == "cpu" and right.shape[1] == d else 1
    if n == 1:
        return left @ right
    cuts = [round(d * i / n) for i in range(n + 1)]
    out = left.new_empty((d, d), dtype=torch.promote_types(left.dtype, right.dtype))
    for i in range(n):
        rows = slice(cuts[i], cuts[i + 1])
        for j in range(i, n):
            cols = slice(cuts[j], cuts[j + 1])
            torch.mm(left[rows], right[:, cols], out=out[rows, cols])
            if j > i:
                out[cols, rows].copy_(out[rows, cols].T)
    return out


# --- SINGD's operations for curvkit's own dense and diagonal structures --------------------


def s_product(k: FactorStructure, m: FactorStructure) -> FactorStructure:
    if isinstance(k, GroupStructure):
        return k.product(m)
    if isinstance(k, DiagonalStructure):
        return DiagonalStructure(k.diag * m.diagonal().to(k.diag.dtype))
    if isinstance(k, DenseStructure):
        return DenseStructure(k.matrix @ m.to_dense().to(k.matrix.dtype))
    k._fallback("product")
    return type(k).from_dense(k.to_dense() @ m.to_dense())


def s_gram(cls: type[FactorStructure], S: Tensor) -> FactorStructure:
    if issubclass(cls, GroupStructure):
        return cls.gram(S)
    if issubclass(cls, DiagonalStructure):
        return DiagonalStructure((S * S).sum(1))
    return cls.from_dense(symmetric_mm(S, S.T))


def s_inner(k: FactorStructure) -> FactorStructure:
    if isinstance(k, GroupStructure):
        return k.inner()
    if isinstance(k, DiagonalStructure):
        return DiagonalStructure(k.diag * k.diag)
    if isinstance(k, DenseStructure):
        return DenseStructure(symmetric_mm(k.matrix.T, k.matrix))
    k._fallback("inner")
    d = k.to_dense()
    return type(k).from_dense(d.T @ d)


def s_add_(k: FactorStructure, m: FactorStructure, alpha: float = 1.0) -> FactorStructure:
    # one multi-tensor (foreach) call for a structure of several tensors: at SINGD's sizes
    # the per-operation overhead, not the arithmetic, is most of the cost of these updates
    theirs, mine = m.tensors(), k.tensors()
    torch._foreach_add_(list(mine.values()), [theirs[n].to(t.dtype) for n, t in mine.items()], alpha=alpha)
    return k


def s_scale_(k: FactorStructure, value: float) -> FactorStructure:
    torch._foreach_mul_(list(k.tensors().values()), value)
    return k


def s_added(k: FactorStructure, m: FactorStructure, alpha: float = 1.0) -> FactorStructure:
    """``k + alpha · m`` as a new structure (one multi-tensor call, no clone of ``k``)."""
    theirs, mine = m.tensors(), k.tensors()
    out = torch._foreach_add(list(mine.values()), [theirs[n].to(t.dtype) for n, t in mine.items()], alpha=alpha)
    return type(k).from_tensors(dict(zip(mine, out)))


def s_all_finite(*structures: FactorStructure) -> bool:
    """Whether every parameter of every structure is finite: the 2-norms of all tensors in
    one multi-tensor call (NaN and ±Inf propagate); only if one is not finite, which may
    also be an overflow of finite values, each tensor is checked elementwise. (The
    ∞-norm would need no fallback, but ``_foreach_norm(ord=inf)`` is ~50× slower on CPU.)"""
    ts = [t for k in structures for t in k.tensors().values() if t.numel()]
    if not ts or bool(torch.stack(torch._foreach_norm(ts)).isfinite().all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in ts)


def s_add_identity_(k: FactorStructure, value: float) -> FactorStructure:
    if isinstance(k, GroupStructure):
        return k.add_identity_(value)
    if isinstance(k, DiagonalStructure):
        k.diag.add_(value)
        return k
    if isinstance(k, DenseStructure):
        k.matrix.diagonal().add_(value)
        return k
    return s_add_(k, type(k).identity(k.dim, dtype=k.dtype, device=k.device), value)


def s_max_abs(k: FactorStructure) -> float:
    vals = [float(t.abs().max()) for t in k.tensors().values() if t.numel() > 0]
    return max(vals) if vals else 0.0


def s_spectral_estimate(k: FactorStructure, iterations: int = 3) -> float:
    """A cheap estimate of the largest singular value of a structure: the largest stored
    entry (exact for a diagonal) or, if larger, ``iterations`` power iterations with the
    structure's own ``matmul`` from the normalised all-ones vector (deterministic; a lower
    bound, close to the top singular value when it dominates). ``inf`` if ``k`` is not
    finite."""
    if isinstance(k, DiagonalStructure):
        return float(k.diag.abs().max()) if k.diag.numel() else 0.0
    top = s_max_abs(k)
    if not math.isfinite(top):
        return math.inf
    some = next(iter(k.tensors().values()))
    dtype = torch.float32 if some.dtype in (torch.bfloat16, torch.float16) else some.dtype
    x = torch.full((k.dim, 1), k.dim**-0.5, dtype=some.dtype, device=some.device)
    norm = 0.0
    for _ in range(iterations):
        y = k.matmul(x).to(dtype)
        norm = float(torch.linalg.vector_norm(y))
        if not math.isfinite(norm):
            return math.inf
        if norm == 0.0:
            break
        x = (y / norm).to(some.dtype)
    return max(top, norm)


def s_clone(k: FactorStructure) -> FactorStructure:
    return type(k).from_tensors({n: t.clone() for n, t in k.tensors().items()})


def s_average_trace(k: FactorStructure) -> float:
    d = k.dim
    return float(k.trace()) / d if d else 0.0
