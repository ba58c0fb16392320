"""Kronecker-factored curvature over a data set, Laplace quantities, and a laplace-torch backend.

* :class:`KroneckerCurvature`: K-FAC / EKFAC curvature of a model over a data loader as a
  linear operator (products, dense view, trace, log-determinant, damped inverse,
  eigendecomposition, sampling), exportable to SciPy and curvlinops. It is block-diagonal
  over :class:`OperatorBlock` s, each a block operator of the core
  (:class:`~curvkit.linalg.kronecker.KroneckerOperator`, EKFAC's
  :class:`~curvkit.linalg.kronecker.EigenbasisOperator`, a normalisation layer's exact
  :class:`~curvkit.linalg.kronecker.UnitwiseOperator`) — the same classes the optimizers'
  blocks return from ``as_operator()``, so :meth:`KroneckerCurvature.from_optimizer` turns
  a trained optimizer's curvature into one.
* :class:`KroneckerLaplace`: a Laplace approximation built on it, without laplace-torch
  (posterior precision, log marginal likelihood, prior precision optimisation, linearised
  predictive). Its inputs are checked: see :mod:`curvkit.laplace.checks` and
  :class:`NonFiniteInputError`.
* :class:`CurvkitGGN`, :class:`CurvkitEF`: backends for laplace-torch
  (``Laplace(model, ..., backend=CurvkitGGN)``). They live in :mod:`curvkit.laplace.backend`,
  which imports laplace-torch; they are loaded on first access, so importing this package
  does not import laplace-torch.
"""

from __future__ import annotations

from typing import Any

from curvkit.laplace.blocks import OperatorBlock
from curvkit.laplace.checks import NonFiniteInputError
from curvkit.laplace.curvature import KroneckerCurvature, KroneckerPower
from curvkit.laplace.prior import PriorMode
from curvkit.laplace.quantities import KroneckerLaplace

__all__ = [
    "CurvkitEF",
    "CurvkitGGN",
    "KroneckerCurvature",
    "KroneckerLaplace",
    "KroneckerPower",
    "NonFiniteInputError",
    "OperatorBlock",
    "PriorMode",
]

_BACKEND_NAMES = ("CurvkitGGN", "CurvkitEF")


def __getattr__(name: str) -> Any:
    if name in _BACKEND_NAMES:
        from curvkit.laplace import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'curvkit.laplace' has no attribute {name!r}")
