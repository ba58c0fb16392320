r"""Brand's online update of a truncated symmetric eigendecomposition (Puiu 2022b, "Brand New
K-FACs", arXiv:2210.08494; ``Brand_S_update`` in
github:ConstantinPuiu/Distributed_Brand_and_Randomized_KFACs).

Given :math:`X \approx U\,\mathrm{diag}(D)\,U^\top` (``U``: ``d×r`` orthonormal) and a batch
``Y`` (``d×n``), the EMA step :math:`\rho X + (1-\rho) Y Y^\top` is, with
:math:`Z = \sqrt{1-\rho}\,Y`, :math:`P = U^\top Z`, and the thin QR
:math:`Z - UP = QR`,

.. math:: \rho U D U^\top + Z Z^\top = [U\ Q]\begin{bmatrix}\rho D + PP^\top & PR^\top\\
   RP^\top & RR^\top\end{bmatrix}[U\ Q]^\top ,

so an ``(r+n)×(r+n)`` ``eigh`` gives the new eigenpairs exactly (before truncation), in
:math:`O(d(r+n)^2 + (r+n)^3)` — linear in ``d``; the ``d×d`` factor is never formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit_lowrank.lowrank import LowRankFactor

__all__ = ["brand_update", "brand_update_with_retry"]


def brand_update(low: LowRankFactor, Y: Tensor, decay: float, rank: int | None = None) -> LowRankFactor:
    r"""The eigendecomposition of :math:`\rho\,U D U^\top + (1-\rho)\,Y Y^\top` (``decay`` = ρ),
    largest eigenvalues first, truncated to ``rank`` pairs (``None``: keep all ``r + n``).
    Negative rounding noise in the eigenvalues is clamped at 0."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay!r} must lie in [0, 1]")
    if Y.shape[0] != low.dim:
        raise ValueError(f"the batch has {Y.shape[0]} rows but the factor has dimension {low.dim}")
    U, D = low.U, low.d.to(low.U.dtype)
    Z = Y.to(U.dtype) * (1.0 - decay) ** 0.5
    P = U.t() @ Z
    Q, R = torch.linalg.qr(Z - U @ P)
    top = torch.cat([torch.diag(decay * D) + P @ P.t(), P @ R.t()], dim=1)
    bottom = torch.cat([R @ P.t(), R @ R.t()], dim=1)
    M = torch.cat([top, bottom], dim=0)
    S, W = torch.linalg.eigh((M + M.t()) / 2)
    S, W = S.flip(0), W.flip(1)
    if rank is not None:
        S, W = S[:rank], W[:, :rank]
    return LowRankFactor((torch.cat([U, Q], dim=1) @ W).contiguous(), S.clamp_min(0))


def brand_update_with_retry(
    low: LowRankFactor, Y: Tensor, decay: float, rank: int | None = None
) -> LowRankFactor | None:
    """:func:`brand_update` in the factor's dtype, retried in float64 when its QR or
    ``eigh`` fails or its result is not finite; the result in the factor's dtype, or
    ``None`` when both fail (the caller keeps the old factor)."""
    dtype = low.U.dtype
    for attempt in (dtype, torch.float64) if dtype != torch.float64 else (torch.float64,):
        try:
            new = brand_update(LowRankFactor(low.U.to(attempt), low.d.to(attempt)), Y.to(attempt), decay, rank)
        except RuntimeError:  # torch.linalg.LinAlgError
            continue
        if bool(torch.isfinite(new.U).all()) and bool(torch.isfinite(new.d).all()):
            return LowRankFactor(new.U.to(dtype), new.d.to(dtype))
    return None
