r"""One protocol for every curvature estimate: :class:`CurvatureOperator`.

A curvature operator is a symmetric positive semi-definite matrix ``C`` given by what it
does, in the style of curvlinops' linear operators and kfac-jax's ``multiply_matpower``:

================================  =====================================================
``op.shape``                      ``(n, n)``
``op.dtype``, ``op.device``       where its tensors live
``op @ x``                        the product, in the input's format (see below)
``op.to_dense()``                 ``C`` as an ``(n, n)`` tensor (small sizes)
``op.trace()``                    ``tr C`` (0-d tensor)
``op.logdet(shift)``              ``log det(C + shift·I)`` (0-d tensor)
``op.power(p, shift)``            ``(C + shift·I)^p`` as an operator (``p = -1``: the
                                  damped inverse, ``-1/2``: its root)
``op.eigen()``                    ``C = Q diag(λ) Qᵀ`` (:class:`OperatorEigen`)
================================  =====================================================

Two families implement it:

* **Block operators** (:class:`BlockOperator`): the curvature of one layer, as every
  :meth:`curvkit.blocks.CurvatureBlock.as_operator` returns it. They act on the row-major
  ``vec`` of the block's **matrix form** ``V`` of shape ``(d_out, k)`` (``k = d_in``, plus
  one for a bias column): ``op @ V`` for a matrix, ``op @ Vs`` for a stack
  ``(..., d_out, k)``, ``op @ v`` for a flat vector ``(n,)`` and ``op @ X`` for flat
  columns ``(n, K)``; each answer has the input's shape. Their ``shift`` is a number (a
  0-d tensor), or a ``(d_out, k)`` tensor of diagonal entries laid out like ``V`` (then
  the block is made dense). Concrete ones: :class:`~curvkit.linalg.kronecker.KroneckerOperator`
  (``G ⊗ A``: K-FAC, TKFAC, KLD-WRM, the low-rank family, SINGD's ``(C Cᵀ)⁻¹ ⊗ (K Kᵀ)⁻¹``),
  :class:`~curvkit.linalg.kronecker.EigenbasisOperator` (EKFAC, TEKFAC),
  :class:`~curvkit.linalg.kronecker.UnitwiseOperator` (normalisation layers),
  :class:`DenseOperator`, and :class:`SpectralOperator` (what ``power`` returns).
* **Whole-model operators**: :class:`curvkit.laplace.KroneckerCurvature` (and its
  powers), block-diagonal over the flat parameter vector; they take flat vectors and
  matrices ``(P,)``/``(P, K)`` and lists of parameter-shaped tensors (with a trailing
  ``K`` for a matrix), curvlinops' conventions (:class:`curvkit.laplace.operator.FlatOperator`).

A method whose block keeps something without a closed form for an operation gets the
:class:`BlockOperator` default, which goes through :meth:`~BlockOperator.to_dense` (fine
for the small blocks of tests and Laplace on small models; the docstring of each default
says so). :func:`curvkit.testing.check_operator` checks every operation of an operator
against a dense float64 reference built from ``to_dense``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "BlockOperator",
    "CurvatureOperator",
    "DenseEigen",
    "DenseOperator",
    "OperatorEigen",
    "ScaledOperator",
    "SpectralOperator",
    "symmetric_eigh_clamped",
]


@runtime_checkable
class OperatorEigen(Protocol):
    """An eigendecomposition ``C = Q diag(λ) Qᵀ`` of a curvature operator.

    ``values`` holds ``λ`` shaped like a vector the operator acts on (``(d_out, k)`` for a
    block, ``(P,)`` for a whole model); :meth:`rotate` applies ``Qᵀ`` and :meth:`unrotate`
    ``Q`` to inputs in that format (stacks ``(..., d_out, k)`` for a block);
    :meth:`to_dense` gives ``(λ (n,), Q (n, n))`` in ``vec`` order.
    """

    @property
    def values(self) -> Tensor: ...

    def rotate(self, x: Tensor) -> Tensor: ...

    def unrotate(self, x: Tensor) -> Tensor: ...

    def to_dense(self) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class CurvatureOperator(Protocol):
    """The curvature-operator protocol (see the module docstring for each member)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __matmul__(self, x: Any) -> Any: ...

    def to_dense(self) -> Tensor: ...

    def trace(self) -> Tensor: ...

    def logdet(self, shift: float | Tensor = 0.0, /) -> Tensor: ...

    def power(self, p: float, shift: float | Tensor = 0.0, /) -> CurvatureOperator: ...

    def eigen(self) -> OperatorEigen: ...


def symmetric_eigh_clamped(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(λ, Q)`` of the symmetric part of ``matrix`` (batched over leading dimensions),
    eigenvalues clamped at 0; retried in float64 if it fails in the matrix's precision.

    Raises:
        torch.linalg.LinAlgError: It fails in float64 too.
    """
    sym = 0.5 * (matrix + matrix.transpose(-1, -2))
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        evals, evecs = torch.linalg.eigh(sym.double())
        evals, evecs = evals.to(matrix.dtype), evecs.to(matrix.dtype)
    return evals.clamp_min(0.0), evecs


def _name(op: Any) -> str:
    label = getattr(op, "label", None)
    return f"{type(op).__name__}{f' {label!r}' if label else ''}"


def check_shift(op: Any, shift: float | Tensor, matrix_shape: tuple[int, ...]) -> Tensor:
    """``shift`` as a 0-d tensor or a tensor of ``matrix_shape`` in ``op``'s dtype; refuses
    anything else, and non-finite or negative entries."""
    value = torch.as_tensor(shift, dtype=op.dtype, device=op.device)
    if value.ndim != 0 and tuple(value.shape) != tuple(matrix_shape):
        raise ValueError(
            f"{_name(op)}: shift of shape {tuple(value.shape)} is neither a number nor laid out like the operator's "
            f"input {tuple(matrix_shape)}; pass a float or a tensor of that shape."
        )
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise ValueError(
            f"{_name(op)}: shift must be finite and non-negative, got {value if value.ndim == 0 else '…'}."
        )
    return value


def spectral_function(op: Any, p: float, shift: Tensor, values: Tensor) -> Tensor:
    """``(values + shift)^p``, refusing a negative power of a singular operator."""
    shifted = values + shift
    if p < 0 and not bool((shifted > 0).all()):
        raise ValueError(
            f"{_name(op)} + shift is singular (smallest eigenvalue {float(shifted.min()):.3g}), so power p={p:g} does "
            "not exist; pass a positive shift (a damping, a prior precision)."
        )
    return shifted.pow(p)


class BlockOperator(ABC):
    r"""Base of the block operators: a symmetric PSD matrix on the row-major ``vec`` of
    ``(d_out, k)`` matrices (see the module docstring for the input formats).

    Subclasses implement :attr:`matrix_shape`, :attr:`dtype`, :attr:`device`,
    :meth:`apply` and :meth:`tensors`, and override whatever has a closed form (every
    bundled operator overrides all of them). The defaults go through
    :meth:`to_dense` — an ``(n, n)`` matrix and its ``O(n³)`` eigendecomposition — which
    is exact but meant for small blocks.
    """

    #: An optional label for error messages (the layer's name).
    label: str | None = None

    @property
    @abstractmethod
    def matrix_shape(self) -> tuple[int, int]:
        """``(d_out, k)``, the shape of the block's matrix form."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def apply(self, v: Tensor) -> Tensor:
        """The operator on a stack of matrices ``(..., d_out, k)`` (in its dtype)."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The tensors that define the operator (for finiteness checks and ``state``)."""

    # --- shape and products ---------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        d_out, k = self.matrix_shape
        return d_out * k, d_out * k

    def __matmul__(self, x: Tensor) -> Tensor:
        """``C x`` for a matrix ``(d_out, k)``, a stack ``(..., d_out, k)``, a flat vector
        ``(n,)`` or flat columns ``(n, K)``; the answer has ``x``'s shape."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{_name(self)} multiplies tensors, got {type(x).__name__}.")
        if x.dtype != self.dtype:
            raise ValueError(f"{_name(self)}: input dtype {x.dtype} differs from the operator's {self.dtype}; cast it.")
        d_out, k = self.matrix_shape
        n = d_out * k
        if x.ndim >= 2 and tuple(x.shape[-2:]) == (d_out, k):
            return self.apply(x)
        if x.ndim == 1 and x.shape[0] == n:
            return self.apply(x.reshape(d_out, k)).reshape(n)
        if x.ndim == 2 and x.shape[0] == n:
            cols = x.shape[1]
            return self.apply(x.t().reshape(cols, d_out, k)).reshape(cols, n).t()
        raise ValueError(
            f"{_name(self)} acts on matrices ({d_out}, {k}) (or stacks of them, (..., {d_out}, {k})), flat vectors "
            f"({n},) and flat columns ({n}, K); got shape {tuple(x.shape)}."
        )

    def matmat(self, x: Tensor) -> Tensor:
        """Same as ``self @ x``."""
        return self @ x

    def quadratic(self, direction: Tensor) -> Tensor:
        """``vec(D)ᵀ C vec(D)`` for ``D`` in matrix form (cast to the operator's dtype)."""
        d = direction.to(self.dtype)
        return (d * self.apply(d)).sum()

    # --- dense defaults (closed forms in the subclasses) ----------------------------------------

    def to_dense(self) -> Tensor:
        """``C`` as an ``(n, n)`` matrix in ``vec_r`` order (default: ``C`` applied to the
        identity, ``n`` products)."""
        d_out, k = self.matrix_shape
        n = d_out * k
        eye = torch.eye(n, dtype=self.dtype, device=self.device).reshape(n, d_out, k)
        return self.apply(eye).reshape(n, n).t()

    def diagonal(self) -> Tensor:
        """``diag C`` laid out like ``V``, ``(d_out, k)`` (default: from :meth:`to_dense`)."""
        return self.to_dense().diagonal().reshape(self.matrix_shape)

    def trace(self) -> Tensor:
        """``tr C`` (default: the sum of :meth:`diagonal`)."""
        return self.diagonal().sum()

    def eigen(self) -> OperatorEigen:
        """``C = Q diag(λ) Qᵀ`` (default: a dense eigendecomposition of :meth:`to_dense`,
        cached; eigenvalues clamped at 0)."""
        cached = self.__dict__.get("_dense_eigen")
        if cached is None:
            values, vectors = symmetric_eigh_clamped(self.to_dense())
            cached = DenseEigen(vectors, values, self.matrix_shape)
            self.__dict__["_dense_eigen"] = cached
        return cached

    # --- spectral functions ------------------------------------------------------------------

    def logdet(self, shift: float | Tensor = 0.0, /) -> Tensor:
        """``log det(C + shift)`` from the spectrum (``-inf`` for a singular ``C + shift``);
        a ``(d_out, k)`` shift of diagonal entries goes through the dense matrix."""
        value = check_shift(self, shift, self.matrix_shape)
        if value.ndim:
            return torch.linalg.slogdet(self.to_dense() + torch.diag(value.reshape(-1)))[1]
        return (self.eigen().values + value).log().sum()

    def power(self, p: float, shift: float | Tensor = 0.0, /) -> SpectralOperator:
        """``(C + shift)^p`` as an operator in ``C``'s eigenbasis (a ``(d_out, k)`` shift of
        diagonal entries: in the eigenbasis of the dense ``C + diag(shift)``).

        Raises:
            ValueError: ``p < 0`` and ``C + shift`` is singular.
        """
        value = check_shift(self, shift, self.matrix_shape)
        p = float(p)
        if value.ndim:
            values, vectors = symmetric_eigh_clamped(self.to_dense() + torch.diag(value.reshape(-1)))
            eig: OperatorEigen = DenseEigen(vectors, values, self.matrix_shape)
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            return SpectralOperator(eig, spectral_function(self, p, zero, eig.values), label=self.label)
        eig = self.eigen()
        return SpectralOperator(eig, spectral_function(self, p, value, eig.values), label=self.label)

    def inverse(self, shift: float | Tensor = 0.0) -> SpectralOperator:
        """The damped inverse ``(C + shift)⁻¹`` (``power(-1, shift)``)."""
        return self.power(-1.0, shift)

    # --- copies ------------------------------------------------------------------------------

    def scaled(self, scale: float) -> BlockOperator:
        """``scale · C`` for a non-negative number (default: a :class:`ScaledOperator`)."""
        return ScaledOperator(self, _check_scale(self, scale))

    def __mul__(self, scale: float) -> BlockOperator:
        return self.scaled(scale)

    __rmul__ = __mul__

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> BlockOperator:
        """A copy in another dtype/device (default: the dense matrix, a :class:`DenseOperator`)."""
        return DenseOperator(self.to_dense().to(dtype=dtype, device=device), self.matrix_shape, label=self.label)

    def __repr__(self) -> str:
        d_out, k = self.matrix_shape
        return f"{_name(self)}(({d_out}, {k}) matrices, {self.dtype})"


def _check_scale(op: Any, scale: float | Tensor) -> float:
    value = float(scale)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{_name(op)}: scale={value} must be finite and non-negative to keep the curvature PSD.")
    return value


@dataclass(frozen=True)
class DenseEigen:
    """``C = Q diag(λ) Qᵀ`` with a dense ``Q`` ``(n, n)`` and ``λ`` ``(n,)`` (``vec_r``
    order), presented on ``(d_out, k)`` matrices."""

    Q: Tensor
    lam: Tensor
    matrix_shape: tuple[int, int]

    @property
    def values(self) -> Tensor:
        return self.lam.reshape(self.matrix_shape)

    def rotate(self, x: Tensor) -> Tensor:
        flat = x.reshape(*x.shape[:-2], -1)
        return (flat @ self.Q).reshape(x.shape)

    def unrotate(self, x: Tensor) -> Tensor:
        flat = x.reshape(*x.shape[:-2], -1)
        return (flat @ self.Q.t()).reshape(x.shape)

    def to_dense(self) -> tuple[Tensor, Tensor]:
        return self.lam, self.Q

    def with_values(self, values: Tensor) -> DenseEigen:
        return DenseEigen(self.Q, values.reshape(-1), self.matrix_shape)

    def diagonal_of(self, values: Tensor) -> Tensor:
        """``diag(Q diag(values) Qᵀ)`` laid out like ``V``."""
        return ((self.Q**2) @ values.reshape(-1)).reshape(self.matrix_shape)


class SpectralOperator(BlockOperator):
    """``Q diag(values) Qᵀ`` in the eigenbasis of an :class:`OperatorEigen` (what
    :meth:`BlockOperator.power` returns): every quantity in closed form.

    Args:
        eigen: The basis (its ``values`` are replaced by ``values``).
        values: The new eigenvalues, shaped like ``eigen.values``.
    """

    def __init__(self, eigen: OperatorEigen, values: Tensor, *, label: str | None = None) -> None:
        if tuple(values.shape) != tuple(eigen.values.shape):
            raise ValueError(
                f"values of shape {tuple(values.shape)} do not match the basis {tuple(eigen.values.shape)}."
            )
        self.basis = eigen
        self.values = values
        self.label = label

    @property
    def matrix_shape(self) -> tuple[int, int]:
        d_out, k = self.values.shape
        return int(d_out), int(k)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def apply(self, v: Tensor) -> Tensor:
        return self.basis.unrotate(self.values * self.basis.rotate(v))

    def tensors(self) -> list[Tensor]:
        return [self.values]

    def eigen(self) -> OperatorEigen:
        with_values = getattr(self.basis, "with_values", None)
        if with_values is not None:
            return with_values(self.values)  # type: ignore[no-any-return]
        return _Reweighted(self.basis, self.values)

    def to_dense(self) -> Tensor:
        _, q = self.basis.to_dense()
        return (q * self.values.reshape(1, -1)) @ q.t()

    def diagonal(self) -> Tensor:
        of = getattr(self.basis, "diagonal_of", None)
        return of(self.values) if of is not None else super().diagonal()

    def trace(self) -> Tensor:
        return self.values.sum()

    def scaled(self, scale: float) -> SpectralOperator:
        return SpectralOperator(self.basis, self.values * _check_scale(self, scale), label=self.label)


@dataclass(frozen=True)
class _Reweighted:
    """An :class:`OperatorEigen`'s basis with other eigenvalues (for bases that cannot
    replace their own)."""

    basis: Any
    new_values: Tensor

    @property
    def values(self) -> Tensor:
        return self.new_values

    def rotate(self, x: Tensor) -> Tensor:
        return self.basis.rotate(x)  # type: ignore[no-any-return]

    def unrotate(self, x: Tensor) -> Tensor:
        return self.basis.unrotate(x)  # type: ignore[no-any-return]

    def to_dense(self) -> tuple[Tensor, Tensor]:
        return self.new_values.reshape(-1), self.basis.to_dense()[1]

    def with_values(self, values: Tensor) -> _Reweighted:
        return _Reweighted(self.basis, values)


class DenseOperator(BlockOperator):
    """A block given as a dense symmetric ``(n, n)`` matrix (``vec_r`` order of
    ``matrix_shape``), for blocks without structure and as a reference in tests."""

    def __init__(self, matrix: Tensor, matrix_shape: tuple[int, int], *, label: str | None = None) -> None:
        d_out, k = matrix_shape
        if tuple(matrix.shape) != (d_out * k, d_out * k):
            raise ValueError(
                f"a dense block for {matrix_shape} matrices must be {(d_out * k,) * 2}, got {tuple(matrix.shape)}."
            )
        self.matrix = matrix
        self._matrix_shape = (int(d_out), int(k))
        self.label = label

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self._matrix_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def apply(self, v: Tensor) -> Tensor:
        flat = v.reshape(*v.shape[:-2], -1)
        return (flat @ self.matrix.t()).reshape(v.shape)

    def tensors(self) -> list[Tensor]:
        return [self.matrix]

    def to_dense(self) -> Tensor:
        return self.matrix

    def scaled(self, scale: float) -> DenseOperator:
        return DenseOperator(self.matrix * _check_scale(self, scale), self._matrix_shape, label=self.label)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> DenseOperator:
        return DenseOperator(self.matrix.to(dtype=dtype, device=device), self._matrix_shape, label=self.label)


class ScaledOperator(BlockOperator):
    """``scale · C`` of another block operator (the default of :meth:`BlockOperator.scaled`)."""

    def __init__(self, inner: BlockOperator, scale: float) -> None:
        self.inner = inner
        self.scale = float(scale)
        self.label = inner.label

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.inner.matrix_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def apply(self, v: Tensor) -> Tensor:
        return self.inner.apply(v) * self.scale

    def tensors(self) -> list[Tensor]:
        return self.inner.tensors()

    def to_dense(self) -> Tensor:
        return self.inner.to_dense() * self.scale

    def diagonal(self) -> Tensor:
        return self.inner.diagonal() * self.scale

    def trace(self) -> Tensor:
        return self.inner.trace() * self.scale

    def eigen(self) -> OperatorEigen:
        eig = self.inner.eigen()
        values = eig.values * self.scale
        with_values: Callable[[Tensor], OperatorEigen] | None = getattr(eig, "with_values", None)
        return with_values(values) if with_values is not None else _Reweighted(eig, values)

    def scaled(self, scale: float) -> ScaledOperator:
        return ScaledOperator(self.inner, self.scale * _check_scale(self, scale))
