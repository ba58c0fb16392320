"""Optimizers: :class:`Preconditioner` (rewrites ``.grad``, composes with any torch
optimizer) and :class:`CurvatureOptimizer` (a ``torch.optim.Optimizer``), a by-name factory,
:func:`create`, and one named class per registered method that declares one
(``curvkit.optim.KFAC``, ``curvkit.optim.SINGD``, a plugin's ``curvkit.optim.Shampoo``):
they are built from the registry on first use (:mod:`curvkit.optim.named`)."""

from typing import Any

from curvkit.optim.monitor import DivergenceWarning
from curvkit.optim.optimizer import CurvatureOptimizer, available_methods, create
from curvkit.optim.preconditioner import Preconditioner

__all__ = [
    "CurvatureOptimizer",
    "DivergenceWarning",
    "Preconditioner",
    "available_methods",
    "create",
]


def __getattr__(name: str) -> Any:
    """``curvkit.optim.KFAC`` and the other named classes: from the registered methods'
    ``MethodSpec.class_name`` (:func:`curvkit.optim.named.named_class`)."""
    if name.startswith("_") or not name[:1].isupper():
        raise AttributeError(f"module 'curvkit.optim' has no attribute {name!r}")
    from curvkit.optim.named import named_class

    return named_class(name)


def __dir__() -> list[str]:
    from curvkit.optim.named import class_names

    return sorted(set(globals()) | set(class_names()))
