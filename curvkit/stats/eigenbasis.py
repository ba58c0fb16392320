r"""Second moments of per-example gradients in a Kronecker eigenbasis (EKFAC's correction).

EKFAC (George et al., 2018) keeps K-FAC's eigenbasis :math:`Q_G\otimes Q_A` and replaces the
spectrum :math:`\lambda_G\lambda_A^\top` by the best diagonal in that basis, the second moments
of the per-example gradients :math:`J` rotated into it, :math:`\sum (Q_G^\top J Q_A)^{\circ 2}`.
:func:`rotated_second_moments` computes them from a batch's :class:`~curvkit.stats.LayerStats`
without forming a per-example gradient where it can. The EKFAC and TEKFAC optimizer blocks
(``curvkit_kfac``) and the Laplace tools' eigenvalue correction
(:meth:`curvkit.laplace.KroneckerCurvature.from_data` with ``correct_eigenvalues=True``) both
use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.stats.layer_stats import LayerStats

__all__ = ["rotated_second_moments"]

#: Elements of one chunk of rotated per-example gradients (bounds the memory of weight-sharing layers).
_CHUNK_ELEMENTS = 1 << 24


def rotated_second_moments(stats: LayerStats, Q_A: Tensor, Q_G: Tensor, dtype: torch.dtype) -> Tensor:
    r""":math:`\sum_{p,n}(Q_G^\top J_{p,n}Q_A)^{\circ 2}` for the batch's scaled per-example
    gradients :math:`J_{p,n}` (:meth:`LayerStats.per_example_gradients`), shape
    ``(d_out, d_in)``. Empty ``Q`` tensors mean the identity.

    Without weight sharing :math:`J_{p,n} = \sqrt{s}\,g_{p,n}\bar a_n^\top` is rank one and
    the sum is one product of squares, :math:`s\sum_n (\sum_p (Q_G^\top g_{p,n})^{\circ2})
    ((Q_A^\top\bar a_n)^{\circ 2})^\top`; otherwise the rotated per-example gradients
    :math:`\sum_r (Q_G^\top g_{p,n,r})(Q_A^\top\bar a_{n,r})^\top` are formed in chunks of
    examples. A weight tied in transposed layouts has no features, only its (exact)
    per-example gradients, which are rotated directly. An embedding (one-hot inputs, ``A``
    diagonal so ``Q_A = I``) uses its sparse per-example gradients
    (:meth:`LayerStats.per_example_gradient_columns`): no one-hot features, no dense
    ``(d_out, V)`` matrix per example.
    """
    if getattr(stats, "diagonal_input", False) and not Q_A.numel():
        # one-hot inputs (an embedding) and Q_A = I: each per-example gradient is a few
        # columns, J[:, v] = √s Σ_{r: id_r = v} g_r — scattered, never a dense (d_out, V) per datum
        cols, values, d_in = stats.per_example_gradient_columns()  # (K,), (P, K, d_out), scaled by √s
        values = values.to(dtype)
        if Q_G.numel():
            values = values @ Q_G.to(dtype)
        out = values.new_zeros(d_in, values.shape[-1])
        out.index_add_(0, cols, values.square().sum(0))
        return out.t().contiguous()
    if stats.tied:
        j = stats.per_example_gradients().to(dtype)  # (P·N, d_out, d_in), scaled by √s
        if Q_G.numel():
            j = Q_G.to(dtype).t() @ j
        if Q_A.numel():
            j = j @ Q_A.to(dtype)
        return j.square().sum(0)
    a = stats.a_features.to(dtype)  # (N, R, d_in)
    g = stats.g_features.to(dtype)  # (P, N, R, d_out)
    if Q_A.numel():
        a = a @ Q_A.to(dtype)
    if Q_G.numel():
        g = g @ Q_G.to(dtype)
    n, r = a.shape[0], a.shape[1]
    if r == 1:
        out = g[:, :, 0].square().sum(0).t() @ a[:, 0].square()
    else:
        p, d_out, d_in = g.shape[0], g.shape[3], a.shape[2]
        step = max(1, _CHUNK_ELEMENTS // max(1, p * d_out * d_in))
        out = a.new_zeros(d_out, d_in)
        for start in range(0, n, step):
            j = torch.einsum("pnro,nri->pnoi", g[:, start : start + step], a[start : start + step])
            out += j.square().sum((0, 1))
    return out.mul_(stats.g_scale)
