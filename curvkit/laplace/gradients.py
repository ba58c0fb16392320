r"""Per-datum gradients of backpropagated vectors, for every tracked layer at once.

For a tracked layer :math:`s_{n,r} = \bar W \bar a_{n,r}` and a vector :math:`v` pushed
back from the model output, the gradient of :math:`v^\top f(x_n)` with respect to
:math:`\bar W = [W\;b]` for datum ``n`` is

.. math:: \nabla_{\bar W}\,(v^\top f_n) = \sum_r g_{n,r}\,\bar a_{n,r}^\top \in \mathbb{R}^{d_{out}\times k},

with :math:`g_{n,r}` the gradient at the layer output. One forward pass records the
inputs (the same hooks as the statistics backend); each vector then costs one backward pass
to the layer outputs and one batched GEMM per layer. Choosing the vectors gives

* the loss-Hessian square-root columns / MC / empirical vectors of a Fisher type
  (:func:`fisher_gradients`): the exact diagonal and full GGN / Fisher / empirical Fisher,
  and EKFAC's corrected eigenvalues;
* unit vectors on the outputs (:func:`output_jacobians`): Jacobians ``(N, C, P)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from curvkit.config import FisherType
from curvkit.stats.capture import capture
from curvkit.stats.losses import loss_adapter
from curvkit.stats.plan import TrackingPlan

__all__ = ["fisher_gradients", "layer_columns", "output_jacobians", "per_sample_gradients", "stack_parameters"]


def per_sample_gradients(
    model: nn.Module,
    plan: TrackingPlan,
    inputs: Tensor,
    vectors: Callable[[Tensor], Iterable[Tensor]],
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Run the model once and yield, for each vector, per-datum gradients by layer.

    Args:
        model: The model.
        plan: Its tracked layers (:func:`curvkit.stats.make_plan`).
        inputs: A batch ``(N, ...)``.
        vectors: Called with the model output; yields tensors shaped like the output
            (one backward pass each).

    Yields:
        ``(output, {layer name: (N, d_out, k)})`` with ``k = d_in (+1 with a bias)``;
        layers the vector does not reach are missing.
    """
    with capture(plan) as cap:
        output = model(inputs)
    intact = cap.outputs_intact
    if not intact:  # an in-place op overwrote a layer output: record gradients with tensor hooks
        with capture(plan, record_grads=True) as cap:
            output = model(inputs)
    layers = {layer.name: layer for layer in plan}
    names = [n for n in plan.names if n in cap.outputs and cap.outputs[n].requires_grad]
    features: dict[str, Tensor] = {}
    for name in names:
        layer = layers[name]
        a = layer.handler.input_features(layer.module, cap.inputs[name])
        if layer.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        features[name] = a
    wrt = [cap.outputs[n] for n in names] if intact else [layers[n].weight for n in names]
    pending = list(vectors(output))
    for i, v in enumerate(pending):
        grads = torch.autograd.grad(output, wrt, v, retain_graph=i < len(pending) - 1, allow_unused=True)
        result: dict[str, Tensor] = {}
        for name, direct in zip(names, grads):
            g: Tensor | None = direct
            if not intact:
                recorded = cap.grads.get(name)
                g = recorded.pop() if recorded else None
            if g is None:
                continue
            layer = layers[name]
            rows = layer.handler.output_features(layer.module, g)
            result[name] = torch.einsum("nro,nri->noi", rows, features[name])
        yield output, result


def fisher_gradients(
    model: nn.Module,
    plan: TrackingPlan,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    fisher: FisherType,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
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
        rows, target_rows = adapter.to_rows(output, targets)
        state["z"] = adapter.normaliser(output, targets)
        for v in adapter.vector_passes(rows, target_rows, fisher, mc_samples, generator):
            yield adapter.from_rows(v.unsqueeze(0), output)[0]

    for output, grads in per_sample_gradients(model, plan, inputs, vectors):
        yield output, grads, state["z"]


def output_jacobians(
    model: nn.Module, plan: TrackingPlan, inputs: Tensor
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

    yield from per_sample_gradients(model, plan, inputs, vectors)


def layer_columns(plan: TrackingPlan, model: nn.Module) -> dict[str, tuple[str, slice, torch.Size]]:
    """For every tracked parameter's name: its layer, its columns in ``V = [W b]``, its shape."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[str, slice, torch.Size]] = {}
    for layer in plan:
        weight = layer.weight
        width = weight[0].numel()
        out[names[id(weight)]] = (layer.name, slice(0, width), weight.shape)
        bias = layer.bias
        if bias is not None:
            out[names[id(bias)]] = (layer.name, slice(width, width + 1), bias.shape)
    return out


def stack_parameters(
    grads: dict[str, Tensor], columns: dict[str, tuple[str, slice, torch.Size]], param_names: list[str], n: int
) -> Tensor:
    """Per-datum layer gradients to ``(N, P)`` in the order of ``param_names`` (zeros for
    layers the vector did not reach)."""
    parts = []
    ref = next(iter(grads.values()), None)
    for name in param_names:
        layer, cols, shape = columns[name]
        g = grads.get(layer)
        if g is None:
            zeros = torch.zeros(n, shape.numel(), device="cpu") if ref is None else ref.new_zeros(n, shape.numel())
            parts.append(zeros)
            continue
        parts.append(g[:, :, cols].reshape(n, -1))
    if ref is not None:
        parts = [p.to(ref) for p in parts]
    return torch.cat(parts, dim=1)
