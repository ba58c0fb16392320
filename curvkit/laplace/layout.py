r"""Where the entries of each block's matrix sit in the flat parameter vector.

:mod:`curvkit.laplace` works on the flat vector of the tracked parameters,
``θ = [p.flatten() for p in params]`` (each parameter once, whole, in PyTorch's row-major
order; see :class:`FlatLayout` for the order). A curvature block acts on its **block
matrix** ``V = [weight_matrix(W) | b]`` of shape ``(d_out, k)`` (see
:mod:`curvkit.stats.handlers`), which need not be a reshape of whole parameters:

* a block can cover a **row range** of a parameter (``nn.MultiheadAttention``'s query, key
  and value blocks over ``in_proj_weight``), so several blocks share one parameter;
* a block's matrix can be the **transpose** of its parameter (an ``nn.Embedding``'s
  ``Wᵀ``, an embedding tied to an LM head, Hugging Face's ``Conv1D``).

:func:`layer_index` gives, for every entry of ``V``, its position in ``θ``: the handler's
``weight_matrix`` applied to the parameter's own positions. Gathering ``θ`` with it gives
``V``; scattering into it puts a block's result back. Every block layout a handler can
express therefore works in Laplace without special cases, and the blocks of a model
partition ``θ`` (each entry belongs to exactly one block), which
:class:`~curvkit.laplace.KroneckerCurvature` checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from curvkit.stats.handlers import weight_matrix
from curvkit.stats.plan import LayerPlan, TrackingPlan

__all__ = ["FlatLayout", "layer_index", "parameter_order", "storage_kind"]


def parameter_order(plan: TrackingPlan) -> list[nn.Parameter]:
    """The tracked parameters, each once, in the order of the plan's blocks (weight before
    bias): ``model.parameters()`` order when every trainable parameter is tracked."""
    seen: dict[int, nn.Parameter] = {}
    for layer in plan:
        for p in layer.params:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _positions(param: Tensor, offset: int, rows: tuple[int, int] | None) -> Tensor:
    pos = torch.arange(offset, offset + param.numel(), dtype=torch.long, device="cpu").reshape(param.shape)
    return pos if rows is None else pos[rows[0] : rows[1]]


def layer_index(layer: LayerPlan, offsets: dict[int, int]) -> Tensor:
    """``(d_out, k)`` positions in the flat vector of the entries of ``layer``'s block
    matrix ``[weight_matrix(W) | b]`` (CPU, ``long``).

    Args:
        layer: The block.
        offsets: ``{id(parameter): offset of its first entry in the flat vector}``.

    Raises:
        KeyError: A parameter of the block is not in ``offsets``.
    """
    w = layer.weight_ref
    mat = weight_matrix(layer.handler, layer.module, _positions(w.param, offsets[id(w.param)], w.rows))
    if layer.has_bias and layer.bias_ref is not None:
        b = layer.bias_ref
        mat = torch.cat([mat, _positions(b.param, offsets[id(b.param)], b.rows).reshape(-1, 1)], dim=1)
    return mat.contiguous()


def storage_kind(index: Tensor, offset: int, shape: torch.Size) -> str:
    """How a block's weight columns ``index`` ``(d_out, d_in)`` lay out a *whole*
    parameter of ``shape`` starting at ``offset``: ``"standard"`` (the parameter reshaped
    to ``(d_out, -1)``: Linear, Conv), ``"transposed"`` (the transpose of a 2-D parameter:
    an embedding, Hugging Face ``Conv1D``) or ``"other"`` (e.g. a row range)."""
    numel = int(torch.Size(shape).numel())
    own = torch.arange(offset, offset + numel, dtype=torch.long, device=index.device)
    if index.numel() != numel:
        return "other"
    if torch.equal(index.reshape(-1), own):
        return "standard"
    if len(shape) == 2 and torch.equal(index, own.reshape(shape).t()):
        return "transposed"
    return "other"


class FlatLayout:
    """The flat vector of ``params`` and the position of every block's matrix entries in it.

    Args:
        plan: The blocks.
        params: The parameters of the flat vector, in order (each once). Every block's
            parameters must be among them.

    Attributes:
        offsets: ``{id(parameter): offset}``.
        num_params: ``P``.
        indices: ``{block name: (d_out, k) positions}`` (:func:`layer_index`).
    """

    def __init__(self, plan: TrackingPlan | Iterable[LayerPlan], params: Sequence[Tensor]) -> None:
        self.offsets: dict[int, int] = {}
        offset = 0
        for p in params:
            self.offsets[id(p)] = offset
            offset += p.numel()
        self.num_params = offset
        self.layers = {layer.name: layer for layer in plan}
        self.indices = {name: layer_index(layer, self.offsets) for name, layer in self.layers.items()}

    def stack(self, grads: dict[str, Tensor], n: int, like: Tensor | None = None) -> Tensor:
        """Per-datum block gradients ``{block: (N, d_out, k)}`` as ``(N, P)`` rows of the
        flat vector (zero where no block's gradient reached)."""
        ref = next(iter(grads.values()), like)
        if ref is None:
            return torch.zeros(n, self.num_params, device="cpu")
        out = ref.new_zeros(n, self.num_params)
        for name, g in grads.items():
            if g.shape[0] != n:
                raise ValueError(
                    f"block {name!r} has per-datum gradients for {g.shape[0]} rows but the batch has {n} data: its "
                    "module's rows are not the data points (a module called on a batch of one and broadcast over "
                    "the batch, such as Hugging Face position ids of shape (1, T), or data folded into its batch). "
                    "Pass inputs whose first dimension is the batch (e.g. position ids expanded to (N, T))."
                )
            index = self.indices[name].to(out.device).reshape(-1)
            out[:, index] = g.reshape(n, -1).to(out.dtype)
        return out
