r"""The block of a unit-wise layer (a normalisation layer) in a curvature operator.

A normalisation layer with ``D`` units has the exact per-unit curvature
``blockdiag(F_1, …, F_D)`` (:class:`~curvkit.stats.backend.UnitwiseFactors`): ``F_i`` is the
``k × k`` block of unit ``i``'s ``(γ_i, β_i)`` (``k = 2``) or ``γ_i`` (``k = 1``). As a
block of :class:`~curvkit.laplace.KroneckerCurvature` it acts on the block matrix

.. math:: V = [\,\gamma\;\; \beta\,] \in \mathbb{R}^{D \times k}

(``γ.flatten()`` and ``β.flatten()`` as columns), row ``i`` by ``F_i``. Its spectral
quantities are exact and cheap: one batched ``k × k`` eigendecomposition
:math:`F_i = Q_i\,\mathrm{diag}(\lambda_i)\,Q_i^\top` gives the spectrum ``(D, k)``, and any
function of the block (plus a prior) is applied unit by unit in that basis. There is
nothing to factor, so a prior is always added exactly (``prior_mode="factored"`` makes no
difference here), and EKFAC's eigenvalue correction leaves the block as it is (it is exact
already).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["UnitwiseBlock", "UnitwiseEigen"]


@dataclass(frozen=True)
class UnitwiseEigen:
    """``F_i = Q_i diag(λ_i) Q_iᵀ`` for every unit: ``Q`` ``(D, k, k)``, ``lam`` ``(D, k)``."""

    Q: Tensor
    lam: Tensor


@dataclass(frozen=True)
class UnitwiseBlock:
    """The exact per-unit block ``blockdiag(F_i)`` of a normalisation layer.

    Attributes:
        name: The layer's name (``"<layer>.weight"``/``".bias"`` when split).
        param_names: Names of the parameters it covers (scale first), in flat order.
        param_shapes: Their shapes; each has ``D`` elements.
        F: ``(D, k, k)`` with ``k = len(param_names)``, symmetric positive semi-definite.
        index: ``(D, k)`` positions of the block matrix's entries among the block's
            parameters (``None``: each parameter a column), as
            :attr:`curvkit.laplace.KroneckerBlock.index`.
        layer, columns: The tracked layer and the columns of its ``(D, k)`` matrix this block
            covers.
    """

    name: str
    param_names: tuple[str, ...]
    param_shapes: tuple[torch.Size, ...]
    F: Tensor
    index: Tensor | None = None
    layer: str | None = None
    columns: tuple[int, int] | None = None

    #: Never set: the blocks are exact (see the module docstring).
    corrected_eigenvalues: None = None

    def __post_init__(self) -> None:
        if self.F.ndim != 3 or self.F.shape[1] != self.F.shape[2]:
            raise ValueError(f"block {self.name!r}: F must have shape (D, k, k), got {tuple(self.F.shape)}.")
        d, k = self.F.shape[0], self.F.shape[1]
        if self.index is not None and tuple(self.index.shape) != (d, k):
            raise ValueError(f"block {self.name!r}: index must have shape {(d, k)}, got {tuple(self.index.shape)}.")
        if len(self.param_shapes) != k or any(s.numel() != d for s in self.param_shapes):
            raise ValueError(
                f"block {self.name!r}: parameter shapes {[tuple(s) for s in self.param_shapes]} do not match F "
                f"{tuple(self.F.shape)}; a unit-wise block needs k={k} parameters of D={d} elements each."
            )

    # --- layout -------------------------------------------------------------------------

    @property
    def d_out(self) -> int:
        """``D``, the number of units (rows of the block matrix)."""
        return self.F.shape[0]

    @property
    def k(self) -> int:
        return self.F.shape[1]

    @property
    def numel(self) -> int:
        return self.d_out * self.k

    @property
    def dtype(self) -> torch.dtype:
        return self.F.dtype

    @property
    def device(self) -> torch.device:
        return self.F.device

    def tensors(self) -> list[Tensor]:
        """The tensors that define the block (for finiteness checks)."""
        return [self.F]

    def to_matrix(self, x: Tensor) -> Tensor:
        """Flat rows ``(numel, K)`` (each parameter flattened, scale first) to ``(K, D, k)``."""
        return x.reshape(self.k, self.d_out, x.shape[1]).permute(2, 1, 0)

    def from_matrix(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`to_matrix`: ``(K, D, k)`` to flat rows ``(numel, K)``."""
        return v.permute(2, 1, 0).reshape(self.numel, v.shape[0])

    def flat_to_matrix_index(self) -> Tensor:
        """For each flat position, its index in ``vec_r(V)``."""
        idx = torch.arange(self.numel, device=self.F.device).view(1, self.d_out, self.k)
        return self.from_matrix(idx)[:, 0]

    def local_index(self) -> Tensor:
        """``(D, k)``: each entry of ``V``'s position among the block's own parameters,
        concatenated and flattened (:attr:`index`, or the default layout)."""
        if self.index is not None:
            return self.index
        return self.to_matrix(torch.arange(self.numel, device=self.F.device).unsqueeze(1))[0]

    def replace(self, **changes: object) -> UnitwiseBlock:
        """A copy with some fields changed (the eigendecomposition cache is kept with ``F``)."""
        new = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        cached = self.__dict__.get("_eigen")
        if cached is not None and "F" not in changes:
            object.__setattr__(new, "_eigen", cached)
        return new

    # --- the matrix ----------------------------------------------------------------------

    def kron(self) -> Tensor:
        """The block in ``vec_r(V)`` order, dense ``(D·k, D·k)`` (block diagonal)."""
        return torch.block_diag(*self.F.unbind(0))

    def dense(self) -> Tensor:
        """The block as a dense ``(numel, numel)`` matrix in flat parameter order."""
        idx = self.flat_to_matrix_index()
        return self.kron()[idx][:, idx]

    def apply(self, v: Tensor) -> Tensor:
        """The block applied to block matrices ``v`` ``(K, D, k)``: row ``i`` by ``F_i``."""
        return torch.einsum("dij,bdj->bdi", self.F, v)

    def matmat(self, x: Tensor) -> Tensor:
        """``block @ x`` for flat rows ``x`` ``(numel, K)`` in the local layout."""
        return self.from_matrix(self.apply(self.to_matrix(x)))

    def diagonal(self) -> Tensor:
        """The diagonal as a ``(D, k)`` matrix (laid out like ``V``)."""
        return torch.diagonal(self.F, dim1=1, dim2=2)

    def trace(self) -> Tensor:
        return torch.diagonal(self.F, dim1=1, dim2=2).sum()

    # --- spectrum -----------------------------------------------------------------------

    def eigen(self) -> UnitwiseEigen:
        """Batched eigendecomposition of the ``D`` blocks (cached), eigenvalues clamped at 0;
        in float64 if it fails in the block's precision."""
        cached = self.__dict__.get("_eigen")
        if cached is None:
            sym = 0.5 * (self.F + self.F.transpose(1, 2))
            try:
                lam, q = torch.linalg.eigh(sym)
            except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
                lam, q = torch.linalg.eigh(sym.double())
                lam, q = lam.to(self.F.dtype), q.to(self.F.dtype)
            cached = UnitwiseEigen(q, lam.clamp_min(0.0))
            object.__setattr__(self, "_eigen", cached)
        return cached

    def spectrum(self) -> Tensor:
        """Eigenvalues ``(D, k)`` (unit ``i``'s in row ``i``)."""
        return self.eigen().lam

    def rotate(self, v: Tensor) -> Tensor:
        """``(K, D, k)`` block matrices into the eigenbasis: row ``i`` by ``Q_iᵀ``."""
        return torch.einsum("dji,bdj->bdi", self.eigen().Q, v)

    def unrotate(self, w: Tensor) -> Tensor:
        """Inverse of :meth:`rotate`: row ``i`` by ``Q_i``."""
        return torch.einsum("dij,bdj->bdi", self.eigen().Q, w)

    def scaled(self, scale: float) -> UnitwiseBlock:
        """The block times ``scale``."""
        new = dataclasses.replace(self, F=self.F * scale)
        cached = self.__dict__.get("_eigen")
        if cached is not None and scale >= 0:
            object.__setattr__(new, "_eigen", UnitwiseEigen(cached.Q, cached.lam * scale))
        return new
