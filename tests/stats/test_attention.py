"""nn.MultiheadAttention: its projections as Kronecker blocks, seen through functional calls.

The reference is the same attention written with four separate ``nn.Linear`` projections
and ``F.scaled_dot_product_attention``: its factors come from the Linear path, checked
against curvlinops here as well. ``nn.MultiheadAttention`` must give the same factors for
its ``q``/``k``/``v``/``out_proj`` blocks, on the self-attention path (one ``linear`` call
on all of ``in_proj_weight``) and the cross-attention path (row ranges of it), batch first
or not, and the optimizer must take the same steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import curvlinops_factors
from torch import nn

import curvkit
import curvkit.optim

E, HEADS, C = 6, 2, 3


class ExplicitAttention(nn.Module):
    """Multi-head attention from four Linear layers (batch first)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(E, E).double() for _ in range(3))
        self.out = nn.Linear(E, E).double()
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(mha.in_proj_weight[i * E : (i + 1) * E])
                lin.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value):
        n, lq, _ = query.shape

        def heads(t):
            return t.reshape(n, t.shape[1], HEADS, E // HEADS).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(self.q(query)), heads(self.k(key)), heads(self.v(value)))
        return self.out(att.transpose(1, 2).reshape(n, lq, E))


class Net(nn.Module):
    """``head(mean_t attention(x, m, m))`` with ``m = x`` (self) or ``tanh(mem(x))`` (cross)."""

    def __init__(self, attention: nn.Module, cross: bool, batch_first: bool, explicit: bool):
        super().__init__()
        torch.manual_seed(1)
        self.att = attention
        self.mem = nn.Linear(E, E).double()
        self.head = nn.Linear(E, C).double()
        self.cross, self.batch_first, self.explicit = cross, batch_first, explicit

    def forward(self, x):
        m = torch.tanh(self.mem(x)) if self.cross else x
        if self.explicit:
            h = self.att(x, m, m)
        elif self.batch_first:
            h = self.att(x, m, m)[0]
        else:
            h = self.att(x.transpose(0, 1), m.transpose(0, 1), m.transpose(0, 1))[0].transpose(0, 1)
        return self.head(h.mean(1))


def _pair(cross: bool, batch_first: bool):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()  # PyTorch initialises them to zero
        mha.out_proj.bias.normal_()
    ours = Net(mha, cross, batch_first, explicit=False)
    ref = Net(ExplicitAttention(mha), cross, batch_first, explicit=True)
    ref.mem.load_state_dict(ours.mem.state_dict())
    ref.head.load_state_dict(ours.head.state_dict())
    if not cross:  # unused
        ours.mem.requires_grad_(False)
        ref.mem.requires_grad_(False)
    return ours, ref


RENAME = {"att.q": "att.q", "att.k": "att.k", "att.v": "att.v", "att.out_proj": "att.out", "head": "head", "mem": "mem"}


def _data(n=5, length=4):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, length, E, generator=gen, dtype=torch.float64), torch.randint(0, C, (n,), generator=gen)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize(("fisher", "approx"), [("type-2", "expand"), ("empirical", "reduce"), ("mc", "expand")])
def test_factors_equal_explicit_projections(cross, batch_first, fisher, approx):
    ours, ref = _pair(cross, batch_first)
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    torch.testing.assert_close(ours(X), ref(X), rtol=1e-12, atol=1e-12)
    kw = {"fisher": fisher, "kfac_approx": approx, "mc_samples": 2 if fisher == "mc" else 1}
    got = curvkit.kronecker_factors(ours, loss_fn, X, y, generator=torch.Generator().manual_seed(5), **kw)
    want = curvkit.kronecker_factors(ref, loss_fn, X, y, generator=torch.Generator().manual_seed(5), **kw)
    expected = {"att.q", "att.k", "att.v", "att.out_proj", "head"} | ({"mem"} if cross else set())
    assert set(got) == expected
    # on the self-attention path the key projection's reduce-G is zero up to rounding (the
    # softmax is shift invariant), so tolerances are relative to the largest factor
    scale = max(float(t.abs().max()) for pair in want.values() for t in pair)
    for name, (a, g) in got.items():
        a_ref, g_ref = want[RENAME[name]]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12 * scale)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12 * scale)
    if fisher != "mc":  # the explicit model's factors are curvlinops'
        cl, _ = curvlinops_factors(ref, loss_fn, [(X, y)], fisher=fisher, approx=approx)
        assert set(cl) == set(want)
        for name, (a, g) in want.items():
            torch.testing.assert_close(a, cl[name][0], rtol=1e-10, atol=1e-12 * scale)
            torch.testing.assert_close(g, cl[name][1], rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("method", ["kfac", "singd"])
def test_optimizer_steps_equal_explicit_projections(method):
    """Three steps of the optimizer move every MHA parameter (never frozen) exactly as the
    explicit model's Linear layers move."""
    ours, ref = _pair(cross=True, batch_first=True)
    X, y = _data(n=8)
    kw = {"lr": 0.1, "damping": 0.1} if method == "kfac" else {"lr": 0.05, "damping": 0.1, "T": 1}
    opt_ours = curvkit.optim.create(method, ours, **kw)
    opt_ref = curvkit.optim.create(method, ref, **kw)
    before = ours.att.in_proj_weight.detach().clone()
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    assert not torch.equal(before, ours.att.in_proj_weight)
    att_ref = ref.att
    in_w = torch.cat([att_ref.q.weight, att_ref.k.weight, att_ref.v.weight])
    in_b = torch.cat([att_ref.q.bias, att_ref.k.bias, att_ref.v.bias])
    torch.testing.assert_close(ours.att.in_proj_weight, in_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.att.in_proj_bias, in_b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.att.out_proj.weight, att_ref.out.weight, rtol=1e-9, atol=1e-12)
    summary = opt_ours.summary()
    assert "att.q" in summary and "att.out_proj" in summary and "first-order" not in summary


def test_functional_interception_is_scoped_and_restored():
    """F.linear is wrapped only while a tracked attention module runs, and restored even
    when its forward raises."""
    ours, _ = _pair(cross=False, batch_first=True)
    original = F.linear
    opt = curvkit.optim.KFAC(ours, lr=0.1)
    with pytest.raises(Exception):  # noqa: B017 - a bad input shape inside MHA's forward
        ours.att(torch.randn(2, 3, E + 1, dtype=torch.float64), torch.randn(2, 3, E + 1), torch.randn(2, 3, E + 1))
    assert F.linear is original
    X, _ = _data()
    ours(X)
    assert F.linear is original
    opt.remove_hooks()
    for module in ours.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_deep_copy_of_the_model_records_nothing_into_the_original():
    """copy.deepcopy(model) copies the hooks; the copy's forward passes must not feed the
    original optimizer's statistics."""
    import copy

    ours, _ = _pair(cross=True, batch_first=True)
    original = F.linear
    opt = curvkit.optim.KFAC(ours, lr=0.1, damping=0.1)
    twin = copy.deepcopy(ours)
    X, _ = _data()
    twin(X)
    assert not opt.preconditioner.engine.records
    assert F.linear is original
    ours(X)
    assert opt.preconditioner.engine.records
