"""A plugin's mistakes are named where they happen: a block factory returning a non-block
(once a bare StopIteration) when the optimizer is built, a ``precondition()`` of the wrong
shape (once ``shape '[16, 6]' is invalid for input of size 105``) on the first step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import curvkit.optim
from curvkit.blocks import KroneckerBlock
from curvkit.methods import KroneckerConfig, MethodSpec


@dataclass(frozen=True, kw_only=True)
class _Config(KroneckerConfig):
    pass


def _kronecker(info, config, registry):
    return KroneckerBlock(info, structure=config.structure_classes(registry), inverter=config.inverter_object(registry))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 16))


def _step(opt, model) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 16, (8,))).backward()
    opt.step()


def test_a_factory_returning_a_non_block_is_named_when_built():
    spec = MethodSpec(name="returns-dict", config_cls=_Config, block_factory=lambda info, config, registry: {})
    with pytest.raises(
        TypeError,
        match=r"method 'returns-dict': its block_factory returned builtins\.dict for layer '0' \(Linear\); it must "
        r"return a curvkit\.blocks\.CurvatureBlock",
    ):
        curvkit.optim.CurvatureOptimizer(_model(), method=spec, lr=0.1)


def test_a_unitwise_factory_returning_a_non_block_is_named():
    spec = MethodSpec(name="bad-unitwise", config_cls=_Config, block_factory=_kronecker, unitwise_block=lambda *a: None)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    with pytest.raises(
        TypeError, match=r"'bad-unitwise': its unitwise_block returned builtins\.NoneType for layer '1'"
    ):
        curvkit.optim.CurvatureOptimizer(model, method=spec, lr=0.1)


class _Flat(KroneckerBlock):
    def precondition(self, grad):
        return super().precondition(grad).reshape(-1)[: grad.numel() - 1]


class _Transposed(KroneckerBlock):
    def precondition(self, grad):
        return super().precondition(grad).T


@pytest.mark.parametrize(("cls", "got"), [(_Flat, r"\[111\]"), (_Transposed, r"\[7, 16\]")])
def test_a_direction_of_the_wrong_shape_is_named_on_the_first_step(cls, got):
    spec = MethodSpec(
        name="wrong-shape",
        config_cls=_Config,
        block_factory=lambda info, config, registry: (
            cls(info, structure=config.structure_classes(registry), inverter=config.inverter_object(registry))
            if info.name == "2"
            else _kronecker(info, config, registry)
        ),
    )
    model = _model()
    opt = curvkit.optim.CurvatureOptimizer(model, method=spec, lr=0.1, recommended=False)
    with pytest.raises(
        ValueError,
        match=rf"method 'wrong-shape': {cls.__name__}\.precondition\(\) returned shape {got} for layer '2' \(Linear\); "
        r"expected the gradient's shape \[16, 7\]",
    ):
        _step(opt, model)


def test_the_check_runs_once_per_block():
    model = _model()
    opt = curvkit.optim.create("kfac", model, recommended=False)
    assert opt.preconditioner._shapes_to_check == {"0", "2"}
    _step(opt, model)
    assert opt.preconditioner._shapes_to_check == set()
