"""The lean step's batched path equals the layer-by-layer path.

Equal-shaped layers are converted to matrices as one stack and preconditioned in batched
products (``CurvatureBlock.batch_key`` / ``precondition_many``, ``KroneckerInverse.apply_many``);
these tests run the same training with the stacks switched off and compare, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvkit.optim
from curvkit.linalg.inverters import EigenInverse, FactoredInverse, IdentityInverse
from curvkit.optim.layers import layer_matrix, plan_stacks, split_layer_matrix


def _deep(width: int = 6, depth: int = 5, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, width, bias=bias)]
    for _ in range(depth):
        layers += [nn.Tanh(), nn.Linear(width, width, bias=bias)]
    layers += [nn.Tanh(), nn.Linear(width, 3, bias=bias)]
    return nn.Sequential(*layers).double()


def _train(model: nn.Module, opt: curvkit.optim.CurvatureOptimizer, steps: int = 6, drop: str | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        X = torch.randn(16, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        if drop is not None:  # a layer of a stack without a gradient this step
            dict(model.named_parameters())[drop].grad = None
        opt.step()


@pytest.mark.parametrize(
    "method, options",
    [
        ("kfac", {}),
        ("kfac", {"inverter": "eigh"}),
        ("kfac", {"T_inv": 2}),
        ("ekfac", {}),
        ("tkfac", {}),
        ("singd", {}),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_batched_step_equals_layer_by_layer(method, options, bias):
    model = _deep(bias=bias)
    twin = copy.deepcopy(model)
    opt = curvkit.optim.create(method, model, **options)
    ref = curvkit.optim.create(method, twin, **options)
    assert opt.preconditioner._stacks, "the equal-width layers form a stack"
    ref.preconditioner._stacks = []  # layer by layer
    block_cls = type(next(iter(opt.preconditioner.blocks.values())))
    batched_calls = []
    real = block_cls.precondition_many.__func__  # type: ignore[attr-defined]

    def spy(cls, blocks, grads):
        batched_calls.append(len(blocks))
        return real(cls, blocks, grads)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(block_cls, "precondition_many", classmethod(spy))
        _train(model, opt)
    _train(twin, ref)
    if method in ("kfac", "ekfac"):  # their blocks really ran batched
        assert batched_calls and all(n >= 2 for n in batched_calls)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{method} {options}: {name}")
    assert opt.preconditioner.counters == ref.preconditioner.counters


def test_kfac_blocks_are_batched_and_subclasses_with_their_own_precondition_are_not():
    model = _deep()
    opt = curvkit.optim.create("kfac", model)
    _train(model, opt, steps=1)
    keys = {n: b.batch_key() for n, b in opt.preconditioner.blocks.items()}
    assert all(k is not None for k in keys.values())
    assert len({keys[n] for n in opt.preconditioner._stacks[0].names}) == 1
    model = _deep()
    opt = curvkit.optim.create("kfac", model)
    block = next(iter(opt.preconditioner.blocks.values()))

    class Own(type(block)):  # type: ignore[misc]
        def precondition(self, grad):
            return 2 * super().precondition(grad)

    block.__class__ = Own
    _train(model, opt, steps=1)
    assert block.batch_key() is None


def test_a_stack_with_a_missing_gradient_falls_back_layer_by_layer():
    model = _deep()
    twin = copy.deepcopy(model)
    opt = curvkit.optim.create("kfac", model)
    ref = curvkit.optim.create("kfac", twin)
    ref.preconditioner._stacks = []
    _train(model, opt, drop="4.weight")
    _train(twin, ref, drop="4.weight")
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def test_inverse_apply_many_equals_apply():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64)
    factored = [FactoredInverse(_spd(3, gen), _spd(5, gen)) for _ in range(4)]
    eigen = [
        EigenInverse(
            torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0],
            torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0],
            torch.rand(5, 3, generator=gen, dtype=torch.float64) + 0.5,
        )
        for _ in range(4)
    ]
    for inverses in (factored, eigen, [IdentityInverse() for _ in range(4)]):
        out = type(inverses[0]).apply_many(inverses, grads)
        expected = torch.stack([inv.apply(g) for inv, g in zip(inverses, grads)])
        torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-14)
    assert len({inv.batch_key() for inv in factored}) == 1
    assert FactoredInverse(torch.ones(3, dtype=torch.float64), _spd(5, gen)).batch_key() is None  # diagonal A
    assert IdentityInverse().batch_key() is None


@pytest.mark.parametrize("bias", [True, False])
def test_stack_and_split_equal_the_one_layer_conversion(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=bias), nn.Conv2d(2, 3, 3, bias=bias), nn.Linear(4, 3, bias=bias))
    opt = curvkit.optim.create("kfac", model)
    layers = opt.preconditioner.layers
    stacks, singles = plan_stacks(layers)
    assert [s.names for s in stacks] == [("0", "1")] and singles == ["2"]
    grads = {
        n: (torch.randn_like(lay.weight), None if lay.bias is None else torch.randn_like(lay.bias))
        for n, lay in layers.items()
    }
    stack = stacks[0].stack(grads)
    for i, n in enumerate(stacks[0].names):
        torch.testing.assert_close(stack[i], layer_matrix(layers[n], *grads[n]), rtol=0, atol=0)
    ws, bs = stacks[0].split(stack)
    for i, n in enumerate(stacks[0].names):
        w, b = split_layer_matrix(layers[n], stack[i])
        torch.testing.assert_close(ws[i], w, rtol=0, atol=0)
        if bias:
            torch.testing.assert_close(bs[i], b, rtol=0, atol=0)  # type: ignore[index]
        else:
            assert bs is None and b is None
