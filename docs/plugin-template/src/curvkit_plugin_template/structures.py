r"""A factor structure: a scalar times the identity, :math:`F \approx c\,I_d`.

The projection of a symmetric matrix :math:`M` onto :math:`\{c I\}` (in the Frobenius
norm) is :math:`c = \operatorname{tr}(M)/d`, so the structure keeps a factor's average
eigenvalue and forgets everything else. With it, a Kronecker factor costs one number of
memory and its inverse is a division; K-FAC with a scaled-identity ``A`` preconditions
only the output side of a layer.

A structure must implement four things — :meth:`from_dense` (the projection),
:meth:`to_dense`, :meth:`tensors` and :meth:`from_tensors`. Everything else has a dense
fallback in :class:`~curvkit.structures.FactorStructure` that warns the first time it is
used; the fast paths below replace them, so this structure never forms a ``d × d`` matrix
in a training step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvkit.structures import FactorStructure

__all__ = ["ScaledIdentityStructure"]


class ScaledIdentityStructure(FactorStructure):
    """``c · I`` of size ``d``, stored as the scalar ``c`` (and ``d``)."""

    #: Registered name; unique across all plugins, so prefix it with your plugin's name.
    name = "template_scaled_identity"
    #: Diagonal: inverters use :meth:`diagonal` instead of a decomposition.
    is_diagonal = True

    def __init__(self, scale: Tensor, dim: int) -> None:
        if scale.ndim != 0:
            raise ValueError(f"the scale of a scaled identity is a 0-d tensor, got shape {tuple(scale.shape)}.")
        self.scale = scale
        self._dim = int(dim)

    # --- the contract --------------------------------------------------------------------

    @classmethod
    def from_dense(cls, matrix: Tensor) -> ScaledIdentityStructure:
        d = matrix.shape[0]
        return cls(matrix.diagonal().sum() / d, d)

    def to_dense(self) -> Tensor:
        return self.scale * torch.eye(self._dim, dtype=self.scale.dtype, device=self.scale.device)

    def tensors(self) -> dict[str, Tensor]:
        # Everything from_tensors needs, as tensors (what a state_dict stores). The scale
        # comes first: FactorStructure.dtype is the dtype of the first tensor.
        return {"scale": self.scale, "dim": torch.tensor(self._dim)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> ScaledIdentityStructure:
        return cls(tensors["scale"], int(tensors["dim"]))

    # --- fast paths ----------------------------------------------------------------------

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> ScaledIdentityStructure:
        return cls(torch.ones((), dtype=dtype, device=device), dim)

    @classmethod
    def zeros(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> ScaledIdentityStructure:
        return cls(torch.zeros((), dtype=dtype, device=device), dim)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def nbytes(self) -> int:
        return self.scale.element_size()

    def matmul(self, other: Tensor) -> Tensor:
        return self.scale.to(other.dtype) * other

    def rmatmul(self, other: Tensor) -> Tensor:
        return other * self.scale.to(other.dtype)

    def trace(self) -> Tensor:
        return self.scale * self._dim

    def diagonal(self) -> Tensor:
        return self.scale.expand(self._dim).clone()

    def ema_(self, other: FactorStructure, decay: float) -> ScaledIdentityStructure:
        # self <- decay * self + (1 - decay) * other; other's average eigenvalue is all we keep.
        self.scale.mul_(decay).add_(other.trace().to(self.scale.dtype) / self._dim, alpha=1 - decay)
        return self

    def to(self, dtype: torch.dtype) -> ScaledIdentityStructure:
        return ScaledIdentityStructure(self.scale.to(dtype), self._dim)
