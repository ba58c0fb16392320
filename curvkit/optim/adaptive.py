r"""Levenberg–Marquardt adaptation of the damping λ (Martens & Grosse 2015, section 6.5).

After a step :math:`\delta`, the reduction ratio
:math:`\rho = (L(\theta + \delta) - L(\theta)) / M(\delta)` compares the loss's change
with the quadratic model's :math:`M(\delta) = \nabla^\top\delta + \tfrac12\delta^\top
(C + \lambda I)\delta` (``C`` each block's curvature, :meth:`~curvkit.blocks.CurvatureBlock.quadratic`);
:class:`~curvkit.linalg.damping.LevenbergMarquardtDamping` turns it into the next λ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvkit.optim.layers import layer_matrix

if TYPE_CHECKING:
    from curvkit.optim.preconditioner import Preconditioner

__all__ = ["adapt_damping", "rows_of"]


def adapt_damping(
    pre: Preconditioner,
    loss: Any,
    closure: Callable[[], Any],
    old: dict[int, Tensor],
    params: dict[int, Tensor],
    raw: dict[str, Tensor],
) -> None:
    """Measure the step just taken and set ``pre.damping_value`` to the next λ.

    Args:
        pre: The preconditioner (its blocks give the quadratic model).
        loss: The loss before the step (the closure's value).
        closure: Re-evaluates the loss after the step (run with capture suspended).
        old: ``{id(parameter): its value before the step}``.
        params: ``{id(parameter): parameter}`` of the step.
        raw: ``{layer: the raw gradient in matrix form}`` (before preconditioning).
    """
    del params
    lam = pre.damping_value
    change = 0.0
    for name, g in raw.items():
        layer = pre.layers[name]
        delta_w = rows_of(layer.weight_ref, layer.weight_ref.param.detach() - old[id(layer.weight_ref.param)])
        delta_b = None
        if layer.bias is not None and layer.bias_ref is not None:
            delta_b = rows_of(layer.bias_ref, layer.bias_ref.param.detach() - old[id(layer.bias_ref.param)])
        delta = layer_matrix(layer, delta_w, delta_b)
        quad = pre.blocks[name].quadratic(delta) + lam * float((delta * delta).sum())
        change += float((g * delta).sum()) + 0.5 * quad
    with pre.suspended(), torch.enable_grad():
        new_loss = closure()
    # a step the quadratic model itself predicts to increase the loss counts as a bad step
    rho = (float(new_loss) - float(loss)) / change if change < 0 else float("-inf")
    pre.damping_value = pre.damping.adapt(lam, rho)  # type: ignore[union-attr]
    pre.counters["last_reduction_ratio"] = rho  # type: ignore[assignment]


def rows_of(ref: Any, t: Tensor) -> Tensor:
    """The rows of ``t`` a :class:`~curvkit.stats.plan.ParamRef` covers."""
    return t if ref.rows is None else t[ref.rows[0] : ref.rows[1]]
