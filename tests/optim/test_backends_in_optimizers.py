"""The registered statistics backends feed the optimizers and Laplace, not only
``kronecker_factors``: BackPACK and ASDL give the same K-FAC trajectory and the same
Laplace approximation as the capture engine, and a request they cannot serve is refused
with the backend's error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvkit
import curvkit.optim
from curvkit.laplace import KroneckerLaplace


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    return model, X, y


def _train(model, X, y, steps, **options):
    loss_fn = nn.CrossEntropyLoss()
    opt = curvkit.optim.KFAC(model, lr=0.1, damping=0.1, loss_fn=loss_fn, T_inv=2, **options)
    for _ in range(steps):
        opt.zero_grad()
        if options.get("backend", "hooks") != "hooks":
            opt.collect_statistics(X, y)
        out = model(X)
        if options.get("fisher", "empirical") != "empirical":
            opt.curvature_backward(out, y)
        loss_fn(out, y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize(("backend", "fisher"), [("backpack", "type-2"), ("asdl", "type-2"), ("asdl", "empirical")])
def test_kfac_trajectory_equals_the_capture_engines(backend, fisher):
    model, X, y = _case()
    ours = copy.deepcopy(model)
    _train(ours, X, y, 4, fisher=fisher)
    opt = _train(model, X, y, 4, fisher=fisher, backend=backend)
    for a, b in zip(ours.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not opt.preconditioner.engine.attached  # the backend runs its own passes


def test_methods_that_need_per_example_statistics_refuse_a_factor_backend():
    model, _, _ = _case()
    with pytest.raises(curvkit.UnsupportedRequestError, match=r"'singd' needs per-example.*'kfac'"):
        curvkit.optim.SINGD(model, backend="asdl", loss_fn=nn.CrossEntropyLoss())


def test_a_request_the_backend_cannot_serve_names_those_that_can():
    model, X, y = _case()
    opt = curvkit.optim.KFAC(model, lr=0.1, loss_fn=nn.CrossEntropyLoss(), backend="backpack")  # empirical Fisher
    with pytest.raises(curvkit.UnsupportedRequestError, match=r"'backpack' cannot serve.*fisher='empirical'.*'hooks'"):
        opt.collect_statistics(X, y)


def test_missing_collect_statistics_is_an_error():
    model, X, y = _case()
    opt = curvkit.optim.KFAC(model, lr=0.1, loss_fn=nn.CrossEntropyLoss(), fisher="type-2", backend="asdl")
    nn.functional.cross_entropy(model(X), y).backward()
    with pytest.raises(RuntimeError, match="collect_statistics"):
        opt.step()
    hooks = curvkit.optim.KFAC(_case()[0], lr=0.1)
    with pytest.raises(RuntimeError, match="not needed|backend='hooks'"):
        hooks.collect_statistics(X, y)


def test_unknown_backend_lists_the_registered_ones():
    model, _, _ = _case()
    with pytest.raises(curvkit.UnknownComponentError, match="'hooks'"):
        curvkit.optim.KFAC(model, loss_fn=nn.CrossEntropyLoss(), backend="nope")


@pytest.mark.parametrize("backend", ["backpack", "asdl"])
def test_kronecker_laplace_with_another_backend(backend):
    model, X, y = _case()
    data = [(X[:8], y[:8]), (X[8:], y[8:])]
    ours = KroneckerLaplace(model, "classification")
    ours.fit(data, progress=False)
    theirs = KroneckerLaplace(model, "classification", backend=backend)
    theirs.fit(data, progress=False)
    torch.testing.assert_close(theirs.log_marginal_likelihood(), ours.log_marginal_likelihood(), rtol=1e-10, atol=0)
    torch.testing.assert_close(theirs.predictive(X[:4]), ours.predictive(X[:4]), rtol=1e-10, atol=1e-12)
