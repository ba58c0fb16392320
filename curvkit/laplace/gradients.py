r"""Per-datum gradients of backpropagated vectors, for every tracked layer at once.

For a tracked layer :math:`s_{n,r} = \bar W \bar a_{n,r}` and a vector :math:`v` pushed
back from the model output, the gradient of :math:`v^\top f(x_n)` with respect to
:math:`\bar W = [W\;b]` for datum ``n`` is

.. math:: \nabla_{\bar W}\,(v^\top f_n) = \sum_r g_{n,r}\,\bar a_{n,r}^\top \in \mathbb{R}^{d_{out}\times k},

with :math:`g_{n,r}` the gradient at the layer output. One forward pass records the
inputs (with the capture engine, as every statistic); each vector then costs one backward
pass to the layer outputs and one batched GEMM per layer. Choosing the vectors gives

* the loss-Hessian square-root columns / MC / empirical vectors of a Fisher type
  (:func:`fisher_gradients`): the exact diagonal and full GGN / Fisher / empirical Fisher,
  and EKFAC's corrected eigenvalues;
* unit vectors on the outputs (:func:`output_jacobians`): Jacobians ``(N, C, P)``.

A unit-wise layer (a normalisation layer, :mod:`curvkit.stats.norms`) has the matrix form
``(D, k)``: row ``i`` holds unit ``i``'s ``[γ_i, β_i]`` (its per-datum gradient is
:meth:`~curvkit.stats.LayerStats.unit_gradients`), so its scale is column 0 and its shift
column 1, each in ``weight.flatten()`` order.

The per-block results are placed in the flat parameter vector by
:class:`curvkit.laplace.layout.FlatLayout` (row ranges and transposed layouts included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox
from curvkit.stats.engine import CaptureEngine
from curvkit.stats.losses import loss_adapter
from curvkit.stats.model_io import call_model, model_logits
from curvkit.stats.plan import TrackingPlan

__all__ = ["fisher_gradients", "output_jacobians", "per_sample_gradients"]


def per_sample_gradients(
    model: nn.Module,
    plan: TrackingPlan,
    inputs: Any,
    vectors: Callable[[Tensor], Iterable[Tensor]],
    output_fn: Callable[[Any], Tensor] | None = None,
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Run the model once and yield, for each vector, per-datum gradients by block.

    The uses are recorded by the capture engine (:mod:`curvkit.stats.engine`), like
    every other statistic; a block's per-datum gradient sums over all its uses.

    Args:
        model: The model.
        plan: Its blocks (:func:`curvkit.stats.make_plan`).
        inputs: A batch (a tensor, a mapping or a tuple; see :mod:`curvkit.stats.model_io`).
        vectors: Called with the model output (the logits); yields tensors shaped like it
            (one backward pass each).
        output_fn: Picks the logits from the model's output.

    Yields:
        ``(output, {block name: (N, d_out, k)})`` with ``k = d_in (+1 with a bias)``;
        blocks the vector does not reach are missing.
    """
    engine = CaptureEngine(plan, model)
    with engine.attached_for():
        output = model_logits(call_model(model, inputs), output_fn)
    try:
        features: dict[str, Tensor] = {}
        for name in plan.names:
            stats = engine.layer_stats_inputs(name)
            if stats is not None and not stats.tied and not stats.unitwise and not stats.diagonal_input:
                features[name] = stats.a_features
        pending = list(vectors(output))
        for i, v in enumerate(pending):
            engine.backpropagate(output, [v], num_passes=1, retain_graph=i < len(pending) - 1)
            result: dict[str, Tensor] = {}
            for name in plan.names:
                # a use broadcast over the batch yields one row: the callers check the rows
                stats = engine.layer_stats(name, "fisher", KFACApprox.EXPAND, 1.0, allow_broadcast=True)
                if stats is None:
                    continue
                if stats.tied or stats.unitwise or stats.diagonal_input:  # an embedding's by scattering ids
                    result[name] = stats.per_example_gradients()
                else:
                    result[name] = torch.einsum("nro,nri->noi", stats.output_features(0), features[name])
            for record in engine.records:
                record.fisher_grads.clear()
            yield output, result
    finally:
        engine.clear()


def fisher_gradients(
    model: nn.Module,
    plan: TrackingPlan,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    fisher: FisherType,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> Iterator[tuple[Tensor, dict[str, Tensor], float]]:
    r"""Per-datum gradients of the vectors of a Fisher type.

    With the vectors :math:`v_{t,m}` of :mod:`curvkit.stats.losses` (``Σ_m v vᵀ`` is the
    loss Hessian, its MC estimate, or the gradient outer product), the curvature of the
    loss is :math:`\frac1Z \sum_{n,m} \mathrm{vec}(\nabla_{n,m})\mathrm{vec}(\nabla_{n,m})^\top`.

    Yields:
        ``(output, {layer: (N, d_out, k)}, Z)`` per vector pass.
    """
    adapter = loss_adapter(loss_fn)
    state: dict[str, float] = {}

    def vectors(output: Tensor) -> Iterator[Tensor]:
        state["z"] = adapter.normaliser(output, targets)
        yield from adapter.output_vectors(output, targets, fisher, mc_samples, generator)

    for output, grads in per_sample_gradients(model, plan, inputs, vectors, output_fn):
        yield output, grads, state["z"]


def output_jacobians(
    model: nn.Module, plan: TrackingPlan, inputs: Any, output_fn: Callable[[Any], Tensor] | None = None
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Per-datum gradients of each output coordinate ``f_c`` of an ``(N, C)`` output (one pass per ``c``)."""

    def vectors(output: Tensor) -> Iterator[Tensor]:
        if output.ndim != 2:
            raise ValueError(
                f"Jacobians need a model output of shape (N, C); got {tuple(output.shape)}. Flatten extra dimensions."
            )
        for c in range(output.shape[1]):
            unit = torch.zeros_like(output)
            unit[:, c] = 1.0
            yield unit

    yield from per_sample_gradients(model, plan, inputs, vectors, output_fn)
