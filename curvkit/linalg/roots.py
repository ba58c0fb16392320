r"""Symmetric eigendecompositions and matrix powers for plugins: inverse roots done safely.

Methods beyond K-FAC need powers of symmetric positive semi-definite matrices: Shampoo's
:math:`L^{-1/4}`, a square-root parameterisation, a damped inverse. These helpers do what
curvkit's own inverters do, so a plugin need not rediscover it:

* the decomposition runs in float32 at least (bf16/fp16 are upcast, since ``eigh`` does
  not accept them) and is **retried in float64** when it fails or returns non-finite
  values;
* eigenvalues are **clamped at 0** (a PSD matrix's small negative eigenvalues are
  rounding), and a diagonal :class:`~curvkit.structures.FactorStructure` takes the
  elementwise path;
* a failure returns ``None`` instead of raising, so a block keeps its last good result and
  counts the failure (``inverse_failures``), as curvkit's blocks do; nothing non-finite is
  returned.

Example (Shampoo's preconditioner of a layer with statistics ``L``, ``R``)::

    from curvkit.linalg import inverse_root

    L_root = inverse_root(L, 4, shift=eps)      # (L + εI)^{-1/4}, or None
    R_root = inverse_root(R, 4, shift=eps)
    if L_root is not None and R_root is not None:
        self.L_root, self.R_root = L_root, R_root
    direction = self.L_root @ grad @ self.R_root
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.numerics import all_finite
from curvkit.structures.base import FactorStructure

__all__ = ["compute_dtype", "inverse_root", "matrix_power", "symmetric_eigh"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decompositions run in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def symmetric_eigh(factor: FactorStructure | Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (clamped at 0, ascending) and eigenvectors of a symmetric PSD matrix.

    Args:
        factor: A ``(d, d)`` tensor (or a batch ``(..., d, d)``) or a factor structure.

    Returns:
        ``(eigenvalues, eigenvectors)`` in float32, or float64 for a float64 input (the
        decomposition is retried in float64 when the working precision fails); a diagonal
        factor structure gives its clamped diagonal and an empty eigenvector tensor (the
        identity). ``None`` if the decomposition fails in float64 too or is not finite.
    """
    if isinstance(factor, FactorStructure) and factor.is_diagonal:
        d = factor.diagonal().to(compute_dtype(factor.dtype))
        return d.clamp_min(0), d.new_empty(0)
    m = factor.to_dense() if isinstance(factor, FactorStructure) else factor
    dtype = compute_dtype(m.dtype)
    for attempt in (dtype, torch.float64) if dtype != torch.float64 else (torch.float64,):
        try:
            evals, evecs = torch.linalg.eigh(m.to(attempt))
        except RuntimeError:  # torch raises on non-convergence
            continue
        if all_finite(evals) and all_finite(evecs):
            return evals.clamp_min(0).to(dtype), evecs.to(dtype)
    return None


def matrix_power(matrix: FactorStructure | Tensor, power: float, *, shift: float = 0.0) -> Tensor | None:
    r""":math:`(M + sI)^{p}` of a symmetric PSD matrix ``M`` through its eigendecomposition,
    :math:`Q\,\operatorname{diag}((\lambda + s)^p)\,Q^\top` (:func:`symmetric_eigh`).

    Args:
        matrix: ``(d, d)`` (or a batch ``(..., d, d)``), or a factor structure (a diagonal one
            gives the ``(d,)`` diagonal of the result).
        power: Any real ``p``; a negative one needs ``shift > 0`` or a positive definite ``M``.
        shift: ``s ≥ 0`` added to every (clamped) eigenvalue: the damping.

    Returns:
        The matrix in float32 (float64 for a float64 input), or ``None`` when the
        decomposition fails or the result is not finite (e.g. a negative power of a singular
        matrix without shift).

    Raises:
        ValueError: ``shift`` is negative or not finite.
    """
    shift = float(shift)
    if not shift >= 0.0 or shift == float("inf"):
        raise ValueError(f"shift={shift!r} must be a finite float >= 0 (added to every eigenvalue).")
    eig = symmetric_eigh(matrix)
    if eig is None:
        return None
    values, vectors = eig
    scaled = (values + shift).pow(float(power))
    if not all_finite(scaled):
        return None
    if vectors.numel() == 0:  # a diagonal structure
        return scaled
    out = (vectors * scaled.unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return out if all_finite(out) else None


def inverse_root(matrix: FactorStructure | Tensor, root: float, *, shift: float = 0.0) -> Tensor | None:
    r""":math:`(M + sI)^{-1/r}`: the inverse ``root``-th root (``root=4``: Shampoo's
    :math:`L^{-1/4}`; ``root=1``: the damped inverse). See :func:`matrix_power`.

    Raises:
        ValueError: ``root`` is not a positive number, or ``shift`` is negative.
    """
    root = float(root)
    if not root > 0.0 or root == float("inf"):
        raise ValueError(f"root={root!r} must be a finite number > 0 (the r of M^(-1/r)).")
    return matrix_power(matrix, -1.0 / root, shift=shift)
