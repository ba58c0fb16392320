"""Triangular structures: dense lower/upper triangles, and a diagonal plus one row or
column (the ``singd`` package's rank-1 triangular classes)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.structures.base import DenseStructure, FactorStructure
from curvkit_singd.structures.base import GroupStructure

# ==========================================================================================
# Triangular (dense lower / upper)
# ==========================================================================================


class _Triangular(DenseStructure, GroupStructure):
    """A dense triangle stored as a full matrix: storage, products with tensors, trace and
    diagonal are :class:`~curvkit.structures.DenseStructure`'s; the projection and the
    group operations are the triangle's."""

    LOWER: ClassVar[bool] = True

    @classmethod
    def _part(cls, m: Tensor, offset: int) -> Tensor:
        return torch.tril(m, -offset) if cls.LOWER else torch.triu(m, offset)

    @classmethod
    def from_dense(cls, matrix: Tensor) -> _Triangular:
        tri = cls._part(matrix, 1) + cls._part(matrix.T, 1) + torch.diag(matrix.diagonal())
        return cls(tri)

    # both bases define these two; the dense ones apply, typed as this structure
    @classmethod
    def zeros(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> _Triangular:
        return cls(torch.zeros(dim, dim, dtype=dtype, device=device))

    def ema_(self, other: FactorStructure, decay: float) -> _Triangular:
        DenseStructure.ema_(self, other, decay)
        return self

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
