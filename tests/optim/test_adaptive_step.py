"""The adaptive step size and momentum (``adaptive_step=``, :mod:`curvkit.optim.adaptive`):
the solved (α, μ) against the dense float64 minimiser of the quadratic model, the guarded
fallback, checkpoints, and a training run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvkit.optim.optimizer as optimizer_module
from curvkit.blocks import CurvatureBlock
from curvkit.errors import ConfigError
from curvkit.optim import CurvatureOptimizer, available_methods, create
from curvkit.optim.adaptive import solve_coefficients
from curvkit.optim.layers import layer_matrix


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def _step(model, opt, i):
    X, y = _batch(i)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()


class _Spy:
    """Records the directions the optimizer hands to the adaptive update (per-layer clips applied)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = optimizer_module.adaptive_update

        def spy(opt, params, direction, groups, scales=None):
            scales = scales or {}
            self.calls.append({i: d.detach() * scales.get(i, 1.0) for i, d in direction.items()})
            return real(opt, params, direction, groups, scales)

        monkeypatch.setattr(optimizer_module, "adaptive_update", spy)


def _dense_model(opt, model, direction, previous, wd, mode, momentum=None):
    """The dense float64 minimiser of M(αΔ + μδ) = ∇ᵀ(·) + ½(·)ᵀ(C + (λ + γ) I)(·), with C
    the block-diagonal curvature from each block's dense operator, and Δ, δ, ∇ laid out in
    the blocks' matrix form. Returns (α, μ) — μ fixed to ``momentum`` when given."""
    pre = opt.preconditioner
    lam = pre.damping_value
    blocks, d_parts, v_parts, g_parts = [], [], [], []
    for name, layer in pre.layers.items():
        w, b = layer.weight_ref.param, layer.bias_ref.param

        def mat(t, layer=layer, w=w, b=b):
            return layer_matrix(layer, t[id(w)], t[id(b)]).reshape(-1)

        grads = {id(p): p.grad + (wd * p.detach() if mode != "decoupled" else 0) for p in (w, b)}
        dirs = {id(p): direction[id(p)] + (wd * p.detach() if mode == "after" else 0) for p in (w, b)}
        blocks.append(pre.blocks[name].as_operator().to_dense().double())
        d_parts.append(mat(dirs))
        v_parts.append(mat(previous))
        g_parts.append(mat(grads))
    C = torch.block_diag(*blocks)
    n = C.shape[0]
    shift = lam + (wd if mode != "decoupled" else 0.0)
    M = C + shift * torch.eye(n, dtype=torch.float64)
    D, V, G = torch.cat(d_parts), torch.cat(v_parts), torch.cat(g_parts)

    def model_change(c):
        step = c[0] * D + c[1] * V
        return G @ step + 0.5 * step @ (M @ step)

    if momentum is not None:  # 1-D in α, μ fixed: minimise along α by the exact quadratic in α
        f = lambda a: model_change(torch.stack([a, torch.tensor(momentum, dtype=torch.float64)]))  # noqa: E731
        zero = torch.zeros((), dtype=torch.float64)
        slope = torch.func.grad(f)(zero)
        curv = torch.func.hessian(f)(zero)
        return float(-slope / curv), momentum
    zero = torch.zeros(2, dtype=torch.float64)
    grad = torch.func.grad(model_change)(zero)
    hess = torch.func.hessian(model_change)(zero)
    c = torch.linalg.solve(hess, -grad)
    return float(c[0]), float(c[1])


@pytest.mark.parametrize(
    "method,mode,options",
    [
        ("kfac", "after", {}),
        ("kfac", "before", {"T_stats": 2}),
        ("ekfac", "decoupled", {}),
        ("kfac", "after", {"grad_ratio_clip": 0.5}),  # the per-layer clip shapes Δ first
    ],
)
def test_solved_coefficients_are_the_dense_minimiser(monkeypatch, method, mode, options):
    """The step taken is αΔ + μδ_prev with (α, μ) the dense minimiser of the 2-D model."""
    spy = _Spy(monkeypatch)
    model = _model()
    wd = 1e-2
    opt = CurvatureOptimizer(
        model,
        method=method,
        lr=0.1,
        momentum=0.5,
        weight_decay=wd,
        weight_decay_mode=mode,
        kl_clip=None,
        adaptive_step="lr-momentum",
        **{"grad_ratio_clip": None, **options},
    )
    for i in range(3):
        _step(model, opt, i)
    params = {id(p): p for p in model.parameters()}
    previous = {i: opt.state[p]["previous_update"].clone() for i, p in params.items()}
    before = {i: p.detach().clone() for i, p in params.items()}
    X, y = _batch(3)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    grads = {i: p.grad.clone() for i, p in params.items()}
    opt.step()
    direction = spy.calls[-1]
    # the dense model at the step's point (parameters and gradients before the update)
    after = {i: p.detach().clone() for i, p in params.items()}
    with torch.no_grad():
        for i, p in params.items():
            p.copy_(before[i])
            p.grad = grads[i]
    alpha, mu = _dense_model(opt, model, direction, previous, wd, mode)
    assert opt.preconditioner.counters.get("adaptive_fallbacks", 0) == 0
    assert alpha < 0  # a descent step along -Δ
    for i in params:
        d = direction[i] + (wd * before[i] if mode == "after" else 0)
        expected = before[i] + alpha * d + mu * previous[i]
        if mode == "decoupled":
            expected = expected - 0.1 * wd * before[i]
        torch.testing.assert_close(after[i], expected, rtol=1e-9, atol=1e-12)
    assert opt.preconditioner.counters["last_adaptive_lr"] == pytest.approx(-alpha, rel=1e-9)
    assert opt.preconditioner.counters["last_adaptive_momentum"] == pytest.approx(mu, rel=1e-9)


def test_lr_mode_solves_alpha_with_the_groups_momentum(monkeypatch):
    spy = _Spy(monkeypatch)
    model = _model()
    opt = CurvatureOptimizer(
        model, method="kfac", lr=0.1, momentum=0.3, kl_clip=None, grad_ratio_clip=None, adaptive_step="lr"
    )
    for i in range(3):
        _step(model, opt, i)
    params = {id(p): p for p in model.parameters()}
    previous = {i: opt.state[p]["previous_update"].clone() for i, p in params.items()}
    before = {i: p.detach().clone() for i, p in params.items()}
    X, y = _batch(3)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    grads = {i: p.grad.clone() for i, p in params.items()}
    opt.step()
    after = {i: p.detach().clone() for i, p in params.items()}
    with torch.no_grad():
        for i, p in params.items():
            p.copy_(before[i])
            p.grad = grads[i]
    alpha, mu = _dense_model(opt, model, spy.calls[-1], previous, 0.0, "after", momentum=0.3)
    fallbacks = opt.preconditioner.counters.get("adaptive_fallbacks", 0)
    for i in params:
        if fallbacks:  # the model was not a descent: the plain step
            expected = before[i] - 0.1 * spy.calls[-1][i] + 0.3 * previous[i]
        else:
            expected = before[i] + alpha * spy.calls[-1][i] + mu * previous[i]
        torch.testing.assert_close(after[i], expected, rtol=1e-9, atol=1e-12)


def test_solve_coefficients_small_cases():
    K = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.25], dtype=torch.float64)
    a, m, change = solve_coefficients(K, b)
    c = torch.linalg.solve(K, -b)
    assert (a, m) == pytest.approx((float(c[0]), float(c[1])))
    assert change == pytest.approx(float(b @ c + 0.5 * c @ K @ c)) and change < 0
    # no previous step: the 1-D α = -∇ᵀΔ / Δᵀ(C + λ)Δ
    assert solve_coefficients(K[:1, :1], b[:1])[:2] == pytest.approx((0.5, 0.0))
    # δ_prev parallel to Δ: singular, the 1-D minimiser along Δ
    Ks = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    assert solve_coefficients(Ks, torch.tensor([-1.0, -2.0], dtype=torch.float64))[:2] == pytest.approx((1.0, 0.0))
    # a zero direction: no model (the caller falls back)
    assert all(math.isnan(v) for v in solve_coefficients(torch.zeros(1, 1), torch.zeros(1)))


def test_zero_direction_falls_back_to_the_plain_step_and_counts_it():
    model = _model()
    opt = CurvatureOptimizer(model, method="kfac", lr=0.1, momentum=0.5, kl_clip=None, adaptive_step="lr-momentum")
    for i in range(2):
        _step(model, opt, i)
    previous = {p: opt.state[p]["previous_update"].clone() for p in model.parameters()}
    before = {p: p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient: Δ = 0, no model
    opt.step()
    assert opt.preconditioner.counters["adaptive_fallbacks"] == 1
    for p in model.parameters():  # the plain step -ηΔ + μδ_prev = μδ_prev
        torch.testing.assert_close(p.detach(), before[p] + 0.5 * previous[p])
    assert "1 fell back to the fixed lr" in opt.summary()


def test_nonfinite_model_falls_back_and_keeps_parameters_finite(monkeypatch):
    model = _model()
    opt = CurvatureOptimizer(model, method="kfac", lr=0.1, momentum=0.0, kl_clip=None, adaptive_step="lr-momentum")
    _step(model, opt, 0)
    monkeypatch.setattr(CurvatureBlock, "gram", lambda self, ds: torch.full((len(ds), len(ds)), math.inf))
    before = {p: p.detach().clone() for p in model.parameters()}
    X, y = _batch(1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    assert opt.preconditioner.counters["adaptive_fallbacks"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(p.detach(), before[p]) for p in model.parameters())  # the plain step moved them


def test_kl_clip_bounds_the_steps_curvature_norm(monkeypatch):
    spy = _Spy(monkeypatch)
    model = _model()
    opt = CurvatureOptimizer(
        model, method="kfac", lr=0.1, kl_clip=1e-6, grad_ratio_clip=None, adaptive_step="lr-momentum"
    )
    _step(model, opt, 0)
    pre = opt.preconditioner
    assert pre.counters["last_adaptive_clip"] < 1
    total = 0.0
    for name, layer in pre.layers.items():
        w, b = layer.weight_ref.param, layer.bias_ref.param
        step = layer_matrix(layer, opt.state[w]["previous_update"], opt.state[b]["previous_update"])
        total += pre.blocks[name].quadratic(step)
    assert total == pytest.approx(1e-6, rel=1e-6)
    assert spy.calls


def test_state_dict_round_trip_keeps_the_previous_step():
    model = _model()
    opt = CurvatureOptimizer(model, method="kfac", lr=0.1, momentum=0.5, adaptive_step="lr-momentum")
    for i in range(3):
        _step(model, opt, i)
    twin = copy.deepcopy(model)
    opt2 = CurvatureOptimizer(twin, method="kfac", lr=0.1, momentum=0.5, adaptive_step="lr-momentum")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all("previous_update" in opt2.state[p] for p in twin.parameters())
    for i in range(3, 5):
        _step(model, opt, i)
        _step(twin, opt2, i)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt2.preconditioner.counters["adaptive_steps"] == 5


def test_gram_by_polarisation_equals_the_operator():
    """A block that overrides only ``quadratic`` (the unit-wise block) gets ``gram`` by
    polarisation; it equals the dense operator's Gram."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()
    opt = CurvatureOptimizer(model, method="kfac", lr=0.1)
    X = torch.randn(10, 4, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), torch.randint(0, 2, (10,))).backward()
    opt.step()
    block = opt.preconditioner.blocks["1"]
    assert type(block).quadratic is not CurvatureBlock.quadratic
    a, b = torch.randn(2, 6, 2, dtype=torch.float64)
    dense = block.as_operator().to_dense()
    x = torch.stack([a.reshape(-1), b.reshape(-1)])
    torch.testing.assert_close(block.gram([a, b]), x @ dense @ x.t())
    assert block.bilinear(a, b) == pytest.approx(float(a.reshape(-1) @ dense @ b.reshape(-1)))


def test_bad_adaptive_step_is_refused():
    with pytest.raises(ConfigError, match="adaptive_step='yes'.*'lr-momentum'"):
        CurvatureOptimizer(_model(), method="kfac", adaptive_step="yes")


def test_with_levenberg_marquardt_damping():
    from curvkit.linalg import LevenbergMarquardtDamping

    model = _model()
    opt = CurvatureOptimizer(
        model, method="kfac", damping=LevenbergMarquardtDamping(initial=1.0, every=1), adaptive_step="lr-momentum"
    )
    X, y = _batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    first = float(closure())
    for _ in range(5):
        opt.step(closure)
    assert float(closure()) < first
    assert math.isfinite(opt.preconditioner.counters["last_reduction_ratio"])


def test_digits_training_reaches_the_fixed_lr_band():
    """A short digits run: the adaptive step reaches the accuracy band of the recommended
    fixed-lr settings (and T_stats > 1 amortisation works with it)."""
    from _digits import digits_accuracy

    fixed = digits_accuracy("kfac", lr=0.03, momentum=0.9, epochs=3)
    adaptive = digits_accuracy("kfac", lr=0.03, momentum=0.9, epochs=3, adaptive_step="lr-momentum", T_stats=2)
    assert fixed > 0.85
    assert adaptive > fixed - 0.04, (adaptive, fixed)


def test_exact_damping_gives_the_models_global_minimiser():
    """EKFAC with exact damping preconditions by (C + λI)⁻¹ itself, so -Δ is the model's
    global minimiser: the plane's minimiser is α = -1, μ = 0."""
    model = _model()
    opt = CurvatureOptimizer(
        model, method="ekfac", lr=0.1, momentum=0.5, kl_clip=None, grad_ratio_clip=None, adaptive_step="lr-momentum"
    )
    for i in range(4):
        _step(model, opt, i)
    counters = opt.preconditioner.counters
    assert counters["last_adaptive_lr"] == pytest.approx(1.0, rel=1e-8)
    assert counters["last_adaptive_momentum"] == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_takes_adaptive_steps(method):
    """Every registered method's blocks serve the model (``gram``): four finite steps, none
    falling back, on its recommended settings."""
    model = _model()
    opt = create(method, model, adaptive_step="lr-momentum", loss_fn=nn.CrossEntropyLoss())
    for i in range(4):
        X, y = _batch(i)
        opt.zero_grad()
        out = model(X)
        opt.curvature_backward(out, y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    counters = opt.preconditioner.counters
    assert counters["adaptive_steps"] == 4 and counters.get("adaptive_fallbacks", 0) == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_bf16_parameters_take_the_compensated_step_with_decoupled_decay():
    """The adaptive step goes through the compensated (Kahan) update of 16-bit parameters:
    θ + carried error = θ_old + δ − ηγθ_old, to float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).bfloat16()
    opt = CurvatureOptimizer(
        model, method="kfac", lr=0.1, weight_decay=0.05, weight_decay_mode="decoupled", adaptive_step="lr-momentum"
    )
    X, y = _batch(0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X.bfloat16()).float(), y).backward()
    before = {p: p.detach().float() for p in model.parameters()}
    opt.step()
    for p in model.parameters():
        st = opt.state[p]
        got = p.detach().float() + st["kahan_comp"].float()
        expected = before[p] + st["previous_update"].float() - 0.1 * 0.05 * before[p]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
