"""The template's Shampoo: its steps equal Shampoo written out in plain float64 torch, it
trains on scikit-learn's digits, and the kit catches the variant that rebuilds the gradient
from captured features (only on two processes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvkit_plugin_template import SHAMPOO_SPEC
from curvkit_plugin_template.broken import FEATURES_SHAMPOO_SPEC
from torch import nn

import curvkit
import curvkit.optim
from curvkit.testing import check_data_parallel, check_sample_configs_train


def _fourth_root_inverse(m: torch.Tensor, eps: float) -> torch.Tensor:
    """(M + εI)^(-1/4) with numpy's eigh, in float64."""
    values, vectors = np.linalg.eigh(m.numpy())
    values = np.clip(values, 0.0, None) + eps
    return torch.from_numpy((vectors * values**-0.25) @ vectors.T)


def test_steps_equal_shampoo_written_out():
    """Two layers, five steps, statistics and roots every step, ρ = 0.9 (the k-th update
    with min(1 − 1/k, ρ)), no momentum or trust region: the parameters after each step equal
    a plain loop over the same formulas."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    reference = [p.detach().clone() for p in model.parameters()]
    lr, eps, rho = 0.1, 1e-3, 0.9
    opt = curvkit.optim.create(SHAMPOO_SPEC.name, model, lr=lr, epsilon=eps, ema_decay=rho, T_inv=1, recommended=False)
    stats = {}
    X, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    for k in range(1, 6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        # the reference: the same gradient, [W | b] as one matrix per layer
        grads = {}
        for layer, (w, b) in enumerate(((0, 1), (2, 3))):
            params = [p.detach().clone().requires_grad_() for p in reference]
            h = torch.tanh(X @ params[0].T + params[1])
            loss = nn.functional.cross_entropy(h @ params[2].T + params[3], y)
            g = torch.autograd.grad(loss, [params[w], params[b]])
            grads[layer] = torch.cat([g[0], g[1][:, None]], 1)
        decay = min(1 - 1 / k, rho)
        for layer, (w, b) in enumerate(((0, 1), (2, 3))):
            G = grads[layer]
            L, R = stats.get(layer, (0.0, 0.0))
            L, R = decay * L + (1 - decay) * G @ G.T, decay * R + (1 - decay) * G.T @ G
            stats[layer] = (L, R)
            step = _fourth_root_inverse(L, eps) @ G @ _fourth_root_inverse(R, eps)
            reference[w] = reference[w] - lr * step[:, :-1]
            reference[b] = reference[b] - lr * step[:, -1]
        opt.step()
        for ours, theirs in zip(model.parameters(), reference):
            torch.testing.assert_close(ours.detach(), theirs, rtol=1e-10, atol=1e-12)


def test_the_named_class_comes_from_the_spec():
    model = nn.Linear(3, 2)
    opt = curvkit.optim.TemplateShampoo(model)
    assert isinstance(opt, curvkit.optim.CurvatureOptimizer) and opt.preconditioner.spec.name == SHAMPOO_SPEC.name
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # gradient-based: no hooks


def test_trains_on_digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    X, y = sklearn.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = curvkit.optim.TemplateShampoo(model)  # the recommended settings
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    for _ in range(4):
        for i in range(0, len(train), 64):
            idx = train[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((model(X[test]).argmax(1) == y[test]).float().mean())
    assert accuracy >= 0.93, accuracy


def test_the_kit_catches_a_gradient_rebuilt_from_features():
    registry = curvkit.default_registry()
    check_sample_configs_train(FEATURES_SHAMPOO_SPEC, registry=registry)  # one process: looks right
    with pytest.raises(AssertionError) as caught:
        check_data_parallel(FEATURES_SHAMPOO_SPEC, registry=registry)
    message = str(caught.value)
    assert "'template-shampoo-features'" in message and "differs from one process on the whole batch" in message
