"""KroneckerCurvature against curvlinops' (E)KFAC operators and dense float64 linear algebra."""

from __future__ import annotations

import math

import pytest
import torch
from _models import cnn, mlp
from _reference import assert_matrix_close, curvkit_to_flat_index
from torch import nn

import curvkit
from curvkit.laplace import KroneckerCurvature

DT = torch.float64


def _case(kind: str, n: int = 14, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = mlp() if kind == "mlp" else cnn()
    X = torch.randn(n, 5, generator=g, dtype=DT) if kind == "mlp" else torch.randn(n, 2, 7, 7, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, [(X[:6], y[:6]), (X[6:], y[6:])]


def _curvlinops_dense(model, loss_fn, data, fisher, approx="expand", separate=False, ekfac=False, seed=0):
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    cls = EKFACLinearOperator if ekfac else KFACLinearOperator
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(
        model,
        loss_fn,
        params,
        data,
        fisher_type=fisher,
        kfac_approx=approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
        seed=seed,
    )
    return op @ torch.eye(op.shape[1], dtype=DT)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("separate", [False, True])
def test_kfac_equals_curvlinops(kind, fisher, separate):
    model, data = _case(kind)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    approx = "reduce" if (kind == "cnn" and fisher == "empirical") else "expand"
    gen = torch.Generator().manual_seed(7) if fisher == "mc" else None
    C = KroneckerCurvature.from_data(
        model, loss_fn, data, fisher=fisher, kfac_approx=approx, generator=gen, separate_bias=separate, progress=False
    )
    ref = _curvlinops_dense(model, loss_fn, data, fisher, approx, separate, seed=7)
    assert_matrix_close(C.to_dense(), ref, rtol=1e-10)
    v = torch.randn(C.num_params, 3, dtype=DT)
    assert_matrix_close(C @ v, ref @ v, rtol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("separate", [False, True])
def test_ekfac_equals_curvlinops(kind, separate):
    model, data = _case(kind)
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    C = KroneckerCurvature.from_data(
        model, loss_fn, data, fisher="type-2", separate_bias=separate, correct_eigenvalues=True, progress=False
    )
    ref = _curvlinops_dense(model, loss_fn, data, "type-2", separate=separate, ekfac=True)
    assert_matrix_close(C.to_dense(), ref, rtol=1e-10)
    assert_matrix_close(C.trace(), torch.trace(ref), rtol=1e-10)
    assert_matrix_close(C.diagonal(), torch.diagonal(ref), rtol=1e-10)


def test_ekfac_regression_mse_equals_curvlinops():
    model, _ = _case("mlp")
    X = torch.randn(10, 5, dtype=DT)
    data = [(X[:4], torch.randn(4, 3, dtype=DT)), (X[4:], torch.randn(6, 3, dtype=DT))]
    loss_fn = nn.MSELoss(reduction="sum")
    C = KroneckerCurvature.from_data(model, loss_fn, data, fisher="empirical", correct_eigenvalues=True, progress=False)
    assert_matrix_close(C.to_dense(), _curvlinops_dense(model, loss_fn, data, "empirical", ekfac=True), rtol=1e-10)


@pytest.mark.parametrize("separate", [False, True])
def test_dense_view_is_the_kronecker_product_of_the_factors(separate):
    """Independently of curvlinops: permute torch.kron(G, A) per layer into parameter order."""
    model, data = _case("mlp")
    X, y = data[1]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    factors = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2")
    C = KroneckerCurvature.from_factors(model, factors, separate_bias=separate)
    blocks = []
    for name, (A, G) in factors.items():
        layer = model.get_submodule(name)
        d_out, d_in = layer.weight.shape
        if separate:
            blocks += [torch.kron(G, A[:d_in, :d_in]), G * A[d_in, d_in]]
        else:
            idx = torch.tensor(curvkit_to_flat_index(d_out, d_in, True))
            block = torch.zeros(d_out * (d_in + 1), d_out * (d_in + 1), dtype=DT)
            block[idx[:, None], idx[None, :]] = torch.kron(G, A)
            blocks.append(block)
    expected = torch.block_diag(*blocks)
    assert_matrix_close(C.to_dense(), expected, rtol=1e-13)
    assert C.param_names == [n for n, _ in model.named_parameters()]


def _curvature(separate: bool = False, seed: int = 0) -> KroneckerCurvature:
    model, data = _case("mlp", seed=seed)
    return KroneckerCurvature.from_data(
        model, nn.CrossEntropyLoss(reduction="sum"), data, fisher="type-2", separate_bias=separate, progress=False
    )


def _priors(C: KroneckerCurvature):
    g = torch.Generator().manual_seed(3)
    per_block = torch.rand(len(C.blocks), generator=g, dtype=DT) + 0.2
    diagonal = torch.rand(C.num_params, generator=g, dtype=DT) + 0.2
    expand = torch.cat([torch.full((b.numel,), float(p), dtype=DT) for b, p in zip(C.blocks, per_block)])
    return [(0.7, torch.full((C.num_params,), 0.7, dtype=DT)), (per_block, expand), (diagonal, diagonal)]


@pytest.mark.parametrize("separate", [False, True])
def test_spectral_quantities_match_dense_linear_algebra(separate):
    C = _curvature(separate)
    D = C.to_dense()
    assert_matrix_close(C.trace(), torch.trace(D), rtol=1e-12)
    assert_matrix_close(C.diagonal(), torch.diagonal(D), rtol=1e-12)
    assert_matrix_close(torch.sort(C.eigenvalues()).values, torch.linalg.eigvalsh(D), rtol=1e-9)
    for prior, diag in _priors(C):
        M = D + torch.diag(diag)
        assert_matrix_close(C.logdet(prior), torch.logdet(M), rtol=1e-11)
        assert_matrix_close(C.inverse(prior).to_dense(), torch.linalg.inv(M), rtol=1e-9)
        evals, evecs = torch.linalg.eigh(M)
        assert_matrix_close(C.power(-0.5, prior).to_dense(), (evecs * evals.rsqrt()) @ evecs.t(), rtol=1e-9)
        J = torch.randn(4, 3, C.num_params, dtype=DT)
        assert_matrix_close(C.inverse(prior).square_form(J), J @ torch.linalg.inv(M) @ J.transpose(1, 2), rtol=1e-9)


def test_eigendecomposition_reconstructs_each_block():
    C = _curvature()
    for block, eig in zip(C.blocks, C.eigendecomposition()):
        assert_matrix_close((eig.QG * eig.lambda_G) @ eig.QG.t(), block.G, rtol=1e-12)
        assert_matrix_close((eig.QA * eig.lambda_A) @ eig.QA.t(), block.A, rtol=1e-12)


@pytest.mark.parametrize("pi_correction", [True, False])
def test_factored_prior_is_the_tikhonov_damped_kronecker_product(pi_correction):
    C = _curvature(separate=True)
    delta = 0.3
    dense_blocks = []
    for block in C.blocks:
        pi = 1.0
        if pi_correction:
            pi = math.sqrt((torch.trace(block.G) / block.d_out) / (torch.trace(block.A) / block.k))
        eye_g, eye_a = torch.eye(block.d_out, dtype=DT), torch.eye(block.k, dtype=DT)
        damped = torch.kron(block.G + pi * math.sqrt(delta) * eye_g, block.A + math.sqrt(delta) / pi * eye_a)
        idx = block.flat_to_matrix_index()
        dense_blocks.append(damped[idx][:, idx])
    M = torch.block_diag(*dense_blocks)
    assert_matrix_close(C.logdet(delta, "factored", pi_correction), torch.logdet(M), rtol=1e-11)
    assert_matrix_close(C.inverse(delta, "factored", pi_correction).to_dense(), torch.linalg.inv(M), rtol=1e-9)


def test_sample_covariance_is_the_inverse_precision():
    """Statistical: whitened samples must have identity covariance and zero mean.

    For n Gaussian samples in P dimensions, E||S - I||_F^2 ≈ P(P+1)/n for the sample
    covariance S, so the bound below is 1.5 standard errors of that norm; a covariance off
    by 10% in scale (or a wrong square root) exceeds it several times over.
    """
    C = _curvature(separate=True)
    prior = torch.rand(len(C.blocks), dtype=DT, generator=torch.Generator().manual_seed(1)) + 0.5
    n, p = 40_000, C.num_params
    mean = torch.randn(p, dtype=DT)
    gen = torch.Generator().manual_seed(11)
    samples = C.sample(n, prior, mean=mean, generator=gen)
    assert samples.shape == (n, p)
    precision = C.to_dense() + torch.diag(
        torch.cat([torch.full((b.numel,), float(d)) for b, d in zip(C.blocks, prior)])
    )
    evals, evecs = torch.linalg.eigh(precision)
    root = (evecs * evals.sqrt()) @ evecs.t()  # whitening: cov(root x) = I
    white = (samples - mean) @ root.t()
    cov = white.t() @ white / n
    bound = 1.5 * math.sqrt(p * (p + 1) / n)
    assert float((cov - torch.eye(p, dtype=DT)).norm()) < bound
    assert float(white.mean(0).norm()) < 1.5 * math.sqrt(p / n)
    wrong = white * math.sqrt(1.1)  # the same test detects a 10% covariance error
    assert float((wrong.t() @ wrong / n - torch.eye(p, dtype=DT)).norm()) > bound


def test_sample_with_a_dense_diagonal_prior():
    C = _curvature(separate=False)
    diag = torch.rand(C.num_params, dtype=DT, generator=torch.Generator().manual_seed(5)) + 0.5
    samples = C.sample(30_000, diag, generator=torch.Generator().manual_seed(2))
    cov = samples.t() @ samples / samples.shape[0]
    target = torch.linalg.inv(C.to_dense() + torch.diag(diag))
    assert float((cov - target).norm() / target.norm()) < 0.05


def test_matmul_formats_and_scaling():
    C = _curvature()
    D = C.to_dense()
    v = torch.randn(C.num_params, dtype=DT)
    assert_matrix_close(C @ v, D @ v, rtol=1e-12)
    as_list = [t.clone() for t in v.split([s.numel() for s in C.param_shapes])]
    as_list = [t.reshape(s) for t, s in zip(as_list, C.param_shapes)]
    out = C @ as_list
    assert [t.shape for t in out] == C.param_shapes
    assert_matrix_close(torch.cat([t.reshape(-1) for t in out]), D @ v, rtol=1e-12)
    mat = [torch.stack([t, 2 * t], -1) for t in as_list]
    out = C @ mat
    assert_matrix_close(torch.cat([t.reshape(-1, 2) for t in out]), D @ torch.stack([v, 2 * v], 1), rtol=1e-12)
    assert_matrix_close((C * 2.5).to_dense(), 2.5 * D, rtol=1e-13)
    assert_matrix_close((2.5 * C).logdet(1.0), torch.logdet(2.5 * D + torch.eye(C.num_params, dtype=DT)), rtol=1e-11)


def test_scipy_and_curvlinops_export():
    from curvlinops import GGNLinearOperator

    C = _curvature()
    D = C.to_dense()
    sp = C.to_scipy()
    x = torch.randn(C.num_params, 2, dtype=DT)
    assert_matrix_close(torch.as_tensor(sp @ x.numpy()), D @ x, rtol=1e-12)
    from scipy.sparse.linalg import eigsh

    top = eigsh(sp, k=1, which="LA", return_eigenvectors=False)[0]
    assert math.isclose(top, float(torch.linalg.eigvalsh(D)[-1]), rel_tol=1e-8)
    cl = C.to_curvlinops()
    out = cl @ [torch.randn(*s, dtype=DT) for s in C.param_shapes]
    assert [t.shape for t in out] == C.param_shapes
    assert_matrix_close(cl @ x, D @ x, rtol=1e-12)
    # composes with curvlinops' own operators: (GGN - K-FAC) @ x
    model, data = _case("mlp")
    ggn = GGNLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()), data)
    diff = (ggn - cl) @ x
    assert_matrix_close(diff, ggn @ x - D @ x, rtol=1e-10)


def test_bad_inputs_raise_clear_errors():
    C = _curvature()
    with pytest.raises(ValueError, match="fits neither a scalar"):
        C.logdet(torch.ones(C.num_params + 1, dtype=DT))
    with pytest.raises(ValueError, match="non-negative"):
        C.logdet(-1.0)
    with pytest.raises(TypeError, match="is a str; it must be a finite, non-negative number"):
        C.logdet("big")
    with pytest.raises(ValueError, match="constant on each block"):
        C.logdet(torch.rand(C.num_params, dtype=DT) + 1, prior_mode="factored")
    with pytest.raises(ValueError, match="prior_mode='nope' is not valid"):
        C.logdet(1.0, prior_mode="nope")
    with pytest.raises(ValueError, match="needs a positive prior precision"):
        C.inverse(0.0)
    with pytest.raises(ValueError, match=r"must have shape \(79,\) or \(79, K\)"):
        C @ torch.ones(5, dtype=DT)
    with pytest.raises(ValueError, match="dtype"):
        C @ torch.ones(C.num_params, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_samples"):
        C.sample(0, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        C * -1.0
    with pytest.raises(TypeError, match="one-shot iterator"):
        model, data = _case("mlp")
        KroneckerCurvature.from_data(
            model, nn.CrossEntropyLoss(), iter(data), fisher="type-2", correct_eigenvalues=True, progress=False
        )
