r"""A method's blocks on a model: built once from the tracking plan, fed statistics behind
the guards' gates.

:func:`build_blocks` asks the method for one block per tracked layer and records the
layers it cannot serve (first-order, with the reason). :func:`fold_statistics` folds one
step's statistics into the blocks, all or none: every batch estimate is checked finite and
compared with its running magnitude (:class:`~curvkit.optim.guards.OutlierGates`) before
any block changes; the core then gives each block its EMA weight and counts the updates it
accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.blocks import BlockInfo, CurvatureBlock, LayerStats
from curvkit.errors import ConfigError, UnsupportedModuleError
from curvkit.methods import MethodConfig, MethodSpec
from curvkit.optim.guards import OutlierGates
from curvkit.optim.layers import Batched, StepMatrices
from curvkit.stats.plan import LayerPlan, TrackingPlan

__all__ = ["BlockSet", "build_blocks", "fold_statistics", "precondition_blocks", "release"]


@dataclass
class BlockSet:
    """What a method makes of a model's tracked layers.

    Attributes:
        blocks: ``{layer: block}`` for the layers the method preconditions.
        layers: Their plans (same keys, same order).
        first_order: ``{layer: reason}`` for the layers it cannot serve.
        first_order_columns: Columns of a block's matrix that take the first-order step (a
            handler's ``first_order_columns``: an untied embedding's padding row, which has
            no gradient).
    """

    blocks: dict[str, CurvatureBlock] = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    first_order: dict[str, str] = field(default_factory=dict)
    first_order_columns: dict[str, list[int]] = field(default_factory=dict)


def build_blocks(spec: MethodSpec, plan: TrackingPlan, config: MethodConfig, registry: Any) -> BlockSet:
    """One block per tracked layer the method serves (:meth:`MethodSpec.make_block`); a layer
    it declines (:meth:`MethodSpec.unsupported_reason`, or a factory raising
    :class:`~curvkit.errors.UnsupportedModuleError`) is recorded as first-order."""
    out = BlockSet()
    for layer in plan:
        info = BlockInfo.from_plan(layer)
        reason = spec.unsupported_reason(info)
        if reason is None:
            try:
                out.blocks[layer.name] = spec.make_block(info, config, registry)
                out.layers[layer.name] = layer
                continue
            except UnsupportedModuleError as err:  # the factory declines this layer
                reason = str(err)
        out.first_order[layer.name] = reason
    _check_stats_dtype(spec.name, config, out.blocks)
    for name, layer in out.layers.items():
        columns = getattr(layer.handler, "first_order_columns", None)
        cols = columns(layer.module) if columns is not None and not layer.tied else []
        if cols:
            out.first_order_columns[name] = cols
    return out


def _check_stats_dtype(method: str, config: MethodConfig, blocks: dict[str, CurvatureBlock]) -> None:
    """Refuse ``stats_dtype`` for a method whose blocks compute their statistics without the
    batch factors' Gram products (:attr:`~curvkit.blocks.CurvatureBlock.honours_stats_dtype`
    ``False``): the option would have no effect."""
    dtype = getattr(config, "stats_dtype", None)
    if dtype is None:
        return
    ignoring = sorted({type(b).__name__ for b in blocks.values() if type(b).honours_stats_dtype is False})
    if ignoring:
        raise ConfigError(
            f"method {method!r}",
            [
                f"stats_dtype={dtype} runs the Gram products of the batch factors A and G in bf16, but "
                f"{', '.join(ignoring)} computes {method}'s statistics without them, so it would have no effect: drop "
                "stats_dtype (precondition_dtype, where the method has it, lowers the preconditioning products)"
            ],
        )


def fold_statistics(
    blocks: Mapping[str, CurvatureBlock],
    present: dict[str, LayerStats],
    ema: float,
    gates: OutlierGates,
    counters: dict[str, Any],
) -> bool:
    """Fold this step's statistics into the blocks, behind two gates; ``False`` if the batch
    was refused (every block untouched).

    * **Finite**: every block's batch estimate is checked before any block changes
      (:meth:`~curvkit.blocks.CurvatureBlock.batch_is_finite`); one non-finite layer
      skips the update of all (``skipped_stat_updates``).
    * **Outliers**: each layer's batch magnitudes
      (:meth:`~curvkit.blocks.CurvatureBlock.batch_magnitudes`, e.g. ``tr A_b`` and
      ``tr G_b``) are compared with the running (log-average) magnitudes of the batches
      it accepted (:class:`~curvkit.optim.guards.OutlierGates`); a part above
      ``OUTLIER_RATIO`` times its running magnitude makes the batch an outlier, and the
      update of all layers is skipped (``outlier_stat_updates``). ``OUTLIER_PATIENCE``
      outliers in a row are taken as a real change of level: the batch is folded in
      (``accepted_outlier_levels``).

    The ``k``-th update a block accepts gets the EMA weight ``min(1 − 1/k, ρ)`` (a block
    may carry its own ρ as ``stat_decay``: the unit-wise block, under methods without
    ``ema_decay``). A block may still decline its own update (``update`` returns
    ``False``) when its new state would not be finite; the core counts the others.
    """
    # blocks with their own finiteness check run it; the default check is the magnitudes'
    own = [n for n in present if type(blocks[n]).batch_is_finite is not CurvatureBlock.batch_is_finite]
    if not all(blocks[n].batch_is_finite(present[n]) for n in own):
        counters["skipped_stat_updates"] += 1
        release(blocks, present)
        return False
    magnitudes = {n: tuple(float(v) for v in blocks[n].batch_magnitudes(s)) for n, s in present.items()}
    if any(not math.isfinite(v) for m in magnitudes.values() for v in m):
        counters["skipped_stat_updates"] += 1
        release(blocks, present)
        return False
    outliers, accepted = gates.statistics_outliers(magnitudes)
    if outliers and not accepted:
        counters["outlier_stat_updates"] += 1
        release(blocks, present)
        return False
    counters["accepted_outlier_levels"] += accepted
    for name, s in present.items():
        block = blocks[name]
        k = block.num_updates + 1
        rho = getattr(block, "stat_decay", None)
        before = block.num_updates
        taken = block.update(s, min(1.0 - 1.0 / k, ema if rho is None else rho))
        # the core counts the updates a block accepted (False: it declined this batch); a
        # block that counts itself is left alone
        if taken is not False and block.num_updates == before:
            block.num_updates += 1
        gates.track_statistics(name, magnitudes[name])
    return True


def release(blocks: Mapping[str, CurvatureBlock], present: Mapping[str, LayerStats]) -> None:
    """Drop what the blocks computed from a batch they will not fold in (it holds the
    batch's features)."""
    for name in present:
        block = blocks[name]
        if getattr(block, "_batch_cache", None) is not None:
            block._batch_cache = None  # type: ignore[attr-defined]


def precondition_blocks(
    blocks: Mapping[str, CurvatureBlock],
    step: StepMatrices,
    first_order: dict[str, Tensor],
    first_order_columns: Mapping[str, list[int]],
) -> dict[str, Tensor]:
    """The directions of one step: one batched call
    (:meth:`~curvkit.blocks.CurvatureBlock.precondition_many`) per group of at least two
    stacked layers whose blocks share a class and a
    :meth:`~curvkit.blocks.CurvatureBlock.batch_key` (recorded in ``step.batched``), one
    :meth:`~curvkit.blocks.CurvatureBlock.precondition` per other layer; ``first_order``
    layers keep their gradient, and ``first_order_columns`` of a block's matrix take the
    gradient's columns."""
    out: dict[str, Tensor] = {}
    for plan, s in step.stacks:
        if any(n in first_order for n in plan.names):
            continue
        groups: dict[Any, list[str]] = {}
        for n in plan.names:
            key = blocks[n].batch_key()
            if key is not None:
                groups.setdefault((type(blocks[n]), key), []).append(n)
        for (cls, _), names in groups.items():
            if len(names) < 2:
                continue
            whole = len(names) == len(plan.names)
            grads = s if whole else torch.stack([step.mats[n] for n in names])
            o = cls.precondition_many([blocks[n] for n in names], grads)
            views = o.unbind(0)
            out.update(zip(names, views))
            step.batched.append(Batched(tuple(names), grads, o, views, plan if whole else None))
    for name, m in step.mats.items():
        if name in out:
            continue
        out[name] = first_order[name] if name in first_order else blocks[name].precondition(m)
    for name, cols in first_order_columns.items():
        if name in out and name not in first_order:  # e.g. an embedding's padding row
            out[name][:, cols] = step.mats[name][:, cols].to(out[name].dtype)
    return {n: out[n] for n in step.mats}
