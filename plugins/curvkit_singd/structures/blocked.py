"""Block structures: block-diagonal and hierarchical (SINGD's ``block{k}diagonal`` and
``hierarchical{k1}_{k2}``)."""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.structures.base import FactorStructure
from curvkit_singd.structures.base import GroupStructure, _eye

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
        # the wide middle group in one fresh tensor, accumulated and finally squared in place
        r2 = torch.mul(x2, c).addmm_(x1, B1).addmm_(x3, D)
        r3 = torch.addmm(x3 @ E, x1, B2)
        B_new = torch.cat([r1.T @ r2, r1.T @ r3], dim=1).mul_(2)
        D_new = (r3.T @ r2).mul_(2)
        return type(self)(r1.T @ r1, B_new, r2.square_().sum(0), D_new, r3.T @ r3)

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

    def rmatmul(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``x P`` for ``x`` of shape ``(rows, d)`` (into ``out`` if given, not ``x``)."""
        k1, s = self.k1, self.k1 + self.m
        border, cross, mid = (t.to(x.dtype) for t in (self.border, self.cross, self.mid))
        xb = torch.cat([x[:, :k1], x[:, s:]], dim=1)
        x2 = x[:, k1:s]
        out = x.new_empty(x.shape) if out is None else out
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
