"""curvkit's Kronecker factors equal curvlinops' KFACLinearOperator (bias folded into A)."""

from __future__ import annotations

import pytest
import torch
from _models import build_case, make_loss
from _reference import (
    assert_factors_close,
    assert_matrix_close,
    curvkit_to_flat_index,
    curvlinops_factors,
)
from torch import nn

import curvkit

MODELS = {
    "mlp-relu-bias": ("mlp", {"act": "relu", "bias": True}),
    "mlp-tanh-nobias": ("mlp", {"act": "tanh", "bias": False}),
    "cnn": ("cnn", {}),
    "seq": ("seq", {}),
}
FISHERS = ["empirical", "mc", "type-2"]
APPROXES = ["expand", "reduce"]
LOSSES = ["ce", "mse", "bce"]
REDUCTIONS = ["mean", "sum"]
SEED = 7


def _ours(model, loss_fn, X, y, registry, fisher, approx, mc_samples=1):
    gen = torch.Generator().manual_seed(SEED) if fisher == "mc" else None
    return curvkit.kronecker_factors(
        model,
        loss_fn,
        X,
        y,
        fisher=fisher,
        kfac_approx=approx,
        mc_samples=mc_samples,
        generator=gen,
        registry=registry,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("approx", APPROXES)
@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("model_id", list(MODELS))
def test_factors_match_curvlinops(model_id, fisher, approx, loss, reduction, core_registry):
    kind, kwargs = MODELS[model_id]
    model, X, y = build_case(kind, loss, n=5, **kwargs)
    loss_fn = make_loss(loss, reduction)
    ours = _ours(model, loss_fn, X, y, core_registry, fisher, approx)
    ref, _ = curvlinops_factors(model, loss_fn, [(X, y)], fisher=fisher, approx=approx, seed=SEED)
    assert set(ours) == set(ref)
    assert_factors_close(ours, ref, rtol=1e-6)
    for name, (A, G) in ours.items():
        module = model.get_submodule(name)
        assert A.dtype == G.dtype == torch.float64
        assert G.shape == (module.weight.shape[0],) * 2
        d_in = module.weight[0].numel() + (module.bias is not None)
        assert A.shape == (d_in, d_in)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("model_id", ["mlp-relu-bias", "seq"])
def test_mc_several_samples_match_curvlinops(model_id, loss, core_registry):
    kind, kwargs = MODELS[model_id]
    model, X, y = build_case(kind, loss, n=4, **kwargs)
    loss_fn = make_loss(loss)
    ours = _ours(model, loss_fn, X, y, core_registry, "mc", "expand", mc_samples=3)
    ref, _ = curvlinops_factors(model, loss_fn, [(X, y)], fisher="mc", mc_samples=3, seed=SEED)
    assert_factors_close(ours, ref, rtol=1e-6)


def test_mc_depends_on_seed(core_registry):
    """Guard against a generator that is ignored: another seed gives other factors."""
    model, X, y = build_case("mlp", "ce", n=4)
    loss_fn = make_loss("ce")
    a = _ours(model, loss_fn, X, y, core_registry, "mc", "expand")
    gen = torch.Generator().manual_seed(SEED + 1)
    b = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="mc", generator=gen, registry=core_registry)
    assert not torch.allclose(a["0"].G, b["0"].G)
    # the same seed twice gives the same factors
    c = _ours(model, loss_fn, X, y, core_registry, "mc", "expand")
    torch.testing.assert_close(a["0"].G, c["0"].G, rtol=0, atol=0)


def test_frozen_layer_is_not_tracked(core_registry):
    model, X, y = build_case("mlp", "ce", n=4)
    for p in model[2].parameters():
        p.requires_grad_(False)
    loss_fn = make_loss("ce")
    ours = _ours(model, loss_fn, X, y, core_registry, "type-2", "expand")
    ref, _ = curvlinops_factors(model, loss_fn, [(X, y)], fisher="type-2")
    assert "2" not in ours
    assert_factors_close(ours, ref)


@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
def test_dense_kronecker_blocks_match_curvlinops(fisher, core_registry):
    """Dense G⊗A, permuted to curvlinops' [W.flatten(), b] layout, equals its KFAC matrix."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False), nn.Sigmoid(), nn.Linear(2, 3)
    ).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    ours = _ours(model, loss_fn, X, y, core_registry, fisher, "expand")
    _, op = curvlinops_factors(model, loss_fn, [(X, y)], fisher=fisher, seed=SEED)
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    dense_ref = op @ torch.eye(dim, dtype=torch.float64)

    dense = torch.zeros(dim, dim, dtype=torch.float64)
    offset = 0
    for name, module in model.named_children():
        if not isinstance(module, nn.Linear):
            continue
        d_out, d_in = module.weight.shape
        bias = module.bias is not None
        idx = torch.tensor(curvkit_to_flat_index(d_out, d_in, bias)) + offset
        A, G = ours[name]
        dense[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(G, A)
        offset += module.weight.numel() + (module.bias.numel() if bias else 0)
    assert offset == dim
    assert_matrix_close(dense, dense_ref, rtol=1e-6, msg="dense block-diagonal K-FAC")


def test_permutation_helper_is_a_permutation():
    idx = curvkit_to_flat_index(3, 4, True)
    assert sorted(idx) == list(range(15))
    assert idx[:5] == [0, 1, 2, 3, 12]
