"""The public inverse-root helpers (curvkit.linalg.roots) against scipy's
fractional_matrix_power and numpy's eigh (references someone else wrote), in float64."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from curvkit.linalg import inverse_root, matrix_power, symmetric_eigh
from curvkit.structures import DenseStructure, DiagonalStructure


def _psd(d: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, rank or 2 * d, generator=g, dtype=torch.float64)
    return X @ X.T / X.shape[1]


@pytest.mark.parametrize("power", [-0.25, -0.5, -1.0, 0.5, 2.0])
def test_matrix_power_equals_scipy(power):
    M = _psd(7)
    want = scipy.linalg.fractional_matrix_power((M + 0.1 * torch.eye(7, dtype=torch.float64)).numpy(), power)
    got = matrix_power(M, power, shift=0.1)
    assert got is not None and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np.real(want), rtol=1e-9, atol=1e-12)


def test_inverse_root_is_the_negative_power_and_roots_compose():
    M = _psd(6)
    root = inverse_root(M, 4, shift=1e-3)
    assert root is not None
    torch.testing.assert_close(root, matrix_power(M, -0.25, shift=1e-3))
    # (M + sI)^{-1/4} to the fourth power times (M + sI) is the identity
    shifted = M + 1e-3 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.matrix_power(root, 4) @ shifted, torch.eye(6, dtype=torch.float64))


def test_symmetric_eigh_equals_numpy_and_clamps():
    M = _psd(5, rank=2)  # singular: three eigenvalues are rounding around 0
    values, vectors = symmetric_eigh(M)
    np.testing.assert_allclose(values.numpy(), np.clip(np.linalg.eigvalsh(M.numpy()), 0, None), atol=1e-12)
    assert bool((values >= 0).all())
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, M, atol=1e-12, rtol=0)
    # low precision is upcast; a structure is accepted
    v32, _ = symmetric_eigh(M.to(torch.bfloat16))
    assert v32.dtype == torch.float32
    assert symmetric_eigh(DenseStructure.from_dense(M))[0].dtype == torch.float64
    diag = DiagonalStructure(torch.tensor([1.0, -1e-9, 4.0], dtype=torch.float64))
    values, vectors = symmetric_eigh(diag)
    assert values.tolist() == [1.0, 0.0, 4.0] and vectors.numel() == 0
    torch.testing.assert_close(
        matrix_power(diag, -0.5, shift=0.0 + 1e-12), torch.tensor([1.0, 1e6, 0.5], dtype=torch.float64)
    )


def test_failures_return_none_and_bad_arguments_are_named():
    singular = _psd(4, rank=1)
    assert inverse_root(singular, 2) is None  # a negative power of a singular matrix without shift
    assert matrix_power(torch.full((3, 3), float("nan"), dtype=torch.float64), 0.5) is None
    with pytest.raises(ValueError, match=r"shift=-1.0 must be a finite float >= 0"):
        matrix_power(singular, -1.0, shift=-1.0)
    with pytest.raises(ValueError, match=r"root=0.0 must be a finite number > 0"):
        inverse_root(singular, 0)


def test_batched():
    Ms = torch.stack([_psd(4, seed=s) for s in range(3)])
    got = inverse_root(Ms, 2, shift=0.01)
    for M, g in zip(Ms, got):
        torch.testing.assert_close(g, inverse_root(M, 2, shift=0.01))
