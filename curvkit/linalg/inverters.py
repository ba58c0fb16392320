r"""Inverters: turn a damped Kronecker pair ``(A, G)`` into something that applies its inverse.

An :class:`Inverter` acts on the *pair*, because exact damping of the product
(:class:`~curvkit.linalg.damping.ExactDamping`) couples the factors. It returns a
:class:`KroneckerInverse` whose :meth:`~KroneckerInverse.apply` maps a gradient in matrix
form ``(d_out, d_in)`` to :math:`(G\otimes A + \text{damping})^{-1}` applied to it, i.e.
:math:`\tilde G^{-1}\nabla\tilde A^{-1}` for factored damping.

Each inverter declares the damping kinds it supports in :attr:`Inverter.supports`;
:func:`check_compatible` refuses an incompatible pair when a method is built.

Numerics: decompositions run in float32 at least (bf16 and fp16 factors are upcast, since
``eigh`` and ``cholesky`` do not accept them); a failure retries in float64; if that fails
too the inverter returns ``None`` and the caller keeps its last good inverse (and counts
the failure). Nothing non-finite is ever returned.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.errors import IncompatibleComponentsError
from curvkit.linalg.damping import Damping
from curvkit.linalg.roots import compute_dtype, symmetric_eigh
from curvkit.numerics import all_finite
from curvkit.structures.base import FactorStructure

__all__ = [
    "CholeskyInverter",
    "EigenInverse",
    "EigenInverter",
    "FactoredInverse",
    "IdentityInverse",
    "IdentityInverter",
    "Inverter",
    "KroneckerInverse",
    "check_compatible",
    "compute_dtype",
    "damping_only_inverse",
    "inverse_from_state",
    "inverse_from_tensors",
    "inverse_state",
    "symmetric_eigh",
]


class KroneckerInverse:
    """Applies a damped Kronecker inverse to gradients in matrix form.

    Subclasses set a unique :attr:`kind` and implement :meth:`apply`, :meth:`tensors` and
    :meth:`from_tensors`; the plugin that defines one registers it
    (:func:`~curvkit.hookspecs.curvkit_register_inverses`), so :func:`inverse_from_tensors`
    (``state_dict`` round trips of a block) finds it in the registry.
    """

    kind: ClassVar[str] = ""

    def apply(self, grad: Tensor) -> Tensor:
        raise NotImplementedError

    def batch_key(self) -> Hashable | None:
        """Inverses of one class with equal keys (not ``None``) can be applied together by
        :meth:`apply_many` (the preconditioner stacks equal-shaped layers); ``None`` (the
        default): on its own."""
        return None

    @classmethod
    def apply_many(cls, inverses: Sequence[KroneckerInverse], grads: Tensor) -> Tensor:
        """:meth:`apply` of each inverse to its slice of a ``(B, d_out, d_in)`` stack, as one
        ``(B, d_out, d_in)`` tensor (batched products where a subclass can; equal to applying
        them one at a time)."""
        return torch.stack([inv.apply(g) for inv, g in zip(inverses, grads.unbind(0))])

    def with_product_dtype(self, dtype: torch.dtype | None) -> KroneckerInverse | None:
        """This inverse with its dense products taking their operands in ``dtype``
        (``torch.bfloat16``: bf16 operands, float32 accumulation), the stored tensors
        unchanged; ``None`` when the class has no such products (the default, for any
        ``dtype`` but ``None``, which returns the inverse itself)."""
        return self if dtype is None else None

    def tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> KroneckerInverse:
        raise NotImplementedError


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (itself, without a call into torch, when it already is: this is
    the hot path of every step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _left(mat: Tensor, m: Tensor) -> Tensor:
    """``mat @ m`` where ``mat`` is a dense matrix or the vector of a diagonal one (a dense
    product takes ``m`` in ``mat``'s dtype)."""
    return mat.unsqueeze(1) * m if mat.ndim == 1 else mat @ _as(m, mat.dtype)


def _right(m: Tensor, mat: Tensor) -> Tensor:
    return m * mat if mat.ndim == 1 else _as(m, mat.dtype) @ mat


def _lowered(mat: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A dense matrix's copy in the product dtype (a diagonal, or no product dtype: itself)."""
    return mat if dtype is None or mat.ndim != 2 or not mat.numel() else mat.to(dtype)


class FactoredInverse(KroneckerInverse):
    r""":math:`\Delta = \tilde G^{-1}\nabla\tilde A^{-1}` with stored inverses (dense
    matrices or diagonals)."""

    kind = "factored"

    def __init__(self, A_inv: Tensor, G_inv: Tensor, *, product_dtype: torch.dtype | None = None) -> None:
        self.A_inv = A_inv
        self.G_inv = G_inv
        #: dtype of the products' operands (``None``: the inverses' own); the dense
        #: inverses' copies in it are made once, here.
        self.product_dtype = product_dtype
        self._A = _lowered(A_inv, product_dtype)
        self._G = _lowered(G_inv, product_dtype)

    def apply(self, grad: Tensor) -> Tensor:
        return _as(_right(_left(self._G, _as(grad, self.A_inv.dtype)), self._A), grad.dtype)

    def with_product_dtype(self, dtype: torch.dtype | None) -> FactoredInverse:
        return self if dtype == self.product_dtype else FactoredInverse(self.A_inv, self.G_inv, product_dtype=dtype)

    def batch_key(self) -> Hashable | None:
        a, g = self.A_inv, self.G_inv
        if a.ndim != 2 or g.ndim != 2 or a.dtype != g.dtype or a.device != g.device:
            return None
        return (tuple(a.shape), tuple(g.shape), a.dtype, a.device, self.product_dtype)

    @classmethod
    def apply_many(cls, inverses: Sequence[KroneckerInverse], grads: Tensor) -> Tensor:
        """``G̃⁻¹ ∇ Ã⁻¹`` for a stack: two batched products (in the product dtype)."""
        g_inv = torch.stack([inv._G for inv in inverses])  # type: ignore[attr-defined]
        a_inv = torch.stack([inv._A for inv in inverses])  # type: ignore[attr-defined]
        return torch.matmul(torch.matmul(g_inv, grads.to(a_inv.dtype)), a_inv).to(grads.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"A_inv": self.A_inv, "G_inv": self.G_inv}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> FactoredInverse:
        return cls(tensors["A_inv"], tensors["G_inv"])


class EigenInverse(KroneckerInverse):
    r"""Division in a Kronecker eigenbasis:
    :math:`\Delta = Q_G[(Q_G^\top\nabla Q_A)\oslash D]Q_A^\top`.

    ``Q_A``/``Q_G`` may be empty tensors, meaning the identity (diagonal factors). ``D``
    is the ``(d_out, d_in)`` matrix of damped eigenvalues of the product (K-FAC:
    :math:`(\lambda_G + s_G)(\lambda_A + s_A)^\top` or
    :math:`\lambda_G\lambda_A^\top + \lambda`; EKFAC: corrected eigenvalues plus ε).
    """

    kind = "eigen"

    def __init__(
        self, Q_A: Tensor, Q_G: Tensor, denominator: Tensor, *, product_dtype: torch.dtype | None = None
    ) -> None:
        self.Q_A = Q_A
        self.Q_G = Q_G
        self.denominator = denominator
        #: dtype of the rotations' operands (``None``: the bases' own); the division by
        #: the eigenvalues stays in the denominator's dtype.
        self.product_dtype = product_dtype
        self._QA = _lowered(Q_A, product_dtype)
        self._QG = _lowered(Q_G, product_dtype)

    def with_product_dtype(self, dtype: torch.dtype | None) -> EigenInverse:
        if dtype == self.product_dtype:
            return self
        return EigenInverse(self.Q_A, self.Q_G, self.denominator, product_dtype=dtype)

    def rotate(self, grad: Tensor) -> Tensor:
        """:math:`Q_G^\\top \\nabla Q_A` (into the eigenbasis), in the denominator's dtype."""
        m = _as(grad, self.denominator.dtype)
        if self._QG.numel():
            m = self._QG.t() @ _as(m, self._QG.dtype)
        if self._QA.numel():
            m = _as(m, self._QA.dtype) @ self._QA
        return _as(m, self.denominator.dtype)

    def unrotate(self, m: Tensor) -> Tensor:
        if self._QG.numel():
            m = self._QG @ _as(m, self._QG.dtype)
        if self._QA.numel():
            m = _as(m, self._QA.dtype) @ self._QA.t()
        return m

    def apply(self, grad: Tensor) -> Tensor:
        m = self.rotate(grad)
        # in place where the rotation made a new tensor; never into the caller's gradient
        m = m.div(self.denominator) if m is grad else m.div_(self.denominator)
        return _as(self.unrotate(m), grad.dtype)

    def batch_key(self) -> Hashable | None:
        qa, qg, d = self.Q_A, self.Q_G, self.denominator
        if qa.ndim != 2 or qg.ndim != 2 or not qa.numel() or not qg.numel():
            return None
        if not qa.dtype == qg.dtype == d.dtype or not qa.device == qg.device == d.device:
            return None
        return (tuple(qa.shape), tuple(qg.shape), tuple(d.shape), d.dtype, d.device, self.product_dtype)

    @classmethod
    def apply_many(cls, inverses: Sequence[KroneckerInverse], grads: Tensor) -> Tensor:
        """``Q_G[(Q_Gᵀ∇Q_A) ⊘ D]Q_Aᵀ`` for a stack: four batched products (in the product
        dtype; the division in the denominator's)."""
        q_g = torch.stack([inv._QG for inv in inverses])  # type: ignore[attr-defined]
        q_a = torch.stack([inv._QA for inv in inverses])  # type: ignore[attr-defined]
        den = torch.stack([inv.denominator for inv in inverses])  # type: ignore[attr-defined]
        m = torch.matmul(torch.matmul(q_g.mT, grads.to(q_g.dtype)), q_a).to(den.dtype).div_(den)
        return torch.matmul(torch.matmul(q_g, m.to(q_g.dtype)), q_a.mT).to(grads.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"Q_A": self.Q_A, "Q_G": self.Q_G, "denominator": self.denominator}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> EigenInverse:
        return cls(tensors["Q_A"], tensors["Q_G"], tensors["denominator"])


class IdentityInverse(KroneckerInverse):
    """The identity: preconditioning is switched off."""

    kind = "identity"

    def apply(self, grad: Tensor) -> Tensor:
        return grad

    def with_product_dtype(self, dtype: torch.dtype | None) -> IdentityInverse:
        return self  # no products

    def tensors(self) -> dict[str, Tensor]:
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> IdentityInverse:
        return cls()


def inverse_from_tensors(kind: str, tensors: dict[str, Tensor], *, registry: Any = None) -> KroneckerInverse:
    """Rebuild a stored :class:`KroneckerInverse` (``state_dict`` round trip), its class
    found by ``kind`` in ``registry``'s ``inverses`` (default:
    :func:`~curvkit.registry.active_registry`, the preconditioner's own while it loads).

    Raises:
        ValueError: No registered inverse has that kind (the message lists those that do).
    """
    from curvkit.registry import active_registry

    table = (registry if registry is not None else active_registry()).inverses
    if kind not in table:
        raise ValueError(
            f"unknown inverse kind {kind!r} in a state_dict; registered: {', '.join(sorted(table))}. Is the plugin "
            "that defines it installed and loaded, and does it register the class (curvkit_register_inverses)?"
        )
    return table.get(kind).from_tensors(tensors)


def inverse_state(inverse: KroneckerInverse | None) -> dict[str, Any]:
    """The entries a block's ``state_dict`` (or ``refresh_state``) stores for its cached
    inverse: ``{"inverse_kind", "inverse"}``, none for ``None``."""
    if inverse is None:
        return {}
    return {"inverse_kind": inverse.kind, "inverse": dict(inverse.tensors())}


def inverse_from_state(state: dict[str, Any], *, clone: bool = True, registry: Any = None) -> KroneckerInverse | None:
    """Inverse of :func:`inverse_state` (any registered kind, see
    :func:`inverse_from_tensors`): the inverse, or ``None`` when ``state`` holds none.
    ``clone=False`` keeps the given tensors."""
    if "inverse" not in state:
        return None
    tensors = {k: v.clone() if clone else v for k, v in state["inverse"].items()}
    return inverse_from_tensors(state["inverse_kind"], tensors, registry=registry)


class Inverter:
    """Base of the inverters.

    Attributes:
        name: Registered name.
        supports: Damping kinds it can apply (``"factored"``, ``"eigenbasis"``).
    """

    name: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset()

    def prepare(self, A: FactorStructure, G: FactorStructure, damping: Damping, lam: float) -> KroneckerInverse | None:
        """The damped inverse of ``G ⊗ A``, or ``None`` if the decomposition failed."""
        raise NotImplementedError


def _shifted(factor: FactorStructure, shift: float, dtype: torch.dtype) -> Tensor:
    if factor.is_diagonal:
        return factor.diagonal().to(dtype) + shift
    m = factor.to_dense().to(dtype)
    return m + shift * torch.eye(m.shape[0], dtype=dtype, device=m.device)


def _cholesky_inverse(m: Tensor) -> Tensor | None:
    """Inverse of an SPD matrix (or positive diagonal), retrying in float64; ``None`` on
    failure."""
    for dtype in (m.dtype, torch.float64) if m.dtype != torch.float64 else (torch.float64,):
        x = m.to(dtype)
        if x.ndim == 1:
            inv = 1.0 / x
            ok = bool((x > 0).all()) and all_finite(inv)
        else:
            chol, info = torch.linalg.cholesky_ex(x)
            if int(info) != 0:
                continue
            inv = torch.cholesky_inverse(chol)
            ok = all_finite(inv)
        if ok:
            return inv.to(m.dtype)
    return None


class CholeskyInverter(Inverter):
    """Dense Cholesky inverse of each damped factor (factored damping only).

    The cheapest exact inverter (a Cholesky factorisation is several times faster than
    ``eigh``). A factorisation that fails in the working precision is retried in float64.
    """

    name = "cholesky"
    supports = frozenset({"factored"})

    def prepare(self, A: FactorStructure, G: FactorStructure, damping: Damping, lam: float) -> KroneckerInverse | None:
        dtype = compute_dtype(A.dtype)
        s_a, s_g = damping.factor_shifts(A, G, lam)
        a_inv = _cholesky_inverse(_shifted(A, s_a, dtype))
        g_inv = _cholesky_inverse(_shifted(G, s_g, dtype))
        if a_inv is None or g_inv is None:
            return None
        return FactoredInverse(a_inv, g_inv)


class EigenInverter(Inverter):
    """Symmetric eigendecomposition of each factor; supports factored damping and exact
    (eigenbasis) damping of the product."""

    name = "eigh"
    supports = frozenset({"factored", "eigenbasis"})

    def prepare(self, A: FactorStructure, G: FactorStructure, damping: Damping, lam: float) -> KroneckerInverse | None:
        return self.from_eigen(A, G, symmetric_eigh(A), symmetric_eigh(G), damping, lam)

    @staticmethod
    def from_eigen(
        A: FactorStructure,
        G: FactorStructure,
        ea: tuple[Tensor, Tensor] | None,
        eg: tuple[Tensor, Tensor] | None,
        damping: Damping,
        lam: float,
    ) -> EigenInverse | None:
        """The damped inverse from decompositions ``(eigenvalues, eigenvectors)`` of ``A``
        and ``G`` computed elsewhere (a warm start, :mod:`curvkit.linalg.basis`); ``None``
        when either is ``None`` or a damped eigenvalue is not positive."""
        if ea is None or eg is None:
            return None
        (eig_a, q_a), (eig_g, q_g) = ea, eg
        if damping.kind == "eigenbasis":
            denom = torch.outer(eig_g, eig_a) + damping.product_shift(eig_a, eig_g, lam)
        else:
            s_a, s_g = damping.factor_shifts(A, G, lam)
            denom = torch.outer(eig_g + s_g, eig_a + s_a)
        if not bool((denom > 0).all()):
            return None
        return EigenInverse(q_a, q_g, denom)


class IdentityInverter(Inverter):
    """No preconditioning: the gradient passes unchanged (for tests and ablations; with it
    a curvature optimizer reproduces ``torch.optim.SGD``)."""

    name = "identity"
    supports = frozenset({"factored", "eigenbasis"})

    def prepare(self, A: FactorStructure, G: FactorStructure, damping: Damping, lam: float) -> KroneckerInverse | None:
        return IdentityInverse()


def damping_only_inverse(
    d_in: int, d_out: int, damping: Damping, lam: float, *, dtype: torch.dtype, device: torch.device | str | None = None
) -> KroneckerInverse:
    r"""The inverse of the damping alone (zero factors), built **without a decomposition**:
    the fallback of a block whose very first refresh failed.

    A factored damping gives :math:`\Delta = \nabla / (s_A s_G)` with its shifts of zero
    factors; an eigenbasis damping :math:`\Delta = \nabla / \lambda_{\text{eff}}`; a
    damping without a valid (finite, positive) shift of zero factors, e.g. one relative to
    the factors' largest eigenvalue, the identity (:math:`\Delta = \nabla`)."""
    from curvkit.structures.base import DiagonalStructure

    dtype = compute_dtype(dtype)
    try:
        if damping.kind == "eigenbasis":
            zero_a = torch.zeros(d_in, dtype=dtype, device=device)
            zero_g = torch.zeros(d_out, dtype=dtype, device=device)
            shift = float(damping.product_shift(zero_a, zero_g, lam))
            if shift > 0 and math.isfinite(shift):
                empty = torch.empty(0, dtype=dtype, device=device)
                return EigenInverse(empty, empty.clone(), torch.full((d_out, d_in), shift, dtype=dtype, device=device))
        else:
            none_a = DiagonalStructure(torch.zeros(d_in, dtype=dtype, device=device))
            none_g = DiagonalStructure(torch.zeros(d_out, dtype=dtype, device=device))
            s_a, s_g = (float(v) for v in damping.factor_shifts(none_a, none_g, lam))
            if s_a > 0 and s_g > 0 and math.isfinite(s_a) and math.isfinite(s_g):
                return FactoredInverse(
                    torch.full((d_in,), 1.0 / s_a, dtype=dtype, device=device),
                    torch.full((d_out,), 1.0 / s_g, dtype=dtype, device=device),
                )
    except (ValueError, ZeroDivisionError, RuntimeError, NotImplementedError):
        pass
    return IdentityInverse()


def check_compatible(inverter: Any, damping: Damping, *, registry: Any = None) -> None:
    """Raise :class:`~curvkit.errors.IncompatibleComponentsError` unless ``inverter`` can
    apply ``damping``; the message lists the pairs that work."""
    if damping.kind in inverter.supports:
        return
    pairs = []
    if registry is not None:
        for inv_name in registry.inverters:
            inv = registry.inverters.get(inv_name)
            kinds = sorted(getattr(inv, "supports", ()))
            pairs.append(f"{inv_name!r} with {' or '.join(kinds)} dampings")
    hint = f" Pairs that work: {'; '.join(pairs)}." if pairs else ""
    raise IncompatibleComponentsError(
        f"inverter {inverter.name!r} cannot apply {type(damping).__name__} (a {damping.kind!r} damping); "
        f"it supports {', '.join(sorted(inverter.supports))} dampings.{hint} "
        "Exact and product-relative dampings need inverter='eigh'."
    )
