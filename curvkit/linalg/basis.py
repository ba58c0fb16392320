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
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_refresh_tolerance", "off_diagonal_fraction", "reuse_basis"]


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
