r"""One block of a whole-model curvature: a block operator and where its entries sit.

A :class:`~curvkit.laplace.KroneckerCurvature` is block-diagonal (up to a permutation of
the flat parameter vector). Each block is an :class:`OperatorBlock`: a block operator
(:class:`~curvkit.linalg.operator.BlockOperator`, the same classes the optimizers' blocks
return from ``as_operator()``: :class:`~curvkit.linalg.kronecker.KroneckerOperator`
``G ⊗ A``, :class:`~curvkit.linalg.kronecker.EigenbasisOperator` for EKFAC,
:class:`~curvkit.linalg.kronecker.UnitwiseOperator` for a normalisation layer, or any
other) acting on the row-major flattening of the block's **matrix**
:math:`V \in \mathbb{R}^{d_{out} \times k}`, plus the positions of ``V``'s entries among
the block's parameters.

Where the entries of ``V`` sit is :attr:`OperatorBlock.index` (see
:mod:`curvkit.laplace.layout`): the layer's ``[weight_matrix(W) | b]``, which may be a row
range of a parameter (attention's query/key/value blocks) or its transpose (an embedding, a
tied LM head). A block without an ``index`` covers whole parameters, each reshaped to
``(d_out, -1)`` and concatenated along the columns (``V = [W_{(d_out, ·)}  b_{(d_out, 1)}]``;
a normalisation layer's ``γ`` and ``β`` are then its two columns); a bias on its own is a
block ``G ⊗ [a]``. A :class:`~curvkit.laplace.KroneckerCurvature` maps these positions into
its flat vector (:attr:`~curvkit.laplace.KroneckerCurvature.indices`), so any set of blocks
that covers its parameters exactly once forms a curvature.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.laplace.layout import FlatLayout
from curvkit.linalg.kronecker import EigenbasisOperator, KroneckerOperator, UnitwiseOperator
from curvkit.linalg.operator import BlockOperator, CurvatureOperator, OperatorEigen

__all__ = ["OperatorBlock", "layer_blocks"]


@dataclass(frozen=True)
class OperatorBlock:
    """One block of a block-diagonal curvature: an operator on ``(d_out, k)`` matrices and
    its layout.

    Attributes:
        name: A label (the layer's name, ``"<layer>.bias"`` for a separate bias).
        param_names: Names of the parameters the block touches (whole parameters; a block
            covering rows of a parameter names the parameter).
        param_shapes: Their shapes.
        operator: The curvature of the block, a block operator on ``(d_out, k)`` matrices
            (symmetric positive semi-definite).
        index: ``(d_out, k)`` positions of the block matrix's entries among the block's
            parameters (``param_names``, each flattened row-major, concatenated); several
            blocks may cover parts of one parameter. ``None``: whole parameters, each
            reshaped to ``(d_out, -1)``, concatenated along the columns.
        layer: The tracked layer (block of the plan) this block belongs to (EKFAC's
            correction needs it), ``None`` for blocks built by hand.
        columns: The columns ``[start, stop)`` of that layer's matrix ``[W b]`` this block
            covers (all of them, the weight's, or the bias column).
    """

    name: str
    param_names: tuple[str, ...]
    param_shapes: tuple[torch.Size, ...]
    operator: BlockOperator
    index: Tensor | None = None
    layer: str | None = None
    columns: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        op = self.operator
        shape = getattr(op, "matrix_shape", None)
        if not isinstance(op, CurvatureOperator) or shape is None:
            raise TypeError(
                f"block {self.name!r}: the operator must be a block operator on (d_out, k) matrices (a "
                f"curvkit.linalg.operator.BlockOperator, e.g. KroneckerOperator), got {type(op).__name__}."
            )
        d_out, k = shape
        if self.index is not None:
            if tuple(self.index.shape) != (d_out, k):
                raise ValueError(
                    f"block {self.name!r}: index of shape {tuple(self.index.shape)} does not match the operator's "
                    f"({d_out}, {k}) matrices; it must be (d_out, k) = {(d_out, k)}."
                )
        else:
            widths = [math.prod(s[1:]) for s in self.param_shapes]
            if any(s[0] != d_out for s in self.param_shapes) or sum(widths) != k:
                raise ValueError(
                    f"block {self.name!r}: parameter shapes {[tuple(s) for s in self.param_shapes]} do not match the "
                    f"operator's ({d_out}, {k}) matrices; each parameter needs d_out={d_out} rows and together k={k} "
                    "columns (or give the block an index for another layout)."
                )

    @classmethod
    def kronecker(
        cls,
        name: str,
        param_names: tuple[str, ...],
        param_shapes: tuple[torch.Size, ...],
        G: Tensor,
        A: Tensor,
        *,
        index: Tensor | None = None,
        layer: str | None = None,
        columns: tuple[int, int] | None = None,
    ) -> OperatorBlock:
        """A ``G ⊗ A`` block (``A`` may be its diagonal, a 1-D tensor)."""
        return cls(name, param_names, param_shapes, KroneckerOperator(A, G, label=name), index, layer, columns)

    @classmethod
    def unitwise(
        cls,
        name: str,
        param_names: tuple[str, ...],
        param_shapes: tuple[torch.Size, ...],
        F: Tensor,
        *,
        index: Tensor | None = None,
        layer: str | None = None,
        columns: tuple[int, int] | None = None,
    ) -> OperatorBlock:
        """A normalisation layer's ``blockdiag(F_i)`` block (``F`` of shape ``(D, k, k)``)."""
        return cls(name, param_names, param_shapes, UnitwiseOperator(F, label=name), index, layer, columns)

    # --- layout -------------------------------------------------------------------------

    @property
    def d_out(self) -> int:
        return int(self.operator.matrix_shape[0])

    @property
    def k(self) -> int:
        return int(self.operator.matrix_shape[1])

    @property
    def numel(self) -> int:
        return self.d_out * self.k

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def widths(self) -> list[int]:
        return [math.prod(s[1:]) for s in self.param_shapes]

    def to_matrix(self, x: Tensor) -> Tensor:
        """Flat rows ``(numel, K)`` of the block's own parameters (concatenated, each
        flattened; blocks without an :attr:`index`) to ``(K, d_out, k)``."""
        cols = x.shape[1]
        parts = x.split([self.d_out * w for w in self.widths])
        return torch.cat([p.reshape(self.d_out, w, cols) for p, w in zip(parts, self.widths)], 1).permute(2, 0, 1)

    def from_matrix(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`to_matrix`: ``(K, d_out, k)`` to flat rows ``(numel, K)``."""
        cols = v.shape[0]
        parts = v.permute(1, 2, 0).split(self.widths, dim=1)
        return torch.cat([p.reshape(self.d_out * w, cols) for p, w in zip(parts, self.widths)], 0)

    def flat_to_matrix_index(self) -> Tensor:
        """For each flat position of the block's own parameters, its index in ``vec_r(V)``
        (blocks without an :attr:`index`)."""
        idx = torch.arange(self.numel, device=self.device).view(1, self.d_out, self.k)
        return self.from_matrix(idx)[:, 0]

    def local_index(self) -> Tensor:
        """``(d_out, k)``: for each entry of ``V``, its position among the block's own
        parameters, concatenated and flattened (:attr:`index`, or the default layout)."""
        if self.index is not None:
            return self.index
        return self.to_matrix(torch.arange(self.numel, device=self.device).unsqueeze(1))[0]

    # --- the block as a matrix (delegated to the operator) ------------------------------------

    def kron(self) -> Tensor:
        """The block's matrix in ``vec_r(V)`` order, dense."""
        return self.operator.to_dense()

    def dense(self) -> Tensor:
        """The block as a dense ``(numel, numel)`` matrix in the block's local flat order
        (blocks without an :attr:`index`)."""
        idx = self.flat_to_matrix_index()
        return self.kron()[idx][:, idx]

    def apply(self, v: Tensor) -> Tensor:
        """The block applied to block matrices ``v`` ``(K, d_out, k)``."""
        return self.operator @ v  # type: ignore[no-any-return]

    def matmat(self, x: Tensor) -> Tensor:
        """``block @ x`` for flat rows ``x`` ``(numel, K)`` in the local layout."""
        return self.from_matrix(self.apply(self.to_matrix(x)))

    def eigen(self) -> OperatorEigen:
        """The operator's eigendecomposition (cached by the bundled operators): a
        :class:`~curvkit.linalg.kronecker.KroneckerEigen` for Kronecker and eigenbasis
        blocks, a :class:`~curvkit.linalg.kronecker.UnitwiseEigen` for unit-wise ones."""
        return self.operator.eigen()

    def spectrum(self) -> Tensor:
        """Eigenvalues ``(d_out, k)`` laid out like ``V``."""
        return self.eigen().values

    def diagonal(self) -> Tensor:
        """``diag`` of the block as a ``(d_out, k)`` matrix (laid out like ``V``)."""
        diagonal = getattr(self.operator, "diagonal", None)
        if diagonal is not None:
            return diagonal()  # type: ignore[no-any-return]
        return self.kron().diagonal().reshape(self.d_out, self.k)

    def trace(self) -> Tensor:
        return self.operator.trace()

    def tensors(self) -> list[Tensor]:
        """The tensors that define the block (for finiteness checks)."""
        tensors = getattr(self.operator, "tensors", None)
        return list(tensors()) if tensors is not None else [self.kron()]

    # --- what the operator is made of (for the bundled operators) ----------------------------------

    def _kronecker(self, what: str) -> KroneckerOperator:
        op = self.operator
        if isinstance(op, EigenbasisOperator) and op.kronecker is not None:
            return op.kronecker
        if isinstance(op, KroneckerOperator):
            return op
        raise AttributeError(f"block {self.name!r} has no {what}: its operator is a {type(op).__name__}.")

    @property
    def G(self) -> Tensor:
        """``G`` of a Kronecker block (or of the factors an EKFAC block was corrected from)."""
        return self._kronecker("G").G

    @property
    def A(self) -> Tensor:
        """``A`` of a Kronecker block, or its diagonal (1-D)."""
        return self._kronecker("A").A

    @property
    def diagonal_A(self) -> bool:
        """Whether ``A`` is given as its diagonal."""
        return self._kronecker("A").diagonal_A

    def A_dense(self) -> Tensor:
        """``A`` as a ``(k, k)`` matrix."""
        return self._kronecker("A").A_dense()

    def A_diagonal(self) -> Tensor:
        """The diagonal of ``A``."""
        return self._kronecker("A").A_diagonal()

    @property
    def F(self) -> Tensor:
        """``F`` ``(D, k, k)`` of a unit-wise block."""
        if not isinstance(self.operator, UnitwiseOperator):
            raise AttributeError(f"block {self.name!r} has no F: its operator is a {type(self.operator).__name__}.")
        return self.operator.F

    @property
    def corrected_eigenvalues(self) -> Tensor | None:
        """EKFAC's spectrum ``(d_out, k)`` of an eigenvalue-corrected block, else ``None``."""
        return self.operator.S if isinstance(self.operator, EigenbasisOperator) else None

    # --- copies -------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> OperatorBlock:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def scaled(self, scale: float) -> OperatorBlock:
        """The block times ``scale`` (a non-negative number; eigendecompositions are kept)."""
        return dataclasses.replace(self, operator=self.operator.scaled(scale))


def _local_index(layout: FlatLayout, layer: Any) -> Tensor:
    """The layer's ``(d_out, k)`` matrix positions within its own parameters (concatenated,
    each flattened, in ``layer.params`` order): the layout a block's ``index`` describes."""
    flat_to_local = torch.full((layout.num_params,), -1, dtype=torch.long, device="cpu")
    start = 0
    for p in layer.params:
        offset = layout.offsets[id(p)]
        flat_to_local[offset : offset + p.numel()] = torch.arange(start, start + p.numel(), device="cpu")
        start += p.numel()
    return flat_to_local[layout.indices[layer.name]]


def layer_blocks(
    layer: Any, op: BlockOperator, names: dict[int, str], layout: FlatLayout, separate_bias: bool
) -> list[OperatorBlock]:
    """The blocks of one tracked layer whose curvature is ``op`` on its ``(d_out, k)``
    matrix: one block, or (``separate_bias`` and a layer with a bias or shift) a weight
    block and a ``"<layer>.bias"`` block, the cross terms dropped (``op.split_columns``:
    :class:`~curvkit.linalg.kronecker.KroneckerOperator` and
    :class:`~curvkit.linalg.kronecker.UnitwiseOperator` have it).

    Raises:
        ValueError: ``op`` does not fit the layer's matrix, or cannot be split.
    """
    index = _local_index(layout, layer)  # positions within the layer's own parameters
    if tuple(op.matrix_shape) != tuple(index.shape):
        raise ValueError(
            f"layer {layer.name!r}: its curvature acts on {tuple(op.matrix_shape)} matrices but the layer's matrix "
            f"[W b] is {tuple(index.shape)}."
        )
    params = layer.params
    pnames = tuple(names[id(p)] for p in params)
    pshapes = tuple(p.shape for p in params)
    k = index.shape[1]
    if layer.bias is None or not separate_bias:
        return [OperatorBlock(layer.name, pnames, pshapes, op, index, layer.name, (0, k))]
    split = getattr(op, "split_columns", None)
    if split is None:
        raise ValueError(
            f"layer {layer.name!r}: separate_bias=True drops the weight-bias cross terms of a block, which needs a "
            f"Kronecker or unit-wise block; this layer's curvature is a {type(op).__name__}. Use separate_bias=False."
        )
    d = k - 1
    weight_op, bias_op = split(d)
    return [
        OperatorBlock(layer.name, pnames[:1], pshapes[:1], weight_op, index[:, :d], layer.name, (0, d)),
        OperatorBlock(
            f"{layer.name}.bias",
            pnames[1:],
            pshapes[1:],
            bias_op,
            index[:, d:] - pshapes[0].numel(),  # positions within the bias alone
            layer.name,
            (d, k),
        ),
    ]
