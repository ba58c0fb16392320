"""Subsampled statistics (``subsample_data`` / ``subsample_positions``): the full batch's
statistics when everything is kept, unbiased factors otherwise (against factors built by hand
in float64 with ``F.unfold``), validation of the options, and the optimizers' use of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
import curvkit.optim
from curvkit.config import KFACApprox
from curvkit.errors import ConfigError
from curvkit.stats.engine import CaptureEngine
from curvkit.stats.plan import make_plan
from curvkit.stats.subsample import Subsample, subsample_stats

DT = torch.float64


def _conv_stats(n: int = 6):
    """Statistics of a Conv2d (with bias) and a Linear on one batch, and the reference
    factors of the conv built by hand: A = mean over (n, positions) of [patch, 1][patch, 1]ᵀ,
    G = N · Σ g gᵀ (the empirical Fisher of a batch-mean loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).to(DT)
    x = torch.randn(n, 2, 4, 4, dtype=DT)
    y = torch.randint(0, 4, (n,))
    engine = CaptureEngine(make_plan(model, curvkit.default_registry()), model, keep_loss_grads=True)
    with engine.attached_for():
        out = model(x)
        F.cross_entropy(out, y).backward()
    conv = engine.layer_stats("0", "loss", KFACApprox.EXPAND, float(n))
    lin = engine.layer_stats("3", "loss", KFACApprox.EXPAND, float(n))
    patches = F.unfold(x, 3, padding=1).transpose(1, 2)  # (N, R, 18)
    rows = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=DT)], 2).reshape(-1, 19)
    a_ref = rows.T @ rows / rows.shape[0]
    g = conv.parts[0].grads[0].reshape(n, 3, -1).transpose(1, 2).reshape(-1, 3)
    g_ref = n * g.T @ g
    return conv, lin, a_ref, g_ref


def test_full_statistics_when_everything_is_kept():
    conv, lin, a_ref, g_ref = _conv_stats()
    torch.testing.assert_close(conv.A(), a_ref)
    torch.testing.assert_close(conv.G(), g_ref)
    for stats in (conv, lin):
        assert subsample_stats(stats, 1.0, 1.0) is stats
        # fractions that round to every datum / position keep everything too
        assert subsample_stats(stats, 0.99, 0.99) is stats
    assert not Subsample().active and Subsample(data=0.5).active


@pytest.mark.parametrize("data,positions", [(0.5, 1.0), (1.0, 0.25), (0.5, 0.5)])
def test_subsampled_factors_are_unbiased(data, positions):
    """The mean of the subsampled factors over many draws approaches the full batch's
    (hand-built) factors; a single draw does not equal them."""
    conv, _, a_ref, g_ref = _conv_stats()
    gen = torch.Generator().manual_seed(1)
    draws = 3000
    a_sum = torch.zeros_like(a_ref)
    g_sum = torch.zeros_like(g_ref)
    for _ in range(draws):
        s = subsample_stats(conv, data, positions, gen)
        a_sum += s.A()
        g_sum += s.G()
    one = subsample_stats(conv, data, positions, gen)
    assert (one.A() - a_ref).norm() > 1e-3 * a_ref.norm()
    torch.testing.assert_close(a_sum / draws, a_ref, rtol=0, atol=0.03 * float(a_ref.abs().max()))
    torch.testing.assert_close(g_sum / draws, g_ref, rtol=0, atol=0.03 * float(g_ref.abs().max()))
    # rows stay consistent with the subsampled factors
    a_rows, g_rows = one.rows()
    torch.testing.assert_close(a_rows.T @ a_rows, one.A())
    torch.testing.assert_close(sum(g.T @ g for g in g_rows), one.G())


def test_data_subsampling_of_per_example_gradients_is_unbiased():
    _, lin, _, _ = _conv_stats(n=4)
    j = lin.per_example_gradients().flatten(1)
    full = j.T @ j
    gen = torch.Generator().manual_seed(2)
    total = torch.zeros_like(full)
    draws = 3000
    for _ in range(draws):
        js = subsample_stats(lin, 0.5, 1.0, gen).per_example_gradients().flatten(1)
        total += js.T @ js
    torch.testing.assert_close(total / draws, full, rtol=0, atol=0.03 * float(full.abs().max()))


def test_positions_left_alone_where_they_would_bias():
    """Linear on 2-D inputs has one position; reduce keeps every position."""
    _, lin, _, _ = _conv_stats()
    assert subsample_stats(lin, 1.0, 0.25) is lin
    conv, _, _, _ = _conv_stats()
    conv.approx = KFACApprox.REDUCE
    assert subsample_stats(conv, 1.0, 0.25) is conv


@pytest.mark.parametrize(
    "options",
    [
        {"subsample_data": 0.0},
        {"subsample_data": 1.5},
        {"subsample_positions": -0.1},
        {"subsample_positions": "half"},
        {"subsample_data": True},
    ],
)
def test_bad_fractions_are_refused_with_the_value_and_range(options):
    ((name, value),) = options.items()
    with pytest.raises(ConfigError) as err:
        curvkit.optim.KFAC(nn.Linear(3, 2), **options)
    text = str(err.value)
    assert name in text and repr(value) in text and "(0.0, 1.0]" in text


def test_subsampling_needs_the_capture_engine():
    with pytest.raises(ConfigError, match="needs backend='hooks'"):
        curvkit.optim.KFAC(nn.Linear(3, 2), backend="backpack", loss_fn=nn.CrossEntropyLoss(), subsample_data=0.5)


@pytest.mark.parametrize("method", ["kfac", "ekfac", "singd", "rs-kfac"])
def test_optimizers_train_with_subsampled_statistics(method):
    """Fractions 1.0 give bit-identical training to the default; 0.5 trains (finite, loss
    down) and its factors differ from the full ones."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 6, 6)
    y = torch.randint(0, 3, (64,))

    def train(**options):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
        opt = curvkit.optim.create(method, model, **options)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return model, losses

    base, base_losses = train()
    same, _ = train(subsample_data=1.0, subsample_positions=1.0)
    for p, q in zip(base.parameters(), same.parameters()):
        assert torch.equal(p, q)
    sub, losses = train(subsample_data=0.5, subsample_positions=0.5)
    assert all(torch.isfinite(p).all() for p in sub.parameters())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), sub.parameters()))


@pytest.mark.parametrize("approx", [KFACApprox.EXPAND, KFACApprox.REDUCE])
def test_bf16_factor_products_stay_close_to_full_precision(approx):
    """stats_dtype=bf16: A and G within bf16's rounding (~1e-2 relative) of the float64
    factors, in the features' dtype (float64 here); not bit-equal, so bf16 was used."""
    conv, lin, _, _ = _conv_stats()
    for stats in (conv, lin):
        stats.approx = approx
        full = (stats.A(), stats.G())
        stats.__dict__.pop("_factors")
        stats.product_dtype = torch.bfloat16
        low = (stats.A(), stats.G())
        for f, lo in zip(full, low):
            assert lo.dtype == DT
            err = float((lo - f).norm() / f.norm())
            assert 0 < err < 1e-2


def test_bf16_products_through_the_optimizer():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = curvkit.optim.KFAC(model, stats_dtype=torch.bfloat16)
    assert opt.preconditioner.engine.product_dtype is torch.bfloat16
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    block = opt.preconditioner.blocks["0"]
    assert block.A.dtype == torch.float32 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("value", [torch.float16, "bfloat16", torch.int8])
def test_bad_stats_dtype_is_refused(value):
    with pytest.raises(ConfigError, match="stats_dtype=.*torch.bfloat16"):
        curvkit.optim.KFAC(nn.Linear(3, 2), stats_dtype=value)
