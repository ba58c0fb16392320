"""Unit-wise blocks against ASDL 0.1a4's own unit-wise Fisher (``SHAPE_UNIT_WISE``).

ASDL computes ``(D, 2, 2)`` per-unit blocks for ``BatchNorm1d/2d`` and ``LayerNorm`` with a
trainable scale and shift. Where it is exact, ours equal it to 1e-12: LayerNorm on
``(N, d)``, BatchNorm1d on ``(N, C)`` and BatchNorm2d in training and evaluation mode, for
the type-2 and the empirical Fisher. Its defects, pinned here so that a fixed release is
noticed:

* it treats the positions of a LayerNorm on ``(N, T, d)`` as data (``Σ_{n,t} j jᵀ`` instead
  of the per-datum ``Σ_n (Σ_t j)(Σ_t j)ᵀ``; ours equal the dense Fisher there,
  tests/stats/test_norms.py);
* it recovers ``x̂`` from the output as ``(y − β)/γ``, so a unit with ``γ_i = 0`` is NaN;
* ``BatchNorm1d`` on ``(N, C, L)`` raises, and ``BatchNorm3d`` gets no unit-wise block.

The statistics backends ``asdl`` and ``backpack`` compute Kronecker factors only; they
refuse a normalised model with their capability error, naming the module type and the
``hooks`` backend.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _reference import assert_matrix_close
from torch import nn

import curvkit
from curvkit.errors import UnsupportedRequestError

asdl = pytest.importorskip("asdl")

DT = torch.float64
N = 8


def _asdl_unit_wise(model: nn.Module, X: torch.Tensor, y: torch.Tensor, fisher: str) -> dict[str, torch.Tensor]:
    fisher_type = {"type-2": asdl.FISHER_EXACT, "empirical": asdl.FISHER_EMP}[fisher]
    config = asdl.FisherConfig(
        fisher_type=fisher_type,
        fisher_shapes=[asdl.SHAPE_UNIT_WISE],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        data_size=N,
        fisher_attr="_test_fisher",
        fvp_attr="_test_fvp",
    )
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maker = asdl.get_fisher_maker(model, config)
        dummy = maker.setup_model_call(model, X)
        if fisher == "empirical":
            maker.setup_loss_call(nn.CrossEntropyLoss(), dummy, y)
        maker.forward_and_backward(data_size=N)
    out = {}
    for name, m in model.named_modules():
        unit = getattr(getattr(m, "_test_fisher", None), "unit", None)
        if unit is not None and unit.data is not None:
            out[name] = unit.data
    return out


def _case(kind: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "layernorm":
        model, X = (
            nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)),
            torch.randn(N, 5, generator=g),
        )
    elif kind == "layernorm-seq":
        model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        X = torch.randn(N, 3, 5, generator=g)
    elif kind == "batchnorm1d":
        model, X = (
            nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)),
            torch.randn(N, 5, generator=g),
        )
    else:  # batchnorm2d-train / -eval
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
        X = torch.randn(N, 2, 4, 4, generator=g)
    model = model.to(DT)
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
        if isinstance(model[1], nn.BatchNorm2d):
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 1.5)
    if kind.endswith("eval"):
        model.eval()
    return model, X.to(DT), torch.randint(0, 3, (N,), generator=g)


def _ours(model, X, y, fisher):
    return curvkit.kronecker_factors(copy.deepcopy(model), nn.CrossEntropyLoss(), X, y, fisher=fisher)["1"].F


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("kind", ["layernorm", "batchnorm1d", "batchnorm2d-train", "batchnorm2d-eval"])
def test_unit_blocks_equal_asdl_where_it_is_exact(kind, fisher):
    model, X, y = _case(kind)
    theirs = _asdl_unit_wise(model, X, y, fisher)["1"]
    assert_matrix_close(_ours(model, X, y, fisher), theirs, rtol=1e-12)


def test_asdl_treats_the_positions_of_a_sequence_as_data():
    model, X, y = _case("layernorm-seq")
    theirs = _asdl_unit_wise(model, X, y, "type-2")["1"]
    ours = _ours(model, X, y, "type-2")
    assert float((theirs - ours).norm() / ours.norm()) > 0.05
    # what ASDL computes: every position's gradient as a datum of its own, Σ_{v,n,t} j jᵀ / N
    h = model[0](X).detach()
    ln_out = model[1](h)
    out = model[4](torch.tanh(ln_out).flatten(1))
    xhat = nn.functional.layer_norm(h, (4,), eps=model[1].eps)
    adapter = curvkit.stats.losses.loss_adapter(nn.CrossEntropyLoss())
    positions = torch.zeros_like(ours)
    for v in adapter.output_vectors(out, y, curvkit.FisherType.TYPE2, 1, None):
        (g,) = torch.autograd.grad(out, [ln_out], v, retain_graph=True)  # (N, T, D)
        j = torch.stack([g * xhat, g], -1)
        positions += torch.einsum("ntdk,ntdl->dkl", j, j) / N
    assert_matrix_close(theirs, positions, rtol=1e-10)


def test_asdl_is_nan_for_a_zero_scale_and_ours_is_not():
    model, X, y = _case("batchnorm1d")
    with torch.no_grad():
        model[1].weight[0] = 0.0
    theirs = _asdl_unit_wise(model, X, y, "type-2")["1"]
    ours = _ours(model, X, y, "type-2")
    assert not torch.isfinite(theirs[0]).all() and torch.isfinite(ours).all()
    assert_matrix_close(ours[1:], theirs[1:], rtol=1e-12)
    assert_matrix_close(ours[0, 1, 1], theirs[0, 1, 1], rtol=1e-12)  # the shift's entry needs no x̂


@pytest.mark.parametrize("backend", ["asdl", "backpack"])
def test_the_kronecker_backends_refuse_normalisation_layers(backend):
    model, X, y = _case("layernorm")
    with pytest.raises(UnsupportedRequestError, match=r"LayerNorm.*'hooks'"):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", backend=backend)
