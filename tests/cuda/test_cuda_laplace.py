"""Laplace approximations on the device (float64): ``KroneckerLaplace`` fit, prior
optimisation, marginal likelihood, predictive (probit and MC) and samples, equal to the
same computation on the CPU (which tests/laplace checks against laplace-torch); the MC
Fisher with the eigenvalue correction (its generator on the device); and laplace-torch's
``Laplace`` with the ``CurvkitGGN`` backend on the device."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _cuda_common import CUDA, DEVICE, on_device, rel_err
from torch import nn

from curvkit.laplace import KroneckerLaplace

pytestmark = CUDA
DT = torch.float64
CPU = torch.device("cpu")


def _case(likelihood: str):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(DT)
    g = torch.Generator(device="cpu").manual_seed(1)
    X = torch.randn(40, 2, 5, 5, generator=g, dtype=DT, device="cpu")
    if likelihood == "classification":
        y = torch.randint(0, 3, (40,), generator=g, device="cpu")
    else:
        y = torch.randn(40, 3, generator=g, dtype=DT, device="cpu")
    return model, X, y


def _fit(likelihood: str, device: torch.device, **kwargs) -> tuple[KroneckerLaplace, torch.Tensor]:
    model, X, y = _case(likelihood)
    model, X, y = model.to(device), X.to(device), y.to(device)
    la = KroneckerLaplace(model, likelihood, **kwargs)
    la.fit([(X[:16], y[:16]), (X[16:32], y[16:32]), (X[32:], y[32:])], progress=False)
    return la, X


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("correct", [False, True], ids=["kfac", "ekfac"])
def test_kronecker_laplace_on_the_device_equals_the_cpu(likelihood, correct):
    la, X = _fit(likelihood, DEVICE, correct_eigenvalues=correct)
    ref, X_cpu = _fit(likelihood, CPU, correct_eigenvalues=correct)
    prior = la.optimize_prior_precision("layerwise", n_steps=20)
    prior_ref = ref.optimize_prior_precision("layerwise", n_steps=20)
    assert on_device(prior)
    assert rel_err(prior, prior_ref) < 1e-8
    lml = la.log_marginal_likelihood()
    assert on_device(lml)
    assert abs(float(lml) - float(ref.log_marginal_likelihood())) <= 1e-8 * abs(float(lml))
    if likelihood == "classification":
        probs = la.predictive(X[:6])
        assert on_device(probs) and rel_err(probs, ref.predictive(X_cpu[:6])) < 1e-8
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        mc = la.predictive(X[:6], link_approx="mc", n_samples=200, generator=gen)
        assert on_device(mc)
        torch.testing.assert_close(mc.sum(-1), torch.ones(6, dtype=DT, device=DEVICE))
        assert (mc - probs).abs().max() < 0.1  # MC against probit: same posterior, another approximation
    else:
        mean, var = la.predictive(X[:6])
        mean_ref, var_ref = ref.predictive(X_cpu[:6])
        assert on_device(mean) and on_device(var)
        assert rel_err(mean, mean_ref) < 1e-8 and rel_err(var, var_ref) < 1e-8
    samples = la.sample(5, generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert on_device(samples) and samples.shape[0] == 5 and bool(torch.isfinite(samples).all())


def test_mc_fisher_with_eigenvalue_correction_on_the_device():
    """The MC targets of the factor pass and of the correction pass are drawn on the device
    (before the fix, a CPU generator met device outputs here)."""
    la, X = _fit("classification", DEVICE, fisher="mc", correct_eigenvalues=True)
    la.optimize_prior_precision(n_steps=5)
    probs = la.predictive(X[:4])
    assert on_device(probs) and bool(torch.isfinite(probs).all())


def test_laplace_torch_with_the_curvkit_backend_on_the_device():
    pytest.importorskip("laplace")
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    from curvkit.laplace import CurvkitGGN

    results = {}
    for device in (DEVICE, CPU):
        model, X, y = _case("classification")
        model, X, y = model.to(device), X.to(device), y.to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = Laplace(
                copy.deepcopy(model),
                "classification",
                subset_of_weights="all",
                hessian_structure="kron",
                backend=CurvkitGGN,
                prior_precision=0.5,
            )
            la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
            lml = la.log_marginal_likelihood()
            probs = la(X[:4], pred_type="glm", link_approx="probit")
        assert lml.device.type == device.type and probs.device.type == device.type
        results[device.type] = (float(lml), probs.cpu())
    (lml_dev, p_dev), (lml_cpu, p_cpu) = results[DEVICE.type], results["cpu"]
    assert abs(lml_dev - lml_cpu) <= 1e-8 * abs(lml_cpu)
    assert rel_err(p_dev, p_cpu) < 1e-8


class _Layouts(nn.Module):
    """Every block layout Laplace places by index: an embedding with a padding row (a
    transposed block with a diagonal A), self-attention (row ranges of in_proj_weight) and an
    LM head tied to the embedding (a transposed tie)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(torch.tanh(self.att(h, h, h, need_weights=False)[0].mean(1)))


@pytest.mark.parametrize("correct", [False, True], ids=["kfac", "ekfac"])
def test_block_layouts_on_the_device_equal_the_cpu(correct):
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, 7, (24, 3), generator=g, device="cpu")
    y = torch.randint(0, 7, (24,), generator=g, device="cpu")
    results = []
    for device in (DEVICE, CPU):
        model = _Layouts().to(device=device, dtype=DT)
        la = KroneckerLaplace(model, "classification", correct_eigenvalues=correct)
        la.fit([(ids[:12].to(device), y[:12].to(device)), (ids[12:].to(device), y[12:].to(device))], progress=False)
        results.append((la.log_marginal_likelihood(), la.predictive(ids[:5].to(device))))
    (lml, probs), (lml_ref, probs_ref) = results
    assert on_device(lml) and on_device(probs)
    assert abs(float(lml) - float(lml_ref)) <= 1e-8 * abs(float(lml_ref))
    assert rel_err(probs, probs_ref) < 1e-8
