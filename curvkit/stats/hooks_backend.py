"""curvkit's own statistics backend, built on PyTorch module and autograd hooks.

One forward pass records layer inputs and outputs; the vectors of the chosen Fisher type
(see :mod:`curvkit.stats.losses`) are then backpropagated from the model output to the
layer outputs only — no parameter gradients are formed. Several vectors per loss term
(MC samples, the columns of a type-2 Hessian square root) go through one batched backward
(``is_grads_batched``), so type-2 costs one backward over ``N·C`` rows rather than ``C``
backward passes. If an in-place operation overwrote a layer output, the forward is rerun
with tensor hooks that see the gradient before the modification.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox
from curvkit.stats.backend import BackendCapabilities, FactorRequest, KroneckerFactors
from curvkit.stats.capture import Capture, capture
from curvkit.stats.factors import input_factor, output_factor
from curvkit.stats.losses import SUPPORTED_LOSSES, loss_adapter

__all__ = ["HooksBackend"]


def _batched_grads(output: Tensor, targets: list[Tensor], vectors: Tensor) -> list[Tensor]:
    """Gradients ``(M, *target.shape)`` of ``<vectors[m], output>`` w.r.t. each target."""
    if vectors.shape[0] == 1:
        grads = torch.autograd.grad(output, targets, vectors[0], allow_unused=True)
        return [g.unsqueeze(0) if g is not None else None for g in grads]  # type: ignore[misc]
    try:
        # retain_graph: if the batched pass fails part-way, the fallback below needs the graph.
        return list(
            torch.autograd.grad(output, targets, vectors, is_grads_batched=True, retain_graph=True, allow_unused=True)
        )
    except RuntimeError:
        # Some operation lacks a vmap rule for its backward: one pass per vector.
        per_vector = [
            torch.autograd.grad(output, targets, v, retain_graph=True, allow_unused=True) for v in vectors
        ]
        return [
            None if per_vector[0][i] is None else torch.stack([pv[i] for pv in per_vector])  # type: ignore[misc]
            for i in range(len(targets))
        ]


class HooksBackend:
    """Own-hooks backend: every Fisher type, expand and reduce, every registered handler."""

    name = "hooks"

    def __init__(self) -> None:
        self.capabilities = BackendCapabilities(
            fisher_types=frozenset(FisherType),
            approximations=frozenset(KFACApprox),
            module_types=(nn.Module,),
            losses=SUPPORTED_LOSSES,
        )

    def compute(self, request: FactorRequest) -> dict[str, KroneckerFactors]:
        adapter = loss_adapter(request.loss_fn)
        plan = request.plan
        with capture(plan) as cap:
            output = request.model(request.inputs)
        rows, target_rows = adapter.to_rows(output, request.targets)
        vectors = adapter.from_rows(
            adapter.vectors(rows, target_rows, request.fisher, request.mc_samples, request.generator),
            output,
        )
        normaliser = adapter.normaliser(output, request.targets)
        names = [name for name in plan.names if name in cap.outputs and cap.outputs[name].requires_grad]
        if cap.outputs_intact:
            grads = dict(zip(names, _batched_grads(output, [cap.outputs[n] for n in names], vectors)))
        else:
            cap, grads = self._grads_via_tensor_hooks(request, names, vectors)

        result: dict[str, KroneckerFactors] = {}
        for layer in plan:
            g = grads.get(layer.name)
            if g is None:
                continue  # the layer did not run, or does not influence the output
            a_feats = layer.handler.input_features(layer.module, cap.inputs[layer.name])
            g_feats = layer.handler.output_features(layer.module, g.flatten(0, 1))
            result[layer.name] = KroneckerFactors(
                input_factor(a_feats, request.kfac_approx, layer.has_bias),
                output_factor(g_feats, request.kfac_approx, normaliser),
            )
        return result

    @staticmethod
    def _grads_via_tensor_hooks(
        request: FactorRequest, names: list[str], vectors: Tensor
    ) -> tuple[Capture, dict[str, Tensor]]:
        """Slow path for in-place modified outputs: hooks registered at production time."""
        with capture(request.plan, record_grads=True) as cap:
            output = request.model(request.inputs)
        leaves = [layer.weight for layer in request.plan if layer.name in names]
        for i, v in enumerate(vectors):
            torch.autograd.grad(output, leaves, v, retain_graph=i < len(vectors) - 1, allow_unused=True)
        return cap, {n: torch.stack(cap.grads[n]) for n in names if cap.grads.get(n)}
