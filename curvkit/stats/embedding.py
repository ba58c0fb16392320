r"""``nn.Embedding`` as a Kronecker layer with a diagonal input factor.

An embedding looks up row ``id`` of its weight :math:`W \in \mathbb{R}^{V\times D}`
(``num_embeddings`` × ``embedding_dim``). As a function of the weight this is the linear
map

.. math:: s_{n,r} = W^\top \operatorname{onehot}(\mathrm{id}_{n,r}),

so the block matrix is :math:`W^\top` (``d_out = D``, ``d_in = V``; the handler's
``weight_matrix`` transposes, ``weight_from_matrix`` transposes back), the input features
are one-hot vectors and every position ``r`` of a sequence is a position of the
weight-sharing axis. Its factors:

* ``A`` is **diagonal**: under *expand* :math:`A = \frac{1}{NR}\operatorname{diag}(c)`
  with :math:`c_v` the number of positions holding token ``v`` (token frequencies),
  exactly; under *reduce*, :math:`\hat a_n = c_n / R` (the datum's token histogram) and
  the exact reduce factor :math:`\frac1N\sum_n \hat a_n\hat a_n^\top` has off-diagonal
  entries (tokens that co-occur in a datum); curvkit keeps its **diagonal**
  :math:`\frac{1}{NR^2}\sum_n c_{n,v}^2` (exact when every datum has one position).
  ``A`` is never formed as a dense ``V × V`` matrix: it is computed from the token ids by
  counting (:func:`diagonal_input_factor`) and returned as its 1-D diagonal
  (``KroneckerFactors.A.ndim == 1``); a block stores it in the ``diagonal`` structure.
* ``G`` is that of any layer: :math:`s\sum g g^\top` over the output gradients of every
  position (summed over positions first under reduce).

``padding_idx``: PyTorch gives the padding row no gradient. A position holding the padding
token therefore has the **zero vector** as its input feature: it adds nothing to ``A`` nor
to the per-example gradients (which are exact), while it still counts in ``A``'s
normaliser ``N·R`` and its output gradient stays in ``G``, as for any position of a layer
whose input is zero there. Under the usual K-FAC independence assumption this keeps
``G ⊗ A`` unbiased for the positions that do use the weight. The padding column of a
preconditioned direction is the gradient's own (zero) column: see
:meth:`EmbeddingHandler.first_order_columns`.

Refused (the layer then follows the unsupported policy; the message says why):
``sparse=True`` (sparse gradients), ``max_norm`` (rows renormalised in place by the forward
pass, so the weight the statistics describe is not the weight the step updates) and
``scale_grad_by_freq=True`` (the gradient is rescaled by in-batch frequencies, so it is not
a sum of per-example terms).

Methods that work on the factors alone (K-FAC, EKFAC: :attr:`MethodSpec.diagonal_inputs`)
serve an embedding of any vocabulary. Methods that need per-row features (SINGD, the
low-rank family, TKFAC, SKFAC, KLD-WRM) get explicit one-hot rows, which is only sensible
for small vocabularies: they serve embeddings with at most :data:`ONE_HOT_LIMIT` rows, and
a larger embedding takes the documented first-order step (said in ``summary()``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.config import KFACApprox
from curvkit.errors import UnsupportedModuleError

__all__ = ["ONE_HOT_LIMIT", "EmbeddingHandler", "diagonal_input_factor", "token_ids"]

#: Largest vocabulary (``num_embeddings``) for which methods that need per-row input
#: features (SINGD, low-rank, TKFAC, SKFAC, KLD-WRM) precondition an embedding, with
#: explicit one-hot rows and ``V × V`` (structured) factors. K-FAC and EKFAC are not limited.
ONE_HOT_LIMIT = 2048


def _weight(module: nn.Module) -> Tensor:
    return module.weight  # type: ignore[return-value]


def token_ids(module: nn.Module, x: Tensor) -> Tensor:
    """The ids of an embedding's input as ``(N, R)`` (``long``), with ``-1`` where the
    id is ``padding_idx`` (positions that give the weight no gradient)."""
    if x.is_floating_point() or x.is_complex():
        raise UnsupportedModuleError(
            f"Embedding input has dtype {x.dtype}; an embedding takes integer token ids of shape (N, ...)."
        )
    if x.ndim < 1:
        raise UnsupportedModuleError(
            f"Embedding input of shape {tuple(x.shape)} has no batch dimension; pass token ids of shape (N, ...)."
        )
    ids = x.reshape(x.shape[0], -1).long()
    pad = getattr(module, "padding_idx", None)
    if pad is not None:
        ids = ids.masked_fill(ids == pad, -1)
    return ids


class EmbeddingHandler:
    """``nn.Embedding`` as the linear map ``s = Wᵀ onehot(id)`` (see the module docstring).

    Attributes:
        diagonal_input: The input features are one-hot, so ``A`` is diagonal; the
            statistics return it as a 1-D tensor (:func:`diagonal_input_factor`).
    """

    name = "embedding"
    module_types: tuple[type[nn.Module], ...] = (nn.Embedding,)
    diagonal_input = True

    def check(self, module: nn.Module) -> None:
        emb: nn.Embedding = module  # type: ignore[assignment]
        if emb.sparse:
            raise UnsupportedModuleError(
                "nn.Embedding(sparse=True) produces sparse gradients, which curvkit's preconditioners and the "
                "first-order rule do not take. Build it with sparse=False, or leave it out with unsupported='skip'."
            )
        if emb.max_norm is not None:
            raise UnsupportedModuleError(
                f"nn.Embedding(max_norm={emb.max_norm}) renormalises the rows it looks up in place during the forward "
                "pass, so the weight its statistics describe is not the weight the optimizer then updates. Use "
                "max_norm=None (clip rows after the step if you need the bound), or leave it out with "
                "unsupported='skip'."
            )
        if emb.scale_grad_by_freq:
            raise UnsupportedModuleError(
                "nn.Embedding(scale_grad_by_freq=True) divides each row's gradient by the token's frequency in the "
                "mini-batch, so its gradient is not a sum of per-example terms and no Fisher block describes it. Use "
                "scale_grad_by_freq=False, or leave it out with unsupported='skip'."
            )

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight  # type: ignore[return-value]

    def bias(self, module: nn.Module) -> Tensor | None:
        return None

    def weight_matrix(self, module: nn.Module, tensor: Tensor) -> Tensor:
        """``(V, D)`` weight-shaped tensor → the ``(D, V)`` block matrix."""
        return tensor.t()

    def weight_from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.t()

    def first_order_columns(self, module: nn.Module) -> list[int]:
        """Columns of the block matrix that take the first-order step instead of the
        preconditioned one: the padding row, which PyTorch never gives a gradient (with
        K-FAC's diagonal ``A`` its preconditioned column is zero anyway; a method with a
        structured ``A`` could otherwise move it)."""
        pad = getattr(module, "padding_idx", None)
        return [] if pad is None else [int(pad)]

    def token_ids(self, module: nn.Module, x: Tensor) -> Tensor:
        """``(N, R)`` ids, ``-1`` at padding positions (:func:`token_ids`)."""
        return token_ids(module, x)

    def gradient_columns(self, module: nn.Module, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
        """Sparse per-example gradients from ``(N, R)`` ids (:meth:`token_ids`) and output
        gradients ``g`` ``(P, N, R, D)``: ``(columns (K,), values (P, K, D), V)``, one entry
        per (datum, token) pair that occurs, ``values`` summing the gradients of the datum's
        positions holding that token."""
        num = int(_weight(module).shape[0])
        columns, values = _gradient_columns(num, ids, g)
        return columns, values, num

    # --- features ------------------------------------------------------------------------

    def input_features(self, module: nn.Module, x: Tensor) -> Tensor:
        """One-hot rows ``(N, R, V)`` in the weight's dtype, zero at padding positions.
        Dense: meant for small vocabularies (:data:`ONE_HOT_LIMIT`) and tests; the factors
        and per-example gradients never use it."""
        ids = token_ids(module, x)
        weight = _weight(module)
        num = int(weight.shape[0])
        out = F.one_hot(ids.clamp_min(0), num).to(weight.dtype)
        return out * (ids >= 0).unsqueeze(-1).to(weight.dtype)

    def output_features(self, module: nn.Module, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def input_factor(self, parts: list[Any], approx: KFACApprox) -> Tensor:
        """``A`` of same-layout uses as its diagonal (see :func:`diagonal_input_factor`)."""
        return diagonal_input_factor(parts, approx)

    def per_example_gradients(self, module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
        r"""``(P, N, D, V)``: :math:`J_{p,n} = \sum_r g_{p,n,r}\operatorname{onehot}(\mathrm{id}_{n,r})^\top`
        by scattering the output gradients ``g`` ``(P, N, R, D)`` into the columns of their
        tokens (no one-hot features)."""
        ids = token_ids(module, x)
        p, n, r, d = g.shape
        num = int(_weight(module).shape[0])
        out = g.new_zeros(p, n * num, d)
        valid = ids >= 0
        rows = torch.arange(n, device=ids.device).unsqueeze(1).expand(n, r)
        index = (rows * num + ids)[valid]
        out.index_add_(1, index, g[:, valid])
        return out.view(p, n, num, d).transpose(2, 3)


def _gradient_columns(num: int, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    p, n, r, d = g.shape
    valid = ids >= 0
    rows = torch.arange(n, device=ids.device).unsqueeze(1).expand(n, r)
    keys, inverse = torch.unique((rows * num + ids)[valid], return_inverse=True)
    values = g.new_zeros(p, keys.shape[0], d)
    values.index_add_(1, inverse, g[:, valid])
    return keys % num, values


def diagonal_input_factor(parts: list[Any], approx: KFACApprox) -> Tensor:
    r"""The diagonal of an embedding block's ``A`` from its uses' token ids, ``(V,)``.

    With the uses' ids concatenated along the position axis (``R`` positions in all, ``N``
    data) and :math:`c_{n,v}` the number of positions of datum ``n`` that hold token ``v``
    (padding positions hold none):

    * expand: :math:`A_{vv} = \frac{1}{NR}\sum_n c_{n,v}` (exactly ``A``);
    * reduce: :math:`A_{vv} = \frac{1}{NR^2}\sum_n c_{n,v}^2` (the diagonal of reduce's ``A``).

    Computed by counting (``bincount``/``unique``) in float64, returned in the weight's dtype.
    """
    first = parts[0]
    weight = _weight(first.module)
    num = int(weight.shape[0])
    ids_list = [token_ids(p.module, p.inputs) for p in parts]
    sizes = {int(i.shape[0]) for i in ids_list}
    if len(sizes) > 1:
        raise ValueError(
            f"the uses of one embedding in one forward pass have different batch sizes {sorted(sizes)}; curvkit pairs "
            "the uses of a weight datum by datum. Call the module on batches of one size within a forward pass."
        )
    ids = ids_list[0] if len(ids_list) == 1 else torch.cat(ids_list, dim=1)
    n, r = ids.shape
    valid = ids >= 0
    if approx is KFACApprox.EXPAND or r == 1:
        counts = torch.bincount(ids[valid], minlength=num).to(torch.float64)
        out = counts / max(n * r, 1)
    else:
        rows = torch.arange(n, device=ids.device).unsqueeze(1).expand(n, r)
        keys, counts = torch.unique((rows * num + ids)[valid], return_counts=True)
        out = torch.zeros(num, dtype=torch.float64, device=ids.device)
        out.index_add_(0, keys % num, counts.to(torch.float64).square())
        out = out / (max(n, 1) * r * r)
    return out.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
