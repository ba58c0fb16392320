r"""One Kronecker block of a curvature operator: layout, dense view, spectrum.

A block stands for the matrix :math:`G \otimes A` acting on the row-major flattening of its
**block matrix** :math:`V \in \mathbb{R}^{d_{out} \times k}`:
``(G ⊗ A) vec_r(V) = vec_r(G V Aᵀ)``. Where the entries of ``V`` sit among the block's
parameters is its :attr:`KroneckerBlock.index` (see :mod:`curvkit.laplace.layout`): the
layer's ``[weight_matrix(W) | b]``, which may be a row range of a parameter (attention's
query/key/value blocks) or its transpose (an embedding, a tied LM head). A block without an
``index`` covers whole parameters, each reshaped to ``(d_out, -1)`` and concatenated along
the columns (``V = [W_{(d_out, ·)}  b_{(d_out, 1)}]``); a bias on its own is a block with
the ``1 × 1`` factor ``A = [a]``. A :class:`~curvkit.laplace.KroneckerCurvature` maps these
positions into its flat vector (:attr:`~curvkit.laplace.KroneckerCurvature.indices`), so any
set of blocks that covers its parameters exactly once forms a curvature.

``A`` may be given as its diagonal, a 1-D tensor (an embedding's token frequencies): the
block is then :math:`G \otimes \operatorname{diag}(A)` and nothing ``k × k`` is formed
except in :meth:`KroneckerBlock.kron` (the dense view, for small blocks).

With the eigendecompositions :math:`G = Q_G \Lambda_G Q_G^\top`, :math:`A = Q_A \Lambda_A
Q_A^\top` (:math:`Q_A = I` for a diagonal ``A``, stored as an empty tensor), the block is
:math:`(Q_G \otimes Q_A)\,\mathrm{diag}(S)\,(Q_G \otimes Q_A)^\top` with the spectrum
:math:`S_{ij} = \lambda_{G,i}\lambda_{A,j}` — or, for EKFAC (George et al., 2018), corrected
eigenvalues :math:`S_{ij} = E_{ij}` stored on the block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BlockEigen", "KroneckerBlock"]


@dataclass(frozen=True)
class KroneckerBlock:
    """One block ``G ⊗ A`` of a block-diagonal Kronecker-factored curvature.

    Attributes:
        name: A label (the layer's name, or ``"<layer>.bias"`` for a separate bias).
        param_names: Names of the parameters the block touches (whole parameters; a block
            covering rows of a parameter names the parameter).
        param_shapes: Their shapes.
        G: Output factor ``(d_out, d_out)``, symmetric positive semi-definite.
        A: Input factor ``(k, k)``, or its diagonal ``(k,)`` (an embedding's).
        corrected_eigenvalues: Optional EKFAC spectrum ``(d_out, k)`` in the eigenbasis of
            ``G`` and ``A``; when set, it replaces ``λ_G λ_Aᵀ``.
        index: ``(d_out, k)`` positions of the block matrix's entries among the block's
            parameters (``param_names``, each flattened row-major, concatenated); several
            blocks may cover parts of one parameter. ``None``: whole parameters, each
            reshaped to ``(d_out, -1)``, concatenated along the columns.
        layer: The tracked layer (block of the plan) whose per-datum gradients feed this
            block (EKFAC's correction), ``None`` for blocks built by hand.
        columns: The columns ``[start, stop)`` of that layer's matrix ``[W b]`` this block
            covers (all of them, the weight's, or the bias column).
    """

    name: str
    param_names: tuple[str, ...]
    param_shapes: tuple[torch.Size, ...]
    G: Tensor
    A: Tensor
    corrected_eigenvalues: Tensor | None = None
    index: Tensor | None = None
    layer: str | None = None
    columns: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        d_out, k = self.G.shape[0], self.A.shape[0]
        a_ok = self.A.shape == (k,) or self.A.shape == (k, k)
        if self.G.shape != (d_out, d_out) or not a_ok:
            raise ValueError(
                f"block {self.name!r}: G must be square and A square or a diagonal (1-D), got G "
                f"{tuple(self.G.shape)} and A {tuple(self.A.shape)}."
            )
        if self.index is not None:
            if tuple(self.index.shape) != (d_out, k):
                raise ValueError(
                    f"block {self.name!r}: index of shape {tuple(self.index.shape)} does not match G "
                    f"{tuple(self.G.shape)} ⊗ A of size {k}; it must be (d_out, k) = {(d_out, k)}."
                )
        else:
            widths = [math.prod(s[1:]) for s in self.param_shapes]
            if any(s[0] != d_out for s in self.param_shapes) or sum(widths) != k:
                raise ValueError(
                    f"block {self.name!r}: parameter shapes {[tuple(s) for s in self.param_shapes]} do not match "
                    f"G {tuple(self.G.shape)} ⊗ A of size {k}; each parameter needs d_out={d_out} rows and together "
                    f"k={k} columns (or give the block an index for another layout)."
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
    def diagonal_A(self) -> bool:
        """Whether ``A`` is given as its diagonal."""
        return self.A.ndim == 1

    @property
    def widths(self) -> list[int]:
        return [math.prod(s[1:]) for s in self.param_shapes]

    def A_dense(self) -> Tensor:
        """``A`` as a ``(k, k)`` matrix."""
        return torch.diag(self.A) if self.diagonal_A else self.A

    def A_diagonal(self) -> Tensor:
        """The diagonal of ``A``."""
        return self.A if self.diagonal_A else torch.diagonal(self.A)

    # --- the legacy local layout (whole parameters, concatenated) ---------------------------

    def to_matrix(self, x: Tensor) -> Tensor:
        """Flat rows ``(numel, K)`` of the block's own parameters (concatenated, each
        flattened; blocks without an :attr:`index`) to ``(K, d_out, k)``."""
        cols = x.shape[1]
        parts = x.split([self.d_out * w for w in self.widths])
        return torch.cat([p.reshape(self.d_out, w, cols) for p, w in zip(parts, self.widths)], 1).permute(2, 0, 1)

    def from_matrix(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`to_matrix`: ``(K, d_out, k)`` to flat rows ``(numel, K)``."""
        cols = v.shape[0]
        parts = v.permute(1, 2, 0).split(self.widths, dim=1)
        return torch.cat([p.reshape(self.d_out * w, cols) for p, w in zip(parts, self.widths)], 0)

    def flat_to_matrix_index(self) -> Tensor:
        """For each flat position of the block's own parameters, its index in ``vec_r(V)``
        (blocks without an :attr:`index`)."""
        idx = torch.arange(self.numel, device=self.G.device).view(1, self.d_out, self.k)
        return self.from_matrix(idx)[:, 0]

    def local_index(self) -> Tensor:
        """``(d_out, k)``: for each entry of ``V``, its position among the block's own
        parameters, concatenated and flattened (:attr:`index`, or the default layout)."""
        if self.index is not None:
            return self.index
        return self.to_matrix(torch.arange(self.numel, device=self.G.device).unsqueeze(1))[0]

    # --- the block as a matrix ----------------------------------------------------------------

    def kron(self) -> Tensor:
        """``G ⊗ A`` (or the EKFAC matrix) in ``vec_r(V)`` order, dense."""
        if self.corrected_eigenvalues is None:
            return torch.kron(self.G, self.A_dense())
        eig = self.eigen()
        q = torch.kron(eig.QG.contiguous(), eig.QA_dense().contiguous())
        return (q * self.corrected_eigenvalues.reshape(1, -1)) @ q.t()

    def dense(self) -> Tensor:
        """The block as a dense ``(numel, numel)`` matrix in the block's local flat order
        (blocks without an :attr:`index`)."""
        idx = self.flat_to_matrix_index()
        return self.kron()[idx][:, idx]

    def apply(self, v: Tensor) -> Tensor:
        """``(G ⊗ A)`` (or the EKFAC matrix) applied to block matrices ``v`` ``(K, d_out, k)``."""
        if self.corrected_eigenvalues is None:
            gv = self.G @ v
            return gv * self.A if self.diagonal_A else gv @ self.A  # A symmetric: V Aᵀ = V A
        eig = self.eigen()
        return eig.unrotate(eig.rotate(v) * self.corrected_eigenvalues)

    def matmat(self, x: Tensor) -> Tensor:
        """``block @ x`` for flat rows ``x`` ``(numel, K)`` in the local layout."""
        return self.from_matrix(self.apply(self.to_matrix(x)))

    def eigen(self) -> BlockEigen:
        """Eigendecompositions of ``G`` and ``A`` (cached), eigenvalues clamped at 0; a
        diagonal ``A`` is its own spectrum with ``Q_A = I`` (an empty tensor)."""
        cached = self.__dict__.get("_eigen")
        if cached is None:
            lg, qg = _eigh(self.G)
            if self.diagonal_A:
                la, qa = self.A.clamp_min(0.0), self.A.new_empty(0)
            else:
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

    def diagonal(self) -> Tensor:
        """``diag`` of the block as a ``(d_out, k)`` matrix (laid out like ``V``)."""
        if self.corrected_eigenvalues is None:
            return torch.outer(torch.diagonal(self.G), self.A_diagonal())
        eig = self.eigen()
        right = self.corrected_eigenvalues if not eig.QA.numel() else self.corrected_eigenvalues @ (eig.QA**2).t()
        return (eig.QG**2) @ right

    def trace(self) -> Tensor:
        if self.corrected_eigenvalues is None:
            return torch.diagonal(self.G).sum() * self.A_diagonal().sum()
        return self.corrected_eigenvalues.sum()

    def replace(self, **changes: object) -> KroneckerBlock:
        """A copy with some fields changed (the eigendecomposition cache is kept when the
        factors are)."""
        new = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        cached = self.__dict__.get("_eigen")
        if cached is not None and "G" not in changes and "A" not in changes:
            object.__setattr__(new, "_eigen", cached)
        return new

    def scaled(self, scale: float) -> KroneckerBlock:
        """The block times ``scale`` (applied to ``G`` and any corrected eigenvalues)."""
        corrected = None if self.corrected_eigenvalues is None else self.corrected_eigenvalues * scale
        new = dataclasses.replace(self, G=self.G * scale, corrected_eigenvalues=corrected)
        cached = self.__dict__.get("_eigen")
        if cached is not None and scale >= 0:
            object.__setattr__(
                new, "_eigen", BlockEigen(cached.QG, cached.lambda_G * scale, cached.QA, cached.lambda_A)
            )
        return new


@dataclass(frozen=True)
class BlockEigen:
    """Eigendecompositions ``G = Q_G diag(λ_G) Q_Gᵀ`` and ``A = Q_A diag(λ_A) Q_Aᵀ`` of one
    block; an empty ``Q_A`` is the identity (a diagonal ``A``)."""

    QG: Tensor
    lambda_G: Tensor
    QA: Tensor
    lambda_A: Tensor

    def rotate(self, v: Tensor) -> Tensor:
        """``Q_Gᵀ v Q_A`` for block matrices ``v`` ``(..., d_out, k)``."""
        out = self.QG.t() @ v
        return out @ self.QA if self.QA.numel() else out

    def unrotate(self, v: Tensor) -> Tensor:
        """``Q_G v Q_Aᵀ`` (the inverse of :meth:`rotate`)."""
        out = self.QG @ v
        return out @ self.QA.t() if self.QA.numel() else out

    def QA_dense(self) -> Tensor:
        """``Q_A`` as a matrix (the identity of the diagonal case made dense)."""
        if self.QA.numel():
            return self.QA
        return torch.eye(self.lambda_A.shape[0], dtype=self.lambda_A.dtype, device=self.lambda_A.device)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition, in float64 if it fails in the factor's precision."""
    sym = 0.5 * (matrix + matrix.t())
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        evals, evecs = torch.linalg.eigh(sym.double())
        evals, evecs = evals.to(matrix.dtype), evecs.to(matrix.dtype)
    return evals.clamp_min(0.0), evecs
