r"""``TransposedLinear`` and the layer handler that lets curvkit compute its factors.

GPT-2 (and Hugging Face's ``Conv1D``) stores a linear layer's weight transposed:
``W`` has shape ``(in_features, out_features)`` and the layer computes
:math:`y = x W + b`. As a linear map in curvkit's convention,
:math:`s = \bar W_{\text{lin}} \bar a` with :math:`W_{\text{lin}} = W^\top` of shape
``(d_out, d_in)``, so the Kronecker factors are exactly those of an ``nn.Linear`` with
weight ``W.T``: ``A`` over the inputs (bias as the appended constant input), ``G`` over
the output gradients. A handler only has to say how to read the layer's input and output
gradient as ``(N, R, d)`` tensors; the core does the rest (bias column, expand/reduce,
scaling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TransposedLinear", "TransposedLinearHandler"]


class TransposedLinear(nn.Module):
    """``y = x @ weight + bias`` with ``weight`` of shape ``(in_features, out_features)``.

    Inputs may have any number of leading dimensions ``(N, *, in_features)``, like
    ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = x @ self.weight
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TransposedLinearHandler:
    """Layer handler for :class:`TransposedLinear` (curvkit's ``LayerHandler`` protocol).

    The factors ``(A, G)`` it produces stand for ``G ⊗ A`` on the row-major ``vec`` of
    ``[W.T  b]``, the ``(d_out, d_in + 1)`` matrix of the layer as a linear map.
    """

    #: Registered name; unique across all plugins.
    name = "transposed_linear"
    #: Module classes served (subclasses included; the most specific handler wins).
    module_types = (TransposedLinear,)

    def check(self, module: nn.Module) -> None:
        # Raise curvkit.UnsupportedModuleError here for configurations the handler
        # cannot express (the Conv handler refuses groups > 1). Every TransposedLinear is fine.
        return None

    def weight(self, module: nn.Module) -> Tensor:
        # The protocol documents the weight's first dimension as d_out; here it is d_in.
        # That is fine: the core uses this tensor only as the *parameter object* -- to
        # check requires_grad, to detect weight tying by identity, and as an autograd
        # leaf on the slow path for in-place activations -- never for its shape. So return
        # the stored parameter itself. Returning ``module.weight.T`` would hand the core a
        # non-leaf view: tying detection and the autograd leaves would break.
        # Optimizers learn the layout from weight_matrix / weight_from_matrix below.
        return module.weight

    def weight_matrix(self, module: nn.Module, tensor: Tensor) -> Tensor:
        # A weight-shaped tensor (the weight, its gradient, a step), stored (d_in, d_out),
        # as the (d_out, d_in) matrix the factors describe. curvkit's optimizers call this
        # before preconditioning ``weight.grad`` ...
        return tensor.t()

    def weight_from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        # ... and this to put the preconditioned (d_out, d_in) direction back in storage layout.
        return matrix.t()

    def bias(self, module: nn.Module) -> Tensor | None:
        return module.bias

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        # (N, *, d_in) -> (N, R, d_in): every leading dimension after the batch is the
        # weight-sharing axis R (sequence positions), exactly as for nn.Linear.
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        # Gradient w.r.t. the layer output, (N, *, d_out) -> (N, R, d_out).
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
