"""The capture hooks follow the statistics schedule: installed for a step that collects
statistics, removed for the steps between (a module with hooks takes PyTorch's slower call
path), with the same training trajectory as hooks that stay installed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from curvkit.optim import KFAC
from curvkit.stats.engine import CaptureEngine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _hooked(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _train(model: nn.Module, steps: int, **kw) -> tuple[KFAC, list[int]]:
    opt = KFAC(model, lr=0.1, damping=0.1, T_stats=3, T_inv=3, **kw)
    X, y = _data()
    hooks = []
    for k in range(steps):
        hooks.append(_hooked(model))
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[k : k + 16]), y[k : k + 16]).backward()
        opt.step()
    return opt, hooks


def test_hooks_are_installed_only_for_statistics_steps():
    model = _model()
    opt, hooks = _train(model, 7)
    # steps 0, 3, 6 collect statistics (T_stats=3): hooks there, none in between
    assert [h > 0 for h in hooks] == [True, False, False, True, False, False, True]
    assert opt.preconditioner.capture.engine.attached  # paused, still the model's engine
    assert opt.preconditioner.blocks["0"].num_updates == 3


def test_paused_hooks_give_the_same_trajectory(monkeypatch):
    fast = _model()
    slow = copy.deepcopy(fast)
    _train(fast, 8)
    monkeypatch.setattr(CaptureEngine, "pause", lambda self: None)
    _, hooks = _train(slow, 8)
    assert all(h > 0 for h in hooks)  # the reference kept its hooks on every step
    for a, b in zip(fast.parameters(), slow.parameters()):
        assert torch.equal(a, b)


def test_a_skipped_step_keeps_the_hooks_of_its_step():
    model = _model()
    opt = KFAC(model, lr=0.1, damping=0.1, T_stats=3, T_inv=3)
    X, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    for p in model.parameters():
        p.grad[0] = float("nan")
    opt.step()  # refused: the step counter stays at 0, still a statistics step
    assert opt.preconditioner.counters["skipped_steps"] == 1
    assert _hooked(model) > 0


def test_a_checkpoint_restores_the_hooks_of_its_step():
    model = _model()
    opt, _ = _train(model, 4)  # next step 4: no statistics
    assert _hooked(model) == 0
    state = opt.state_dict()
    other = _model()
    fresh = KFAC(other, lr=0.1, damping=0.1, T_stats=3, T_inv=3)
    assert _hooked(other) > 0
    fresh.load_state_dict(state)
    assert _hooked(other) == 0


def test_remove_hooks_and_a_newer_optimizer_win_over_a_paused_engine():
    model = _model()
    opt, _ = _train(model, 2)  # paused
    opt.remove_hooks()
    assert _hooked(model) == 0 and not opt.preconditioner.capture.engine.attached
    opt.preconditioner.capture.follow_schedule()
    assert _hooked(model) == 0  # a detached engine is not resumed
    model = _model()
    old, _ = _train(model, 2)  # paused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = KFAC(model, lr=0.1, damping=0.1)
    assert old.preconditioner.capture.engine.displaced
    n = _hooked(model)
    old.preconditioner.capture.follow_schedule()
    assert _hooked(model) == n  # the displaced engine stays off
    assert new.preconditioner.capture.engine.attached


@pytest.mark.parametrize("t_stats", [1, 2])
def test_every_step_with_statistics_keeps_its_hooks(t_stats):
    model = _model()
    opt = KFAC(model, lr=0.1, damping=0.1, T_stats=t_stats, T_inv=3)
    X, y = _data()
    seen = []
    for _ in range(4):
        seen.append(_hooked(model) > 0)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    assert seen == [True, True, True, True] if t_stats == 1 else [True, False, True, False]


def test_loading_a_live_optimizers_state_dict_does_not_share_momenta():
    """The update writes momentum buffers in place: an optimizer that loads another live
    optimizer's state_dict() (no copy) must own its buffers, or training both couples them."""
    model = _model()
    opt, _ = _train(model, 3)
    twin = copy.deepcopy(model)
    opt2 = KFAC(twin, lr=0.1, damping=0.1, T_stats=3, T_inv=3)
    opt2.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), twin.parameters()):
        a, b = opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"]
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
