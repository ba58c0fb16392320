"""Blocks see the step's gradient: ``stats.gradient`` on a statistics step (the matrix the
block preconditions), and gradient-based methods (``MethodSpec.statistics="gradient"``) get
it alone, with no hooks on the model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import curvkit
from curvkit.blocks import BlockInfo, CurvatureBlock, GradientStats
from curvkit.methods import MethodConfig, MethodSpec, Schedule, StatisticsConfig
from curvkit.optim import Preconditioner


@dataclass(frozen=True, kw_only=True)
class _LayerConfig(StatisticsConfig):
    T_stats: int = 1


@dataclass(frozen=True, kw_only=True)
class _GradientConfig(MethodConfig):
    T_stats: int = 1


class _Recorder(CurvatureBlock):
    """Keeps the gradients it is shown; preconditions with the identity."""

    def __init__(self, info: BlockInfo) -> None:
        super().__init__(info)
        self.seen: list[torch.Tensor] = []
        self.kinds: list[type] = []

    def init(self, *, dtype, device):
        pass

    def update(self, stats, decay):
        self.seen.append(stats.gradient.clone())
        self.kinds.append(type(stats))
        self.num_updates += 1

    def refresh(self, damping, lam):
        pass

    def precondition(self, grad):
        return grad

    def as_operator(self):
        raise NotImplementedError

    def state_dict(self):
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.num_updates = state["num_updates"]


def _spec(statistics: str) -> MethodSpec:
    return MethodSpec(
        name=f"recorder-{statistics}",
        config_cls=_LayerConfig if statistics == "layer" else _GradientConfig,
        block_factory=lambda info, config, registry: _Recorder(info),
        statistics=statistics,
        schedule=Schedule(refresh_period=None, ema_decay=None, damping=None),
    )


@pytest.mark.parametrize("statistics", ["layer", "gradient"])
def test_blocks_see_the_gradient_they_precondition(statistics):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pre = Preconditioner(model, _spec(statistics), T_stats=2)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert (hooks == 0) == (statistics == "gradient")
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    expected = []
    for step in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        w, b = model[2].weight.grad, model[2].bias.grad
        if step % 2 == 0:
            expected.append(torch.cat([w, b[:, None]], 1).clone())
        assert pre.step()
    block = pre.blocks["2"]
    assert len(block.seen) == 2  # statistics steps only (T_stats=2)
    for got, want in zip(block.seen, expected):
        torch.testing.assert_close(got, want)
    kind = GradientStats if statistics == "gradient" else curvkit.blocks.LayerStats
    assert all(issubclass(k, kind) for k in block.kinds)
    if statistics == "gradient":
        with pytest.raises(RuntimeError, match="gradient-based"):
            GradientStats(pre.layers["2"], expected[0]).A()


def test_bad_statistics_kind_is_refused():
    with pytest.raises(ValueError, match="statistics='rows'"):
        MethodSpec(name="x", config_cls=_LayerConfig, block_factory=lambda *a: None, statistics="rows")
    with pytest.raises(TypeError, match="StatisticsConfig"):
        MethodSpec(name="x", config_cls=_GradientConfig, block_factory=lambda *a: None)


def test_the_schedule_names_fields_the_config_has():
    """A config whose EMA field is called ``beta2`` cannot silently mean 'no averaging'."""

    @dataclass(frozen=True, kw_only=True)
    class Beta2(_LayerConfig):
        beta2: float = 0.9
        T_inv: int = 1

    with pytest.raises(ValueError, match=r"ema_decay.*'ema_decay'.*Beta2.*Schedule\(ema_decay="):
        MethodSpec(name="x", config_cls=Beta2, block_factory=lambda *a: None, schedule=Schedule(damping=None))
    spec = MethodSpec(
        name="x", config_cls=Beta2, block_factory=lambda *a: None, schedule=Schedule(ema_decay="beta2", damping=None)
    )
    assert spec.schedule.read(Beta2()).ema_decay == 0.9


def test_a_float_damping_field_is_named_not_an_attribute_error():
    @dataclass(frozen=True, kw_only=True)
    class FloatDamping(_LayerConfig):
        damping: float = 0.1
        T_inv: int = 1

    spec = MethodSpec(
        name="x", config_cls=FloatDamping, block_factory=lambda *a: None, schedule=Schedule(ema_decay=None)
    )
    with pytest.raises(curvkit.ConfigError, match=r"damping=0.1.*not a damping strategy"):
        spec.schedule.read(FloatDamping())


def test_the_core_counts_accepted_updates():
    """A block need not increment num_updates; returning False declines a batch."""

    class Declining(_Recorder):
        def update(self, stats, decay):
            self.seen.append(stats.gradient)
            return len(self.seen) % 2 == 0 or False  # declines every other batch

    spec = MethodSpec(
        name="declining",
        config_cls=_LayerConfig,
        block_factory=lambda info, config, registry: Declining(info),
        schedule=Schedule(refresh_period=None, ema_decay=None, damping=None),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    pre = Preconditioner(model, spec)
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for _ in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        pre.step()
    assert len(pre.blocks["0"].seen) == 4 and pre.blocks["0"].num_updates == 2
