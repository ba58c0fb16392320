"""Laplace on normalised models: unit-wise blocks in KroneckerCurvature, KroneckerLaplace and
the laplace-torch backend, against dense float64 references."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from _norm_reference import dense_fisher, layer_params
from _reference import assert_matrix_close
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit
from curvkit.laplace import KroneckerCurvature, KroneckerLaplace
from curvkit.linalg.kronecker import UnitwiseOperator

DT = torch.float64


def _model() -> nn.Module:
    """Linear → LayerNorm → tanh → Linear → BatchNorm1d (eval, no bias) → Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5),
        nn.LayerNorm(5),
        nn.Tanh(),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 3),
    ).to(DT)
    with torch.no_grad():
        for p in list(model[1].parameters()) + list(model[4].parameters()):
            p.copy_(torch.randn_like(p))
        model[4].running_mean.normal_()
        model[4].running_var.uniform_(0.5, 1.5)
    model[4].bias.requires_grad_(False)  # a scale-only unit-wise block (k = 1)
    return model.eval()


def _data(n: int = 24, batch: int = 10):
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    return X, y, [(X[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _curvature(model, data, **kwargs):
    return KroneckerCurvature.from_data(
        model, nn.CrossEntropyLoss(reduction="sum"), data, fisher="type-2", progress=False, **kwargs
    )


def _flat_slice(curvature: KroneckerCurvature, names: list[str]) -> torch.Tensor:
    offsets, start = {}, 0
    for n, s in zip(curvature.param_names, curvature.param_shapes):
        offsets[n] = torch.arange(start, start + s.numel())
        start += s.numel()
    return torch.cat([offsets[n] for n in names])


def test_unitwise_blocks_of_the_operator_are_the_dense_ggn_blocks():
    """The operator's entries over a normalisation layer's parameters are the dense GGN's
    per-unit blocks (the couplings between units are zero)."""
    model = _model()
    X, y, data = _data()
    C = _curvature(model, data)
    kinds = {b.name: type(b.operator).__name__ for b in C.blocks}
    assert kinds == dict(
        zip(
            "01345",
            ["KroneckerOperator", "UnitwiseOperator", "KroneckerOperator", "UnitwiseOperator", "KroneckerOperator"],
        )
    )
    dense = C.to_dense()
    for name, k in (("1", 2), ("4", 1)):  # BatchNorm1d's bias is frozen: a scale-only block
        idx = _flat_slice(C, layer_params(model, name)[:k])
        ref = dense_fisher(model, name, X, y, nn.CrossEntropyLoss(reduction="sum"), "type-2")  # over [γ, β]
        d = ref.shape[0] // 2 if name == "4" else ref.shape[0] // k
        ref = ref[: k * d, : k * d]
        mask = torch.zeros_like(ref, dtype=torch.bool)
        for i in range(d):  # unit i's entries: (γ_i, β_i) × (γ_i, β_i)
            for a in range(k):
                for b in range(k):
                    mask[i + a * d, i + b * d] = True
        assert_matrix_close(dense[idx][:, idx], torch.where(mask, ref, 0.0), rtol=1e-10, msg=name)
        assert float(ref[~mask].abs().max()) > 1e-6 * float(ref.abs().max())  # the dropped couplings exist


def test_operator_quantities_agree_with_the_dense_matrix():
    model = _model()
    _, _, data = _data()
    C = _curvature(model, data)
    dense = C.to_dense()
    p = dense.shape[0]
    v = torch.randn(p, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    assert_matrix_close(C @ v, dense @ v, rtol=1e-12)
    assert_matrix_close(C.diagonal(), dense.diagonal(), rtol=1e-12)
    assert_matrix_close(C.trace(), dense.trace(), rtol=1e-12)
    assert_matrix_close(C.eigenvalues().sort().values, torch.linalg.eigvalsh(dense).clamp_min(0), rtol=1e-9)
    prior = 0.7
    shifted = dense + prior * torch.eye(p, dtype=DT)
    assert_matrix_close(C.logdet(prior), torch.logdet(shifted), rtol=1e-11)
    assert_matrix_close(C.inverse(prior) @ v, torch.linalg.solve(shifted, v), rtol=1e-10)
    root = C.power(-0.5, prior)
    assert_matrix_close(root @ (root @ v), torch.linalg.solve(shifted, v), rtol=1e-10)
    # a diagonal prior that varies inside a block (the dense path of a block)
    diag = torch.linspace(0.5, 1.5, p, dtype=DT)
    assert_matrix_close(C.logdet(diag), torch.logdet(dense + torch.diag(diag)), rtol=1e-11)
    assert_matrix_close(C.inverse(diag) @ v, torch.linalg.solve(dense + torch.diag(diag), v), rtol=1e-10)


def test_unitwise_samples_have_the_inverse_precision_as_covariance():
    """Statistical (as tests/laplace/test_curvature.py): whitened samples of the unit-wise
    blocks have identity covariance within 1.5 standard errors; a 10% error exceeds it."""
    model = _model()
    _, _, data = _data()
    C = _curvature(model, data)
    unit = KroneckerCurvature([b for b in C.blocks if isinstance(b.operator, UnitwiseOperator)])
    n, p = 20_000, unit.num_params
    mean = torch.randn(p, dtype=DT, generator=torch.Generator().manual_seed(4))
    samples = unit.sample(n, 0.7, mean=mean, generator=torch.Generator().manual_seed(11))
    evals, evecs = torch.linalg.eigh(unit.to_dense() + 0.7 * torch.eye(p, dtype=DT))
    white = (samples - mean) @ ((evecs * evals.sqrt()) @ evecs.t()).t()
    cov = white.t() @ white / n
    bound = 1.5 * math.sqrt(p * (p + 1) / n)
    assert float((cov - torch.eye(p, dtype=DT)).norm()) < bound
    wrong = white * math.sqrt(1.1)
    assert float((wrong.t() @ wrong / n - torch.eye(p, dtype=DT)).norm()) > bound


def test_a_unitwise_block_takes_the_prior_exactly_in_factored_mode():
    model = _model()
    _, _, data = _data()
    C = _curvature(model, data)
    unit = KroneckerCurvature([b for b in C.blocks if isinstance(b.operator, UnitwiseOperator)])
    assert_matrix_close(unit.logdet(0.3, prior_mode="factored"), unit.logdet(0.3, prior_mode="exact"), rtol=1e-13)
    v = torch.randn(unit.num_params, 2, dtype=DT)
    assert_matrix_close(unit.inverse(0.3, "factored") @ v, unit.inverse(0.3) @ v, rtol=1e-13)


def test_separate_bias_splits_scale_and_shift():
    model = _model()
    _, _, data = _data()
    joint, split = _curvature(model, data), _curvature(model, data, separate_bias=True)
    names = [b.name for b in split.blocks]
    assert "1" in names and "1.bias" in names and "4.bias" not in names
    idx = _flat_slice(joint, layer_params(model, "1"))
    a, b = joint.to_dense()[idx][:, idx], split.to_dense()[idx][:, idx]
    d = 5
    assert_matrix_close(b[:d, :d], a[:d, :d], rtol=1e-13)
    assert_matrix_close(b[d:, d:], a[d:, d:], rtol=1e-13)
    assert float(b[:d, d:].abs().max()) == 0.0 and float(a[:d, d:].abs().max()) > 0


def test_ekfac_keeps_the_exact_unitwise_blocks():
    model = _model()
    _, _, data = _data()
    plain, corrected = _curvature(model, data), _curvature(model, data, correct_eigenvalues=True)
    for a, b in zip(plain.blocks, corrected.blocks):
        if isinstance(a.operator, UnitwiseOperator):
            assert b is a or torch.equal(a.F, b.F)
        else:
            assert b.corrected_eigenvalues is not None


def test_from_factors_refuses_the_wrong_kind_of_entry():
    model = _model()
    X, y, _ = _data()
    factors = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2")
    assert isinstance(factors["1"], curvkit.UnitwiseFactors)
    bad = dict(factors)
    bad["1"] = curvkit.KroneckerFactors(torch.eye(2, dtype=DT), torch.eye(5, dtype=DT))
    with pytest.raises(TypeError, match="'1' \\(LayerNorm\\) needs UnitwiseFactors"):
        KroneckerCurvature.from_factors(model, bad)
    bad["1"], bad["0"] = factors["1"], factors["1"]
    with pytest.raises(TypeError, match="'0' \\(Linear\\) needs KroneckerFactors"):
        KroneckerCurvature.from_factors(model, bad)


def test_kronecker_laplace_fits_a_normalised_model():
    model = _model()
    X, y, data = _data()
    la = KroneckerLaplace(model, "classification", prior_precision=0.5)
    la.fit(data, progress=False)
    assert {type(b.operator).__name__ for b in la.curvature.blocks} == {"KroneckerOperator", "UnitwiseOperator"}
    P = la.posterior_precision()
    assert_matrix_close(la.log_det_posterior_precision(), torch.logdet(P), rtol=1e-10)
    assert torch.isfinite(la.log_marginal_likelihood())
    la.optimize_prior_precision(n_steps=20)
    probs = la.predictive(X[:5]) if hasattr(la, "predictive") else la(X[:5])
    assert torch.isfinite(probs).all()


def test_laplace_torch_kron_takes_the_diagonal_of_the_unit_blocks():
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import CurvlinopsGGN

    from curvkit.laplace import CurvkitGGN

    model = _model()
    X, y, _ = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    kw = dict(subset_of_weights="all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(copy.deepcopy(model), "classification", hessian_structure="kron", backend=CurvkitGGN, **kw)
        la.fit(loader)
        ref = laplace.Laplace(
            copy.deepcopy(model), "classification", hessian_structure="diag", backend=CurvlinopsGGN, **kw
        )
        ref.fit(loader)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    for i, (pname, size) in enumerate(zip(names, sizes)):
        if not pname.startswith(("1.", "4.")):
            continue
        (block,) = la.H_facs.kfacs[i]  # one factor: the parameter's exact diagonal
        assert_matrix_close(block, torch.diag(ref.H[offsets[pname] : offsets[pname] + size]), rtol=1e-10, msg=pname)
    # laplace-torch's Kron drops the γ–β (and weight–bias) cross terms: the layout of our
    # KroneckerLaplace with separate_bias=True, whose marginal likelihood it then equals
    ours = KroneckerLaplace(model, "classification", prior_precision=1.0, separate_bias=True)
    ours.fit(loader, progress=False)
    torch.testing.assert_close(la.log_marginal_likelihood(), ours.log_marginal_likelihood(), rtol=1e-12, atol=0)
