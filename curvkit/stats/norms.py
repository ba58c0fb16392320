r"""Scale-and-shift layers (normalisation layers) as **unit-wise** blocks.

A normalisation layer computes :math:`y_{n,r,i} = \gamma_i\,\hat x_{n,r,i} + \beta_i` from
its normalised input :math:`\hat x` (``r`` runs over the positions that share the
parameters: sequence positions for ``LayerNorm`` on ``(N, T, d)``, pixels for
``BatchNorm2d``; ``i`` over the *units*, the entries of ``γ``). Unit ``i``'s parameters
:math:`(\gamma_i, \beta_i)` have the per-datum gradient

.. math:: J_{n,i} = \sum_r g_{n,r,i}\,[\hat x_{n,r,i},\ 1] \in \mathbb{R}^{k},\qquad k = 2
   \ (\text{scale and shift}),\ k = 1\ (\text{scale only}),

with :math:`g` the gradient w.r.t. the output. The curvature block of such a layer is the
exact per-unit ``k × k`` Fisher/GGN :math:`F_i = \sum_{p,n} J_{p,n,i}J_{p,n,i}^\top`, ``D``
independent small blocks (ASDL calls this "unit-wise"): only the couplings *between*
units are dropped, not approximated by a Kronecker product. The matrix form of the layer's
gradient is ``(D, k)`` (column 0 the scale, column 1 the shift), what
:func:`~curvkit.stats.handlers.weight_matrix` gives for these handlers.

A unit-wise handler sets ``kind = "unitwise"`` and defines

* ``unit_features(module, x) -> (N, R, D, k_w)``: what multiplies the output gradient
  (``x̂`` for the scale; the core appends the shift's column of ones when the layer has
  a trainable bias);
* ``output_features(module, g) -> (N, R, D)``: the output gradient in the same layout;
* optionally ``capture_input(module, x)``: what the capture engine stores for a use
  instead of the raw input (these handlers store ``x̂``, computed right after the forward
  pass, so that batch statistics, the module's train/eval mode and micro-batches are those
  of that forward pass; ``unit_features`` then reads the stored ``x̂``).

:class:`ScaleShiftHandler` implements all of it; a subclass only says how to get ``x̂``
from the module and its input (:meth:`ScaleShiftHandler.normalized`) and where the units
are (``unit_layout``). The core registers :class:`LayerNormHandler`,
:class:`RMSNormHandler`, :class:`BatchNormHandler` and :class:`GroupNormHandler`; a plugin
subclasses :class:`ScaleShiftHandler` for its own normalisation modules (e.g. Hugging
Face's ``LlamaRMSNorm``, see docs/plugins.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import UnitwiseStatisticsError, UnsupportedModuleError

__all__ = [
    "BatchNormHandler",
    "GroupNormHandler",
    "LayerNormHandler",
    "RMSNormHandler",
    "ScaleShiftHandler",
    "is_unitwise",
]

#: Input dtypes whose normalisation is computed in float32 (and stored back in the dtype).
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_unitwise(handler: Any) -> bool:
    """Whether ``handler`` declares unit-wise blocks (``kind == "unitwise"``)."""
    return getattr(handler, "kind", None) == "unitwise"


class ScaleShiftHandler:
    r"""Base of the unit-wise handlers of layers :math:`y = \gamma\odot\hat x\,[+\,\beta]`.

    A subclass sets ``name``, ``module_types`` and ``unit_layout`` and overrides
    :meth:`normalized`; everything else (the features, the ``(D, k)`` matrix layout, the
    capture of ``x̂``) follows. Override :meth:`weight` / :meth:`bias` if the module keeps
    its parameters under other names, and :meth:`check` to refuse configurations.

    Attributes:
        kind: ``"unitwise"``: the core builds an exact per-unit block for such layers.
        unit_layout: Where the units are in the module's input and output:
            ``"last"`` — the trailing dimensions that ``weight.shape`` spans
            (``LayerNorm``, ``RMSNorm``: ``(N, *, *normalized_shape)``);
            ``"channels"`` — dimension 1 (``BatchNorm``, ``GroupNorm``: ``(N, C, *)``).
    """

    kind = "unitwise"
    name: str = "scale_shift"
    module_types: tuple[type[nn.Module], ...] = ()
    unit_layout: str = "last"

    # --- what a subclass overrides -----------------------------------------------------

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        r"""The normalised input :math:`\hat x` (the tensor that multiplies ``γ``), shaped
        like the module's output, for the module's input ``x``. Called without autograd,
        right after the module's forward pass, with ``x`` in at least float32."""
        raise NotImplementedError(f"{type(self).__name__} must define normalized(module, x).")

    def check(self, module: nn.Module) -> None:
        return None

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight  # type: ignore[return-value]

    def bias(self, module: nn.Module) -> Tensor | None:
        return getattr(module, "bias", None)

    # --- the unit-wise contract --------------------------------------------------------

    def capture_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """What the capture engine stores for a use: ``x̂`` (detached, in ``x``'s dtype;
        computed in float32 for 16-bit inputs)."""
        with torch.no_grad():
            xf = x.detach()
            if xf.dtype in _LOW_PRECISION:
                xf = xf.float()
            return self.normalized(module, xf).to(x.dtype)

    def units(self, module: nn.Module, t: Tensor) -> Tensor:
        """A tensor laid out like the module's output as ``(N, R, D)``."""
        d = self.weight(module).numel()
        if self.unit_layout == "channels":
            if t.ndim < 2 or t.shape[1] != d:
                raise UnsupportedModuleError(
                    f"{type(module).__name__} got a tensor of shape {tuple(t.shape)}; curvkit needs a batch "
                    f"dimension and the {d} channels in dimension 1: pass inputs of shape (N, {d}, ...)."
                )
            return t.reshape(t.shape[0], d, -1).transpose(1, 2)
        if self.unit_layout != "last":
            raise ValueError(f"{type(self).__name__}.unit_layout={self.unit_layout!r} must be 'last' or 'channels'.")
        shape = tuple(self.weight(module).shape)
        if t.ndim <= len(shape) or tuple(t.shape[t.ndim - len(shape) :]) != shape:
            dims = ", ".join(map(str, shape))
            raise UnsupportedModuleError(
                f"{type(module).__name__} got a tensor of shape {tuple(t.shape)}; curvkit needs a batch dimension "
                f"before the normalised dimensions {shape}: pass inputs of shape (N, ..., {dims})."
            )
        return t.reshape(t.shape[0], -1, d)

    def unit_features(self, module: nn.Module, x: Tensor) -> Tensor:
        """``(N, R, D, 1)``: ``x̂`` (what the engine stored) in the unit layout; the core
        appends the shift's column."""
        return self.units(module, x).unsqueeze(-1)

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        """The output gradient as ``(N, R, D)``."""
        return self.units(module, g)

    def weight_matrix(self, module: nn.Module, tensor: Tensor) -> Tensor:
        """A ``γ``-shaped tensor as the ``(D, 1)`` column of the ``(D, k)`` matrix form."""
        return tensor.reshape(-1, 1)

    def weight_from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.weight(module).shape)

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        raise UnitwiseStatisticsError(
            f"{type(module).__name__} is a unit-wise layer (handler {self.name!r}): it has no Kronecker input "
            "features; use unit_features() / LayerStats.unit_gradients()."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LayerNormHandler(ScaleShiftHandler):
    """``nn.LayerNorm`` with ``elementwise_affine=True`` (any ``normalized_shape``, bias
    optional): ``D = prod(normalized_shape)`` units; every leading position shares them."""

    name = "layer_norm"
    module_types = (nn.LayerNorm,)
    unit_layout = "last"

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        ln: nn.LayerNorm = module  # type: ignore[assignment]
        return F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)


class RMSNormHandler(ScaleShiftHandler):
    """``nn.RMSNorm`` with ``elementwise_affine=True``: a scale only (``k = 1``)."""

    name = "rms_norm"
    module_types = (nn.RMSNorm,)
    unit_layout = "last"

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        rms: nn.RMSNorm = module  # type: ignore[assignment]
        return F.rms_norm(x, list(rms.normalized_shape), None, rms.eps)

    def bias(self, module: nn.Module) -> Tensor | None:
        return None


class BatchNormHandler(ScaleShiftHandler):
    """``nn.BatchNorm1d/2d/3d`` with ``affine=True``: one unit per channel.

    ``x̂`` is what the forward pass multiplied ``γ`` with: normalised by the batch's own
    statistics in training mode (or without running statistics), by the running
    statistics in evaluation mode. ``nn.SyncBatchNorm`` is not served (its training-mode
    statistics span every process's batch); it takes the first-order rule.
    """

    name = "batch_norm"
    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    unit_layout = "channels"

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        bn: nn.modules.batchnorm._BatchNorm = module  # type: ignore[assignment]
        mean, var = bn.running_mean, bn.running_var
        if bn.training or mean is None or var is None:
            return F.batch_norm(x, None, None, None, None, True, 0.0, bn.eps)
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), None, None, False, 0.0, bn.eps)


class GroupNormHandler(ScaleShiftHandler):
    """``nn.GroupNorm`` with ``affine=True``: the units are the channels (``γ`` and ``β``
    are per channel; the normalisation statistics are per group)."""

    name = "group_norm"
    module_types = (nn.GroupNorm,)
    unit_layout = "channels"

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        gn: nn.GroupNorm = module  # type: ignore[assignment]
        return F.group_norm(x, gn.num_groups, None, None, gn.eps)

