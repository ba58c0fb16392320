"""EKFAC's ``refresh_tolerance``: a refresh keeps the eigenbasis while it still diagonalises
the new factors. Tolerance 0 is exactly always refreshing; with unchanged factors a kept
basis gives the same direction as a fresh decomposition; the measure of "still diagonal"
against a hand-built reference; bad values refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit.optim
from curvkit.errors import ConfigError
from curvkit.linalg.basis import off_diagonal_fraction, reuse_basis

DT = torch.float64


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(32, 6, generator=gen, dtype=DT), torch.randint(0, 3, (32,), generator=gen)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _train(method, steps, lr=0.05, **options):
    x, y = _data()
    model = _model()
    opt = curvkit.optim.create(method, model, lr=lr, T_inv=1, **options)
    directions = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        directions.append([p.grad.clone() for p in model.parameters()])
    return model, opt, directions


def _skipped(opt):
    return sum(b.skipped_refreshes for b in opt.preconditioner.blocks.values())


@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_tolerance_zero_is_always_refreshing(method):
    base, _, _ = _train(method, 5)
    zero, opt, _ = _train(method, 5, refresh_tolerance=0.0)
    assert _skipped(opt) == 0
    for p, q in zip(base.parameters(), zero.parameters()):
        assert torch.equal(p, q)


def test_kept_basis_gives_the_fresh_decompositions_direction():
    """lr = 0: the factors never change, so the old basis diagonalises them (to rounding)
    and every refresh after the first keeps it (the factors move by ~1e-8 relative from rounding in
    the EMA); the directions equal those of a fresh
    eigendecomposition at every refresh."""
    _, ref_opt, ref_dirs = _train("ekfac", 4, lr=0.0)
    _, opt, dirs = _train("ekfac", 4, lr=0.0, refresh_tolerance=1e-5)
    assert _skipped(ref_opt) == 0
    assert _skipped(opt) == 3 * len(opt.preconditioner.blocks)  # refreshes 2-4 of every block
    for d_ref, d in zip(ref_dirs, dirs):
        for a, b in zip(d_ref, d):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_loose_tolerance_trains_and_is_reported():
    model, opt, _ = _train("ekfac", 8, refresh_tolerance=0.5)
    assert _skipped(opt) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "basis kept at" in opt.preconditioner.summary()


def test_off_diagonal_fraction_against_a_hand_built_reference():
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=DT))
    lam = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=DT)
    f = q @ torch.diag(lam) @ q.T
    eps, d = off_diagonal_fraction(f, q)
    assert eps < 1e-12
    torch.testing.assert_close(d, lam)
    e = torch.zeros(5, 5, dtype=DT)
    e[0, 1] = e[1, 0] = 0.3
    f2 = f + q @ e @ q.T  # an off-diagonal entry in the old basis
    eps2, _ = off_diagonal_fraction(f2, q)
    expected = math.sqrt(2 * 0.3**2) / float(torch.linalg.matrix_norm(torch.diag(lam) + e))
    assert eps2 == pytest.approx(expected, rel=1e-10)
    assert reuse_basis(f2, q, expected * 1.01) is not None
    assert reuse_basis(f2, q, expected * 0.99) is None
    assert reuse_basis(f2, q, 0.0) is None


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), "small", True])
def test_bad_tolerance_is_refused(value):
    with pytest.raises(ConfigError) as err:
        curvkit.optim.EKFAC(nn.Linear(3, 2), refresh_tolerance=value)
    assert "refresh_tolerance" in str(err.value) and "[0.0, 1.0)" in str(err.value)
