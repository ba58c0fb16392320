"""Cases where K-FAC is exact, and Monte-Carlo convergence to the type-2 factors."""

from __future__ import annotations

import pytest
import torch
from _reference import assert_matrix_close, joint_weight_jacobian, relative_error
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvkit


def _linears(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _per_block_jacobians(model, x):
    """``{layer: (C, d_out·(d_in[+1]))}``: Jacobian of the output w.r.t. each layer's
    joint weight in curvkit's layout, for one datum ``x`` of shape ``(1, d_in)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return functional_call(model, p, (x,)).squeeze(0)

    jac = jacrev(f)(params)
    out = {}
    for name, module in _linears(model):
        jw = jac[f"{name}.weight"]
        jb = jac.get(f"{name}.bias") if module.bias is not None else None
        out[name] = joint_weight_jacobian(jw, jb)
    return out


def deep_linear(bias: bool):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Linear(4, 5, bias=bias), nn.Linear(5, 2, bias=bias)).double()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_type2_expand_equals_exact_ggn_blocks_deep_linear(bias, reduction, core_registry):
    """One datum, MSE: G⊗A equals the diagonal blocks of the exact GGN Jᵀ H J."""
    model = deep_linear(bias)
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.randn(1, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    with torch.no_grad():
        f = model(x)
    H = hessian(lambda out: loss_fn(out, y))(f).reshape(2, 2)
    jacs = _per_block_jacobians(model, x)
    ours = curvkit.kronecker_factors(model, loss_fn, x, y, fisher="type-2", registry=core_registry)
    assert set(ours) == set(jacs)
    for name, J in jacs.items():
        A, G = ours[name]
        ggn_block = J.t() @ H @ J
        assert_matrix_close(torch.kron(G, A), ggn_block, rtol=1e-10, msg=name)


def test_type2_full_ggn_off_diagonal_blocks_are_not_zero(core_registry):
    """Guard that the exactness test is about the diagonal blocks only: the exact GGN has
    non-zero cross-layer blocks, which K-FAC drops."""
    model = deep_linear(True)
    x = torch.randn(1, 3, dtype=torch.float64)
    jacs = _per_block_jacobians(model, x)
    assert (jacs["0"].t() @ jacs["1"]).abs().max() > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_equals_gradient_outer_product_one_datum(reduction, core_registry):
    """One datum, CE, nonlinear MLP: G⊗A equals g gᵀ of the per-block loss gradient."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.ReLU(), nn.Linear(3, 4)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2])
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    by_name = dict(zip([n for n, _ in model.named_parameters()], grads, strict=True))
    ours = curvkit.kronecker_factors(model, loss_fn, x, y, fisher="empirical", registry=core_registry)
    assert set(ours) == {"0", "2", "4"}
    for name, module in _linears(model):
        gb = by_name.get(f"{name}.bias") if module.bias is not None else None
        g = joint_weight_jacobian(by_name[f"{name}.weight"].unsqueeze(0), None if gb is None else gb.unsqueeze(0))[0]
        A, G = ours[name]
        assert_matrix_close(torch.kron(G, A), torch.outer(g, g), rtol=1e-10, msg=name)


def test_type2_equals_exact_ggn_blocks_mlp_cross_entropy(core_registry):
    """One datum, CE, nonlinear MLP: type-2 G⊗A equals the exact GGN block Jᵀ H J."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1])
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        f = model(x)
    H = hessian(lambda out: loss_fn(out, y))(f).reshape(3, 3)
    jacs = _per_block_jacobians(model, x)
    ours = curvkit.kronecker_factors(model, loss_fn, x, y, fisher="type-2", registry=core_registry)
    for name, J in jacs.items():
        A, G = ours[name]
        assert_matrix_close(torch.kron(G, A), J.t() @ H @ J, rtol=1e-10, msg=name)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_mc_converges_to_type2(loss, core_registry):
    """Relative error of the MC factor G against type-2 falls roughly like 1/sqrt(M)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        out = model(X)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.tensor([0, 1, 2, 1])
    elif loss == "mse":
        loss_fn, y = nn.MSELoss(), torch.randn_like(out)
    else:
        loss_fn, y = nn.BCEWithLogitsLoss(), torch.rand_like(out).round()
    exact = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2", registry=core_registry)
    errors = []
    for m in [1, 10, 100, 1000]:
        gen = torch.Generator().manual_seed(0)
        mc = curvkit.kronecker_factors(
            model, loss_fn, X, y, fisher="mc", mc_samples=m, generator=gen, registry=core_registry
        )
        for name in exact:
            torch.testing.assert_close(mc[name].A, exact[name].A)  # A does not depend on the samples
        errors.append(max(relative_error(mc[name].G, exact[name].G) for name in exact))
    # With M samples the error is O(1/sqrt(M)): ~3% at M=1000 for these sizes.
    assert errors[-1] < 0.08, errors
    assert errors[-1] < errors[1] < errors[0], errors
    assert errors[-1] < errors[0] / 5, errors
