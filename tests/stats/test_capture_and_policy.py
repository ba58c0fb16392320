"""Hook hygiene, weight tying, unsupported modules, argument validation, in-place and bf16."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import build_case, cnn
from _reference import assert_factors_close, relative_error
from torch import nn

import curvkit


def _assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not module._backward_hooks, f"backward hook left on {name!r}"
        assert not getattr(module, "_backward_pre_hooks", {}), f"backward pre-hook left on {name!r}"


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in forward")


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom in backward")


class RaiseInBackward(nn.Module):
    def forward(self, x):
        return _RaiseInBackward.apply(x)


def _mlp_with(middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), middle, nn.Linear(4, 2)).double()


def _data(n=5, d_in=3, classes=2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d_in, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


# --- hooks are always removed ---------------------------------------------------------


def test_hooks_removed_when_forward_raises(core_registry):
    model = _mlp_with(Boom())
    X, y = _data()
    with pytest.raises(RuntimeError, match="boom in forward"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    _assert_no_hooks(model)


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
def test_hooks_removed_when_backward_raises(fisher, core_registry):
    model = _mlp_with(RaiseInBackward())
    X, y = _data()
    with pytest.raises(RuntimeError):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher=fisher, registry=core_registry)
    _assert_no_hooks(model)
    # the model is still usable afterwards and the layers are not marked as captured
    model[1] = nn.Tanh()
    assert set(
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher=fisher, registry=core_registry)
    ) == {
        "0",
        "2",
    }


@pytest.mark.parametrize("fisher", ["empirical", "type-2", "mc"])
def test_backward_error_is_not_masked(fisher, core_registry):
    """The error raised in a backward reaches the caller unchanged, also when several
    vectors are backpropagated at once (type-2, MC with several samples)."""
    model = _mlp_with(RaiseInBackward())
    X, y = _data()
    mc = 2 if fisher == "mc" else 1
    with pytest.raises(RuntimeError, match="boom in backward"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher=fisher, mc_samples=mc, registry=core_registry
        )


class _NotVmappable(torch.autograd.Function):
    """Identity whose backward calls ``float()`` on a tensor, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        scale = float(grad.abs().max()) + 1.0
        return grad * (scale / scale)


class NotVmappable(nn.Module):
    def forward(self, x):
        return _NotVmappable.apply(x)


@pytest.mark.parametrize("fisher", ["type-2", "mc"])
def test_backward_without_vmap_rule_falls_back(fisher, core_registry):
    """An operation without a batching rule in its backward must not break several-vector
    backpropagation: the factors equal those of the same network without it."""
    torch.manual_seed(0)
    with_op = nn.Sequential(nn.Linear(3, 4), NotVmappable(), nn.Tanh(), nn.Linear(4, 2)).double()
    without = nn.Sequential(with_op[0], nn.Tanh(), with_op[3])
    X, y = _data()
    mc = 3 if fisher == "mc" else 1

    def run(model):
        gen = torch.Generator().manual_seed(1) if fisher == "mc" else None
        return curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher=fisher, mc_samples=mc, generator=gen, registry=core_registry
        )

    ref = run(without)
    out = run(with_op)
    assert_factors_close({"0": out["0"], "3": out["3"]}, {"0": tuple(ref["0"]), "3": tuple(ref["2"])}, rtol=1e-10)
    _assert_no_hooks(with_op)


def test_hooks_removed_when_backward_raises_on_inplace_path(core_registry):
    """The slow path (outputs modified in place) installs tensor hooks in a second forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), RaiseInBackward(), nn.Linear(4, 2)).double()
    X, y = _data()
    with pytest.raises(RuntimeError):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    _assert_no_hooks(model)


def test_hooks_removed_when_loss_vectors_fail(core_registry):
    """Targets that do not fit the output make the vector construction raise after the forward."""
    model = _mlp_with(nn.Tanh())
    X = torch.randn(5, 3, dtype=torch.float64)
    bad_targets = torch.randn(5, 7, dtype=torch.float64)
    with pytest.raises(curvkit.UnsupportedRequestError, match=r"\(5, 2\).*\(5, 7\)"):
        curvkit.kronecker_factors(model, nn.MSELoss(), X, bad_targets, fisher="empirical", registry=core_registry)
    _assert_no_hooks(model)
    out_of_range = torch.full((5,), 9)
    with pytest.raises((IndexError, RuntimeError)):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, out_of_range, fisher="empirical", registry=core_registry
        )
    _assert_no_hooks(model)


def test_hooks_removed_after_success(core_registry):
    model, X, y = build_case("cnn", "ce", n=3)
    curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    _assert_no_hooks(model)


def test_user_hooks_are_preserved(core_registry):
    model = _mlp_with(nn.Tanh())
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    X, y = _data()
    curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    assert len(model[0]._forward_hooks) == 1 and calls
    handle.remove()


# --- weight tying -----------------------------------------------------------------------


class _TwiceModel(nn.Module):
    """``head(tanh(lin(x₀)) + tanh(lin(x₁)))``: one Linear used twice in a forward."""

    def __init__(self, lin, head):
        super().__init__()
        self.lin, self.head = lin, head

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x[:, 0])) + torch.tanh(self.lin(x[:, 1])))


class _SequenceModel(nn.Module):
    """The same function with one use of ``lin`` on a length-2 sequence (R = 2)."""

    def __init__(self, lin, head):
        super().__init__()
        self.lin, self.head = lin, head

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).sum(1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_module_used_twice_equals_its_sequence_form(fisher, approx, core_registry):
    """The uses of a module in one forward are positions of the weight-sharing axis: the
    factors equal those of the same weight applied once to the stacked inputs, which equal
    curvlinops' (Eschenhagen et al.'s expand and reduce)."""
    from _reference import curvlinops_factors

    torch.manual_seed(0)
    lin, head = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    X, y = torch.randn(5, 2, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    twice = curvkit.kronecker_factors(
        _TwiceModel(lin, head), loss_fn, X, y, fisher=fisher, kfac_approx=approx, registry=core_registry
    )
    seq = _SequenceModel(lin, head)
    once = curvkit.kronecker_factors(seq, loss_fn, X, y, fisher=fisher, kfac_approx=approx, registry=core_registry)
    ref, _ = curvlinops_factors(seq, loss_fn, [(X, y)], fisher=fisher, approx=approx)
    assert_factors_close({k: tuple(v) for k, v in twice.items()}, {k: tuple(v) for k, v in once.items()}, rtol=1e-12)
    assert_factors_close({k: tuple(v) for k, v in twice.items()}, ref, rtol=1e-10)


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
def test_module_used_twice_in_the_optimizer(fisher):
    """The optimizer's statistics of a module called twice equal kronecker_factors' (not
    the uses concatenated as if they were 2N data)."""
    torch.manual_seed(0)
    lin, head = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    model = _TwiceModel(lin, head)
    X, y = torch.randn(5, 2, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    want = curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher)
    opt = curvkit.optim.KFAC(model, lr=0.0, loss_fn=loss_fn, fisher=fisher, ema_decay=0.0)
    out = model(X)
    opt.curvature_backward(out, y)
    loss_fn(out, y).backward()
    opt.step()
    for name in ("lin", "head"):
        block = opt.preconditioner.blocks[name]
        torch.testing.assert_close(block.A.to_dense(), want[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(block.G.to_dense(), want[name].G, rtol=1e-12, atol=1e-14)


def test_shared_weight_between_modules_is_one_block(core_registry):
    """Two Linear modules sharing weight and bias (ALBERT-style shared layers) are one
    block with two sites, equal to one module called twice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model[2].weight, model[2].bias = model[0].weight, model[0].bias
    X, y = _data()
    tied = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    assert set(tied) == {"0", "4"}

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = model[0], model[4]

        def forward(self, x):
            return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))

    reused = curvkit.kronecker_factors(Reused(), nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    assert_factors_close({"0": tuple(tied["0"])}, {"0": tuple(reused["a"])}, rtol=1e-12)
    _assert_no_hooks(model)


def test_shared_weight_without_shared_bias_raises(core_registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model[2].weight = model[0].weight
    X, y = _data()
    with pytest.raises(curvkit.WeightTyingError, match=r"'0'.*'2'.*bias"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    _assert_no_hooks(model)


def test_shared_bias_parameter_raises(core_registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2)).double()
    model[2].bias = model[0].bias
    X, y = _data()
    with pytest.raises(curvkit.WeightTyingError):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="empirical", registry=core_registry)


# --- unsupported modules ----------------------------------------------------------------


@pytest.fixture(params=["prelu", "embedding_bag"])
def model_with_unsupported(request):
    torch.manual_seed(0)
    if request.param == "prelu":
        model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)).double()
        X = torch.randn(5, 3, dtype=torch.float64)
        return model, X, "PReLU"
    model = nn.Sequential(nn.EmbeddingBag(6, 4, mode="mean"), nn.Linear(4, 2)).double()
    X = torch.randint(0, 6, (5, 3))
    return model, X, "EmbeddingBag"


def _expected_tracked(model):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_unsupported_error(model_with_unsupported, core_registry):
    model, X, type_name = model_with_unsupported
    y = torch.randint(0, 2, (5,))
    with pytest.raises(curvkit.UnsupportedModuleError, match=rf"'\d'.*{type_name}.*unsupported='warn'"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="type-2", unsupported="error", registry=core_registry
        )


def test_unsupported_default_is_warn_everywhere(model_with_unsupported, core_registry):
    """One policy with one default ("warn") in kronecker_factors, the optimizers and Laplace."""
    import inspect

    from curvkit.laplace import KroneckerCurvature
    from curvkit.methods import MethodConfig

    model, X, type_name = model_with_unsupported
    y = torch.randint(0, 2, (5,))
    with pytest.warns(UserWarning, match=type_name):
        out = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    assert set(out) == _expected_tracked(model)
    defaults = {
        "kronecker_factors": inspect.signature(curvkit.kronecker_factors).parameters["unsupported"].default,
        "accumulate": inspect.signature(curvkit.accumulate_kronecker_factors).parameters["unsupported"].default,
        "from_data": inspect.signature(KroneckerCurvature.from_data).parameters["unsupported"].default,
        "from_factors": inspect.signature(KroneckerCurvature.from_factors).parameters["unsupported"].default,
        "optimizers": MethodConfig.__dataclass_fields__["unsupported"].default,
    }
    assert {curvkit.UnsupportedPolicy(v) for v in defaults.values()} == {curvkit.UnsupportedPolicy.WARN}, defaults


def test_unsupported_warn(model_with_unsupported, core_registry):
    model, X, type_name = model_with_unsupported
    y = torch.randint(0, 2, (5,))
    with pytest.warns(UserWarning, match=type_name):
        out = curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="type-2", unsupported="warn", registry=core_registry
        )
    assert set(out) == _expected_tracked(model)


def test_unsupported_skip(model_with_unsupported, core_registry):
    model, X, _ = model_with_unsupported
    y = torch.randint(0, 2, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = curvkit.kronecker_factors(
            model,
            nn.CrossEntropyLoss(),
            X,
            y,
            fisher="type-2",
            unsupported=curvkit.UnsupportedPolicy.SKIP,
            registry=core_registry,
        )
    assert set(out) == _expected_tracked(model)


def test_frozen_unsupported_module_is_ignored(core_registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)).double()
    model[1].requires_grad_(False)
    X, y = _data()
    out = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    assert set(out) == {"0", "2"}


def test_bad_unsupported_policy(core_registry):
    model = _mlp_with(nn.Tanh())
    X, y = _data()
    with pytest.raises(ValueError, match="'error'.*'warn'.*'skip'"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="type-2", unsupported="ignore", registry=core_registry
        )


# --- argument validation --------------------------------------------------------------


@pytest.fixture
def simple():
    model = _mlp_with(nn.Tanh())
    X, y = _data()
    return model, X, y


def test_bogus_fisher(simple, core_registry):
    model, X, y = simple
    with pytest.raises(ValueError, match=r"bogus.*'empirical'.*'mc'.*'type-2'"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="bogus", registry=core_registry)


def test_bogus_kfac_approx(simple, core_registry):
    model, X, y = simple
    with pytest.raises(ValueError, match=r"'expand'.*'reduce'"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="type-2", kfac_approx="middle", registry=core_registry
        )


def test_fisher_accepts_enum_and_case(simple, core_registry):
    model, X, y = simple
    a = curvkit.kronecker_factors(
        model, nn.CrossEntropyLoss(), X, y, fisher=curvkit.FisherType.TYPE2, registry=core_registry
    )
    b = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="Type-2", registry=core_registry)
    torch.testing.assert_close(a["0"].G, b["0"].G)


@pytest.mark.parametrize("mc_samples", [0, -1, 1.5, True])
def test_bad_mc_samples(simple, mc_samples, core_registry):
    model, X, y = simple
    with pytest.raises(ValueError, match="mc_samples"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="mc", mc_samples=mc_samples, registry=core_registry
        )


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_mc_samples_with_other_fisher(simple, fisher, core_registry):
    model, X, y = simple
    with pytest.raises(ValueError, match="mc_samples=2"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher=fisher, mc_samples=2, registry=core_registry
        )


def test_unsupported_loss(simple, core_registry):
    model, X, _ = simple
    y = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(curvkit.UnsupportedRequestError, match="L1Loss"):
        curvkit.kronecker_factors(model, nn.L1Loss(), X, y, fisher="type-2", registry=core_registry)


@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.MSELoss])
def test_reduction_none(simple, loss_cls, core_registry):
    model, X, y = simple
    if loss_cls is nn.MSELoss:
        y = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(curvkit.UnsupportedRequestError, match="reduction='none'"):
        curvkit.kronecker_factors(model, loss_cls(reduction="none"), X, y, fisher="type-2", registry=core_registry)


def test_loss_options_that_change_likelihood(simple, core_registry):
    model, X, y = simple
    for loss_fn in [
        nn.CrossEntropyLoss(weight=torch.ones(2, dtype=torch.float64)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
    ]:
        with pytest.raises(curvkit.UnsupportedRequestError):
            curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2", registry=core_registry)


def test_cross_entropy_probability_targets_refused(simple, core_registry):
    model, X, _ = simple
    probs = torch.softmax(torch.randn(5, 2, dtype=torch.float64), dim=1)
    with pytest.raises(curvkit.UnsupportedRequestError, match="class"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, probs, fisher="type-2", registry=core_registry)
    _assert_no_hooks(model)


def test_cross_entropy_ignore_index_in_targets_refused(simple, core_registry):
    model, X, y = simple
    y = y.clone()
    y[1] = -100
    with pytest.raises(curvkit.UnsupportedRequestError, match="ignore_index"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="empirical", registry=core_registry)
    y[1] = 1
    out = curvkit.kronecker_factors(
        model, nn.CrossEntropyLoss(ignore_index=-100), X, y, fisher="empirical", registry=core_registry
    )
    assert set(out) == {"0", "2"}


def test_unknown_backend(simple, core_registry):
    model, X, y = simple
    with pytest.raises(curvkit.UnknownComponentError, match=r"'nope'.*'hooks'") as info:
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="type-2", backend="nope", registry=core_registry
        )
    assert isinstance(info.value, KeyError)
    assert "'hooks'" in str(info.value)


def test_batch_size_mismatch(simple, core_registry):
    model, X, y = simple
    with pytest.raises(ValueError, match="batch"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y[:3], fisher="type-2", registry=core_registry)


def test_bad_generator(simple, core_registry):
    model, X, y = simple
    with pytest.raises(TypeError, match="generator"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="mc", generator=0, registry=core_registry)


def test_mc_without_generator_follows_manual_seed(simple, core_registry):
    model, X, y = simple
    torch.manual_seed(123)
    a = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="mc", registry=core_registry)
    torch.manual_seed(123)
    b = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="mc", registry=core_registry)
    torch.testing.assert_close(a["2"].G, b["2"].G, rtol=0, atol=0)


# --- in-place activations ---------------------------------------------------------------


def _inplace_pair():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    inplace = nn.Sequential(
        nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)
    ).double()
    inplace.load_state_dict(plain.state_dict())
    return plain, inplace


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("fisher", ["empirical", "mc", "type-2"])
def test_inplace_activation_same_factors(fisher, loss, core_registry):
    plain, inplace = _inplace_pair()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (6,), generator=gen)
    else:
        loss_fn, y = nn.MSELoss(reduction="sum"), torch.randn(6, 3, dtype=torch.float64, generator=gen)
    mc = 3 if fisher == "mc" else 1

    def run(model):
        g = torch.Generator().manual_seed(4) if fisher == "mc" else None
        return curvkit.kronecker_factors(
            model, loss_fn, X, y, fisher=fisher, mc_samples=mc, generator=g, registry=core_registry
        )

    ref = run(plain)
    out = run(inplace)
    assert_factors_close(out, {k: tuple(v) for k, v in ref.items()}, rtol=1e-10)
    _assert_no_hooks(inplace)


def test_inplace_cnn_same_as_non_inplace(core_registry):
    model = cnn()
    plain = cnn()
    plain.load_state_dict(model.state_dict())
    plain[1] = nn.ReLU()
    assert model[1].inplace
    X = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    for approx in ["expand", "reduce"]:
        a = curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="type-2", kfac_approx=approx, registry=core_registry
        )
        b = curvkit.kronecker_factors(
            plain, nn.CrossEntropyLoss(), X, y, fisher="type-2", kfac_approx=approx, registry=core_registry
        )
        assert_factors_close(a, {k: tuple(v) for k, v in b.items()}, rtol=1e-10)


# --- low precision ----------------------------------------------------------------------


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_bfloat16_close_to_float32(fisher, core_registry):
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    model16 = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    model16.load_state_dict(model32.state_dict())
    model16 = model16.to(torch.bfloat16)
    X = torch.randn(64, 8)
    y = torch.randint(0, 5, (64,))
    loss_fn = nn.CrossEntropyLoss()
    f32 = curvkit.kronecker_factors(model32, loss_fn, X, y, fisher=fisher, registry=core_registry)
    f16 = curvkit.kronecker_factors(model16, loss_fn, X.to(torch.bfloat16), y, fisher=fisher, registry=core_registry)
    assert set(f16) == set(f32) == {"0", "2"}
    for name in f32:
        for got, want in zip(f16[name], f32[name], strict=True):
            assert got.dtype == torch.bfloat16
            assert torch.isfinite(got).all()
            err = relative_error(got.float(), want)
            assert err < 2e-2, (name, err)


class _CallScaled(nn.Module):
    """Scales by ``1 + (number of calls so far)``: a stand-in for a random forward (dropout)."""

    def __init__(self, calls: int = 0) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, x):
        self.calls += 1
        return x * (1 + self.calls)


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_inplace_activation_needs_one_forward(fisher):
    """An in-place activation after a layer (its recorded output is overwritten) needs no
    second forward: the tensor hooks put on each output when it is produced see its
    gradient before the change. One forward (a random one, like dropout, stays
    consistent), and the factors equal those of the out-of-place model."""
    torch.manual_seed(0)
    first, last = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    inplace = nn.Sequential(first, nn.ReLU(inplace=True), _CallScaled(), last)
    reference = nn.Sequential(first, nn.ReLU(), _CallScaled(), last)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    registry = curvkit.build_registry(autoload=False)
    got = curvkit.kronecker_factors(inplace, nn.CrossEntropyLoss(), X, y, fisher=fisher, registry=registry)
    want = curvkit.kronecker_factors(reference, nn.CrossEntropyLoss(), X, y, fisher=fisher, registry=registry)
    assert inplace[2].calls == 1
    for name in ("0", "3"):
        torch.testing.assert_close(got[name].A, want[name].A)
        torch.testing.assert_close(got[name].G, want[name].G)
