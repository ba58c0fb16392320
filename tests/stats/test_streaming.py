"""accumulate_kronecker_factors: data-set scaling over uneven batches."""

from __future__ import annotations

import pytest
import torch
from _models import build_case, make_loss
from _reference import assert_factors_close, curvlinops_factors

import curvkit

SIZES = (5, 3, 2)
SEED = 13


def _batches(kind, loss):
    model, X, y = build_case(kind, loss, n=sum(SIZES), seed=3)
    Xs, ys = X.split(list(SIZES)), y.split(list(SIZES))
    return model, X, y, list(zip(Xs, ys, strict=True))


def _accumulate(model, loss_fn, data, registry, fisher, approx, mc_samples=1):
    gen = torch.Generator().manual_seed(SEED) if fisher == "mc" else None
    return curvkit.accumulate_kronecker_factors(
        model,
        loss_fn,
        data,
        fisher=fisher,
        kfac_approx=approx,
        mc_samples=mc_samples,
        generator=gen,
        registry=registry,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["empirical", "type-2", "mc"])
@pytest.mark.parametrize(
    ("kind", "loss", "approx"),
    [
        ("mlp", "ce", "expand"),
        ("mlp", "mse", "expand"),
        ("seq", "ce", "reduce"),
        ("seq", "bce", "expand"),
        ("cnn", "mse", "reduce"),
    ],
)
def test_accumulate_matches_curvlinops(kind, loss, approx, fisher, reduction, core_registry):
    model, _, _, data = _batches(kind, loss)
    loss_fn = make_loss(loss, reduction)
    ours = _accumulate(model, loss_fn, data, core_registry, fisher, approx)
    ref, _ = curvlinops_factors(model, loss_fn, data, fisher=fisher, approx=approx, seed=SEED)
    assert_factors_close(ours, ref, rtol=1e-6)


def test_accumulate_mc_several_samples_matches_curvlinops(core_registry):
    model, _, _, data = _batches("mlp", "ce")
    loss_fn = make_loss("ce")
    ours = _accumulate(model, loss_fn, data, core_registry, "mc", "expand", mc_samples=4)
    ref, _ = curvlinops_factors(model, loss_fn, data, fisher="mc", mc_samples=4, seed=SEED)
    assert_factors_close(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
@pytest.mark.parametrize(("kind", "loss"), [("mlp", "ce"), ("seq", "ce"), ("seq", "mse"), ("cnn", "bce")])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_accumulate_equals_concatenated_batch(kind, loss, approx, fisher, reduction, core_registry):
    model, X, y, data = _batches(kind, loss)
    loss_fn = make_loss(loss, reduction)
    streamed = _accumulate(model, loss_fn, data, core_registry, fisher, approx)
    whole = curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher, kfac_approx=approx, registry=core_registry)
    assert_factors_close(streamed, {k: tuple(v) for k, v in whole.items()}, rtol=1e-10)


def test_accumulate_is_not_the_plain_batch_average(core_registry):
    """With uneven batches the data-set scaling differs from averaging per-batch factors."""
    model, _, _, data = _batches("mlp", "ce")
    loss_fn = make_loss("ce")
    streamed = _accumulate(model, loss_fn, data, core_registry, "type-2", "expand")
    per_batch = [
        curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2", registry=core_registry) for X, y in data
    ]
    naive = sum(f["0"].A for f in per_batch) / len(per_batch)
    assert not torch.allclose(streamed["0"].A, naive, rtol=1e-4)


def test_accumulate_accepts_a_generator_of_batches(core_registry):
    model, _, _, data = _batches("mlp", "mse")
    loss_fn = make_loss("mse")
    from_list = _accumulate(model, loss_fn, data, core_registry, "empirical", "expand")
    from_gen = _accumulate(model, loss_fn, (batch for batch in data), core_registry, "empirical", "expand")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])),
        batch_size=4,
    )
    from_loader = _accumulate(model, loss_fn, loader, core_registry, "empirical", "expand")
    for name in from_list:
        torch.testing.assert_close(from_gen[name].A, from_list[name].A)
        torch.testing.assert_close(from_loader[name].G, from_list[name].G)
        torch.testing.assert_close(from_loader[name].A, from_list[name].A)


def test_accumulate_empty_data_raises(core_registry):
    model, _, _, _ = _batches("mlp", "ce")
    with pytest.raises(ValueError, match="no batches"):
        curvkit.accumulate_kronecker_factors(model, make_loss("ce"), [], fisher="type-2", registry=core_registry)


def test_accumulate_validates_arguments(core_registry):
    model, _, _, data = _batches("mlp", "ce")
    with pytest.raises(ValueError, match="fisher"):
        curvkit.accumulate_kronecker_factors(model, make_loss("ce"), data, fisher="bogus", registry=core_registry)
    with pytest.raises(curvkit.UnknownComponentError, match="'hooks'"):
        curvkit.accumulate_kronecker_factors(
            model, make_loss("ce"), data, fisher="type-2", backend="nope", registry=core_registry
        )
    with pytest.raises(curvkit.UnsupportedRequestError):
        curvkit.accumulate_kronecker_factors(model, torch.nn.L1Loss(), data, fisher="type-2", registry=core_registry)


def test_every_batch_is_checked_against_the_backend():
    """A batch the backend cannot serve is refused even when an earlier batch was fine."""
    import curvkit
    from curvkit.stats.backend import BackendCapabilities

    calls = []

    class TwoDOnly:
        name = "two-d-only"

        def __init__(self):
            self.capabilities = BackendCapabilities(
                fisher_types=frozenset(curvkit.FisherType),
                approximations=frozenset(curvkit.KFACApprox),
                module_types=(torch.nn.Linear,),
                losses=(torch.nn.MSELoss,),
                extra_check=lambda r: [] if r.inputs.ndim == 2 else ["inputs with more than 2 dimensions"],
            )

        def compute(self, request):
            calls.append(request.inputs.shape)
            return {}

    class Plugin:
        @curvkit.hookimpl
        def curvkit_register_statistics_backends(self, register):
            register.add(TwoDOnly())

    registry = curvkit.build_registry(autoload=False, plugins=[Plugin()])
    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randn(4, 2)), (torch.randn(4, 5, 3), torch.randn(4, 5, 2))]
    with pytest.raises(curvkit.UnsupportedRequestError, match="more than 2 dimensions"):
        curvkit.accumulate_kronecker_factors(
            model, torch.nn.MSELoss(), data, fisher="type-2", backend="two-d-only", registry=registry
        )
    assert calls == [torch.Size([4, 3])], "the refused batch must never reach compute()"
