r"""One Kronecker block of a curvature operator: layout, dense view, spectrum.

A block covers the parameters of one layer (or one parameter of it) and stands for the
matrix :math:`G \otimes A` acting on the row-major flattening of the block matrix

.. math:: V = [\,W_{(d_{out}, \cdot)}\;\; b_{(d_{out}, 1)}\,] \in \mathbb{R}^{d_{out} \times k},

i.e. every parameter of the block reshaped to ``(d_out, -1)`` and concatenated along the
columns; a parameter stored transposed, ``(k_i, d_out)`` (Hugging Face's ``Conv1D``), is
transposed into its ``(d_out, k_i)`` columns (:attr:`KroneckerBlock.transposed`).
``(G ⊗ A) vec_r(V) = vec_r(G V Aᵀ)``. A bias on its own is a block with the
``1 × 1`` factor ``A = [a]``.

With the eigendecompositions :math:`G = Q_G \Lambda_G Q_G^\top`, :math:`A = Q_A \Lambda_A
Q_A^\top`, the block is :math:`(Q_G \otimes Q_A)\,\mathrm{diag}(S)\,(Q_G \otimes Q_A)^\top`
with the spectrum :math:`S_{ij} = \lambda_{G,i}\lambda_{A,j}` — or, for EKFAC (George et
al., 2018), corrected eigenvalues :math:`S_{ij} = E_{ij}` stored on the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BlockEigen", "KroneckerBlock", "stored_transposed"]


def stored_transposed(handler: object, module: object, weight: Tensor) -> bool:
    """Whether a handler's matrix of ``weight`` is the transpose of the stored 2-D weight
    (``Conv1D``) rather than the weight reshaped to ``(d_out, -1)`` (``Linear``, ``Conv``).

    Raises:
        NotImplementedError: Any other layout (the flat parameter order would not follow).
    """
    from curvkit.stats.handlers import weight_matrix

    idx = torch.arange(weight.numel(), device="cpu").reshape(weight.shape)
    mat = weight_matrix(handler, module, idx)  # type: ignore[arg-type]
    if mat.shape == (weight.shape[0], weight[0].numel()) and torch.equal(mat, idx.reshape(weight.shape[0], -1)):
        return False
    if idx.ndim == 2 and torch.equal(mat, idx.t()):
        return True
    raise NotImplementedError(
        f"{type(handler).__name__} lays out a weight of shape {tuple(weight.shape)} as a matrix that is neither its "
        "reshape to (d_out, -1) nor its transpose; Laplace cannot map it to the parameter's flat order."
    )


@dataclass(frozen=True)
class KroneckerBlock:
    """One block ``G ⊗ A`` of a block-diagonal Kronecker-factored curvature.

    Attributes:
        name: A label (the layer's name, or ``"<layer>.bias"`` for a separate bias).
        param_names: Names of the parameters the block covers, in flat order.
        param_shapes: Their shapes; each has ``d_out`` as its first dimension, or as its
            last for a parameter marked in ``transposed``.
        G: Output factor ``(d_out, d_out)``, symmetric positive semi-definite.
        A: Input factor ``(k, k)`` with ``k = Σ numel(p) / d_out``.
        corrected_eigenvalues: Optional EKFAC spectrum ``(d_out, k)`` in the eigenbasis of
            ``G`` and ``A``; when set, it replaces ``λ_G λ_Aᵀ``.
        transposed: Per parameter, whether it is stored ``(k_i, d_out)`` (a 2-D weight
            whose forward multiplies by its transpose); ``()`` means none is.
    """

    name: str
    param_names: tuple[str, ...]
    param_shapes: tuple[torch.Size, ...]
    G: Tensor
    A: Tensor
    corrected_eigenvalues: Tensor | None = None
    transposed: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        d_out, k = self.G.shape[0], self.A.shape[0]
        if self.G.shape != (d_out, d_out) or self.A.shape != (k, k):
            raise ValueError(
                f"block {self.name!r}: factors must be square, got G {tuple(self.G.shape)} and A {tuple(self.A.shape)}."
            )
        if self.transposed and len(self.transposed) != len(self.param_shapes):
            raise ValueError(
                f"block {self.name!r}: transposed={self.transposed} needs one entry per parameter "
                f"({len(self.param_shapes)})."
            )
        if any(t and len(s) != 2 for s, t in zip(self.param_shapes, self.flags)):
            raise ValueError(f"block {self.name!r}: only 2-D parameters can be stored transposed.")
        widths = self.widths
        rows = [s[-1] if t else s[0] for s, t in zip(self.param_shapes, self.flags)]
        if any(r != d_out for r in rows) or sum(widths) != k:
            raise ValueError(
                f"block {self.name!r}: parameter shapes {[tuple(s) for s in self.param_shapes]} do not match "
                f"G {tuple(self.G.shape)} ⊗ A {tuple(self.A.shape)}; each parameter needs d_out={d_out} rows "
                f"and together k={k} columns."
            )
        if self.corrected_eigenvalues is not None and self.corrected_eigenvalues.shape != (d_out, k):
            raise ValueError(
                f"block {self.name!r}: corrected eigenvalues must have shape {(d_out, k)}, "
                f"got {tuple(self.corrected_eigenvalues.shape)}."
            )

    @property
    def d_out(self) -> int:
        return self.G.shape[0]

    @property
    def k(self) -> int:
        return self.A.shape[0]

    @property
    def numel(self) -> int:
        return self.d_out * self.k

    @property
    def flags(self) -> tuple[bool, ...]:
        """:attr:`transposed`, one entry per parameter."""
        return self.transposed or (False,) * len(self.param_shapes)

    @property
    def widths(self) -> list[int]:
        return [s[0] if t else math.prod(s[1:]) for s, t in zip(self.param_shapes, self.flags)]

    def to_matrix(self, x: Tensor) -> Tensor:
        """Flat rows ``(numel, K)`` (parameters concatenated, each flattened) to ``(K, d_out, k)``."""
        cols = x.shape[1]
        parts = x.split([self.d_out * w for w in self.widths])
        mats = [
            p.reshape(w, self.d_out, cols).transpose(0, 1) if t else p.reshape(self.d_out, w, cols)
            for p, w, t in zip(parts, self.widths, self.flags)
        ]
        return torch.cat(mats, 1).permute(2, 0, 1)

    def from_matrix(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`to_matrix`: ``(K, d_out, k)`` to flat rows ``(numel, K)``."""
        cols = v.shape[0]
        parts = v.permute(1, 2, 0).split(self.widths, dim=1)
        flat = [
            (p.transpose(0, 1) if t else p).reshape(self.d_out * w, cols)
            for p, w, t in zip(parts, self.widths, self.flags)
        ]
        return torch.cat(flat, 0)

    def flat_to_matrix_index(self) -> Tensor:
        """For each flat position, its index in ``vec_r(V)``."""
        idx = torch.arange(self.numel, device=self.G.device).view(1, self.d_out, self.k)
        return self.from_matrix(idx)[:, 0]

    def kron(self) -> Tensor:
        """``G ⊗ A`` (or the EKFAC matrix) in ``vec_r(V)`` order, dense."""
        if self.corrected_eigenvalues is None:
            return torch.kron(self.G, self.A)
        eig = self.eigen()
        q = torch.kron(eig.QG, eig.QA)
        return (q * self.corrected_eigenvalues.reshape(1, -1)) @ q.t()

    def dense(self) -> Tensor:
        """The block as a dense ``(numel, numel)`` matrix in flat parameter order."""
        idx = self.flat_to_matrix_index()
        return self.kron()[idx][:, idx]

    def matmat(self, x: Tensor) -> Tensor:
        """``block @ x`` for flat rows ``x`` ``(numel, K)``."""
        v = self.to_matrix(x)
        if self.corrected_eigenvalues is None:
            return self.from_matrix(self.G @ v @ self.A)  # A symmetric: V Aᵀ = V A
        eig = self.eigen()
        rotated = eig.QG.t() @ v @ eig.QA
        return self.from_matrix(eig.QG @ (rotated * self.corrected_eigenvalues) @ eig.QA.t())

    def eigen(self) -> BlockEigen:
        """Eigendecompositions of ``G`` and ``A`` (cached), eigenvalues clamped at 0."""
        cached = self.__dict__.get("_eigen")
        if cached is None:
            lg, qg = _eigh(self.G)
            la, qa = _eigh(self.A)
            cached = BlockEigen(qg, lg, qa, la)
            object.__setattr__(self, "_eigen", cached)
        return cached

    def spectrum(self) -> Tensor:
        """Eigenvalues ``(d_out, k)`` of the block in the Kronecker eigenbasis."""
        if self.corrected_eigenvalues is not None:
            return self.corrected_eigenvalues
        eig = self.eigen()
        return torch.outer(eig.lambda_G, eig.lambda_A)

    def scaled(self, scale: float) -> KroneckerBlock:
        """The block times ``scale`` (applied to ``G`` and any corrected eigenvalues)."""
        corrected = None if self.corrected_eigenvalues is None else self.corrected_eigenvalues * scale
        new = KroneckerBlock(
            self.name, self.param_names, self.param_shapes, self.G * scale, self.A, corrected, self.transposed
        )
        cached = self.__dict__.get("_eigen")
        if cached is not None and scale >= 0:
            object.__setattr__(
                new, "_eigen", BlockEigen(cached.QG, cached.lambda_G * scale, cached.QA, cached.lambda_A)
            )
        return new


@dataclass(frozen=True)
class BlockEigen:
    """Eigendecompositions ``G = Q_G diag(λ_G) Q_Gᵀ`` and ``A = Q_A diag(λ_A) Q_Aᵀ`` of one block."""

    QG: Tensor
    lambda_G: Tensor
    QA: Tensor
    lambda_A: Tensor


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition, in float64 if it fails in the factor's precision."""
    sym = 0.5 * (matrix + matrix.t())
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        evals, evecs = torch.linalg.eigh(sym.double())
        evals, evecs = evals.to(matrix.dtype), evecs.to(matrix.dtype)
    return evals.clamp_min(0.0), evecs
