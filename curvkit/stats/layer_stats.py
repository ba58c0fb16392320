r"""One batch's statistics of one block, from the uses the capture engine recorded.

A block's weight can be used several times in one forward pass: a module called twice,
layers shared across depth (ALBERT), modules whose weights are tied. Each use ``u`` gives
the block input features :math:`\bar a_{n,r,u}` and output gradients :math:`g_{p,n,r,u}`
(``p`` the backpropagated vector: one for the empirical Fisher, ``M`` MC samples, ``C``
columns of the type-2 loss-Hessian root). The exact per-datum gradient of the weight is
:math:`J_{p,n} = \sum_u\sum_r g_{p,n,r,u}\,\bar a_{n,r,u}^\top`.

**Uses in the same layout** are extra positions of the weight-sharing axis ``r``
(Eschenhagen et al., 2023, applied across uses): *expand* treats every position of every
use as a sample, :math:`A = \frac{1}{N\sum_u R_u}\sum\bar a\bar a^\top`,
:math:`G = s\sum g g^\top`; *reduce* sums the gradients and averages the inputs over all
positions of all uses before the outer products. With a single use this is the usual
expand/reduce; for a linear layer applied to a sequence it is exactly what you get by
concatenating the sequences.

**Uses in transposed layouts** (an embedding ``W`` tied to an output layer ``Wᵀ``): each
layout's uses give a Kronecker term in the block's layout, :math:`G_1\otimes A_1` and
:math:`A_2\otimes G_2`, and the block's pair is the *nearest Kronecker product* of their
sum in the Frobenius norm (Van Loan & Pitsianis, 1993): :math:`G = \sum_t\alpha_t G_t`,
:math:`A = \sum_t\beta_t A_t` with the coefficients from the top singular pair of the
rearranged sum (a ``2 × 2`` eigenproblem), normalised so that :math:`\sum_t\alpha_t = 1`.
It reproduces either term exactly when the other vanishes. Per-datum gradients are exact
(the sum over both layouts); the per-row quantities (:meth:`LayerStats.rows`, the
features) do not exist for such a block and raise :class:`~curvkit.errors.TiedStatisticsError`.

**Unit-wise blocks** (normalisation layers, :mod:`curvkit.stats.norms`) have no Kronecker
factors: their statistics are the per-datum, per-unit gradients
:meth:`LayerStats.unit_gradients` ``(P·N, D, k)`` (summed over the positions of every use)
and the exact per-unit Fisher :meth:`LayerStats.unit_fisher` ``(D, k, k)``; ``A()``,
``G()`` and the per-row features raise :class:`~curvkit.errors.UnitwiseStatisticsError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import KFACApprox
from curvkit.errors import TiedStatisticsError, UnitwiseStatisticsError
from curvkit.stats.factors import assemble_gram, gram, output_gram, sum_gram

__all__ = ["GradientStats", "LayerStats", "Part", "SharedLayerStats", "combine_layouts", "nearest_kronecker"]


@dataclass
class Part:
    """One use of a block: its handler, module, batch-first input and output gradients.

    Attributes:
        handler: Feature extraction for this use (``input_features`` /
            ``output_features``, optional ``input_gram``).
        module: The module handed to the handler.
        inputs: The use's input (detached, batch first).
        grads: Gradients w.r.t. the use's output, one per backpropagated vector (batch
            first, restricted to the block's output columns).
        transposed: The use's layout is the transpose of the block's.
        positions: Indices of the weight-sharing positions (axis ``R`` of the features)
            this use keeps (subsampled statistics, :mod:`curvkit.stats.subsample`);
            ``None``: all of them.
    """

    handler: Any
    module: nn.Module
    inputs: Tensor
    grads: list[Tensor] = field(default_factory=list)
    transposed: bool = False
    positions: Tensor | None = None

    def input_features(self) -> Tensor:
        x = self.handler.input_features(self.module, self.inputs)
        return x if self.positions is None else x.index_select(1, self.positions)

    def output_features(self, g: Tensor) -> Tensor:
        f = self.handler.output_features(self.module, g)
        return f if self.positions is None else f.index_select(1, self.positions)


def _diagonal_handler(parts: list[Part]) -> Any:
    """The handler of ``parts`` when they all share one whose input features are one-hot
    (``diagonal_input``, e.g. :class:`~curvkit.stats.embedding.EmbeddingHandler`), so that
    ``A`` is diagonal and computed by its ``input_factor``; else ``None``."""
    first = parts[0].handler
    if not getattr(first, "diagonal_input", False) or not hasattr(first, "input_factor"):
        return None
    if any(type(p.handler) is not type(first) for p in parts):
        return None
    return first


def _input_sums(
    parts: list[Part], approx: KFACApprox, has_bias: bool, product_dtype: torch.dtype | None = None
) -> Tensor:
    """``A`` of same-layout parts (see the module docstring), through a handler's
    ``input_gram`` fast path where it has one (expand). For a handler with one-hot inputs
    (``diagonal_input``) it is the 1-D diagonal its ``input_factor`` computes. With
    ``product_dtype`` the Gram products take their inputs in that dtype."""
    diagonal = _diagonal_handler(parts)
    if diagonal is not None and not has_bias:
        return diagonal.input_factor(parts, approx)
    if approx is KFACApprox.EXPAND:
        xtx: Tensor | None = None
        col_sum: Tensor | None = None
        count = 0
        for part in parts:
            plain = part.positions is None and product_dtype is None
            fast = getattr(part.handler, "input_gram", None) if plain else None
            stats = fast(part.module, part.inputs) if fast is not None else None
            if stats is None:
                feats = part.input_features()
                xtx_p = sum_gram(feats, product_dtype)
                stats = (xtx_p, feats.sum((0, 1), dtype=xtx_p.dtype), feats.shape[0] * feats.shape[1])
            p_xtx, p_sum, p_count = stats
            xtx = p_xtx if xtx is None else xtx.add_(p_xtx)
            col_sum = p_sum if col_sum is None else col_sum.add_(p_sum)
            count += p_count
        assert xtx is not None and col_sum is not None
        a = assemble_gram(xtx, col_sum, count) if has_bias else xtx
        return a.div_(max(count, 1))
    feats = _cat_features([p.input_features() for p in parts])
    n = feats.shape[0]
    return gram(feats.mean(1), has_bias, product_dtype).div_(n)


def _cat_features(features: list[Tensor]) -> Tensor:
    if len(features) == 1:
        return features[0]
    n = {f.shape[0] for f in features}
    if len(n) > 1:
        raise ValueError(
            f"the uses of one block in one forward pass have different batch sizes {sorted(n)}; curvkit pairs "
            "the uses of a weight datum by datum. Call the module on batches of one size within a forward pass."
        )
    return torch.cat(features, dim=1)


def _output_sum(parts: list[Part], p: int, approx: KFACApprox, product_dtype: torch.dtype | None = None) -> Tensor:
    """Unscaled ``Σ g gᵀ`` of pass ``p`` over same-layout parts (expand: every position of
    every use; reduce: the positions' and uses' sum per datum first)."""
    if approx is KFACApprox.EXPAND:
        total: Tensor | None = None
        for part in parts:
            s = output_gram(part.output_features(part.grads[p]), approx, product_dtype)
            total = s if total is None else total.add_(s)
        assert total is not None
        return total
    summed: Tensor | None = None
    for part in parts:
        f = part.output_features(part.grads[p]).sum(1)
        summed = f if summed is None else summed + f
    assert summed is not None
    return gram(summed, product_dtype=product_dtype)


def nearest_kronecker(terms: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    r"""The pair ``(L, R)`` minimising :math:`\lVert\sum_t L_t\otimes R_t - L\otimes R\rVert_F`.

    With :math:`M_L = (\langle L_s, L_t\rangle)` and :math:`M_R = (\langle R_s, R_t\rangle)`,
    ``L = Σ α_t L_t`` for the top eigenvector ``α`` of :math:`M_R M_L` (non-negative for
    positive semi-definite factors) and ``R = Σ (M_L α)_t R_t / αᵀ M_L α`` (Van Loan &
    Pitsianis, 1993). ``α`` is scaled to sum to one.
    """
    if len(terms) == 1:
        return terms[0]
    k = len(terms)
    dev = terms[0][0].device
    ml = torch.empty(k, k, dtype=torch.float64, device=dev)
    mr = torch.empty(k, k, dtype=torch.float64, device=dev)
    for s in range(k):
        for t in range(k):
            ml[s, t] = (terms[s][0].double() * terms[t][0].double()).sum()
            mr[s, t] = (terms[s][1].double() * terms[t][1].double()).sum()
    # M_R M_L is similar to the symmetric M_L^{1/2} M_R M_L^{1/2}: real, non-negative spectrum
    evals, evecs = torch.linalg.eig(mr @ ml)
    alpha = evecs[:, int(evals.real.argmax())].real
    if float(alpha.sum()) < 0:
        alpha = -alpha
    alpha = alpha.clamp_min(0)
    total = float(alpha.sum())
    norm = float(alpha @ ml @ alpha) if total > 0 else 0.0
    like_l, like_r = terms[0]
    if total <= 0 or norm <= 0:
        return torch.zeros_like(like_l), torch.zeros_like(like_r)
    alpha = alpha / total
    beta = (ml @ alpha) / float(alpha @ ml @ alpha)
    left = sum(float(a) * t[0] for a, t in zip(alpha, terms))
    right = sum(float(b) * t[1] for b, t in zip(beta, terms))
    return left, right  # type: ignore[return-value]


def combine_layouts(layouts: list[tuple[bool, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """A tied block's pair ``(A, G)`` from the factors of its layouts
    (:meth:`LayerStats.layout_factors`): a transposed layout's ``A_u ⊗ ...`` is
    ``G_u``'s side in the block's layout, and the terms are joined by
    :func:`nearest_kronecker`. A 1-D (diagonal) factor is made a matrix first: the sum of a
    diagonal and a dense term is dense."""
    terms = [(_as_matrix(a), _as_matrix(g)) if t else (_as_matrix(g), _as_matrix(a)) for t, a, g in layouts]
    g, a = nearest_kronecker(terms)
    return a, g


class LayerStats:
    r"""One batch's statistics of one block, computed lazily on request.

    Built by the capture engine (:mod:`curvkit.stats.engine`) from the uses of the block in
    the batch's forward pass(es), each a :class:`Part`; ``LayerStats(layer, inputs, grads,
    approx, g_scale)`` builds the statistics of a single use. With :math:`\bar a_{n,r}` the
    input features (bias column appended; ``r`` running over the positions of every use) and
    :math:`g_{p,n,r}` the output features:

    * :meth:`A`, :meth:`G`: the batch's Kronecker factors, scaled exactly as
      :func:`curvkit.kronecker_factors` scales them, ``G = g_scale · Σ_p Σ g gᵀ``;
    * :meth:`rows`: ``(a_rows, g_rows)`` with ``A = a_rowsᵀ a_rows`` and
      ``G = Σ_p g_rows[p]ᵀ g_rows[p]``, row ``i`` of ``a_rows`` paired with row ``i`` of
      every ``g_rows[p]`` (expand: one row per ``(n, r)``; reduce: one per ``n``);
    * :meth:`per_example_gradients`: ``J_{p,n} = √g_scale Σ_r g_{p,n,r} ā_{n,r}ᵀ``, so
      that :math:`\sum_{p,n}\operatorname{vec}J_{p,n}\operatorname{vec}J_{p,n}^\top` is the
      batch's (empirical, MC or type-2) Fisher block the factors approximate.

    For a weight tied in transposed layouts see the module docstring.

    Args:
        layer: The block (:class:`~curvkit.stats.plan.LayerPlan`).
        inputs: The captured input of a single use (or ``None`` with ``parts``).
        grads: Gradients w.r.t. that use's output, one per backpropagated vector.
        approx: Expand or reduce.
        g_scale: Multiplier of ``Σ g gᵀ`` in ``G`` (``N`` for the empirical Fisher of a
            batch-mean loss, ``1/Z`` for sampled vectors).
        parts: The uses (instead of ``inputs`` and ``grads``).
    """

    #: The reduced :meth:`CurvatureBlock.batch_statistics` of a distributed step
    #: (:class:`SharedLayerStats`); ``None`` for one process's own batch.
    shared: dict[str, Tensor] | None = None
    #: dtype the Gram products of :meth:`A` / :meth:`G` take their inputs in (``None``: the
    #: features' own; ``torch.bfloat16``: bf16 products, float32 accumulation and result),
    #: set by the capture engine from the method's ``stats_dtype``.
    product_dtype: torch.dtype | None = None
    #: The step's gradient of the block in matrix form ``(d_out, d_in [+1])``, set by the
    #: optimizer before ``update()``: the gradient this step preconditions, reduced over the
    #: processes in data-parallel training (identical on every rank). ``None`` outside an
    #: optimizer step (``kronecker_factors``).
    gradient: Tensor | None = None

    def __init__(
        self,
        layer: Any,
        inputs: Tensor | None = None,
        grads: list[Tensor] | None = None,
        approx: KFACApprox = KFACApprox.EXPAND,
        g_scale: float = 1.0,
        *,
        parts: list[Part] | None = None,
    ):
        if parts is None:
            if inputs is None:
                raise TypeError("LayerStats needs inputs and grads, or parts.")
            parts = [Part(layer.handler, layer.module, inputs, list(grads or []))]
        if not parts:
            raise ValueError(f"block {getattr(layer, 'name', layer)!r}: no uses to build statistics from.")
        self.layer = layer
        self.parts = parts
        self.approx = approx
        self.g_scale = float(g_scale)

    # --- what the batch is --------------------------------------------------------------

    @property
    def inputs(self) -> Tensor:
        """The (first) use's captured input; use :attr:`dtype` / :attr:`device` for those."""
        return self.parts[0].inputs

    @property
    def grads(self) -> list[Tensor]:
        """The single use's output gradients, one per backpropagated vector."""
        if len(self.parts) != 1:
            raise TiedStatisticsError(
                f"block {self.layer.name!r} was used {len(self.parts)} times in the forward pass; its raw output "
                "gradients are per use. Use output_features(p) or g_features, which combine the uses."
            )
        return self.parts[0].grads

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].inputs.dtype if self.parts[0].inputs.is_floating_point() else self._grad_dtype

    @property
    def _grad_dtype(self) -> torch.dtype:
        g = self.parts[0].grads
        return g[0].dtype if g else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        return self.parts[0].inputs.device

    @property
    def num_data(self) -> int:
        return int(self.parts[0].inputs.shape[0])

    @property
    def num_passes(self) -> int:
        return len(self.parts[0].grads)

    @cached_property
    def tied(self) -> bool:
        """Whether the uses come in transposed layouts (see the module docstring)."""
        return any(p.transposed for p in self.parts)

    @cached_property
    def diagonal_input(self) -> bool:
        """Whether :meth:`A` is returned as its 1-D diagonal (one-hot inputs: an
        ``nn.Embedding``, see :mod:`curvkit.stats.embedding`)."""
        return not self.tied and not self.layer.has_bias and _diagonal_handler(self.parts) is not None

    @cached_property
    def unitwise(self) -> bool:
        """Whether the block is unit-wise (a normalisation layer's scale and shift; see the
        module docstring)."""
        return getattr(self.layer.handler, "kind", None) == "unitwise"

    def _not_unitwise(self, what: str) -> None:
        if self.unitwise:
            raise UnitwiseStatisticsError(
                f"block {self.layer.name!r} is unit-wise ({type(self.layer.module).__name__}: an exact k×k block per "
                f"unit); {what} does not exist for it. Use unit_gradients() or unit_fisher()."
            )

    # --- unit-wise statistics -------------------------------------------------------------

    @cached_property
    def _unit_x(self) -> Tensor:
        """``(N, R, D, k_w)``: the handlers' unit features of every use (no shift column),
        computed once per batch."""
        self._require_unitwise("unit_features()")
        return _cat_features([p.handler.unit_features(p.module, p.inputs) for p in self.parts])

    def unit_features(self) -> Tensor:
        """``(N, R, D, k)``: what multiplies the output gradient per unit (``x̂`` for the
        scale, a column of ones for the shift when the block has one), every use's
        positions along ``R``."""
        x = self._unit_x
        if self.layer.has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:3], 1)], dim=3)
        return x

    def _unit_grads(self, p: int) -> Tensor:
        return _cat_features([part.output_features(part.grads[p]) for part in self.parts])

    def _unit_cols(self, p: int) -> list[Tensor]:
        """Pass ``p``'s unscaled per-datum gradients, one ``(N, D)`` tensor per column of
        the ``(D, k)`` matrix form: products and sums over the positions (the shift's column
        of ones is never formed)."""
        g = self._unit_grads(p)  # (N, R, D)
        x = self._unit_x
        if x.shape[-1] == 1:
            cols = [(g * x[..., 0]).sum(1)]
        else:
            cols = list(torch.einsum("nrd,nrdk->ndk", g, x).unbind(-1))
        if self.layer.has_bias:
            cols.append(g.sum(1))
        return cols

    def unit_gradients(self) -> Tensor:
        r"""``(P·N, D, k)``: :math:`J_{p,n,i} = \sqrt{s}\sum_r g_{p,n,r,i}\,\bar x_{n,r,i}`
        per pass ``p``, datum ``n`` and unit ``i`` (``s = g_scale``; sum over the positions of
        every use), so that :math:`\sum_{p,n} J_{p,n,i}J_{p,n,i}^\top` is unit ``i``'s block
        of the batch's (empirical, MC or type-2) Fisher."""
        j = torch.cat([torch.stack(self._unit_cols(p), dim=-1) for p in range(self.num_passes)])
        return j * math.sqrt(self.g_scale)

    def unit_fisher(self) -> Tensor:
        """``(D, k, k)``: the batch's exact per-unit Fisher ``Σ_{p,n} J Jᵀ`` (see
        :meth:`unit_gradients`), accumulated pass by pass in at least float32, entry by
        entry (``k(k+1)/2`` products of ``(N, D)`` columns)."""
        dtype = torch.promote_types(self._unit_x.dtype, torch.float32)
        total: Tensor | None = None
        for p in range(self.num_passes):
            cols = [c.to(dtype) for c in self._unit_cols(p)]
            k = len(cols)
            if total is None:
                total = cols[0].new_zeros(cols[0].shape[1], k, k)
            for a in range(k):
                for b in range(a, k):
                    entry = (cols[a] * cols[b]).sum(0)
                    total[:, a, b] += entry
                    if b != a:
                        total[:, b, a] += entry
        if total is None:
            raise ValueError(f"block {self.layer.name!r}: no output gradients were captured.")
        return total.mul_(self.g_scale)

    def _require_unitwise(self, what: str) -> None:
        if not self.unitwise:
            raise TypeError(
                f"block {self.layer.name!r} ({type(self.layer.module).__name__}) is not unit-wise; {what} exists only "
                "for normalisation layers (handlers with kind = 'unitwise')."
            )

    def _same_layout(self, what: str) -> list[Part]:
        self._not_unitwise(what)
        if self.tied:
            raise TiedStatisticsError(
                f"block {self.layer.name!r} ties its weight in transposed layouts "
                f"({', '.join(s.name for s in self.layer.sites)}); {what} does not exist for it (only A(), G() and "
                "per_example_gradients() do). A method that needs it cannot precondition this block."
            )
        return self.parts

    # --- features -----------------------------------------------------------------------

    @cached_property
    def in_features(self) -> Tensor:
        """``(N, R, d_in)`` input features **without** the bias column (every use's
        positions along ``R``; computed once per batch)."""
        return _cat_features([p.input_features() for p in self._same_layout("in_features")])

    def output_features(self, p: int) -> Tensor:
        """``(N, R, d_out)`` output features of pass ``p`` (every use's positions along ``R``;
        ``(N, R, D)`` for a unit-wise block)."""
        if self.unitwise:
            return self._unit_grads(p)
        return _cat_features([part.output_features(part.grads[p]) for part in self._same_layout("output_features")])

    @cached_property
    def g_features(self) -> Tensor:
        """``(P, N, R, d_out)`` output features."""
        if self.num_passes == 1:
            return self.output_features(0).unsqueeze(0)
        return torch.stack([self.output_features(p) for p in range(self.num_passes)])

    @cached_property
    def a_features(self) -> Tensor:
        """``(N, R, d_in [+1])`` input features, the bias column of ones appended."""
        x = self.in_features
        if self.layer.has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
        return x

    # --- factors ------------------------------------------------------------------------

    def A(self) -> Tensor:
        """The batch's input factor."""
        self._not_unitwise("A()")
        return self._factors[0]

    def G(self) -> Tensor:
        """The batch's output-gradient factor."""
        self._not_unitwise("G()")
        return self._factors[1]

    @cached_property
    def _factors(self) -> tuple[Tensor, Tensor]:
        if not self.tied:
            return self._layout_factors(self.parts, self.layer.has_bias)
        return combine_layouts(self.layout_factors())

    def layout_factors(self) -> list[tuple[bool, Tensor, Tensor]]:
        """``[(transposed, A_u, G_u)]``: the factors of the uses in the block's own layout
        (``transposed=False``) and of those in the transposed one, each in *its uses'*
        layout and scaled as an untied block's (``A`` averaged, ``G`` summed), so that
        statistics of several batches can be added up per layout before
        :func:`combine_layouts` forms the block's pair (what
        :func:`curvkit.accumulate_kronecker_factors` does for a tied block)."""
        same = [p for p in self.parts if not p.transposed]
        other = [p for p in self.parts if p.transposed]
        out: list[tuple[bool, Tensor, Tensor]] = []
        if same:
            out.append((False, *self._layout_factors(same, self.layer.has_bias)))
        if other:
            out.append((True, *self._layout_factors(other, False)))
        return out

    def _layout_factors(self, parts: list[Part], has_bias: bool) -> tuple[Tensor, Tensor]:
        a = _input_sums(parts, self.approx, has_bias, self.product_dtype)
        total: Tensor | None = None
        for p in range(len(parts[0].grads)):
            s = _output_sum(parts, p, self.approx, self.product_dtype)
            total = s if total is None else total.add_(s)
        if total is None:
            raise ValueError(f"block {self.layer.name!r}: no output gradients were captured.")
        return a, total.mul_(self.g_scale)

    def rows(self) -> tuple[Tensor, Tensor]:
        """``(a_rows (K, d_in), g_rows (P, K, d_out))``; see the class docstring (computed
        once per batch)."""
        return self._rows

    @cached_property
    def _rows(self) -> tuple[Tensor, Tensor]:
        a, g = self.a_features, self.g_features
        n, r = a.shape[0], a.shape[1]
        if self.approx is KFACApprox.EXPAND or r == 1:
            a_rows = a.reshape(n * r, -1) / math.sqrt(n * r)
            g_rows = g.reshape(g.shape[0], n * r, -1) * math.sqrt(self.g_scale)
        else:
            a_rows = a.mean(1) / math.sqrt(n)
            g_rows = g.sum(2) * math.sqrt(self.g_scale)
        return a_rows, g_rows

    def per_example_gradients(self) -> Tensor:
        """``(P·N, d_out, d_in [+1])`` scaled per-example gradients (class docstring); for a
        unit-wise block :meth:`unit_gradients`, ``(P·N, D, k)`` (its matrix form)."""
        if self.unitwise:
            return self.unit_gradients()
        if not self.tied:
            return self._layout_gradients(self.parts, self.layer.has_bias)
        same = [p for p in self.parts if not p.transposed]
        other = [p for p in self.parts if p.transposed]
        total: Tensor | None = self._layout_gradients(same, self.layer.has_bias) if same else None
        if other:
            t = self._layout_gradients(other, False).transpose(1, 2)
            total = t if total is None else total + t
        assert total is not None
        return total

    def per_example_gradient_columns(self) -> tuple[Tensor, Tensor, int]:
        r"""The per-example gradients of a block with one-hot inputs (:attr:`diagonal_input`,
        an ``nn.Embedding``) in sparse form: ``(columns (K,), values (P, K, d_out), d_in)``
        such that :math:`J_{p,n} = \sum_{k \in n} 	ext{values}[p, k]\, e_{	ext{columns}[k]}^	op`,
        one entry ``k`` per (datum, token) pair that occurs (scaled by ``√g_scale`` like
        :meth:`per_example_gradients`).

        Raises:
            TypeError: The block's inputs are not one-hot.
        """
        handler = _diagonal_handler(self.parts) if self.diagonal_input else None
        if handler is None:
            raise TypeError(
                f"block {self.layer.name!r} has no one-hot inputs; use per_example_gradients() for its per-example "
                "gradients."
            )
        ids = _cat_features([handler.token_ids(p.module, p.inputs).unsqueeze(-1) for p in self.parts]).squeeze(-1)
        passes = self.num_passes
        g = torch.stack(
            [_cat_features([q.output_features(q.grads[p]) for q in self.parts]) for p in range(passes)]
        )  # (P, N, R, d_out)
        columns, values, d_in = handler.gradient_columns(self.parts[0].module, ids, g)
        return columns, values * math.sqrt(self.g_scale), d_in

    def _layout_gradients(self, parts: list[Part], has_bias: bool) -> Tensor:
        # the true per-example gradient for both expand and reduce (as curvlinops' EKFAC):
        # J = Σ_uses Σ_r g āᵀ, one use at a time (a handler's per_example_gradients fast
        # path, e.g. an embedding's scatter, instead of features where it has one)
        passes = len(parts[0].grads)
        sizes = {int(p.inputs.shape[0]) for p in parts}
        if len(sizes) > 1:
            _cat_features([p.inputs.reshape(p.inputs.shape[0], 1, -1) for p in parts])  # raises the usual error
        j: Tensor | None = None
        for part in parts:
            g = torch.stack([part.output_features(part.grads[p]) for p in range(passes)])  # (P, N, R, d_out)
            fast = getattr(part.handler, "per_example_gradients", None)
            if fast is not None:
                term = fast(part.module, part.inputs, g)
                if has_bias:
                    term = torch.cat([term, g.sum(2).unsqueeze(-1)], dim=-1)
            else:
                a = part.input_features()
                if has_bias:
                    a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
                term = torch.einsum("pnro,nri->pnoi", g, a)
            j = term if j is None else j + term
        assert j is not None
        return (j * math.sqrt(self.g_scale)).reshape(passes * j.shape[1], *j.shape[2:])

    def featurized(self) -> LayerStats:
        """The same statistics as a single use of already extracted features (what
        data-parallel training gathers for a block with several uses)."""
        if len(self.parts) == 1:
            return self
        if self.unitwise:
            x = _cat_features([p.handler.unit_features(p.module, p.inputs) for p in self.parts])
            grads = [self._unit_grads(p) for p in range(self.num_passes)]
            part = Part(_UNIT_FEATURES, self.layer.module, x, grads)
            return LayerStats(self.layer, approx=self.approx, g_scale=self.g_scale, parts=[part])
        grads = [self.output_features(p) for p in range(self.num_passes)]
        diagonal = _diagonal_handler(self.parts)
        if diagonal is not None:  # token ids stay ids (no one-hot features)
            ids = _cat_features([p.inputs.reshape(p.inputs.shape[0], -1, 1) for p in self.parts]).squeeze(-1)
            part = Part(diagonal, self.parts[0].module, ids, grads)
            return LayerStats(self.layer, approx=self.approx, g_scale=self.g_scale, parts=[part])
        x = self.in_features
        part = Part(_FEATURES, self.layer.module, x, grads)
        return LayerStats(self.layer, approx=self.approx, g_scale=self.g_scale, parts=[part])


def _as_matrix(factor: Tensor) -> Tensor:
    """A factor as a matrix (a 1-D factor is the diagonal of one)."""
    return torch.diag(factor) if factor.ndim == 1 else factor


class _Features:
    """A handler for inputs and gradients that are features already (``(N, R, d)``)."""

    name = "features"
    module_types: tuple[type[nn.Module], ...] = ()

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        return x

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        return g


_FEATURES = _Features()


class _UnitFeatures(_Features):
    """A unit-wise handler for features extracted already (``(N, R, D, k_w)`` inputs and
    ``(N, R, D)`` gradients)."""

    kind = "unitwise"

    def unit_features(self, module: nn.Module, x: Tensor) -> Tensor:
        return x


_UNIT_FEATURES = _UnitFeatures()


# statistics a block receives without a capture of its own (re-exported here)
from curvkit.stats.received import GradientStats, SharedLayerStats  # noqa: E402
