"""The bundled ``asdl`` statistics backend (plugin ``curvkit_asdl``).

Every combination the backend claims is checked against curvlinops'
``KFACLinearOperator(separate_weight_and_bias=False)`` and against curvkit's own
``hooks`` backend; requests it does not claim must be refused naming ``hooks``; and the
model must come back exactly as it was.
"""

from __future__ import annotations

import _reference
import pytest
import torch
from curvkit_asdl import AsdlBackend
from torch import nn

import curvkit
from curvkit.config import FisherType, KFACApprox

DTYPE = torch.float64
N = 6
C = 3


# --- fixtures -----------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, C))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, C),
    )


def _seq() -> nn.Module:
    """A Linear on 3-D inputs ``(N, 5, 4)``: five positions share its weight."""
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5, C))


MODELS = {
    "mlp": (_mlp, (5,)),
    "cnn": (_cnn, (2, 8, 8)),
    "seq": (_seq, (5, 4)),
}


def _problem(model_name: str, loss: str, reduction: str, seed: int = 0):
    torch.manual_seed(seed)
    make, in_shape = MODELS[model_name]
    model = make().to(DTYPE)
    X = torch.randn(N, *in_shape, dtype=DTYPE)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, C, (N,))
    elif loss == "mse":
        loss_fn, y = nn.MSELoss(reduction=reduction), torch.randn(N, C, dtype=DTYPE)
    else:
        loss_fn, y = nn.BCEWithLogitsLoss(reduction=reduction), torch.rand(N, C, dtype=DTYPE).round()
    return model, loss_fn, X, y


def _curvlinops(model, loss_fn, data, fisher: str, mc_samples: int = 1):
    """curvlinops' factors as ``({name: A}, {name: G})`` (the shared reference helper)."""
    factors, _ = _reference.curvlinops_factors(model, loss_fn, data, fisher=fisher, mc_samples=mc_samples)
    return {n: a for n, (a, _) in factors.items()}, {n: g for n, (_, g) in factors.items()}


def _close(actual, expected, rtol: float = 1e-6) -> None:
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- registration -----------------------------------------------------------------------


def test_registered_through_entry_point():
    registry = curvkit.default_registry()
    assert "asdl" in list(registry.backends)
    backend = registry.backends.get("asdl")
    assert isinstance(backend, AsdlBackend)
    caps = backend.capabilities
    assert caps.fisher_types == frozenset(FisherType)
    assert caps.approximations == frozenset({KFACApprox.EXPAND})
    assert caps.module_types == (nn.Linear, nn.Conv2d)


# --- exactness ------------------------------------------------------------------------------

CLAIMED = [
    (model, loss, reduction, fisher)
    for model in MODELS
    for loss in ("ce", "mse", "bce")
    for reduction in ("mean", "sum")
    for fisher in ("empirical", "type-2")
    if not (loss == "bce" and fisher != "empirical")
]


@pytest.mark.parametrize("model_name, loss, reduction, fisher", CLAIMED)
def test_matches_curvlinops_and_hooks(model_name, loss, reduction, fisher):
    model, loss_fn, X, y = _problem(model_name, loss, reduction)
    factors = curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher, backend="asdl")
    hooks = curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher, backend="hooks")
    A, G = _curvlinops(model, loss_fn, [(X, y)], fisher)

    assert sorted(factors) == sorted(A) == sorted(hooks)
    for name, (a, g) in factors.items():
        assert a.dtype == g.dtype == DTYPE
        _close(a, A[name])
        _close(g, G[name])
        _close(a, hooks[name].A)
        _close(g, hooks[name].G)
    # the bias is folded in as the last row/column of A
    first = model[0]
    assert factors["0"].A.shape[0] == first.weight[0].numel() + 1


def test_accumulated_over_batches_matches_curvlinops():
    model, loss_fn, X, y = _problem("cnn", "ce", "mean")
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    factors = curvkit.accumulate_kronecker_factors(model, loss_fn, data, fisher="type-2", backend="asdl")
    A, G = _curvlinops(model, loss_fn, data, "type-2")
    for name, (a, g) in factors.items():
        _close(a, A[name])
        _close(g, G[name])


def test_inplace_activation_frozen_bias_and_skipped_module():
    torch.manual_seed(1)
    # a frozen BatchNorm1d (a module type ASDL knows, left out of the plan) and a PReLU (no
    # handler: skipped)
    model = nn.Sequential(
        nn.Linear(5, 4),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(4),
        nn.PReLU(4),
        nn.Linear(4, 4),
        nn.ReLU(),
        nn.Linear(4, C),
    ).to(DTYPE)
    model[2].requires_grad_(False)
    model[4].bias.requires_grad_(False)
    X, y = torch.randn(N, 5, dtype=DTYPE), torch.randint(0, C, (N,))
    kwargs = dict(fisher="type-2", unsupported="skip")
    factors = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, backend="asdl", **kwargs)
    hooks = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, backend="hooks", **kwargs)
    assert sorted(factors) == sorted(hooks) == ["0", "4", "6"]
    assert factors["4"].A.shape == (4, 4)  # frozen bias: not folded in
    for name, (a, g) in factors.items():
        _close(a, hooks[name].A)
        _close(g, hooks[name].G)
    assert not any("asdl" in k or "fisher" in k for m in model.modules() for k in vars(m))


# --- Monte Carlo ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mc_converges_to_type2(loss):
    # Statistical: the relative error of an M-sample estimate shrinks like 1/sqrt(M); the
    # bounds leave a wide margin but are not certain to hold for every seed.
    model, loss_fn, X, y = _problem("mlp", loss, "mean")
    exact = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2", backend="asdl")
    errors = {}
    for m in (1, 2000):
        gen = torch.Generator().manual_seed(0)
        mc = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="mc", mc_samples=m, generator=gen, backend="asdl")
        for name in exact:
            torch.testing.assert_close(mc[name].A, exact[name].A)  # A does not depend on the samples
        errors[m] = max(_rel(mc[name].G, exact[name].G) for name in exact)
    assert errors[2000] < 0.1
    assert errors[2000] < errors[1]


def test_mc_matches_curvlinops_in_expectation():
    model, loss_fn, X, y = _problem("cnn", "ce", "sum")
    gen = torch.Generator().manual_seed(3)
    ours = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="mc", mc_samples=1000, generator=gen, backend="asdl")
    A, G = _curvlinops(model, loss_fn, [(X, y)], "mc", mc_samples=1000)
    for name, (a, g) in ours.items():
        _close(a, A[name])
        assert _rel(g, G[name]) < 0.15


def test_mc_reproducible_from_generator():
    model, loss_fn, X, y = _problem("mlp", "ce", "mean")

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return curvkit.kronecker_factors(model, loss_fn, X, y, fisher="mc", mc_samples=3, generator=gen, backend="asdl")

    state = torch.get_rng_state()
    first, again, other = run(7), run(7), run(8)
    assert torch.equal(state, torch.get_rng_state())  # the caller's global RNG is untouched
    assert all(torch.equal(first[k].G, again[k].G) for k in first)
    assert not all(torch.equal(first[k].G, other[k].G) for k in first)

    # generator=None follows torch.manual_seed
    torch.manual_seed(11)
    a = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="mc", backend="asdl")
    torch.manual_seed(11)
    b = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="mc", backend="asdl")
    assert all(torch.equal(a[k].G, b[k].G) for k in a)


# --- refusals ----------------------------------------------------------------------------------


def _refusal(model, loss_fn, X, y, **kwargs) -> str:
    with pytest.raises(curvkit.UnsupportedRequestError) as info:
        curvkit.kronecker_factors(model, loss_fn, X, y, backend="asdl", **kwargs)
    return str(info.value)


def test_refuses_reduce():
    model, loss_fn, X, y = _problem("cnn", "ce", "mean")
    message = _refusal(model, loss_fn, X, y, fisher="type-2", kfac_approx="reduce")
    assert "'asdl'" in message and "kfac_approx='reduce'" in message and "'hooks'" in message


def test_refuses_bce_beyond_empirical():
    model, loss_fn, X, y = _problem("mlp", "bce", "mean")
    for fisher in ("type-2", "mc"):
        message = _refusal(model, loss_fn, X, y, fisher=fisher)
        assert "BCEWithLogitsLoss" in message and "'hooks'" in message


@pytest.mark.parametrize(
    "layer, what",
    [
        (nn.Conv2d(2, 3, 3, dilation=2), "dilation"),
        (nn.Conv2d(2, 3, 3, padding="same"), "padding='same'"),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv1d(2, 3, 3), "Conv1d"),
    ],
)
def test_refuses_unsupported_layers(layer, what):
    model = nn.Sequential(layer, nn.Flatten(1), nn.LazyLinear(C)).to(DTYPE)
    X = torch.randn(N, 2, 8, 8, dtype=DTYPE) if isinstance(layer, nn.Conv2d) else torch.randn(N, 2, 8, dtype=DTYPE)
    model(X)  # materialise the lazy layer
    message = _refusal(model, nn.CrossEntropyLoss(), X, torch.randint(0, C, (N,)), fisher="type-2")
    assert what in message and "'hooks'" in message


def test_refuses_outputs_with_extra_dimensions():
    torch.manual_seed(0)
    model = nn.Linear(4, C).to(DTYPE)
    X = torch.randn(N, 5, 4, dtype=DTYPE)
    message = _refusal(model, nn.MSELoss(), X, torch.randn(N, 5, C, dtype=DTYPE), fisher="type-2")
    assert "'hooks'" in message
    seq_ce = nn.Sequential(nn.Linear(4, C), nn.Flatten(1), nn.Unflatten(1, (C, 5))).to(DTYPE)
    message = _refusal(seq_ce, nn.CrossEntropyLoss(), X, torch.randint(0, C, (N, 5)), fisher="empirical")
    assert "'hooks'" in message


# --- no leftover state ---------------------------------------------------------------------------


def _snapshot(model):
    return (
        {
            name: set(vars(m)) | {"_is_full_backward_hook=" + repr(m._is_full_backward_hook)}
            for name, m in model.named_modules()
        },
        {name: (set(vars(p)), p.requires_grad) for name, p in model.named_parameters()},
    )


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type-2"])
def test_no_leftover_state_and_training_works(fisher):
    model, loss_fn, X, y = _problem("cnn", "ce", "mean")
    reference = _problem("cnn", "ce", "mean")[0]
    before = _snapshot(model)
    curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher, backend="asdl")
    assert _snapshot(model) == before
    assert loss_fn.reduction == "mean"
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        # ASDL's non-full backward hooks must not block full backward hooks afterwards
        m.register_full_backward_hook(lambda *args: None).remove()
    for p in model.parameters():
        assert p.grad is None
        assert not hasattr(p, "_original_requires_grad")

    # One SGD step gives exactly what it gives on an untouched copy.
    for net in (model, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        optimizer.zero_grad()
        loss_fn(net(X), y).backward()
        optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_existing_gradients_are_kept():
    model, loss_fn, X, y = _problem("mlp", "ce", "sum")
    loss_fn(model(X), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    curvkit.kronecker_factors(model, loss_fn, X, y, fisher="empirical", backend="asdl")
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
