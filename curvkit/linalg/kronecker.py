r"""The bundled block operators: Kronecker products, Kronecker eigenbases, unit-wise blocks.

All act on the row-major ``vec`` of a block's matrix form ``V`` ``(d_out, k)`` and satisfy
:class:`~curvkit.linalg.operator.CurvatureOperator` with closed forms for every operation:

* :class:`KroneckerOperator` — :math:`G\otimes A`: ``C vec_r(V) = vec_r(G V A)``. ``A``
  may be given as its diagonal (a 1-D tensor: an embedding's token frequencies), and is
  then never made ``k × k`` except in :meth:`~KroneckerOperator.to_dense`. With
  :math:`G = Q_G\Lambda_GQ_G^\top`, :math:`A = Q_A\Lambda_AQ_A^\top` the spectrum is
  :math:`\lambda_{G,i}\lambda_{A,j}` (:class:`KroneckerEigen`), so ``logdet`` and
  ``power`` cost two small eigendecompositions.
* :class:`EigenbasisOperator` — EKFAC's :math:`(Q_G\otimes Q_A)\,\mathrm{diag}(\mathrm{vec}\,S)\,
  (Q_G\otimes Q_A)^\top` (George et al., 2018): K-FAC's eigenbasis with other eigenvalues
  ``S`` ``(d_out, k)``.
* :class:`UnitwiseOperator` — a normalisation layer's exact :math:`\mathrm{blockdiag}(F_1,
  \dots, F_D)` on ``(D, k)`` matrices (row ``i`` holds unit ``i``'s ``(γ_i, β_i)``), with a
  batched ``k × k`` eigendecomposition (:class:`UnitwiseEigen`).

An empty ``Q`` tensor stands for the identity (a diagonal factor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.linalg.operator import BlockOperator, _check_scale, symmetric_eigh_clamped

__all__ = ["EigenbasisOperator", "KroneckerEigen", "KroneckerOperator", "UnitwiseEigen", "UnitwiseOperator"]


def _identity_if_empty(q: Tensor, dim: int, like: Tensor) -> Tensor:
    return q if q.numel() else torch.eye(dim, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class KroneckerEigen:
    r"""The eigendecomposition of a block in a Kronecker eigenbasis :math:`Q_G\otimes Q_A`.

    Attributes:
        QG, lambda_G: ``G = Q_G diag(λ_G) Q_Gᵀ`` (``lambda_G`` may be ``None`` when only
            the basis is known, as for an EKFAC block).
        QA, lambda_A: Likewise for ``A``; an empty ``QA`` is the identity (diagonal ``A``).
        corrected: The block's eigenvalues ``(d_out, k)`` when they are not
            ``λ_G λ_Aᵀ`` (EKFAC's corrected spectrum, or a function of it).
    """

    QG: Tensor
    lambda_G: Tensor | None
    QA: Tensor
    lambda_A: Tensor | None
    corrected: Tensor | None = None

    @property
    def values(self) -> Tensor:
        """The block's eigenvalues ``(d_out, k)``."""
        if self.corrected is not None:
            return self.corrected
        assert self.lambda_G is not None and self.lambda_A is not None
        return torch.outer(self.lambda_G, self.lambda_A)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        d_out, k = self.values.shape
        return int(d_out), int(k)

    def rotate(self, v: Tensor) -> Tensor:
        """``Q_Gᵀ v Q_A`` for block matrices ``v`` ``(..., d_out, k)``."""
        out = self.QG.t() @ v if self.QG.numel() else v
        return out @ self.QA if self.QA.numel() else out

    def unrotate(self, v: Tensor) -> Tensor:
        """``Q_G v Q_Aᵀ`` (the inverse of :meth:`rotate`)."""
        out = self.QG @ v if self.QG.numel() else v
        return out @ self.QA.t() if self.QA.numel() else out

    def QG_dense(self) -> Tensor:
        """``Q_G`` as a matrix."""
        return _identity_if_empty(self.QG, self.matrix_shape[0], self.values)

    def QA_dense(self) -> Tensor:
        """``Q_A`` as a matrix (the identity of the diagonal case made dense)."""
        return _identity_if_empty(self.QA, self.matrix_shape[1], self.values)

    def to_dense(self) -> tuple[Tensor, Tensor]:
        """``(λ (n,), Q_G ⊗ Q_A (n, n))`` in ``vec_r`` order."""
        return self.values.reshape(-1), torch.kron(self.QG_dense().contiguous(), self.QA_dense().contiguous())

    def with_values(self, values: Tensor) -> KroneckerEigen:
        """The same basis with the eigenvalues ``values`` ``(d_out, k)``."""
        return dataclasses.replace(self, corrected=values)

    def diagonal_of(self, values: Tensor) -> Tensor:
        """``diag((Q_G ⊗ Q_A) diag(vec values) (Q_G ⊗ Q_A)ᵀ)`` laid out like ``V``."""
        right = values @ (self.QA**2).t() if self.QA.numel() else values
        return (self.QG**2) @ right if self.QG.numel() else right


class KroneckerOperator(BlockOperator):
    r"""The block :math:`G\otimes A` on row-major ``vec`` of ``(d_out, d_in)`` matrices:
    ``op @ M = G M A`` (see the module docstring).

    Args:
        A: Input factor ``(k, k)``, or its diagonal ``(k,)``; symmetric PSD.
        G: Output factor ``(d_out, d_out)``; symmetric PSD; the same dtype as ``A``.
        label: A name for error messages (the layer's).
    """

    def __init__(self, A: Tensor, G: Tensor, *, label: str | None = None) -> None:
        k = A.shape[0] if A.ndim >= 1 else 0
        if G.ndim != 2 or G.shape[0] != G.shape[1] or A.shape not in ((k,), (k, k)):
            raise ValueError(
                f"KroneckerOperator{f' {label!r}' if label else ''}: G must be square and A square or a diagonal "
                f"(1-D), got G {tuple(G.shape)} and A {tuple(A.shape)}."
            )
        if A.dtype != G.dtype:
            raise ValueError(f"KroneckerOperator: A is {A.dtype} but G is {G.dtype}; give both factors one dtype.")
        self.A, self.G = A, G
        self.label = label

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return int(self.G.shape[0]), int(self.A.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.G.dtype

    @property
    def device(self) -> torch.device:
        return self.G.device

    @property
    def diagonal_A(self) -> bool:
        """Whether ``A`` is given as its diagonal."""
        return self.A.ndim == 1

    def A_dense(self) -> Tensor:
        """``A`` as a ``(k, k)`` matrix."""
        return torch.diag(self.A) if self.diagonal_A else self.A

    def A_diagonal(self) -> Tensor:
        """The diagonal of ``A``."""
        return self.A if self.diagonal_A else torch.diagonal(self.A)

    def apply(self, v: Tensor) -> Tensor:
        gv = self.G @ v
        return gv * self.A if self.diagonal_A else gv @ self.A  # A symmetric: V Aᵀ = V A

    def tensors(self) -> list[Tensor]:
        return [self.G, self.A]

    def to_dense(self) -> Tensor:
        return torch.kron(self.G, self.A_dense())

    def diagonal(self) -> Tensor:
        return torch.outer(torch.diagonal(self.G), self.A_diagonal())

    def trace(self) -> Tensor:
        return torch.diagonal(self.G).sum() * self.A_diagonal().sum()

    def eigen(self) -> KroneckerEigen:
        """Eigendecompositions of ``G`` and ``A`` (cached; eigenvalues clamped at 0, float64
        retry); a diagonal ``A`` is its own spectrum with ``Q_A = I`` (an empty tensor)."""
        cached = self.__dict__.get("_eigen")
        if cached is None:
            lg, qg = symmetric_eigh_clamped(self.G)
            if self.diagonal_A:
                la, qa = self.A.clamp_min(0.0), self.A.new_empty(0)
            else:
                la, qa = symmetric_eigh_clamped(self.A)
            cached = KroneckerEigen(qg, lg, qa, la)
            self.__dict__["_eigen"] = cached
        return cached

    def scaled(self, scale: float) -> KroneckerOperator:
        """``scale · G ⊗ A`` (``G`` scaled; the eigendecomposition is kept)."""
        value = _check_scale(self, scale)
        new = KroneckerOperator(self.A, self.G * value, label=self.label)
        cached = self.__dict__.get("_eigen")
        if cached is not None:
            new.__dict__["_eigen"] = KroneckerEigen(cached.QG, cached.lambda_G * value, cached.QA, cached.lambda_A)
        return new

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KroneckerOperator:
        return KroneckerOperator(
            self.A.to(dtype=dtype, device=device), self.G.to(dtype=dtype, device=device), label=self.label
        )

    def split_columns(self, stop: int) -> tuple[KroneckerOperator, KroneckerOperator]:
        """The blocks ``G ⊗ A[:stop, :stop]`` and ``G ⊗ A[stop:, stop:]`` of the columns
        before and after ``stop`` (a weight and its bias column), cross terms dropped."""
        if self.diagonal_A:
            return (
                KroneckerOperator(self.A[:stop], self.G, label=self.label),
                KroneckerOperator(self.A[stop:].clone(), self.G, label=self.label),
            )
        return (
            KroneckerOperator(self.A[:stop, :stop], self.G, label=self.label),
            KroneckerOperator(self.A[stop:, stop:].clone(), self.G, label=self.label),
        )


class EigenbasisOperator(BlockOperator):
    r"""EKFAC's block :math:`(Q_G\otimes Q_A)\operatorname{diag}(\operatorname{vec}S)
    (Q_G\otimes Q_A)^\top`: ``op @ M = Q_G[(Q_G^\top M Q_A)\circ S]Q_A^\top`` (empty ``Q`` =
    identity).

    Args:
        Q_A, Q_G: The eigenbasis (orthogonal, or empty for the identity).
        S: The eigenvalues ``(d_out, k)``, non-negative.
        lambda_A, lambda_G: The factors' own eigenvalues, where known (informational).
        kronecker: The :class:`KroneckerOperator` whose eigenbasis this is, where known
            (:meth:`from_kronecker`).
    """

    def __init__(
        self,
        Q_A: Tensor,
        Q_G: Tensor,
        S: Tensor,
        *,
        lambda_A: Tensor | None = None,
        lambda_G: Tensor | None = None,
        kronecker: KroneckerOperator | None = None,
        label: str | None = None,
    ) -> None:
        if S.ndim != 2:
            raise ValueError(f"EigenbasisOperator: S must be a (d_out, k) matrix, got {tuple(S.shape)}.")
        d_out, k = S.shape
        if (Q_G.numel() and tuple(Q_G.shape) != (d_out, d_out)) or (Q_A.numel() and tuple(Q_A.shape) != (k, k)):
            raise ValueError(
                f"EigenbasisOperator: Q_G {tuple(Q_G.shape)} and Q_A {tuple(Q_A.shape)} do not fit S {tuple(S.shape)}."
            )
        self.Q_A, self.Q_G, self.S = Q_A, Q_G, S
        self.lambda_A, self.lambda_G = lambda_A, lambda_G
        self.kronecker = kronecker
        self.label = label

    @classmethod
    def from_kronecker(cls, op: KroneckerOperator, S: Tensor) -> EigenbasisOperator:
        """``op``'s eigenbasis with the eigenvalues ``S`` (EKFAC's correction of ``op``)."""
        eig = op.eigen()
        return cls(eig.QA, eig.QG, S, lambda_A=eig.lambda_A, lambda_G=eig.lambda_G, kronecker=op, label=op.label)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        d_out, k = self.S.shape
        return int(d_out), int(k)

    @property
    def dtype(self) -> torch.dtype:
        return self.S.dtype

    @property
    def device(self) -> torch.device:
        return self.S.device

    def eigen(self) -> KroneckerEigen:
        return KroneckerEigen(self.Q_G, self.lambda_G, self.Q_A, self.lambda_A, corrected=self.S)

    def apply(self, v: Tensor) -> Tensor:
        eig = self.eigen()
        return eig.unrotate(eig.rotate(v) * self.S)

    def tensors(self) -> list[Tensor]:
        own = [t for t in (self.Q_A, self.Q_G, self.S) if t.numel()]
        return own + (self.kronecker.tensors() if self.kronecker is not None else [])

    def to_dense(self) -> Tensor:
        _, q = self.eigen().to_dense()
        return (q * self.S.reshape(1, -1)) @ q.t()

    def diagonal(self) -> Tensor:
        return self.eigen().diagonal_of(self.S)

    def trace(self) -> Tensor:
        return self.S.sum()

    def scaled(self, scale: float) -> EigenbasisOperator:
        value = _check_scale(self, scale)
        return EigenbasisOperator(
            self.Q_A,
            self.Q_G,
            self.S * value,
            lambda_A=self.lambda_A,
            lambda_G=None if self.lambda_G is None else self.lambda_G * value,
            kronecker=None if self.kronecker is None else self.kronecker.scaled(value),
            label=self.label,
        )

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> EigenbasisOperator:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype=dtype, device=device)

        return EigenbasisOperator(
            self.Q_A.to(dtype=dtype, device=device),
            self.Q_G.to(dtype=dtype, device=device),
            self.S.to(dtype=dtype, device=device),
            lambda_A=move(self.lambda_A),
            lambda_G=move(self.lambda_G),
            kronecker=None if self.kronecker is None else self.kronecker.to(dtype, device),
            label=self.label,
        )


@dataclass(frozen=True)
class UnitwiseEigen:
    """``F_i = Q_i diag(λ_i) Q_iᵀ`` for every unit: ``Q`` ``(D, k, k)``, ``lam`` ``(D, k)``."""

    Q: Tensor
    lam: Tensor

    @property
    def values(self) -> Tensor:
        return self.lam

    def rotate(self, v: Tensor) -> Tensor:
        """``(..., D, k)`` block matrices into the eigenbasis: row ``i`` by ``Q_iᵀ``."""
        return torch.einsum("dji,...dj->...di", self.Q, v)

    def unrotate(self, w: Tensor) -> Tensor:
        """Inverse of :meth:`rotate`: row ``i`` by ``Q_i``."""
        return torch.einsum("dij,...dj->...di", self.Q, w)

    def to_dense(self) -> tuple[Tensor, Tensor]:
        return self.lam.reshape(-1), torch.block_diag(*self.Q.unbind(0))

    def with_values(self, values: Tensor) -> UnitwiseEigen:
        return UnitwiseEigen(self.Q, values)

    def diagonal_of(self, values: Tensor) -> Tensor:
        return torch.einsum("dij,dj->di", self.Q**2, values)


class UnitwiseOperator(BlockOperator):
    """The block-diagonal matrix ``blockdiag(F_1, …, F_D)`` on the row-major ``vec`` of
    ``(D, k)`` matrices: row ``i`` of ``V`` by ``F_i``.

    Args:
        F: ``(D, k, k)``, each ``F_i`` symmetric PSD.
    """

    def __init__(self, F: Tensor, *, label: str | None = None) -> None:
        if F.ndim != 3 or F.shape[1] != F.shape[2]:
            raise ValueError(f"UnitwiseOperator: F must have shape (D, k, k), got {tuple(F.shape)}.")
        self.F = F
        self.label = label

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return int(self.F.shape[0]), int(self.F.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.F.dtype

    @property
    def device(self) -> torch.device:
        return self.F.device

    def apply(self, v: Tensor) -> Tensor:
        return torch.einsum("dij,...dj->...di", self.F, v)

    def tensors(self) -> list[Tensor]:
        return [self.F]

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.F.unbind(0))

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.F, dim1=1, dim2=2)

    def trace(self) -> Tensor:
        return torch.diagonal(self.F, dim1=1, dim2=2).sum()

    def eigen(self) -> UnitwiseEigen:
        """Batched eigendecomposition of the ``D`` blocks (cached), eigenvalues clamped at 0;
        in float64 if it fails in the block's precision."""
        cached = self.__dict__.get("_eigen")
        if cached is None:
            lam, q = symmetric_eigh_clamped(self.F)
            cached = UnitwiseEigen(q, lam)
            self.__dict__["_eigen"] = cached
        return cached

    def scaled(self, scale: float) -> UnitwiseOperator:
        value = _check_scale(self, scale)
        new = UnitwiseOperator(self.F * value, label=self.label)
        cached = self.__dict__.get("_eigen")
        if cached is not None:
            new.__dict__["_eigen"] = UnitwiseEigen(cached.Q, cached.lam * value)
        return new

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> UnitwiseOperator:
        return UnitwiseOperator(self.F.to(dtype=dtype, device=device), label=self.label)

    def split_columns(self, stop: int) -> tuple[UnitwiseOperator, UnitwiseOperator]:
        """The blocks of the columns before and after ``stop`` (scale and shift), cross
        terms dropped."""
        return (
            UnitwiseOperator(self.F[:, :stop, :stop].clone(), label=self.label),
            UnitwiseOperator(self.F[:, stop:, stop:].clone(), label=self.label),
        )
