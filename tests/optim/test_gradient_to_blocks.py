"""Blocks see the step's gradient: ``stats.gradient`` on a statistics step (the matrix the
block preconditions), and gradient-based methods (``MethodSpec.statistics="gradient"``) get
it alone, with no hooks on the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.blocks import BlockInfo, CurvatureBlock, GradientStats
from curvkit.methods import MethodConfig, MethodSpec
from curvkit.optim import Preconditioner


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
        config_cls=MethodConfig,
        block_factory=lambda info, config, registry: _Recorder(info),
        statistics=statistics,
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
        MethodSpec(name="x", config_cls=MethodConfig, block_factory=lambda *a: None, statistics="rows")
