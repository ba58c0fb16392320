"""Export of curvkit operators to curvlinops' ``PyTorchLinearOperator`` (imports curvlinops)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["as_curvlinops"]


def as_curvlinops(op: Any) -> Any:
    """Wrap a :class:`~curvkit.laplace.operator.FlatOperator` as a curvlinops operator.

    The wrapper's input and output spaces are the operator's parameter shapes, so it
    accepts curvlinops' tensor-list format as well as flat tensors.
    """
    from curvlinops._torch_base import PyTorchLinearOperator

    class CurvkitLinearOperator(PyTorchLinearOperator):  # type: ignore[misc]
        """A curvkit operator seen through curvlinops' interface."""

        SELF_ADJOINT = True

        def __init__(self, inner: Any) -> None:
            super().__init__(list(inner.param_shapes), list(inner.param_shapes))
            self.inner = inner

        def _matmat(self, X: list[Tensor]) -> list[Tensor]:
            k = X[0].shape[-1]
            flat = self.inner._matmat(torch.cat([x.reshape(-1, k) for x in X]))
            parts = flat.split([s.numel() for s in self._in_shape])
            return [part.reshape(*s, k) for part, s in zip(parts, self._in_shape)]

        @property
        def device(self) -> Any:
            return self.inner.device

        @property
        def dtype(self) -> Any:
            return self.inner.dtype

    return CurvkitLinearOperator(op)
