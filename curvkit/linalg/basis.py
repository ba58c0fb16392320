r"""Reusing an eigenbasis: skip an eigendecomposition while the old basis still diagonalises
the new factor (Distributed Shampoo's adaptive refresh frequency, for curvkit's blocks).

For a factor ``F`` (symmetric PSD) and the orthogonal eigenvectors ``Q`` of an earlier value,
``R = Qᵀ F Q`` is diagonal exactly when ``Q`` is still an eigenbasis of ``F``. Its relative
off-diagonal mass

.. math:: \epsilon = \frac{\lVert R - \operatorname{diag}(R)\rVert_F}{\lVert R\rVert_F}

measures how far it is from one. When :math:`\epsilon \le` ``tolerance`` a refresh can keep
``Q`` and take ``diag(R)`` (the Rayleigh quotients, clamped at 0) as the eigenvalues: two
GEMMs instead of an eigendecomposition. ``tolerance = 0`` never reuses (every refresh
decomposes), so it is exactly the behaviour without the option.

A **warm start** (``eigensolver="warm"``, :class:`WarmEigensolver`) goes one step further
when the old basis fails that test: a few steps of orthogonal iteration from it
(:func:`warm_eigh`, as SOAP and Distributed Shampoo refresh their bases), accepted when the
new basis reproduces the factor within ``warm_tolerance``, else the exact ``eigh``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvkit.linalg.roots import compute_dtype, symmetric_eigh
from curvkit.numerics import all_finite
from curvkit.structures.base import FactorStructure

__all__ = [
    "EIGENSOLVERS",
    "WarmEigensolver",
    "check_eigensolver",
    "check_refresh_tolerance",
    "off_diagonal_fraction",
    "reuse_basis",
    "warm_eigensolver",
    "warm_eigh",
]


def off_diagonal_fraction(factor: Tensor, basis: Tensor) -> tuple[float, Tensor]:
    """``(ε, diag(QᵀFQ))`` for a dense symmetric ``factor`` and orthogonal ``basis``
    (computed in the basis' dtype, at least float32)."""
    dtype = torch.promote_types(basis.dtype, torch.float32)
    q = basis.to(dtype)
    r = q.T @ factor.to(dtype) @ q
    d = torch.diagonal(r)
    total = float(torch.linalg.matrix_norm(r))
    off_sq = max(total * total - float(d.square().sum()), 0.0)
    eps = math.sqrt(off_sq) / total if total > 0 else 0.0
    return eps, d


def reuse_basis(factor: Any, basis: Tensor | None, tolerance: float) -> Tensor | None:
    """The new eigenvalues ``diag(QᵀFQ)`` (clamped at 0) when ``basis`` still diagonalises
    ``factor`` (a :class:`~curvkit.structures.FactorStructure` or a dense tensor) within
    ``tolerance``; ``None`` when a new decomposition is needed (``tolerance <= 0``, no
    basis yet, an identity basis of a diagonal factor, or ε above the tolerance, or a
    non-finite rotation)."""
    if tolerance <= 0 or basis is None or basis.numel() == 0:
        return None
    dense = factor.to_dense() if hasattr(factor, "to_dense") else factor
    eps, d = off_diagonal_fraction(dense, basis)
    if not (math.isfinite(eps) and bool(torch.isfinite(d).all())) or eps > tolerance:
        return None
    return d.clamp_min(0)


def check_refresh_tolerance(problems: list[str], value: object, name: str = "refresh_tolerance") -> None:
    """Append a message unless ``value`` is a float in ``[0, 1)``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or not 0.0 <= float(value) < 1.0:  # type: ignore[arg-type]
        problems.append(
            f"{name}={value!r} must be a float in [0.0, 1.0): the largest relative off-diagonal mass "
            "‖QᵀFQ − diag‖/‖QᵀFQ‖ at which a refresh keeps the old eigenbasis (0: always decompose; e.g. 0.05)"
        )


# --- warm-started eigendecompositions ------------------------------------------------------

#: Legal values of a method's ``eigensolver`` option.
EIGENSOLVERS = ("exact", "warm")


def warm_eigh(factor: Tensor, basis: Tensor, *, tolerance: float, iterations: int = 1) -> tuple[Tensor, Tensor] | None:
    r"""Eigenvalues (clamped at 0) and eigenvectors of a dense symmetric PSD
    ``factor`` by orthogonal (subspace) iteration from an earlier eigenbasis ``basis``, or
    ``None`` when they do not reach ``tolerance`` within ``iterations`` steps.

    Each round takes the Rayleigh quotients :math:`\lambda = \operatorname{diag}(Q^\top FQ)`
    of the current orthogonal ``Q`` and measures the relative reconstruction error

    .. math:: \epsilon = \frac{\lVert F - Q\operatorname{diag}(\lambda)Q^\top\rVert_F}{\lVert F\rVert_F}
        = \frac{\lVert FQ - Q\operatorname{diag}(\lambda)\rVert_F}{\lVert F\rVert_F}
        = \frac{\lVert\operatorname{offdiag}(Q^\top FQ)\rVert_F}{\lVert F\rVert_F}

    (one product :math:`FQ`; the residual form has no cancellation). It returns
    :math:`(\lambda, Q)` as soon as :math:`\epsilon \le` ``tolerance`` — the earlier basis
    itself when it still passes — else, while rounds are left, it sorts the columns by
    :math:`\lambda` (largest first, so the QR keeps the dominant directions) and takes one
    step of orthogonal iteration, :math:`Q \leftarrow \operatorname{qr}(FQ)`. ``iterations``
    steps cost ``iterations`` QR factorisations and ``iterations + 1`` products ``FQ``.

    The pairs come in no particular order (the basis' own when it passed, else by decreasing
    eigenvalue; nothing downstream needs ``eigh``'s ascending order, and reordering the
    columns would cost a third of a product). Computed in float32 at least (float64 for a
    float64 input or basis). ``None`` also for a basis of another shape, or a non-finite
    result.
    """
    out = _orthogonal_iteration(factor, basis, tolerance, iterations)
    return None if out is None else (out[0], out[1])


def _orthogonal_iteration(
    factor: Tensor, basis: Tensor, tolerance: float, iterations: int
) -> tuple[Tensor, Tensor, int] | None:
    """:func:`warm_eigh` plus the number of QR steps it took (0: the basis itself passed)."""
    d = factor.shape[-1]
    if factor.ndim != 2 or basis.shape != (d, d) or d == 0:
        return None
    dtype = compute_dtype(torch.promote_types(factor.dtype, basis.dtype))
    f = factor.to(dtype)
    q = basis.to(dtype)
    norm = float(torch.linalg.matrix_norm(f))
    if not math.isfinite(norm):
        return None
    for round_ in range(iterations + 1):
        fq = f @ q
        lam = (q * fq).sum(0)
        if norm == 0.0:
            break
        residual = float(torch.linalg.matrix_norm(fq - q * lam))
        if not math.isfinite(residual):
            return None
        if residual <= tolerance * norm:
            break
        if round_ == iterations:
            return None
        order = lam.argsort(descending=True)
        q, _ = torch.linalg.qr(fq[:, order])
    if not (all_finite(lam) and all_finite(q)):
        return None
    return lam.clamp_min(0), q, round_


class WarmEigensolver:
    """A block's eigendecompositions at a refresh, warm-started from its previous basis
    (:func:`warm_eigh`) with a fallback to the exact :func:`~curvkit.linalg.roots.symmetric_eigh`
    on the first refresh, for a basis of another shape (or none), and whenever the warm
    result misses ``tolerance`` or is not finite.

    Attributes:
        tolerance: The largest relative reconstruction error accepted from a warm start.
        iterations: Steps of orthogonal iteration at most.
        warm: Factor decompositions this process took from a warm start (not checkpointed).
        kept: Of those, the ones where the previous basis itself passed (no QR step).
        exact: Dense factor decompositions that ran the exact ``eigh`` (not checkpointed;
            a diagonal factor is not decomposed and counts in neither).
    """

    def __init__(self, tolerance: float = 0.05, iterations: int = 1) -> None:
        self.tolerance = float(tolerance)
        self.iterations = int(iterations)
        self.warm = 0
        self.kept = 0
        self.exact = 0

    def decompose(self, factor: Any, basis: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``(eigenvalues, eigenvectors)`` of ``factor`` (a
        :class:`~curvkit.structures.FactorStructure` or a dense tensor) as
        :func:`~curvkit.linalg.roots.symmetric_eigh` returns them (a warm start's in no
        particular order), warm-started from ``basis`` where possible; ``None`` when the
        exact decomposition fails too."""
        if isinstance(factor, FactorStructure) and factor.is_diagonal:
            return symmetric_eigh(factor)
        dense = factor.to_dense() if isinstance(factor, FactorStructure) else factor
        if basis is not None and basis.numel():
            out = _orthogonal_iteration(dense, basis, self.tolerance, self.iterations)
            if out is not None:
                self.warm += 1
                self.kept += out[2] == 0
                dtype = compute_dtype(dense.dtype)
                return out[0].to(dtype), out[1].to(dtype)
        self.exact += 1
        return symmetric_eigh(dense)

    def describe(self) -> str:
        return (
            f"warm eigensolver: {self.warm} warm ({self.kept} kept the basis) / {self.exact} exact decompositions "
            f"(tolerance {self.tolerance:g}, {self.iterations} iteration(s))"
        )


def warm_eigensolver(config: Any) -> WarmEigensolver | None:
    """The :class:`WarmEigensolver` of a configuration with ``eigensolver="warm"`` (its
    ``warm_tolerance`` and ``warm_iterations``); ``None`` for ``"exact"`` or a configuration
    without the option."""
    if getattr(config, "eigensolver", "exact") != "warm":
        return None
    return WarmEigensolver(config.warm_tolerance, config.warm_iterations)


def check_eigensolver(problems: list[str], eigensolver: object, tolerance: object, iterations: object) -> None:
    """Append messages for bad ``eigensolver`` / ``warm_tolerance`` / ``warm_iterations``."""
    if eigensolver not in EIGENSOLVERS:
        problems.append(
            f"eigensolver={eigensolver!r} must be one of {', '.join(map(repr, EIGENSOLVERS))}: 'exact' (default) runs "
            "eigh at every refresh, 'warm' starts from the previous eigenbasis (orthogonal iteration) and falls back "
            "to eigh when it misses warm_tolerance"
        )
    ok = isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and math.isfinite(float(tolerance))
    if not ok or not 0.0 < float(tolerance) < 1.0:  # type: ignore[arg-type]
        problems.append(
            f"warm_tolerance={tolerance!r} must be a float in (0.0, 1.0): the largest relative reconstruction error "
            "‖F − Q diag(λ) Qᵀ‖/‖F‖ accepted from a warm-started eigenbasis before falling back to eigh (e.g. 0.05)"
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        problems.append(
            f"warm_iterations={iterations!r} must be an int >= 0: the steps of orthogonal iteration (one QR "
            "each) a warm start may take before falling back to eigh (0: only keep the previous basis when it "
            "passes; e.g. 1)"
        )
