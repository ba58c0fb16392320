"""The fast Gram paths of the statistics core against the plain unfold-and-multiply result.

``conv_patch_gram`` (stride-1 patches without unfolding), ``ConvHandler.input_gram``,
``sum_gram`` on transposed layouts and the symmetric split of ``gram`` must equal the
Gram matrix of explicitly unfolded rows, in float64, for arbitrary geometry.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvkit.stats.factors import conv_patch_gram, gram, sum_gram
from curvkit.stats.handlers import ConvHandler, unfold_patches


def _reference(x, kernel, dilation, padding):
    """Zero-pad explicitly, unfold with stride 1, multiply rows."""
    pad = [p for lo_hi in reversed(padding) for p in lo_hi]  # F.pad wants last dim first
    patches = unfold_patches(F.pad(x, pad), kernel, (1,) * len(kernel), dilation)
    rows = patches.reshape(-1, patches.shape[-1])
    return rows.t() @ rows, rows.sum(0), rows.shape[0]


@st.composite
def geometries(draw):
    nd = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    if math.prod(kernel) > 9:
        kernel = kernel[:-1] + (1,)
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd))
    spatial = []
    for k, d, (lo, hi) in zip(kernel, dilation, padding):
        span = d * (k - 1) + 1
        spatial.append(draw(st.integers(max(1, span - lo - hi), span + 4)))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return n, c, tuple(spatial), kernel, dilation, padding


@settings(max_examples=150, deadline=None)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_conv_patch_gram_equals_unfolded_gram(geometry, seed):
    n, c, spatial, kernel, dilation, padding = geometry
    x = torch.randn(n, c, *spatial, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = conv_patch_gram(x, kernel, dilation, padding, max_cost_ratio=math.inf)
    assert got is not None, "with an unlimited cost budget the fast path must not decline"
    xtx, col, count = got
    ref_xtx, ref_col, ref_count = _reference(x, kernel, dilation, padding)
    assert count == ref_count
    torch.testing.assert_close(xtx, ref_xtx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(col, ref_col, rtol=1e-10, atol=1e-10)


def test_conv_patch_gram_declines_large_kernels_and_empty_outputs():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert conv_patch_gram(x, (5, 5), (1, 1), ((0, 0), (0, 0)), max_cost_ratio=math.inf) is None
    assert conv_patch_gram(x, (3, 3), (4, 4), ((0, 0), (0, 0)), max_cost_ratio=math.inf) is None


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 3, padding=2, dilation=2),
        nn.Conv1d(3, 4, 2, stride=2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="circular"),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(3, 4, 5, padding=2),
        nn.Conv3d(2, 3, 2, padding=(1, 0, 1)),
        nn.Conv3d(2, 3, 3, stride=(1, 2, 1), padding=1, padding_mode="replicate"),
    ],
    ids=lambda m: repr(m),
)
def test_conv_handler_input_gram_equals_its_features(conv):
    conv = conv.double()
    handler = ConvHandler()
    spatial = (9,) * (conv.weight.ndim - 2)
    x = torch.randn(5, conv.in_channels, *spatial, dtype=torch.float64)
    feats = handler.input_features(conv, x)
    rows = feats.reshape(-1, feats.shape[-1])
    xtx, col, count = handler.input_gram(conv, x)
    assert count == rows.shape[0]
    torch.testing.assert_close(xtx, rows.t() @ rows, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(col, rows.sum(0), rtol=1e-10, atol=1e-10)


def test_conv_handler_subclass_with_own_features_gets_no_fast_path():
    class Scaled(ConvHandler):
        def input_features(self, module, x):
            return 2 * super().input_features(module, x)

    conv = nn.Conv2d(2, 3, 3).double()
    assert Scaled().input_gram(conv, torch.randn(2, 2, 6, 6, dtype=torch.float64)) is None


@pytest.mark.parametrize("shape", [(4, 50, 8), (3, 7, 300), (2, 600, 300)])
def test_sum_gram_on_transposed_layout(shape):
    n, r, d = shape
    base = torch.randn(n, d, r, dtype=torch.float64)
    feats = base.transpose(1, 2)  # (N, R, d), R contiguous: the conv layout
    rows = feats.reshape(-1, d)
    torch.testing.assert_close(sum_gram(feats), rows.t() @ rows, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,d", [(1000, 300), (600, 513), (10, 300)])
@pytest.mark.parametrize("append_one", [False, True])
def test_gram_symmetric_split(n, d, append_one):
    rows = torch.randn(n, d, dtype=torch.float64)
    full = torch.cat([rows, torch.ones(n, 1, dtype=torch.float64)], 1) if append_one else rows
    got = gram(rows, append_one)
    torch.testing.assert_close(got, full.t() @ full, rtol=1e-10, atol=1e-10)
    h = d // 2
    assert torch.equal(got[h:d, :h], got[:h, h:d].t())  # the mirrored block is exact
