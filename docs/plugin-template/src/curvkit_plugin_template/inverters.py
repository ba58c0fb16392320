r"""An inverter: damped factors inverted by the Newton–Schulz iteration.

For a symmetric positive definite :math:`M` the iteration

.. math:: X_0 = \frac{M}{\lVert M\rVert_1 \lVert M\rVert_\infty}, \qquad
          X_{k+1} = X_k\,(2I - M X_k)

converges quadratically to :math:`M^{-1}` (Schulz 1933; Pan & Schreiber 1991, whose
scaling of :math:`X_0` guarantees :math:`\lVert I - M X_0\rVert_2 < 1`). It uses only
matrix products, which is why it is popular on accelerators. This inverter applies it to
each *damped* factor, :math:`\tilde A = A + s_A I` and :math:`\tilde G = G + s_G I`, with
the shifts :math:`s_A, s_G` of a factored damping strategy (``PiDamping``,
``ConstantDamping``), and returns curvkit's
:class:`~curvkit.linalg.FactoredInverse`, which applies
:math:`\tilde G^{-1}\nabla\tilde A^{-1}`.

An inverter's contract (see :class:`curvkit.linalg.Inverter`): a registered ``name``, the
damping kinds it ``supports``, and ``prepare(A, G, damping, lam)`` returning a
:class:`~curvkit.linalg.KroneckerInverse`, or ``None`` when it fails (the optimizer then
keeps its last good inverse and counts the failure). It must never return something
non-finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg import FactoredInverse, Inverter
from curvkit.linalg.damping import Damping
from curvkit.structures import FactorStructure

__all__ = ["NewtonSchulzInverter", "newton_schulz_inverse"]


def newton_schulz_inverse(matrix: Tensor, *, max_iter: int = 100, tol: float | None = None) -> Tensor | None:
    """The inverse of an SPD ``matrix`` by Newton–Schulz, or ``None`` if it did not converge.

    Stops when the residual :math:`\\lVert I - M X\\rVert_F / \\sqrt{d}` falls below ``tol``
    (default: 100 machine epsilons of the dtype) or after ``max_iter`` iterations.
    """
    d = matrix.shape[0]
    eye = torch.eye(d, dtype=matrix.dtype, device=matrix.device)
    tol = 100 * torch.finfo(matrix.dtype).eps if tol is None else tol
    norm = torch.linalg.matrix_norm(matrix, ord=1) * torch.linalg.matrix_norm(matrix, ord=float("inf"))
    if not bool(torch.isfinite(norm)) or float(norm) <= 0:
        return None
    x = matrix / norm  # matrix is symmetric, so matrix.T == matrix
    for _ in range(max_iter):
        residual = eye - matrix @ x
        if float(torch.linalg.matrix_norm(residual)) / d**0.5 <= tol:
            return x
        x = x + x @ residual  # == x (2I - M x)
    return None


class NewtonSchulzInverter(Inverter):
    """Newton–Schulz inverse of each damped factor (factored damping only).

    Args:
        max_iter: Iterations before giving up on a factor (the optimizer then keeps its
            last good inverse).
    """

    name = "template_newton_schulz"
    supports = frozenset({"factored"})

    def __init__(self, max_iter: int = 100) -> None:
        self.max_iter = max_iter

    def _inverse(self, factor: FactorStructure, shift: float) -> Tensor | None:
        # Newton-Schulz needs float32 at least; a failure retries in float64.
        for dtype in dict.fromkeys((torch.promote_types(factor.dtype, torch.float32), torch.float64)):
            if factor.is_diagonal:  # a diagonal (or scaled identity) inverts elementwise
                diag = factor.diagonal().to(dtype) + shift
                if bool((diag > 0).all()):
                    return 1.0 / diag
                return None
            dense = factor.to_dense().to(dtype)
            dense = dense + shift * torch.eye(dense.shape[0], dtype=dtype, device=dense.device)
            inverse = newton_schulz_inverse(dense, max_iter=self.max_iter)
            if inverse is not None and bool(torch.isfinite(inverse).all()):
                return inverse
        return None

    def prepare(self, A: FactorStructure, G: FactorStructure, damping: Damping, lam: float) -> FactoredInverse | None:
        s_a, s_g = damping.factor_shifts(A, G, lam)
        a_inv, g_inv = self._inverse(A, s_a), self._inverse(G, s_g)
        if a_inv is None or g_inv is None:
            return None
        # FactoredInverse takes dense inverses or the vectors of diagonal ones, in one dtype.
        dtype = torch.promote_types(a_inv.dtype, g_inv.dtype)
        return FactoredInverse(a_inv.to(dtype), g_inv.to(dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_iter={self.max_iter})"
