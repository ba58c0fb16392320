"""Checkpoints that cross devices, as far as the CPU can show it (tests/cuda has the rest).

A checkpoint saved on CUDA and loaded on a CPU-only machine (``torch.load(...,
map_location="cpu")``) carries a CUDA generator state, which no CPU generator accepts: the
optimizer warns and continues from a new seeded stream instead of failing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvkit.optim
from curvkit.optim.optimizer import STATE_KEY


def _train(opt, model, X, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        out = model(X)
        opt.curvature_backward(out, y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()


def _fresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = curvkit.optim.KFAC(model, lr=0.05, damping=0.1, fisher="mc", loss_fn=nn.CrossEntropyLoss())
    return model, opt


def test_a_generator_saved_on_another_device_type_is_replaced_with_a_warning():
    gen = torch.Generator(device="cpu").manual_seed(1)
    X, y = torch.randn(16, 5, generator=gen, device="cpu"), torch.randint(0, 3, (16,), generator=gen, device="cpu")
    model, opt = _fresh()
    _train(opt, model, X, y, 2)
    state = copy.deepcopy(opt.state_dict())
    pre = state[STATE_KEY]
    assert pre["generator_device"] == "cpu"
    # what a CUDA run saves: a CUDA generator's state (seed and offset, 16 bytes), mapped to the CPU
    pre["generator_device"] = "cuda:0"
    pre["generator"] = torch.zeros(16, dtype=torch.uint8, device="cpu")

    model2, opt2 = _fresh()
    model2.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="saved on cuda and the model is on cpu"):
        opt2.load_state_dict(state)
    assert opt2.preconditioner.generator.device.type == "cpu"
    _train(opt2, model2, X, y, 2)
    assert all(bool(torch.isfinite(p).all()) for p in model2.parameters())


def test_a_generator_saved_on_the_same_device_type_is_restored_exactly():
    gen = torch.Generator(device="cpu").manual_seed(1)
    X, y = torch.randn(16, 5, generator=gen, device="cpu"), torch.randint(0, 3, (16,), generator=gen, device="cpu")
    model, opt = _fresh()
    _train(opt, model, X, y, 2)
    state = copy.deepcopy(opt.state_dict())
    model2, opt2 = _fresh()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state)
    assert torch.equal(opt2.preconditioner.generator.get_state(), opt.preconditioner.generator.get_state())
