r"""Prior precisions for Kronecker-factored curvature, and how they are added to it.

A Gaussian prior :math:`\mathcal N(\mu_0, P_0^{-1})` with a diagonal precision
:math:`P_0 = \mathrm{diag}(p_0)` is given as

* a scalar (``float`` or 0-d tensor): :math:`p_0 = \delta\,\mathbf 1`;
* one value per block ("per layer"): a 1-d tensor of length ``num_blocks``;
* a full diagonal: a 1-d tensor of length ``P`` (the number of parameters), in the order
  of the flat parameter vector (:attr:`KroneckerCurvature.param_names`, each parameter
  flattened).

:class:`PriorMode` says how it is added to a Kronecker block :math:`G\otimes A`:

* ``EXACT``: :math:`G\otimes A + \delta I` through the Kronecker eigenbasis,
  spectrum :math:`\lambda_{G,i}\lambda_{A,j} + \delta`; a non-constant diagonal within a
  block makes the block dense (allowed up to a size limit);
* ``FACTORED``: the Tikhonov approximation of Martens & Grosse (2015, §6.3),
  :math:`(G + \pi\sqrt\delta I)\otimes(A + \tfrac{\sqrt\delta}{\pi} I)` with
  :math:`\pi = \sqrt{(\mathrm{tr}\,G/d_G)/(\mathrm{tr}\,A/d_A)}` (or ``π = 1`` when asked),
  which keeps the block Kronecker-factored. Needs a scalar or per-block prior.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from curvkit.laplace.blocks import OperatorBlock
from curvkit.laplace.checks import check_prior_precision
from curvkit.linalg.kronecker import KroneckerOperator

__all__ = ["PriorMode", "block_priors"]


class PriorMode(str, Enum):
    """How a prior precision is added to a Kronecker block (see the module docstring)."""

    EXACT = "exact"
    FACTORED = "factored"


def block_priors(
    prior_precision: float | Tensor,
    blocks: list[OperatorBlock],
    dtype: torch.dtype,
    device: torch.device,
    indices: list[Tensor] | None = None,
) -> list[Tensor]:
    """Split a prior precision into one tensor per block.

    Returns:
        For each block a 0-d tensor (constant over the block) or a ``(d_out, k)`` matrix
        (diagonal entries laid out like the block matrix ``V``).

    Raises:
        TypeError: ``prior_precision`` is neither a number nor a tensor.
        ValueError: Its shape fits none of scalar / per block / diagonal, or an entry is negative
            or non-finite (see :func:`curvkit.laplace.checks.check_prior_precision`).
    """
    num_params = sum(b.numel for b in blocks)
    check_prior_precision(prior_precision)
    prior = torch.as_tensor(prior_precision, dtype=dtype, device=device)
    if prior.ndim == 1 and prior.shape[0] not in (1, len(blocks), num_params):
        raise ValueError(
            f"prior_precision of shape {tuple(prior.shape)} fits neither a scalar, nor one value per block "
            f"({len(blocks)}: {[b.name for b in blocks]}), nor one per parameter ({num_params}); pass a tensor of "
            "one of these lengths."
        )
    if not bool(torch.isfinite(prior).all()):
        raise ValueError(
            f"prior_precision overflows {dtype} (largest entry {float(prior.max()):.3g}); "
            "pass a smaller value."
        )
    if prior.ndim == 0 or prior.shape[0] == 1:
        return [prior.reshape(()) for _ in blocks]
    if prior.shape[0] == len(blocks):
        return [prior[i] for i in range(len(blocks))]
    out: list[Tensor] = []
    offset = 0
    for block in blocks:
        if indices is not None:  # the flat vector's entries of the block matrix (a curvature's layout)
            part = prior[indices[len(out)].to(prior.device)]
        else:
            part = block.to_matrix(prior[offset : offset + block.numel].unsqueeze(1))[0]
        offset += block.numel
        first = part.reshape(-1)[0]
        out.append(first if bool((part == first).all()) else part)
    return out


def factored_shifts(op: KroneckerOperator, delta: Tensor, pi_correction: bool) -> tuple[Tensor, Tensor]:
    """Shifts ``(π√δ, √δ/π)`` for the eigenvalues of ``G`` and ``A`` under ``FACTORED``."""
    root = delta.sqrt()
    if not pi_correction:
        return root, root
    d_out, k = op.matrix_shape
    mean_g = float(torch.diagonal(op.G).sum()) / d_out
    mean_a = float(op.A_diagonal().sum()) / k
    pi = math.sqrt(mean_g / mean_a) if mean_g > 0 and mean_a > 0 else 1.0
    return root * pi, root / pi
