r"""Eigenvalue-corrected K-FAC (EKFAC, George et al., 2018) over a data set.

Given K-FAC blocks :math:`G \otimes A` with eigenbases :math:`Q_G, Q_A`, EKFAC keeps the
basis and replaces the spectrum by the second moments of the per-datum gradients in it,

.. math:: E = \frac{1}{Z}\sum_{n,m} \big(Q_G^\top\, \nabla_{V}(v_{n,m}^\top f_n)\, Q_A\big)^{\odot 2},

which is the best diagonal in that basis (in Frobenius norm) for the curvature
:math:`\frac1Z\sum_{n,m} \mathrm{vec}\nabla\,\mathrm{vec}\nabla^\top`. ``Z`` is the loss
normaliser over the whole data set (``1`` for a sum-reduced loss).

The batches' statistics come from the capture engine, as for every statistic (and as the
optimizers get them), and the rotated second moments from the same function as the EKFAC
optimizer's blocks (:func:`curvkit.stats.eigenbasis.rotated_second_moments`); each block
becomes an :class:`~curvkit.linalg.kronecker.EigenbasisOperator` of its Kronecker block.
The weight and bias blocks of a layer split with ``separate_bias`` share ``G``; their
moments come from one pass over the layer in the basis ``Q_G ⊗ blockdiag(Q_{A_W}, Q_{A_b})``,
whose columns are the two blocks' (the weight–bias cross terms are not needed).

A normalisation layer's unit-wise block is exact already; it is kept as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy, as_enum
from curvkit.laplace.blocks import OperatorBlock
from curvkit.linalg.kronecker import EigenbasisOperator, KroneckerEigen, KroneckerOperator
from curvkit.stats.eigenbasis import rotated_second_moments
from curvkit.stats.engine import CaptureEngine
from curvkit.stats.losses import loss_adapter
from curvkit.stats.model_io import call_model, model_logits
from curvkit.stats.plan import make_plan

if TYPE_CHECKING:
    from curvkit.laplace.curvature import KroneckerCurvature

__all__ = ["eigenvalue_correction"]


def _layer_bases(blocks: list[tuple[int, OperatorBlock]]) -> tuple[Tensor, Tensor]:
    """``(Q_A, Q_G)`` over a layer's whole matrix from the Kronecker blocks covering its
    columns (in column order, one shared ``G``): ``Q_A`` block-diagonal over the blocks
    (empty where ``A`` is diagonal and covers all columns)."""
    eigs = cast(list[KroneckerEigen], [b.operator.eigen() for _, b in blocks])  # type: ignore[union-attr]
    assert all(isinstance(e, KroneckerEigen) for e in eigs), "EKFAC correction needs Kronecker bases"
    if len(eigs) == 1:
        return eigs[0].QA, eigs[0].QG
    return torch.block_diag(*[e.QA_dense() for e in eigs]), eigs[0].QG


def eigenvalue_correction(
    curvature: KroneckerCurvature,
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    *,
    fisher: FisherType | str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    unsupported: UnsupportedPolicy | str = "warn",
    registry: Any = None,
    progress: bool = False,
    output_fn: Any = None,
) -> KroneckerCurvature:
    """The EKFAC version of ``curvature`` (same factors and eigenbases, corrected spectrum)."""
    from tqdm.auto import tqdm

    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    fisher = as_enum(FisherType, fisher, "fisher")
    plan = make_plan(model, registry, unsupported)
    # the Kronecker blocks of each tracked layer, with the columns of its matrix [W b] they cover
    # (unit-wise blocks are exact already and stay as they are)
    layers: dict[str, list[tuple[int, OperatorBlock]]] = {}
    for i, block in enumerate(curvature.blocks):
        if not isinstance(block.operator, KroneckerOperator):
            continue
        if block.layer is None or block.columns is None:
            raise ValueError(
                f"block {block.name!r} does not say which tracked layer it belongs to (layer/columns are None); "
                "build the curvature with KroneckerCurvature.from_factors or from_data."
            )
        layers.setdefault(block.layer, []).append((i, block))
    for parts in layers.values():
        parts.sort(key=lambda item: item[1].columns)  # type: ignore[arg-type, return-value]
    bases = {name: _layer_bases(parts) for name, parts in layers.items()}
    sums = {name: None for name in layers}  # type: dict[str, Tensor | None]
    dtype = curvature.dtype
    adapter = loss_adapter(loss_fn)
    total_z = 0.0
    for inputs, targets in tqdm(data, desc="EKFAC eigenvalues", disable=not progress, unit="batch"):
        engine = CaptureEngine(plan, model)
        with engine.attached_for():
            output = model_logits(call_model(model, inputs), output_fn)
        try:
            vectors = adapter.output_vectors(output, targets, fisher, mc_samples, generator)
            num_passes = adapter.num_passes(output.shape[adapter.class_dim(output, targets)], fisher, mc_samples)

            def consume(_: int, engine: CaptureEngine = engine) -> None:
                # this pass's per-datum gradients, rotated and squared, then dropped
                for name in layers:
                    stats = engine.layer_stats(name, "fisher", KFACApprox.EXPAND, 1.0)
                    if stats is None:
                        continue
                    q_a, q_g = bases[name]
                    moments = rotated_second_moments(stats, q_a, q_g, dtype)
                    previous = sums[name]
                    sums[name] = moments if previous is None else previous.add_(moments)
                for record in engine.records:
                    record.fisher_grads.clear()

            engine.backpropagate(output, vectors, num_passes=num_passes, on_pass=consume)
            total_z += adapter.normaliser(output, targets)
        finally:
            engine.clear()
    if total_z == 0.0:
        raise ValueError("data yielded no batches; pass a non-empty iterable of (inputs, targets).")
    z_total = total_z if loss_fn.reduction == "mean" else 1.0
    blocks = list(curvature.blocks)
    for name, parts in layers.items():
        moments = sums[name]
        for i, block in parts:
            assert block.columns is not None
            start, stop = block.columns
            if moments is None:  # the layer never received a gradient: no curvature
                corrected = torch.zeros(block.d_out, block.k, dtype=dtype, device=curvature.device)
            else:
                corrected = moments[:, start:stop] / z_total
            op = block.operator
            assert isinstance(op, KroneckerOperator)
            blocks[i] = block.replace(operator=EigenbasisOperator.from_kronecker(op, corrected))
    return curvature._with_blocks(blocks)  # type: ignore[no-any-return]
