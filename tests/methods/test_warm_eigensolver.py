"""The warm-started eigensolver (``eigensolver="warm"``): orthogonal iteration from the previous
eigenbasis, checked against float64 ``torch.linalg.eigh`` ground truth on factors that drift
between refreshes; the fallback to ``eigh`` on a factor that changed a lot (and what the warm
start would have given without the check), on the first refresh, a new shape and non-finite
input; K-FAC and EKFAC train with it to the band of the exact solver, count their warm and
exact decompositions in ``summary()``, and round-trip through ``state_dict``; bad values
refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _digits import digits_accuracy
from torch import nn

import curvkit.optim
from curvkit.errors import ConfigError
from curvkit.linalg.basis import WarmEigensolver, warm_eigh
from curvkit.structures.base import DiagonalStructure

D = 96


def _drifting_factors(steps: int, *, dtype=torch.float32, drift: float = 0.01, seed: int = 0):
    """EMA factors ``F_k = 0.9 F_{k-1} + 0.1 XᵀX/n`` of data whose covariance (a heavy-tailed
    spectrum, 1 down to 1e-3) rotates a little at every step: the sequence a K-FAC factor
    takes between refreshes."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, D, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    f = None
    out = []
    for _ in range(steps):
        skew = torch.randn(D, D, generator=gen, dtype=torch.float64) * drift / math.sqrt(D)
        basis = basis @ torch.linalg.matrix_exp(skew - skew.T)
        x = torch.randn(4 * D, D, generator=gen, dtype=torch.float64) * scales @ basis.T
        batch = x.T @ x / x.shape[0]
        f = batch if f is None else 0.9 * f + 0.1 * batch
        out.append(f.to(dtype))
    return out


def _reconstruction_error(factor: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> float:
    f = factor.double()
    q = evecs.double()
    return float(torch.linalg.matrix_norm(f - (q * evals.double()) @ q.T) / torch.linalg.matrix_norm(f))


def _damped_solve(evals: torch.Tensor, evecs: torch.Tensor, g: torch.Tensor, shift: float) -> torch.Tensor:
    q = evecs.double()
    return q @ ((q.T @ g) / (evals.double() + shift).unsqueeze(1))


def test_warm_start_reproduces_drifting_factors_against_float64_eigh():
    """Ten refreshes, five steps apart, each warm-started from the previous one's basis (the
    first decomposed exactly): every warm result reproduces its factor within the tolerance,
    measured in float64 against the factor itself, and its damped inverse (shift 1e-2 of
    the top eigenvalue, K-FAC's regime) applied to a random vector is within 5 % of float64
    eigh's (measured: at most 2.3 %)."""
    factors = _drifting_factors(50)[4::5]
    solver = WarmEigensolver(tolerance=0.05, iterations=2)
    gen = torch.Generator().manual_seed(1)
    basis = None
    worst_direction = 0.0
    for f in factors:
        evals, evecs = solver.decompose(f, basis)
        basis = evecs
        assert evals.dtype == evecs.dtype == torch.float32
        assert _reconstruction_error(f, evals, evecs) <= 0.05
        orth = evecs.double().T @ evecs.double() - torch.eye(D, dtype=torch.float64)
        assert float(torch.linalg.matrix_norm(orth)) < 1e-4
        true_evals, true_evecs = torch.linalg.eigh(f.double())
        shift = 1e-2 * float(true_evals[-1])
        g = torch.randn(D, 3, generator=gen, dtype=torch.float64)
        exact = _damped_solve(true_evals, true_evecs, g, shift)
        warm = _damped_solve(evals, evecs, g, shift)
        worst_direction = max(
            worst_direction, float(torch.linalg.matrix_norm(warm - exact) / torch.linalg.matrix_norm(exact))
        )
    assert solver.exact == 1 and solver.warm == len(factors) - 1, (solver.warm, solver.exact)
    assert worst_direction < 0.05, worst_direction


def test_a_tighter_tolerance_gives_a_closer_inverse():
    """The check is what bounds the error: tolerance 1e-3 on the same drift takes more rounds
    or the exact fallback, and its directions are 10x closer to float64 eigh's."""
    f0, f1 = _drifting_factors(10, dtype=torch.float64)[4::5]
    basis = torch.linalg.eigh(f0)[1]
    loose = warm_eigh(f1, basis, tolerance=0.05, iterations=3)
    tight = WarmEigensolver(tolerance=1e-3, iterations=3).decompose(f1, basis)
    assert loose is not None and tight is not None
    true_evals, true_evecs = torch.linalg.eigh(f1)
    g = torch.randn(D, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shift = 1e-2 * float(true_evals[-1])
    exact = _damped_solve(true_evals, true_evecs, g, shift)
    err = [
        float(torch.linalg.matrix_norm(_damped_solve(*r, g, shift) - exact) / torch.linalg.matrix_norm(exact))
        for r in (loose, tight)
    ]
    assert err[1] < err[0] / 10, err


def test_fallback_fires_on_a_rotated_factor():
    """A factor rotated by a random orthogonal matrix: the old basis is useless. One step of
    orthogonal iteration without the check (tolerance ~1) would leave a large reconstruction
    error; with the check the warm start is refused and the exact eigh runs."""
    f = _drifting_factors(1, dtype=torch.float64)[0]
    basis = torch.linalg.eigh(f)[1]
    rot, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    rotated = rot @ f @ rot.T
    unchecked = warm_eigh(rotated, basis, tolerance=0.999, iterations=1)
    assert unchecked is not None and _reconstruction_error(rotated, *unchecked) > 0.3
    assert warm_eigh(rotated, basis, tolerance=0.05, iterations=1) is None
    solver = WarmEigensolver(tolerance=0.05)
    evals, evecs = solver.decompose(rotated, basis)
    assert (solver.warm, solver.exact) == (0, 1)
    assert _reconstruction_error(rotated, evals, evecs) < 1e-10
    torch.testing.assert_close(evals, torch.linalg.eigh(rotated)[0].clamp_min(0))


def test_zero_iterations_keeps_the_basis_or_falls_back():
    """``warm_iterations=0``: the previous basis itself when it passes (with the Rayleigh
    quotients as eigenvalues), else the exact decomposition; no QR step."""
    f0, f1 = _drifting_factors(10, dtype=torch.float64)[4::5]
    basis = torch.linalg.eigh(f0)[1]
    eps = _reconstruction_error(f1, (basis * (f1 @ basis)).sum(0), basis)
    evals, evecs = warm_eigh(f1, basis, tolerance=1.01 * eps, iterations=0)
    assert torch.equal(evecs, basis)
    torch.testing.assert_close(evals, torch.einsum("ij,ik,kj->j", basis, f1, basis).clamp_min(0))
    assert warm_eigh(f1, basis, tolerance=0.99 * eps, iterations=0) is None
    solver = WarmEigensolver(tolerance=1.01 * eps, iterations=0)
    solver.decompose(f1, basis)
    assert (solver.warm, solver.kept, solver.exact) == (1, 1, 0)


def test_first_refresh_new_shape_and_nonfinite_fall_back():
    f = _drifting_factors(1)[0]
    solver = WarmEigensolver()
    assert solver.decompose(f, None) is not None  # no basis yet
    assert solver.decompose(f, torch.empty(0)) is not None  # the identity (a failed first refresh)
    assert solver.decompose(f, torch.eye(D + 1)) is not None  # another shape
    assert (solver.warm, solver.exact) == (0, 3)
    bad = f.clone()
    bad[0, 0] = float("nan")
    assert warm_eigh(bad, torch.eye(D), tolerance=0.5) is None
    assert solver.decompose(bad, torch.eye(D)) is None  # and eigh fails too: the caller keeps its last inverse
    # a diagonal factor is not decomposed at all: counted in neither
    evals, evecs = solver.decompose(DiagonalStructure(torch.tensor([2.0, -1e-9, 1.0])), torch.eye(3))
    assert evals.tolist() == [2.0, 0.0, 1.0] and evecs.numel() == 0
    assert (solver.warm, solver.exact) == (0, 4)


def test_dtypes():
    """float64 stays float64; a bf16 factor is decomposed in float32."""
    f64 = _drifting_factors(1, dtype=torch.float64)[0]
    basis = torch.linalg.eigh(f64)[1]
    evals, evecs = warm_eigh(f64 * 1.01, basis, tolerance=1e-6)
    assert evals.dtype == evecs.dtype == torch.float64
    evals, evecs = WarmEigensolver().decompose(f64.to(torch.bfloat16), basis.float())
    assert evals.dtype == evecs.dtype == torch.float32


# --- in the methods -----------------------------------------------------------------------

DT = torch.float64


def _train(method, steps, opt=None, model=None, **options):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=gen, dtype=DT), torch.randint(0, 3, (32,), generator=gen)
    if model is None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    if opt is None:
        opt = curvkit.optim.create(method, model, lr=0.05, T_inv=1, **options)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _counts(opt):
    blocks = opt.preconditioner.blocks.values()
    return sum(b.eigensolver.warm for b in blocks), sum(b.eigensolver.exact for b in blocks)


KFAC_EIGH = {"inverter": "eigh", "damping": 1e-2}


@pytest.mark.parametrize(("method", "options"), [("kfac", KFAC_EIGH), ("ekfac", {}), ("tekfac", {})])
def test_methods_count_warm_and_exact_decompositions(method, options):
    _, opt = _train(method, 6, eigensolver="warm", warm_tolerance=0.5, **options)
    warm, exact = _counts(opt)
    n = 2 * len(opt.preconditioner.blocks)  # dense factors
    assert exact >= n and warm > 0 and warm + exact == 6 * n, (warm, exact)
    assert "warm eigensolver:" in opt.preconditioner.summary()


@pytest.mark.parametrize(("method", "options"), [("kfac", KFAC_EIGH), ("ekfac", {})])
def test_state_dict_round_trip_continues_warm(method, options):
    """A loaded optimizer warm-starts from the checkpointed basis exactly as the original does."""
    model, opt = _train(method, 4, eigensolver="warm", warm_tolerance=0.3, **options)
    state_model = {k: v.clone() for k, v in model.state_dict().items()}
    state_opt = copy.deepcopy(opt.state_dict())  # as a checkpoint on disk: not the live buffers
    torch.manual_seed(0)
    loaded = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    loaded.load_state_dict(state_model)
    copy_opt = curvkit.optim.create(method, loaded, lr=0.05, T_inv=1, eigensolver="warm", warm_tolerance=0.3, **options)
    copy_opt.load_state_dict(state_opt)
    _train(method, 3, opt=opt, model=model)
    _train(method, 3, opt=copy_opt, model=loaded)
    assert _counts(copy_opt)[0] == 3 * 2 * len(copy_opt.preconditioner.blocks)  # every refresh warm
    for p, q in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("method", "options"), [("kfac", {"damping": 0.1, "inverter": "eigh"}), ("ekfac", {"damping": 0.3})]
)
def test_trains_digits_in_the_exact_solvers_band(method, options):
    """Digits MLP, 10 epochs, refreshes every 5 steps: the warm solver (about 2/3 of the
    decompositions warm at tolerance 0.05, checked) reaches the exact solver's accuracy within one
    point (measured, seeds 0-1: identical to 4 digits)."""
    exact = digits_accuracy(method, lr=0.03, momentum=0.9, T_inv=5, **options)
    opts: list = []
    warm = digits_accuracy(method, lr=0.03, momentum=0.9, T_inv=5, eigensolver="warm", optimizers=opts, **options)
    assert warm >= 0.95 and abs(warm - exact) <= 0.01, (warm, exact)
    n_warm, n_exact = _counts(opts[0])
    assert n_warm > n_exact > 0, (n_warm, n_exact)


@pytest.mark.parametrize(
    ("method", "options", "needle"),
    [
        (
            "KFAC",
            {"inverter": "eigh", "eigensolver": "lanczos"},
            "eigensolver='lanczos' must be one of 'exact', 'warm'",
        ),
        ("KFAC", {"eigensolver": "warm"}, "set inverter='eigh' too"),
        ("EKFAC", {"eigensolver": "warm", "warm_tolerance": 0.0}, "warm_tolerance=0.0 must be a float in (0.0, 1.0)"),
        ("EKFAC", {"eigensolver": "warm", "warm_tolerance": float("nan")}, "must be a float in (0.0, 1.0)"),
        ("EKFAC", {"eigensolver": "warm", "warm_iterations": -1}, "warm_iterations=-1 must be an int >= 0"),
        ("TEKFAC", {"eigensolver": "warm", "warm_iterations": True}, "warm_iterations=True must be an int >= 0"),
    ],
)
def test_bad_values_are_refused(method, options, needle):
    with pytest.raises(ConfigError) as err:
        getattr(curvkit.optim, method)(nn.Linear(3, 2), **options)
    assert needle in str(err.value)
