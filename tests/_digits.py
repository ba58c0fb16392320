"""The digits training task shared by the method tests (sklearn's load_digits, no network)."""

from __future__ import annotations

import torch
from torch import nn

import curvkit.optim
from curvkit.bench.tasks import digits_mlp
from curvkit.demo import digits_split


def digits_accuracy(method, *, lr, momentum, seed=0, epochs=10, optimizers=None, **options):
    """Train the 64-128-10 ReLU MLP on sklearn's digits (float32, batch 64) and return the
    test accuracy (the optimizer is appended to ``optimizers`` when a list is given)."""
    X_tr, y_tr, X_te, y_te = digits_split()
    torch.manual_seed(seed)
    model = digits_mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = curvkit.optim.CurvatureOptimizer(
        model,
        method=method,
        lr=lr,
        momentum=momentum,
        loss_fn=loss_fn,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )
    if optimizers is not None:
        optimizers.append(opt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(X_tr), generator=gen)
        for i in range(0, len(X_tr), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            out = model(X_tr[idx])
            opt.curvature_backward(out, y_tr[idx])
            loss_fn(out, y_tr[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(X_te).argmax(1) == y_te).float().mean())
