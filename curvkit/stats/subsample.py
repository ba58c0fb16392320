r"""Subsampled statistics: a block's batch statistics from a random subset of its data and of
its weight-sharing positions (a generalisation of SKFAC's spatial subsampling to every method).

With the options ``subsample_data`` (fraction ``f_d``) and ``subsample_positions`` (fraction
``f_p``) of :class:`~curvkit.methods.StatisticsConfig`, a statistics step keeps, per block,
``n = max(1, round(f_d·N))`` of the batch's ``N`` data (drawn without replacement, the same
data for every use of the block) and, for a block with one use whose features have ``R > 1``
weight-sharing positions (a convolution's patches, a sequence's tokens) under
``kfac_approx="expand"``, ``r = max(1, round(f_p·R))`` of its positions (the same positions for
every datum of the step). The scaling keeps the factors **unbiased** estimates of the full
batch's factors:

* ``A`` is a mean over the kept rows (``n·r`` of them), as it is over all ``N·R``;
* ``G = g_scale·Σ g gᵀ`` is a sum, so ``g_scale`` is multiplied by ``(N/n)·(R/r)``.

When everything is kept (``f_d = f_p = 1``, or ``n = N`` and ``r = R``) the statistics are
the full batch's, unchanged. The per-row quantities (:meth:`~curvkit.blocks.LayerStats.rows`)
stay consistent with the subsampled factors (``A = a_rowsᵀa_rows``, ``G = Σ g_rowsᵀg_rows``);
per-example gradients are those of the kept data, scaled so that ``Σ_n vec J vec Jᵀ`` is
unbiased under data subsampling. Under position subsampling a per-example gradient is the
sum over the kept positions only: its second moment is **not** an unbiased estimate (which
is why positions are subsampled only for the expand approximation's factors and rows, and
not for unit-wise blocks, embeddings (whose ``A`` is read from the ids), ``"reduce"`` or
blocks with several uses).

The cost saved is that of the feature extraction and the factor GEMMs (``O(n·r·d²)`` instead
of ``O(N·R·d²)``); the backward pass that produces the output gradients is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from curvkit.config import KFACApprox
from curvkit.stats.layer_stats import LayerStats, Part, _diagonal_handler

__all__ = ["Subsample", "configure_engine", "from_config", "subsample_stats"]


@dataclass
class Subsample:
    """The subsampling of a :class:`~curvkit.stats.engine.CaptureEngine`'s statistics.

    Attributes:
        data: Fraction of the batch's data kept per block, in ``(0, 1]``.
        positions: Fraction of the weight-sharing positions kept, in ``(0, 1]``.
        generator: CPU generator of the draws (seeded by the preconditioner).
    """

    data: float = 1.0
    positions: float = 1.0
    generator: torch.Generator | None = None

    @property
    def active(self) -> bool:
        return self.data < 1.0 or self.positions < 1.0

    def __call__(self, stats: LayerStats) -> LayerStats:
        return subsample_stats(stats, self.data, self.positions, self.generator)


def _draw(total: int, keep: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(total, generator=generator, device="cpu")[:keep].sort().values


def _positions_of(part: Part) -> int:
    """``R`` of a use (from its output gradients' features, which cost a reshape; else from
    its input features)."""
    if part.grads:
        return int(part.output_features(part.grads[0]).shape[1])
    return int(part.input_features().shape[1])


def subsample_stats(
    stats: LayerStats, data: float = 1.0, positions: float = 1.0, generator: torch.Generator | None = None
) -> LayerStats:
    """``stats`` restricted to a random subset of its data and positions, rescaled so that
    ``A()`` and ``G()`` are unbiased estimates of the full batch's (module docstring).
    Returns ``stats`` itself when nothing is dropped."""
    parts = stats.parts
    n_total = stats.num_data
    scale = 1.0
    keep_n = max(1, round(data * n_total)) if data < 1.0 else n_total
    if keep_n < n_total:
        idx = _draw(n_total, keep_n, generator)
        parts = [_subset_data(p, idx) for p in parts]
        scale *= n_total / keep_n
    if (
        positions < 1.0
        and len(parts) == 1
        and not parts[0].transposed
        and stats.approx is KFACApprox.EXPAND
        and not stats.unitwise
        and _diagonal_handler(parts) is None
    ):
        r_total = _positions_of(parts[0])
        keep_r = max(1, round(positions * r_total))
        if keep_r < r_total:
            pos = _draw(r_total, keep_r, generator).to(parts[0].inputs.device)
            parts = [replace(parts[0], positions=pos)]
            scale *= r_total / keep_r
    if parts is stats.parts:
        return stats
    out = LayerStats(stats.layer, approx=stats.approx, parts=parts)
    out.product_dtype = stats.product_dtype
    out.g_scale = stats.g_scale * scale
    if not math.isfinite(out.g_scale):  # pragma: no cover - g_scale is finite and scale >= 1
        raise ValueError(f"subsampled g_scale {out.g_scale!r} is not finite")
    return out


def _subset_data(part: Part, idx: torch.Tensor) -> Part:
    i = idx.to(part.inputs.device)
    return replace(part, inputs=part.inputs.index_select(0, i), grads=[g.index_select(0, i) for g in part.grads])


def from_config(config: object, seed: int) -> Subsample | None:
    """The :class:`Subsample` of a statistics configuration's ``subsample_data`` /
    ``subsample_positions`` (``None`` when both are 1), its draws seeded by ``seed``."""
    data = float(getattr(config, "subsample_data", 1.0))
    positions = float(getattr(config, "subsample_positions", 1.0))
    if data >= 1.0 and positions >= 1.0:
        return None
    return Subsample(data, positions, torch.Generator(device="cpu").manual_seed(seed))


def configure_engine(engine: Any, config: object, seed: int) -> None:
    """Set a capture engine's statistics economies from a method's configuration: the
    subsampling (:func:`from_config`) and the dtype of the factor products
    (``stats_dtype``, :attr:`~curvkit.blocks.LayerStats.product_dtype`)."""
    engine.subsample = from_config(config, seed)
    engine.product_dtype = getattr(config, "stats_dtype", None)
