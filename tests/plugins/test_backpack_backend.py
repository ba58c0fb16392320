"""The ``backpack`` statistics backend (bundled plugin ``curvkit_backpack``).

References: curvlinops' ``KFACLinearOperator`` (bias folded into ``A``) for type-2 on
Linear and Conv2d, curvkit's ``hooks`` backend for Conv1d/Conv3d (curvlinops lacks them),
and the type-2 factors as the expectation of the MC estimate.
"""

from __future__ import annotations

import copy
from importlib.metadata import entry_points

import _reference
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import curvkit

backpack = pytest.importorskip("backpack")
curvkit_backpack = pytest.importorskip("curvkit_backpack")

DT = torch.float64
RTOL = 1e-6


@pytest.fixture(scope="module")
def registry():
    """Core components plus this plugin only (other bundled plugins stay out)."""
    return curvkit.build_registry(autoload=False, plugins=[("backpack", curvkit_backpack)])


# --- models and data ------------------------------------------------------------------


def mlp(d_out: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, d_out)).to(
        DT
    )


def cnn2d(d_out: int = 3) -> nn.Sequential:
    """Input ``(N, 2, 13, 13)``: stride, padding, dilation, pooling, no-bias conv."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ZeroPad2d(1),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, dilation=2, bias=False),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4, d_out),
    ).to(DT)


def make_data(kind: str, loss: str, n: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d_out = 1 if loss == "bce" else 3
    torch.manual_seed(seed)
    model = mlp(d_out) if kind == "mlp" else cnn2d(d_out)
    shape = (n, 5) if kind == "mlp" else (n, 2, 13, 13)
    X = torch.randn(*shape, generator=gen, dtype=DT)
    if loss == "ce":
        y = torch.randint(0, d_out, (n,), generator=gen)
    elif loss == "mse":
        y = torch.randn(n, d_out, generator=gen, dtype=DT)
    else:
        y = torch.randint(0, 2, (n, d_out), generator=gen).to(DT)
    return model, X, y


def make_loss(loss: str, reduction: str = "mean") -> nn.Module:
    return {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss](reduction=reduction)


def curvlinops_factors(model, loss_fn, X, y, approx):
    """curvlinops' type-2 factors of one batch (the shared reference helper)."""
    return _reference.curvlinops_factors(model, loss_fn, [(X, y)], fisher="type-2", approx=approx)[0]


def factors(model, loss_fn, X, y, registry, backend="backpack", **kwargs):
    kwargs.setdefault("fisher", "type-2")
    return curvkit.kronecker_factors(model, loss_fn, X, y, backend=backend, registry=registry, **kwargs)


def assert_factors_close(ours, ref, rtol=RTOL):
    assert set(ours) == set(ref)
    for name, (a_ref, g_ref) in ref.items():
        a, g = ours[name]
        for what, x, x_ref in (("A", a, a_ref), ("G", g, g_ref)):
            scale = float(x_ref.abs().max())
            assert_close(x, x_ref, rtol=rtol, atol=rtol * scale, msg=f"{what} of {name!r}")


def rel_err(ours, ref) -> float:
    return max(float((ours[n].G - ref[n].G).norm() / ref[n].G.norm()) for n in ref)


# --- registration and capabilities ----------------------------------------------------


def test_registered_through_entry_point(clean_plugin_env):
    eps = {ep.name: ep.value for ep in entry_points(group="curvkit")}
    assert eps.get("backpack") == "curvkit_backpack"
    others = [name for name in eps if name != "backpack"]
    reg = curvkit.build_registry(autoload=True, block=others)
    assert isinstance(reg.backends.get("backpack"), curvkit_backpack.BackpackBackend)
    assert reg.backends.plugin_of("backpack") == "backpack"


def test_capabilities_are_declared(registry):
    caps = registry.backends.get("backpack").capabilities
    assert caps.fisher_types == {curvkit.FisherType.MC, curvkit.FisherType.TYPE2}
    assert caps.approximations == set(curvkit.KFACApprox)
    assert set(caps.module_types) == {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d}
    assert set(caps.losses) == {nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss}
    assert caps.reductions == {"mean", "sum"}


# --- exact type-2 ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_type2_mlp_matches_curvlinops(loss, reduction, registry):
    model, X, y = make_data("mlp", loss)
    loss_fn = make_loss(loss, reduction)
    for approx in ("expand", "reduce"):  # identical without weight sharing
        ours = factors(model, loss_fn, X, y, registry, kfac_approx=approx)
        assert_factors_close(ours, curvlinops_factors(model, loss_fn, X, y, approx))
    assert ours["0"].A.shape == (6, 6) and ours["2"].A.shape == (6, 6)  # bias folded / none


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_type2_cnn_reduce_matches_curvlinops(loss, reduction, registry):
    model, X, y = make_data("cnn", loss, n=5)
    loss_fn = make_loss(loss, reduction)
    ours = factors(model, loss_fn, X, y, registry, kfac_approx="reduce")
    assert_factors_close(ours, curvlinops_factors(model, loss_fn, X, y, "reduce"))


def test_avgpool_float64_needs_float64_default(registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    X, y = torch.randn(4, 2, 6, 6, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(curvkit.UnsupportedRequestError, match="AvgPool2d"):
        factors(model, nn.CrossEntropyLoss(), X, y, registry, kfac_approx="reduce")
    default = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        ours = factors(model, nn.CrossEntropyLoss(), X, y, registry, kfac_approx="reduce")
    finally:
        torch.set_default_dtype(default)
    assert_factors_close(ours, curvlinops_factors(model, nn.CrossEntropyLoss(), X, y, "reduce"))


def test_type2_matches_hooks_backend(registry):
    for kind, loss, approx in (("mlp", "ce", "expand"), ("cnn", "bce", "reduce")):
        model, X, y = make_data(kind, loss, n=5)
        loss_fn = make_loss(loss)
        ours = factors(model, loss_fn, X, y, registry, kfac_approx=approx)
        hooks = factors(model, loss_fn, X, y, registry, backend="hooks", kfac_approx=approx)
        assert_factors_close(ours, hooks)


def test_conv1d_conv3d_match_hooks_backend(registry):
    torch.manual_seed(1)
    cases = [
        (
            nn.Sequential(
                nn.Conv1d(2, 3, 3, padding=2, stride=2), nn.ReLU(), nn.Conv1d(3, 2, 2), nn.Flatten(), nn.Linear(10, 2)
            ),
            torch.randn(5, 2, 10, dtype=DT),
            nn.MSELoss(),
            torch.randn(5, 2, dtype=DT),
        ),
        (
            nn.Sequential(nn.Conv3d(2, 3, 2, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 4 * 4 * 4, 2)),
            torch.randn(4, 2, 3, 3, 3, dtype=DT),
            nn.CrossEntropyLoss(reduction="sum"),
            torch.randint(0, 2, (4,)),
        ),
    ]
    for model, X, loss_fn, y in cases:
        model = model.to(DT)
        ours = factors(model, loss_fn, X, y, registry, kfac_approx="reduce")
        hooks = factors(model, loss_fn, X, y, registry, backend="hooks", kfac_approx="reduce")
        assert_factors_close(ours, hooks)


def test_dropout_matches_hooks_backend_with_same_seed(registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(3)
    hooks = factors(model, loss_fn, X, y, registry, backend="hooks")
    torch.manual_seed(3)
    ours = factors(model, loss_fn, X, y, registry)
    assert_factors_close(ours, hooks)


def test_accumulate_matches_hooks_backend(registry):
    model, X, y = make_data("mlp", "ce", n=10)
    batches = [(X[:6], y[:6]), (X[6:], y[6:])]
    kw = dict(fisher="type-2", registry=registry)
    ours = curvkit.accumulate_kronecker_factors(model, nn.CrossEntropyLoss(), batches, backend="backpack", **kw)
    hooks = curvkit.accumulate_kronecker_factors(model, nn.CrossEntropyLoss(), batches, backend="hooks", **kw)
    assert_factors_close(ours, hooks)


# --- Monte Carlo ----------------------------------------------------------------------


@pytest.mark.parametrize("kind,loss", [("mlp", "ce"), ("mlp", "mse"), ("mlp", "bce"), ("cnn", "ce")])
def test_mc_converges_to_type2(kind, loss, registry):
    """MC is unbiased for type-2 (same 1/mc_samples and loss scaling as curvlinops): the
    error shrinks like 1/sqrt(mc_samples). Statistical, with fixed seeds and wide margins."""
    model, X, y = make_data(kind, loss, n=6)
    loss_fn = make_loss(loss)
    approx = "reduce" if kind == "cnn" else "expand"
    exact = factors(model, loss_fn, X, y, registry, kfac_approx=approx)

    def mean_err(mc: int) -> float:
        errs = []
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            mc_factors = factors(
                model, loss_fn, X, y, registry, fisher="mc", mc_samples=mc, generator=gen, kfac_approx=approx
            )
            for name in exact:  # A does not depend on the samples
                assert_close(mc_factors[name].A, exact[name].A, rtol=1e-12, atol=1e-14)
            errs.append(rel_err(mc_factors, exact))
        return sum(errs) / len(errs)

    small, large = mean_err(4), mean_err(3000)
    assert large < 0.06, large
    assert large < small / 5, (small, large)


def test_mc_reproducible_from_generator(registry):
    model, X, y = make_data("mlp", "ce")
    loss_fn = nn.CrossEntropyLoss()
    state = torch.get_rng_state()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return factors(model, loss_fn, X, y, registry, fisher="mc", mc_samples=2, generator=gen)

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[n].G, b[n].G) for n in a)
    assert any(not torch.equal(a[n].G, c[n].G) for n in a)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not advance"
    # Without a generator, torch.manual_seed makes the result reproducible.
    torch.manual_seed(11)
    d = factors(model, loss_fn, X, y, registry, fisher="mc")
    torch.manual_seed(11)
    e = factors(model, loss_fn, X, y, registry, fisher="mc")
    assert all(torch.equal(d[n].G, e[n].G) for n in d)


# --- refusals -------------------------------------------------------------------------


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)
        return self.b(h)


def _refusal_cases():
    X5, y3 = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    img = torch.randn(4, 2, 6, 6, dtype=DT)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 3))
    return {
        "empirical": (mlp(), nn.CrossEntropyLoss(), X5, y3, {"fisher": "empirical"}, "fisher='empirical'"),
        "conv-expand": (conv, nn.CrossEntropyLoss(), img, y3, {"kfac_approx": "expand"}, "kfac_approx='expand'"),
        "inplace-relu": (
            nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)),
            nn.CrossEntropyLoss(),
            X5,
            y3,
            {},
            "in-place",
        ),
        "linear-3d": (
            nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
            nn.MSELoss(),
            torch.randn(4, 2, 5, dtype=DT),
            torch.randn(4, 2, 3, dtype=DT),
            {},
            "not 2-D",
        ),
        "output-extra-dims": (
            nn.Sequential(nn.Conv2d(2, 3, 3)),
            nn.CrossEntropyLoss(),
            img,
            torch.randint(0, 3, (4, 4, 4)),
            {"kfac_approx": "reduce"},
            "extra dimensions",
        ),
        "functional-op": (_Functional(), nn.CrossEntropyLoss(), X5, y3, {}, "chain"),
        "inplace-op": (_InPlace(), nn.CrossEntropyLoss(), X5, y3, {}, "unmodified output"),
        "batchnorm": (
            nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
            nn.CrossEntropyLoss(),
            X5,
            y3,
            {"unsupported": "skip"},
            "BatchNorm1d",
        ),
        "bce-two-outputs": (mlp(2), nn.BCEWithLogitsLoss(), X5, torch.rand(4, 2, dtype=DT).round(), {}, "(N, 1)"),
        "bce-mc-soft-targets": (
            mlp(1),
            nn.BCEWithLogitsLoss(),
            X5,
            torch.rand(4, 1, dtype=DT),
            {"fisher": "mc"},
            "non-binary",
        ),
        "grouped-conv-skipped": (
            nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 3)),
            nn.CrossEntropyLoss(),
            img,
            y3,
            {"kfac_approx": "reduce", "unsupported": "skip"},
            "groups=2",
        ),
        "reflect-padding": (
            nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(108, 3)),
            nn.CrossEntropyLoss(),
            img,
            y3,
            {"kfac_approx": "reduce"},
            "padding_mode='reflect'",
        ),
    }


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_unsupported_request_names_hooks(case, registry):
    model, loss_fn, X, y, kwargs, fragment = _refusal_cases()[case]
    model = model.to(DT)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(curvkit.UnsupportedRequestError) as info:
        factors(model, loss_fn, X, y, registry, **kwargs)
    message = str(info.value)
    assert "'backpack' cannot serve" in message and fragment in message, message
    assert "'hooks'" in message, message
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    # ... and the hooks backend indeed serves it.
    factors(model, loss_fn, X, y, registry, backend="hooks", **kwargs)


# --- side effects ---------------------------------------------------------------------


def _backpack_traces(model: nn.Module, loss_fn: nn.Module) -> list[str]:
    found = []
    for name, p in model.named_parameters():
        found += [f"{name}.{k}" for k in ("kfac", "kflr") if hasattr(p, k)]
    for root in (model, loss_fn):
        for name, m in root.named_modules():
            found += [f"{name}.{k}" for k in ("_backpack_extend", "input0", "input1", "output") if hasattr(m, k)]
            hooks = len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
            if hooks:
                found.append(f"{name}: {hooks} hooks")
    return found


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_model_left_clean_and_trainable(kind, registry):
    from backpack.context import CTX

    model, X, y = make_data(kind, "ce", n=5)
    loss_fn = nn.CrossEntropyLoss()
    twin = copy.deepcopy(model)
    n_handles = len(CTX.hook_handles)
    sentinels = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinels, strict=True):
        p.grad = s
    for fisher, mc in (("type-2", 1), ("mc", 3)):
        factors(model, loss_fn, X, y, registry, fisher=fisher, mc_samples=mc, kfac_approx="reduce")
        assert _backpack_traces(model, loss_fn) == []
        assert len(CTX.hook_handles) == n_handles
        assert all(p.grad is s and bool((s == 7.0).all()) for p, s in zip(model.parameters(), sentinels, strict=True))

    # Ordinary training still works and gives the same gradients as an untouched copy.
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        loss_fn(m(X), y).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=0, atol=0)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert _backpack_traces(model, loss_fn) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_user_extended_model_and_saved_quantities_survive(registry):
    from backpack.context import CTX

    model, X, y = make_data("mlp", "ce")
    loss_fn = nn.CrossEntropyLoss()
    n0 = len(CTX.hook_handles)
    backpack.extend(model)
    users = CTX.hook_handles[n0:]
    hooks_before = [len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()]
    marker = object()
    model[0].weight.kflr = marker
    try:
        ours = factors(model, loss_fn, X, y, registry)
        assert model[0].weight.kflr is marker
        assert model[0]._backpack_extend is True
        assert [len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()] == hooks_before
        assert CTX.hook_handles[n0:] == users
        assert_factors_close(ours, factors(model, loss_fn, X, y, registry, backend="hooks"))
    finally:
        del model[0].weight.kflr
        for handle in users:
            handle.remove()
        CTX.hook_handles = [h for h in CTX.hook_handles if all(h is not u for u in users)]


def test_other_backends_work_on_the_same_model_after_backpack():
    """BackPACK's full backward hooks must not leave the modules marked, or ASDL's (plain)
    backward hooks are refused on the same model afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    ref = curvkit.kronecker_factors(model, loss, X, y, fisher="type-2", backend="backpack")
    after = curvkit.kronecker_factors(model, loss, X, y, fisher="type-2", backend="asdl")
    for name, (a, g) in ref.items():
        torch.testing.assert_close(after[name].A, a)
        torch.testing.assert_close(after[name].G, g)
    model[0].register_backward_hook(lambda *args: None)  # plain hooks still allowed
