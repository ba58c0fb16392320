"""Normalisation layers (unit-wise blocks) against the dense float64 Fisher/GGN.

The reference (tests/_norm_reference.py): Jacobians from autograd over the whole batch (a
train-mode BatchNorm's batch statistics included), loss Hessians and per-datum gradients
from ``torch.func``. The dense matrix over ``[γ, β]`` is cut into the ``k × k`` blocks of
each unit, and those must equal curvkit's to 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _norm_reference import dense_fisher, jacobian, layer_params, unit_blocks
from _reference import assert_matrix_close
from torch import nn

import curvkit
from curvkit.stats.backend import UnitwiseFactors

DT = torch.float64


class _Seq(nn.Module):
    """``Linear → norm → tanh → flatten → Linear`` on ``(N, T, d)``."""

    def __init__(self, norm: nn.Module, t: int = 3, d: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.norm = norm
        self.out = nn.Linear(t * d, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))).flatten(1))


def _perturb(norm: nn.Module) -> nn.Module:
    """Random affine parameters and (for BatchNorm) running statistics, so nothing is 1 or 0."""
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.running_mean.copy_(torch.randn_like(norm.running_mean))
            norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    return norm


def _case(kind: str):
    """(model, X, name of the norm layer)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 7
    if kind == "layernorm-seq":
        model, X = _Seq(nn.LayerNorm(4)), torch.randn(n, 3, 5, generator=g)
    elif kind == "layernorm-nobias":
        model, X = _Seq(nn.LayerNorm(4, bias=False)), torch.randn(n, 3, 5, generator=g)
    elif kind == "layernorm-2d":
        # normalized_shape (3, 4) over the last two dimensions of (N, 2, 3, 4)
        model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm((3, 4)), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))
        X = torch.randn(n, 2, 3, 5, generator=g)
        return model.to(DT), X.to(DT), "1"
    elif kind == "rmsnorm":
        model, X = _Seq(nn.RMSNorm(4)), torch.randn(n, 3, 5, generator=g)
    elif kind in ("batchnorm1d-train", "batchnorm1d-eval"):
        model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
        X = torch.randn(n, 5, generator=g)
        _perturb(model[1])
        model = model.to(DT)
        if kind.endswith("eval"):
            model.eval()
        return model, X.to(DT), "1"
    elif kind == "batchnorm1d-seq":  # (N, C, L)
        model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 3))
        X = torch.randn(n, 2, 5, generator=g)
        _perturb(model[1])
        return model.to(DT), X.to(DT), "1"
    elif kind in ("batchnorm2d-train", "batchnorm2d-eval"):
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 3))
        X = torch.randn(n, 2, 4, 4, generator=g)
        _perturb(model[1])
        model = model.to(DT)
        if kind.endswith("eval"):
            model.eval()
        return model, X.to(DT), "1"
    elif kind == "batchnorm3d":
        model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 8, 3))
        X = torch.randn(n, 1, 3, 3, 3, generator=g)
        _perturb(model[1])
        return model.to(DT), X.to(DT), "1"
    elif kind == "groupnorm":
        model = nn.Sequential(nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 3))
        X = torch.randn(n, 2, 4, 4, generator=g)
        _perturb(model[1])
        return model.to(DT), X.to(DT), "1"
    else:  # pragma: no cover
        raise ValueError(kind)
    _perturb(model.norm)
    return model.to(DT), X.to(DT), "norm"


KINDS = [
    "layernorm-seq",
    "layernorm-nobias",
    "layernorm-2d",
    "rmsnorm",
    "batchnorm1d-train",
    "batchnorm1d-eval",
    "batchnorm1d-seq",
    "batchnorm2d-train",
    "batchnorm2d-eval",
    "batchnorm3d",
    "groupnorm",
]


@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("kind", KINDS)
def test_unit_blocks_equal_the_dense_fisher(kind, fisher):
    model, X, name = _case(kind)
    y = torch.randint(0, 3, (X.shape[0],), generator=torch.Generator().manual_seed(2))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(5) if fisher == "mc" else None
    ours = curvkit.kronecker_factors(copy.deepcopy(model), loss_fn, X, y, fisher=fisher, mc_samples=1, generator=gen)
    entry = ours[name]
    assert isinstance(entry, UnitwiseFactors)
    k = len(layer_params(model, name))
    dense = dense_fisher(model, name, X, y, loss_fn, fisher, seed=5)
    expected = unit_blocks(dense, k)
    assert entry.F.shape == expected.shape and entry.F.dtype == DT
    assert_matrix_close(entry.F, expected, rtol=1e-10, msg=f"{kind} {fisher}")
    # a real test of the per-unit structure: the dense matrix couples the units
    off = dense.clone()
    d = dense.shape[0] // k
    for i in range(d):
        for a in range(k):
            for b in range(k):
                off[i + a * d, i + b * d] = 0
    assert off.abs().max() > 1e-6 * dense.abs().max()


def test_mc_samples_and_sum_reduction():
    """Several MC samples and a sum-reduced loss (the normaliser 1)."""
    model, X, name = _case("layernorm-seq")
    y = torch.randint(0, 3, (X.shape[0],), generator=torch.Generator().manual_seed(2))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    ours = curvkit.kronecker_factors(
        model, loss_fn, X, y, fisher="mc", mc_samples=3, generator=torch.Generator().manual_seed(9)
    )
    dense = dense_fisher(model, name, X, y, loss_fn, "mc", seed=9, mc_samples=3)
    assert_matrix_close(ours[name].F, unit_blocks(dense, 2), rtol=1e-10)


def test_a_norm_layer_called_twice_sums_its_uses():
    """One LayerNorm applied at two places: the per-datum gradient sums both uses."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(5, 4)
            self.norm = nn.LayerNorm(4)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.cat([torch.tanh(self.norm(self.a(x))), torch.sin(self.norm(self.b(x)))], 1))

    torch.manual_seed(3)
    model = Twice().to(DT)
    _perturb(model.norm)
    X = torch.randn(6, 5, dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    ours = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2")
    dense = dense_fisher(model, "norm", X, y, loss_fn, "type-2")
    assert_matrix_close(ours["norm"].F, unit_blocks(dense, 2), rtol=1e-10)


def test_two_norm_modules_sharing_their_parameters_are_one_block():
    """ALBERT-style: two LayerNorm modules holding the same γ and β: one unit-wise block
    whose per-datum gradient sums both sites."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)
            self.n1, self.n2 = nn.LayerNorm(4), nn.LayerNorm(4)
            self.n2.weight, self.n2.bias = self.n1.weight, self.n1.bias
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.out(torch.cat([torch.tanh(self.n1(h)), torch.sin(self.n2(2 * h))], 1))

    torch.manual_seed(0)
    model = Shared().to(DT)
    _perturb(model.n1)
    X, y = torch.randn(6, 5, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    ours = curvkit.kronecker_factors(model, loss_fn, X, y, fisher="type-2")
    assert sorted(ours) == ["a", "n1", "out"]
    dense = dense_fisher(model, "n1", X, y, loss_fn, "type-2")  # γ, β of both sites
    assert_matrix_close(ours["n1"].F, unit_blocks(dense, 2), rtol=1e-10)


def test_the_optimizer_block_sees_the_same_fisher():
    """The first statistics update of the optimizers' block (decay 0) stores the batch's
    exact per-unit empirical Fisher (from the user's own backward) and type-2 GGN."""
    for fisher in ("empirical", "type-2"):
        model, X, name = _case("batchnorm2d-train")
        y = torch.randint(0, 3, (X.shape[0],), generator=torch.Generator().manual_seed(2))
        loss_fn = nn.CrossEntropyLoss()
        dense = dense_fisher(model, name, X, y, loss_fn, fisher)
        opt = curvkit.optim.KFAC(model, lr=0.0, damping=1e-3, fisher=fisher, loss_fn=loss_fn)
        out = model(X)
        loss = loss_fn(out, y)
        opt.curvature_backward(out, y)
        loss.backward()
        opt.step()
        block = opt.preconditioner.blocks[name]
        assert_matrix_close(block.F, unit_blocks(dense, 2), rtol=1e-10, msg=fisher)


def test_laplace_per_datum_gradients_are_the_jacobian_rows():
    from curvkit.laplace.gradients import output_jacobians
    from curvkit.stats.plan import make_plan

    model, X, name = _case("groupnorm")
    plan = make_plan(model, curvkit.default_registry())
    J = jacobian(model, X, layer_params(model, name))  # (N, C, 2D)
    d = J.shape[2] // 2
    for c, (_, grads) in enumerate(output_jacobians(model, plan, X)):
        got = grads[name]  # (N, D, 2): [γ_i, β_i] per unit
        assert_matrix_close(got[:, :, 0], J[:, c, :d], rtol=1e-10)
        assert_matrix_close(got[:, :, 1], J[:, c, d:], rtol=1e-10)


class _LlamaStyleRMSNorm(nn.Module):
    """As Hugging Face's ``LlamaRMSNorm``: ``weight * normalised(x).to(input_dtype)``."""

    def __init__(self, d: int, eps: float = 1e-6, gemma: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d) if gemma else torch.ones(d))
        self.variance_epsilon = eps
        self.gemma = gemma

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32) if dtype in (torch.bfloat16, torch.float16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        scale = 1.0 + self.weight if self.gemma else self.weight  # Gemma scales by (1 + weight)
        return scale * h.to(dtype)


class _HFRMSNormHandler(curvkit.stats.ScaleShiftHandler):
    """The docs/plugins.md example: only ``normalized`` (and a scale-only ``bias``)."""

    name = "toy_hf_rms_norm"
    module_types = (_LlamaStyleRMSNorm,)
    unit_layout = "last"

    def normalized(self, module, x):
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return xhat.to(x.dtype)

    def bias(self, module):
        return None


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_a_plugin_handler_for_hugging_face_style_rmsnorm(gemma):
    class Plugin:
        @staticmethod
        @curvkit.hookimpl
        def curvkit_register_layer_handlers(register):
            register.add(_HFRMSNormHandler())

    registry = curvkit.build_registry(plugins=[Plugin])
    torch.manual_seed(0)
    norm = _LlamaStyleRMSNorm(4, gemma=gemma)
    with torch.no_grad():
        norm.weight.normal_()
    model = _Seq(norm).to(DT)
    X = torch.randn(7, 3, 5, dtype=DT)
    y = torch.randint(0, 3, (7,))
    loss_fn = nn.CrossEntropyLoss()
    for fisher in ("type-2", "empirical"):
        ours = curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher, registry=registry)["norm"]
        assert ours.F.shape == (4, 1, 1)
        dense = dense_fisher(model, "norm", X, y, loss_fn, fisher)
        assert_matrix_close(ours.F, unit_blocks(dense, 1), rtol=1e-10, msg=fisher)
    opt = curvkit.optim.KFAC(model, lr=0.1, registry=registry)
    assert "UnitwiseBlock(4 units × exact 1×1 Fisher (scale)" in opt.summary()
