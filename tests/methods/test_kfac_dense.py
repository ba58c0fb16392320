"""K-FAC against dense float64 ground truth.

The reference factors come from :func:`curvkit.kronecker_factors` (itself equal to
curvlinops' KFACLinearOperator, tested in tests/stats); the reference direction is a dense
``torch.linalg.solve`` with the Kronecker product built by ``torch.kron``.
"""

from __future__ import annotations

import pytest
import torch
from _models import build_case
from _reference import curvlinops_factors
from torch import nn

import curvkit
from curvkit.linalg import ConstantDamping, ExactDamping, LevenbergMarquardtDamping, PiDamping, RelativeDamping
from curvkit.optim import Preconditioner
from curvkit.optim.preconditioner import layer_matrix


def _one_step(model, X, y, loss_fn, **options):
    """Gradients and preconditioned gradients (matrix form) after one step from fresh state."""
    precond = Preconditioner(model, "kfac", loss_fn=loss_fn, T_inv=1, **options)
    model.zero_grad()
    out = model(X)
    loss = loss_fn(out, y)
    precond.curvature_backward(out, y)
    loss.backward()
    grads = {
        n: layer_matrix(layer, layer.weight.grad, layer.bias.grad if layer.bias is not None else None).clone()
        for n, layer in precond.layers.items()
    }
    assert precond.step()
    dirs = {
        n: layer_matrix(layer, layer.weight.grad, layer.bias.grad if layer.bias is not None else None)
        for n, layer in precond.layers.items()
    }
    return precond, grads, dirs


def _dense_direction(A, G, grad, damping):
    eye_a, eye_g = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
    lam = damping.initial_value()
    if isinstance(damping, ExactDamping) or (
        isinstance(damping, LevenbergMarquardtDamping) and damping.inner == "exact"
    ):
        F = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    elif isinstance(damping, RelativeDamping) and damping.on == "product":
        lam_eff = lam * torch.linalg.eigvalsh(A)[-1] * torch.linalg.eigvalsh(G)[-1]
        F = torch.kron(G, A) + lam_eff * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    else:
        if isinstance(damping, ConstantDamping):
            s_a, s_g = damping.a, damping.g
        elif isinstance(damping, RelativeDamping):
            s_a, s_g = lam * torch.linalg.eigvalsh(A)[-1], lam * torch.linalg.eigvalsh(G)[-1]
        else:  # pi (also Levenberg–Marquardt's inner pi)
            pi = torch.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
            s_a, s_g = pi * lam**0.5, lam**0.5 / pi
        F = torch.kron(G + s_g * eye_g, A + s_a * eye_a)
    return torch.linalg.solve(F, grad.reshape(-1)).reshape(grad.shape)


DAMPINGS = [
    ("cholesky", ConstantDamping(a=0.03, g=0.2)),
    ("eigh", ConstantDamping(a=0.03, g=0.2)),
    ("cholesky", PiDamping(value=0.05)),
    ("eigh", PiDamping(value=0.05)),
    ("eigh", ExactDamping(value=0.05)),
    ("eigh", RelativeDamping(value=0.1, on="product")),
    ("cholesky", RelativeDamping(value=0.1, on="factors")),
    ("eigh", RelativeDamping(value=0.1, on="factors")),
    ("cholesky", LevenbergMarquardtDamping(initial=0.07)),
    ("eigh", LevenbergMarquardtDamping(initial=0.07, inner="exact")),
]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize(("inverter", "damping"), DAMPINGS, ids=[f"{i}-{d!r}" for i, d in DAMPINGS])
def test_direction_equals_dense_solve(kind, inverter, damping):
    model, X, y = build_case(kind, "ce", n=7)
    loss_fn = nn.CrossEntropyLoss()
    average = "batch+sequence" if kind == "seq" else "batch"  # CE on sequences averages over N·T terms
    precond, grads, dirs = _one_step(model, X, y, loss_fn, inverter=inverter, damping=damping, loss_average=average)
    ref = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="empirical")
    for name, (A, G) in ref.items():
        expected = _dense_direction(A, G, grads[name], damping)
        torch.testing.assert_close(dirs[name], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type-2"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_optimizer_statistics_equal_curvlinops(kind, fisher, approx):
    """The factors the optimizer folds in on its first step are curvlinops' factors of the
    batch (for MC with the same seed)."""
    model, X, y = build_case(kind, "ce", n=6)
    loss_fn = nn.CrossEntropyLoss()
    average = "batch+sequence" if kind == "seq" else "batch"
    precond = Preconditioner(
        model,
        "kfac",
        loss_fn=loss_fn,
        fisher=fisher,
        kfac_approx=approx,
        loss_average=average,
        generator=torch.Generator().manual_seed(7),
    )
    out = model(X)
    precond.curvature_backward(out, y)
    loss_fn(out, y).backward()
    precond.step()
    ref, _ = curvlinops_factors(model, loss_fn, [(X, y)], fisher=fisher, approx=approx, seed=7)
    for name, (A, G) in ref.items():
        block = precond.blocks[name]
        torch.testing.assert_close(block.A.to_dense(), A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(block.G.to_dense(), G, rtol=1e-10, atol=1e-13)


def test_empirical_fisher_with_sum_and_sequence_averages():
    """``loss_average`` maps the user's loss normalisation to the empirical G exactly."""
    model, X, y = build_case("seq", "ce", n=5)
    for reduction, average in (("sum", None), ("mean", "batch+sequence")):
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        precond = Preconditioner(model, "kfac", loss_average=average)
        model.zero_grad()
        loss_fn(model(X), y).backward()
        precond.step()
        ref = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="empirical")
        for name, (A, G) in ref.items():
            torch.testing.assert_close(precond.blocks[name].G.to_dense(), G, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(precond.blocks[name].A.to_dense(), A, rtol=1e-10, atol=1e-13)


def test_ema_follows_martens_grosse_schedule():
    """k-th update uses decay min(1 - 1/k, rho): the first batch initialises, later batches mix."""
    model, X, y = build_case("mlp", "ce", n=12)
    loss_fn = nn.CrossEntropyLoss()
    precond = Preconditioner(model, "kfac", ema_decay=0.3)
    batches = [(X[:6], y[:6]), (X[6:], y[6:]), (X[3:9], y[3:9])]
    for xb, yb in batches:
        model.zero_grad()
        loss_fn(model(xb), yb).backward()
        precond.step()
    # recompute with the recorded inputs: the first layer's A depends only on the data
    A_ref = None
    for k, (xb, _) in enumerate(batches, start=1):
        xb1 = torch.cat([xb, torch.ones(xb.shape[0], 1, dtype=xb.dtype)], 1)
        A = xb1.T @ xb1 / xb.shape[0]
        decay = min(1 - 1 / k, 0.3)
        A_ref = A if A_ref is None else decay * A_ref + (1 - decay) * A
    torch.testing.assert_close(precond.blocks["0"].A.to_dense(), A_ref, rtol=1e-12, atol=1e-14)


def test_huge_damping_gives_the_scaled_gradient():
    model, X, y = build_case("cnn", "ce", n=6)
    lam = 1e14
    for inverter, damping in (("cholesky", PiDamping(value=lam)), ("eigh", ExactDamping(value=lam))):
        _, grads, dirs = _one_step(model, X, y, nn.CrossEntropyLoss(), inverter=inverter, damping=damping)
        for name in grads:
            scale = float(grads[name].abs().max())
            torch.testing.assert_close(dirs[name] * lam, grads[name], rtol=1e-6, atol=1e-8 * scale)


def test_diagonal_structure_equals_dense_solve_with_diagonal_factors():
    model, X, y = build_case("mlp", "ce", n=8)
    loss_fn = nn.CrossEntropyLoss()
    damping = PiDamping(value=0.05)
    _, grads, dirs = _one_step(model, X, y, loss_fn, structure="diagonal", damping=damping)
    for name, (A, G) in curvkit.kronecker_factors(model, loss_fn, X, y, fisher="empirical").items():
        expected = _dense_direction(torch.diag(A.diagonal()), torch.diag(G.diagonal()), grads[name], damping)
        torch.testing.assert_close(dirs[name], expected, rtol=1e-9, atol=1e-12)


def test_deep_linear_network_expand_is_exact_ggn_for_one_datum():
    """K-FAC-expand is exact for a deep linear network with MSE on one datum (Eschenhagen et al.
    2023): with exact damping λ, the direction equals the dense (GGN + λI)⁻¹ g per layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    X, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    lam = 0.1
    _, grads, dirs = _one_step(model, X, y, loss_fn, fisher="type-2", inverter="eigh", damping=ExactDamping(value=lam))
    from curvlinops import GGNLinearOperator

    params = list(model.parameters())
    ggn = GGNLinearOperator(model, loss_fn, params, [(X, y)], check_deterministic=False) @ torch.eye(
        sum(p.numel() for p in params), dtype=torch.float64
    )
    # layer 0 block: weight (4x3) then bias (4); reorder to our [W b] row-major layout
    idx0 = [r * 3 + c if c < 3 else 12 + r for r in range(4) for c in range(4)]
    block = ggn[idx0][:, idx0]
    expected = torch.linalg.solve(block + lam * torch.eye(16, dtype=torch.float64), grads["0"].reshape(-1))
    torch.testing.assert_close(dirs["0"].reshape(-1), expected, rtol=1e-9, atol=1e-12)
