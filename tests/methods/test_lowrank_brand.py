"""B-KFAC, B-R-KFAC and B-KFAC-c (lowrank plugin): the Brand factor against dense float64 EMA
factors, B-KFAC-c's drift correction measured, the per-factor fallback, resume and digits."""

from __future__ import annotations

import copy

import pytest
import torch
from _digits import digits_accuracy
from curvkit_lowrank import BrandKroneckerBlock, RandomizedSVDInverter, bkfac
from curvkit_lowrank.bkfac import correct_eigenpairs
from torch import nn

from curvkit.blocks import BlockInfo
from curvkit.linalg import RelativeDamping
from curvkit.optim import CurvatureOptimizer


class _Rows:
    """The part of :class:`curvkit.blocks.LayerStats` a Brand block reads."""

    def __init__(self, a_rows, g_rows):
        self.inputs = a_rows
        self.dtype, self.device = a_rows.dtype, a_rows.device
        self._rows = (a_rows, g_rows.unsqueeze(0))

    def rows(self):
        return self._rows


def _block(d_in, d_out, rank, module=nn.Linear, **kwargs):
    info = BlockInfo("layer", module, d_in, d_out, False)
    return BrandKroneckerBlock(info, inverter=RandomizedSVDInverter(rank=rank), **kwargs)


def _best(X, k):
    e, v = torch.linalg.eigh(X)
    return (v[:, -k:] * e[-k:]) @ v[:, -k:].t()


def _batches(d_in, d_out, n, steps, seed=0):
    """Batches with a decaying spectrum (float64): rows ~ N(0, L Lᵀ)."""
    gen = torch.Generator().manual_seed(seed)
    La = torch.randn(d_in, d_in, dtype=torch.float64, generator=gen) * torch.logspace(
        0, -1.5, d_in, dtype=torch.float64
    )
    Lg = torch.randn(d_out, d_out, dtype=torch.float64, generator=gen) * torch.logspace(
        0, -1.5, d_out, dtype=torch.float64
    )
    for _ in range(steps):
        a = torch.randn(n, d_in, dtype=torch.float64, generator=gen) @ La.t()
        g = torch.randn(n, d_out, dtype=torch.float64, generator=gen) @ Lg.t()
        yield a, g


def _decay(k, rho=0.9):
    return min(1.0 - 1.0 / k, rho)


def test_brand_factor_is_the_exact_ema_until_the_rank_fills_then_its_best_truncation():
    """rank 12, batch 5, d_in 40, d_out 30: steps 1-2 hold the exact EMA factor (ranks 5, 10);
    step 3 (rank 15 > 12) holds the best rank-12 approximation of the exact EMA."""
    block = _block(40, 30, 12)
    exact = {"A": torch.zeros(40, 40, dtype=torch.float64), "G": torch.zeros(30, 30, dtype=torch.float64)}
    for k, (a, g) in enumerate(_batches(40, 30, 5, 3), start=1):
        rho = _decay(k)
        block.update(_Rows(a, g), rho)
        exact["A"] = rho * exact["A"] + (1 - rho) * a.t() @ a
        exact["G"] = rho * exact["G"] + (1 - rho) * g.t() @ g
        for side in ("A", "G"):
            low = block.low[side]
            assert block.brand[side] and side not in block.exact  # B-KFAC keeps no d×d factor
            want = exact[side] if k < 3 else _best(exact[side], 12)
            torch.testing.assert_close(low.to_dense(), want, rtol=1e-9, atol=1e-11)
            assert low.rank == min(5 * k, 12)


def test_first_brand_factor_is_the_best_rank_k_approximation_of_the_batch():
    block = _block(40, 30, 3)
    (a, g), *_ = _batches(40, 30, 5, 1)
    block.update(_Rows(a, g), 0.0)
    torch.testing.assert_close(block.low["A"].to_dense(), _best(a.t() @ a, 3), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(block.low["G"].to_dense(), _best(g.t() @ g, 3), rtol=1e-9, atol=1e-11)


def _factor_errors(steps=30, **kwargs):
    """Relative Frobenius error of the A-side Brand factor against the exact EMA factor after
    each of ``steps`` random batches (d 60, batch 4, rank 8, ρ 0.9, refresh every 5 steps)."""
    block = _block(60, 50, 8, **kwargs)
    exact = torch.zeros(60, 60, dtype=torch.float64)
    errors = []
    for k, (a, g) in enumerate(_batches(60, 50, 4, steps, seed=3), start=1):
        rho = _decay(k)
        block.update(_Rows(a, g), rho)
        exact = rho * exact + (1 - rho) * a.t() @ a
        if k % 5 == 0:
            block.refresh(RelativeDamping(value=0.1, on="factors"), 0.1)
        errors.append(float(torch.linalg.norm(block.low["A"].to_dense() - exact) / torch.linalg.norm(exact)))
    return errors, _best(exact, 8), exact


def test_a_full_correction_is_the_best_factor_within_the_brand_subspace():
    """φ = 1: Rayleigh–Ritz on all of U gives U (Uᵀ X U) Uᵀ, the best approximation of the exact
    factor X of the form U M Uᵀ (dense float64)."""
    block = _block(60, 50, 8)
    exact = torch.zeros(60, 60, dtype=torch.float64)
    for k, (a, g) in enumerate(_batches(60, 50, 4, 12, seed=5), start=1):
        block.update(_Rows(a, g), _decay(k))
        exact = _decay(k) * exact + (1 - _decay(k)) * a.t() @ a
    U = block.low["A"].U
    assert float(torch.linalg.norm(block.low["A"].to_dense() - U @ (U.t() @ exact @ U) @ U.t())) > 1e-6
    fixed = correct_eigenpairs(block.low["A"], exact, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fixed.to_dense(), U @ (U.t() @ exact @ U) @ U.t(), rtol=1e-9, atol=1e-11)
    assert bool((fixed.d[:-1] >= fixed.d[1:]).all())


def test_b_kfac_c_corrections_reduce_the_factor_error_and_b_r_restores_the_best_rank(monkeypatch):
    """30 random batches (d 60, batch 4, rank 8, ρ 0.9): every B-KFAC-c correction (every 5
    updates, φ = 0.2) lowers the error of the Brand factor against the exact EMA factor (the
    block's exact factor is checked against a dense float64 EMA), by 2.1 in total here
    (Frobenius errors 64-137, measured) —
    the error within span(U) is small; most of B-KFAC's error is mass truncated out of the
    subspace, which only B-R-KFAC's RSVD restores: right after it the error is the best rank-8
    error (0.271, relative) while B-KFAC's is 0.303."""
    seen = []

    def recording(low, exact, fraction, generator):
        out = correct_eigenpairs(low, exact, fraction, generator)
        seen.append(
            (
                exact.clone(),
                float(torch.linalg.norm(low.to_dense() - exact)),
                float(torch.linalg.norm(out.to_dense() - exact)),
            )
        )
        return out

    monkeypatch.setattr(bkfac, "correct_eigenpairs", recording)
    corrected, _, _ = _factor_errors(correction_period=5, correction_fraction=0.2)
    assert len(seen) == 2 * 6  # A and G sides at updates 5, 10, ..., 30
    for before, after in (s[1:] for s in seen):
        assert after <= before * (1 + 1e-12)
    assert sum(b - a for _, b, a in seen) > 1.0
    plain, best, exact = _factor_errors()
    torch.testing.assert_close(seen[-2][0], exact, rtol=1e-12, atol=1e-14)  # the block's exact EMA factor (A side)
    refreshed, _, _ = _factor_errors(refresh_period=1)
    floor = float(torch.linalg.norm(best - exact) / torch.linalg.norm(exact))
    assert plain[-1] > 1.02 * floor  # B-KFAC has drifted from the best rank-r factor
    assert refreshed[-1] < 1.001 * floor  # step 30 is a refresh (30 % 5 == 0): RSVD of the exact factor


def test_the_fallback_per_factor_is_shown_in_the_summary():
    """Digits-sized MLP, batch 64, rank 20: Brand for the 128-wide G of layer 0 and the 129-wide
    A of layer 2; RSVD of the EMA factor for A 65 (20 + 64 ≥ 65) and G 10; conv: RSVD."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = CurvatureOptimizer(
        model, method="b-kfac", lr=0.01, rank=20, T_stats=1, T_inv=1, loss_fn=nn.CrossEntropyLoss()
    )
    assert "pending first batch (Brand if r + n < 129)" in opt.summary()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    text = opt.summary()
    blocks = opt.preconditioner.blocks
    assert "A 10: rsvd of the EMA factor (not a Linear layer)" in blocks["0"].describe()
    assert "A 129: Brand rank 20" in blocks["2"].describe() and "G 128: Brand rank 20" in blocks["2"].describe()
    assert "G 10: rsvd of the EMA factor (r + n ≥ 10)" in blocks["4"].describe()
    assert "A 129: Brand rank 20" in text


def test_without_eligible_factors_b_kfac_is_rs_kfac():
    """rank ≥ every width: no factor takes the B-update, and B-KFAC's parameters equal RS-KFAC's."""
    out = []
    for method in ("rs-kfac", "b-kfac"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        opt = CurvatureOptimizer(
            model, method=method, lr=0.1, rank=6, T_stats=1, T_inv=2, damping=0.1, loss_fn=nn.CrossEntropyLoss()
        )
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 12, dtype=torch.float64, generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
            opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # the EMA is summed in another order


@pytest.mark.parametrize("method", ["b-kfac", "b-r-kfac", "b-kfac-c"])
def test_resume_is_bit_exact_with_brand_factors(method):
    """The conformance kit's MLP is too narrow for the B-update; here 40-48-4 with batch 16
    and rank 4 (Brand on A 41 and G 48)."""
    options = {"rank": 4, "T_stats": 1, "T_inv": 3, "damping": 0.1}
    if method != "b-kfac":
        options["B_R_period"] = 2
    if method == "b-kfac-c":
        options["correction_period"] = 2
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(96, 40, generator=gen)
    y = X[:, :4].argmax(1)

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 48), nn.Tanh(), nn.Linear(48, 4))
        return model, CurvatureOptimizer(model, method=method, lr=0.05, loss_fn=nn.CrossEntropyLoss(), **options)

    def train(model, opt, start, steps):
        for i in range(start, start + steps):
            s = (16 * i) % 96
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[s : s + 16]), y[s : s + 16]).backward()
            opt.step()

    model, opt = fresh()
    train(model, opt, 0, 5)
    assert "Brand rank 4" in opt.summary()
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 5, 7)
    model2, opt2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(model2, opt2, 5, 7)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


# lr 0.03, momentum 0.9, rank 20 (Brand on layer 0's G 128 and layer 2's A 129 at batch 64),
# relative λ 0.1, T_inv 10, RMS clip 0.07 (the RS-KFAC digits settings).
BRAND_DIGITS = [
    ("b-kfac", {}),
    ("b-r-kfac", {"B_R_period": 5}),
    ("b-kfac-c", {"B_R_period": 5, "correction_period": 5}),
]


@pytest.mark.parametrize(("method", "options"), BRAND_DIGITS, ids=[m for m, _ in BRAND_DIGITS])
def test_brand_methods_train_digits_to_95_percent(method, options):
    acc = digits_accuracy(
        method, lr=0.03, momentum=0.9, damping=0.1, rank=20, T_stats=1, T_inv=10, rms_clip=0.07, **options
    )
    assert acc >= 0.95, f"{method}: test accuracy {acc:.4f}"


def _subspace_drift(decay_to, seed, steps=40, **kwargs):
    """Mean over updates 21..``steps`` of the within-subspace drift ‖UᵀXU − D‖_F/‖X‖_F of the
    A-side Brand factor against the exact EMA factor X (d 60, batch 4, rank 8, ρ 0.9; spectrum
    of the rows' covariance root decaying to 10^``decay_to``), and of the largest principal-angle
    sine between span(U) and X's top-8 eigenspace."""
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(60, 60, dtype=torch.float64, generator=gen) * torch.logspace(
        0, decay_to, 60, dtype=torch.float64
    )
    block = _block(60, 50, 8, **kwargs)
    exact = torch.zeros(60, 60, dtype=torch.float64)
    drift, sines = [], []
    for k in range(1, steps + 1):
        a = torch.randn(4, 60, dtype=torch.float64, generator=gen) @ root.t()
        g = torch.randn(4, 50, dtype=torch.float64, generator=gen)
        block.update(_Rows(a, g), _decay(k))
        exact = _decay(k) * exact + (1 - _decay(k)) * a.t() @ a
        if k <= 20:
            continue
        U, d = block.low["A"].U, block.low["A"].d
        drift.append(float(torch.linalg.norm(U.t() @ exact @ U - torch.diag(d)) / torch.linalg.norm(exact)))
        top = torch.linalg.eigh(exact).eigenvectors[:, -8:]
        sines.append(float((1 - torch.linalg.svdvals(top.t() @ U).min().clamp(max=1) ** 2).sqrt()))
    return sum(drift) / len(drift), sum(sines) / len(sines)


@pytest.mark.parametrize("decay_to", [-1.5, -3.0])
def test_b_kfac_c_reduces_the_drift_within_the_brand_subspace(decay_to):
    """B-KFAC's kept pairs drift from being eigenpairs of the exact EMA factor restricted to
    span(U); B-KFAC-c (φ 0.2, every 5 updates) keeps ‖UᵀXU − D‖_F/‖X‖_F lower: measured ratios
    (updates 21-60, 4 seeds) 0.57-0.80, here (updates 21-40, seeds 0-1) asserted < 0.85. It does
    not move span(U): the principal angles to the exact top-8 eigenspace are as large (sin θ_max
    ≈ 0.2-0.8 for both; asserted within 10%)."""
    for seed in range(2):
        plain, plain_sin = _subspace_drift(decay_to, seed)
        corrected, corrected_sin = _subspace_drift(decay_to, seed, correction_period=5, correction_fraction=0.2)
        assert corrected < 0.85 * plain, (seed, corrected, plain)
        assert abs(corrected_sin - plain_sin) < 0.1 * plain_sin, (seed, corrected_sin, plain_sin)
