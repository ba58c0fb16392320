r"""Eigenvalue-corrected K-FAC (EKFAC, George et al., 2018) over a data set.

Given K-FAC blocks :math:`G \otimes A` with eigenbases :math:`Q_G, Q_A`, EKFAC keeps the
basis and replaces the spectrum by the second moments of the per-datum gradients in it,

.. math:: E = \frac{1}{Z}\sum_{n,m} \big(Q_G^\top\, \nabla_{V}(v_{n,m}^\top f_n)\, Q_A\big)^{\odot 2},

which is the best diagonal in that basis (in Frobenius norm) for the curvature
:math:`\frac1Z\sum_{n,m} \mathrm{vec}\nabla\,\mathrm{vec}\nabla^\top`. ``Z`` is the loss
normaliser over the whole data set (``1`` for a sum-reduced loss).

A normalisation layer's unit-wise block is exact already; it is kept as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, UnsupportedPolicy, as_enum
from curvkit.laplace.blocks import KroneckerBlock
from curvkit.laplace.gradients import fisher_gradients
from curvkit.laplace.unitwise import UnitwiseBlock
from curvkit.stats.plan import make_plan

if TYPE_CHECKING:
    from curvkit.laplace.curvature import KroneckerCurvature

__all__ = ["eigenvalue_correction"]


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

    from curvkit.laplace.curvature import KroneckerCurvature

    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    fisher = as_enum(FisherType, fisher, "fisher")
    plan = make_plan(model, registry, unsupported)
    # the layer feeding each Kronecker block and the columns of its matrix [W b] the block covers
    # (unit-wise blocks are exact already and stay as they are)
    kron = [b for b in curvature.blocks if isinstance(b, KroneckerBlock)]
    spans: list[tuple[str, slice]] = []
    for block in kron:
        if block.layer is None or block.columns is None:
            raise ValueError(
                f"block {block.name!r} does not say which tracked layer it belongs to (layer/columns are None); "
                "build the curvature with KroneckerCurvature.from_factors or from_data."
            )
        spans.append((block.layer, slice(*block.columns)))
    sums = [torch.zeros(b.d_out, b.k, dtype=curvature.dtype, device=curvature.device) for b in kron]
    total_z = 0.0
    for inputs, targets in tqdm(data, desc="EKFAC eigenvalues", disable=not progress, unit="batch"):
        z_batch = 1.0
        for _, grads, z in fisher_gradients(
            model, plan, loss_fn, inputs, targets, fisher, mc_samples, generator, output_fn
        ):
            z_batch = z
            for i, (block, (layer, cols)) in enumerate(zip(kron, spans)):
                g = grads.get(layer)
                if g is None:
                    continue
                rotated = block.eigen().rotate(g[:, :, cols])
                sums[i].add_((rotated**2).sum(0))
        total_z += z_batch
    if total_z == 0.0:
        raise ValueError("data yielded no batches; pass a non-empty iterable of (inputs, targets).")
    z_total = total_z if loss_fn.reduction == "mean" else 1.0
    corrected = iter(sums)
    blocks: list[KroneckerBlock | UnitwiseBlock] = []
    for old in curvature.blocks:
        if isinstance(old, UnitwiseBlock):
            blocks.append(old)
            continue
        old.eigen()  # cached, and kept by replace()
        blocks.append(old.replace(corrected_eigenvalues=next(corrected) / z_total))
    return KroneckerCurvature(blocks)
