"""Conv1d/Conv3d factors (which curvlinops lacks) against independent references.

The references build patches by explicit loops with index arithmetic (validated against
PyTorch's own convolution) and output gradients from ``torch.func`` Jacobians and loss
Hessians, so they share no code with curvkit's handlers.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _reference import (
    assert_factors_close,
    assert_matrix_close,
    conv_via_patches,
    factor_from_rows,
    g_factor_from_vectors,
    reference_output_vectors,
    reference_patches,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvkit

# name -> (conv kwargs, spatial input size)
CONV1D = {
    "strided-dilated": ({"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2}, (9,)),
    "reflect": ({"kernel_size": 3, "padding": 2, "padding_mode": "reflect"}, (6,)),
    "circular": ({"kernel_size": 2, "stride": 2, "padding": 1, "padding_mode": "circular"}, (7,)),
    "same": ({"kernel_size": 4, "padding": "same", "dilation": 2}, (7,)),
}
CONV3D = {
    "strided-dilated": (
        {"kernel_size": (2, 2, 2), "stride": (1, 2, 1), "padding": (1, 0, 1), "dilation": (1, 1, 2)},
        (3, 4, 4),
    ),
    "reflect": ({"kernel_size": (2, 3, 2), "padding": (1, 1, 0), "padding_mode": "reflect"}, (3, 3, 3)),
    "circular": ({"kernel_size": 2, "stride": (2, 1, 1), "padding": 1, "padding_mode": "circular"}, (3, 2, 3)),
    "same": ({"kernel_size": (2, 3, 2), "padding": "same"}, (2, 3, 3)),
}
CONVS = {1: (nn.Conv1d, CONV1D), 3: (nn.Conv3d, CONV3D)}


def conv_net(dim: int, config: str, d_out: int = 3, bias: bool = True, seed: int = 0):
    """``Sequential(conv, Tanh, Flatten, Linear)`` and an input batch for it."""
    conv_cls, configs = CONVS[dim]
    kwargs, spatial = configs[config]
    torch.manual_seed(seed)
    conv = conv_cls(2, 3, bias=bias, **kwargs).double()
    X = torch.randn(4, 2, *spatial, dtype=torch.float64)
    with torch.no_grad():
        flat = conv(X)[0].numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, d_out).double())
    return model, X


def targets(loss_fn, out, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, out.shape[1], (out.shape[0],), generator=gen)
    return torch.randn(out.shape, generator=gen, dtype=out.dtype)


def reference_conv_factors(model, loss_fn, X, y, fisher, approx):
    conv = model[0]
    patches = conv_via_patches(conv, X)  # validates the loop-based patches on the way
    with torch.no_grad():
        torch.testing.assert_close(patches, conv(X).flatten(2).transpose(1, 2), rtol=1e-10, atol=1e-12)
    rows = reference_patches(conv, X)
    A = factor_from_rows(rows, approx, conv.bias is not None)
    vecs, s, z = reference_output_vectors(model[:1], model[1:], loss_fn, X, y, fisher)
    vecs = vecs.flatten(3).transpose(2, 3)  # (N, M, C_out, T) -> (N, M, T, C_out)
    G = g_factor_from_vectors(vecs, approx, z)
    return A, G


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("config", list(CONV1D))
@pytest.mark.parametrize("dim", [1, 3])
def test_conv_nd_against_reference(dim, config, loss, fisher, approx, core_registry):
    model, X = conv_net(dim, config)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce-mean" else nn.MSELoss(reduction="sum")
    with torch.no_grad():
        y = targets(loss_fn, model(X))
    ours = curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher, kfac_approx=approx, registry=core_registry)
    assert set(ours) == {"0", "3"}
    A_ref, G_ref = reference_conv_factors(model, loss_fn, X, y, fisher, approx)
    assert_matrix_close(ours["0"].A, A_ref, msg="A")
    assert_matrix_close(ours["0"].G, G_ref, msg="G")


def test_conv_without_bias_against_reference(core_registry):
    model, X = conv_net(3, "strided-dilated", bias=False)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with torch.no_grad():
        y = targets(loss_fn, model(X))
    ours = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2", registry=core_registry)
    A_ref, G_ref = reference_conv_factors(model, loss_fn, X, y, "type-2", "expand")
    assert ours["0"].A.shape == (2 * 8, 2 * 8)
    assert_matrix_close(ours["0"].A, A_ref)
    assert_matrix_close(ours["0"].G, G_ref)


@settings(max_examples=15, deadline=None)
@given(
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    length=st.integers(5, 8),
    mode=st.sampled_from(["zeros", "reflect", "circular", "replicate"]),
    bias=st.booleans(),
    approx=st.sampled_from(["expand", "reduce"]),
)
def test_conv1d_input_factor_property(kernel, stride, padding, dilation, length, mode, bias, approx):
    """A of a Conv1d for random geometry and padding mode equals the loop reference."""
    registry = curvkit.build_registry(autoload=False)
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 2, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias)
    conv = conv.double()
    model = nn.Sequential(conv, nn.Flatten())
    X = torch.randn(3, 2, length, dtype=torch.float64)
    with torch.no_grad():
        out = model(X)
    y = torch.randn_like(out)
    ours = curvkit.kronecker_factors(
        model, nn.MSELoss(), X, y, fisher="empirical", kfac_approx=approx, registry=registry
    )
    rows = reference_patches(conv, X)
    assert_matrix_close(ours["0"].A, factor_from_rows(rows, approx, bias))


# --- cross-checks between dimensions ----------------------------------------------------


def _factors_all_fishers(model, loss_fn, X, y, registry, approx):
    out = {}
    for fisher in ["empirical", "type-2", "mc"]:
        gen = torch.Generator().manual_seed(11) if fisher == "mc" else None
        mc = 2 if fisher == "mc" else 1
        out[fisher] = curvkit.kronecker_factors(
            model, loss_fn, X, y, fisher=fisher, kfac_approx=approx, mc_samples=mc, generator=gen, registry=registry
        )
    return out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv2d_equals_conv3d_with_depth_one(approx, core_registry):
    torch.manual_seed(0)
    conv2 = nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
    conv3 = nn.Conv3d(2, 3, (1, 2, 3), stride=(1, 2, 1), padding=(0, 1, 2), dilation=(1, 1, 2)).double()
    with torch.no_grad():
        conv3.weight.copy_(conv2.weight.unsqueeze(2))
        conv3.bias.copy_(conv2.bias)
    X = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        flat = conv2(X)[0].numel()
    head = nn.Linear(flat, 4).double()
    m2 = nn.Sequential(conv2, nn.ReLU(), nn.Flatten(), head)
    m3 = nn.Sequential(conv3, nn.ReLU(), nn.Flatten(), head)
    X3 = X.unsqueeze(2)
    with torch.no_grad():
        torch.testing.assert_close(m3(X3), m2(X))
    y = torch.randint(0, 4, (3,))
    loss_fn = nn.CrossEntropyLoss()
    f2 = _factors_all_fishers(m2, loss_fn, X, y, core_registry, approx)
    f3 = _factors_all_fishers(m3, loss_fn, X3, y, core_registry, approx)
    for fisher in f2:
        assert_factors_close(f3[fisher], f2[fisher], rtol=1e-10)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_conv1d_equals_conv2d_with_row_kernel(padding_mode, core_registry):
    """conv1d(x) == conv2d(x.unsqueeze(-2)) with a (1, k) kernel, and so do the factors."""
    torch.manual_seed(1)
    conv1 = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode=padding_mode).double()
    conv2 = nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2), padding_mode=padding_mode).double()
    with torch.no_grad():
        conv2.weight.copy_(conv1.weight.unsqueeze(2))
        conv2.bias.copy_(conv1.bias)
    X = torch.randn(4, 2, 9, dtype=torch.float64)
    with torch.no_grad():
        flat = conv1(X)[0].numel()
    head = nn.Linear(flat, 2).double()
    m1 = nn.Sequential(conv1, nn.Tanh(), nn.Flatten(), head)
    m2 = nn.Sequential(conv2, nn.Tanh(), nn.Flatten(), head)
    X2 = X.unsqueeze(-2)
    with torch.no_grad():
        torch.testing.assert_close(m2(X2), m1(X))
    y = torch.rand(4, 2, dtype=torch.float64).round()
    loss_fn = nn.BCEWithLogitsLoss()
    f1 = _factors_all_fishers(m1, loss_fn, X, y, core_registry, "expand")
    f2 = _factors_all_fishers(m2, loss_fn, X2, y, core_registry, "expand")
    for fisher in f1:
        assert_factors_close(f1[fisher], f2[fisher], rtol=1e-10)


# --- unsupported configurations -------------------------------------------------------


@pytest.mark.parametrize("conv_cls", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
def test_grouped_conv_policy(conv_cls, core_registry):
    dim = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv_cls]
    torch.manual_seed(0)
    model = nn.Sequential(conv_cls(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(4 * 2**dim, 3)).double()
    X = torch.randn(3, 4, *([2] * dim), dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(curvkit.UnsupportedModuleError, match=r"'0'.*groups=2"):
        curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2", unsupported="error", registry=core_registry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        skipped = curvkit.kronecker_factors(
            model, loss_fn, X, y, fisher="type-2", unsupported="skip", registry=core_registry
        )
    assert set(skipped) == {"2"}
    with pytest.warns(UserWarning, match="groups=2"):
        warned = curvkit.kronecker_factors(
            model, loss_fn, X, y, fisher="type-2", unsupported="warn", registry=core_registry
        )
    assert set(warned) == {"2"}
    torch.testing.assert_close(warned["2"].A, skipped["2"].A)


def test_conv_patch_reference_covers_all_positions():
    """Sanity of the reference itself: T equals the product of the output sizes."""
    conv = nn.Conv3d(1, 1, (2, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1))
    X = torch.randn(2, 1, 3, 4, 5)
    rows = reference_patches(conv, X)
    out = conv(X)
    assert rows.shape == (2, math.prod(out.shape[2:]), 6)
