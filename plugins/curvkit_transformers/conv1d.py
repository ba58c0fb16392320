r"""Hugging Face's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``; GPT-2, GPT, ...).

Despite its name, ``Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed:
``weight`` has shape ``(nx, nf)`` = ``(d_in, d_out)`` and the forward is
``addmm(bias, x2d, weight)``, i.e. :math:`s = W^\top a + b` with ``x2d`` the input
flattened to ``(-1, nx)``. Its curvature block is that of ``nn.Linear(nx, nf)`` with the
matrix :math:`\bar W = [W^\top\; b] \in \mathbb{R}^{n_f \times (n_x + 1)}`:
:meth:`Conv1DHandler.weight_matrix` transposes the stored weight into that layout and
:meth:`Conv1DHandler.weight_from_matrix` transposes a preconditioned matrix back, so the
optimizers and :mod:`curvkit.laplace` see a ``(d_out, d_in)`` matrix as for any linear
layer. All leading dimensions of the input (sequence positions) are the weight-sharing
axis, as for ``nn.Linear``.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvkit.errors import UnsupportedModuleError
from curvkit_transformers._lazy import defined_class

__all__ = ["Conv1DHandler"]


class Conv1DHandler:
    """Layer handler for ``transformers.pytorch_utils.Conv1D`` (see the module docstring)."""

    name = "hf_conv1d"

    @property
    def module_types(self) -> tuple[type[nn.Module], ...]:
        """``(Conv1D,)`` once ``transformers.pytorch_utils`` is imported, else ``()``."""
        cls = defined_class("transformers.pytorch_utils", "Conv1D")
        return (cls,) if cls is not None else ()

    def check(self, module: nn.Module) -> None:
        weight = getattr(module, "weight", None)
        nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (nx, nf):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            raise UnsupportedModuleError(
                f"Conv1D with weight of shape {shape} and nx={nx}, nf={nf}: curvkit expects the weight stored as "
                "(nx, nf), as transformers.pytorch_utils.Conv1D does."
            )

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight  # type: ignore[return-value]

    def bias(self, module: nn.Module) -> Tensor | None:
        return getattr(module, "bias", None)

    def weight_matrix(self, module: nn.Module, tensor: Tensor) -> Tensor:
        """A weight-shaped ``(nx, nf)`` tensor as the ``(nf, nx)`` matrix of the factors."""
        return tensor.t()

    def weight_from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        """An ``(nf, nx)`` matrix back in the stored ``(nx, nf)`` layout."""
        return matrix.t().contiguous()

    @staticmethod
    def _rows(t: Tensor, what: str, last: str) -> Tensor:
        if t.ndim < 2:
            raise UnsupportedModuleError(
                f"Conv1D {what} of shape {tuple(t.shape)} has no batch dimension; call the layer on inputs of "
                f"shape (N, ..., {last})."
            )
        return t.reshape(t.shape[0], -1, t.shape[-1])

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        return self._rows(x, "input", "nx")

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        return self._rows(g, "output gradient", "nx")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
