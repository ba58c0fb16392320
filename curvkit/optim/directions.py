r"""Stage 3 of a curvature optimizer's step: from the layers' preconditioned directions
(matrix form, one per block) to one direction per parameter.

A layer's matrix is scaled by its trust-region factor and split into the weight's and the
bias's shapes (:meth:`~curvkit.optim.Preconditioner.layer_directions`); a parameter that
several blocks share by rows (an attention's in-projection) is assembled from their parts
(:func:`assemble`); the parameters no block tracks take their gradient (the first-order
fallback). Alongside, the bounds of the directions' norms that the preconditioner's
direction guard already knows, which the update's guard then need not recompute.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from curvkit.optim.preconditioner import Preconditioner

__all__ = ["assemble", "decay_before", "parameter_directions"]


def parameter_directions(
    pre: Preconditioner,
    dirs: dict[str, Tensor],
    scales: dict[str, float],
    fallback: list[Tensor],
    groups: dict[int, dict[str, Any]],
) -> tuple[dict[int, Tensor], dict[int, Tensor], dict[int, float], dict[int, float]]:
    """``({id: parameter}, {id: its direction}, {id: its trust-region scale},
    {id: a bound of ‖its direction‖})``.

    The layers' directions in the parameters' shapes, scaled by their layers'
    trust-region factors (one product per layer matrix, before it is split; a
    parameter split into parts gets its rows from each), and the fallback's gradients,
    whose factor the update applies (one multi-tensor product). The bounds come from
    the layers' ``‖Δ_l‖`` that the direction guard computed (with a per-layer clip on),
    so the update's guard need not take those norms again: a parameter's part of a
    layer's matrix is no longer than the matrix (times the layer's scale); a parameter
    tiled by several layers' rows gets the root of their sum of squares, one with rows
    no layer covers none."""
    nu = scales.get("", 1.0)
    known = pre.direction_norms_sq
    direction: dict[int, Tensor] = {}
    params: dict[int, Tensor] = {}
    factor: dict[int, float] = {}
    squares: dict[int, float] = {}
    unknown: set[int] = set()  # parameters with a part whose layer's norm is not known
    pieces: dict[int, list[tuple[tuple[int, int], Tensor]]] = {}
    layers = pre.layers
    for name, (w_dir, b_dir) in pre.layer_directions(dirs, scales).items():
        layer = layers[name]
        sq = known.get(name)
        if sq is not None:
            sq *= scales.get(name, 1.0) ** 2
        refs = [(layer.weight_ref, w_dir)]
        if b_dir is not None and layer.bias_ref is not None:
            refs.append((layer.bias_ref, b_dir))
        for ref, d in refs:
            i = id(ref.param)
            params[i] = ref.param
            if sq is None:
                unknown.add(i)
            else:
                squares[i] = squares.get(i, 0.0) + sq
            if ref.rows is None:
                direction[i] = d
            else:
                pieces.setdefault(i, []).append((ref.rows, d))
    for i, parts in pieces.items():
        parts.sort(key=lambda part: part[0][0])
        if not _tiles(parts, int(params[i].shape[0])):
            unknown.add(i)  # rows no layer covers take the gradient: no bound known
        direction[i] = assemble(params[i], parts, groups, nu)
    for p in fallback:
        assert p.grad is not None
        direction[id(p)], params[id(p)] = decay_before(groups[id(p)], p, p.grad), p
        factor[id(p)] = nu
    bounds = {i: math.sqrt(v) for i, v in squares.items() if i not in unknown}
    return params, direction, factor, bounds


def assemble(
    param: Tensor,
    parts: list[tuple[tuple[int, int], Tensor]],
    groups: dict[int, dict[str, Any]],
    nu: float,
) -> Tensor:
    """A parameter's direction from the rows its blocks cover (``parts`` sorted by their
    first row); rows no block moved (a part without a gradient this step) take the
    first-order direction."""
    if _tiles(parts, int(param.shape[0])):
        # the parts tile the rows (q, k and v of an attention's in-projection): one copy
        return torch.cat([d if d.dtype == param.dtype else d.to(param.dtype) for _, d in parts])
    out = torch.empty_like(param)
    covered = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
    for (r0, r1), d in parts:
        out[r0:r1] = d
        covered[r0:r1] = True
    g = param.grad if param.grad is not None else torch.zeros_like(param)
    g = decay_before(groups[id(param)], param, g)
    out[~covered] = g[~covered] * nu
    return out


def decay_before(group: dict[str, Any], value: Tensor, g: Tensor) -> Tensor:
    """``g + γ θ`` for a parameter of ``group`` with ``weight_decay_mode="before"``
    (``value``: ``θ``, or the rows of it a block covers); ``g`` itself otherwise."""
    if group["weight_decay"] != 0 and group["weight_decay_mode"] == "before":
        return g.add(value, alpha=group["weight_decay"])
    return g


def _tiles(parts: list[tuple[tuple[int, int], Tensor]], rows: int) -> bool:
    """Whether row ranges sorted by their start cover ``0 … rows`` exactly, end to end."""
    end = 0
    for (r0, r1), _ in parts:
        if r0 != end:
            return False
        end = r1
    return end == rows
