"""KroneckerLaplace (no laplace-torch inside) against laplace-torch's KronLaplace and dense formulas."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvkit.laplace import KroneckerLaplace

DT = torch.float64
N = 40


def _problem(kind: str, likelihood: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        X = torch.randn(N, 3, generator=g, dtype=DT)
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).to(DT)
        X = torch.randn(N, 3, 4, 4, generator=g, dtype=DT)
    y = (
        torch.randint(0, 3, (N,), generator=g)
        if likelihood == "classification"
        else torch.randn(N, 3, generator=g, dtype=DT)
    )
    return model, DataLoader(TensorDataset(X, y), batch_size=16)


def _laplace_torch(model, likelihood, loader, **kwargs):
    from laplace import Laplace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(copy.deepcopy(model), likelihood, subset_of_weights="all", hessian_structure="kron", **kwargs)
        la.fit(loader)
    return la


CASES = [("mlp", "classification"), ("cnn", "classification"), ("mlp", "regression")]


@pytest.mark.parametrize("kind,likelihood", CASES)
def test_quantities_equal_laplace_torch_kron(kind, likelihood):
    pytest.importorskip("laplace")
    model, loader = _problem(kind, likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    prior = torch.tensor([0.3, 1.0, 2.0, 0.5], dtype=DT)
    kwargs = dict(sigma_noise=sigma, temperature=0.9, prior_precision=prior, prior_mean=0.1)
    ref = _laplace_torch(model, likelihood, loader, **kwargs)
    ours = KroneckerLaplace(model, likelihood, **kwargs)
    ours.fit(loader, progress=False)
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.log_likelihood(), ref.log_likelihood, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.posterior_precision(), ref.posterior_precision.to_matrix(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.log_det_posterior_precision(), ref.log_det_posterior_precision, rtol=1e-10, atol=0)
    X = loader.dataset.tensors[0][:5]
    got, want = ours.predictive(X), ref(X, pred_type="glm", link_approx="probit")
    if likelihood == "regression":
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)
    else:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", ["scalar", "layerwise"])
def test_prior_optimisation_equals_laplace_torch(structure):
    pytest.importorskip("laplace")
    model, loader = _problem("mlp", "classification")
    ref = _laplace_torch(model, "classification", loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.optimize_prior_precision(pred_type="glm", prior_structure=structure, n_steps=40)
    ours = KroneckerLaplace(model, "classification")
    ours.fit(loader, progress=False)
    got = ours.optimize_prior_precision(structure, n_steps=40)
    torch.testing.assert_close(got, ref.prior_precision.reshape(got.shape), rtol=1e-8, atol=0)


def test_optimised_prior_is_a_stationary_point():
    """Run to convergence and check the marginal likelihood's gradient vanishes there."""
    model, loader = _problem("mlp", "regression")
    ours = KroneckerLaplace(model, "regression", sigma_noise=0.5)
    ours.fit(loader, progress=False)
    prior = ours.optimize_prior_precision("layerwise", n_steps=600, lr=0.05)
    log_prior = prior.log().requires_grad_(True)
    ours.log_marginal_likelihood(log_prior.exp()).backward()
    assert float(log_prior.grad.abs().max()) < 1e-3
    start = torch.zeros_like(log_prior, requires_grad=True)  # log p0 = 0: far from the optimum
    ours.log_marginal_likelihood(start.exp()).backward()
    assert float(start.grad.abs().max()) > 1e-1


@pytest.mark.parametrize("correct_eigenvalues", [False, True])
def test_marginal_likelihood_from_dense_formulas(correct_eigenvalues):
    """From scratch: curvlinops' (E)KFAC dense matrix, the Gaussian log-likelihood, and
    log det / scatter of a diagonal prior that varies within blocks."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    model, loader = _problem("mlp", "regression")
    sigma = 0.6
    params = list(model.parameters())
    cls = EKFACLinearOperator if correct_eigenvalues else KFACLinearOperator
    op = cls(
        model,
        nn.MSELoss(reduction="sum"),
        params,
        loader,
        fisher_type="type-2",
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    ggn = 0.5 * (op @ torch.eye(op.shape[1], dtype=DT))  # curvature of ½·SSE
    p = ggn.shape[0]
    prior = torch.rand(p, dtype=DT, generator=torch.Generator().manual_seed(2)) + 0.5
    ours = KroneckerLaplace(
        model, "regression", sigma_noise=sigma, prior_precision=prior, correct_eigenvalues=correct_eigenvalues
    )
    ours.fit(loader, progress=False)
    precision = ggn / sigma**2 + torch.diag(prior)
    theta = torch.cat([q.detach().reshape(-1) for q in params])
    X, y = loader.dataset.tensors
    sse = float(((model(X) - y) ** 2).sum())
    log_lik = -0.5 * sse / sigma**2 - N * 3 * math.log(sigma * math.sqrt(2 * math.pi))
    expected = log_lik - 0.5 * (torch.logdet(precision) - prior.log().sum() + (theta * prior) @ theta)
    torch.testing.assert_close(ours.log_marginal_likelihood(), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.posterior_precision(), precision, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        ours.posterior_covariance().to_dense(), torch.linalg.inv(precision), rtol=1e-8, atol=1e-12
    )


def test_mc_predictive_agrees_with_probit_direction_and_dense_mc():
    """Statistical: MC predictive with 20k samples equals a dense-covariance MC estimate."""
    model, loader = _problem("mlp", "classification")
    ours = KroneckerLaplace(model, "classification", prior_precision=0.2)
    ours.fit(loader, progress=False)
    X = loader.dataset.tensors[0][:4]
    got = ours.predictive(X, link_approx="mc", n_samples=20_000, generator=torch.Generator().manual_seed(0))
    js, f = ours.jacobians(X)
    cov = js @ torch.linalg.inv(ours.posterior_precision()) @ js.transpose(1, 2)
    samples = torch.distributions.MultivariateNormal(f, cov).sample((20_000,))
    ref = torch.softmax(samples, -1).mean(0)
    # both are MC means of bounded variables: std error <= 0.5/sqrt(20000) ≈ 0.0035 each
    assert float((got - ref).abs().max()) < 0.015
    assert float((got - torch.softmax(f, -1)).abs().max()) > 0.015  # the posterior spread matters here


def test_sample_mean_and_spread():
    model, loader = _problem("mlp", "classification")
    ours = KroneckerLaplace(model, "classification", prior_precision=1.0)
    ours.fit(loader, progress=False)
    s = ours.sample(20_000, generator=torch.Generator().manual_seed(3))
    var = torch.diagonal(torch.linalg.inv(ours.posterior_precision()))
    # per-coordinate variance estimates have relative std sqrt(2/n) = 1%
    assert float(((s.var(0) - var) / var).abs().max()) < 0.05
    assert float(((s.mean(0) - ours.mean) / var.sqrt()).abs().max()) < 5 / math.sqrt(20_000) * 4


def test_errors():
    model, loader = _problem("mlp", "classification")
    with pytest.raises(ValueError, match="likelihood='poisson'"):
        KroneckerLaplace(model, "poisson")
    with pytest.raises(ValueError, match="sigma_noise"):
        KroneckerLaplace(model, "classification", sigma_noise=2.0)
    la = KroneckerLaplace(model, "classification")
    with pytest.raises(RuntimeError, match="call fit"):
        la.log_marginal_likelihood()
    with pytest.raises(TypeError, match="not an iterator"):
        la.fit(iter(loader))
    la.fit(loader, progress=False)
    with pytest.raises(ValueError, match="structure='blocky'"):
        la.optimize_prior_precision("blocky")
    with pytest.raises(ValueError, match="link_approx='bridge'"):
        la.predictive(loader.dataset.tensors[0][:2], link_approx="bridge")
