"""What KroneckerLaplace refuses (issue 16): non-finite batches and parameters in fit(), batches
whose loss or curvature overflows the working dtype, a zero prior in the marginal likelihood,
invalid priors and sample counts — and what it still accepts (large finite inputs, equal to a
float64 fit), plus torch.save of a fitted object."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvkit.laplace import KroneckerLaplace, NonFiniteInputError

N = 40


def _problem(likelihood="classification", dtype=torch.float64, scale_batch1=1.0, bias_free=False):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8, bias=not bias_free), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    X = torch.randn(N, 3, generator=g, dtype=torch.float64)
    X[16:32] *= scale_batch1
    X = X.to(dtype)
    if likelihood == "classification":
        y = torch.randint(0, 3, (N,), generator=g)
    else:
        y = torch.randn(N, 3, generator=g, dtype=dtype)
    return model, DataLoader(TensorDataset(X, y), batch_size=16)  # batches 0, 1, 2 (16, 16, 8)


def _fitted(**kwargs):
    model, loader = _problem()
    la = KroneckerLaplace(model, "classification", **kwargs)
    la.fit(loader, progress=False)
    return la, loader


# --- fit(): non-finite batches and parameters -------------------------------------------


@pytest.mark.parametrize("likelihood,what", [("classification", "inputs"), ("regression", "targets")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_fit_refuses_a_nonfinite_batch_naming_it(likelihood, what, value):
    model, loader = _problem(likelihood)
    X, y = loader.dataset.tensors
    (X if what == "inputs" else y)[20, 1] = value  # row 20 is in batch 1
    la = KroneckerLaplace(model, likelihood)
    with pytest.raises(NonFiniteInputError, match=rf"batch 1: its {what} \(16, 3\) have 1 of 48 entries non-finite"):
        la.fit(loader, progress=False)
    assert la.curvature is None and la.loss == 0.0  # nothing stored


def test_fit_refuses_nonfinite_parameters_and_buffers_naming_them():
    model, loader = _problem()
    with torch.no_grad():
        model[2].weight[1, 4] = math.nan
    with pytest.raises(NonFiniteInputError, match=r"parameter '2\.weight' \(3, 8\) has 1 of 24 entries") as info:
        KroneckerLaplace(model, "classification").fit(loader, progress=False)
    assert info.value.name == "2.weight"

    model, loader = _problem()  # a frozen parameter enters every output as well
    model[0].bias.requires_grad_(False)
    with torch.no_grad():
        model[0].bias[0] = math.inf
    with pytest.raises(NonFiniteInputError, match=r"parameter '0\.bias'"):
        KroneckerLaplace(model, "classification").fit(loader, progress=False)

    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().eval()
    for p in bn[1].parameters():
        p.requires_grad_(False)
    bn[1].running_var[2] = math.nan
    with pytest.raises(NonFiniteInputError, match=r"buffer '1\.running_var'"):
        KroneckerLaplace(bn, "classification").fit(loader, progress=False)


def test_fit_refuses_a_batch_whose_loss_overflows():
    # finite inputs, finite parameters, but the output (≈1e30) squared overflows float32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    X, y = torch.randn(24, 3), torch.randn(24, 2)
    X[16:] *= 1e30
    with pytest.raises(NonFiniteInputError, match=r"batch 2: its loss is inf in torch\.float32") as info:
        KroneckerLaplace(model, "regression").fit(DataLoader(TensorDataset(X, y), batch_size=8), progress=False)
    assert info.value.batch == 2


@pytest.mark.parametrize(
    "options",
    [dict(), dict(correct_eigenvalues=True), dict(fisher="mc", generator=torch.Generator().manual_seed(0))],
    ids=["kfac", "ekfac", "mc"],
)
def test_fit_refuses_a_batch_whose_curvature_overflows(options):
    # ×1e20 in float32: the loss is finite (tanh saturates), but a·aᵀ ≈ 1e40 overflows
    model, loader = _problem(dtype=torch.float32, scale_batch1=1e20)
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(model(x), t, reduction="sum")) for x, t in loader]
    assert all(math.isfinite(v) for v in losses)
    la = KroneckerLaplace(model, "classification", **options)
    with pytest.raises(NonFiniteInputError, match=r"batch 1: its curvature is non-finite in torch\.float32") as info:
        la.fit(loader, progress=False)
    assert info.value.batch == 1 and la.curvature is None


@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
def test_fit_refuses_a_curvature_sum_that_overflows_naming_no_batch(ekfac):
    # every input ×3e18 in float32: each batch's summed a·aᵀ (≈1.5e38) is finite, their sum is not
    model, loader = _problem(dtype=torch.float32)
    loader.dataset.tensors[0].mul_(3e18)
    with pytest.raises(NonFiniteInputError, match="summed over all batches is non-finite") as info:
        KroneckerLaplace(model, "classification", correct_eigenvalues=ekfac).fit(loader, progress=False)
    assert info.value.batch is None


def test_fit_accepts_large_finite_inputs_and_equals_float64():
    # ×1e17 in float32 keeps every factor finite (a·aᵀ ≈ 1e34): accepted, and correct
    model, loader = _problem(dtype=torch.float32, scale_batch1=1e17)
    la = KroneckerLaplace(model, "classification")
    la.fit(loader, progress=False)
    X, y = loader.dataset.tensors
    ref = KroneckerLaplace(copy.deepcopy(model).double(), "classification")
    ref.fit(DataLoader(TensorDataset(X.double(), y), batch_size=16), progress=False)
    torch.testing.assert_close(la.log_marginal_likelihood().double(), ref.log_marginal_likelihood(), rtol=1e-5, atol=0)


def test_fit_refuses_regression_targets_of_another_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch 0: the model's output has shape \(8, 1\) but the targets \(8,\)"):
        KroneckerLaplace(model, "regression").fit([(X, y)], progress=False)


# --- the prior and the marginal likelihood --------------------------------------------


def test_zero_prior_precision_refused_by_the_marginal_likelihood():
    la, _ = _fitted()
    with pytest.raises(ValueError, match=r"positive prior precision, but 59 of 59 entries are 0"):
        la.log_marginal_likelihood(0.0)
    per_block = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # blocks 0.weight, 0.bias, 2.weight, 2.bias
    with pytest.raises(ValueError, match=r"but 8 of 59 entries are 0"):
        la.log_marginal_likelihood(per_block)
    # a small positive prior is fine and equals the dense formula
    value = la.log_marginal_likelihood(1e-4)
    P = la.posterior_precision(1e-4)
    p0 = torch.full((59,), 1e-4, dtype=torch.float64)
    dense = -la.loss - 0.5 * (torch.logdet(P) - p0.log().sum() + (la.mean * p0) @ la.mean)
    torch.testing.assert_close(value, dense, rtol=1e-9, atol=0)
    # other uses of a zero prior stay allowed where they are defined: C here is non-singular
    assert torch.isfinite(la.log_det_posterior_precision(0.0))


@pytest.mark.parametrize(
    "value,error,message",
    [
        (-1.0, ValueError, r"prior_precision=-1\.0 is not allowed; it must be a finite, non-negative number"),
        (math.nan, ValueError, r"prior_precision=nan is not allowed"),
        (math.inf, ValueError, r"prior_precision=inf is not allowed"),
        (torch.tensor([1.0, -2.0, 1.0, 1.0]), ValueError, r"prior_precision=-2\.0 \(entry 1 of 4\) is not allowed"),
        (torch.ones(2, 2), ValueError, r"prior_precision has shape \(2, 2\)"),
        ("1.0", TypeError, r"prior_precision='1\.0' is a str"),
        (True, TypeError, r"prior_precision=True is a bool"),
    ],
)
def test_invalid_prior_precision_raises_with_value_and_fix(value, error, message):
    model, loader = _problem()
    with pytest.raises(error, match=message):
        KroneckerLaplace(model, "classification", prior_precision=value)
    la, _ = _fitted()
    la.prior_precision = value  # set after fitting: refused where it is used
    with pytest.raises(error, match=message):
        la.log_marginal_likelihood()


def test_prior_that_does_not_fit_the_layout_is_refused_at_fit():
    model, loader = _problem()
    la = KroneckerLaplace(model, "classification", prior_precision=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(5,\) fits neither a scalar, nor one value per block \(4: "):
        la.fit(loader, progress=False)
    la = KroneckerLaplace(model, "classification", prior_mean=torch.zeros(7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"prior_mean has shape \(7,\).*\(59 parameters\)"):
        la.fit(loader, progress=False)
    with pytest.raises(ValueError, match="prior_mean has 1 of 1 entries non-finite"):
        KroneckerLaplace(model, "classification", prior_mean=torch.tensor(math.nan))


# --- counts and other numbers ----------------------------------------------------------


def test_invalid_counts_raise_with_value_and_fix():
    la, loader = _fitted()
    X = loader.dataset.tensors[0][:4]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"n_samples={bad!r} is not allowed; it must be an integer >= 1"):
            la.predictive(X, link_approx="mc", n_samples=bad)
    with pytest.raises(ValueError, match=r"link_approx='bayes' is not valid"):
        la.predictive(X, link_approx="bayes")
    with pytest.raises(ValueError, match=r"num_samples=0 is not allowed"):
        la.sample(0)
    with pytest.raises(ValueError, match=r"n_steps=-1 is not allowed"):
        la.optimize_prior_precision(n_steps=-1)
    with pytest.raises(ValueError, match=r"init_prior_prec=0\.0 is not allowed; it must be a finite positive"):
        la.optimize_prior_precision(init_prior_prec=0.0)
    with pytest.raises(ValueError, match=r"lr=nan is not allowed"):
        la.optimize_prior_precision(lr=math.nan)
    model, _ = _problem()
    with pytest.raises(ValueError, match=r"sigma_noise=inf is not allowed"):
        KroneckerLaplace(model, "regression", sigma_noise=math.inf)
    with pytest.raises(ValueError, match=r"temperature=0 is not allowed"):
        KroneckerLaplace(model, "classification", temperature=0)
    with pytest.raises(ValueError, match=r"mc_samples=0 is not allowed"):
        KroneckerLaplace(model, "classification", fisher="mc", mc_samples=0)
    # the smallest valid count works: probabilities, not NaN
    probs = la.predictive(X, link_approx="mc", n_samples=1, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(probs).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64))


def test_predictive_refuses_nonfinite_inputs():
    la, loader = _fitted()
    X = loader.dataset.tensors[0][:4].clone()
    X[2, 0] = math.nan
    with pytest.raises(NonFiniteInputError, match=r"predictive\(\) got inputs \(4, 3\) with non-finite entries"):
        la.predictive(X)


# --- torch.save -----------------------------------------------------------------------


def test_fitted_laplace_survives_torch_save():
    la, loader = _fitted(prior_precision=0.7)
    buf = io.BytesIO()
    torch.save(la, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    X = loader.dataset.tensors[0][:5]
    torch.testing.assert_close(loaded.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.predictive(X), la.predictive(X), rtol=0, atol=0)
    loaded.fit(loader, progress=False)  # the registry came back: it can refit
    torch.testing.assert_close(loaded.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=1e-12, atol=0)


def test_custom_registry_that_does_not_pickle_is_named():
    import curvkit

    model, loader = _problem()
    la = KroneckerLaplace(model, "classification", registry=curvkit.build_registry())
    la.fit(loader, progress=False)
    with pytest.raises(TypeError, match=r"explicit registry= that does not pickle.*registry=None"):
        torch.save(la, io.BytesIO())


def test_an_eigensolver_failure_on_finite_data_is_not_blamed_on_a_batch(monkeypatch):
    from curvkit.laplace import KroneckerCurvature

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    model, loader = _problem()
    monkeypatch.setattr(KroneckerCurvature, "from_data", failing)
    with pytest.raises(torch.linalg.LinAlgError, match="failed to converge"):
        KroneckerLaplace(model, "classification", correct_eigenvalues=True).fit(loader, progress=False)
    model, loader = _problem(dtype=torch.float32)  # the same failure where the factor sum overflows
    loader.dataset.tensors[0].mul_(3e18)
    with pytest.raises(NonFiniteInputError, match="summed over all batches") as info:
        KroneckerLaplace(model, "classification", correct_eigenvalues=True).fit(loader, progress=False)
    assert isinstance(info.value.__cause__, torch.linalg.LinAlgError)
