"""CurvatureOptimizer and Preconditioner behaviour: torch.optim conventions, step rules,
skipping, fallbacks, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvkit
from curvkit.linalg import ExactDamping, LevenbergMarquardtDamping, PiDamping
from curvkit.optim import KFAC, CurvatureOptimizer, Preconditioner, create


def _model(norm: bool = False) -> nn.Module:
    """An MLP; ``norm=True`` adds a module no handler serves (``PReLU``, a trainable slope)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 8), nn.Tanh()]
    if norm:
        layers.append(nn.PReLU(8))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).double()


def _data(n: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _run(model, opt, X, y, steps, scheduler=None, curvature=False):
    loss_fn = nn.CrossEntropyLoss()
    for i in range(steps):
        xb, yb = X[(i * 8) % 24 :][:8], y[(i * 8) % 24 :][:8]
        opt.zero_grad()
        out = model(xb)
        loss = loss_fn(out, yb)
        if curvature:
            opt.curvature_backward(out, yb)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _groups(model, lr_scale=1.0):
    first, last = model[0], model[-1]
    return [
        {"params": list(first.parameters()), "lr": 0.1 * lr_scale, "weight_decay": 0.01},
        {"params": list(last.parameters()), "lr": 0.05 * lr_scale, "momentum": 0.5},
    ]


def test_identity_curvature_reproduces_sgd_exactly():
    """Param groups, momentum, weight decay and an LR scheduler: bit-identical to SGD."""
    X, y = _data()
    ref = _model()
    ours = copy.deepcopy(ref)
    sgd = torch.optim.SGD(_groups(ref), lr=0.1, momentum=0.9)
    opt = KFAC(ours, _groups(ours), lr=0.1, momentum=0.9, inverter="identity")
    _run(ref, sgd, X, y, 9, torch.optim.lr_scheduler.StepLR(sgd, 3, gamma=0.5))
    _run(ours, opt, X, y, 9, torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5))
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_preconditioner_composes_with_torch_sgd():
    """Preconditioner + torch.optim.SGD takes the same steps as the KFAC optimizer."""
    X, y = _data()
    m1, m2 = _model(), _model()
    opt = KFAC(m1, lr=0.05, momentum=0.9, weight_decay=1e-3, damping=0.1, T_inv=2)
    precond = Preconditioner(m2, "kfac", damping=0.1, T_inv=2)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    _run(m1, opt, X, y, 5)
    for i in range(5):
        xb, yb = X[(i * 8) % 24 :][:8], y[(i * 8) % 24 :][:8]
        sgd.zero_grad()
        loss_fn(m2(xb), yb).backward()
        precond.step()
        sgd.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_weight_decay_before_is_preconditioned():
    X, y = _data()
    m1, m2 = _model(), _model()
    opt = KFAC(m1, lr=0.05, weight_decay=0.1, weight_decay_mode="before", damping=0.1)
    _run(m1, opt, X, y, 1)
    precond = Preconditioner(m2, "kfac", damping=0.1)
    nn.CrossEntropyLoss()(m2(X[:8]), y[:8]).backward()
    precond.step(weight_decay=0.1)
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(p.grad, alpha=-0.05)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_decoupled_weight_decay_matches_adamw_style_shrink():
    X, y = _data()
    ref, ours = _model(), _model()
    opt = KFAC(ours, lr=0.1, weight_decay=0.2, weight_decay_mode="decoupled", inverter="identity")
    _run(ours, opt, X, y, 1)
    loss = nn.CrossEntropyLoss()(ref(X[:8]), y[:8])
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1 - 0.1 * 0.2).add_(p.grad, alpha=-0.1)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_kl_clip_scales_the_step():
    X, y = _data()
    ref, ours = _model(), _model()
    kappa, lr = 1e-6, 0.5
    opt = KFAC(ours, lr=lr, kl_clip=kappa, inverter="identity")
    _run(ours, opt, X, y, 1)
    nn.CrossEntropyLoss()(ref(X[:8]), y[:8]).backward()
    sq = sum(float((p.grad**2).sum()) for p in ref.parameters())
    nu = min(1.0, math.sqrt(kappa / (lr**2 * sq)))
    assert nu < 1
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(p.grad * nu, alpha=-lr)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_rms_clip_bounds_each_layer():
    X, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = KFAC(model, lr=1.0, rms_clip=1e-4, damping=1e-3)
    _run(model, opt, X, y, 1)
    w0, b0 = model[0].weight - before[0], model[0].bias - before[1]
    step = torch.cat([w0.reshape(8, -1), b0.reshape(-1, 1)], 1)
    assert float(step.norm()) / math.sqrt(step.numel()) <= 1e-4 * (1 + 1e-9)


def test_unsupported_module_gets_a_first_order_update():
    X, y = _data()
    model = _model(norm=True)
    norm = model[2]
    before = [p.detach().clone() for p in norm.parameters()]
    with pytest.warns(UserWarning, match="PReLU"):
        opt = KFAC(model, lr=0.1, damping=0.1)
    assert "first-order" in opt.summary()
    model.zero_grad()
    nn.CrossEntropyLoss()(model(X[:8]), y[:8]).backward()
    grads = [p.grad.clone() for p in norm.parameters()]
    opt.step()
    for p, b, g in zip(norm.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=1e-14, atol=0)


def test_unsupported_error_policy_refuses():
    with pytest.raises(curvkit.UnsupportedModuleError, match="PReLU"):
        KFAC(_model(norm=True), unsupported="error")


def test_nonfinite_statistic_skips_the_update_but_not_the_step():
    X, y = _data()
    model = _model()
    opt = KFAC(model, lr=0.05, damping=0.1)
    _run(model, opt, X, y, 2)
    blocks = copy.deepcopy({n: b.state_dict() for n, b in opt.preconditioner.blocks.items()})
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(X[:8]), y[:8]).backward()
    opt.preconditioner.engine.uses["0"][0].record.inputs[0, 0] = float("nan")  # a corrupted statistic
    opt.step()
    assert opt.preconditioner.counters["skipped_stat_updates"] == 1
    for name, state in blocks.items():
        new = opt.preconditioner.blocks[name].state_dict()
        assert torch.equal(state["A"]["matrix"], new["A"]["matrix"])
        assert torch.equal(state["G"]["matrix"], new["G"]["matrix"])
    assert any(not torch.equal(a, b) for a, b in zip(params, model.parameters()))  # the step itself was taken


def test_nonfinite_fallback_gradient_skips_the_step():
    X, y = _data()
    model = _model(norm=True)
    with pytest.warns(UserWarning):
        opt = KFAC(model, lr=0.05, damping=0.1, momentum=0.9)
    _run(model, opt, X, y, 2)
    params = [p.detach().clone() for p in model.parameters()]
    steps = opt.preconditioner.steps
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(X[:8]), y[:8]).backward()
    model[2].weight.grad[0] = float("inf")
    opt.step()
    assert opt.preconditioner.steps == steps and opt.preconditioner.counters["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_mc_and_type2_need_the_extra_call():
    X, y = _data()
    model = _model()
    opt = KFAC(model, fisher="type-2", loss_fn=nn.CrossEntropyLoss())
    nn.CrossEntropyLoss()(model(X[:8]), y[:8]).backward()
    with pytest.raises(RuntimeError, match="curvature_backward"):
        opt.step()
    with pytest.raises(ValueError, match="loss_fn"):
        KFAC(model, fisher="mc")


@pytest.mark.parametrize("own_generator", [True, False])
def test_resume_is_bit_exact_with_mc_and_stale_inverses(own_generator):
    X, y = _data()

    def fresh():
        m = _model()
        return m, KFAC(
            m,
            lr=0.05,
            momentum=0.9,
            fisher="mc",
            loss_fn=nn.CrossEntropyLoss(),
            T_inv=3,
            T_stats=2,
            damping=0.1,
            generator=torch.Generator().manual_seed(5) if own_generator else None,
        )

    m1, o1 = fresh()
    _run(m1, o1, X, y, 4, curvature=True)
    saved = copy.deepcopy((m1.state_dict(), o1.state_dict()))
    _run(m1, o1, X, y, 5, curvature=True)
    m2, o2 = fresh()
    m2.load_state_dict(saved[0])
    o2.load_state_dict(saved[1])
    _run(m2, o2, X, y, 5, curvature=True)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_bad_options_are_all_reported():
    with pytest.raises(curvkit.ConfigError) as info:
        KFAC(_model(), lr=-1, momentum=1.5, ema_decay=2.0, T_inv=0, fisher="nope")
    message = str(info.value)
    for name in ("lr=-1", "momentum=1.5"):
        assert name in message
    with pytest.raises(curvkit.ConfigError) as info:
        KFAC(_model(), ema_decay=2.0, T_inv=0, fisher="nope", damping=-3.0)
    message = str(info.value)
    for name in ("ema_decay=2.0", "T_inv=0", "fisher='nope'", "value=-3.0", "[0.0, 1.0)"):
        assert name in message, message


def test_incompatible_pair_names_working_pairs():
    with pytest.raises(curvkit.IncompatibleComponentsError, match="'eigh' with eigenbasis or factored"):
        KFAC(_model(), damping=ExactDamping(value=1e-3), inverter="cholesky")


def test_unknown_method_lists_registered():
    with pytest.raises(curvkit.UnknownComponentError, match="'kfac'"):
        create("kfca", _model())


def test_split_weight_and_bias_groups_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="weight and bias"):
        KFAC(model, [model[0].weight, model[2].weight, model[2].bias])


def test_model_must_come_first():
    model = _model()
    with pytest.raises(TypeError, match="nn.Module"):
        CurvatureOptimizer(model.parameters(), method="kfac")


def test_levenberg_marquardt_adapts_lambda():
    """With a tiny step the quadratic model is accurate (ρ ≈ 1 > 3/4): λ shrinks by ω."""
    X, y = _data()
    model = _model()
    damping = LevenbergMarquardtDamping(initial=1.0, every=1)
    opt = KFAC(model, lr=1e-6, damping=damping)
    loss_fn = nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X[:8]), y[:8])
        loss.backward()
        return loss

    opt.step(closure)
    rho = opt.preconditioner.counters["last_reduction_ratio"]
    assert abs(rho - 1) < 1e-3
    assert opt.preconditioner.damping_value == pytest.approx((19 / 20) ** 1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_levenberg_marquardt_raises_lambda_after_a_bad_step():
    X, y = _data()
    model = _model()
    opt = KFAC(model, lr=50.0, damping=LevenbergMarquardtDamping(initial=1e-3, every=1))
    loss_fn = nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X[:8]), y[:8])
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.preconditioner.counters["last_reduction_ratio"] < 0.25
    assert opt.preconditioner.damping_value == pytest.approx(1e-3 / (19 / 20))


def test_failed_decomposition_keeps_last_good_inverse():
    X, y = _data()
    model = _model()
    opt = KFAC(model, lr=0.05, damping=PiDamping(value=0.1), T_inv=1)
    _run(model, opt, X, y, 2)
    block = opt.preconditioner.blocks["0"]
    good = {k: v.clone() for k, v in block.inverse.tensors().items()}
    block.A.matrix.fill_(float("nan"))  # a factor a decomposition cannot handle
    block.refresh(opt.preconditioner.damping, opt.preconditioner.damping_value)
    assert block.inverse_failures == 1
    assert all(torch.equal(good[k], v) for k, v in block.inverse.tensors().items())


def test_state_bytes_counts_factors_inverses_and_momentum():
    X, y = _data()
    model = _model()
    opt = KFAC(model, lr=0.05, momentum=0.9, damping=0.1)
    _run(model, opt, X, y, 1)
    params = sum(p.numel() for p in model.parameters())
    factors = 2 * (6 * 6 + 8 * 8) + 2 * (9 * 9 + 3 * 3)  # A, G and their inverses
    assert opt.state_bytes() == 8 * (factors + params)


@pytest.mark.parametrize("inverter", ["cholesky", "eigh"])
def test_bf16_factors_upcast_their_decompositions(inverter):
    """bf16 parameters and factors: the decompositions run in float32, nothing non-finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(torch.bfloat16)
    X, y = torch.randn(32, 8, dtype=torch.bfloat16), torch.randint(0, 3, (32,))
    opt = KFAC(model, lr=0.3, damping=0.1, inverter=inverter, T_inv=1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    block = opt.preconditioner.blocks["0"]
    assert block.A.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in block.inverse.tensors().values() if t.numel())
    assert opt.preconditioner.counters == {"skipped_steps": 0, "skipped_stat_updates": 0}
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]


def test_forward_inside_torch_func_transforms_is_not_recorded():
    """Per-example gradients with vmap(grad(...)) between steps do not disturb the statistics."""
    from torch.func import functional_call, grad, vmap

    model = nn.Sequential(nn.Linear(3, 2))
    precond = Preconditioner(model, "kfac")
    X, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    nn.functional.cross_entropy(model(X), y).backward()

    def f(p, x, t):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    vmap(grad(f), in_dims=(None, 0, 0))({k: v.detach() for k, v in model.named_parameters()}, X, y)
    assert precond.step()
    assert not precond.engine.records and precond.blocks["0"].num_updates == 1


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
def test_a_step_does_not_keep_the_graph_alive(fisher):
    """The hooks' records are released: the layer outputs (and their graph) of a finished
    step are freed, so memory does not grow step after step."""
    import gc
    import weakref

    X, y = _data()
    model = _model()
    opt = KFAC(model, lr=0.05, damping=0.1, fisher=fisher, loss_fn=nn.CrossEntropyLoss())
    seen = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(weakref.ref(out)))
    for _i in range(3):
        opt.zero_grad()
        out = model(X[:8])
        loss = nn.functional.cross_entropy(out, y[:8])
        opt.curvature_backward(out, y[:8])
        loss.backward()
        opt.step()
    del out, loss
    gc.collect()
    assert all(ref() is None for ref in seen)


def test_blocks_are_told_each_groups_learning_rate():
    """Blocks whose recursions need the step size get their group's lr before each step
    (schedulers included)."""
    model = _model()
    opt = KFAC(model, _groups(model), damping=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    seen: dict[str, list[float]] = {}
    for name, block in opt.preconditioner.blocks.items():
        block.set_step_size = lambda lr, name=name: seen.setdefault(name, []).append(lr)  # type: ignore[method-assign]
    X, y = _data()
    _run(model, opt, X, y, 2, scheduler)
    assert seen == {"0": [0.1, 0.05], "2": [0.05, 0.025]}


@pytest.mark.parametrize(("method", "period"), [("kfac", "T_stats"), ("singd", "T"), ("rs-kfac", "T_stats")])
def test_layer_without_statistics_takes_a_first_order_step(method, period):
    """A tracked branch that runs only on steps without statistics (T_stats=5) is moved by
    Δ = ∇ until it has statistics — never frozen — and summary() says so."""

    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(5, 8)
            self.a = nn.Linear(8, 3)
            self.b = nn.Linear(8, 3)

        def forward(self, x, use_b=False):
            h = torch.tanh(self.trunk(x))
            return (self.b if use_b else self.a)(h)

    torch.manual_seed(0)
    model = Branching().double()
    X, y = _data()
    opt = create(method, model, lr=0.1, momentum=0.0, **{period: 5})
    assert "no statistics yet" in opt.summary()
    with pytest.warns(UserWarning, match="'b'"):
        for i in range(3):  # step 0 collects statistics (branch a); steps 1, 2 run branch b
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(X[:8], use_b=i > 0), y[:8]).backward()
            before = model.b.weight.detach().clone()
            grad = model.b.weight.grad.clone() if model.b.weight.grad is not None else None
            opt.step()
            if i > 0:
                assert grad is not None
                torch.testing.assert_close(model.b.weight.detach(), before - 0.1 * grad, rtol=1e-13, atol=0)
    lines = {line.split(":")[0].strip(): line for line in opt.summary().splitlines()[1:]}
    assert "no statistics yet" in lines["b"] and "no statistics yet" not in lines["a"]
