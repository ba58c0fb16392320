"""Laplace on Hugging Face ``Conv1D`` layers, whose weight is stored transposed ``(nx, nf)``.

The curvature of a Conv1D network must be that of its ``nn.Linear`` twin with the flat
parameter order permuted (the twin's weight is the Conv1D weight transposed), on square
layers too, where a layout error would keep every shape right. References: our own Linear
path (checked against curvlinops in tests/laplace and tests/stats), and laplace-torch's
``torch.func`` Jacobians and gradients for the per-datum rows.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from curvkit.laplace import KroneckerCurvature

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

DT = torch.float64


def _pair(linear_head: bool = False):
    torch.manual_seed(0)
    layers = [Conv1D(5, 3), nn.Tanh(), Conv1D(5, 5), nn.Tanh(), Conv1D(3, 5)]
    if linear_head:  # laplace-torch wants a model ending in nn.Linear
        layers += [nn.Tanh(), nn.Linear(3, 3)]
    model = nn.Sequential(*layers).to(DT)
    twin = []
    for m in model:
        if isinstance(m, Conv1D):
            lin = nn.Linear(m.nx, m.nf).to(DT)
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                lin.bias.copy_(m.bias)
            twin.append(lin)
        else:
            twin.append(copy.deepcopy(m))
    return model, nn.Sequential(*twin)


def _permutation(model, twin) -> torch.Tensor:
    """``perm[i]``: the index in the twin's flat parameters of the model's flat parameter ``i``."""
    offsets, start = {}, 0
    for name, p in twin.named_parameters():
        offsets[name] = start
        start += p.numel()
    perm = []
    for name, p in model.named_parameters():
        base = offsets[name]
        if p.ndim == 2:  # Conv1D weight (nx, nf) -> Linear weight (nf, nx)
            nx, nf = p.shape
            perm += [base + j * nx + i for i in range(nx) for j in range(nf)]
        else:
            perm += list(range(base, base + p.numel()))
    return torch.tensor(perm)


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(X[:6], y[:6]), (X[6:], y[6:])]


@pytest.mark.parametrize("separate_bias", [False, True])
@pytest.mark.parametrize("correct_eigenvalues", [False, True], ids=["kfac", "ekfac"])
def test_curvature_equals_linear_twin(separate_bias, correct_eigenvalues):
    model, twin = _pair()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    curvatures = [
        KroneckerCurvature.from_data(
            m,
            loss_fn,
            _data(),
            fisher="type-2",
            separate_bias=separate_bias,
            correct_eigenvalues=correct_eigenvalues,
            progress=False,
        )
        for m in (model, twin)
    ]
    ours, ref = (c.to_dense() for c in curvatures)
    perm = _permutation(model, twin)
    torch.testing.assert_close(ours, ref[perm][:, perm], rtol=1e-10, atol=1e-12)
    # products with a vector in each flat order agree as well
    v = torch.randn(ours.shape[0], dtype=DT)
    w = torch.empty_like(v)
    w[perm] = v
    torch.testing.assert_close(curvatures[0] @ v, (curvatures[1] @ w)[perm], rtol=1e-10, atol=1e-12)


def test_laplace_torch_backends_on_conv1d():
    laplace = pytest.importorskip("laplace")
    from laplace.curvature.curvature import CurvatureInterface

    from curvkit.laplace import CurvkitEF, CurvkitGGN

    model, twin = _pair(linear_head=True)
    X = torch.cat([x for x, _ in _data()])
    y = torch.cat([t for _, t in _data()])
    perm = _permutation(model, twin)
    for cls in (CurvkitGGN, CurvkitEF):
        be = cls(model, "classification")
        js, _ = be.jacobians(X)
        ref_js, _ = CurvatureInterface.jacobians(be, X)  # laplace-torch's torch.func reference
        torch.testing.assert_close(js, ref_js, rtol=1e-12, atol=1e-12)
        gs, _ = be.gradients(X, y)
        ref_gs, _ = CurvatureInterface.gradients(be, X, y)
        torch.testing.assert_close(gs, ref_gs, rtol=1e-12, atol=1e-12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=6)
    fits = []
    for m in (model, twin):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = laplace.Laplace(
                m,
                "classification",
                backend=CurvkitGGN,
                hessian_structure="kron",
                prior_precision=0.5,
                subset_of_weights="all",
            )
            la.fit(loader)
        fits.append(la)
    ours, ref = (la.posterior_precision.to_matrix() for la in fits)
    # both are rebuilt from eigendecompositions: agreement to ~1e-9 of the largest entry
    torch.testing.assert_close(ours, ref[perm][:, perm], rtol=1e-8, atol=1e-8 * float(ref.abs().max()))
    torch.testing.assert_close(fits[0].log_marginal_likelihood(), fits[1].log_marginal_likelihood(), rtol=1e-10, atol=0)
