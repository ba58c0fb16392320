r"""Factor arithmetic shared by every backend.

Given the ``(N, R, d)`` features of a layer (``R`` the weight-sharing axis):

* expand: :math:`A = \frac{1}{NR}\sum_{n,r}\bar a_{n,r}\bar a_{n,r}^\top`,
  :math:`G = \frac{1}{Z}\sum_{m,n,r} g_{m,n,r}g_{m,n,r}^\top`;
* reduce: :math:`\hat a_n = \frac1R\sum_r \bar a_{n,r}`, :math:`\hat g_{m,n} = \sum_r g_{m,n,r}`,
  :math:`A = \frac1N\sum_n \hat a_n\hat a_n^\top`, :math:`G = \frac1Z\sum_{m,n}\hat g_{m,n}\hat g_{m,n}^\top`;

where ``ā = [a; 1]`` when the layer has a bias and ``Z`` is the loss normaliser of
:mod:`curvkit.stats.losses`.
"""

from __future__ import annotations

from torch import Tensor

from curvkit.config import KFACApprox

__all__ = ["gram", "input_factor", "output_factor"]


def gram(rows: Tensor, append_one: bool = False) -> Tensor:
    """``XᵀX`` of ``rows`` ``(n, d)``; with ``append_one`` the Gram matrix of ``[X 1]``,
    assembled blockwise so no ``(n, d + 1)`` copy of the rows is made."""
    xtx = rows.t() @ rows
    if not append_one:
        return xtx
    d = rows.shape[1]
    out = rows.new_empty(d + 1, d + 1)
    out[:d, :d] = xtx
    col = rows.sum(0)
    out[:d, d] = col
    out[d, :d] = col
    out[d, d] = rows.shape[0]
    return out


def input_factor(features: Tensor, approx: KFACApprox, append_one: bool) -> Tensor:
    """``A`` of one batch from ``(N, R, d_in)`` input features, normalised per datum."""
    n, r, d = features.shape
    if approx is KFACApprox.EXPAND or r == 1:
        return gram(features.reshape(n * r, d), append_one).div_(n * r)
    return gram(features.mean(1), append_one).div_(n)


def output_factor(features: Tensor, approx: KFACApprox, normaliser: float) -> Tensor:
    """``G`` from ``(M·N, R, d_out)`` backpropagated output gradients."""
    b, r, d = features.shape
    rows = features.reshape(b * r, d) if approx is KFACApprox.EXPAND or r == 1 else features.sum(1)
    return gram(rows).div_(normaliser)
