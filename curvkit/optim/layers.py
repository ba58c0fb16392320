r"""A tracked layer's gradient as the matrix its block acts on, and back — one layer at a
time, or layers of equal shapes as one stack.

A block acts on its layer's ``(d_out, d_in [+1])`` matrix: the weight in the handler's
layout (:func:`curvkit.stats.handlers.weight_matrix`) with the bias appended as a last
column. :func:`layer_matrix` and :func:`split_layer_matrix` convert one layer.

On the hot path the preconditioner converts **stacks** instead (:class:`StackPlan`): the
layers whose weights share a shape, dtype and device and use the default layout (the
weight's first dimension is ``d_out``, the rest flattened) go through three tensor calls
per stack (stack the weight gradients, stack the biases, concatenate) rather than one
concatenation per layer, and their directions come back as views of one ``(B, d_out,
d_in)`` tensor (:meth:`StackPlan.split`). A deep network of equal-width layers pays for its
layers' bookkeeping once per stack, not once per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.stats.handlers import weight_from_matrix, weight_matrix
from curvkit.stats.plan import LayerPlan

__all__ = [
    "Batched",
    "StackPlan",
    "StepMatrices",
    "layer_matrix",
    "plan_stacks",
    "split_directions",
    "split_layer_matrix",
    "step_matrices",
    "to_device",
]


def layer_matrix(layer: LayerPlan, weight_tensor: Tensor, bias_tensor: Tensor | None) -> Tensor:
    """A layer's weight-shaped tensor (and bias) as one ``(d_out, d_in [+1])`` matrix (through
    the handler's weight layout, :func:`curvkit.stats.handlers.weight_matrix`)."""
    if weight_tensor.ndim == 2 and not _custom_layout(layer.handler):
        mat = weight_tensor  # already (d_out, d_in): no reshape on the hot path
    else:
        mat = weight_matrix(layer.handler, layer.module, weight_tensor)
    if layer.has_bias:
        assert bias_tensor is not None
        mat = torch.cat([mat, bias_tensor.reshape(-1, 1)], dim=1)
    return mat


def split_layer_matrix(layer: LayerPlan, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`layer_matrix`: ``(weight-shaped, bias-shaped or None)``."""
    ref = layer.weight_ref
    shape = ref.param.shape if ref.rows is None else ref.shape
    plain = len(shape) == 2 and not _custom_layout(layer.handler)  # the matrix is the weight's own layout
    if layer.has_bias:
        w_part, b_part = mat[:, :-1], mat[:, -1]
        return (w_part if plain else weight_from_matrix(layer.handler, layer.module, w_part, shape)), b_part
    return (mat if plain else weight_from_matrix(layer.handler, layer.module, mat, shape)), None


def _custom_layout(handler: object) -> bool:
    """Whether a handler stores its weight in a layout of its own (``weight_matrix`` /
    ``weight_from_matrix``, e.g. GPT-2's ``Conv1D``)."""
    if getattr(handler, "weight_matrix", None) is not None:
        return True
    return getattr(handler, "weight_from_matrix", None) is not None


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a block's state: nested dicts, lists and tuples) with every tensor on ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [to_device(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _stack_key(layer: LayerPlan, first_order_columns: bool) -> tuple[Any, ...] | None:
    """Layers with equal keys can be converted as one stack (``None``: on its own)."""
    if first_order_columns or getattr(layer.handler, "weight_matrix", None) is not None:
        return None  # a custom layout, or columns that take the first-order step
    w = layer.weight
    if w.ndim < 1:
        return None
    b = layer.bias
    if layer.has_bias and (b is None or b.dtype != w.dtype or b.device != w.device):
        return None
    return (tuple(w.shape), layer.has_bias, w.dtype, w.device)


@dataclass(frozen=True)
class StackPlan:
    """Layers of one shape, converted together.

    Attributes:
        names: The layers, in the preconditioner's order.
        weight_shape: Their weights' (common) storage shape.
        has_bias: Whether their matrices carry a bias column.
    """

    names: tuple[str, ...]
    weight_shape: tuple[int, ...]
    has_bias: bool

    def stack(self, grads: dict[str, tuple[Tensor, Tensor | None]]) -> Tensor:
        """The layers' gradients as one ``(B, d_out, d_in [+1])`` tensor."""
        ws = torch.stack([grads[n][0] for n in self.names])
        mats = ws.reshape(len(self.names), self.weight_shape[0], -1)
        if not self.has_bias:
            return mats
        bs = torch.stack([grads[n][1] for n in self.names])  # type: ignore[misc]
        return torch.cat([mats, bs.unsqueeze(-1)], dim=2)

    def split(self, out: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
        """Inverse of :meth:`stack` for a ``(B, d_out, d_in [+1])`` tensor: the weights'
        and the biases' parts, one view per layer (a copy only where the weight has more
        than two dimensions)."""
        n = len(self.names)
        if self.has_bias:
            ws = out[..., :-1].reshape(n, *self.weight_shape).unbind(0)
            return ws, out[..., -1].unbind(0)
        return out.reshape(n, *self.weight_shape).unbind(0), None


def plan_stacks(
    layers: dict[str, LayerPlan], first_order_columns: Iterable[str] = (), *, min_size: int = 2
) -> tuple[list[StackPlan], list[str]]:
    """Group layers of equal shape into stacks of at least ``min_size``: ``(stacks, the
    layers converted on their own)``."""
    exclude = set(first_order_columns)
    groups: dict[tuple[Any, ...], list[str]] = {}
    singles: list[str] = []
    for name, layer in layers.items():
        key = _stack_key(layer, name in exclude)
        if key is None:
            singles.append(name)
        else:
            groups.setdefault(key, []).append(name)
    stacks = []
    for key, names in groups.items():
        if len(names) >= min_size:
            stacks.append(StackPlan(tuple(names), key[0], key[1]))
        else:
            singles.extend(names)
    return stacks, singles


@dataclass
class Batched:
    """Layers preconditioned in one batched call: their names, the stacked gradients
    (``None`` once the step is over) and directions, the directions' per-layer views, and
    the stack's plan when it is whole."""

    names: tuple[str, ...]
    grads: Tensor | None
    out: Tensor
    views: tuple[Tensor, ...]
    plan: StackPlan | None


@dataclass
class StepMatrices:
    """One step's gradients in matrix form: ``mats`` per layer (views into ``stacks`` for
    stacked layers), and the directions computed in batched calls (``batched``)."""

    mats: dict[str, Tensor]
    stacks: list[tuple[StackPlan, Tensor]] = field(default_factory=list)
    batched: list[Batched] = field(default_factory=list)


def step_matrices(
    stacks: list[StackPlan], layers: dict[str, LayerPlan], grads: dict[str, tuple[Tensor, Tensor | None]]
) -> StepMatrices:
    """The gradients in matrix form: whole stacks (every layer of the stack has a gradient)
    in three tensor calls each, the other layers one at a time."""
    step = StepMatrices({})
    stacked: set[str] = set()
    for plan in stacks:
        if all(n in grads for n in plan.names):
            s = plan.stack(grads)
            step.stacks.append((plan, s))
            step.mats.update(zip(plan.names, s.unbind(0)))
            stacked.update(plan.names)
    for name, (w, b) in grads.items():
        if name not in stacked:
            step.mats[name] = layer_matrix(layers[name], w, b)
    return step


def split_directions(
    batched: list[Batched],
    layers: dict[str, LayerPlan],
    dirs: dict[str, Tensor],
    scales: dict[str, float] | None = None,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Directions in matrix form (``dirs``; those of the ``batched`` calls unchanged) in the
    layers' weight and bias shapes, each scaled by ``scales[layer]`` (default 1): one split
    per whole stack, one per other layer."""
    scales = scales or {}
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    for b in batched:
        if b.plan is None or not all(dirs.get(n) is v for n, v in zip(b.names, b.views)):
            continue
        o = b.out
        factors = [scales.get(n, 1.0) for n in b.names]
        if len(set(factors)) == 1 and factors[0] != 1.0:  # one factor (the KL clip's): a scalar product
            o = o * factors[0]
        elif any(f != 1.0 for f in factors):
            # the factors in float32 at least (as a Python scalar multiplies a 16-bit tensor)
            math_dtype = torch.promote_types(o.dtype, torch.float32)
            stacked = torch.tensor(factors, dtype=math_dtype, device=o.device)
            o = (o * stacked.view(-1, 1, 1)).to(o.dtype)
        ws, bs = b.plan.split(o)
        out.update(zip(b.names, zip(ws, bs if bs is not None else (None,) * len(ws))))
    for name, mat in dirs.items():
        if name not in out:
            scale = scales.get(name, 1.0)
            out[name] = split_layer_matrix(layers[name], mat * scale if scale != 1.0 else mat)
    return out
