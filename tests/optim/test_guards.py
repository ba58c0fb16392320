"""Robust by default: recommended settings everywhere, the guard on every write, trust
regions, outlier gates, divergence warnings, checkpoints and parameter checks."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import curvkit
import curvkit.optim.guards as guards_module
from curvkit.errors import ConfigError
from curvkit.optim import KFAC, CurvatureOptimizer, Preconditioner, create
from curvkit.optim.monitor import DivergenceWarning

REGISTRY = curvkit.default_registry()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model, opt, X, y):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(X), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, model):
    return all(torch.equal(x, p.detach()) for x, p in zip(a, model.parameters()))


# --- recommended settings: one set of defaults ------------------------------------------------


@pytest.mark.parametrize("name", REGISTRY.methods.names())
def test_named_class_create_and_generic_optimizer_share_the_defaults(name):
    spec = REGISTRY.methods.get(name)
    classes = [c for c in _optimizer_classes() if getattr(c, "method", None) == name]
    built = [create(name, _model()), CurvatureOptimizer(_model(), method=name)] + [c(_model()) for c in classes]
    first = built[0]
    settings = spec.recommended_settings()
    assert first.defaults["lr"] == settings["lr"] and first.defaults["momentum"] == settings["momentum"]
    assert any(v is not None for v in (first.kl_clip, first.rms_clip, first.grad_ratio_clip)), "no trust region"
    for opt in built[1:]:
        assert opt.defaults == first.defaults
        assert (opt.kl_clip, opt.rms_clip, opt.grad_ratio_clip) == (
            first.kl_clip,
            first.rms_clip,
            first.grad_ratio_clip,
        )
        assert opt.config == first.config
    assert Preconditioner(_model(), name).config == first.config  # the method options too


def _optimizer_classes():
    todo, out = list(CurvatureOptimizer.__subclasses__()), []
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        out.append(cls)
    return out


def test_recommended_false_is_the_raw_method():
    opt = KFAC(_model(), recommended=False)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["momentum"] == 0.0
    assert (opt.kl_clip, opt.rms_clip, opt.grad_ratio_clip) == (None, None, None)
    assert opt.config.damping.value == 1e-3  # KFACConfig's own default
    assert KFAC(_model(), damping=0.5).config.damping.value == 0.5  # a given option wins


def test_a_stray_recommended_key_is_refused_by_name():
    import dataclasses

    spec = dataclasses.replace(REGISTRY.methods.get("kfac"), recommended={"dampnig": 0.1})
    with pytest.raises(ConfigError, match="'dampnig'.*MethodSpec.recommended"):
        CurvatureOptimizer(_model(), method=spec)


# --- the guard --------------------------------------------------------------------------------


def test_nonfinite_direction_skips_the_step_and_leaves_everything_byte_identical():
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    _step(model, opt, X[:16], y[:16])
    params, state = _params(model), copy.deepcopy(opt.state_dict())
    block = opt.preconditioner.blocks["0"]
    original = block.precondition
    block.precondition = lambda g: original(g) * float("inf")  # a block that overflows
    _step(model, opt, X[16:32], y[16:32])
    block.precondition = original
    assert _same(params, model)
    assert opt.preconditioner.counters["nonfinite_directions"] == 1
    assert opt.preconditioner.counters["skipped_steps"] == 1
    assert opt.preconditioner.steps == 1  # the counter did not advance
    after = opt.state_dict()
    assert torch.equal(after["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


def test_an_overflowing_update_is_refused_before_anything_is_written():
    """A finite direction and a finite (huge) learning rate whose update θ − ηm would overflow
    float32: nothing is written, the step is reverted (counter, step-time state) and counted."""
    X, y = _data()
    model = _model()
    opt = KFAC(model, kl_clip=None, grad_ratio_clip=None)
    _step(model, opt, X[:16], y[:16])
    params = _params(model)
    saved_buf = opt.state[model[0].weight]["momentum_buffer"].clone()
    opt.param_groups[0]["lr"] = 1e45  # finite in float64, not in the parameters' float32
    _step(model, opt, X[16:32], y[16:32])
    assert _same(params, model)
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], saved_buf)
    assert opt.preconditioner.counters["nonfinite_updates"] == 1 and opt.preconditioner.steps == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
def test_hyperparameters_set_at_step_time_are_refused(key, bad):
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    _step(model, opt, X[:16], y[:16])
    scheduler.step()
    params, state = _params(model), copy.deepcopy(opt.state_dict())
    opt.param_groups[0][key] = bad
    with pytest.raises(ConfigError, match=f"(?s)scheduler.*param_groups\\[0\\].{key}="):
        _step(model, opt, X[16:32], y[16:32])
    assert _same(params, model)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


def test_a_nonfinite_clip_is_refused_at_step_time():
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    opt.kl_clip = float("nan")
    with pytest.raises(ConfigError, match="kl_clip=nan"):
        _step(model, opt, X[:16], y[:16])


def test_step_without_gradients_does_nothing():
    model = _model()
    opt = KFAC(model)
    params = _params(model)
    opt.step()
    model(torch.randn(4, 5))  # a forward without backward
    opt.step()
    assert _same(params, model) and opt.preconditioner.steps == 0
    assert opt.preconditioner.counters["empty_steps"] == 2


def test_params_of_another_model_are_refused():
    model, other = _model(), _model()
    with pytest.raises(ValueError, match="not parameters of the model"):
        KFAC(model, other.parameters())
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        KFAC(model, [{"params": list(model.parameters())}, {"params": [nn.Parameter(torch.zeros(2))]}])


# --- trust region -----------------------------------------------------------------------------


def test_grad_ratio_clip_bounds_every_layer_relative_to_its_gradient():
    """Tiny damping makes K-FAC's direction ≫ the gradient; the clip caps ‖Δ_l‖ at c‖∇_l‖ (one
    step from zero momentum, so the step is lr·Δ)."""
    X, y = _data()
    for clip in (None, 3.0):
        model = _model()
        opt = KFAC(model, damping=1e-8, kl_clip=None, grad_ratio_clip=clip, momentum=0.0, lr=1.0)
        before = _params(model)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[:16]), y[:16]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for layer in (0, 1):  # (weight, bias) pairs of the two Linear layers
            step = torch.cat(
                [(before[2 * layer + i] - p.detach()).flatten() for i, p in enumerate(model[2 * layer].parameters())]
            )
            grad = torch.cat([grads[2 * layer + i].flatten() for i in range(2)])
            ratio = float(step.norm() / grad.norm())
            if clip is None:
                assert ratio > 10  # the raw direction: orders of magnitude larger
            else:
                assert ratio <= clip * (1 + 1e-5)


def test_summary_shows_trust_region_counters_and_monitor():
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    _step(model, opt, X[:16], y[:16])
    text = opt.summary()
    assert "trust region: KL clip κ=0.01, per-layer ‖Δ‖ ≤ 100‖∇‖" in text
    assert "guards: 1 steps taken, 0 skipped" in text and "divergence warnings: none" in text


# --- outliers ---------------------------------------------------------------------------------


def test_an_outlier_gradient_is_skipped_and_a_persistent_level_accepted(monkeypatch):
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    for i in range(4):
        _step(model, opt, X[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    params = _params(model)
    _step(model, opt, X[:8] * 1e6, y[:8])
    assert _same(params, model) and opt.preconditioner.counters["outlier_gradients"] == 1
    # OUTLIER_PATIENCE outliers in a row are a new level: the third is taken
    for _ in range(guards_module.OUTLIER_PATIENCE - 1):
        _step(model, opt, X[:8] * 1e6, y[:8])
    assert opt.preconditioner.counters["outlier_gradients"] == guards_module.OUTLIER_PATIENCE - 1
    assert opt.preconditioner.counters["accepted_outlier_levels"] >= 1
    assert not _same(params, model)


def test_an_outlier_statistics_batch_is_skipped(monkeypatch):
    """With the gradient gate off, a batch whose inputs are 1e4× larger reaches the statistics
    gate: its update is skipped (all layers) and counted; the factors are unchanged."""
    monkeypatch.setattr(guards_module, "GRADIENT_OUTLIER_RATIO", math.inf)
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    for i in range(4):
        _step(model, opt, X[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    factors = {n: b.A.to_dense().clone() for n, b in opt.preconditioner.blocks.items()}
    _step(model, opt, X[:8] * 1e4, y[:8])
    assert opt.preconditioner.counters["outlier_stat_updates"] == 1
    for n, b in opt.preconditioner.blocks.items():
        assert torch.equal(b.A.to_dense(), factors[n])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_all_zero_batch_is_not_an_outlier_and_does_not_make_later_ones_outliers():
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    _step(model, opt, torch.zeros(8, 5), y[:8])
    for i in range(4):
        _step(model, opt, X[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    c = opt.preconditioner.counters
    assert c["outlier_stat_updates"] == 0 and c["outlier_gradients"] == 0 and c["skipped_steps"] == 0


def test_singd_factor_step_is_bounded():
    """An outlier batch straight into SINGD's update (gates off): K grows by at most
    (1 + max_factor_step) instead of blowing up."""
    from curvkit_singd.singd import SINGDBlock

    def grown(bound):
        model = _model()
        opt = create("singd", model, max_factor_step=bound)
        X, y = _data()
        _step(model, opt, X[:8], y[:8])
        block = opt.preconditioner.blocks["0"]
        assert isinstance(block, SINGDBlock)
        before = float(torch.linalg.matrix_norm(block.K.to_dense(), 2))
        stats = opt.preconditioner  # feed the block one outlier batch directly
        from curvkit.blocks import LayerStats

        layer = stats.layers["0"]
        big = LayerStats(layer, X[:8] * 1e3, [torch.randn(8, 8) * 1e3], stats.config.kfac_approx, 8.0)
        block.update(big, 0.0)
        return float(torch.linalg.matrix_norm(block.K.to_dense(), 2)) / before, block.bounded_steps

    raw, _ = grown(None)
    bounded, count = grown(0.5)
    assert raw > 10 and count >= 1
    assert bounded <= 1.5 * (1 + 1e-4)


# --- divergence detection -------------------------------------------------------------------


def test_a_run_whose_steps_are_all_skipped_warns_once():
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    with pytest.warns(
        DivergenceWarning, match="steps .* were all skipped .*non-finite gradients.*lower the learning rate"
    ):
        for _ in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:8]), y[:8]).backward()
            model[0].weight.grad[0, 0] = float("nan")
            opt.step()
    assert opt.monitor.state["warnings"] == ["skipped"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)  # once only
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:8]), y[:8]).backward()
            model[0].weight.grad[0, 0] = float("nan")
            opt.step()
    assert "divergence warnings: skipped" in opt.summary()


def test_a_diverging_run_warns():
    """No trust region, a huge learning rate: the run diverges (the parameters explode, or
    the guards skip every step) and the warning says what to change."""
    X, y = _data()
    model = _model()
    opt = KFAC(model, lr=1e4, damping=1e-3, kl_clip=None, grad_ratio_clip=None, momentum=0.9)
    with pytest.warns(DivergenceWarning, match="(?i)lower the learning rate"):
        for i in range(30):
            _step(model, opt, X[8 * (i % 6) : 8 * (i % 6) + 8], y[8 * (i % 6) : 8 * (i % 6) + 8])


def test_a_closure_loss_that_explodes_warns():
    model = _model()
    opt = KFAC(model)
    losses = iter([1.0, 0.5, 2e3])
    with pytest.warns(DivergenceWarning, match="loss grew to 2000"):
        for _ in range(3):
            opt.step(lambda: torch.tensor(next(losses)))


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_of_other_widths_is_refused_naming_layer_and_shapes():
    X, y = _data()
    small, wide = _model(), nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    a, b = KFAC(small), KFAC(wide)
    _step(small, a, X[:8], y[:8])
    _step(wide, b, X[:8], y[:8])
    state = copy.deepcopy(a.state_dict())
    with pytest.raises(
        ValueError, match=r"layer '0': the checkpoint's matrix form is \[12, 6\].*this model's is \[8, 6\]"
    ):
        a.load_state_dict(b.state_dict())
    assert torch.equal(a.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


def test_momentum_of_other_shapes_is_refused_naming_the_parameter():
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    _step(model, opt, X[:8], y[:8])
    state = opt.state_dict()
    state["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"parameter '0.weight': saved momentum_buffer has shape \[3, 3\]"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("name", ["q-kldwrm", "b-kfac-c", "singd", "skfac"])
def test_state_dict_holds_tensors_and_plain_values_only(name):
    X, y = _data()
    model = _model()
    opt = create(name, model, loss_fn=nn.CrossEntropyLoss())
    for i in range(3):
        _step(model, opt, X[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = create(name, _model(), loss_fn=nn.CrossEntropyLoss())
    fresh.load_state_dict(loaded)


def test_old_checkpoints_without_the_new_entries_still_load():
    X, y = _data()
    model = _model()
    opt = KFAC(model)
    _step(model, opt, X[:8], y[:8])
    state = opt.state_dict()
    state.pop("curvkit_monitor")
    for key in ("layer_shapes", "outlier_gates"):
        state["curvkit"].pop(key)
    state["curvkit"]["counters"] = {"skipped_steps": 0, "skipped_stat_updates": 0}
    KFAC(_model()).load_state_dict(state)
