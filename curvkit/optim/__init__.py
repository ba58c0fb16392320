"""Optimizers: :class:`Preconditioner` (rewrites ``.grad``, composes with any torch
optimizer) and :class:`CurvatureOptimizer` (a ``torch.optim.Optimizer``) with named
classes per bundled method and a by-name factory, :func:`create`."""

from curvkit.optim.monitor import DivergenceWarning
from curvkit.optim.optimizer import (
    BKFAC,
    BKFACC,
    BRKFAC,
    EKFAC,
    IKFAC,
    INGD,
    KFAC,
    RSKFAC,
    SINGD,
    SKFAC,
    SREKFAC,
    TEKFAC,
    TKFAC,
    CurvatureOptimizer,
    available_methods,
    create,
)
from curvkit.optim.preconditioner import Preconditioner

__all__ = [
    "BKFAC",
    "BKFACC",
    "BRKFAC",
    "EKFAC",
    "IKFAC",
    "INGD",
    "KFAC",
    "RSKFAC",
    "SINGD",
    "SKFAC",
    "SREKFAC",
    "TEKFAC",
    "TKFAC",
    "CurvatureOptimizer",
    "DivergenceWarning",
    "Preconditioner",
    "available_methods",
    "create",
]
