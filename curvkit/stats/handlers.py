r"""Layer handlers: turn a module's captured input and output gradient into factor rows.

A handler exposes a module as a (possibly weight-sharing) linear map
:math:`s_{n,r} = \bar W \bar a_{n,r}` with :math:`\bar W = [W\; b] \in \mathbb{R}^{d_o\times d_i}`,
where ``r`` runs over the weight-sharing axis (sequence positions of a Linear on 3-D
inputs, output locations of a convolution; ``R = 1`` without sharing). The weight is
flattened row-major, so a factor pair ``(A, G)`` stands for ``G ⊗ A`` on
``vec_row(W̄)``. The core adds the bias column and the expand/reduce reduction; a
handler only reshapes.

A handler whose module stores its weight in another layout than ``(d_out, ...)`` defines
``weight_matrix(module, tensor)`` and ``weight_from_matrix(module, matrix)`` (see
:func:`weight_matrix`), so optimizers map gradients to the ``(d_out, d_in)`` matrix the
factors describe and back.

A handler may also define the optional method ``input_gram(module, x)`` returning
``(Σ a aᵀ, Σ a, number of rows)`` over the rows ``a`` of ``input_features`` (no bias
column), or ``None`` to decline; the hooks backend then uses it for the expand ``A``
instead of materialising the features — :class:`ConvHandler` does, to avoid unfolding.

To support a new module type, implement :class:`LayerHandler` and register it with the
:func:`~curvkit.hookspecs.curvkit_register_layer_handlers` hook.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import UnsupportedModuleError
from curvkit.stats.factors import conv_patch_gram, sum_gram

__all__ = ["ConvHandler", "LayerHandler", "LinearHandler", "unfold_patches", "weight_from_matrix", "weight_matrix"]

#: Input elements × kernel size unfolded at once by :meth:`ConvHandler.input_gram`.
_UNFOLD_BUDGET = 1 << 22


@runtime_checkable
class LayerHandler(Protocol):
    """Contract of a layer handler.

    Attributes:
        name: Registered name.
        module_types: Module classes this handler serves (subclasses included).
    """

    name: str
    module_types: tuple[type[nn.Module], ...]

    def check(self, module: nn.Module) -> None:
        """Raise :class:`~curvkit.errors.UnsupportedModuleError` if this module's
        configuration cannot be handled (naming the setting and the fix)."""

    def weight(self, module: nn.Module) -> Tensor:
        """The weight parameter (its first dimension is ``d_out``)."""

    def bias(self, module: nn.Module) -> Tensor | None:
        """The bias parameter, or ``None``."""

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        """Layer input ``x`` as a ``(N, R, d_in)`` tensor, without the bias column."""

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output as a ``(N, R, d_out)`` tensor."""


def weight_matrix(handler: object, module: nn.Module, tensor: Tensor) -> Tensor:
    """A weight-shaped tensor (the weight, its gradient, a step) as the ``(d_out, d_in)``
    matrix the factors describe.

    By default the weight's first dimension is ``d_out`` and the rest is flattened
    (``Linear``, ``Conv*d`` in unfold order). A handler whose layer stores its weight
    differently (GPT-2's transposed ``Conv1D``) defines ``weight_matrix(module, tensor)``
    and its inverse ``weight_from_matrix(module, matrix)``; optimizers go through these two
    functions, so they precondition such layers correctly.
    """
    custom = getattr(handler, "weight_matrix", None)
    if custom is not None:
        return custom(module, tensor)
    return tensor.reshape(tensor.shape[0], -1)


def weight_from_matrix(handler: object, module: nn.Module, matrix: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`weight_matrix`: a ``(d_out, d_in)`` matrix back in the weight's
    storage layout ``shape``."""
    custom = getattr(handler, "weight_from_matrix", None)
    if custom is not None:
        return custom(module, matrix)
    return matrix.reshape(shape)


class _Handler:
    name: str
    module_types: tuple[type[nn.Module], ...]

    def check(self, module: nn.Module) -> None:
        return None

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight  # type: ignore[return-value]

    def bias(self, module: nn.Module) -> Tensor | None:
        return getattr(module, "bias", None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearHandler(_Handler):
    """``nn.Linear`` with any number of leading dimensions ``(N, *, d_in)``.

    All dimensions between the batch and the feature dimension form the weight-sharing
    axis ``R``.
    """

    name = "linear"
    module_types = (nn.Linear,)

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        if x.ndim < 2:
            raise UnsupportedModuleError(
                f"Linear input of shape {tuple(x.shape)} has no batch dimension; "
                "pass inputs of shape (N, ..., in_features)."
            )
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


def unfold_patches(
    x: Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    """Extract convolution patches from an already padded input.

    Args:
        x: Padded input of shape ``(N, C, *spatial)`` with 1 to 3 spatial dimensions.
        kernel_size, stride, dilation: Per spatial dimension.

    Returns:
        Patches of shape ``(N, T, C * prod(kernel_size))``, features ordered like
        ``weight.flatten(1)`` (channel first, then kernel positions row-major), ``T`` the
        number of output locations.
    """
    n, c = x.shape[:2]
    d = len(kernel_size)
    if d == 2:
        cols = F.unfold(x, kernel_size, dilation=dilation, stride=stride)
        return cols.transpose(1, 2)
    patches = x
    for i in range(d):
        span = dilation[i] * (kernel_size[i] - 1) + 1
        patches = patches.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            patches = patches[..., :: dilation[i]]
    # (N, C, o_1..o_d, k_1..k_d) -> (N, o_1..o_d, C, k_1..k_d)
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    patches = patches.permute(perm)
    t = math.prod(patches.shape[1 : 1 + d])
    return patches.reshape(n, t, c * math.prod(kernel_size))


class ConvHandler(_Handler):
    """``nn.Conv1d``/``Conv2d``/``Conv3d``: stride, padding (any mode), dilation.

    The input is unfolded into patches (im2col), so each of the ``T`` output locations is
    one position of the weight-sharing axis. ``groups > 1`` is refused: a grouped
    convolution's weight is block-diagonal across groups and needs one factor pair per
    group, which a single ``(A, G)`` pair cannot express.
    """

    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def check(self, module: nn.Module) -> None:
        if module.groups != 1:  # type: ignore[union-attr]
            raise UnsupportedModuleError(
                f"{type(module).__name__} with groups={module.groups} is not supported: a "
                "grouped convolution needs one Kronecker factor pair per group. Use groups=1, "
                "or exclude the layer with unsupported='skip'."
            )
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise UnsupportedModuleError("transposed convolutions are not supported.")

    @staticmethod
    def _check_input(module: nn.Module, x: Tensor) -> None:
        d = len(module.kernel_size)  # type: ignore[arg-type]
        if x.ndim != d + 2:
            raise UnsupportedModuleError(
                f"{type(module).__name__} got input of shape {tuple(x.shape)}; curvkit needs a "
                f"batch dimension: pass inputs of shape (N, C, *spatial) with {d} spatial dims."
            )

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
        self._check_input(conv, x)
        pad = conv._reversed_padding_repeated_twice
        if len(conv.kernel_size) == 2 and conv.padding_mode == "zeros" and pad[0::2] == pad[1::2]:
            # symmetric zero padding: let F.unfold pad, rather than copying a padded input
            cols = F.unfold(x, conv.kernel_size, conv.dilation, (pad[2], pad[0]), conv.stride)
            return cols.transpose(1, 2)
        if any(pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pad, mode=mode)
        return unfold_patches(
            x,
            tuple(conv.kernel_size),
            tuple(conv.stride),  # type: ignore[arg-type]
            tuple(conv.dilation),  # type: ignore[arg-type]
        )

    def input_gram(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, int] | None:
        """Optional fast path for the expand ``A``: ``(Σ p pᵀ, Σ p, number of patches)``
        over the patches ``p`` of ``x`` (the rows of :meth:`input_features`).

        Stride-1 convolutions with small kernels get the patch Gram matrix without an
        unfold (:func:`curvkit.stats.factors.conv_patch_gram`) where that is estimated to
        be cheaper; otherwise the input is unfolded a few data at a time, so the full
        ``(N, T, d_in)`` patch tensor is never held at once. Both equal the Gram matrix
        of :meth:`input_features` up to rounding. Returns ``None`` in a subclass that
        overrides :meth:`input_features` (its features may differ from plain patches).
        """
        if type(self).input_features is not ConvHandler.input_features:
            return None
        conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
        self._check_input(conv, x)
        if all(s == 1 for s in conv.stride) and math.prod(conv.kernel_size) > 1:  # type: ignore[arg-type]
            pad = conv._reversed_padding_repeated_twice
            padded = x
            if conv.padding_mode != "zeros" and any(pad):
                padded = F.pad(x, pad, mode=conv.padding_mode)
                pad = [0] * len(pad)
            # _reversed_padding_repeated_twice lists (before, after) from the last dimension on
            padding = tuple((pad[2 * i], pad[2 * i + 1]) for i in reversed(range(len(pad) // 2)))
            stats = conv_patch_gram(padded, tuple(conv.kernel_size), tuple(conv.dilation), padding)  # type: ignore[arg-type]
            if stats is not None:
                return stats
        xtx: Tensor | None = None
        col_sum: Tensor | None = None
        count = 0
        chunk = max(1, _UNFOLD_BUDGET // max(1, x[:1].numel() * math.prod(conv.kernel_size)))  # type: ignore[arg-type]
        for start in range(0, x.shape[0], chunk):
            feats = self.input_features(conv, x[start : start + chunk])  # (n, T, d_in)
            part, part_sum = sum_gram(feats), feats.sum((0, 1))
            xtx = part if xtx is None else xtx.add_(part)
            col_sum = part_sum if col_sum is None else col_sum.add_(part_sum)
            count += feats.shape[0] * feats.shape[1]
        return xtx, col_sum, count  # type: ignore[return-value]

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        # (N, C_out, *spatial) -> (N, T, C_out)
        return g.flatten(2).transpose(1, 2)
