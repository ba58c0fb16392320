r"""Structured factors for SINGD: matrix groups closed under multiplication.

Every class here is a :class:`curvkit.structures.FactorStructure` (registered, usable by
any method) that also implements the operations SINGD's inverse-free update needs without
forming a dense ``d × d`` matrix:

* :meth:`GroupStructure.product` — ``self @ other`` for two matrices of the structure
  (the structures are groups, so the product stays in the structure);
* :meth:`GroupStructure.gram` — :math:`\hat\Pi(S S^\top)` from a ``(d, n)`` matrix ``S``
  (SINGD's ``Π̂(Kᵀ U K)`` with ``S = Kᵀ X``);
* :meth:`GroupStructure.inner` — :math:`\hat\Pi(K^\top K)`;
* in-place linear algebra on the parameters (``add_``, ``scale_``, ``add_identity_``).

The projection :math:`\hat\Pi` is SINGD's (Lin et al., 2024, and the ``singd`` package's
``from_dense``): entries of the structure's *symmetric* part are kept, and every entry of a
*triangular* (non-symmetric) part collects both mirror entries, ``M_ij + M_ji`` (which is
SINGD's "2×" for a symmetric ``M``). Written this way the projection is also idempotent on
the structure's own (non-symmetric) matrices.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.structures.base import DenseStructure, DiagonalStructure, FactorStructure

__all__ = [
    "BlockDiagonalStructure",
    "GroupStructure",
    "HierarchicalSquare",
    "HierarchicalStructure",
    "TrilBottomRightDiagStructure",
    "TrilStructure",
    "TrilToeplitzStructure",
    "TrilTopLeftDiagStructure",
    "TriuBottomRightDiagStructure",
    "TriuStructure",
    "TriuToeplitzStructure",
    "TriuTopLeftDiagStructure",
    "block_diagonal",
    "bundled_structures",
    "hierarchical",
    "resolve_structure",
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


# ==========================================================================================
# Triangular (dense lower / upper)
# ==========================================================================================


class _Triangular(GroupStructure):
    LOWER: ClassVar[bool] = True

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a {self.name} factor is a square matrix, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix

    @classmethod
    def _part(cls, m: Tensor, offset: int) -> Tensor:
        return torch.tril(m, -offset) if cls.LOWER else torch.triu(m, offset)

    @classmethod
    def from_dense(cls, matrix: Tensor) -> _Triangular:
        tri = cls._part(matrix, 1) + cls._part(matrix.T, 1) + torch.diag(matrix.diagonal())
        return cls(tri)

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> _Triangular:
        return cls(_eye(dim, dtype, device))

    def to_dense(self) -> Tensor:
        return self.matrix

    def tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> _Triangular:
        return cls(tensors["matrix"])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    def matmul(self, other: Tensor) -> Tensor:
        return self.matrix.to(other.dtype) @ other

    def rmatmul(self, other: Tensor) -> Tensor:
        return other @ self.matrix.to(other.dtype)

    def trace(self) -> Tensor:
        return self.matrix.trace()

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal().clone()

    def product(self, other: FactorStructure) -> _Triangular:
        return type(self)(self.matrix @ other.to_dense().to(self.matrix.dtype))

    @classmethod
    def gram(cls, S: Tensor) -> _Triangular:
        return cls.from_dense(S @ S.T)

    def inner(self) -> _Triangular:
        return type(self).from_dense(self.matrix.T @ self.matrix)


class TrilStructure(_Triangular):
    """Lower-triangular ``d × d``; :math:`\\hat\\Pi(M) = \\operatorname{Diag}(M) +
    \\operatorname{tril}(M + M^\\top, -1)`."""

    name = "tril"
    LOWER = True


class TriuStructure(_Triangular):
    """Upper-triangular ``d × d``; :math:`\\hat\\Pi(M) = \\operatorname{Diag}(M) +
    \\operatorname{triu}(M + M^\\top, 1)`."""

    name = "triu"
    LOWER = False


# ==========================================================================================
# Block-diagonal
# ==========================================================================================


class BlockDiagonalStructure(GroupStructure):
    """Dense diagonal blocks of size :attr:`BLOCK` (the last block is smaller when
    ``BLOCK`` does not divide ``d``); :math:`\\hat\\Pi` keeps the diagonal blocks.

    Use :func:`block_diagonal` for a block size (``block_diagonal(30)`` is SINGD's
    ``block30diagonal``).
    """

    BLOCK: ClassVar[int] = 30
    name = "block30diagonal"

    def __init__(self, blocks: Tensor, last: Tensor) -> None:
        k = self.BLOCK
        if blocks.ndim != 3 or blocks.shape[1:] != (k, k):
            raise ValueError(f"{self.name}: blocks must have shape (n, {k}, {k}), got {tuple(blocks.shape)}.")
        if last.ndim != 2 or last.shape[0] != last.shape[1] or last.shape[0] >= k:
            raise ValueError(
                f"{self.name}: the last block must be square and smaller than {k}, got {tuple(last.shape)}."
            )
        self.blocks, self.last = blocks, last

    @property
    def _split(self) -> int:
        return int(self.blocks.shape[0]) * self.BLOCK

    @classmethod
    def from_dense(cls, matrix: Tensor) -> BlockDiagonalStructure:
        k, d = cls.BLOCK, matrix.shape[0]
        nb = d // k
        head = matrix[: nb * k, : nb * k].reshape(nb, k, nb, k)
        idx = torch.arange(nb, device=matrix.device)
        return cls(head[idx, :, idx, :].clone(), matrix[nb * k :, nb * k :].clone())

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> BlockDiagonalStructure:
        nb, r = divmod(dim, cls.BLOCK)
        return cls(_eye(cls.BLOCK, dtype, device).repeat(nb, 1, 1), _eye(r, dtype, device))

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks.unbind(0), self.last)

    def tensors(self) -> dict[str, Tensor]:
        return {"blocks": self.blocks, "last": self.last}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> BlockDiagonalStructure:
        return cls(tensors["blocks"], tensors["last"])

    @property
    def dim(self) -> int:
        return self._split + int(self.last.shape[0])

    def matmul(self, other: Tensor) -> Tensor:
        # written into one output (no concatenation copy): the head rows are a batch of
        # (k, n) slabs, contiguous in ``other`` and in the output alike
        s, nb, k = self._split, self.blocks.shape[0], self.BLOCK
        n = other.shape[1]
        other = other.contiguous()
        out = other.new_empty(other.shape)
        torch.bmm(self.blocks.to(other.dtype), other[:s].view(nb, k, n), out=out[:s].view(nb, k, n))
        torch.mm(self.last.to(other.dtype), other[s:], out=out[s:])
        return out

    def rmatmul(self, other: Tensor, out: Tensor | None = None, work: Tensor | None = None) -> Tensor:
        """``other @ self``; ``out`` (``other``'s shape) and ``work`` (``(n_blocks, rows,
        BLOCK)``) are optional preallocated buffers: fresh multi-megabyte buffers cost page
        faults on every step, as much as the block products themselves."""
        s, nb, k = self._split, self.blocks.shape[0], self.BLOCK
        m = other.shape[0]
        if out is None:
            out = other.new_empty(other.shape)
        x = other[:, :s].reshape(m, nb, k).transpose(0, 1)  # (nb, m, k), strided: no copy
        blocks = self.blocks.to(other.dtype)
        head = torch.bmm(x, blocks) if work is None else torch.bmm(x, blocks, out=work)
        out[:, :s].view(m, nb, k).copy_(head.transpose(0, 1))
        out[:, s:] = other[:, s:] @ self.last.to(other.dtype)
        return out

    def square(self) -> BlockDiagonalStructure:
        """``K Kᵀ``, which is block-diagonal too (``n k³`` work): preconditioning with it
        costs one block product per side instead of two."""
        return type(self)(torch.bmm(self.blocks, self.blocks.transpose(1, 2)), self.last @ self.last.T)

    def trace(self) -> Tensor:
        return self.blocks.diagonal(dim1=1, dim2=2).sum() + self.last.trace()

    def diagonal(self) -> Tensor:
        return torch.cat([self.blocks.diagonal(dim1=1, dim2=2).reshape(-1), self.last.diagonal()])

    def product(self, other: FactorStructure) -> BlockDiagonalStructure:
        assert isinstance(other, BlockDiagonalStructure)
        return type(self)(torch.bmm(self.blocks, other.blocks), self.last @ other.last)

    @classmethod
    def gram(cls, S: Tensor) -> BlockDiagonalStructure:
        k = cls.BLOCK
        d, n = S.shape
        nb = d // k
        s = nb * k
        R = S.T  # SINGD passes S = (X K)ᵀ: its rows R are contiguous; the blocks are R's column slabs
        rb = R[:, :s].reshape(n, nb, k).transpose(0, 1)  # (nb, n, k)
        rl = R[:, s:]
        return cls(torch.bmm(rb.transpose(1, 2), rb), rl.T @ rl)

    def sandwich_gram(self, X: Tensor) -> BlockDiagonalStructure:
        """``Π̂(Kᵀ XᵀX K)`` from the rows ``X`` (``(n, d)``): block ``b`` is
        ``B_bᵀ (X_bᵀ X_b) B_b``, so ``X K`` is never formed (one block product of ``X``
        instead of two)."""
        k = self.BLOCK
        n = X.shape[0]
        s, nb = self._split, int(self.blocks.shape[0])
        xb = X[:, :s].reshape(n, nb, k).transpose(0, 1)  # (nb, n, k), strided: no copy
        xl = X[:, s:]
        blocks, last = self.blocks.to(X.dtype), self.last.to(X.dtype)
        inner = torch.bmm(xb.transpose(1, 2), xb)
        gl = xl.T @ xl
        return type(self)(torch.bmm(blocks.transpose(1, 2), torch.bmm(inner, blocks)), last.T @ gl @ last)

    def inner(self) -> BlockDiagonalStructure:
        return type(self)(torch.bmm(self.blocks.transpose(1, 2), self.blocks), self.last.T @ self.last)

    def add_identity_(self, value: float) -> BlockDiagonalStructure:
        self.blocks.diagonal(dim1=1, dim2=2).add_(value)
        self.last.diagonal().add_(value)
        return self


@cache
def block_diagonal(block: int) -> type[BlockDiagonalStructure]:
    """The block-diagonal structure with blocks of size ``block`` (named
    ``f"block{block}diagonal"``)."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block={block!r} must be an integer >= 1 (the size of the diagonal blocks).")
    if block == BlockDiagonalStructure.BLOCK:
        return BlockDiagonalStructure
    return type(
        f"Block{block}DiagonalStructure", (BlockDiagonalStructure,), {"BLOCK": block, "name": f"block{block}diagonal"}
    )


# ==========================================================================================
# Hierarchical
# ==========================================================================================


class HierarchicalStructure(GroupStructure):
    r"""SINGD's hierarchical structure

    .. math:: K = \begin{pmatrix} A & B_1 & B_2 \\ 0 & \operatorname{diag}(c) & 0 \\ 0 & D & E\end{pmatrix}

    with dense ``A`` (:attr:`K1` × :attr:`K1`) and ``E`` (:attr:`K2` × :attr:`K2`);
    :math:`\hat\Pi`: ``A = M₁₁``, ``B = M_{1,2:3} + M_{2:3,1}ᵀ``, ``c = diag(M₂₂)``,
    ``D = M₃₂ + M₂₃ᵀ``, ``E = M₃₃``. Use :func:`hierarchical` for other sizes.
    """

    K1: ClassVar[int] = 15
    K2: ClassVar[int] = 15
    name = "hierarchical15_15"

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor) -> None:
        k1, k2, m = A.shape[0], E.shape[0], c.shape[0]
        if B.shape != (k1, m + k2) or D.shape != (k2, m) or A.shape != (k1, k1) or E.shape != (k2, k2):
            raise ValueError(
                f"{self.name}: inconsistent shapes A {tuple(A.shape)}, B {tuple(B.shape)}, c {tuple(c.shape)}, "
                f"D {tuple(D.shape)}, E {tuple(E.shape)}."
            )
        self.A, self.B, self.c, self.D, self.E = A, B, c, D, E

    @classmethod
    def _dims(cls, d: int) -> tuple[int, int, int]:
        if d <= cls.K1:
            return d, 0, 0
        if d <= cls.K1 + cls.K2:
            return cls.K1, 0, d - cls.K1
        return cls.K1, d - cls.K1 - cls.K2, cls.K2

    @property
    def _sizes(self) -> tuple[int, int, int]:
        return int(self.A.shape[0]), int(self.c.shape[0]), int(self.E.shape[0])

    @classmethod
    def from_dense(cls, matrix: Tensor) -> HierarchicalStructure:
        k1, m, k2 = cls._dims(matrix.shape[0])
        s = k1 + m
        A = matrix[:k1, :k1].clone()
        B = matrix[:k1, k1:] + matrix[k1:, :k1].T
        c = matrix.diagonal()[k1:s].clone()
        D = matrix[s:, k1:s] + matrix[k1:s, s:].T
        E = matrix[s:, s:].clone()
        return cls(A, B, c, D, E)

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> HierarchicalStructure:
        k1, m, k2 = cls._dims(dim)
        z = torch.zeros
        return cls(
            _eye(k1, dtype, device),
            z(k1, m + k2, dtype=dtype, device=device),
            torch.ones(m, dtype=dtype, device=device),
            z(k2, m, dtype=dtype, device=device),
            _eye(k2, dtype, device),
        )

    def to_dense(self) -> Tensor:
        k1, m, k2 = self._sizes
        out = torch.zeros(self.dim, self.dim, dtype=self.A.dtype, device=self.A.device)
        out[:k1, :k1] = self.A
        out[:k1, k1:] = self.B
        idx = torch.arange(k1, k1 + m, device=self.A.device)
        out[idx, idx] = self.c
        out[k1 + m :, k1 : k1 + m] = self.D
        out[k1 + m :, k1 + m :] = self.E
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {"A": self.A, "B": self.B, "c": self.c, "D": self.D, "E": self.E}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> HierarchicalStructure:
        return cls(tensors["A"], tensors["B"], tensors["c"], tensors["D"], tensors["E"])

    @property
    def dim(self) -> int:
        return sum(self._sizes)

    def _cast(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple(t.to(dtype) for t in (self.A, self.B, self.c, self.D, self.E))

    def matmul(self, other: Tensor) -> Tensor:
        k1, m, k2 = self._sizes
        A, B, c, D, E = self._cast(other.dtype)
        x1, x2, x3 = other.split([k1, m, k2])
        top = A @ x1 + B @ other[k1:]
        return torch.cat([top, c.unsqueeze(1) * x2, D @ x2 + E @ x3])

    def rmatmul(self, other: Tensor) -> Tensor:
        k1, m, k2 = self._sizes
        A, B, c, D, E = self._cast(other.dtype)
        x1, x2, x3 = other.split([k1, m, k2], dim=1)
        B1, B2 = B.split([m, k2], dim=1)
        return torch.cat([x1 @ A, x1 @ B1 + x2 * c + x3 @ D, x1 @ B2 + x3 @ E], dim=1)

    def trace(self) -> Tensor:
        return self.A.trace() + self.c.sum() + self.E.trace()

    def diagonal(self) -> Tensor:
        return torch.cat([self.A.diagonal(), self.c, self.E.diagonal()])

    def product(self, other: FactorStructure) -> HierarchicalStructure:
        assert isinstance(other, HierarchicalStructure)
        k1, m, k2 = self._sizes
        B1, B2 = self.B.split([m, k2], dim=1)
        oB1, oB2 = other.B.split([m, k2], dim=1)
        B_new = torch.cat([self.A @ oB1 + B1 * other.c + B2 @ other.D, self.A @ oB2 + B2 @ other.E], dim=1)
        D_new = self.D * other.c + self.E @ other.D
        return type(self)(self.A @ other.A, B_new, self.c * other.c, D_new, self.E @ other.E)

    @classmethod
    def gram(cls, S: Tensor) -> HierarchicalStructure:
        k1, m, k2 = cls._dims(S.shape[0])
        s1, s2, s3 = S.split([k1, m, k2])
        return cls(s1 @ s1.T, 2 * (s1 @ S[k1:].T), (s2 * s2).sum(1), 2 * (s3 @ s2.T), s3 @ s3.T)

    def inner(self) -> HierarchicalStructure:
        k1, m, k2 = self._sizes
        B1, B2 = self.B.split([m, k2], dim=1)
        A_new = self.A.T @ self.A
        B_new = 2 * (self.A.T @ self.B)
        c_new = self.c * self.c + (B1 * B1).sum(0) + (self.D * self.D).sum(0)
        D_new = 2 * (B2.T @ B1 + self.E.T @ self.D)
        E_new = self.E.T @ self.E + B2.T @ B2
        return type(self)(A_new, B_new, c_new, D_new, E_new)

    def sandwich_gram(self, X: Tensor) -> HierarchicalStructure:
        """``Π̂(Kᵀ XᵀX K)`` from the rows ``X`` (``(n, d)``), from the three column groups of
        ``R = X K`` without concatenating them."""
        k1, m, k2 = self._sizes
        A, B, c, D, E = self._cast(X.dtype)
        B1, B2 = B.split([m, k2], dim=1)
        x1, x2, x3 = X.split([k1, m, k2], dim=1)
        r1 = x1 @ A
        r2 = torch.addmm(torch.addmm(x2 * c, x1, B1), x3, D)
        r3 = torch.addmm(x3 @ E, x1, B2)
        B_new = torch.cat([r1.T @ r2, r1.T @ r3], dim=1).mul_(2)
        return type(self)(r1.T @ r1, B_new, (r2 * r2).sum(0), (r3.T @ r2).mul_(2), r3.T @ r3)

    def square(self) -> HierarchicalSquare:
        """``K Kᵀ``: a diagonal ``c²`` on the middle indices plus a dense border on the
        ``K1 + K2`` corner indices (an arrowhead), which halves the work of applying ``K``
        and ``Kᵀ`` in turn."""
        k1, m, k2 = self._sizes
        B1, B2 = self.B.split([m, k2], dim=1)
        P11 = self.A @ self.A.T + B1 @ B1.T + B2 @ B2.T
        P13 = B1 @ self.D.T + B2 @ self.E.T
        P33 = self.D @ self.D.T + self.E @ self.E.T
        border = torch.cat([torch.cat([P11, P13], 1), torch.cat([P13.T, P33], 1)])
        return HierarchicalSquare(k1, m, border, torch.cat([B1 * self.c, self.D * self.c]), self.c * self.c)

    def add_identity_(self, value: float) -> HierarchicalStructure:
        self.A.diagonal().add_(value)
        self.c.add_(value)
        self.E.diagonal().add_(value)
        return self


class HierarchicalSquare:
    """The symmetric ``P = K Kᵀ`` of a hierarchical ``K`` (see
    :meth:`HierarchicalStructure.square`): with ``b`` the corner indices (first ``k1`` and
    last ``k2``) and ``2`` the middle ones, ``P_bb = border``, ``P_b2 = cross``, ``P_22 =
    diag(mid)``."""

    def __init__(self, k1: int, m: int, border: Tensor, cross: Tensor, mid: Tensor) -> None:
        self.k1, self.m = k1, m
        self.border, self.cross, self.mid = border, cross, mid

    def rmatmul(self, x: Tensor) -> Tensor:
        """``x P`` for ``x`` of shape ``(rows, d)``."""
        k1, s = self.k1, self.k1 + self.m
        border, cross, mid = (t.to(x.dtype) for t in (self.border, self.cross, self.mid))
        xb = torch.cat([x[:, :k1], x[:, s:]], dim=1)
        x2 = x[:, k1:s]
        out = x.new_empty(x.shape)
        yb = torch.addmm(x2 @ cross.T, xb, border)
        out[:, :k1], out[:, s:] = yb[:, :k1], yb[:, k1:]
        middle = out[:, k1:s]  # written in place (row stride d): no temporary and no copy
        torch.mul(x2, mid, out=middle)
        middle.addmm_(xb, cross)
        return out

    def matmul(self, x: Tensor) -> Tensor:
        """``P x`` for ``x`` of shape ``(d, cols)``."""
        k1, s = self.k1, self.k1 + self.m
        border, cross, mid = (t.to(x.dtype) for t in (self.border, self.cross, self.mid))
        xb = torch.cat([x[:k1], x[s:]])
        x2 = x[k1:s]
        out = x.new_empty(x.shape)
        yb = torch.addmm(cross @ x2, border, xb)
        out[:k1], out[s:] = yb[:k1], yb[k1:]
        middle = out[k1:s]  # contiguous rows, written in place
        torch.mul(x2, mid.unsqueeze(1), out=middle)
        middle.addmm_(cross.T, xb)
        return out


@cache
def hierarchical(k1: int, k2: int) -> type[HierarchicalStructure]:
    """The hierarchical structure with dense corner blocks of sizes ``k1`` and ``k2``
    (named ``f"hierarchical{k1}_{k2}"``)."""
    for name, v in (("k1", k1), ("k2", k2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1 (a corner block size).")
    if (k1, k2) == (HierarchicalStructure.K1, HierarchicalStructure.K2):
        return HierarchicalStructure
    return type(
        f"Hierarchical{k1}_{k2}Structure",
        (HierarchicalStructure,),
        {"K1": k1, "K2": k2, "name": f"hierarchical{k1}_{k2}"},
    )


# ==========================================================================================
# Triangular Toeplitz
# ==========================================================================================


@cache
def _fft_len(d: int) -> int:
    """The smallest ``2^a 3^b 5^c >= 2d − 1`` (no wrap-around into the first ``d`` outputs
    of a circular convolution; smooth sizes are 1.5–2× faster than the next power of two)."""
    target = max(1, 2 * d - 1)
    best = 1 << (target - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            n = p35
            while n < target:
                n *= 2
            best = min(best, n)
            p35 *= 3
        p5 *= 5
    return best


def _conv_last(v: Tensor, x: Tensor, lower: bool) -> Tensor:
    """Along the last axis of ``x`` (length ``d``): ``y_i = Σ_{j ≤ i} v[i−j] x_j`` (``lower``:
    a lower-triangular Toeplitz product) or ``y_i = Σ_{j ≥ i} v[j−i] x_j`` (upper). FFTs run
    along the last (contiguous) axis, in float32 for half-precision inputs."""
    d = v.shape[0]
    if d == 0:
        return x.clone()
    ct = _compute_dtype(torch.promote_types(v.dtype, x.dtype))
    n = _fft_len(d)
    vf = torch.fft.rfft(v.to(ct), n=n)
    if not lower:  # correlation: v[(j − i) mod n], zero where it wraps since n >= 2d − 1
        vf = vf.conj()
    f = torch.fft.rfft(x.to(ct), n=n, dim=-1)
    y = torch.fft.irfft(f.mul_(vf), n=n, dim=-1)[..., :d]  # in place: one spectrum-sized buffer less
    return y.to(x.dtype)


def _sandwich(v: Tensor, x: Tensor, lower: bool, dim: int) -> Tensor:
    """``T Tᵀ`` applied to the vectors along axis ``dim`` of ``x`` (``T``: the lower-triangular
    Toeplitz matrix of ``v`` if ``lower``, else the upper one): ``Tᵀ`` first, truncation to
    ``d``, then ``T``, with one spectrum of ``v`` for both products. ``dim = -1`` gives
    ``x T Tᵀ`` for a 2-D ``x`` (``T Tᵀ`` is symmetric), ``dim = 0`` gives ``T Tᵀ x``."""
    d = v.shape[0]
    if d == 0:
        return x.clone()
    ct = _compute_dtype(torch.promote_types(v.dtype, x.dtype))
    n = _fft_len(d)
    vf = torch.fft.rfft(v.to(ct), n=n)
    shape = [1] * x.ndim
    shape[dim] = vf.shape[0]
    vf = vf.reshape(shape)
    first, second = (vf.conj(), vf) if lower else (vf, vf.conj())
    y = torch.fft.irfft(torch.fft.rfft(x.to(ct), n=n, dim=dim).mul_(first), n=n, dim=dim).narrow(dim, 0, d)
    z = torch.fft.irfft(torch.fft.rfft(y, n=n, dim=dim).mul_(second), n=n, dim=dim).narrow(dim, 0, d)
    return z.to(x.dtype)


def _causal(v: Tensor, x: Tensor) -> Tensor:
    """``y_i = Σ_{j ≤ i} v[i−j] x_j`` along dim 0 (a lower-triangular Toeplitz product)."""
    return _conv_last(v, x.movedim(0, -1), lower=True).movedim(-1, 0)


def _diag_sums(S: Tensor) -> Tensor:
    """``t_j = Σ_i (S Sᵀ)_{i+j, i}`` for ``j = 0..d−1`` (autocorrelation of the rows)."""
    d = S.shape[0]
    ct = _compute_dtype(S.dtype)
    n = _fft_len(d)
    f = torch.view_as_real(torch.fft.rfft(S.T.to(ct), n=n, dim=-1))  # along the rows' axis
    power = f.square().sum(0).sum(-1)  # over rows first: contiguous reductions (10× faster than dim=(0, 2))
    return torch.fft.irfft(power, n=n)[:d].to(S.dtype)


class _Toeplitz(GroupStructure):
    LOWER: ClassVar[bool] = True

    def __init__(self, diags: Tensor) -> None:
        if diags.ndim != 1:
            raise ValueError(f"a {self.name} factor is stored as its {1}-D diagonal values, got {tuple(diags.shape)}.")
        self.diags = diags

    @classmethod
    def _from_sums(cls, t: Tensor) -> _Toeplitz:
        """From ``t_j`` = sum of the ``j``-th sub- plus super-diagonal (``t_0``: main)."""
        d = t.shape[0]
        counts = torch.arange(d, 0, -1, dtype=t.dtype, device=t.device)
        return cls(t / counts)

    @classmethod
    def from_dense(cls, matrix: Tensor) -> _Toeplitz:
        d = matrix.shape[0]
        t = (
            torch.stack([matrix.diagonal(-j).sum() + (matrix.diagonal(j).sum() if j else 0) for j in range(d)])
            if d
            else (matrix.new_zeros(0))
        )
        return cls._from_sums(t)

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> _Toeplitz:
        v = torch.zeros(dim, dtype=dtype, device=device)
        if dim:
            v[0] = 1
        return cls(v)

    def to_dense(self) -> Tensor:
        d = self.dim
        i = torch.arange(d, device=self.diags.device)
        lag = i.unsqueeze(1) - i.unsqueeze(0)  # i - j
        if not self.LOWER:
            lag = -lag
        out = self.diags[lag.clamp(min=0)]
        return torch.where(lag >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def tensors(self) -> dict[str, Tensor]:
        return {"diags": self.diags}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> _Toeplitz:
        return cls(tensors["diags"])

    @property
    def dim(self) -> int:
        return int(self.diags.shape[0])

    def matmul(self, other: Tensor) -> Tensor:
        # K X along X's columns: convolve the rows of Xᵀ (the FFTs run along the last axis)
        return _conv_last(self.diags, other.T, self.LOWER).T

    def rmatmul(self, other: Tensor) -> Tensor:
        # X K = (Kᵀ Xᵀ)ᵀ, Kᵀ is the mirrored Toeplitz matrix: along the last axis of X
        return _conv_last(self.diags, other, not self.LOWER)

    def square_right(self, x: Tensor) -> Tensor:
        """``x K Kᵀ`` (two FFT products along ``x``'s rows, one spectrum of ``K``)."""
        # x K = (Kᵀ xᵀ)ᵀ, then (x K) Kᵀ = (K (x K)ᵀ)ᵀ: along the last axis, Kᵀ then K
        return _sandwich(self.diags, x, self.LOWER, dim=-1)

    def square_left(self, x: Tensor) -> Tensor:
        """``K Kᵀ x`` (along ``x``'s columns; FFTs along a strided axis are 1.5–2× slower than
        along the contiguous one, so ``xᵀ`` is copied once and the result is returned as a
        transposed view)."""
        return _sandwich(self.diags, x.T.contiguous(), self.LOWER, dim=-1).T

    def trace(self) -> Tensor:
        return self.diags[:1].sum() * self.dim

    def diagonal(self) -> Tensor:
        return self.diags[:1].expand(self.dim).clone() if self.dim else self.diags.clone()

    def product(self, other: FactorStructure) -> _Toeplitz:
        assert isinstance(other, _Toeplitz)
        # triangular Toeplitz matrices commute; the product's values are a causal convolution
        return type(self)(_causal(self.diags, other.diags.to(self.diags.dtype)))

    @classmethod
    def gram(cls, S: Tensor) -> _Toeplitz:
        t = _diag_sums(S)
        return cls._from_sums(torch.cat([t[:1], 2 * t[1:]]))

    def inner(self) -> _Toeplitz:
        # t_j = Σ_{q ≥ j} (d − q) v_q v_{q−j}, for Kᵀ K and K Kᵀ alike
        v, d = self.diags, self.dim
        if d == 0:
            return type(self)(v.clone())
        w = torch.arange(d, 0, -1, dtype=v.dtype, device=v.device) * v
        ct = _compute_dtype(v.dtype)
        n = _fft_len(d)
        t = torch.fft.irfft(torch.fft.rfft(w.to(ct), n=n) * torch.fft.rfft(v.to(ct), n=n).conj(), n=n)[:d].to(v.dtype)
        return type(self)._from_sums(torch.cat([t[:1], 2 * t[1:]]))

    def frobenius_norm(self) -> Tensor:
        counts = torch.arange(self.dim, 0, -1, dtype=self.diags.dtype, device=self.diags.device)
        return torch.sqrt((counts * self.diags * self.diags).sum())

    def add_identity_(self, value: float) -> _Toeplitz:
        if self.dim:
            self.diags[0] += value
        return self


class TrilToeplitzStructure(_Toeplitz):
    """Lower-triangular Toeplitz (``d`` values, one per sub-diagonal); :math:`\\hat\\Pi`:
    the mean of the main diagonal, and for ``j ≥ 1`` the sum of the ``j``-th sub- and
    super-diagonals over their length (2 × the mean of the sub-diagonal for a symmetric ``M``)."""

    name = "triltoeplitz"
    LOWER = True


class TriuToeplitzStructure(_Toeplitz):
    """Upper-triangular Toeplitz; the mirror of :class:`TrilToeplitzStructure`."""

    name = "triutoeplitz"
    LOWER = False


# ==========================================================================================
# Rank-1 triangular: a diagonal plus one dense row or column
# ==========================================================================================


class _DiagPlusLine(GroupStructure):
    """A diagonal plus the off-diagonal part of one row (``AXIS = "row"``) or column
    (``AXIS = "col"``), the first (``AT = 0``) or last (``AT = -1``) one."""

    AXIS: ClassVar[str] = "row"
    AT: ClassVar[int] = -1

    def __init__(self, diag: Tensor, off: Tensor) -> None:
        if diag.ndim != 1 or off.shape != (max(diag.shape[0] - 1, 0),):
            raise ValueError(
                f"{self.name}: diag (d,) and off (d-1,) expected, got {tuple(diag.shape)}, {tuple(off.shape)}."
            )
        self.diag, self.off = diag, off

    @classmethod
    def _line(cls, d: int) -> tuple[int, slice]:
        """(index of the dense row/column, slice of the other indices)."""
        if cls.AT == 0:
            return 0, slice(1, d)
        return d - 1, slice(0, max(d - 1, 0))

    @classmethod
    def from_dense(cls, matrix: Tensor) -> _DiagPlusLine:
        d = matrix.shape[0]
        r, rest = cls._line(d)
        if d == 0:
            return cls(matrix.diagonal().clone(), matrix.new_zeros(0))
        off = matrix[r, rest] + matrix[rest, r]
        return cls(matrix.diagonal().clone(), off)

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> _DiagPlusLine:
        return cls(
            torch.ones(dim, dtype=dtype, device=device), torch.zeros(max(dim - 1, 0), dtype=dtype, device=device)
        )

    def to_dense(self) -> Tensor:
        d = self.dim
        out = torch.diag(self.diag)
        if d > 1:
            r, rest = self._line(d)
            if self.AXIS == "row":
                out[r, rest] = self.off
            else:
                out[rest, r] = self.off
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {"diag": self.diag, "off": self.off}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> _DiagPlusLine:
        return cls(tensors["diag"], tensors["off"])

    @property
    def dim(self) -> int:
        return int(self.diag.shape[0])

    def matmul(self, other: Tensor) -> Tensor:
        dg, off = self.diag.to(other.dtype), self.off.to(other.dtype)
        out = dg.unsqueeze(1) * other
        if self.dim > 1:
            r, rest = self._line(self.dim)
            if self.AXIS == "row":
                out[r] += off @ other[rest]
            else:
                out[rest] += off.unsqueeze(1) * other[r]
        return out

    def rmatmul(self, other: Tensor) -> Tensor:
        dg, off = self.diag.to(other.dtype), self.off.to(other.dtype)
        out = other * dg
        if self.dim > 1:
            r, rest = self._line(self.dim)
            if self.AXIS == "row":
                out[:, rest] += other[:, r : r + 1] * off
            else:
                out[:, r] += other[:, rest] @ off
        return out

    def trace(self) -> Tensor:
        return self.diag.sum()

    def diagonal(self) -> Tensor:
        return self.diag.clone()

    def product(self, other: FactorStructure) -> _DiagPlusLine:
        assert isinstance(other, _DiagPlusLine)
        d = self.dim
        if d <= 1:
            return type(self)(self.diag * other.diag, self.off.clone())
        r, rest = self._line(d)
        # (D₁ + N₁)(D₂ + N₂) with N₁N₂ = 0: row line e_r bᵀ, column line b e_rᵀ
        if self.AXIS == "row":
            off = self.diag[r] * other.off + self.off * other.diag[rest]
        else:
            off = self.diag[rest] * other.off + self.off * other.diag[r]
        return type(self)(self.diag * other.diag, off)

    @classmethod
    def gram(cls, S: Tensor) -> _DiagPlusLine:
        d = S.shape[0]
        diag = (S * S).sum(1)
        if d <= 1:
            return cls(diag, S.new_zeros(0))
        r, rest = cls._line(d)
        return cls(diag, 2 * (S[rest] @ S[r]))

    def inner(self) -> _DiagPlusLine:
        d = self.dim
        diag = self.diag * self.diag
        if d <= 1:
            return type(self)(diag, self.off.clone())
        r, rest = self._line(d)
        if self.AXIS == "row":
            diag = diag.clone()
            diag[rest] += self.off * self.off
            off = 2 * self.diag[r] * self.off
        else:
            diag = diag.clone()
            diag[r] += (self.off * self.off).sum()
            off = 2 * self.diag[rest] * self.off
        return type(self)(diag, off)

    def add_identity_(self, value: float) -> _DiagPlusLine:
        self.diag.add_(value)
        return self


class TrilTopLeftDiagStructure(_DiagPlusLine):
    """Lower-triangular: a diagonal plus a dense last row (singd's
    ``TrilTopLeftDiagonalMatrix``)."""

    name = "triltopleftdiag"
    AXIS, AT = "row", -1


class TrilBottomRightDiagStructure(_DiagPlusLine):
    """Lower-triangular: a diagonal plus a dense first column (singd's
    ``TrilBottomRightDiagonalMatrix``)."""

    name = "trilbottomrightdiag"
    AXIS, AT = "col", 0


class TriuTopLeftDiagStructure(_DiagPlusLine):
    """Upper-triangular: a diagonal plus a dense last column (singd's
    ``TriuTopLeftDiagonalMatrix``)."""

    name = "triutopleftdiag"
    AXIS, AT = "col", -1


class TriuBottomRightDiagStructure(_DiagPlusLine):
    """Upper-triangular: a diagonal plus a dense first row (singd's
    ``TriuBottomRightDiagonalMatrix``)."""

    name = "triubottomrightdiag"
    AXIS, AT = "row", 0


def bundled_structures() -> list[type[FactorStructure]]:
    """The structures this plugin registers (dense and diagonal are curvkit's own)."""
    return [
        BlockDiagonalStructure,
        HierarchicalStructure,
        TrilStructure,
        TriuStructure,
        TrilToeplitzStructure,
        TriuToeplitzStructure,
        TrilTopLeftDiagStructure,
        TrilBottomRightDiagStructure,
        TriuTopLeftDiagStructure,
        TriuBottomRightDiagStructure,
    ]


_BLOCK = re.compile(r"^block(\d+)diagonal$")
_HIER = re.compile(r"^hierarchical(\d+)_(\d+)$")


def resolve_structure(name: str, registry: Any) -> type[FactorStructure]:
    """A registered structure by name; ``block{k}diagonal`` and ``hierarchical{k1}_{k2}``
    also build their parameterised classes for any sizes."""
    if name in registry.structures:
        return registry.structures.get(name)  # type: ignore[no-any-return]
    m = _BLOCK.match(name)
    if m:
        return block_diagonal(int(m.group(1)))
    m = _HIER.match(name)
    if m:
        return hierarchical(int(m.group(1)), int(m.group(2)))
    return registry.structures.get(name)  # type: ignore[no-any-return]  # raises, listing the names


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
    return cls.from_dense(S @ S.T)


def s_inner(k: FactorStructure) -> FactorStructure:
    if isinstance(k, GroupStructure):
        return k.inner()
    if isinstance(k, DiagonalStructure):
        return DiagonalStructure(k.diag * k.diag)
    if isinstance(k, DenseStructure):
        return DenseStructure(k.matrix.T @ k.matrix)
    k._fallback("inner")
    d = k.to_dense()
    return type(k).from_dense(d.T @ d)


def s_add_(k: FactorStructure, m: FactorStructure, alpha: float = 1.0) -> FactorStructure:
    theirs = m.tensors()
    for name, t in k.tensors().items():
        t.add_(theirs[name].to(t.dtype), alpha=alpha)
    return k


def s_scale_(k: FactorStructure, value: float) -> FactorStructure:
    for t in k.tensors().values():
        t.mul_(value)
    return k


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


def s_clone(k: FactorStructure) -> FactorStructure:
    return type(k).from_tensors({n: t.clone() for n, t in k.tensors().items()})


def s_average_trace(k: FactorStructure) -> float:
    d = k.dim
    return float(k.trace()) / d if d else 0.0
