"""Reference implementations the tests compare curvkit against.

* :func:`curvlinops_factors`: the Kronecker factors of curvlinops' ``KFACLinearOperator``.
* :func:`reference_patches`: convolution patches by explicit loops over output positions
  and index arithmetic (any number of spatial dims, padding modes, ``padding="same"``).
* :func:`reference_output_vectors`: per-position gradients of the loss terms w.r.t. a
  layer's output, from ``torch.func`` Jacobians and loss Hessians (eigen-square-root).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn
from torch.testing import assert_close


def curvlinops_factors(model, loss_fn, data, *, fisher, approx="expand", mc_samples=1, seed=0):
    """``({name: (A, G)}, operator)`` from curvlinops with the bias folded into ``A``."""
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(
        model,
        loss_fn,
        params,
        data,
        fisher_type=fisher,
        kfac_approx=approx,
        mc_samples=mc_samples,
        seed=seed,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    factors = {name: (op._input_covariances[name], op._gradient_covariances[name]) for name in op._mapping}
    return factors, op


def assert_matrix_close(actual: Tensor, expected: Tensor, rtol: float = 1e-6, msg: str = "") -> None:
    """``assert_close`` with an absolute tolerance scaled to the norm of ``expected``."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{msg}\n{m}")


def assert_factors_close(ours: dict, ref: dict, rtol: float = 1e-6) -> None:
    assert set(ours) == set(ref), f"module names differ: {sorted(ours)} vs {sorted(ref)}"
    for name in ref:
        a_ref, g_ref = ref[name]
        a, g = ours[name]
        assert_matrix_close(a, a_ref, rtol, msg=f"A of {name!r}")
        assert_matrix_close(g, g_ref, rtol, msg=f"G of {name!r}")


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


# --- parameter layouts ----------------------------------------------------------------


def curvkit_to_flat_index(d_out: int, d_in: int, bias: bool) -> list[int]:
    """For each entry of curvkit's ``vec_row([W b])``, its index in ``[W.flatten(), b]``."""
    idx = []
    for i in range(d_out):
        for j in range(d_in):
            idx.append(i * d_in + j)
        if bias:
            idx.append(d_out * d_in + i)
    return idx


def joint_weight_jacobian(jac_w: Tensor, jac_b: Tensor | None) -> Tensor:
    """Jacobians ``(M, d_out, *w)`` and ``(M, d_out)`` to ``(M, d_out·(d_in[+1]))`` in
    curvkit's layout (row-major weight with the bias as last column)."""
    m, d_out = jac_w.shape[:2]
    w = jac_w.reshape(m, d_out, -1)
    if jac_b is not None:
        w = torch.cat([w, jac_b.reshape(m, d_out, 1)], dim=2)
    return w.reshape(m, -1)


# --- convolution references -----------------------------------------------------------


def _conv_pads(conv: nn.Module, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
    k, dil = conv.kernel_size, conv.dilation
    if conv.padding == "same":
        total = [dil[i] * (k[i] - 1) for i in range(len(k))]
        lo = [t // 2 for t in total]
        return lo, [t - lo_ for t, lo_ in zip(total, lo, strict=True)]
    if conv.padding == "valid":
        return [0] * len(k), [0] * len(k)
    return list(conv.padding), list(conv.padding)


def _source_index(p: int, size: int, mode: str) -> int | None:
    """Index into the unpadded axis of length ``size`` for padded coordinate ``p``
    (already shifted by the low pad), or ``None`` for a zero."""
    if 0 <= p < size:
        return p
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -p if p < 0 else 2 * (size - 1) - p
    if mode == "circular":
        return p % size
    if mode == "replicate":
        return min(max(p, 0), size - 1)
    raise ValueError(mode)


def reference_patches(conv: nn.Module, x: Tensor) -> Tensor:
    """Patches ``(N, T, C_in·prod(k))`` by explicit loops, features ordered like
    ``weight.flatten(1)``; ``T`` runs over output positions row-major."""
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    k, stride, dil = conv.kernel_size, conv.stride, conv.dilation
    lo, hi = _conv_pads(conv, spatial)
    outs = [(spatial[i] + lo[i] + hi[i] - dil[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(len(k))]
    zero = x.new_zeros(n, c)
    rows = []
    for o in itertools.product(*(range(s) for s in outs)):
        cols = []
        for kk in itertools.product(*(range(s) for s in k)):
            src = [
                _source_index(o[i] * stride[i] + kk[i] * dil[i] - lo[i], spatial[i], conv.padding_mode)
                for i in range(len(k))
            ]
            cols.append(zero if any(s is None for s in src) else x[(slice(None), slice(None), *src)])
        rows.append(torch.stack(cols, dim=2).reshape(n, c * math.prod(k)))  # (N, C, K) -> channel first
    return torch.stack(rows, dim=1)


def conv_via_patches(conv: nn.Module, x: Tensor) -> Tensor:
    """The convolution computed from :func:`reference_patches` (to validate them)."""
    patches = reference_patches(conv, x)
    out = patches @ conv.weight.flatten(1).t()
    if conv.bias is not None:
        out = out + conv.bias
    return out  # (N, T, C_out)


def reference_output_vectors(head: nn.Module, tail: nn.Module, loss_fn, x: Tensor, y: Tensor, fisher: str):
    """Backpropagated vectors at the output of ``head`` for each datum.

    For datum ``n`` with loss term ``ℓ_n(f) = loss_fn(f[None], y[n:n+1])`` the vectors
    are ``J_nᵀ s`` with ``J_n`` the Jacobian of ``tail`` at the layer output and ``s``
    the columns of a symmetric square root of ``∇²ℓ_n`` (type-2) or ``∇ℓ_n`` (empirical).

    Returns:
        ``(N, M, *layer_output.shape[1:])``, the layer output and the normaliser ``Z``.
    """
    from torch.func import grad, hessian, jacrev

    s = head(x).detach()
    per_datum = []
    for i in range(x.shape[0]):

        def tail_i(s_i):
            return tail(s_i.unsqueeze(0)).squeeze(0)

        def ell(f, i=i):
            return loss_fn(f.unsqueeze(0), y[i : i + 1])

        f_i = tail_i(s[i]).detach()
        jac = jacrev(tail_i)(s[i])  # (*f.shape, *s_i.shape)
        if fisher == "type-2":
            h = hessian(ell)(f_i).reshape(f_i.numel(), f_i.numel())
            evals, evecs = torch.linalg.eigh(h)
            roots = evecs * evals.clamp(min=0).sqrt()  # h = roots @ roots.T
            vecs = roots.t()  # (M, F)
        elif fisher == "empirical":
            vecs = grad(ell)(f_i).reshape(1, -1)
        else:  # pragma: no cover - test bug
            raise ValueError(fisher)
        per_datum.append(torch.einsum("mf,f...->m...", vecs, jac.reshape(f_i.numel(), *s.shape[1:])))
    z = float(x.shape[0]) if loss_fn.reduction == "mean" else 1.0
    return torch.stack(per_datum), s, z


def factor_from_rows(rows: Tensor, approx: str, bias: bool) -> Tensor:
    """``A`` from ``(N, T, d)`` input rows."""
    if bias:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
    if approx == "expand":
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.t() @ flat / flat.shape[0]
    mean = rows.mean(1)
    return mean.t() @ mean / mean.shape[0]


def g_factor_from_vectors(vecs: Tensor, approx: str, z: float) -> Tensor:
    """``G`` from ``(N, M, T, d_out)`` backpropagated vectors."""
    if approx == "expand":
        flat = vecs.reshape(-1, vecs.shape[-1])
    else:
        flat = vecs.sum(2).reshape(-1, vecs.shape[-1])
    return flat.t() @ flat / z
