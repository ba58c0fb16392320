r"""Factor structures: how a symmetric Kronecker factor (or an inverse root) is stored.

A structure is a subspace of ``d × d`` matrices together with a projection onto it. An
instance holds the structure's parameters (for :class:`DenseStructure` the whole matrix,
for :class:`DiagonalStructure` its diagonal) and offers the operations methods need
directly on them, so a sparse structure never has to materialise a dense matrix.

The contract, in the spirit of the ``singd`` package's ``StructuredMatrix``: a new
structure implements :meth:`FactorStructure.from_dense` (the projection) and
:meth:`FactorStructure.to_dense`, and every other operation falls back to a dense
computation that **warns** the first time it is used, so a structure can be correct first
and fast later. The fast paths of the bundled structures never warn.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.numerics import all_finite

__all__ = ["DenseStructure", "DiagonalStructure", "FactorStructure", "StructureFallbackWarning"]


class StructureFallbackWarning(UserWarning):
    """An operation on a structure went through a dense matrix (no fast path)."""


_WARNED: set[tuple[str, str]] = set()


class FactorStructure(ABC):
    """A structured ``d × d`` matrix.

    Subclasses set :attr:`name` (the registered name) and implement :meth:`from_dense`,
    :meth:`to_dense`, :meth:`tensors` and :meth:`from_tensors`; they override the other
    methods with fast paths.
    """

    name: ClassVar[str] = ""
    #: True when the matrix is diagonal (inverters then skip decompositions).
    is_diagonal: ClassVar[bool] = False

    # --- the contract --------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_dense(cls, matrix: Tensor) -> FactorStructure:
        """Project a dense symmetric ``(d, d)`` matrix onto the structure."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The ``(d, d)`` matrix."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The parameters, by name (what a ``state_dict`` stores)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> FactorStructure:
        """Inverse of :meth:`tensors`."""

    # --- operations with dense fallbacks -------------------------------------------------

    def _fallback(self, op: str) -> None:
        key = (type(self).__name__, op)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"{type(self).__name__}.{op} has no fast path and goes through a dense "
                f"{self.dim}×{self.dim} matrix; implement {op} on the structure to avoid it.",
                StructureFallbackWarning,
                stacklevel=3,
            )

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> FactorStructure:
        """The identity matrix in this structure."""
        return cls.from_dense(torch.eye(dim, dtype=dtype, device=device))

    @classmethod
    def zeros(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> FactorStructure:
        """The zero matrix in this structure."""
        return cls.from_dense(torch.zeros(dim, dim, dtype=dtype, device=device))

    @property
    def dim(self) -> int:
        return int(self.to_dense().shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored parameters."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def matmul(self, other: Tensor) -> Tensor:
        """``self @ other`` for a ``(d, k)`` tensor."""
        self._fallback("matmul")
        return self.to_dense().to(other.dtype) @ other

    def rmatmul(self, other: Tensor) -> Tensor:
        """``other @ self`` for a ``(k, d)`` tensor."""
        self._fallback("rmatmul")
        return other @ self.to_dense().to(other.dtype)

    def trace(self) -> Tensor:
        self._fallback("trace")
        return self.to_dense().trace()

    def diagonal(self) -> Tensor:
        self._fallback("diagonal")
        return self.to_dense().diagonal().clone()

    def ema_(self, other: FactorStructure, decay: float) -> FactorStructure:
        """In place: ``self ← decay · self + (1 − decay) · other``."""
        self._fallback("ema_")
        mixed = type(self).from_dense(decay * self.to_dense() + (1 - decay) * other.to_dense())
        self._assign(mixed)
        return self

    def _assign(self, other: FactorStructure) -> None:
        for name, value in other.tensors().items():
            self.tensors()[name].copy_(value)

    def is_finite(self) -> bool:
        return all(all_finite(t) for t in self.tensors().values())

    def to(self, dtype: torch.dtype) -> FactorStructure:
        """A copy in another dtype."""
        return type(self).from_tensors({k: v.to(dtype) for k, v in self.tensors().items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype})"


class DenseStructure(FactorStructure):
    """A full symmetric matrix; the projection is the identity."""

    name = "dense"

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense factor must be a square matrix, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix

    @classmethod
    def from_dense(cls, matrix: Tensor) -> DenseStructure:
        return cls(matrix)

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> DenseStructure:
        return cls(torch.eye(dim, dtype=dtype, device=device))

    @classmethod
    def zeros(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> DenseStructure:
        return cls(torch.zeros(dim, dim, dtype=dtype, device=device))

    def to_dense(self) -> Tensor:
        return self.matrix

    def tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> DenseStructure:
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

    def ema_(self, other: FactorStructure, decay: float) -> DenseStructure:
        self.matrix.mul_(decay).add_(other.to_dense().to(self.matrix.dtype), alpha=1 - decay)
        return self


class DiagonalStructure(FactorStructure):
    """A diagonal matrix, stored as its diagonal; the projection keeps the diagonal."""

    name = "diagonal"
    is_diagonal = True

    def __init__(self, diag: Tensor) -> None:
        if diag.ndim != 1:
            raise ValueError(f"a diagonal factor is stored as a vector, got shape {tuple(diag.shape)}.")
        self.diag = diag

    @classmethod
    def from_dense(cls, matrix: Tensor) -> DiagonalStructure:
        return cls(matrix.diagonal().clone())

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> DiagonalStructure:
        return cls(torch.ones(dim, dtype=dtype, device=device))

    @classmethod
    def zeros(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> DiagonalStructure:
        return cls(torch.zeros(dim, dtype=dtype, device=device))

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    def tensors(self) -> dict[str, Tensor]:
        return {"diag": self.diag}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> DiagonalStructure:
        return cls(tensors["diag"])

    @property
    def dim(self) -> int:
        return int(self.diag.shape[0])

    def matmul(self, other: Tensor) -> Tensor:
        return self.diag.to(other.dtype).unsqueeze(1) * other

    def rmatmul(self, other: Tensor) -> Tensor:
        return other * self.diag.to(other.dtype)

    def trace(self) -> Tensor:
        return self.diag.sum()

    def diagonal(self) -> Tensor:
        return self.diag.clone()

    def ema_(self, other: FactorStructure, decay: float) -> DiagonalStructure:
        self.diag.mul_(decay).add_(other.diagonal().to(self.diag.dtype), alpha=1 - decay)
        return self
